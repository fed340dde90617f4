r"""EDM preconditioning: a trainable denoiser in the data's own units.

A network :math:`F` is wrapped as

.. math::

    D(x; \sigma) = c_{\rm skip}(\sigma)\,x + c_{\rm out}(\sigma)\,
    F\big(c_{\rm in}(\sigma)\,x,\ c_{\rm noise}(\sigma)\big),

with :math:`c_{\rm skip} = \sigma_d^2/(\sigma^2+\sigma_d^2)`,
:math:`c_{\rm out} = \sigma\sigma_d/\sqrt{\sigma^2+\sigma_d^2}`,
:math:`c_{\rm in} = 1/\sqrt{\sigma^2+\sigma_d^2}` and :math:`c_{\rm noise} = \ln(\sigma)/4`,
applied to standardised data :math:`z = (x - m)/s` with a per-coordinate mean :math:`m` and one
global scale :math:`s` (a global scale keeps the noise isotropic, so
:math:`D_x(x; \sigma) = m + s\,D_z((x - m)/s;\ \sigma/s)`).

**Gaussian skip.** The scalar :math:`c_{\rm skip}` is the best linear denoiser of data with
covariance :math:`\sigma_d^2 I`. With ``gaussian_skip=True`` it is replaced by the best linear
denoiser of data with the training samples' own covariance :math:`\Sigma = U \Lambda U^\top`
(the Wiener filter),

.. math::

    D(z; \sigma) = U\,{\rm diag}\Big(\frac{\lambda_k}{\lambda_k + \sigma^2}\Big)\,U^\top z
    + c_{\rm out}(\sigma)\, F\big(c_{\rm in}(\sigma)\,z,\ c_{\rm noise}(\sigma)\big),

so the network learns only what is not Gaussian about the data. For fields such as GP or CAR
draws this matters at small noise: there the denoising loss carries almost no information about
the field's smooth, large-scale directions, which a plain network then gets wrong (its score can
be off by 20-200 % there), while the Gaussian part is estimated from second moments, which are
cheap to learn. :math:`\Sigma` is the Ledoit-Wolf shrinkage estimate (Ledoit and Wolf, 2004), which
stays well conditioned with fewer samples than dimensions. It costs two ``d x d`` products per
evaluation and ``d^2`` stored numbers.

**Gaussian-mixture skip.** Data that are a mixture of Gaussians with different covariances, such
as GP draws under hyperpriors on the lengthscale and the variance, are denoised by one Wiener
filter with the average covariance, which at small noise is wrong for every draw (on such draws
its relative score error at noise 0.05 is 0.4-0.5, ``bench/mixture_skip.py``), and the network
learns the correction poorly.
``gaussian_skip=K`` with ``K > 1`` uses instead the exact denoiser of a ``K``-component mixture
fitted to the (standardised) samples by EM
(:func:`~pyro_diffusion.fit_gaussian_mixture`),

.. math::

    D_{\rm skip}(z; \sigma) = \sum_k r_k(z; \sigma)\,\big(\mu_k + \Sigma_k(\Sigma_k +
    \sigma^2 I)^{-1}(z - \mu_k)\big),\qquad r_k \propto w_k N(z; \mu_k, \Sigma_k + \sigma^2 I),

at ``2 K d^2`` operations per evaluation and ``2 K d^2`` stored numbers. The Wiener filter's
eigenbasis is kept too: it is the prior's Gaussian part that
:class:`~pyro_diffusion.DiffusionLangevin` preconditions with.

References:

- Karras, Aittala, Aila, Laine (2022), *Elucidating the Design Space of Diffusion-Based
  Generative Models*, Table 1.
- Ledoit and Wolf (2004), *A well-conditioned estimator for large-dimensional covariance
  matrices*, Journal of Multivariate Analysis 88.
"""

import itertools
import math
import numbers

import torch
from torch import nn

from .covariance import shrunk_eigh
from .exact import GaussianMixtureDenoiser
from .mixture_em import fit_gaussian_mixture
from .serialization import register_denoiser

#: Largest event for which the Gaussian skip can be used (it stores a ``d x d`` eigenbasis
#: and costs two ``d x d`` products per evaluation).
GAUSSIAN_SKIP_MAX_DIM = 8192


def use_gaussian_skip(event_shape, gaussian_skip=False):
    """Check the ``gaussian_skip`` option against the event's size and return the number of
    Gaussian components of the skip (``0``: none, ``1``: the Wiener filter, ``K > 1``: a
    fitted mixture)."""
    if isinstance(gaussian_skip, bool) or gaussian_skip is None:
        components = int(bool(gaussian_skip))
    elif isinstance(gaussian_skip, numbers.Integral) and gaussian_skip >= 0:
        components = int(gaussian_skip)
    else:
        raise ValueError("gaussian_skip must be True, False or a positive number of mixture "
                         f"components, got {gaussian_skip!r}")
    d = math.prod(event_shape)
    if components and d > GAUSSIAN_SKIP_MAX_DIM:
        raise ValueError(f"gaussian_skip needs a {d} x {d} eigenbasis; events of more than "
                         f"{GAUSSIAN_SKIP_MAX_DIM} values are not supported, pass "
                         "gaussian_skip=False")
    return components


@register_denoiser
class EDMDenoiser(nn.Module):
    r"""Preconditioned denoiser ``D(x, sigma)`` around a noise-conditioned network.

    :param nn.Module net: network ``net(z, c_noise) -> F`` on standardised inputs.
    :param torch.Tensor mean: per-coordinate data mean, of the event's shape (or a scalar).
    :param float std: global data scale; the standardised data has unit mean variance.
    :param float sigma_data: standard deviation assumed for the standardised data.
    :param tuple event_shape: the event's shape.
    :param gaussian_skip: ``True`` (or ``1``) replaces the scalar skip by the Wiener filter of
        the data's covariance, an integer ``K > 1`` by the exact denoiser of a ``K``-component
        Gaussian mixture fitted to the data (see the module notes); :meth:`set_statistics` or
        :meth:`from_samples` fit them (until then the skip is the plain EDM one,
        :math:`\sigma_d^2 I`).
    """

    def __init__(self, net, event_shape, mean=0.0, std=1.0, sigma_data=1.0,
                 gaussian_skip=False):
        super().__init__()
        self.net = net
        self.event_shape = tuple(int(n) for n in event_shape)
        std = float(std)
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be positive and finite, got {std}")
        # The statistics live with the network (a module moved before it was wrapped).
        device = next(itertools.chain(net.parameters(), net.buffers()),
                      torch.as_tensor(mean)).device
        mean = torch.as_tensor(mean, dtype=torch.get_default_dtype(), device=device)
        self.register_buffer("mean", mean.expand(self.event_shape).clone())
        self.std = std
        self.sigma_data = float(sigma_data)
        self.skip_components = use_gaussian_skip(self.event_shape, gaussian_skip)
        self.skip_mixture = None
        if self.skip_components:
            d = math.prod(self.event_shape)
            dtype = self.mean.dtype
            self.register_buffer("skip_basis", torch.eye(d, dtype=dtype, device=device))
            self.register_buffer("skip_eigenvalues", torch.full((d,), self.sigma_data ** 2,
                                                                dtype=dtype, device=device))
        if self.skip_components > 1:
            K = self.skip_components
            eye = torch.eye(d, dtype=dtype, device=device) * self.sigma_data ** 2
            self.skip_mixture = GaussianMixtureDenoiser(
                torch.ones(K, dtype=dtype, device=device),
                torch.zeros(K, d, dtype=dtype, device=device), eye.expand(K, d, d).clone())

    @property
    def gaussian_skip(self):
        """Whether the skip is Gaussian (the Wiener filter or a Gaussian mixture's denoiser)."""
        return self.skip_components > 0

    @classmethod
    def from_samples(cls, net, samples, gaussian_skip=False, progress=False):
        """Wrap ``net`` with the statistics read from ``samples`` ``(n, *event_shape)``.

        :param gaussian_skip: the Gaussian skip: ``False``, ``True`` or a number of mixture
            components (see the module notes).
        :param bool progress: show the mixture's EM progress.
        """
        den = cls(net, samples.shape[1:], gaussian_skip=gaussian_skip)
        return den.to(samples.device).set_statistics(samples, progress=progress)

    @torch.no_grad()
    def set_statistics(self, samples, progress=False):
        """Refit the mean, the scale and (with the Gaussian skip) the covariance, or the
        mixture, to ``samples``.

        The network is left as it is. Returns ``self``.
        """
        samples = samples.reshape((samples.shape[0],) + self.event_shape)
        mean = samples.mean(0)
        centred = samples - mean
        # Scaled by the largest deviation first: squares of 1e-30 or 1e20 leave float32.
        largest = centred.abs().max()
        std = (largest * (centred / largest).square().mean().sqrt()).item() if largest > 0 else 0.0
        if not std > 0:
            raise ValueError("the training samples are all identical: nothing to learn")
        if not math.isfinite(std):
            raise ValueError(f"the training samples' spread is not finite in {samples.dtype} "
                             f"(largest deviation from the mean {largest.item():.3g}); rescale "
                             "them")
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std = std
        if self.gaussian_skip:
            evals, evecs = shrunk_eigh((centred / std).cpu())
            self.skip_basis.copy_(evecs.to(self.skip_basis.dtype))
            self.skip_eigenvalues.copy_(evals.to(self.skip_eigenvalues.dtype))
        if self.skip_mixture is not None:
            fitted = fit_gaussian_mixture(centred / std, self.skip_components, seed=0,
                                          progress=progress)
            for name, buf in self.skip_mixture.named_buffers():
                buf.copy_(getattr(fitted, name).to(buf))
        return self

    def get_config(self):
        config = {"net": self.net, "event_shape": list(self.event_shape), "mean": self.mean,
                  "std": self.std, "sigma_data": self.sigma_data}
        if self.skip_components:
            config["gaussian_skip"] = True if self.skip_components == 1 else self.skip_components
        return config

    @property
    def data_mean(self):
        return self.mean

    @property
    def data_std(self):
        return self.std * self.sigma_data

    def standardized(self, x, sigma):
        """The preconditioned network's output in standardised units: ``(D_z, z, sigma_z)``."""
        shape = (-1,) + (1,) * len(self.event_shape)
        z = (x - self.mean) / self.std
        s = (sigma / self.std).reshape(shape)
        sd2 = self.sigma_data ** 2
        var = s.square() + sd2
        c_out = s * self.sigma_data * var.rsqrt()
        c_in = var.rsqrt()
        out = self.net(c_in * z, self._noise_input(sigma, z.dtype))
        return self._skip(z, s, var) + c_out * out, z, s

    def _noise_input(self, sigma, dtype):
        r"""The network's noise input :math:`\log(\sigma / \mathrm{std}) / 4` per row. One level
        broadcast over the batch (a stride-0 view, as the samplers pass it) stays a broadcast
        view, so the network can see that it is shared without reading it back."""
        flat = sigma.reshape(-1)
        shared = flat.shape[0] > 1 and flat.stride(0) == 0
        level = flat[:1] if shared else flat
        c_noise = ((level / self.std).clamp(min=1e-20).log() / 4).to(dtype)
        return c_noise.expand(flat.shape[0]) if shared else c_noise

    def _skip(self, z, s, var):
        if not self.skip_components:
            return (self.sigma_data ** 2 / var) * z
        if self.skip_mixture is not None:
            flat = z.reshape(z.shape[0], -1)
            return self.skip_mixture(flat, s.reshape(-1).expand(flat.shape[0])).reshape(z.shape)
        lam = self.skip_eigenvalues
        gain = lam / (lam + s.reshape(-1, 1).square())
        coef = z.reshape(z.shape[0], -1) @ self.skip_basis
        return ((gain * coef) @ self.skip_basis.T).reshape(z.shape)

    def forward(self, x, sigma):
        d_z, _, _ = self.standardized(x, sigma)
        return self.mean + self.std * d_z
