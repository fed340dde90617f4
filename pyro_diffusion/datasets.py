r"""Training data for diffusion priors.

For now: draws of Gaussian-process fields on a fixed set of points, optionally with a
hyperprior on the kernel's lengthscale and variance, so that a diffusion model trained on the
draws is a prior over fields whose smoothness and scale are themselves uncertain:

.. math::

    \ell \sim p(\ell), \quad s^2 \sim p(s^2), \quad
    f \mid \ell, s^2 \sim N\big(m,\ s^2\,(C_\ell + \epsilon I)\big),

where :math:`C_\ell` is the unit-variance kernel matrix of the points and :math:`\epsilon` the
jitter. With fixed hyperparameters this is an ordinary GP draw.

Reference: Rasmussen, Williams (2006), *Gaussian Processes for Machine Learning*, chapter 4
(the squared exponential and Matérn kernels).
"""

import math
import numbers

import torch
from torch.distributions import Distribution

__all__ = ["KERNELS", "gp_covariance", "matern32_kernel", "matern52_kernel", "rbf_kernel",
           "sample_gp"]

# Largest number of float64 matrix entries in one batch of sample_gp (16 MiB per buffer).
_CHUNK_ENTRIES = 2 ** 21


# Kernels of the squared scaled distance r2 = d^2 / l^2, computed in place (r2 is overwritten).
def _rbf(r2):
    return r2.mul_(-0.5).exp_()


def _matern32(r2):
    r = r2.mul_(3.0).sqrt_()
    return torch.exp(-r).mul_(r.add_(1.0))


def _matern52(r2):
    r = r2.mul_(5.0).sqrt_()
    return torch.exp(-r).mul_(r.square().div_(3.0).add_(r).add_(1.0))


#: Unit-variance kernels as functions of the squared scaled distance :math:`r^2 = d^2/\ell^2`.
KERNELS = {"rbf": _rbf, "matern32": _matern32, "matern52": _matern52}


def _kernel_fn(kernel):
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    return KERNELS[kernel]


def _as_points(points):
    """``points`` as a float64 CPU tensor of shape ``(n, dim)``, or a ``ValueError``."""
    try:
        x = torch.as_tensor(points)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"points must be a tensor or array of coordinates, got "
                         f"{type(points).__name__}") from e
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"points must have shape (n,) or (n, dim) with n >= 1, "
                         f"got shape {tuple(torch.as_tensor(points).shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("points contain NaN or infinite coordinates")
    return x


def _squared_distances(x):
    return (x.unsqueeze(1) - x.unsqueeze(0)).square().sum(-1)


def _positive(value, name):
    """A positive float, or a 1-D float64 tensor of positive values."""
    if isinstance(value, Distribution):
        raise TypeError(f"{name} must be a number or tensor here, not a distribution")
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        t = value.detach().to(device="cpu", dtype=torch.float64)
        if t.dim() != 1:
            raise ValueError(f"{name} must be a number or a 1-D tensor, got shape "
                             f"{tuple(t.shape)}")
        if not (torch.isfinite(t).all() and (t > 0).all()):
            raise ValueError(f"{name} must be positive and finite, got values in "
                             f"[{t.min().item()}, {t.max().item()}]")
        return t
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from e
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be positive and finite, got {v}")
    return v


def _correlation(d2, lengthscale, kernel_fn):
    """Unit-variance kernel matrices: ``(n, n)`` for a float lengthscale, else ``(b, n, n)``."""
    if isinstance(lengthscale, torch.Tensor):
        return kernel_fn(d2 / lengthscale.square().reshape(-1, 1, 1))
    return kernel_fn(d2 / lengthscale ** 2)


def gp_covariance(points, lengthscale=0.2, variance=1.0, kernel="rbf"):
    r"""The kernel matrix :math:`K_{ij} = s^2\,k(\lVert x_i - x_j\rVert / \ell)` of ``points``.

    :param points: coordinates of shape ``(n,)`` or ``(n, dim)``.
    :param lengthscale: :math:`\ell > 0`: a number, or a 1-D tensor of ``b`` values for a batch
        of matrices.
    :param variance: :math:`s^2 > 0`: a number, or a 1-D tensor of ``b`` values.
    :param str kernel: ``"rbf"`` (squared exponential), ``"matern32"`` or ``"matern52"``.
    :returns: a float64 tensor of shape ``(n, n)``, or ``(b, n, n)`` when a hyperparameter is a
        tensor of ``b`` values.
    :raises ValueError: for a non-positive hyperparameter, points of the wrong shape or an
        unknown kernel.
    """
    kernel_fn = _kernel_fn(kernel)
    x = _as_points(points)
    ls = _positive(lengthscale, "lengthscale")
    var = _positive(variance, "variance")
    both = isinstance(ls, torch.Tensor) and isinstance(var, torch.Tensor)
    if both and ls.numel() != var.numel():
        raise ValueError(f"lengthscale and variance hold {ls.numel()} and {var.numel()} values; "
                         "they must match")
    corr = _correlation(_squared_distances(x), ls, kernel_fn)
    if isinstance(var, torch.Tensor):
        return var.reshape(-1, 1, 1) * corr
    return var * corr


def rbf_kernel(points, lengthscale=0.2, variance=1.0):
    r"""Squared-exponential kernel matrix :math:`s^2 \exp(-d^2 / 2\ell^2)`.

    :param points: coordinates of shape ``(n,)`` or ``(n, dim)``.
    :param lengthscale: :math:`\ell > 0` (a number or a 1-D tensor).
    :param variance: :math:`s^2 > 0` (a number or a 1-D tensor).
    :returns: a float64 tensor ``(n, n)`` (or ``(b, n, n)``); see :func:`gp_covariance`.
    """
    return gp_covariance(points, lengthscale, variance, kernel="rbf")


def matern32_kernel(points, lengthscale=0.2, variance=1.0):
    r"""Matérn-3/2 kernel matrix :math:`s^2 (1 + \sqrt3 d/\ell) \exp(-\sqrt3 d/\ell)`.

    :param points: coordinates of shape ``(n,)`` or ``(n, dim)``.
    :param lengthscale: :math:`\ell > 0` (a number or a 1-D tensor).
    :param variance: :math:`s^2 > 0` (a number or a 1-D tensor).
    :returns: a float64 tensor ``(n, n)`` (or ``(b, n, n)``); see :func:`gp_covariance`.
    """
    return gp_covariance(points, lengthscale, variance, kernel="matern32")


def matern52_kernel(points, lengthscale=0.2, variance=1.0):
    r"""Matérn-5/2 kernel matrix :math:`s^2 (1 + \sqrt5 r + 5r^2/3) \exp(-\sqrt5 r)`, ``r = d/ℓ``.

    :param points: coordinates of shape ``(n,)`` or ``(n, dim)``.
    :param lengthscale: :math:`\ell > 0` (a number or a 1-D tensor).
    :param variance: :math:`s^2 > 0` (a number or a 1-D tensor).
    :returns: a float64 tensor ``(n, n)`` (or ``(b, n, n)``); see :func:`gp_covariance`.
    """
    return gp_covariance(points, lengthscale, variance, kernel="matern52")


def _draw_hyperparameter(value, name, num_samples, generator):
    """A float, or a float64 tensor ``(num_samples,)`` of positive hyperprior draws."""
    if not isinstance(value, Distribution):
        v = _positive(value, name)
        if isinstance(v, torch.Tensor):
            raise ValueError(f"{name} must be a number or a Distribution in sample_gp, got a "
                             f"tensor of shape {tuple(value.shape)}")
        return v
    if value.batch_shape != torch.Size() or value.event_shape != torch.Size():
        raise ValueError(f"the hyperprior for {name} must be a scalar distribution, got "
                         f"batch_shape {tuple(value.batch_shape)} and event_shape "
                         f"{tuple(value.event_shape)}")
    if generator is None:
        draws = value.sample((num_samples,))
    else:
        # Distributions sample from the global RNG: seed it from the private generator inside
        # fork_rng, which restores the global state afterwards.
        sub_seed = int(torch.randint(2 ** 62, (1,), generator=generator).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sub_seed)
            draws = value.sample((num_samples,))
    draws = draws.detach().to(device="cpu", dtype=torch.float64).reshape(num_samples)
    if not (torch.isfinite(draws).all() and (draws > 0).all()):
        bad = int((~(torch.isfinite(draws) & (draws > 0))).sum())
        raise ValueError(f"the hyperprior for {name} gave {bad} non-positive or non-finite draws "
                         f"of {num_samples}; use a distribution on (0, inf) such as LogNormal "
                         "or Gamma")
    return draws


def _cholesky(corr, jitter, kernel):
    """Cholesky factors of ``corr + jitter * I`` (batched; ``corr`` is overwritten)."""
    corr.diagonal(dim1=-2, dim2=-1).add_(jitter)
    factor, info = torch.linalg.cholesky_ex(corr)
    if (info != 0).any():
        raise ValueError(f"the {kernel} kernel matrix of the points is not positive definite "
                         f"with jitter={jitter}; increase jitter (e.g. 1e-6) or remove "
                         "duplicate points")
    return factor


def sample_gp(num_samples, points, *, kernel="rbf", lengthscale=0.2, variance=1.0, mean=0.0,
              jitter=1e-6, seed=None, return_hyperparameters=False):
    r"""Draw Gaussian-process fields on ``points``, optionally under hyperpriors.

    Each draw is :math:`f = m + s\,L_\ell\,\varepsilon` with :math:`L_\ell` the Cholesky factor
    of the unit-variance kernel matrix plus ``jitter`` on its diagonal (so the jitter is relative
    to the variance) and :math:`\varepsilon \sim N(0, I)`. When ``lengthscale`` is a
    distribution, every draw gets its own lengthscale and the factors are computed in batches
    over the distinct values; a ``variance`` distribution only rescales draws. Computation is
    in float64 on the CPU.

    :param int num_samples: number of draws (may be 0).
    :param points: coordinates of shape ``(n,)`` or ``(n, dim)``.
    :param str kernel: ``"rbf"`` (squared exponential), ``"matern32"`` or ``"matern52"``.
    :param lengthscale: a positive number, or a ``torch.distributions.Distribution`` over
        positive scalars (a hyperprior, e.g. ``LogNormal(math.log(0.2), 0.3)``).
    :param variance: the marginal variance: a positive number or a hyperprior distribution.
    :param mean: the mean: a number or a tensor of shape ``(n,)``.
    :param float jitter: added to the diagonal of the unit-variance kernel matrix for numerical
        stability (non-negative).
    :param int seed: seed of a private ``torch.Generator`` (hyperprior draws included); the
        global RNG is left as it was. ``None`` draws from the global RNG.
    :param bool return_hyperparameters: also return the hyperparameters of every draw.
    :returns: a float32 tensor of shape ``(num_samples, n)``; with ``return_hyperparameters``,
        a pair ``(samples, {"lengthscale": ..., "variance": ...})`` of float64 tensors of shape
        ``(num_samples,)``.
    :raises ValueError: for a non-positive hyperparameter or hyperprior draw, points of the
        wrong shape, an unknown kernel, a bad ``mean``, ``jitter`` or ``num_samples``, or a
        kernel matrix that is not positive definite.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or \
            num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}")
    num_samples = int(num_samples)
    kernel_fn = _kernel_fn(kernel)
    x = _as_points(points)
    n = x.shape[0]
    jitter = float(jitter)
    if not (math.isfinite(jitter) and jitter >= 0):
        raise ValueError(f"jitter must be non-negative and finite, got {jitter}")
    try:
        mean_t = torch.as_tensor(mean).detach().to(device="cpu", dtype=torch.float64)
        mean_t = mean_t.expand(n) if mean_t.dim() <= 1 else None
    except (TypeError, ValueError, RuntimeError):
        mean_t = None
    if mean_t is None:
        shape = tuple(torch.as_tensor(mean).shape) if isinstance(mean, torch.Tensor) else mean
        raise ValueError(f"mean must be a number or a tensor of shape ({n},), got {shape!r}")
    if not torch.isfinite(mean_t).all():
        raise ValueError("mean contains NaN or infinite values")

    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    ls = _draw_hyperparameter(lengthscale, "lengthscale", num_samples, generator)
    var = _draw_hyperparameter(variance, "variance", num_samples, generator)
    eps = torch.randn(num_samples, n, dtype=torch.float64, generator=generator)

    d2 = _squared_distances(x)
    if not isinstance(ls, torch.Tensor):
        factor = _cholesky(_correlation(d2, ls, kernel_fn), jitter, kernel)
        field = eps @ factor.T
    else:
        # Sort the draws by lengthscale so that each chunk needs the factors of a contiguous
        # run of distinct values; memory stays at about two (chunk, n, n) buffers.
        uniq, inverse = torch.unique(ls, return_inverse=True)
        order = inverse.argsort()
        chunk = max(1, _CHUNK_ENTRIES // (n * n))
        field = torch.empty_like(eps)
        for start in range(0, num_samples, chunk):
            idx = order[start:start + chunk]
            which = inverse[idx]
            lo, hi = int(which.min()), int(which.max()) + 1
            factors = _cholesky(_correlation(d2, uniq[lo:hi], kernel_fn), jitter, kernel)
            if hi - lo < idx.numel():  # repeated lengthscales: one factor per draw
                factors = factors[which - lo]
            field[idx] = torch.bmm(factors, eps[idx].unsqueeze(-1)).squeeze(-1)
    scale = var.sqrt().unsqueeze(-1) if isinstance(var, torch.Tensor) else math.sqrt(var)
    samples = (mean_t + scale * field).to(torch.float32)
    if not return_hyperparameters:
        return samples
    params = {
        "lengthscale": ls if isinstance(ls, torch.Tensor)
        else torch.full((num_samples,), ls, dtype=torch.float64),
        "variance": var if isinstance(var, torch.Tensor)
        else torch.full((num_samples,), var, dtype=torch.float64),
    }
    return samples, params
