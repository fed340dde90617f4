r"""Denoising score matching with EDM weighting, AdamW and an exponential moving average.

For data :math:`x_0`, noise :math:`\varepsilon \sim N(0, I)` and a log-normal noise level
:math:`\ln\sigma \sim N(P_{\rm mean}, P_{\rm std}^2)`, minimise

.. math::

    \lambda(\sigma)\,\lVert D(x_0 + \sigma\varepsilon; \sigma) - x_0\rVert^2,
    \qquad \lambda(\sigma) = \frac{\sigma^2 + \sigma_d^2}{(\sigma\sigma_d)^2},

in standardised units. Sampling uses the EMA of the weights.

References:

- Vincent (2011), *A Connection Between Score Matching and Denoising Autoencoders*.
- Karras, Aittala, Aila, Laine (2022), *Elucidating the Design Space of Diffusion-Based
  Generative Models*, section 5.
"""

import copy
import math
import time
import warnings

import torch
from tqdm.auto import tqdm

from ._checks import check_positive_int

#: The fewest training samples :func:`check_samples` accepts.
MIN_SAMPLES = 8


def check_samples(samples, event_shape=None, name="samples"):
    """Return ``samples`` as a float tensor of shape ``(n, *event_shape)``, or raise clearly."""
    if not isinstance(samples, torch.Tensor):
        try:
            samples = torch.as_tensor(samples)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a tensor or array, "
                            f"got {type(samples).__name__}") from e
    if not samples.is_floating_point():
        samples = samples.to(torch.get_default_dtype())
    if samples.dim() < 2:
        raise ValueError(f"{name} must have shape (num_samples, *event_shape), "
                         f"got shape {tuple(samples.shape)}")
    if event_shape is not None and tuple(samples.shape[1:]) != tuple(event_shape):
        raise ValueError(f"{name} have event shape {tuple(samples.shape[1:])}, expected "
                         f"{tuple(event_shape)} (shape (num_samples, *event_shape))")
    finite = torch.isfinite(samples.reshape(samples.shape[0], -1)).all(-1)
    if not finite.all():
        bad = (~finite).nonzero().flatten()
        raise ValueError(f"{name} contain NaN or infinite values in {bad.numel()} of "
                         f"{samples.shape[0]} rows (first: row {bad[0].item()})")
    if samples.shape[0] < MIN_SAMPLES:
        raise ValueError(f"{name}: need at least {MIN_SAMPLES} training samples, "
                         f"got {samples.shape[0]}")
    return samples


def edm_loss(denoiser, x0, log_sigma_mean=-0.5, log_sigma_std=1.2, noise=None):
    """EDM-weighted denoising loss of an :class:`~pyro_diffusion.EDMDenoiser`, per sample.

    :param x0: clean samples ``(batch, *event_shape)`` in the data's units.
    :param noise: optional ``(log_sigma, eps)`` pair to use instead of fresh draws.
    """
    if noise is None:
        log_s = log_sigma_mean + log_sigma_std * torch.randn(x0.shape[0], device=x0.device,
                                                             dtype=x0.dtype)
        eps = torch.randn_like(x0)
    else:
        log_s, eps = noise
    # Noise levels are drawn in standardised units and converted to the data's units.
    sigma = log_s.exp() * denoiser.std
    d_z, _, s = denoiser.standardized(x0 + sigma.reshape((-1,) + (1,) * (x0.dim() - 1)) * eps,
                                      sigma)
    z0 = (x0 - denoiser.mean) / denoiser.std
    sd2 = denoiser.sigma_data ** 2
    weight = (s.square() + sd2) / (s.square() * sd2)
    return (weight * (d_z - z0).square()).flatten(1).mean(-1)


class _EMA:
    def __init__(self, module, decay):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    @torch.no_grad()
    def update(self, module):
        self.num_updates += 1
        t = self.num_updates
        decay = min(self.decay, (1.0 + t) / (10.0 + t))
        torch._foreach_lerp_(list(self.module.parameters()),
                             [p.detach() for p in module.parameters()], 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), module.buffers(), strict=True):
            ema_b.copy_(b)


def train_denoiser(denoiser, samples, *, steps=2000, batch_size=256, lr=2e-3, weight_decay=0.0,
                   ema_decay=0.999, warmup_steps=100, validation_samples=None, eval_every=None,
                   progress=True, desc="training"):
    """Train an :class:`~pyro_diffusion.EDMDenoiser` in place and return its EMA copy.

    :param denoiser: the denoiser to train (its device and dtype are used).
    :param torch.Tensor samples: training data ``(n, *event_shape)``.
    :param int steps: optimisation steps.
    :param int batch_size: samples per step.
    :param float lr: peak AdamW learning rate (linear warm-up, then cosine decay to 10%).
    :param float weight_decay: AdamW weight decay.
    :param float ema_decay: decay of the weights' exponential moving average.
    :param torch.Tensor validation_samples: optional held-out data; its loss (with the EMA
        weights and a fixed set of noise draws) is recorded every ``eval_every`` steps.
    :param bool progress: show a tqdm progress bar with the running loss.
    :returns: ``(ema_denoiser, history)``; ``history`` holds per-step ``"loss"``, the
        ``"val_loss"`` records as ``(step, loss)``, ``"seconds"`` and ``"interrupted"``.
        A keyboard interrupt stops training early and keeps what was learned so far.
    """
    steps = check_positive_int(steps, "steps")
    batch_size = check_positive_int(batch_size, "batch_size")
    if not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ValueError(f"lr must be positive and finite, got {lr!r}")
    if not 0.0 <= float(ema_decay) < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
    device = denoiser.mean.device
    samples = samples.to(device=device, dtype=denoiser.mean.dtype)
    n = samples.shape[0]
    ema = _EMA(denoiser, ema_decay)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def lr_at(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    history = {"loss": [], "val_loss": [], "seconds": 0.0, "interrupted": False}
    val = None
    if validation_samples is not None and validation_samples.shape[0] > 0:
        val = validation_samples.to(device=device, dtype=samples.dtype)[:4096]
        gen = torch.Generator(device="cpu").manual_seed(0)
        val_noise = (-0.5 + 1.2 * torch.randn(val.shape[0], generator=gen, dtype=val.dtype),
                     torch.randn(val.shape, generator=gen, dtype=val.dtype))
        val_noise = tuple(t.to(device) for t in val_noise)
        eval_every = eval_every or max(1, steps // 20)

    start = time.perf_counter()
    denoiser.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    running = None
    try:
        for step in bar:
            batch = samples[torch.randint(n, (min(batch_size, n),), device=device)]
            loss = edm_loss(denoiser, batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            ema.update(denoiser)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {step}; "
                                         "lower lr or check the data's scale")
            history["loss"].append(value)
            running = value if running is None else 0.98 * running + 0.02 * value
            if val is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
                with torch.no_grad():
                    v = edm_loss(ema.module, val, noise=val_noise).mean().item()
                history["val_loss"].append((step + 1, v))
            if progress and step % 25 == 0:
                post = {"loss": f"{running:.4f}"}
                if history["val_loss"]:
                    post["val"] = f"{history['val_loss'][-1][1]:.4f}"
                bar.set_postfix(post, refresh=False)
    except KeyboardInterrupt:
        history["interrupted"] = True
        warnings.warn(f"training interrupted after {len(history['loss'])} of {steps} steps; "
                      "returning the weights learned so far", stacklevel=2)
    finally:
        bar.close()
        denoiser.eval()
    history["seconds"] = time.perf_counter() - start
    return ema.module, history
