r"""Training data for diffusion priors, and small epidemiological data sets to test them on.

**Gaussian-process fields** (:func:`sample_gp`): draws on a fixed set of points, optionally with
a hyperprior on the kernel's lengthscale and variance, so that a diffusion model trained on the
draws is a prior over fields whose smoothness and scale are themselves uncertain:

.. math::

    \ell \sim p(\ell), \quad s^2 \sim p(s^2), \quad
    f \mid \ell, s^2 \sim N\big(m,\ s^2\,(C_\ell + \epsilon I)\big),

where :math:`C_\ell` is the unit-variance kernel matrix of the points and :math:`\epsilon` the
jitter. With fixed hyperparameters this is an ordinary GP draw.

**CAR fields on a graph** (:func:`sample_car`, :func:`car_covariance`), for areal data: with
adjacency weights :math:`W` (symmetric, zero diagonal) and :math:`D = \mathrm{diag}(W 1)`,

- the proper CAR field has precision :math:`\tau (D - \rho W)`, :math:`-1 < \rho < 1`;
- the intrinsic CAR (ICAR) field has the singular precision :math:`\tau (D - W)` and is drawn
  under a sum-to-zero constraint on every connected component of the graph;
- the BYM2 field (Riebler et al. 2016) is
  :math:`\tau^{-1/2} (\sqrt{\phi}\, u_\star + \sqrt{1 - \phi}\, v)` with :math:`u_\star` the ICAR
  field scaled so that the geometric mean of its marginal variances is 1 on every component, and
  :math:`v \sim N(0, I)`.

Each of :math:`\rho`, :math:`\tau`, :math:`\phi` may be given a hyperprior, as for
:func:`sample_gp`.

**Prevalence surveys** (:func:`simulate_prevalence_survey`): malaria-style cluster surveys, with
:math:`y_i \sim \mathrm{Binomial}(n_i, \mathrm{logit}^{-1} f(x_i))` and :math:`f` a GP field.

**Data sets** read offline from the example files bundled with ``libpysal`` (never downloaded):
:func:`load_nc_sids` (sudden infant deaths in the 100 North Carolina counties, 1974-78 and
1979-84) and :func:`load_tokyo_mortality` (working-age deaths in 262 Tokyo-area municipalities,
1990), each with observed and expected counts and a neighbourhood graph for CAR models.

References: Rasmussen, Williams (2006), *Gaussian Processes for Machine Learning*, chapter 4
(the squared exponential and Matérn kernels); Besag, York, Mollié (1991), Bayesian image
restoration, with two applications in spatial statistics, *Ann. Inst. Statist. Math.* 43;
Riebler et al. (2016), An intuitive Bayesian spatial model for disease mapping that accounts for
scaling, *Stat. Methods Med. Res.* 25; Cressie (1993), *Statistics for Spatial Data*, pp. 386-389
(the SIDS data); Nakaya et al. (2005), Geographically weighted Poisson regression for disease
association mapping, *Stat. Med.* 24 (the Tokyo data).
"""

import importlib.metadata
import importlib.util
import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributions import Distribution

from .seeding import seeded

__all__ = ["CAR_MODELS", "KERNELS", "PrevalenceSurvey", "SIDSData", "TokyoMortalityData",
           "car_covariance", "gp_covariance", "knn_adjacency", "load_nc_sids",
           "load_tokyo_mortality", "matern32_kernel", "matern52_kernel", "rbf_kernel",
           "sample_car", "sample_gp", "simulate_prevalence_survey"]

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


def _parameter_device(distribution):
    """The device of a distribution's first tensor parameter (``None``: it has none)."""
    for name in getattr(distribution, "arg_constraints", {}):
        try:
            value = getattr(distribution, name)
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _sample_hyperprior(value, name, num_samples, generator):
    """``num_samples`` draws of the scalar Distribution ``value`` as a float64 CPU tensor,
    seeded from ``generator`` when given."""
    if value.batch_shape != torch.Size() or value.event_shape != torch.Size():
        raise ValueError(f"the hyperprior for {name} must be a scalar distribution, got "
                         f"batch_shape {tuple(value.batch_shape)} and event_shape "
                         f"{tuple(value.event_shape)}")
    if generator is None:
        draws = value.sample((num_samples,))
    else:
        # Distributions sample from the global generator of their parameters' device: seed it
        # (and the CPU's) from the private generator inside seeded, which restores both after.
        sub_seed = int(torch.randint(2 ** 62, (1,), generator=generator).item())
        with seeded(sub_seed, _parameter_device(value)):
            draws = value.sample((num_samples,))
    return draws.detach().to(device="cpu", dtype=torch.float64).reshape(num_samples)


def _draw_hyperparameter(value, name, num_samples, generator):
    """A float, or a float64 tensor ``(num_samples,)`` of positive hyperprior draws."""
    if not isinstance(value, Distribution):
        v = _positive(value, name)
        if isinstance(v, torch.Tensor):
            raise ValueError(f"{name} must be a number or a Distribution in sample_gp, got a "
                             f"tensor of shape {tuple(value.shape)}")
        return v
    draws = _sample_hyperprior(value, name, num_samples, generator)
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


# ---------------------------------------------------------------------------------------------
# Shared argument checks of the generators below.

def _num_samples(num_samples, name="num_samples"):
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or \
            num_samples < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {num_samples!r}")
    return int(num_samples)


def _as_mean(mean, n):
    """``mean`` as a float64 tensor of shape ``(n,)``, or a ``ValueError``."""
    try:
        mean_t = torch.as_tensor(mean).detach().to(device="cpu", dtype=torch.float64)
        mean_t = mean_t.expand(n) if mean_t.dim() <= 1 else None
    except (TypeError, ValueError, RuntimeError):
        mean_t = None
    if mean_t is None:
        shape = tuple(mean.shape) if isinstance(mean, torch.Tensor) else mean
        raise ValueError(f"mean must be a number or a tensor of shape ({n},), got {shape!r}")
    if not torch.isfinite(mean_t).all():
        raise ValueError("mean contains NaN or infinite values")
    return mean_t


def _interval_text(low, high, closed):
    return f"{'[' if closed else '('}{low:g}, {high:g}{']' if closed else ')'}"


def _in_interval(t, low, high, closed):
    """Whether ``t`` (a float, or elementwise for a tensor) lies in the interval."""
    if closed:
        return (t >= low) & (t <= high)
    return (t > low) & (t < high)


def _bounded(value, name, low, high, closed):
    """A float, or a 1-D float64 tensor, with values in the interval from ``low`` to ``high``."""
    where = _interval_text(low, high, closed)
    if isinstance(value, Distribution):
        raise TypeError(f"{name} must be a number or tensor here, not a distribution")
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        t = value.detach().to(device="cpu", dtype=torch.float64)
        if t.dim() != 1:
            raise ValueError(f"{name} must be a number or a 1-D tensor, got shape "
                             f"{tuple(t.shape)}")
        if not (torch.isfinite(t).all() and _in_interval(t, low, high, closed).all()):
            raise ValueError(f"{name} must lie in {where}, got values in "
                             f"[{t.min().item()}, {t.max().item()}]")
        return t
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from e
    if not (math.isfinite(v) and _in_interval(v, low, high, closed)):
        raise ValueError(f"{name} must lie in {where}, got {v}")
    return v


def _draw_bounded(value, name, num_samples, generator, low, high, closed, example):
    """Like ``_draw_hyperparameter``, for a parameter in an interval instead of ``(0, inf)``."""
    if not isinstance(value, Distribution):
        v = _bounded(value, name, low, high, closed)
        if isinstance(v, torch.Tensor):
            raise ValueError(f"{name} must be a number or a Distribution in sample_car, got a "
                             f"tensor of shape {tuple(value.shape)}")
        return v
    draws = _sample_hyperprior(value, name, num_samples, generator)
    ok = torch.isfinite(draws) & _in_interval(draws, low, high, closed)
    if not ok.all():
        raise ValueError(f"the hyperprior for {name} gave {int((~ok).sum())} draws outside "
                         f"{_interval_text(low, high, closed)} of {num_samples}; use a "
                         f"distribution on that interval such as {example}")
    return draws


# ---------------------------------------------------------------------------------------------
# CAR fields on a graph.

#: The CAR fields of :func:`sample_car` and :func:`car_covariance`.
CAR_MODELS = ("proper", "icar", "bym2")


def _as_adjacency(adjacency):
    """Symmetric non-negative weights, zero diagonal, no isolated node: float64 ``(n, n)``."""
    try:
        a = torch.as_tensor(adjacency)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"adjacency must be a square matrix (tensor or array), got "
                         f"{type(adjacency).__name__}") from e
    a = a.detach().to(device="cpu", dtype=torch.float64)
    if a.dim() != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"adjacency must be a square matrix of shape (n, n) with n >= 1, "
                         f"got shape {tuple(a.shape)}")
    if not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError("adjacency must hold non-negative finite weights")
    loops = a.diagonal().nonzero().flatten().tolist()
    if loops:
        raise ValueError(f"adjacency must have a zero diagonal; node(s) {loops[:10]} are their "
                         "own neighbours")
    asym = (a - a.T).abs().max().item()
    if asym > 1e-12 * a.abs().max().item():
        raise ValueError(f"adjacency must be symmetric; the largest |A - A^T| is {asym:g}")
    a = 0.5 * (a + a.T)
    isolated = (a.sum(1) == 0).nonzero().flatten().tolist()
    if isolated:
        raise ValueError(f"every node needs at least one neighbour, but node(s) {isolated[:10]}"
                         f"{' ...' if len(isolated) > 10 else ''} have none (a CAR precision "
                         "is singular there); drop them or model them separately")
    return a


def _components(a):
    """Connected-component labels (a long tensor ``(n,)``) and their number."""
    neighbours = [row.nonzero().flatten().tolist() for row in a > 0]
    labels = [-1] * len(neighbours)
    count = 0
    for start in range(len(neighbours)):
        if labels[start] >= 0:
            continue
        labels[start] = count
        stack = [start]
        while stack:
            for j in neighbours[stack.pop()]:
                if labels[j] < 0:
                    labels[j] = count
                    stack.append(j)
        count += 1
    return torch.tensor(labels), count


def _component_means(x, labels, count):
    """Means over the rows of each connected component, broadcast back to the rows of ``x``."""
    sums = torch.zeros(count, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    sizes = torch.bincount(labels, minlength=count).to(x.dtype)
    return (sums / sizes.unsqueeze(-1))[labels]


def _car_basis(a, model):
    r"""A matrix ``B`` (and eigenvalues ``lam``) that factor the CAR covariance.

    - ``proper``: :math:`(D - \rho W)^{-1} = B\,\mathrm{diag}(1 / (1 - \rho\lambda))\,B^T` with
      :math:`D^{-1/2} W D^{-1/2} = V \mathrm{diag}(\lambda) V^T` and :math:`B = D^{-1/2} V`;
      :math:`\lambda \in [-1, 1]`, so :math:`|\rho| < 1` is enough for a proper field.
    - ``icar``: :math:`B B^T` is the Moore-Penrose inverse of :math:`D - W` (the covariance under
      sum-to-zero constraints on the components, which span its null space);
      ``B`` has the ``n - c`` columns :math:`v_k / \sqrt{\lambda_k}` of the non-zero eigenpairs.
    - ``bym2``: the ``icar`` basis with each component's rows scaled so that the geometric mean
      of the diagonal of :math:`B B^T` over the component is 1.
    """
    degree = a.sum(1)
    if model == "proper":
        d_isqrt = degree.rsqrt()
        lam, vec = torch.linalg.eigh(d_isqrt.unsqueeze(-1) * a * d_isqrt)
        return d_isqrt.unsqueeze(-1) * vec, lam.clamp(-1.0, 1.0)
    labels, count = _components(a)
    lam, vec = torch.linalg.eigh(torch.diag(degree) - a)
    # The Laplacian's null space is spanned by the indicators of the components: exactly
    # `count` zero eigenvalues, then the smallest positive one (>= 4 / (n * diameter) for 0/1
    # weights) far above rounding error.
    lam_max = lam[-1].item()
    if count < lam.numel() and lam[count].item() <= 1e-10 * lam_max:
        raise ValueError("the graph Laplacian is too ill-conditioned to separate its null space "
                         f"(eigenvalue {lam[count].item():.3g} vs largest {lam_max:.3g}); "
                         "check for near-zero weights")
    basis = vec[:, count:] * lam[count:].rsqrt()
    basis = basis - _component_means(basis, labels, count)  # exact sum-to-zero columns
    if model == "bym2":
        log_var = basis.square().sum(1).log()
        log_gm = torch.zeros(count, dtype=basis.dtype).index_add_(0, labels, log_var)
        log_gm = log_gm / torch.bincount(labels, minlength=count).to(basis.dtype)
        basis = basis * torch.exp(-0.5 * log_gm)[labels].unsqueeze(-1)
    return basis, None


def _car_model(model, rho, phi):
    """``(rho, phi)`` with their defaults, or an error for one the model does not have."""
    if model not in CAR_MODELS:
        raise ValueError(f"unknown CAR model {model!r}; choose one of {', '.join(CAR_MODELS)}")
    if model == "proper":
        rho = 0.9 if rho is None else rho
    elif rho is not None:
        raise ValueError(f"rho is the dependence parameter of the proper CAR; model={model!r} "
                         "has none (the ICAR is the limit rho = 1; BYM2 mixes with phi)")
    if model == "bym2":
        phi = 0.5 if phi is None else phi
    elif phi is not None:
        raise ValueError(f"phi is the mixing parameter of the BYM2 field; model={model!r} has "
                         "none")
    return rho, phi


def car_covariance(adjacency, *, model="proper", rho=None, tau=1.0, phi=None):
    r"""The covariance of a CAR field on a graph (see the module docstring for the models).

    - ``"proper"``: :math:`\big(\tau (D - \rho W)\big)^{-1}`;
    - ``"icar"``: the Moore-Penrose inverse of :math:`\tau (D - W)`, which is the covariance of
      the intrinsic CAR under a sum-to-zero constraint on every connected component;
    - ``"bym2"``: :math:`\tau^{-1} \big(\phi\, \Sigma_\star + (1 - \phi) I\big)` with
      :math:`\Sigma_\star` the ICAR covariance scaled so that the geometric mean of its diagonal
      is 1 on every component.

    The result is the exact covariance of :func:`sample_car`'s draws, e.g. for
    :class:`~pyro_diffusion.GaussianDenoiser`.

    :param adjacency: weights :math:`W` of shape ``(n, n)``: symmetric, non-negative, zero
        diagonal, every node with at least one neighbour (e.g. a 0/1 contiguity matrix).
    :param str model: ``"proper"``, ``"icar"`` or ``"bym2"``.
    :param rho: for ``"proper"`` only (default 0.9): :math:`-1 < \rho < 1`, a number or a 1-D
        tensor of ``b`` values for a batch of matrices.
    :param tau: the precision scale :math:`\tau > 0`: a number or a 1-D tensor of ``b`` values.
    :param phi: for ``"bym2"`` only (default 0.5): the structured share
        :math:`0 \le \phi \le 1`, a number or a 1-D tensor of ``b`` values.
    :returns: a float64 tensor of shape ``(n, n)``, or ``(b, n, n)`` when a parameter is a
        tensor of ``b`` values.
    :raises ValueError: for an unknown model, a parameter out of range or one the model does
        not have, tensors of different lengths, or a bad adjacency matrix.
    """
    rho, phi = _car_model(model, rho, phi)
    a = _as_adjacency(adjacency)
    tau = _positive(tau, "tau")
    params = {"tau": tau}
    if rho is not None:
        params["rho"] = _bounded(rho, "rho", -1.0, 1.0, closed=False)
    if phi is not None:
        params["phi"] = _bounded(phi, "phi", 0.0, 1.0, closed=True)
    sizes = {k: v.numel() for k, v in params.items() if isinstance(v, torch.Tensor)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the tensor parameters hold different numbers of values {sizes}; "
                         "they must match")

    def column(v):  # (b, 1, 1) for a batch, else a float
        return v.reshape(-1, 1, 1) if isinstance(v, torch.Tensor) else v

    basis, lam = _car_basis(a, model)
    if model == "proper":
        rho_t = torch.as_tensor(params["rho"], dtype=torch.float64).reshape(-1, 1)
        scale = 1.0 / (1.0 - rho_t * lam)  # (b or 1, n)
        cov = (basis * scale.unsqueeze(-2)) @ basis.T
        cov = cov if isinstance(params["rho"], torch.Tensor) else cov[0]
    else:
        cov = basis @ basis.T
        if model == "bym2":
            eye = torch.eye(a.shape[0], dtype=torch.float64)
            cov = column(params["phi"]) * cov + (1.0 - column(params["phi"])) * eye
    return cov / column(tau)  # (b, n, n) as soon as one parameter is a tensor


def sample_car(num_samples, adjacency, *, model="proper", rho=None, tau=1.0, phi=None,
               mean=0.0, seed=None, return_hyperparameters=False):
    r"""Draw conditional autoregressive (CAR) fields on a graph, optionally under hyperpriors.

    The draws are exact, from one eigendecomposition of the graph (see :func:`car_covariance`
    for the covariances):

    - ``"proper"``: :math:`f \sim N\big(m, (\tau (D - \rho W))^{-1}\big)`;
    - ``"icar"``: the intrinsic CAR, precision :math:`\tau (D - W)`, drawn under a sum-to-zero
      constraint on every connected component of the graph (the precision's null space), so
      :math:`f - m` sums to zero (up to rounding) over each component;
    - ``"bym2"``: :math:`f = m + \tau^{-1/2} (\sqrt{\phi}\, u_\star + \sqrt{1-\phi}\, v)`, the
      BYM model in the parametrisation of Riebler et al. (2016): :math:`u_\star` is the ICAR
      field scaled so that the geometric mean of its marginal variances is 1 on every component,
      :math:`v \sim N(0, I)`, so :math:`\tau` is the precision of the total field and
      :math:`\phi` the share of its variance that is spatially structured.

    As in :func:`sample_gp`, each of ``rho``, ``tau`` and ``phi`` may be a
    ``torch.distributions.Distribution`` (a hyperprior): every draw then gets its own value.

    :param int num_samples: number of draws (may be 0).
    :param adjacency: weights :math:`W` of shape ``(n, n)``: symmetric, non-negative, zero
        diagonal, every node with at least one neighbour (e.g. ``load_nc_sids().adjacency``).
    :param str model: ``"proper"``, ``"icar"`` or ``"bym2"``.
    :param rho: for ``"proper"`` only (default 0.9): :math:`-1 < \rho < 1`, a number or a
        hyperprior on that interval (e.g. ``Uniform(0.0, 0.99)`` or ``Beta(4.0, 1.0)``).
    :param tau: the precision scale :math:`\tau > 0`: a number or a hyperprior (e.g.
        ``Gamma(1.0, 0.1)``).
    :param phi: for ``"bym2"`` only (default 0.5): :math:`0 \le \phi \le 1`, a number or a
        hyperprior (e.g. ``Beta(1.0, 1.0)``).
    :param mean: the mean :math:`m`: a number or a tensor of shape ``(n,)``.
    :param int seed: seed of a private ``torch.Generator`` (hyperprior draws included); the
        global RNG is left as it was. ``None`` draws from the global RNG.
    :param bool return_hyperparameters: also return the hyperparameters of every draw.
    :returns: a float32 tensor of shape ``(num_samples, n)`` (as :func:`sample_gp`); with
        ``return_hyperparameters``, a pair ``(samples, params)`` with ``params`` a dict of
        float64 tensors of shape ``(num_samples,)``: ``"tau"``, and ``"rho"`` or ``"phi"``
        where the model has it.
    :raises ValueError: for an unknown model, a parameter or hyperprior draw out of range or one
        the model does not have, a bad adjacency matrix, ``mean`` or ``num_samples``.
    """
    num_samples = _num_samples(num_samples)
    rho, phi = _car_model(model, rho, phi)
    a = _as_adjacency(adjacency)
    n = a.shape[0]
    mean_t = _as_mean(mean, n)

    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    params = {}
    if rho is not None:
        params["rho"] = _draw_bounded(rho, "rho", num_samples, generator, -1.0, 1.0,
                                      closed=False, example="Uniform(0, 0.99) or Beta")
    params["tau"] = _draw_hyperparameter(tau, "tau", num_samples, generator)
    if phi is not None:
        params["phi"] = _draw_bounded(phi, "phi", num_samples, generator, 0.0, 1.0,
                                      closed=True, example="Beta or Uniform(0, 1)")

    def column(v):  # (num_samples, 1) for per-draw values, else a float
        return v.unsqueeze(-1) if isinstance(v, torch.Tensor) else v

    basis, lam = _car_basis(a, model)
    eps = torch.randn(num_samples, basis.shape[1], dtype=torch.float64, generator=generator)
    if model == "proper":
        field = (eps * (1.0 - column(params["rho"]) * lam).rsqrt()) @ basis.T
    else:
        field = eps @ basis.T
        if model == "bym2":
            noise = torch.randn(num_samples, n, dtype=torch.float64, generator=generator)
            phi_c = column(params["phi"])
            field = (phi_c ** 0.5) * field + ((1.0 - phi_c) ** 0.5) * noise
    tau_c = column(params["tau"])
    samples = (mean_t + field / (tau_c ** 0.5)).to(torch.float32)
    if not return_hyperparameters:
        return samples
    return samples, {k: v if isinstance(v, torch.Tensor)
                     else torch.full((num_samples,), v, dtype=torch.float64)
                     for k, v in params.items()}


def knn_adjacency(points, k=6):
    """The symmetrised ``k``-nearest-neighbour graph of ``points``, as a dense 0/1 matrix.

    Node ``j`` is a neighbour of ``i`` when ``j`` is among the ``k`` points closest to ``i``
    (Euclidean distance; ties broken by index) *or* ``i`` is among the ``k`` closest to ``j``,
    so every node has at least ``k`` neighbours and the matrix is symmetric.

    :param points: coordinates of shape ``(n,)`` or ``(n, dim)``.
    :param int k: number of nearest neighbours, ``1 <= k < n``.
    :returns: a float64 tensor of shape ``(n, n)`` with zero diagonal.
    :raises ValueError: for points of the wrong shape or a bad ``k``.
    """
    x = _as_points(points)
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k < n:
        raise ValueError(f"k must be an integer with 1 <= k < n = {n}, got {k!r}")
    d2 = _squared_distances(x)
    d2.diagonal().fill_(math.inf)
    nearest = d2.argsort(dim=1, stable=True)[:, :int(k)]
    adj = torch.zeros(n, n, dtype=torch.float64)
    adj.scatter_(1, nearest, 1.0)
    return torch.maximum(adj, adj.T)


def _neighbour_lists(adjacency):
    return tuple(tuple(row.nonzero().flatten().tolist()) for row in adjacency > 0)


# ---------------------------------------------------------------------------------------------
# Prevalence surveys.

@dataclass(frozen=True, eq=False)
class PrevalenceSurvey:
    r"""A simulated prevalence survey (see :func:`simulate_prevalence_survey`).

    :ivar torch.Tensor locations: site coordinates, float64 ``(num_sites, dim)``.
    :ivar torch.Tensor examined: people tested at each site, float64 ``(num_sites,)`` (whole
        numbers).
    :ivar torch.Tensor positive: positive tests, float64 ``(num_sites,)``,
        ``0 <= positive <= examined``.
    :ivar torch.Tensor field: the true field :math:`f` at the sites on the logit scale, float64
        ``(num_sites,)``; the true prevalence is :attr:`prevalence`.
    :ivar lengthscale: the GP lengthscale the field was drawn with (a float), or ``None`` for a
        field passed in.
    :ivar variance: the GP variance the field was drawn with (a float), or ``None``.
    """

    locations: torch.Tensor
    examined: torch.Tensor
    positive: torch.Tensor
    field: torch.Tensor
    lengthscale: float | None = None
    variance: float | None = None

    @property
    def num_sites(self):
        """The number of sites."""
        return self.examined.shape[0]

    @property
    def prevalence(self):
        r"""The true prevalence :math:`\mathrm{logit}^{-1} f` at the sites, float64."""
        return torch.sigmoid(self.field)

    def __repr__(self):
        rate = self.positive.sum().item() / max(self.examined.sum().item(), 1.0)
        return (f"PrevalenceSurvey(num_sites={self.num_sites}, examined="
                f"{int(self.examined.sum().item())}, positive={int(self.positive.sum().item())}"
                f", crude_prevalence={rate:.3f})")


def _examined(examined, num_sites, generator):
    if isinstance(examined, numbers.Integral) and not isinstance(examined, bool):
        if examined < 1:
            raise ValueError(f"examined must be at least 1, got {examined}")
        return torch.full((num_sites,), float(examined), dtype=torch.float64)
    if isinstance(examined, tuple | list) and len(examined) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in examined):
        low, high = (int(v) for v in examined)
        if not 1 <= low <= high:
            raise ValueError(f"examined=(low, high) needs 1 <= low <= high, got {examined!r}")
        return torch.randint(low, high + 1, (num_sites,), generator=generator,
                             dtype=torch.int64).to(torch.float64)
    if isinstance(examined, torch.Tensor):
        t = examined.detach().to(device="cpu", dtype=torch.float64)
        if t.shape != (num_sites,):
            raise ValueError(f"examined as a tensor must have shape ({num_sites},), got "
                             f"{tuple(t.shape)}")
        if not (torch.isfinite(t).all() and (t >= 1).all() and (t == t.round()).all()):
            raise ValueError("examined must hold whole numbers >= 1")
        return t
    raise ValueError(f"examined must be an integer, a pair (low, high) of integers or a tensor of "
                     f"shape ({num_sites},), got {examined!r}")


def simulate_prevalence_survey(num_sites, *, locations=None, field=None, examined=(20, 200),
                               kernel="matern32", lengthscale=0.2, variance=1.0, mean=-1.0,
                               seed=None):
    r"""Simulate a cross-sectional prevalence survey, malaria style.

    At each site :math:`x_i`, :math:`n_i` people are examined and

    .. math::

        y_i \mid f \sim \mathrm{Binomial}\big(n_i,\ \mathrm{logit}^{-1} f(x_i)\big),

    independently, where the logit-prevalence field :math:`f` is drawn with :func:`sample_gp`
    (kernel, lengthscale, variance and mean as there; hyperpriors allowed) unless ``field``
    gives it. With the defaults the median prevalence is :math:`\mathrm{logit}^{-1}(-1) \approx
    0.27`.

    :param int num_sites: number of survey sites (at least 1).
    :param locations: site coordinates of shape ``(num_sites, dim)``; by default uniform on the
        unit square.
    :param field: the true field at the sites on the logit scale, shape ``(num_sites,)``; needs
        ``locations``. ``None`` draws it from a GP, and then ``kernel``, ``lengthscale``,
        ``variance`` and ``mean`` are used (they are ignored otherwise).
    :param examined: people examined per site: an integer, a pair ``(low, high)`` for
        uniformly drawn integers ``low <= n_i <= high``, or a tensor of shape ``(num_sites,)``.
        At least 1.
    :param str kernel: the GP kernel, as in :func:`sample_gp`.
    :param lengthscale: the GP lengthscale: a positive number or a hyperprior.
    :param variance: the GP variance of the logit prevalence: a positive number or a
        hyperprior.
    :param mean: the mean of the logit prevalence: a number or a tensor ``(num_sites,)``.
    :param int seed: seed of a private ``torch.Generator``; the global RNG is left as it was.
        ``None`` draws from the global RNG.
    :returns: a :class:`PrevalenceSurvey` (counts as float64 tensors).
    :raises ValueError: for a bad ``num_sites``, ``locations``, ``field`` or ``examined``, a
        ``field`` without ``locations``, or a bad GP argument (see :func:`sample_gp`).
    """
    if isinstance(num_sites, bool) or not isinstance(num_sites, numbers.Integral) or \
            num_sites < 1:
        raise ValueError(f"num_sites must be a positive integer, got {num_sites!r}")
    num_sites = int(num_sites)
    if field is not None and locations is None:
        raise ValueError("a field needs the locations it is defined at: pass locations too")
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None

    if locations is None:
        x = torch.rand(num_sites, 2, dtype=torch.float64, generator=generator)
    else:
        x = _as_points(locations)
        if x.shape[0] != num_sites:
            raise ValueError(f"locations must have {num_sites} rows (num_sites), got "
                             f"{x.shape[0]}")
    n = _examined(examined, num_sites, generator)

    lengthscale_used = variance_used = None
    if field is None:
        gp_seed = None if generator is None else \
            int(torch.randint(2 ** 62, (1,), generator=generator).item())
        draw, params = sample_gp(1, x, kernel=kernel, lengthscale=lengthscale,
                                 variance=variance, mean=mean, seed=gp_seed,
                                 return_hyperparameters=True)
        f = draw[0].to(torch.float64)
        lengthscale_used = params["lengthscale"].item()
        variance_used = params["variance"].item()
    else:
        try:
            f = torch.as_tensor(field).detach().to(device="cpu", dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"field must be a tensor of shape ({num_sites},), got "
                             f"{type(field).__name__}") from e
        if f.shape != (num_sites,):
            raise ValueError(f"field must have shape ({num_sites},), got {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise ValueError("field contains NaN or infinite values")
    positive = torch.binomial(n, torch.sigmoid(f), generator=generator)
    return PrevalenceSurvey(locations=x, examined=n, positive=positive, field=f,
                            lengthscale=lengthscale_used, variance=variance_used)


# ---------------------------------------------------------------------------------------------
# Areal data sets bundled with libpysal (read offline; nothing is downloaded).

_LIBPYSAL_HINT = "install it with: pip install libpysal"


def _libpysal_examples_dir(function):
    """libpysal's folder of bundled example data, found without importing libpysal."""
    try:
        spec = importlib.util.find_spec("libpysal")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{function} reads example data bundled with libpysal, which is not "
                          f"installed; {_LIBPYSAL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "examples"


def _example_files(function, folder, names):
    """Paths of bundled example files, or a ``FileNotFoundError`` (never a download)."""
    root = _libpysal_examples_dir(function) / folder
    paths = [root / name for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        try:
            version = importlib.metadata.version("libpysal")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        raise FileNotFoundError(f"{function}: libpysal (version {version}) does not bundle "
                                f"{', '.join(missing)} in {root}; this function reads bundled "
                                "files only and does not download them. Install libpysal>=4.9 "
                                "with its example data.")
    return paths


def _import_libpysal(function):
    try:
        import libpysal
    except ImportError as e:
        raise ImportError(f"{function} needs libpysal to read its bundled shapefiles; "
                          f"{_LIBPYSAL_HINT}") from e
    return libpysal


def _read_dbf(libpysal, path, columns):
    """Columns of a dBase table as lists, in record order."""
    table = libpysal.io.open(str(path))
    try:
        missing = [c for c in columns if c not in table.header]
        if missing:
            raise ValueError(f"{path.name} lacks the column(s) {missing}; its columns are "
                             f"{table.header}")
        return {c: list(table.by_col(c)) for c in columns}
    finally:
        table.close()


def _dense(neighbours, n):
    adj = torch.zeros(n, n, dtype=torch.float64)
    for i, js in neighbours.items():
        adj[i, list(js)] = 1.0
    return adj


@dataclass(frozen=True, eq=False)
class SIDSData:
    r"""Sudden infant death syndrome (SIDS) in the 100 counties of North Carolina.

    Returned by :func:`load_nc_sids`. Counties are in the order of libpysal's ``sids2``
    shapefile; the two rows of the count tensors are the periods 1974-78 and 1979-84.

    :ivar tuple names: county names (``names[0] == "Ashe"``).
    :ivar tuple fips: county FIPS codes (integers, e.g. 37009 for Ashe).
    :ivar tuple periods: ``("1974-78", "1979-84")``.
    :ivar torch.Tensor births: live births, float64 ``(2, 100)`` (``BIR74``, ``BIR79``).
    :ivar torch.Tensor deaths: SIDS deaths, float64 ``(2, 100)`` (``SID74``, ``SID79``).
    :ivar torch.Tensor expected: expected deaths by internal standardisation, float64
        ``(2, 100)``: :math:`E_{ti} = n_{ti} \sum_j y_{tj} / \sum_j n_{tj}`, births times the
        state-wide rate of the period, so each row sums to the observed total.
    :ivar torch.Tensor adjacency: county contiguity, a symmetric 0/1 float64 ``(100, 100)``
        matrix with zero diagonal.
    :ivar tuple neighbors: for each county, the sorted indices of its neighbours.
    :ivar torch.Tensor centroids: polygon centroids, float64 ``(100, 2)``: longitude and
        latitude in degrees (the shapefile is unprojected; centroids computed in that plane).
    :ivar str contiguity: ``"queen"`` (shared boundary point) or ``"rook"`` (shared edge).
    :ivar tuple outlines: for each county, its boundary as a tuple of float64 ``(k, 2)``
        vertex arrays (longitude, latitude), one per polygon part, for maps.
    """

    names: tuple
    fips: tuple
    periods: tuple
    births: torch.Tensor
    deaths: torch.Tensor
    expected: torch.Tensor
    adjacency: torch.Tensor
    neighbors: tuple
    centroids: torch.Tensor
    contiguity: str
    outlines: tuple = ()

    @property
    def num_regions(self):
        """The number of counties (100)."""
        return len(self.names)

    def __repr__(self):
        return (f"SIDSData(num_regions={self.num_regions}, periods={self.periods}, "
                f"births={self.births.sum(-1).long().tolist()}, "
                f"deaths={self.deaths.sum(-1).long().tolist()}, "
                f"contiguity={self.contiguity!r}, "
                f"links={int(self.adjacency.sum().item()) // 2})")


def load_nc_sids(contiguity="queen"):
    r"""North Carolina SIDS data (Cressie 1993), from libpysal's bundled ``sids2`` example.

    Births and sudden infant deaths in the 100 counties for 1974-78 and 1979-84 (totals:
    329962 births and 667 deaths; 422392 births and 836 deaths), expected counts by internal
    standardisation, a contiguity graph built from the county polygons with
    ``libpysal.weights.Queen`` (or ``Rook``), and centroids. A typical model is
    :math:`y_{ti} \sim \mathrm{Poisson}(E_{ti} e^{f_i})` with a CAR prior on :math:`f` (see
    :func:`sample_car`).

    The files are read from the libpysal installation; nothing is downloaded.

    :param str contiguity: ``"queen"`` (counties sharing at least one boundary point; 245
        pairs) or ``"rook"`` (sharing an edge; 231 pairs, the graph of the bundled
        ``sids2.gal``).
    :returns: a :class:`SIDSData`.
    :raises ImportError: when libpysal is not installed.
    :raises FileNotFoundError: when the installed libpysal does not bundle the ``sids2`` files.
    :raises ValueError: for an unknown ``contiguity``.
    """
    if contiguity not in ("queen", "rook"):
        raise ValueError(f"contiguity must be 'queen' or 'rook', got {contiguity!r}")
    shp, dbf = _example_files("load_nc_sids", "sids2", ["sids2.shp", "sids2.dbf"])
    libpysal = _import_libpysal("load_nc_sids")
    cols = _read_dbf(libpysal, dbf, ["NAME", "FIPSNO", "BIR74", "SID74", "BIR79", "SID79"])
    n = len(cols["NAME"])
    weights_cls = libpysal.weights.Queen if contiguity == "queen" else libpysal.weights.Rook
    with warnings.catch_warnings():
        # libpysal's own shapefile reader warns that its geometry classes are deprecated.
        warnings.filterwarnings("ignore", category=FutureWarning, module="libpysal")
        w = weights_cls.from_shapefile(str(shp))
        reader = libpysal.io.open(str(shp))
        try:
            polygons = list(reader)
            centroids = [tuple(poly.centroid) for poly in polygons]
            outlines = tuple(tuple(torch.tensor(part, dtype=torch.float64) for part in poly.parts)
                             for poly in polygons)
        finally:
            reader.close()
    if w.n != n or list(w.id_order) != list(range(n)) or len(centroids) != n:
        raise ValueError(f"sids2.shp and sids2.dbf disagree: {w.n} polygons, {n} records")
    adjacency = _dense(w.neighbors, n)
    births = torch.tensor([cols["BIR74"], cols["BIR79"]], dtype=torch.float64)
    deaths = torch.tensor([cols["SID74"], cols["SID79"]], dtype=torch.float64)
    expected = births * (deaths.sum(-1, keepdim=True) / births.sum(-1, keepdim=True))
    return SIDSData(names=tuple(str(v).strip() for v in cols["NAME"]),
                    fips=tuple(int(v) for v in cols["FIPSNO"]),
                    periods=("1974-78", "1979-84"), births=births, deaths=deaths,
                    expected=expected, adjacency=adjacency,
                    neighbors=_neighbour_lists(adjacency),
                    centroids=torch.tensor(centroids, dtype=torch.float64),
                    contiguity=contiguity, outlines=outlines)


#: The columns of ``Tokyomortality.txt``, as documented in its ``Readme_tokyomortality.txt``.
_TOKYO_COLUMNS = ("IDnum0", "X_CENTROID", "Y_CENTROID", "db2564", "eb2564", "OCC_TEC", "OWNH",
                  "POP65", "UNEMP")


@dataclass(frozen=True, eq=False)
class TokyoMortalityData:
    r"""Deaths at working age (25-64) in 262 municipalities of the Tokyo area, 1990.

    Returned by :func:`load_tokyo_mortality`. Municipalities are in the order of the file's
    ``IDnum0`` (0 to 261, the ``AreaID`` of the bundled ``tokyomet262`` shapefile).

    :ivar tuple names: municipality names, romanised (``names[0] == "Tsuchiura-shi"``); not
        unique (two towns are ``"Ina-machi"``), so label ArviZ coordinates with :attr:`codes`.
    :ivar tuple codes: municipality codes (``GEOCODE``, strings such as ``"08203"``), unique.
    :ivar torch.Tensor observed: observed deaths, float64 ``(262,)`` (``db2564``; total 46163).
    :ivar torch.Tensor expected: expected deaths, float64 ``(262,)`` (``eb2564``, as
        distributed; total 48257.455, so the overall SMR is 0.957: these are not internally
        standardised).
    :ivar torch.Tensor covariates: float64 ``(262, 4)``, the columns of
        :attr:`covariate_names`.
    :ivar tuple covariate_names: ``("OCC_TEC", "OWNH", "POP65", "UNEMP")``: the proportion of
        professional workers, of owned houses, of people aged 65 or over, and the unemployment
        rate.
    :ivar torch.Tensor coordinates: municipality centroids, float64 ``(262, 2)``, projected, in
        metres (transverse Mercator on the Tokyo datum with central meridian 136°E and latitude
        of origin 36°N, per the shapefile's ``.prj``).
    :ivar torch.Tensor adjacency: the symmetrised ``k``-nearest-neighbour graph of the
        coordinates (see :func:`knn_adjacency`), 0/1 float64 ``(262, 262)``.
    :ivar tuple neighbors: for each municipality, the sorted indices of its neighbours.
    :ivar int k: the number of nearest neighbours of the graph.
    """

    names: tuple
    codes: tuple
    observed: torch.Tensor
    expected: torch.Tensor
    covariates: torch.Tensor
    covariate_names: tuple
    coordinates: torch.Tensor
    adjacency: torch.Tensor
    neighbors: tuple
    k: int

    @property
    def num_regions(self):
        """The number of municipalities (262)."""
        return len(self.names)

    def __repr__(self):
        return (f"TokyoMortalityData(num_regions={self.num_regions}, "
                f"observed={int(self.observed.sum().item())}, "
                f"expected={self.expected.sum().item():.3f}, k={self.k}, "
                f"links={int(self.adjacency.sum().item()) // 2})")


def load_tokyo_mortality(k=6):
    r"""Tokyo working-age mortality (Nakaya et al. 2005), from libpysal's bundled ``tokyo``
    example.

    Observed and expected deaths at ages 25-64 in 1990 for the 262 municipalities within about
    70 km of central Tokyo, four area-level covariates, the centroids, and a neighbourhood
    graph from the centroids: the ``k``-nearest-neighbour graph, symmetrised (see
    :func:`knn_adjacency`). A typical model is :math:`y_i \sim \mathrm{Poisson}(E_i e^{f_i})`.

    The counts come from ``Tokyomortality.txt`` (columns as documented in the bundled
    ``Readme_tokyomortality.txt``) and the names from ``tokyomet262.dbf``; the files are read
    from the libpysal installation and nothing is downloaded.

    :param int k: nearest neighbours per municipality, ``1 <= k < 262`` (default 6).
    :returns: a :class:`TokyoMortalityData`.
    :raises ImportError: when libpysal is not installed.
    :raises FileNotFoundError: when the installed libpysal does not bundle the ``tokyo`` files.
    :raises ValueError: for a bad ``k``.
    """
    txt, dbf = _example_files("load_tokyo_mortality", "tokyo",
                              ["Tokyomortality.txt", "tokyomet262.dbf"])
    lines = [line.split() for line in txt.read_text(encoding="ascii").splitlines()
             if line.strip()]
    if tuple(lines[0]) != _TOKYO_COLUMNS or any(len(row) != len(_TOKYO_COLUMNS)
                                                 for row in lines[1:]):
        raise ValueError(f"{txt} does not have the documented columns {_TOKYO_COLUMNS}")
    table = torch.tensor([[float(v) for v in row] for row in lines[1:]], dtype=torch.float64)
    n = table.shape[0]
    if not torch.equal(table[:, 0], torch.arange(n, dtype=torch.float64)):
        raise ValueError(f"{txt.name}: IDnum0 is not 0, 1, ..., {n - 1}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k < n:
        raise ValueError(f"k must be an integer with 1 <= k < {n}, got {k!r}")

    libpysal = _import_libpysal("load_tokyo_mortality")
    cols = _read_dbf(libpysal, dbf, ["AreaID", "AREANAME", "GEOCODE"])
    order = {int(a): i for i, a in enumerate(cols["AreaID"])}
    if sorted(order) != list(range(n)):
        raise ValueError(f"{dbf.name}: AreaID does not match IDnum0 0, ..., {n - 1}")
    rows = [order[i] for i in range(n)]
    coordinates = table[:, 1:3].clone()
    adjacency = knn_adjacency(coordinates, int(k))
    return TokyoMortalityData(names=tuple(str(cols["AREANAME"][r]).strip() for r in rows),
                              codes=tuple(str(cols["GEOCODE"][r]).strip() for r in rows),
                              observed=table[:, 3].clone(), expected=table[:, 4].clone(),
                              covariates=table[:, 5:].clone(),
                              covariate_names=_TOKYO_COLUMNS[5:],
                              coordinates=coordinates, adjacency=adjacency,
                              neighbors=_neighbour_lists(adjacency), k=int(k))
