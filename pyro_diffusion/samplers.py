r"""Reverse-process samplers on a noise grid, agnostic of what the denoiser is.

A sampler only sees a callable ``denoise(x, sigma)`` returning :math:`\hat x_0 = D(x; \sigma)`
for ``x`` of shape ``(batch, *event_shape)`` and ``sigma`` of shape ``(batch,)``. Guided
posterior sampling passes a posterior denoiser :math:`D_y` instead of :math:`D`, so the same
code serves priors and posteriors.

In the variance-exploding form :math:`x_\sigma = x_0 + \sigma\varepsilon`, one step from
:math:`\sigma` to :math:`\sigma' < \sigma` with :math:`\hat x = D(x; \sigma)` is

.. math::

    x' = \hat x + \sqrt{\sigma'^2 - c^2}\,\frac{x - \hat x}{\sigma} + c\,\varepsilon,
    \qquad c = \eta\,\sigma'\sqrt{1 - \sigma'^2/\sigma^2},

with :math:`\eta = 1` the ancestral (DDPM) kernel and :math:`\eta = 0` deterministic DDIM
(equal to the Euler step of the probability-flow ODE).

References:

- Ho, Jain, Abbeel (2020), *Denoising Diffusion Probabilistic Models*.
- Song, Meng, Ermon (2021), *Denoising Diffusion Implicit Models*.
- Karras, Aittala, Aila, Laine (2022), *Elucidating the Design Space of Diffusion-Based
  Generative Models* (Heun's second-order sampler, Algorithm 1).
"""

import torch
from tqdm.auto import tqdm

#: Names accepted by :func:`reverse_sample`.
SAMPLERS = ("ancestral", "ddim", "heun")


def check_sampler(sampler, eta=None):
    """Validate a sampler name and its ``eta``; return ``(sampler, eta)`` with defaults filled."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler == "ancestral":
        if eta not in (None, 1, 1.0):
            raise ValueError(f"the ancestral sampler has eta=1; use sampler='ddim' for eta={eta}")
        return sampler, 1.0
    if sampler == "heun":
        if eta not in (None, 0, 0.0):
            raise ValueError(f"the Heun sampler is deterministic (eta=0), got eta={eta}")
        return sampler, 0.0
    eta = 0.0 if eta is None else float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM needs 0 <= eta <= 1, got eta={eta}")
    return sampler, eta


def num_evaluations(sampler, num_steps):
    """Denoiser evaluations per sample of :func:`reverse_sample` on a grid of ``num_steps``."""
    check_sampler(sampler)
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def ddim_step(x, x_hat, sigma, sigma_next, eta):
    r"""One DDIM-:math:`\eta` step from ``sigma`` to ``sigma_next``, each of shape ``(batch,)``.

    ``sigma_next == 0`` returns ``x_hat``.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    s, s_next = sigma.reshape(shape), sigma_next.reshape(shape)
    ratio2 = (s_next / s).square().clamp(max=1.0)
    c = eta * s_next * (1.0 - ratio2).clamp(min=0.0).sqrt()
    keep = (s_next.square() - c.square()).clamp(min=0.0).sqrt()
    x_next = x_hat + keep * (x - x_hat) / s
    if eta > 0:
        x_next = x_next + c * torch.randn_like(x)
    return x_next


def reverse_sample(denoise, x, sigmas, *, sampler="ancestral", eta=None, progress=False,
                   desc="sampling"):
    """Run the reverse process from ``x`` at ``sigmas[0]`` down to noise level ``sigmas[-1] = 0``.

    :param callable denoise: ``denoise(x, sigma) -> x0_hat`` with ``sigma`` of shape ``(batch,)``.
    :param torch.Tensor x: start, of shape ``(batch, *event_shape)``, distributed as the data
        convolved with :math:`N(0, \\sigma_0^2 I)`.
    :param torch.Tensor sigmas: decreasing noise levels ending at 0, e.g. from
        :func:`~pyro_diffusion.noise_grid.noise_grid`.
    :param str sampler: ``"ancestral"`` (DDPM), ``"ddim"`` (with ``eta``) or ``"heun"``
        (deterministic second order).
    :param float eta: DDIM stochasticity in ``[0, 1]``; only for ``"ddim"`` (default 0).
    :param bool progress: show a tqdm progress bar over the steps.
    :returns: samples at noise level 0, shaped like ``x``.
    """
    sampler, eta = check_sampler(sampler, eta)
    sigmas = torch.as_tensor(sigmas, dtype=x.dtype, device=x.device)
    levels = sigmas.tolist() if sigmas.dim() == 1 else []  # read once: the loop never waits
    if len(levels) < 2 or levels[-1] != 0:
        raise ValueError("sigmas must be a 1-D grid of at least two levels ending with 0")
    batch = x.shape[0]
    shape = (-1,) + (1,) * (x.dim() - 1)
    for i in tqdm(range(sigmas.numel() - 1), desc=desc, disable=not progress, leave=False):
        s = sigmas[i].expand(batch)
        s_next = sigmas[i + 1].expand(batch)
        x_hat = denoise(x, s)
        if sampler != "heun":
            x = ddim_step(x, x_hat, s, s_next, eta)
            continue
        x_euler = ddim_step(x, x_hat, s, s_next, 0.0)
        if levels[i + 1] == 0:
            x = x_euler
            continue
        slope = (x - x_hat) / s.reshape(shape)
        slope_next = (x_euler - denoise(x_euler, s_next)) / s_next.reshape(shape)
        x = x + 0.5 * (sigmas[i + 1] - sigmas[i]) * (slope + slope_next)
    return x
