r"""Exact denoisers for Gaussian and Gaussian-mixture data.

With :math:`x = x_0 + \sigma\varepsilon` and :math:`x_0 \sim N(\mu, \Sigma)`,

.. math::

    D(x; \sigma) = E[x_0 \mid x] = \mu + \Sigma(\Sigma + \sigma^2 I)^{-1}(x - \mu).

For a mixture :math:`\sum_k w_k N(\mu_k, \Sigma_k)` the denoiser averages the components'
denoisers with responsibilities :math:`r_k(x) \propto w_k N(x; \mu_k, \Sigma_k + \sigma^2 I)`.
Both are computed from an eigendecomposition made once, so any :math:`\sigma \ge 0`, a singular
:math:`\Sigma` included, is handled stably and differentiably in ``x``. They back tests,
benchmarks, and users who want an analytic prior inside a :class:`~pyro_diffusion.DiffusionPrior`.
"""

import math

import torch
from torch import nn

from .serialization import register_denoiser


def _as_event_shape(event_shape, numel):
    if event_shape is None:
        return (numel,)
    event_shape = tuple(int(n) for n in event_shape)
    if math.prod(event_shape) != numel:
        raise ValueError(f"event_shape {event_shape} does not hold {numel} coordinates")
    return event_shape


def _eigh(cov, name):
    if not torch.isfinite(cov).all():
        raise ValueError(f"{name} has NaN or infinite entries")
    if (cov - cov.transpose(-1, -2)).abs().max() > 1e-6 * cov.abs().max().clamp(min=1.0):
        raise ValueError(f"{name} must be symmetric")
    evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.transpose(-1, -2)))
    scale = evals.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    if (evals < -1e-6 * scale).any():
        raise ValueError(f"{name} must be positive semi-definite (smallest eigenvalue "
                         f"{evals.min().item():.3g})")
    return evals.clamp(min=0.0), evecs


def _common_device(*values):
    """The device of the first tensor among ``values`` that is not on the CPU, else the CPU:
    an exact denoiser built from a CPU mean and a GPU covariance lives on the GPU."""
    return next((v.device for v in values
                 if isinstance(v, torch.Tensor) and v.device.type != "cpu"), torch.device("cpu"))


def _flat(x, event_shape):
    if tuple(x.shape[-len(event_shape):]) != event_shape:
        raise ValueError(f"expected x of shape (batch, *{event_shape}), got {tuple(x.shape)}")
    return x.reshape(x.shape[: x.dim() - len(event_shape)] + (-1,))


def _sigma_column(sigma, x_flat):
    sigma = torch.as_tensor(sigma, dtype=x_flat.dtype, device=x_flat.device)
    return sigma.expand(x_flat.shape[:-1]).unsqueeze(-1)


@register_denoiser
class GaussianDenoiser(nn.Module):
    r"""Exact denoiser of :math:`N(\mu, \Sigma)` data. Its buffers live where its arguments
    do (on a GPU if any of them is on one).

    :param torch.Tensor mean: :math:`\mu`, of the event's shape (or flat).
    :param torch.Tensor cov: :math:`\Sigma`, of shape ``(d, d)`` with ``d`` the event's size;
        positive semi-definite.
    :param tuple event_shape: the event's shape; defaults to ``mean.shape``.
    """

    def __init__(self, mean, cov, event_shape=None):
        super().__init__()
        mean = torch.as_tensor(mean, device=_common_device(mean, cov))
        if not mean.is_floating_point():
            mean = mean.to(torch.get_default_dtype())
        cov = torch.as_tensor(cov, dtype=mean.dtype, device=mean.device)
        event_shape = _as_event_shape(event_shape or mean.shape, mean.numel())
        d = mean.numel()
        if cov.shape != (d, d):
            raise ValueError(f"cov must have shape ({d}, {d}) for a mean of {d} entries, "
                             f"got {tuple(cov.shape)}")
        if not torch.isfinite(mean).all():
            raise ValueError("mean has NaN or infinite entries")
        evals, evecs = _eigh(cov, "cov")
        self.event_shape = event_shape
        self.register_buffer("mean", mean.reshape(-1))
        self.register_buffer("cov", cov)
        self.register_buffer("evals", evals)
        self.register_buffer("evecs", evecs)

    @property
    def data_mean(self):
        """Mean of the data, of the event's shape."""
        return self.mean.reshape(self.event_shape)

    @property
    def data_std(self):
        """Root mean variance of the data's coordinates."""
        return self.evals.mean().sqrt()

    def get_config(self):
        return {"mean": self.mean, "cov": self.cov, "event_shape": list(self.event_shape)}

    def forward(self, x, sigma):
        """:math:`E[x_0 \\mid x_0 + \\sigma\\varepsilon = x]` for ``x`` of shape
        ``(batch, *event_shape)`` and ``sigma`` of shape ``(batch,)`` (or broadcastable)."""
        xf = _flat(x, self.event_shape)
        s2 = _sigma_column(sigma, xf).square()
        z = (xf - self.mean) @ self.evecs
        shrunk = z * self.evals / (self.evals + s2).clamp(min=torch.finfo(z.dtype).tiny)
        out = self.mean + shrunk @ self.evecs.transpose(-1, -2)
        return out.reshape(x.shape)

    def condition(self, A, y, noise_cov):
        r"""The exact posterior given :math:`y = A x_0 + N(0, \Sigma_y)`, as a denoiser.

        :param torch.Tensor A: ``(m, d)`` observation matrix (on the flattened event).
        :param torch.Tensor y: ``(m,)`` observation.
        :param noise_cov: :math:`\Sigma_y`, ``(m, m)``, ``(m,)`` diagonal or a scalar variance.
        :returns: ``(GaussianDenoiser, log_evidence)``.
        """
        mix = GaussianMixtureDenoiser(self.mean.new_ones(1), self.mean[None], self.cov[None],
                                      event_shape=self.event_shape)
        post, log_ev = mix.condition(A, y, noise_cov)
        return GaussianDenoiser(post.means[0], post.covs[0], self.event_shape), log_ev

    def ancestral_marginal(self, sigmas, start_std=None):
        r"""The exact law of the ancestral sampler's output on this prior, as a denoiser.

        With an exact Gaussian denoiser every ancestral step is linear-Gaussian, so the
        sampler's output is :math:`N(\mu, Q\,\mathrm{diag}(v)\,Q^\top)` in the prior's
        eigenbasis :math:`Q`: per eigenvalue :math:`\lambda` the variance follows
        :math:`v' = b^2 v + c^2` with :math:`a = \lambda / (\lambda + \sigma^2)`,
        :math:`b = a + (\sigma'^2/\sigma^2)(1 - a)` and :math:`c^2 = \sigma'^2 (1 - \sigma'^2 /
        \sigma^2)`, from :math:`v_0 = \sigma_0^2 + \sigma_d^2` (the start of
        :meth:`~pyro_diffusion.DiffusionPrior.initial_noise`). Its distance to
        :math:`N(\mu, \Sigma)` is the discretisation error of the grid, and it is the exact
        target (prior, posterior and evidence) of a sampler or SMC run on that grid.

        :param torch.Tensor sigmas: the decreasing grid; a final ``0`` is the deterministic
            last step (:math:`x \mapsto D(x; \sigma)`).
        :param float start_std: standard deviation of the start around the mean (default
            :math:`\sqrt{\sigma_0^2 + \sigma_d^2}`).
        """
        sig = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        lam = self.evals.double().cpu()
        if start_std is None:
            start_std = math.sqrt(float(sig[0]) ** 2 + float(self.data_std) ** 2)
        var = torch.full_like(lam, float(start_std) ** 2)
        for s, s_next in zip(sig[:-1].tolist(), sig[1:].tolist(), strict=True):
            a = lam / (lam + s * s)
            r2 = (s_next / s) ** 2
            b = a + r2 * (1.0 - a)
            var = b * b * var + s_next ** 2 * (1.0 - r2)
        evecs = self.evecs.double().cpu()
        cov = (evecs * var) @ evecs.T
        return GaussianDenoiser(self.mean.reshape(self.event_shape),
                                cov.to(self.cov.dtype).to(self.cov.device), self.event_shape)

    def sample_data(self, num_samples):
        """Exact draws from :math:`N(\\mu, \\Sigma)`, of shape ``(num_samples, *event_shape)``."""
        eps = torch.randn(num_samples, self.mean.numel(), dtype=self.mean.dtype,
                          device=self.mean.device)
        x = self.mean + (eps * self.evals.sqrt()) @ self.evecs.transpose(-1, -2)
        return x.reshape((num_samples,) + self.event_shape)


@register_denoiser
class GaussianMixtureDenoiser(nn.Module):
    r"""Exact denoiser of Gaussian-mixture data :math:`\sum_k w_k N(\mu_k, \Sigma_k)`. Its
    buffers live where its arguments do (on a GPU if any of them is on one).

    :param torch.Tensor weights: mixture weights of shape ``(K,)`` (normalised internally).
    :param torch.Tensor means: component means of shape ``(K, d)`` or ``(K, *event_shape)``.
    :param torch.Tensor covs: component covariances: ``(K, d, d)`` full, ``(K, d)`` diagonal,
        ``(K,)`` isotropic, or a single scalar shared by all. Diagonal and isotropic ones are
        evaluated without matrix products, in :math:`O(K d)` per sample.
    :param tuple event_shape: the event's shape; defaults to ``means.shape[1:]``.
    """

    def __init__(self, weights, means, covs, event_shape=None):
        super().__init__()
        means = torch.as_tensor(means, device=_common_device(weights, means, covs))
        if not means.is_floating_point():
            means = means.to(torch.get_default_dtype())
        weights = torch.as_tensor(weights, dtype=means.dtype, device=means.device)
        covs = torch.as_tensor(covs, dtype=means.dtype, device=means.device)
        if weights.dim() != 1 or means.dim() < 2 or means.shape[0] != weights.shape[0]:
            raise ValueError(f"need weights (K,) and means (K, *event_shape); got "
                             f"{tuple(weights.shape)} and {tuple(means.shape)}")
        if (weights < 0).any() or not torch.isfinite(weights).all() or weights.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        if not torch.isfinite(means).all():
            raise ValueError("means have NaN or infinite entries")
        K = weights.shape[0]
        event_shape = _as_event_shape(event_shape or means.shape[1:], means[0].numel())
        d = means[0].numel()
        means = means.reshape(K, d)
        if covs.dim() == 0:
            covs = covs.expand(K)
        if covs.shape == (K,):
            covs = covs.unsqueeze(-1).expand(K, d).clone()
        if covs.shape == (K, d):
            if (covs < 0).any() or not torch.isfinite(covs).all():
                raise ValueError("diagonal covariances must be finite and non-negative")
            self.diagonal = True
            evals, evecs = covs, None
        elif covs.shape == (K, d, d):
            self.diagonal = False
            evals, evecs = _eigh(covs, "covs")
        else:
            raise ValueError(f"covs must have shape (K,), (K, d) or (K, d, d) with K={K}, "
                             f"d={d}; got {tuple(covs.shape)}")
        self.event_shape = event_shape
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.register_buffer("means", means)
        self.register_buffer("covs", covs)
        self.register_buffer("evals", evals)
        self.register_buffer("evecs", evecs)

    @classmethod
    def grid_benchmark(cls, dim, seed=0, spacing=8.0, dtype=torch.float64):
        """The 25-component benchmark mixture of Cardoso et al. (2023) in ``dim`` dimensions.

        Unit covariances, means ``(s i, s j, s i, s j, ...)`` for ``i, j`` in ``-2..2`` (spacing
        ``s``, truncated to ``dim`` coordinates) and seeded random weights ``U(0.5, 1.5)``
        (normalised). The tests and ``bench/`` scripts all use this one definition.

        :param int dim: number of coordinates (at least 1).
        :param int seed: seed of the weights.
        """
        if int(dim) < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        gen = torch.Generator().manual_seed(int(seed))
        ticks = spacing * torch.arange(-2, 3, dtype=dtype)
        base = torch.cartesian_prod(ticks, ticks)  # (25, 2)
        means = base.repeat(1, (int(dim) + 1) // 2)[:, :int(dim)]
        weights = torch.rand(25, generator=gen, dtype=torch.float64).to(dtype) + 0.5
        return cls(weights, means, torch.ones(25, dtype=dtype))

    @property
    def weights(self):
        return self.log_weights.exp()

    @property
    def data_mean(self):
        return (self.weights @ self.means).reshape(self.event_shape)

    @property
    def data_std(self):
        w = self.weights
        within = w @ self.evals.mean(-1)
        between = w @ (self.means - w @ self.means).square().mean(-1)
        return (within + between).sqrt()

    def get_config(self):
        return {"weights": self.weights, "means": self.means, "covs": self.covs,
                "event_shape": list(self.event_shape)}

    def _components(self, xf, s2):
        # Coordinates of x - mu_k in each component's eigenbasis: (batch, K, d).
        diff = xf.unsqueeze(-2) - self.means
        z = diff if self.diagonal else torch.einsum("...kd,kde->...ke", diff, self.evecs)
        var = self.evals + s2.unsqueeze(-1)  # (batch, K, d)
        var = var.clamp(min=torch.finfo(xf.dtype).tiny)
        log_norm = -0.5 * ((z.square() / var).sum(-1) + var.log().sum(-1)
                           + z.shape[-1] * math.log(2 * math.pi))
        return z, var, log_norm

    def forward(self, x, sigma):
        """:math:`E[x_0 \\mid x_0 + \\sigma\\varepsilon = x]` for ``x`` of shape
        ``(batch, *event_shape)`` and ``sigma`` of shape ``(batch,)`` (or broadcastable)."""
        xf = _flat(x, self.event_shape)
        s2 = _sigma_column(sigma, xf)[..., :1].square()
        z, var, log_norm = self._components(xf, s2)
        resp = torch.softmax(self.log_weights + log_norm, dim=-1)  # (batch, K)
        shrunk = z * (self.evals / var)
        if not self.diagonal:
            shrunk = torch.einsum("...ke,kde->...kd", shrunk, self.evecs)
        out = torch.einsum("...k,...kd->...d", resp, self.means + shrunk)
        return out.reshape(x.shape)

    def log_density(self, x, sigma=0.0):
        """Exact :math:`\\log p_\\sigma(x)` the data convolved with :math:`N(0, \\sigma^2 I)`."""
        xf = _flat(x, self.event_shape)
        s2 = _sigma_column(sigma, xf).square()
        _, _, log_norm = self._components(xf, s2)
        return torch.logsumexp(self.log_weights + log_norm, dim=-1)

    def sample_data(self, num_samples):
        """Exact draws from the mixture, of shape ``(num_samples, *event_shape)``."""
        k = torch.multinomial(self.weights, num_samples, replacement=True)
        eps = torch.randn(num_samples, self.means.shape[-1], dtype=self.means.dtype,
                          device=self.means.device)
        eps = eps * self.evals[k].sqrt()
        if not self.diagonal:
            eps = torch.einsum("nkd,nd->nk", self.evecs[k], eps)
        x = self.means[k] + eps
        return x.reshape((num_samples,) + self.event_shape)

    def full_covs(self):
        """Component covariances as ``(K, d, d)`` matrices."""
        return torch.diag_embed(self.covs) if self.diagonal else self.covs

    def condition(self, A, y, noise_cov):
        r"""The exact posterior given :math:`y = A x_0 + N(0, \Sigma_y)`: a Gaussian mixture with
        :math:`C_k = (\Sigma_k^{-1} + A^\top \Sigma_y^{-1} A)^{-1}`,
        :math:`m_k = \mu_k + \Sigma_k A^\top S_k^{-1}(y - A\mu_k)` and weights
        :math:`\propto w_k N(y; A\mu_k, S_k)`, :math:`S_k = \Sigma_y + A\Sigma_k A^\top`.

        :param torch.Tensor A: ``(m, d)`` observation matrix (on the flattened event).
        :param torch.Tensor y: ``(m,)`` observation.
        :param noise_cov: :math:`\Sigma_y`: ``(m, m)``, ``(m,)`` diagonal, or a scalar variance.
        :returns: ``(GaussianMixtureDenoiser, log_evidence)``.
        """
        A = torch.as_tensor(A, dtype=self.means.dtype, device=self.means.device)
        y = torch.as_tensor(y, dtype=self.means.dtype, device=self.means.device).reshape(-1)
        m, d = A.shape
        if d != self.means.shape[-1] or y.shape != (m,):
            raise ValueError(f"need A of shape (m, {self.means.shape[-1]}) and y of shape (m,), "
                             f"got {tuple(A.shape)} and {tuple(y.shape)}")
        noise = torch.as_tensor(noise_cov, dtype=A.dtype, device=A.device)
        if noise.dim() <= 1:
            noise = torch.diag_embed(noise.expand(m))
        covs = self.full_covs()
        S = noise + A @ covs @ A.T  # (K, m, m)
        gain = covs @ A.T @ torch.linalg.inv(S)  # (K, d, m)
        resid = y - self.means @ A.T  # (K, m)
        means = self.means + (gain @ resid.unsqueeze(-1)).squeeze(-1)
        post_covs = covs - gain @ A @ covs
        post_covs = 0.5 * (post_covs + post_covs.transpose(-1, -2))
        log_like = torch.distributions.MultivariateNormal(self.means @ A.T, S).log_prob(y)
        log_w = self.log_weights + log_like
        log_ev = torch.logsumexp(log_w, 0)
        post = GaussianMixtureDenoiser((log_w - log_ev).exp(), means, post_covs,
                                       event_shape=self.event_shape)
        return post, log_ev

    def component_of(self, x):
        """Index of the most probable component of each sample (for mode-weight checks)."""
        xf = _flat(x, self.event_shape)
        _, _, log_norm = self._components(xf, xf.new_zeros(xf.shape[:-1] + (1,)))
        return (self.log_weights + log_norm).argmax(-1)
