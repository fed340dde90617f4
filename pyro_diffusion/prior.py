r"""``DiffusionPrior``: a Pyro distribution whose density is defined by a diffusion model.

The prior holds a denoiser :math:`D(x; \sigma) \approx E[x_0 \mid x_0 + \sigma\varepsilon = x]`
and a noise grid. Sampling runs the reverse process; posterior inference in a Pyro model reads
:meth:`DiffusionPrior.denoise`, :meth:`DiffusionPrior.score` and the grid.

References:

- Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole (2021), *Score-Based Generative Modeling
  through Stochastic Differential Equations*.
- Karras, Aittala, Aila, Laine (2022), *Elucidating the Design Space of Diffusion-Based
  Generative Models*.
"""

import itertools
import math
import os

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import nn

from ._version import CHECKPOINT_FORMAT_VERSION, __version__
from .networks import default_network
from .noise_grid import noise_grid
from .preconditioning import EDMDenoiser, use_gaussian_skip
from .samplers import check_sampler, num_evaluations, reverse_sample
from .seeding import seeded
from .serialization import module_from_dict, module_to_dict
from .training import check_samples, train_denoiser

_FORMAT = "pyro_diffusion.DiffusionPrior"


def _module_device_dtype(module):
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _as_float(value, name):
    if isinstance(value, torch.Tensor):
        value = value.item()
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class DiffusionPrior(TorchDistribution):
    r"""A diffusion model as a Pyro distribution: ``f = pyro.sample("f", prior)``.

    :param callable denoiser: an ``nn.Module`` (or callable) with
        ``denoiser(x, sigma) -> x0_hat`` for ``x`` of shape ``(batch, *event_shape)`` and
        ``sigma`` of shape ``(batch,)``, estimating :math:`E[x_0 \mid x_0 + \sigma\varepsilon = x]`
        in the data's own units. The prior runs where the module's tensors are; a callable
        that is not an ``nn.Module`` runs on its ``device`` and ``dtype`` attributes, without
        them on the CPU in the default dtype.
    :param tuple event_shape: shape of one draw.
    :param float sigma_min: smallest positive noise level of the grid (default
        ``0.002 * data_std``).
    :param float sigma_max: noise level where sampling starts (default ``80 * data_std``).
        Sampling starts from :math:`N(m, (\sigma_{\max}^2 + s^2) I)` with the data's mean
        :math:`m` and root mean variance :math:`s`, so ``sigma_max`` must dwarf the data's
        largest standard deviation, not only the average one (a smooth field's leading
        eigenvalue can be tens of times ``data_std ** 2``).
        ``data_std`` is read from ``denoiser.data_std`` when it exists, else 1.
    :param int num_steps: reverse steps (denoiser calls of the ancestral sampler).
    :param str sampler: ``"ancestral"`` (default), ``"ddim"`` or ``"heun"``.
    :param float eta: DDIM stochasticity in ``[0, 1]`` (only with ``sampler="ddim"``).
    :param float rho: curvature of the EDM noise grid.
    :param int chunk_size: the most samples pushed through the denoiser at once.
    :param bool progress: show a progress bar while sampling.
    :param torch.Size batch_shape: batch shape (set by :meth:`expand` and Pyro plates).
    """

    arg_constraints = {}
    has_rsample = False

    def __init__(self, denoiser, event_shape, *, sigma_min=None, sigma_max=None, num_steps=64,
                 sampler="ancestral", eta=None, rho=7.0, chunk_size=4096, progress=False,
                 batch_shape=(), validate_args=None):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable as denoiser(x, sigma), got "
                            f"{type(denoiser).__name__}")
        event_shape = torch.Size(int(n) for n in event_shape)
        if len(event_shape) == 0 or any(n < 1 for n in event_shape):
            raise ValueError(f"event_shape must be non-empty and positive, "
                             f"got {tuple(event_shape)}")
        own = getattr(denoiser, "event_shape", None)
        if own is not None and math.prod(own) != math.prod(event_shape):
            raise ValueError(f"event_shape {tuple(event_shape)} does not match the denoiser's "
                             f"event shape {tuple(own)}")
        self.denoiser = denoiser
        scale = _as_float(getattr(denoiser, "data_std", 1.0), "denoiser.data_std")
        self.sigma_min = _as_float(0.002 * scale if sigma_min is None else sigma_min, "sigma_min")
        self.sigma_max = _as_float(80.0 * scale if sigma_max is None else sigma_max, "sigma_max")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                             f"sigma_max={self.sigma_max}")
        self.num_steps = int(num_steps)
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        self.sampler, self.eta = check_sampler(sampler, eta)
        self.rho = float(rho)
        if not (math.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"rho must be positive and finite, got {rho}")
        self.chunk_size = int(chunk_size)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.progress = bool(progress)
        self.training_history = None
        super().__init__(torch.Size(batch_shape), event_shape, validate_args=validate_args)
        dtype = self.dtype
        if dtype.is_floating_point and self.sigma_max > math.sqrt(torch.finfo(dtype).max / 16):
            raise ValueError(f"sigma_max={self.sigma_max:.3g}: its square leaves {dtype}'s "
                             "range and sampling would give NaN; rescale the data (or pass "
                             "a smaller sigma_max)")

    # ----- Distribution interface -------------------------------------------------------------
    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def _settings(self):
        return dict(sigma_min=self.sigma_min, sigma_max=self.sigma_max, num_steps=self.num_steps,
                    sampler=self.sampler, eta=self.eta if self.sampler == "ddim" else None,
                    rho=self.rho, chunk_size=self.chunk_size, progress=self.progress)

    def expand(self, batch_shape, _instance=None):
        new = type(self)(self.denoiser, self.event_shape, batch_shape=torch.Size(batch_shape),
                         validate_args=False, **self._settings())
        new.training_history = self.training_history
        new._validate_args = self._validate_args
        return new

    def replace(self, **settings):
        """A copy with other sampling settings (``num_steps``, ``sampler``, ``eta``, ...)."""
        merged = self._settings()
        if "sampler" in settings and "eta" not in settings:
            merged["eta"] = None
        merged.update(settings)
        new = type(self)(self.denoiser, self.event_shape, batch_shape=self.batch_shape, **merged)
        new.training_history = self.training_history
        return new

    @property
    def device(self):
        if isinstance(self.denoiser, nn.Module):
            return _module_device_dtype(self.denoiser)[0]
        return torch.device(getattr(self.denoiser, "device", None) or "cpu")

    @property
    def dtype(self):
        if isinstance(self.denoiser, nn.Module):
            return _module_device_dtype(self.denoiser)[1]
        return getattr(self.denoiser, "dtype", None) or torch.get_default_dtype()

    def to(self, device=None, dtype=None):
        """Move the denoiser (in place) and return the prior."""
        if not callable(getattr(self.denoiser, "to", None)):
            raise TypeError(
                f"the denoiser ({type(self.denoiser).__name__}) is not an nn.Module and has no "
                f"'to' method, so it cannot be moved; build it where it should run and give it "
                f"'device' and 'dtype' attributes, or wrap it in an nn.Module")
        self.denoiser.to(device=device, dtype=dtype)
        return self

    @property
    def sigmas(self):
        """The noise grid: ``num_steps`` decreasing levels followed by 0."""
        return noise_grid(self.num_steps, self.sigma_min, self.sigma_max, self.rho,
                          dtype=self.dtype, device=self.device)

    @property
    def num_evaluations(self):
        """Denoiser evaluations per sample drawn with the current settings."""
        return num_evaluations(self.sampler, self.num_steps)

    def log_prob(self, value):
        raise NotImplementedError(
            "DiffusionPrior has no tractable log density. To condition a Pyro model on data, use "
            "the package's posterior samplers on the model instead of Pyro's generic inference "
            "(which needs log_prob of every latent site)."
        )

    # ----- Denoiser and score -----------------------------------------------------------------
    def _flatten(self, x, sigma):
        x = torch.as_tensor(x, device=self.device, dtype=self.dtype)
        k = len(self.event_shape)
        if x.dim() < k or x.shape[x.dim() - k:] != self.event_shape:
            raise ValueError(f"x must have shape (..., {', '.join(map(str, self.event_shape))}),"
                             f" got {tuple(x.shape)}")
        lead = x.shape[: x.dim() - k]
        flat = x.reshape((-1,) + self.event_shape)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        try:
            sigma = sigma.expand(lead).reshape(-1)
        except RuntimeError:
            raise ValueError(f"sigma of shape {tuple(sigma.shape)} does not broadcast to the "
                             f"batch shape {tuple(lead)} of x") from None
        return flat, sigma, lead

    def denoise(self, x, sigma):
        r""":math:`D(x; \sigma)`, the denoiser's estimate of :math:`E[x_0 \mid x]`.

        :param torch.Tensor x: noisy values of shape ``(..., *event_shape)``.
        :param sigma: noise level: a float or a tensor broadcastable to ``x``'s batch shape.
        :returns: a tensor of ``x``'s shape, on the prior's device (``x`` is moved there).
        """
        flat, sigma, lead = self._flatten(x, sigma)
        out = self.denoiser(flat, sigma)
        if not isinstance(out, torch.Tensor) or out.shape != flat.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the denoiser returned {got} for input of shape "
                             f"{tuple(flat.shape)}; it must return the input's shape")
        return out.reshape(lead + self.event_shape)

    def score(self, x, sigma):
        r"""The score :math:`\nabla_x \log p_\sigma(x) = (D(x; \sigma) - x) / \sigma^2`."""
        flat, sigma, lead = self._flatten(x, sigma)
        x0 = self.denoise(flat, sigma)
        s2 = sigma.square().reshape((-1,) + (1,) * len(self.event_shape))
        return ((x0 - flat) / s2).reshape(lead + self.event_shape)

    def initial_noise(self, num_samples):
        """Draws of :math:`x_{\\sigma_{\\max}}` that start the reverse process."""
        mean = getattr(self.denoiser, "data_mean", 0.0)
        std = _as_float(getattr(self.denoiser, "data_std", 0.0), "denoiser.data_std")
        mean = torch.as_tensor(mean, dtype=self.dtype, device=self.device)
        eps = torch.randn((num_samples,) + self.event_shape, dtype=self.dtype, device=self.device)
        return mean + math.sqrt(self.sigma_max ** 2 + std ** 2) * eps

    @torch.no_grad()
    def sample(self, sample_shape=()):
        """Draw ``sample_shape + batch_shape + event_shape`` samples by the reverse process."""
        shape = torch.Size(sample_shape) + self.batch_shape
        if any(n < 0 for n in shape):
            raise ValueError(f"sample_shape must not be negative, got {tuple(sample_shape)}")
        total = shape.numel()
        sigmas = self.sigmas
        chunks = []
        for start in range(0, total, self.chunk_size):
            n = min(self.chunk_size, total - start)
            desc = "sampling" if total <= self.chunk_size else f"sampling {start + n}/{total}"
            chunks.append(reverse_sample(self.denoise, self.initial_noise(n), sigmas,
                                         sampler=self.sampler, eta=self.eta,
                                         progress=self.progress, desc=desc))
        if not chunks:
            return torch.empty(shape + self.event_shape, dtype=self.dtype, device=self.device)
        return torch.cat(chunks).reshape(shape + self.event_shape)

    # ----- Training ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, samples, *, net=None, steps=2000, batch_size=256, lr=2e-3, weight_decay=0.0,
            ema_decay=0.999, device=None, seed=None, progress=True, validation_fraction=0.0,
            gaussian_skip=False, **prior_settings):
        """Train a prior on samples by denoising score matching (EDM weighting).

        :param samples: training draws of shape ``(num_samples, *event_shape)`` (tensor or array).
        :param net: ``None`` (choose from the event shape), ``"mlp"``, ``"unet"``, or a network
            ``net(z, c_noise)`` to wrap in an :class:`~pyro_diffusion.EDMDenoiser`.
        :param int steps: optimisation steps.
        :param int batch_size: samples per step.
        :param float lr: peak AdamW learning rate.
        :param float weight_decay: AdamW weight decay.
        :param float ema_decay: decay of the EMA weights used for sampling.
        :param device: where to train; default the device of ``samples``.
        :param int seed: seed for initialisation, batches and noise (the global RNG is left as
            it was); ``None`` uses the global RNG.
        :param bool progress: show a progress bar with the loss.
        :param float validation_fraction: fraction of samples held out to report a validation
            loss in ``prior.training_history["val_loss"]``.
        :param gaussian_skip: let the network learn only the non-Gaussian part of the data,
            on top of the Wiener filter of the samples' covariance (``True``), or on top of the
            exact denoiser of a ``K``-component Gaussian mixture fitted to them by EM (an
            integer ``K > 1``, for scale mixtures such as fields drawn under hyperpriors),
            starting from a zero residual (see :class:`~pyro_diffusion.EDMDenoiser`). Priors
            of GP- and CAR-like fields become far more accurate at small noise in their smooth
            directions, which :class:`~pyro_diffusion.DiffusionLangevin` relies on (and then
            preconditions with). Off by default for now: the guided evidence trick overshoots
            with such near-exact priors at coarse step counts (as with an exact Gaussian
            denoiser).
        :param prior_settings: passed to :class:`DiffusionPrior` (``num_steps``, ``sampler``,
            ``sigma_min``, ``sigma_max``, ...).
        :returns: a trained :class:`DiffusionPrior`, with ``training_history`` set.
        """
        samples = check_samples(samples).to(torch.get_default_dtype())
        device = torch.device(device) if device is not None else samples.device
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        with seeded(seed, device):
            samples = samples.to(device)
            n_val = int(round(validation_fraction * samples.shape[0]))
            if n_val:
                perm = torch.randperm(samples.shape[0], device=device)
                val, samples = samples[perm[:n_val]], samples[perm[n_val:]]
                check_samples(samples, name="samples after holding out the validation fraction")
            else:
                val = None
            gaussian_skip = use_gaussian_skip(samples.shape[1:], gaussian_skip)
            network = default_network(samples.shape[1:], net, zero_output=gaussian_skip)
            denoiser = EDMDenoiser.from_samples(network, samples,
                                                gaussian_skip=gaussian_skip,
                                                progress=progress).to(device)
            cls(denoiser, samples.shape[1:], **prior_settings)  # settings' errors before training
            ema, history = train_denoiser(denoiser, samples, steps=steps, batch_size=batch_size,
                                          lr=lr, weight_decay=weight_decay, ema_decay=ema_decay,
                                          validation_samples=val, progress=progress)
        prior = cls(ema, samples.shape[1:], **prior_settings)
        prior.training_history = history
        return prior

    # ----- Checkpoints ------------------------------------------------------------------------
    def save(self, path):
        """Write the denoiser (class, config, weights) and the sampling settings to ``path``."""
        if not isinstance(self.denoiser, nn.Module):
            raise TypeError("only an nn.Module denoiser can be saved")
        settings = self._settings()
        checkpoint = {
            "format": _FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "package_version": __version__,
            "event_shape": list(self.event_shape),
            "settings": settings,
            "denoiser": module_to_dict(self.denoiser),
            "training_history": self.training_history,
        }
        path = os.fspath(path)
        tmp = path + ".tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, map_location=None, **settings):
        """Load a prior written by :meth:`save`; ``settings`` override the saved sampling ones.

        Only tensors and plain data are read (``torch.load(..., weights_only=True)``).

        :param path: the checkpoint file.
        :param map_location: the device to put the prior on (a device or its name, such as
            ``"cuda"``; default: the CPU). Unlike ``torch.load``'s, dicts and callables are not
            accepted: the checkpoint is read on the CPU and the denoiser moved as a whole.
        :param settings: sampling settings (``num_steps``, ``sampler``, ...).
        """
        if isinstance(map_location, dict) or callable(map_location):
            raise TypeError("map_location must be a device or a device name, such as 'cuda'; "
                            f"got a {type(map_location).__name__}")
        path = os.fspath(path)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:
            first = (str(e).splitlines() or ["empty or truncated file"])[0][:200]
            raise ValueError(f"{path} is not a readable pyro-diffusion checkpoint "
                             f"({type(e).__name__}: {first})") from e
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a DiffusionPrior checkpoint")
        version = checkpoint.get("format_version")
        if version != CHECKPOINT_FORMAT_VERSION:
            raise ValueError(
                f"{path} was written in checkpoint format {version} (pyro-diffusion "
                f"{checkpoint.get('package_version')}); this pyro-diffusion {__version__} reads "
                f"format {CHECKPOINT_FORMAT_VERSION}"
            )
        try:
            denoiser = module_from_dict(checkpoint["denoiser"])
            saved = dict(checkpoint["settings"])
            event_shape = checkpoint["event_shape"]
        except (KeyError, TypeError, RuntimeError, AttributeError) as e:
            raise ValueError(f"{path} is a corrupt DiffusionPrior checkpoint: {e}") from e
        for name, tensor in list(denoiser.named_parameters()) + list(denoiser.named_buffers()):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{path} is a corrupt DiffusionPrior checkpoint: the "
                                 f"denoiser's {name!r} holds NaN or infinite values")
        if "sampler" in settings and "eta" not in settings:
            saved["eta"] = None
        saved.update(settings)
        if map_location is not None:
            denoiser = denoiser.to(map_location)
        denoiser.eval()
        prior = cls(denoiser, event_shape, **saved)
        prior.training_history = checkpoint.get("training_history")
        return prior
