r"""``DiffusionLangevin``: annealed kinetic Langevin posterior sampling with a diffusion prior.

Guided reverse samplers (:class:`~pyro_diffusion.DiffusionPosterior`) approximate the
likelihood of a *noisy* latent, and that approximation's error stays in the draws however many
are made. This sampler uses the model's exact likelihood instead. It targets the split-Gibbs
(plug-and-play) joint of Vono et al. (2019) with the diffusion prior as the prior factor
(Xu and Chi, 2024):

.. math::

    \pi_\rho(x, z) \propto p(z)\, N(x; z, \rho^2 I)\, p(y \mid x).

Its two marginals and one conditional are all within reach of a denoiser :math:`D`:

- :math:`x`'s marginal is :math:`p_\rho(x)\, p(y \mid x)`, with :math:`p_\rho` the prior
  convolved with :math:`N(0, \rho^2 I)`, whose score is Tweedie's
  :math:`(D(x; \rho) - x) / \rho^2`: one network evaluation per gradient, no backpropagation
  through the network;
- :math:`z \mid x` is the denoising posterior :math:`p(z \mid z + \rho\varepsilon = x)`,
  sampled by the prior's own reverse process started at noise level :math:`\rho` from
  :math:`x`;
- :math:`z`'s marginal is :math:`p(z)\, (p(y \mid \cdot) * N(0, \rho^2 I))(z)`, the posterior
  with a likelihood blurred by :math:`\rho`, which tends to the posterior as
  :math:`\rho \to 0` (the blur adds about :math:`\rho^2` to each observation's noise variance on
  the latent's scale).

So the sampler runs underdamped Langevin dynamics (the BAOAB splitting of Leimkuhler and
Matthews, 2013) on :math:`x` while :math:`\rho` falls geometrically from ``rho_max`` to
``rho_min`` over the first ``anneal`` fraction of the steps and then stays there, and returns
:math:`z` drawn from the reverse process from ``rho_min``. The mass matrix is diagonal,
:math:`M = 1/\rho^2 + \mathrm{diag}(-\nabla^2 \log p(y \mid x))`, refreshed each step with a
Rademacher Hessian-vector product of the log-likelihood (exact when each observation depends on
one coordinate, as for counts per area; unbiased otherwise), so the step size is a
dimensionless fraction of the stiffest local oscillation and informative observations do not
destabilise it. Momentum damping makes smooth, weakly identified directions (large posterior
variance) travel ballistically rather than diffusively, in :math:`O(s / \rho)` steps for
posterior sd :math:`s` instead of :math:`O(s^2 / \rho^2)`.

The result is approximate in two controlled ways: the blur :math:`\rho_{\min}` (smaller is more
exact and mixes slower) and the unadjusted Langevin discretisation (smaller ``step_size`` is
more exact). Neither depends on how well a guidance approximates :math:`p(y \mid x_\sigma)`.
Like any Langevin method it is made for unimodal (or mildly multimodal) posteriors, such as
latent fields under generalised linear observations: the annealing reaches separated modes but
does not weigh them correctly (on the 25-component mixture benchmark it is no better than
guided MMPS, ``bench/langevin_mixture.py``); :class:`~pyro_diffusion.DiffusionSMC` is the tool
for those.

With a *learned* denoiser the dynamics lean on the network's score at noise :math:`\rho` in
every direction, including the smooth ones that carry a field's large-scale uncertainty, and
those are what a denoiser learns worst at small noise: on the GP priors of
``bench/vs_nuts.py`` the trained MLP's score at :math:`\rho = 0.1` is within 5-14 % of the
exact one overall but off by 22 % (1-D grid) to 180 % (2-D grid) in the 20 smoothest
directions. The reverse process barely feels that (it takes the large-scale structure from the
high noise levels), while Langevin dynamics at fixed noise integrates it wherever the data
leave the field free (a patch of zero counts): on the 2-D grid such a patch drifted to several
times the reference posterior's spread, where the same sampler with the exact GP denoiser
matched NUTS. Use it with exact or structured denoisers, or check a learned one on a stand-in
problem with an exact prior (or NUTS) first (``bench/score_error.py`` measures the score error).

On a Gaussian prior with Gaussian observations the target is closed form (the test suite checks
it), and on GP fields with 256 Poisson or Binomial counts it matches long NUTS runs with the
exact GP denoiser (``bench/vs_nuts.py``).

References:

- Vono, Dobigeon, Chainais (2019), *Split-and-augmented Gibbs sampler*.
- Xu, Chi (2024), *Provably robust score-based diffusion posterior sampling for plug-and-play
  image reconstruction*; Wu, Sun, Chen, Zhang, Yue, Bouman (2024), *Principled probabilistic
  imaging using diffusion models as plug-and-play priors*.
- Leimkuhler, Matthews (2013), *Rational construction of stochastic numerical methods for
  molecular sampling* (BAOAB).
"""

import math

import pyro
import torch
from tqdm.auto import tqdm

from .noise_grid import noise_grid
from .posterior import BatchPosterior
from .samplers import reverse_sample


def _positive(value, name):
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value}")
    return value


class DiffusionLangevin(BatchPosterior):
    r"""Posterior samples by annealed kinetic Langevin dynamics with the model's exact likelihood.

    The model is written as for :class:`~pyro_diffusion.DiffusionPosterior`: one latent site
    distributed as a :class:`~pyro_diffusion.DiffusionPrior`, observed sites with their Pyro
    distributions. Every observed site's ``log_prob`` must be differentiable in the latent (any
    continuous function of it: counts, Gaussian, Gamma, ...). See the module documentation for
    the algorithm.

    :param callable model: the Pyro model.
    :param int num_samples: posterior draws (independent chains of the dynamics).
    :param int num_steps: Langevin steps per draw; each costs one denoiser evaluation and
        two passes through the likelihood. The final denoising adds ``denoise_steps``.
    :param float rho_max: the blur at the start of the annealing (default: the denoiser's
        ``data_std``, else 1).
    :param float rho_min: the blur at the end (default: ``0.1 * data_std``). The draws target
        the posterior with each observation's likelihood blurred by :math:`N(0, \rho_{\min}^2)`
        on the latent's scale: choose it below the posterior standard deviations you care
        about. Smaller is more exact with an exact denoiser but mixes slower and leans harder
        on a learned denoiser's score at small noise, where its relative error grows; on GP
        fields with a trained MLP denoiser 0.1 gave the best means, 0.05 the best with the
        exact denoiser (``bench/vs_nuts.py``).
    :param float anneal: fraction of the steps spent lowering the blur; the rest run at
        ``rho_min``.
    :param float step_size: the BAOAB step, as a fraction of the stiffest local period (stable
        below 2; 0.5 keeps the discretisation bias small).
    :param float persistence: the fraction of the momentum kept at each step (0: overdamped
        Langevin; close to 1: Hamiltonian-like, less random-walk behaviour).
    :param int denoise_steps: ancestral reverse steps from ``rho_min`` to 0 for the final draw
        of :math:`z \mid x`.
    :param int batch_size: draws per batch; each batch is independent and becomes one ArviZ
        chain.
    :param device: where to sample (default: the prior's device).
    :param int seed: seed for the run (the global RNG is restored afterwards).
    :param bool progress: show a progress bar over the steps.

    After :meth:`run`, ``wall_time`` holds the seconds spent, ``divergences`` the number of
    chain-steps that produced a non-finite state and were undone (their momentum is redrawn),
    and ``num_evaluations`` the denoiser evaluations per draw.
    """

    def __init__(self, model, num_samples=1000, num_steps=200, *, rho_max=None, rho_min=None,
                 anneal=0.5, step_size=0.5, persistence=0.8, denoise_steps=32, batch_size=1000,
                 device=None, seed=None, progress=True):
        self.model = model
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self._check_sizes()
        self.num_steps = int(num_steps)
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        self.rho_max = None if rho_max is None else _positive(rho_max, "rho_max")
        self.rho_min = None if rho_min is None else _positive(rho_min, "rho_min")
        self.anneal = float(anneal)
        if not 0.0 <= self.anneal <= 1.0:
            raise ValueError(f"anneal must be in [0, 1], got {anneal}")
        self.step_size = _positive(step_size, "step_size")
        if self.step_size >= 2.0:
            raise ValueError(f"step_size must be below 2 (the stability limit), got {step_size}")
        self.persistence = float(persistence)
        if not 0.0 <= self.persistence < 1.0:
            raise ValueError(f"persistence must be in [0, 1), got {persistence}")
        self.denoise_steps = int(denoise_steps)
        if self.denoise_steps < 1:
            raise ValueError(f"denoise_steps must be at least 1, got {denoise_steps}")
        self.device = device
        self.seed = seed
        self.progress = progress
        self.divergences = 0
        self.num_evaluations = None

    def _prepare(self, lik, prior):
        scale = float(getattr(prior.denoiser, "data_std", 1.0))
        self.rho_max_used = self.rho_max if self.rho_max is not None else scale
        self.rho_min_used = self.rho_min if self.rho_min is not None else 0.1 * scale
        if self.rho_min_used > self.rho_max_used:
            raise ValueError(f"rho_min ({self.rho_min_used:.4g}) must not exceed rho_max "
                             f"({self.rho_max_used:.4g})")
        if self.rho_min_used < prior.sigma_min:
            raise ValueError(f"rho_min ({self.rho_min_used:.4g}) is below the prior's sigma_min "
                             f"({prior.sigma_min:.4g}), where its denoiser was not trained")
        n_anneal = max(1, round(self.anneal * self.num_steps))
        log_rhos = torch.linspace(math.log(self.rho_max_used), math.log(self.rho_min_used),
                                  n_anneal, dtype=torch.float64)
        rhos = log_rhos.exp().tolist()
        self._rhos = (rhos + [self.rho_min_used] * self.num_steps)[:self.num_steps]
        self._num_anneal = min(n_anneal, self.num_steps)
        self._final_sigmas = noise_grid(self.denoise_steps, prior.sigma_min, self.rho_min_used,
                                        prior.rho, dtype=prior.dtype, device=prior.device)
        self.num_evaluations = self.num_steps + 1 + self.denoise_steps
        self.divergences = 0

    def _force(self, lik, prior, x, rho, curvature=True):
        r"""The gradient of :math:`\log p_\rho(x) + \log p(y \mid x)` and, with
        ``curvature``, a Rademacher probe of the squared rows of the log-likelihood's Hessian,
        :math:`(H\xi)^2`, whose mean is :math:`\sum_j H_{ij}^2`."""
        n = x.shape[0]
        with torch.no_grad():
            x0 = prior.denoise(x, torch.full((n,), rho, dtype=x.dtype, device=x.device))
        with torch.enable_grad(), pyro.validation_enabled(False):
            xg = x.detach().requires_grad_(True)
            log_lik = lik.log_likelihood(xg)
            (grad,) = torch.autograd.grad(log_lik.sum(), xg, create_graph=curvature)
            hvp = None
            if curvature and grad.requires_grad:
                probe = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
                (hvp,) = torch.autograd.grad((grad * probe).sum(), xg, allow_unused=True)
        square = torch.zeros_like(x) if hvp is None else hvp.detach().square()
        return (x0 - x) / rho ** 2 + grad.detach(), square

    def _sample_batch(self, lik, prior, size, desc):
        h, keep = self.step_size, self.persistence
        refresh = math.sqrt(1.0 - keep ** 2)
        rhos = self._rhos
        mean = getattr(prior.denoiser, "data_mean", 0.0)
        mean = torch.as_tensor(mean, dtype=prior.dtype, device=prior.device)
        x = mean + rhos[0] * torch.randn((size,) + prior.event_shape, dtype=prior.dtype,
                                         device=prior.device)
        flat = (size, -1)
        batch_dims = (size,) + (1,) * (x.dim() - 1)
        force, square = self._force(lik, prior, x, rhos[0])
        bad = ~torch.isfinite(force.reshape(flat)).all(-1)
        if bool(bad.any()):  # start those chains at the prior mean instead
            x = torch.where(bad.reshape(batch_dims), mean.expand_as(x), x)
            force, square = self._force(lik, prior, x, rhos[0])
            if not bool(torch.isfinite(force).all()):
                raise ValueError(
                    f"the gradient of the log-likelihood is not finite at the prior mean of "
                    f"{lik.site!r}: check the observed sites' parameters (NaN or infinite "
                    f"values, or a link that overflows)")
        # Curvature scale of the likelihood per coordinate: the root of an exponential average
        # of (H xi)^2, i.e. the norm of each Hessian row (|H_ii| when observations depend on
        # one coordinate each). It adapts during the annealing and is frozen afterwards, so the
        # dynamics at rho_min has a fixed mass matrix.
        square = torch.nan_to_num(square, nan=0.0, posinf=0.0)
        row2 = square
        frozen = False
        v = torch.randn_like(x) * rhos[0]
        for i, rho in enumerate(tqdm(rhos, desc=desc, disable=not self.progress, leave=False)):
            if not frozen:  # the larger of the running average and the latest probe
                mass = 1.0 / rho ** 2 + torch.maximum(row2, square).sqrt()
                frozen = i >= self._num_anneal
            # B A O A B
            v_new = v + 0.5 * h * force / mass
            x_new = x + 0.5 * h * v_new
            v_new = keep * v_new + refresh * torch.randn_like(v_new) / mass.sqrt()
            x_new = x_new + 0.5 * h * v_new
            force_new, square = self._force(lik, prior, x_new, rho, curvature=not frozen)
            square = torch.nan_to_num(square, nan=0.0, posinf=0.0)
            v_new = v_new + 0.5 * h * force_new / mass
            ok = torch.isfinite(x_new.reshape(flat)).all(-1) \
                & torch.isfinite(force_new.reshape(flat)).all(-1) \
                & torch.isfinite(v_new.reshape(flat)).all(-1)
            if not bool(ok.all()):
                self.divergences += int((~ok).sum())
                keep_mask = ok.reshape(batch_dims)
                fresh = torch.randn_like(v) / mass.sqrt()
                x_new = torch.where(keep_mask, x_new, x)
                v_new = torch.where(keep_mask, v_new, fresh)
                force_new = torch.where(keep_mask, force_new, force)
                square = torch.where(keep_mask, square, row2)
            x, v, force = x_new, v_new, force_new
            if not frozen:
                row2 = 0.8 * row2 + 0.2 * square
        with torch.no_grad():
            return reverse_sample(prior.denoise, x, self._final_sigmas, sampler="ancestral")
