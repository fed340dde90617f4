r"""Guidance: approximate likelihoods :math:`\tilde p(y \mid x_\sigma)` as posterior denoisers.

By Bayes' rule :math:`\nabla \log p(x_\sigma \mid y) = \nabla \log p_\sigma(x_\sigma) +
\nabla \log p(y \mid x_\sigma)`, so a guided sampler replaces the denoiser by

.. math::

    D_y(x; \sigma) = D(x; \sigma) + \sigma^2 \nabla_x \log \tilde p(y \mid x),

and the samplers of :mod:`pyro_diffusion.samplers` need not know about guidance. Each class
here is one choice of :math:`\tilde p`, read from the observed sites of a Pyro model through
:class:`~pyro_diffusion.likelihood.ModelLikelihood`. Gradients flow through the mean
:math:`\hat x = D(x; \sigma)` only; variances are held fixed.

References:

- Chung, Kim, Mccann, Klasky, Ye (2023), *Diffusion Posterior Sampling for General Noisy
  Inverse Problems* (DPS).
- Rozet, Andry, Lanusse, Louppe (2024), *Learning Diffusion Priors from Observations by
  Expectation Maximization* (MMPS).
- Micheli, Monod, Bhatt (2025), *Diffusion Models for Inverse Problems in the Exponential
  Family* (the evidence trick).
"""

import math
import warnings

import torch

from .evidence import bernoulli_log_evidence, binomial_log_evidence, poisson_log_evidence
from .likelihood import _unwrap, site_weight

GAUSSIAN = ("Normal", "MultivariateNormal")
COUNTS = ("Poisson", "Binomial", "Bernoulli")


def _column(sigma, x):
    return sigma.reshape((-1,) + (1,) * (x.dim() - 1))


def _denoise_with_graph(prior, x, sigma):
    x = x.detach().requires_grad_(True)
    return x, prior.denoise(x, sigma)


def _vjp(out, inp, v, create_graph=False):
    (g,) = torch.autograd.grad(out, inp, v, retain_graph=True, create_graph=create_graph)
    return g


class _Linearized:
    """A function ``z -> h(z)`` of the denoised latent, with VJP and JVP at one point.

    The JVP uses the double-VJP trick (``J w = d/du <J^T u, w>``), so any function that
    autograd can differentiate works, a Pyro model's trace included.
    """

    def __init__(self, fn, z):
        self.z = z.detach().requires_grad_(True)
        self.value = fn(self.z)
        self._u = torch.zeros_like(self.value, requires_grad=True)
        self._jt_u = _vjp(self.value, self.z, self._u, create_graph=True)

    def vjp(self, u):
        return _vjp(self.value, self.z, u)

    def jvp(self, w):
        return _vjp(self._jt_u, self._u, w)


def _linearize_sites(lik, x0, read, kinds, weight_power=None):
    """Linearise ``z -> read(observed sites of the model at z)`` (flattened to ``(n, m)``, see
    :func:`_flat_sites`) at the denoised latent ``x0``; returns the :class:`_Linearized` map and
    the trace at ``x0``."""
    n, state = x0.shape[0], {}

    def fn(z):
        state["trace"] = lik.trace(z)
        return _flat_sites(lik, state["trace"], n, kinds, read, weight_power)

    lin = _Linearized(fn, x0)
    return lin, state["trace"]


def _probe_trace(lik):
    """A trace at one zero latent, to read the model's observed sites' families."""
    zero = torch.zeros((1,) + tuple(lik.event_shape), dtype=lik.prior.dtype,
                       device=lik.prior.device)
    return lik.trace(zero)


def _sites(lik, trace, kinds):
    out = []
    for name in lik.observed_sites:
        site = trace.nodes[name]
        kind = type(_unwrap(site["fn"])).__name__
        if kinds is not None and kind not in kinds:
            raise ValueError(f"observed site {name!r} is {kind}; this guidance takes "
                             f"{', '.join(kinds)} sites (use DPS for any likelihood)")
        out.append(site)
    return out


def _flat_sites(lik, trace, n, kinds, read, weight_power=None):
    """Concatenate per-site quantities ``read(site, base) -> tensor`` as ``(n, m)``; with
    ``weight_power``, each observation's quantity is multiplied by its weight (mask times
    scale, :func:`~pyro_diffusion.likelihood.site_weight`) to that power."""
    parts = []
    for site in _sites(lik, trace, kinds):
        base = _unwrap(site["fn"])
        value = read(site, base).expand(site["fn"].shape())
        weight = site_weight(site) if weight_power is not None else None
        if weight is not None:
            weight = weight.to(value.dtype)
            value = value * (weight if weight_power == 1 else weight.pow(weight_power))
        parts.append(lik.per_particle(value, site, n, len(site["fn"].event_shape)))
    return torch.cat(parts, dim=-1)


class Guidance:
    """Base class: subclasses implement :meth:`evaluate`."""

    #: Distribution families of the observed sites this guidance takes (``None``: any).
    kinds = None

    def evaluate(self, lik, prior, x, sigma, value=False):  # pragma: no cover - abstract
        r"""Guidance at the noisy batch ``x`` ``(n, *event_shape)`` and noise levels ``sigma``
        ``(n,)``: returns ``(x0_hat, grad, log_p)`` with :math:`\hat x_0 = D(x; \sigma)`, the
        guidance gradient :math:`\nabla_x \log \tilde p(y \mid x)` and, when ``value`` is
        true, :math:`\log \tilde p(y \mid x)` per particle ``(n,)`` (else ``None``), the value
        that :class:`~pyro_diffusion.DiffusionSMC` uses as its twist."""
        raise NotImplementedError

    def check(self, lik):
        """Raise a clear error if this guidance cannot handle the model's observed sites."""
        if self.kinds is not None:
            _sites(lik, _probe_trace(lik), self.kinds)

    def posterior_denoiser(self, lik, prior):
        """The denoiser :math:`D_y` that a reverse sampler uses in place of ``prior.denoise``."""
        self.check(lik)

        def denoise(x, sigma):
            x0, grad, _ = self.evaluate(lik, prior, x, sigma)
            return (x0 + _column(sigma, x).square() * grad).detach()

        return denoise


class DPS(Guidance):
    r"""Diffusion posterior sampling: :math:`\tilde p(y \mid x) = p(y \mid D(x; \sigma))`.

    :param float zeta: step size (default 1). The denoised estimate moves by
        :math:`\zeta \nabla_x \log p(y \mid \hat x) / \lVert y - E[y \mid \hat x] \rVert`,
        the step of Chung et al. normalised per sample (never per batch). The step grows like
        :math:`1/\sigma_y^2` for Gaussian observations of noise :math:`\sigma_y`: lower
        ``zeta`` for precise data. ``None`` weights the likelihood gradient by
        :math:`\sigma^2` instead, the exact posterior-denoiser form of DPS's approximation,
        which diverges at high noise for precise observations.

    Works for any observed site with a differentiable ``log_prob``. It treats :math:`\hat x`
    as exact, ignoring the spread of :math:`x_0` given :math:`x_\sigma`, so its posteriors
    tend to be too narrow, the more so the more informative the data; for counts prefer the
    evidence trick (:class:`EvidenceTrick`), for Gaussian data :class:`MMPS`, and check
    against NUTS (:func:`~pyro_diffusion.diagnostics.compare_posteriors`).
    """

    def __init__(self, zeta=1.0):
        self.zeta = None if zeta is None else float(zeta)
        if self.zeta is not None and not (math.isfinite(self.zeta) and self.zeta > 0):
            raise ValueError(f"zeta must be positive and finite (or None), got {zeta!r}")

    def evaluate(self, lik, prior, x, sigma, value=False):
        with torch.enable_grad():
            x, x0 = _denoise_with_graph(prior, x, sigma)
            trace = lik.trace(x0)
            n = x.shape[0]
            ll = sum(lik.site_log_prob(trace.nodes[name], n) for name in lik.observed_sites)
            grad = _vjp(ll.sum(), x, None)
            log_p = ll.detach() if value else None
            if self.zeta is None:
                return x0.detach(), grad, log_p
            resid = _flat_sites(lik, trace, n, None, lambda s, b: s["value"] - s["fn"].mean,
                                weight_power=0.5).detach()
            norm = resid.norm(dim=-1).clamp(min=1e-12)
        step = self.zeta / norm
        return x0.detach(), _column(step, x) * grad / _column(sigma, x).square(), log_p


def _cg(matvec, b, precond, iterations, floor_mv=None):
    r"""Batched Jacobi-preconditioned conjugate gradients from zero, one system per row.

    Starting from zero costs no product; the first iterate is already the preconditioned
    residual ``alpha * precond * b``.

    MMPS solves :math:`(\Sigma_y + \sigma^2 A J A^\top) v = r`. The exact Tweedie part is
    positive semi-definite, so the operator's curvature :math:`p^\top M p` along any direction
    is at least the noise's, :math:`p^\top \Sigma_y p`; a learned denoiser's Jacobian need not
    be, and CG's step :math:`r^\top z / p^\top M p` then overshoots without bound (at high noise
    levels, where :math:`\sigma^2` multiplies the Jacobian's error). With ``floor_mv`` (products
    with that lower bound, :math:`\Sigma_y`), a row whose curvature falls below it takes its
    step with the bound's curvature (the Tweedie part clipped to zero along :math:`p`, as the
    direct solver clips its negative eigenvalues) and stops there. Without ``floor_mv`` the
    bound is zero. The rows are never read back to the host.
    """
    x = torch.zeros_like(b)
    r = b
    z = precond * r
    p = z
    rz = (r * z).sum(-1, keepdim=True)
    active = torch.ones_like(rz, dtype=torch.bool)
    for _ in range(iterations):
        ap = matvec(p)
        pap = (p * ap).sum(-1, keepdim=True)
        floor = torch.zeros_like(pap) if floor_mv is None else (p * floor_mv(p)).sum(
            -1, keepdim=True)
        clipped = ~(pap >= floor)  # NaN included
        alpha = rz / torch.where(clipped, floor, pap).clamp(min=1e-30)
        x = torch.where(active, x + alpha * p, x)
        active = active & ~clipped
        r = r - alpha * ap
        z = precond * r
        rz_new = (r * z).sum(-1, keepdim=True)
        p = z + (rz_new / rz.clamp(min=1e-30)) * p
        rz = rz_new
    return x


def _noise_operator(lik, trace, n):
    """Products with the observation noise covariance :math:`\\Sigma_y` of the Gaussian sites
    (block diagonal over sites) and its diagonal, on the ``(n, m)`` layout of ``_flat_sites``."""
    blocks, diags = [], []
    for site in _sites(lik, trace, GAUSSIAN):
        base = _unwrap(site["fn"])
        if type(base).__name__ == "Normal":
            var = base.scale.detach().expand(site["fn"].shape()) ** 2
            var = lik.per_particle(var, site, n, len(site["fn"].event_shape))
            blocks.append((var.shape[-1], None, var))
            diags.append(var)
            continue
        if lik.plate_depth(site):
            raise ValueError(f"MMPS takes MultivariateNormal site {site['name']!r} only outside "
                             "plates; use to_event or a single joint site")
        cov = base.covariance_matrix.detach()
        cov = cov.expand((n,) + cov.shape[-2:]) if cov.dim() == 2 else cov.reshape(
            (-1,) + cov.shape[-2:]).expand(n, -1, -1)
        blocks.append((cov.shape[-1], cov, None))
        diags.append(cov.diagonal(dim1=-2, dim2=-1))

    def matvec(u):
        out, start = [], 0
        for size, cov, var in blocks:
            part = u[:, start:start + size]
            out.append(part * var if cov is None else (cov @ part.unsqueeze(-1)).squeeze(-1))
            start += size
        return torch.cat(out, dim=-1)

    return matvec, torch.cat(diags, dim=-1)


class MMPS(Guidance):
    r"""Moment-matching posterior sampling for Gaussian observations.

    For :math:`y = A(x_0) + N(0, \Sigma_y)` it uses
    :math:`\tilde p = N(y;\ A(\hat x),\ \Sigma_y + \sigma^2 A J A^\top)` with Tweedie's
    covariance :math:`V = \sigma^2 J`, :math:`J = \partial D / \partial x`, and the gradient
    :math:`J^\top A^\top v` with :math:`v = (\Sigma_y + \sigma^2 A J A^\top)^{-1}(y - A\hat x)`,
    from Jacobian-vector products only. A non-linear ``A`` (the site's ``loc`` as a function
    of the latent) is linearised at :math:`\hat x`.

    :param int iterations: conjugate-gradient iterations (1 to 5 suffice in practice).
    :param str solver: how :math:`v` is found: ``"cg"`` (Jacobi-preconditioned conjugate
        gradients, ``iterations`` products), ``"direct"`` (the :math:`m \times m` matrix built
        column by column from :math:`m` products, symmetrised and Cholesky-factored: exact,
        and cheaper than CG when there are at most ``iterations`` observations), or
        ``"auto"`` (default: ``"direct"`` when :math:`m \le` ``iterations``, else ``"cg"``).
        A learned denoiser's Jacobian need not be positive semi-definite as the exact one is:
        the direct solver clips the Tweedie part's negative eigenvalues, and CG clips it to
        zero along a search direction where it is negative and stops there.
        The twist value (``evaluate(..., value=True)``) needs the log-determinant, so it is
        always computed the direct way.

    Masked observations (``poutine.mask`` or a ``.mask(...)`` wrapper) are left out, and a
    weight :math:`w` from ``poutine.scale`` raises an observation's likelihood to the power
    :math:`w` (its noise variance divided by :math:`w`): the residual and the rows of
    :math:`A` are multiplied by :math:`\sqrt{w}`
    (:func:`~pyro_diffusion.likelihood.site_weight`).
    """

    kinds = GAUSSIAN

    def __init__(self, iterations=5, solver="auto"):
        if solver not in ("auto", "cg", "direct"):
            raise ValueError(f"solver must be 'auto', 'cg' or 'direct', got {solver!r}")
        self.iterations = int(iterations)
        if self.iterations < 1:
            raise ValueError(f"iterations must be positive, got {iterations}")
        self.solver = solver

    def evaluate(self, lik, prior, x, sigma, value=False):
        n = x.shape[0]
        with torch.enable_grad():
            x, x0 = _denoise_with_graph(prior, x, sigma)
            A, trace = _linearize_sites(lik, x0, lambda s, b: b.loc, self.kinds,
                                        weight_power=0.5)
            y = _flat_sites(lik, trace, n, GAUSSIAN, lambda s, b: s["value"],
                            weight_power=0.5).detach()
            noise_mv, noise_diag = _noise_operator(lik, trace, n)
            s2 = _column(sigma, y).square()

            def tweedie_mv(u):
                return s2 * A.jvp(_vjp(x0, x, A.vjp(u)))

            def matvec(u):
                return noise_mv(u) + tweedie_mv(u)

            resid = (y - A.value).detach()
            m = resid.shape[-1]
            direct = value or self.solver == "direct" or (
                self.solver == "auto" and m <= self.iterations)
            log_p = None
            if direct:
                v, log_p = _direct_solve(noise_mv, tweedie_mv, resid)
                if value:
                    log_p = log_p + _tempering_constant(lik, trace, n)
            else:
                v = _cg(matvec, resid, 1.0 / (noise_diag + s2), self.iterations,
                        floor_mv=noise_mv)
            grad = _vjp(x0, x, A.vjp(v.detach()))
        return x0.detach(), grad, (log_p if value else None)


def _tempering_constant(lik, trace, n):
    r"""Per particle ``(n,)``: what turns the moment-matched evidence of the whitened data
    :math:`\sqrt{w}\,y` into that of the observations tempered by their weights :math:`w`.

    :math:`w \log N(y; a, s^2) = \log N(\sqrt{w} y; \sqrt{w} a, s^2) + \frac{1 - w}{2}
    \log(2 \pi s^2)` (with :math:`\log\det(2 \pi \Sigma)` for a vector observation), so a
    masked observation (:math:`w = 0`) adds nothing, as if it were absent."""
    total = None
    for site in _sites(lik, trace, None):  # the Gaussian ones among all observed sites
        weight = site_weight(site)
        if weight is None or type(_unwrap(site["fn"])).__name__ not in GAUSSIAN:
            continue
        base, shape = _unwrap(site["fn"]), site["fn"].shape()
        ev = len(site["fn"].event_shape)
        if type(base).__name__ == "Normal":
            log_norm = (2.0 * math.pi * base.scale.detach().expand(shape).square()).log()
            term = lik.per_particle(0.5 * (1.0 - weight.expand(shape)) * log_norm, site, n, ev)
        else:
            cov = base.covariance_matrix.detach()
            log_norm = torch.linalg.slogdet(2.0 * math.pi * cov)[1]
            w = weight.expand(shape)[..., 0]
            term = lik.per_particle(0.5 * (1.0 - w) * log_norm, site, n, ev - 1)
        term = term.sum(-1)
        total = term if total is None else total + term
    return 0.0 if total is None else total


def _direct_solve(noise_mv, tweedie_mv, r):
    r"""Solve :math:`(\Sigma_y + P) v = r` one ``(m, m)`` system per row, with the noise
    :math:`\Sigma_y` and the Tweedie part :math:`P = \sigma^2 A J A^\top` given by products.

    Both are built from ``m`` products each. A learned denoiser's Jacobian is neither exactly
    symmetric nor positive semi-definite, so :math:`P` is symmetrised and its negative
    eigenvalues are clipped to zero (the exact one is PSD); the sum then stays positive
    definite. Returns ``v`` and :math:`\log N(r; 0, \Sigma_y + P)`.
    """
    n, m = r.shape
    eye = torch.eye(m, dtype=r.dtype, device=r.device)
    noise = torch.stack([noise_mv(eye[j].expand(n, m)).detach() for j in range(m)], dim=-1)
    tweedie = torch.stack([tweedie_mv(eye[j].expand(n, m)).detach() for j in range(m)], dim=-1)
    evals, evecs = torch.linalg.eigh(0.5 * (tweedie + tweedie.transpose(-1, -2)))
    M = noise + (evecs * evals.clamp(min=0.0).unsqueeze(-2)) @ evecs.transpose(-1, -2)
    L = torch.linalg.cholesky(0.5 * (M + M.transpose(-1, -2)))
    v = torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
    logdet = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    log_p = -0.5 * ((r * v).sum(-1) + logdet + m * math.log(2.0 * math.pi))
    return v, log_p


class EvidenceTrick(Guidance):
    r"""Moment-matched evidence for Poisson, Binomial, Bernoulli (and Gaussian) observations.

    The natural parameter :math:`\eta = a(x_0)` of each observation (log rate or logit, read
    from the site's ``rate``, ``logits`` or ``probs``) is approximately
    :math:`N(a(\hat x), v)` under :math:`x_0 \mid x_\sigma \approx N(\hat x, V)`; pushing it
    through the conjugate prior gives a closed-form evidence (negative binomial, beta-binomial,
    or for Gaussian sites :math:`N(y; \hat\mu, s^2 + v)`), whose gradient in :math:`\hat x`
    guides the sampler.

    :param str variance: how :math:`v_i = a_i^\top V a_i` is computed: ``"tweedie"`` (from
        Tweedie's covariance :math:`V = \sigma^2 J`, with Jacobian-vector products along
        ``num_probes`` random directions, or exactly along every coordinate when the latent
        has at most ``exact_max_dim`` of them) or ``"isotropic"``
        (:math:`V \approx \frac{\sigma^2 \sigma_d^2}{\sigma^2 + \sigma_d^2} I`, the
        Gaussian-prior variance with the data scale :math:`\sigma_d`).
    :param int num_probes: random probes for the ``"tweedie"`` variance of large latents.
    :param int exact_max_dim: largest latent size for which the variance is computed exactly.

    Masked observations (``poutine.mask`` or a ``.mask(...)`` wrapper) are left out. A weight
    :math:`w` from ``poutine.scale`` (:func:`~pyro_diffusion.likelihood.site_weight`) counts a
    count observation's evidence :math:`w` times; a Gaussian observation's likelihood is raised
    to the power :math:`w` before its evidence is taken (its noise variance divided by
    :math:`w`), as :class:`MMPS` does.

    The evidence is taken per observation, so several observations of the same natural
    parameter (Bernoulli outcomes of one village) are treated as independent given the noisy
    latent and guide too strongly; aggregate them into Binomial counts.
    """

    kinds = COUNTS + GAUSSIAN

    def __init__(self, variance="tweedie", num_probes=8, exact_max_dim=64):
        if variance not in ("tweedie", "isotropic"):
            raise ValueError(f"variance must be 'tweedie' or 'isotropic', got {variance!r}")
        self.variance = variance
        self.num_probes = int(num_probes)
        self.exact_max_dim = int(exact_max_dim)
        if self.num_probes != num_probes or self.num_probes < 1:
            raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
        if self.exact_max_dim != exact_max_dim or self.exact_max_dim < 0:
            raise ValueError(f"exact_max_dim must be a non-negative integer, got "
                             f"{exact_max_dim!r}")

    @staticmethod
    def _natural(site, base):
        kind = type(base).__name__
        if kind == "Poisson":
            return base.rate.clamp(min=torch.finfo(base.rate.dtype).tiny).log()
        if kind in ("Binomial", "Bernoulli"):
            return base.logits
        return base.loc

    def _probes(self, x):
        """Directions ``e`` with ``sum_e w e e^T = I``: the coordinate basis (weight 1) for a
        small latent, else Gaussian probes (weight ``1 / num_probes``, unbiased)."""
        d = x[0].numel()
        if d <= self.exact_max_dim:
            eye = torch.eye(d, dtype=x.dtype, device=x.device)
            return [eye[i].expand(x.shape[0], d).reshape(x.shape) for i in range(d)], 1.0
        return [torch.randn_like(x) for _ in range(self.num_probes)], 1.0 / self.num_probes

    def evaluate(self, lik, prior, x, sigma, value=False):
        n = x.shape[0]
        with torch.enable_grad():
            x, x0 = _denoise_with_graph(prior, x, sigma)
            eta, trace = _linearize_sites(lik, x0, self._natural, self.kinds)
            s2 = _column(sigma, eta.value).square()
            # v_i = (A V A^T)_ii = E[(A e)_i (A V e)_i] over probes e with E[e e^T] = I.
            var = torch.zeros_like(eta.value)
            floor = torch.zeros_like(eta.value)
            probes, weight = self._probes(x0)
            sd2 = float(getattr(prior.denoiser, "data_std", 1.0)) ** 2
            for e in probes:
                ae = eta.jvp(e.detach())
                if self.variance == "tweedie":
                    ave = eta.jvp(_vjp(x0, x, e.detach()))
                    var = var + ae * ave * s2
                    floor = floor + ave * ave * s2
                else:
                    var = var + ae * ae * s2 * sd2 / (s2 + sd2)
            # Random probes estimate each v_i with a relative error that can reach 100 % when
            # the Tweedie covariance is dense (smooth fields at high noise); a v_i near zero
            # makes that observation's evidence as sharp as the raw likelihood and the guided
            # step explodes. s^2 (A J J^T A^T)_ii, from the same products, is a lower bound of
            # s^2 (A J A^T)_ii whenever J's eigenvalues lie in [0, 1] (exact for Gaussian data)
            # and its estimate is a sum of squares, never near zero by chance: floor with it.
            var = torch.maximum(var, floor) if self.variance == "tweedie" else var
            var = (var * weight).clamp(min=0.0).detach()
            log_ev = self._log_evidence(lik, trace, n, eta.value, var)
            grad_eta = _vjp(log_ev.sum(), eta.value, None)
            grad = _vjp(x0, x, eta.vjp(grad_eta))
        if not value:
            return x0.detach(), grad, None
        return x0.detach(), grad, log_ev.detach().sum(-1) + _tempering_constant(lik, trace, n)

    def _log_evidence(self, lik, trace, n, mean, var):
        out, start = [], 0
        for site in _sites(lik, trace, self.kinds):
            base = _unwrap(site["fn"])
            shape = site["fn"].shape()
            ev = len(site["fn"].event_shape)
            y = lik.per_particle(site["value"].expand(shape), site, n, ev)
            weight = site_weight(site)
            m = y.shape[-1]
            mu, v = mean[:, start:start + m], var[:, start:start + m]
            start += m
            kind = type(base).__name__
            if kind == "Poisson":
                out.append(poisson_log_evidence(y, mu, v, validate=False))
            elif kind == "Binomial":
                total = torch.as_tensor(base.total_count, dtype=y.dtype, device=y.device)
                total = lik.per_particle(total.expand(shape), site, n, ev)
                out.append(binomial_log_evidence(y, total, mu, v, validate=False))
            elif kind == "Bernoulli":
                out.append(bernoulli_log_evidence(y, mu, v, validate=False))
            elif kind == "Normal":
                # The evidence of the likelihood tempered by w (noise variance s^2 / w), as
                # MMPS takes it: N(sqrt(w) y; sqrt(w) mu, s^2 + w v), up to the constant of
                # _tempering_constant, which evaluate adds to the twist value.
                scale2 = lik.per_particle(base.scale.expand(shape), site, n, ev).detach() ** 2
                w = 1.0 if weight is None else lik.per_particle(
                    weight.expand(shape).to(y.dtype), site, n, ev)
                tot = scale2 + w * v
                out.append(-0.5 * (w * (y - mu) ** 2 / tot + (2.0 * math.pi * tot).log()))
                continue
            else:  # MultivariateNormal outside plates: N(y; mu, Sigma_y + diag(v)), tempered
                w = 1.0 if weight is None else lik.per_particle(
                    weight.expand(shape)[..., 0].to(y.dtype), site, n, ev - 1)
                root = w ** 0.5 if weight is not None else 1.0
                cov = base.covariance_matrix.detach() + torch.diag_embed(w * v)
                out.append(torch.distributions.MultivariateNormal(root * mu, cov).log_prob(
                    root * y)[:, None])
                continue
            if weight is not None:  # counts: each observation's evidence taken w times
                weight = weight.expand(shape).to(out[-1].dtype)
                out[-1] = out[-1] * lik.per_particle(weight, site, n, ev)
        return torch.cat(out, dim=-1)


def observation_kinds(lik):
    """The set of distribution families (class names) of the model's observed sites."""
    trace = _probe_trace(lik)
    return {type(_unwrap(trace.nodes[name]["fn"])).__name__ for name in lik.observed_sites}


def observation_size(lik):
    """The number of scalar observations over all observed sites."""
    trace = _probe_trace(lik)
    return int(_flat_sites(lik, trace, 1, None, lambda s, b: s["value"]).shape[-1])


def resolve_guidance(guidance, lik):
    """Turn ``"auto"``, a name, or a :class:`Guidance` into a :class:`Guidance` for ``lik``.

    ``"auto"`` picks :class:`MMPS` when every observed site is Gaussian, the
    :class:`EvidenceTrick` when they are Poisson, Binomial, Bernoulli (or Gaussian), and
    :class:`DPS` otherwise, with a warning.
    """
    if isinstance(guidance, Guidance):
        return guidance
    names = {"dps": DPS, "mmps": MMPS, "evidence": EvidenceTrick}
    if guidance in names:
        return names[guidance]()
    if guidance != "auto":
        raise ValueError(f"guidance must be 'auto', 'dps', 'mmps', 'evidence' or a Guidance, "
                         f"got {guidance!r}")
    kinds = observation_kinds(lik)
    if kinds <= set(MMPS.kinds):
        return MMPS()
    if kinds <= set(EvidenceTrick.kinds):
        return EvidenceTrick()
    other = ", ".join(sorted(kinds - set(EvidenceTrick.kinds)))
    warnings.warn(f"guidance='auto': no moment-matched guidance for {other} observations, so "
                  "DPS is used, whose posteriors tend to be too narrow; DiffusionLangevin "
                  "(the exact likelihood) or DiffusionSMC (reweighted to it) are the "
                  "alternatives to check it against. Pass guidance='dps' to silence this",
                  stacklevel=4)
    return DPS()
