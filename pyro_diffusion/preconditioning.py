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

References:

- Karras, Aittala, Aila, Laine (2022), *Elucidating the Design Space of Diffusion-Based
  Generative Models*, Table 1.
- Ledoit and Wolf (2004), *A well-conditioned estimator for large-dimensional covariance
  matrices*, Journal of Multivariate Analysis 88.
"""

import math

import torch
from torch import nn

from .serialization import register_denoiser

#: Largest event for which the Gaussian skip can be used (it stores a ``d x d`` eigenbasis
#: and costs two ``d x d`` products per evaluation).
GAUSSIAN_SKIP_MAX_DIM = 8192


def use_gaussian_skip(event_shape, gaussian_skip=False):
    """Check the ``gaussian_skip`` option against the event's size and return it as a bool."""
    gaussian_skip = bool(gaussian_skip)
    d = math.prod(event_shape)
    if gaussian_skip and d > GAUSSIAN_SKIP_MAX_DIM:
        raise ValueError(f"gaussian_skip needs a {d} x {d} eigenbasis; events of more than "
                         f"{GAUSSIAN_SKIP_MAX_DIM} values are not supported, pass "
                         "gaussian_skip=False")
    return gaussian_skip


def shrunk_covariance(z):
    r"""Ledoit-Wolf estimate of the covariance of centred rows ``z`` ``(n, d)``, float64.

    Shrinks the sample covariance :math:`S` towards :math:`\mu I`, :math:`\mu = {\rm tr}\,S/d`,
    with the weight that minimises the expected squared Frobenius error.
    """
    z = z.reshape(z.shape[0], -1).to(torch.float64)
    n, d = z.shape
    s = z.T @ z / n
    mu = s.trace() / d
    delta2 = (s - mu * torch.eye(d, dtype=s.dtype, device=s.device)).square().sum()
    # sum_i ||z_i z_i^T - S||_F^2 = sum_i ||z_i||^4 - n ||S||_F^2
    beta2 = ((z.square().sum(1).square().sum() - n * s.square().sum()) / n ** 2).clamp(min=0.0)
    weight = (beta2 / delta2).clamp(max=1.0) if delta2 > 0 else torch.ones((), dtype=s.dtype)
    return (1 - weight) * s + weight * mu * torch.eye(d, dtype=s.dtype, device=s.device)


def shrunk_eigh(z):
    r"""Eigenvalues and eigenvectors of :func:`shrunk_covariance` of centred rows ``z``,
    float64, the eigenvalues floored at ``1e-10`` times the largest (no direction is exactly
    noise-free, which keeps :math:`\lambda / (\lambda + \sigma^2)` defined at
    :math:`\sigma = 0`)."""
    evals, evecs = torch.linalg.eigh(shrunk_covariance(z))
    return evals.clamp(min=1e-10 * float(evals.max().clamp(min=1e-30))), evecs


@register_denoiser
class EDMDenoiser(nn.Module):
    r"""Preconditioned denoiser ``D(x, sigma)`` around a noise-conditioned network.

    :param nn.Module net: network ``net(z, c_noise) -> F`` on standardised inputs.
    :param torch.Tensor mean: per-coordinate data mean, of the event's shape (or a scalar).
    :param float std: global data scale; the standardised data has unit mean variance.
    :param float sigma_data: standard deviation assumed for the standardised data.
    :param tuple event_shape: the event's shape.
    :param bool gaussian_skip: replace the scalar skip by the Wiener filter of the data's
        covariance (see the module notes); :meth:`set_statistics` or :meth:`from_samples` fill
        in the covariance (until then it is :math:`\sigma_d^2 I`, the plain EDM skip).
    """

    def __init__(self, net, event_shape, mean=0.0, std=1.0, sigma_data=1.0,
                 gaussian_skip=False):
        super().__init__()
        self.net = net
        self.event_shape = tuple(int(n) for n in event_shape)
        std = float(std)
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be positive and finite, got {std}")
        mean = torch.as_tensor(mean, dtype=torch.get_default_dtype())
        self.register_buffer("mean", mean.expand(self.event_shape).clone())
        self.std = std
        self.sigma_data = float(sigma_data)
        self.gaussian_skip = bool(gaussian_skip)
        if self.gaussian_skip:
            d = math.prod(self.event_shape)
            dtype = self.mean.dtype
            self.register_buffer("skip_basis", torch.eye(d, dtype=dtype))
            self.register_buffer("skip_eigenvalues", torch.full((d,), self.sigma_data ** 2,
                                                                dtype=dtype))

    @classmethod
    def from_samples(cls, net, samples, gaussian_skip=False):
        """Wrap ``net`` with the statistics read from ``samples`` ``(n, *event_shape)``.

        :param bool gaussian_skip: use the Gaussian skip (see the module notes).
        """
        gaussian_skip = use_gaussian_skip(samples.shape[1:], gaussian_skip)
        den = cls(net, samples.shape[1:], gaussian_skip=gaussian_skip)
        return den.to(samples.device).set_statistics(samples)

    @torch.no_grad()
    def set_statistics(self, samples):
        """Refit the mean, the scale and (with the Gaussian skip) the covariance to ``samples``.

        The network is left as it is. Returns ``self``.
        """
        samples = samples.reshape((samples.shape[0],) + self.event_shape)
        mean = samples.mean(0)
        centred = samples - mean
        std = centred.square().mean().sqrt().item()
        if not std > 0:
            raise ValueError("the training samples are all identical: nothing to learn")
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std = std
        if self.gaussian_skip:
            evals, evecs = shrunk_eigh((centred / std).cpu())
            self.skip_basis.copy_(evecs.to(self.skip_basis.dtype))
            self.skip_eigenvalues.copy_(evals.to(self.skip_eigenvalues.dtype))
        return self

    def get_config(self):
        config = {"net": self.net, "event_shape": list(self.event_shape), "mean": self.mean,
                  "std": self.std, "sigma_data": self.sigma_data}
        if self.gaussian_skip:
            config["gaussian_skip"] = True
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
        c_noise = s.reshape(-1).clamp(min=1e-20).log() / 4
        out = self.net(c_in * z, c_noise.to(z.dtype))
        return self._skip(z, s, var) + c_out * out, z, s

    def _skip(self, z, s, var):
        if not self.gaussian_skip:
            return (self.sigma_data ** 2 / var) * z
        lam = self.skip_eigenvalues
        gain = lam / (lam + s.reshape(-1, 1).square())
        coef = z.reshape(z.shape[0], -1) @ self.skip_basis
        return ((gain * coef) @ self.skip_basis.T).reshape(z.shape)

    def forward(self, x, sigma):
        d_z, _, _ = self.standardized(x, sigma)
        return self.mean + self.std * d_z
