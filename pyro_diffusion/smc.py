r"""``DiffusionSMC``: the twisted diffusion sampler on :class:`pyro.infer.SMCFilter`.

Particles move down the noise grid :math:`\sigma_0 > \dots > \sigma_{N-1} = \sigma_{\min}`.
The proposal is the guided ancestral kernel (the posterior denoiser :math:`D_y` of a
:mod:`~pyro_diffusion.guidance`), the target the unguided one, and the twist
:math:`\psi_i(x) = \tilde p(y \mid x_{\sigma_i})` is the same guidance's approximate likelihood;
at :math:`\sigma_{N-1}` it is the exact likelihood of the model's observed sites. The weight of
a move :math:`x \to x'` is

.. math::

    w_{i+1} = \frac{p(x' \mid x)\, \psi_{i+1}(x')}{q(x' \mid x, y)\, \psi_i(x)},
    \qquad w_0 = \psi_0(x_{\sigma_0}),

so the weighted particles target :math:`p_{\sigma_{\min}}(x \mid y)` whatever the twist, and
the product over steps of the average weight estimates the evidence :math:`p(y)` without bias.
The better the twist, the fewer particles it takes. The default twist is variance-inflated
(MMPS for Gaussian sites, the evidence trick for counts); the plain
:math:`p(y \mid D(x; \sigma))` of DPS (``DPS(zeta=None)``) stays biased at any practical
number of particles on multimodal priors.

:class:`pyro.infer.SMCFilter` drives the run: the guide's ``step`` samples the proposal, the
model's ``step`` scores the replayed move under the target kernel and adds the twist ratio with
:func:`pyro.factor`. Per-particle caches (the particle, its denoised and guided estimates and
its twist) live in the filter's state, so resampling carries them.

Reference: Wu, Trippe, Naesseth, Blei, Cunningham (2023), *Practical and Asymptotically Exact
Conditional Sampling in Diffusion Models* (TDS).
"""

import math
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SMCFilter
from tqdm.auto import tqdm

from .guidance import (
    DPS,
    MMPS,
    EvidenceTrick,
    observation_kinds,
    observation_size,
    resolve_guidance,
)
from .inference_data import to_inference_data
from .likelihood import ModelLikelihood
from .noise_grid import check_num_steps, noise_grid
from .seeding import seeded

#: Largest number of Gaussian observations for which ``guidance="auto"`` twists with MMPS
#: (whose twist builds the full moment-matched covariance, one product per observation);
#: above it the evidence trick's per-observation variances are used.
MMPS_TWIST_MAX_OBS = 64


def resolve_twist(guidance, lik):
    """The guidance an SMC run uses as its proposal and twist.

    ``"auto"`` picks :class:`~pyro_diffusion.MMPS` for at most :data:`MMPS_TWIST_MAX_OBS`
    Gaussian observations, the :class:`~pyro_diffusion.EvidenceTrick` for Gaussian (beyond that
    size), Poisson, Binomial and Bernoulli sites, and :class:`~pyro_diffusion.DPS` with the plain
    likelihood twist otherwise.
    """
    if guidance != "auto":
        return resolve_guidance(guidance, lik)
    kinds = observation_kinds(lik)
    if kinds <= set(MMPS.kinds) and observation_size(lik) <= MMPS_TWIST_MAX_OBS:
        return MMPS()
    if kinds <= set(EvidenceTrick.kinds):
        return EvidenceTrick()
    return DPS(zeta=None)


class _Run:
    """What the model and the guide share: the likelihood, the grid and the evaluation."""

    def __init__(self, lik, guidance, sigmas, batch_size):
        self.lik = lik
        self.prior = lik.prior
        self.guidance = guidance
        self.sigmas = sigmas
        self.levels = sigmas.tolist()  # the grid on the host, read once
        self.batch_size = batch_size
        self.event_shape = tuple(lik.event_shape)
        # SMCFilter puts its particle plate left of the model's own plates, so the particle
        # sites carry singleton dims for those plates between the particles and the event.
        self.plate_shape = (1,) * lik.max_plate_nesting

    @property
    def last(self):
        return self.sigmas.shape[0] - 1

    def _site(self, loc, scale):
        # The filter's own kernels are valid by construction: no argument or sample checks,
        # which would read values back from the device at every step.
        n = loc.shape[0]
        loc = loc.reshape((n,) + self.plate_shape + self.event_shape)
        return dist.Independent(dist.Normal(loc, scale, validate_args=False),
                                len(self.event_shape), validate_args=False)

    def particles(self, value):
        """A particle site's value as ``(n, *event_shape)``."""
        return value.reshape((value.shape[0],) + self.event_shape)

    def per_particle(self, log_value):
        """A per-particle ``(n,)`` quantity shaped for a site in the particle plate."""
        return log_value.reshape((log_value.shape[0],) + self.plate_shape)

    def initial(self, num_particles):
        prior = self.prior
        mean = torch.as_tensor(getattr(prior.denoiser, "data_mean", 0.0), dtype=prior.dtype,
                               device=prior.device)
        std = float(getattr(prior.denoiser, "data_std", 0.0))
        scale = math.sqrt(self.levels[0] ** 2 + std ** 2)
        return self._site(mean.expand((num_particles,) + self.event_shape), scale)

    def kernel(self, x, x0, i):
        """The ancestral kernel from ``sigmas[i]`` to ``sigmas[i + 1]`` given the estimate
        ``x0`` of the clean latent (``D`` for the target, ``D_y`` for the proposal)."""
        s, s_next = self.levels[i], self.levels[i + 1]
        ratio2 = (s_next / s) ** 2
        scale = s_next * math.sqrt(max(1.0 - ratio2, 0.0))
        return self._site(x0 + ratio2 * (x - x0), scale)

    def evaluate(self, state, x, i):
        """Store the particle ``x`` at ``sigmas[i]`` with its twist and denoised estimates."""
        with poutine.block(), torch.no_grad():
            if i == self.last:
                log_twist = self.lik.log_likelihood(x)
                x0 = x0g = x
            else:
                parts = [self._evaluate_chunk(x[j:j + self.batch_size], i)
                         for j in range(0, x.shape[0], self.batch_size)]
                x0, x0g, log_twist = (torch.cat(p) for p in zip(*parts, strict=True))
        log_twist = log_twist.detach()
        log_twist = torch.where(torch.isnan(log_twist), -math.inf, log_twist)
        state["x"] = x.detach()
        state["x0"] = x0.detach()
        state["x0_guided"] = x0g.detach()
        state["log_twist"] = log_twist
        return log_twist

    def _evaluate_chunk(self, x, i):
        sigma = self.sigmas[i].expand(x.shape[0])
        x0, grad, log_p = self.guidance.evaluate(self.lik, self.prior, x, sigma, value=True)
        s2 = self.levels[i] ** 2
        return x0.detach(), (x0 + s2 * grad).detach(), log_p.detach()


def _factor(name, log_factor):
    """:func:`pyro.factor` without argument checks (the twist may be ``-inf``, never NaN)."""
    unit = dist.Unit(log_factor, validate_args=False)
    pyro.sample(name, unit, obs=unit.sample(), infer={"is_auxiliary": True})


class _TargetModel:
    """SMCFilter model: the unguided kernel, with the twist ratio as a factor."""

    def __init__(self, run):
        self.run = run

    def init(self, state, num_particles):
        run = self.run
        x = run.particles(pyro.sample("x", run.initial(num_particles)))
        _factor("twist", run.per_particle(run.evaluate(state, x, 0)))

    def step(self, state, i):
        run = self.run
        old = state["log_twist"]
        x = run.particles(pyro.sample("x", run.kernel(state["x"], state["x0"], i)))
        new = run.evaluate(state, x, i + 1)
        # A particle whose old twist was -inf has zero weight already; keep it at -inf.
        _factor("twist", run.per_particle(torch.where(torch.isfinite(old), new - old, old)))


class _ProposalGuide:
    """SMCFilter guide: the guided kernel."""

    def __init__(self, run):
        self.run = run

    def init(self, state, num_particles):
        pyro.sample("x", self.run.initial(num_particles))

    def step(self, state, i):
        pyro.sample("x", self.run.kernel(state["x"], state["x0_guided"], i))


class _EvidenceFilter(SMCFilter):
    """:class:`~pyro.infer.SMCFilter` that also accumulates the log evidence, records the ESS
    at each step, and keeps its weights and resampling on the particles' device."""

    def __init__(self, model, guide, num_particles, ess_threshold, max_plate_nesting, dtype,
                 device):
        super().__init__(model, guide, num_particles, max_plate_nesting=max_plate_nesting,
                         ess_threshold=ess_threshold)
        self.state._log_weights = torch.zeros(num_particles, dtype=dtype, device=device)
        self.log_evidence = 0.0
        self.ess_history = []
        self.resampled = []

    @torch.no_grad()
    def _update_weights(self, model_trace, guide_trace):
        model_trace = poutine.util.prune_subsample_sites(model_trace)
        guide_trace = poutine.util.prune_subsample_sites(guide_trace)
        with pyro.validation_enabled(False):  # the filter's own sites: no NaN checks per step
            model_trace.compute_log_prob()
            guide_trace.compute_log_prob()
        n = self.num_particles
        incr = torch.zeros_like(self.state._log_weights)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample":
                log_p = model_trace.nodes[name]["log_prob"].reshape(n, -1).sum(-1)
                incr = incr + log_p - site["log_prob"].reshape(n, -1).sum(-1)
        for site in model_trace.nodes.values():
            if site["type"] == "sample" and site["is_observed"]:
                incr = incr + site["log_prob"].reshape(n, -1).sum(-1)
        before = self.state._log_weights
        after = before + incr.to(before.dtype)
        total = after.logsumexp(-1)
        # Read back (with the ESS) in _maybe_importance_resample, which always follows: one
        # wait on the device per step.
        self._pending = (total, total - before.logsumexp(-1))
        self.state._log_weights = after - total

    def _maybe_importance_resample(self):
        log_w = self.state._log_weights
        log_w = log_w - log_w.logsumexp(-1)
        self.state._log_weights = log_w
        probs = log_w.exp()
        total, increment = self._pending
        total, increment, ess = torch.stack(
            [total, increment.to(total.dtype), probs.dot(probs).reciprocal().to(total.dtype)]
        ).tolist()
        if not math.isfinite(total):
            raise pyro.infer.smcfilter.SMCFailed(
                "every particle has zero weight: the likelihood or the twist is -inf (or NaN) "
                "for all of them; check the data against the model")
        self.log_evidence += increment
        self.ess_history.append(ess)
        resample = ess < self.ess_threshold * self.num_particles
        self.resampled.append(resample)
        if resample and self.state:
            self.state._resample(systematic_resample(probs))
            self.state._log_weights = torch.full_like(log_w, -math.log(self.num_particles))


def systematic_resample(probs, num_samples=None, generator=None):
    """Indices drawn by systematic resampling from weights ``probs`` ``(n,)`` (on their device).

    :param int num_samples: number of indices (default ``n``).
    :param torch.Generator generator: random source for the single uniform offset.
    """
    n = probs.shape[0] if num_samples is None else int(num_samples)
    u = torch.rand((), dtype=probs.dtype, device=probs.device, generator=generator)
    points = (u + torch.arange(n, dtype=probs.dtype, device=probs.device)) / n
    cdf = probs.cumsum(-1)
    cdf = cdf / cdf[-1]
    return torch.searchsorted(cdf, points, right=True).clamp(max=probs.shape[0] - 1)


class DiffusionSMC:
    r"""Twisted diffusion SMC: asymptotically exact posterior samples and ``log p(y)``.

    :param callable model: a Pyro model with one :class:`~pyro_diffusion.DiffusionPrior` site
        (see :class:`~pyro_diffusion.likelihood.ModelLikelihood`).
    :param guidance: the proposal's guidance and the twist: ``"auto"`` (see
        :func:`resolve_twist`), a name (``"dps"``, ``"mmps"``, ``"evidence"``) or a
        :class:`~pyro_diffusion.Guidance`. ``DPS(zeta=None)`` gives the plain
        :math:`p(y \mid D)` twist.
    :param int num_particles: particles; the error falls as they grow.
    :param int num_steps: noise levels (default: the prior's); ``num_steps - 1`` moves (one
        level is importance sampling of the latent at :math:`\sigma_{\max}`, not of
        :math:`x_0`).
    :param float ess_threshold: resample when the effective sample size falls below this
        fraction of the particles (default 0.5).
    :param int batch_size: particles per denoiser call (bounds memory; default 4096).
    :param device: where to run (default: the prior's device). The prior (in place) and
        the model's tensor arguments are moved there
        (:class:`~pyro_diffusion.likelihood.ModelLikelihood`).
    :param int seed: seed for the run (the global RNG is restored afterwards).
    :param bool progress: show a progress bar over steps.

    The particles target the posterior under the prior of the discretised chain (the unguided
    ancestral sampler on ``num_steps`` noise levels, down to :math:`\sigma_{\min}`), so as
    particles grow the estimates converge to that chain's posterior and evidence; their
    distance to the continuous model's shrinks with ``num_steps``. How fast depends on the
    prior (0.07 nats at 64 steps on a Gaussian test problem; more for rougher fields): when
    comparing models by their evidence, check that it is stable between two step counts (64
    and 256, say) and use the same ``num_steps`` for every model.

    After :meth:`run`: :attr:`log_evidence` (estimate of :math:`\log p(y)`, unbiased on the
    exponential scale), :attr:`ess_history` (ESS after each step's reweighting, before any
    resampling), :attr:`resampled` (whether each step resampled), :attr:`wall_time`. A run
    whose ESS falls below 2 or 0.5 % of the particles (the larger, at most half of them) at
    some step warns: its draws and evidence then rest on a few particles.
    """

    def __init__(self, model, guidance="auto", num_particles=1000, num_steps=None,
                 ess_threshold=0.5, batch_size=4096, device=None, seed=None, progress=True):
        self.model = model
        self.guidance = guidance
        self.num_particles = int(num_particles)
        if self.num_particles < 1:
            raise ValueError(f"num_particles must be positive, got {num_particles}")
        if not 0.0 < float(ess_threshold) <= 1.0:
            raise ValueError(f"ess_threshold must be in (0, 1], got {ess_threshold}")
        self.ess_threshold = float(ess_threshold)
        self.num_steps = check_num_steps(num_steps)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = device
        self.seed = seed
        self.progress = progress
        self._filter = None

    def run(self, *args, **kwargs):
        """Run the filter on ``model(*args, **kwargs)``; returns ``self``."""
        lik = ModelLikelihood(self.model, args, kwargs, device=self.device)
        prior = lik.prior
        guidance = resolve_twist(self.guidance, lik)
        guidance.check(lik)
        num_steps = prior.num_steps if self.num_steps is None else self.num_steps
        sigmas = noise_grid(num_steps, prior.sigma_min, prior.sigma_max, prior.rho,
                            dtype=prior.dtype, device=prior.device)[:-1]
        run = _Run(lik, guidance, sigmas, self.batch_size)
        filt = _EvidenceFilter(_TargetModel(run), _ProposalGuide(run), self.num_particles,
                               self.ess_threshold, lik.max_plate_nesting, prior.dtype,
                               prior.device)
        start = time.perf_counter()
        with seeded(self.seed, prior.device):
            filt.init(num_particles=self.num_particles)
            for i in tqdm(range(run.last), desc="SMC", disable=not self.progress):
                filt.step(i)
            self._resample_generator = torch.Generator(device=prior.device)
            self._resample_generator.manual_seed(int(torch.randint(2 ** 62, ())))
        if prior.device.type == "cuda":  # CUDA runs asynchronously: time the finished work
            torch.cuda.synchronize(prior.device)
        self.wall_time = time.perf_counter() - start
        self._filter = filt
        self.guidance_used = guidance
        self.likelihood = lik
        self.sigmas = sigmas
        self._warn_if_degenerate()
        return self

    def _warn_if_degenerate(self):
        """Warn when the weights collapsed onto a handful of particles at some step."""
        history = self.ess_history
        floor = min(max(2.0, 0.005 * self.num_particles), 0.5 * self.num_particles)
        low = [i for i, ess in enumerate(history) if ess < floor]
        if low:
            worst = min(range(len(history)), key=history.__getitem__)
            warnings.warn(
                f"DiffusionSMC: the effective sample size fell below {floor:g} of "
                f"{self.num_particles} particles at {len(low)} of {len(history)} steps (lowest "
                f"{history[worst]:.1f}, at step {worst}): the draws and the log-evidence rest "
                "on a few particles. Use more particles or steps, or check that the prior can "
                "explain the data (a prior far from the data, or very precise observations, "
                "makes the twist a poor proposal)", stacklevel=3)

    def _check_run(self):
        if self._filter is None:
            raise RuntimeError("call .run(...) first")

    @property
    def log_evidence(self):
        """Estimate of :math:`\\log p(y)` (a float)."""
        self._check_run()
        return self._filter.log_evidence

    @property
    def ess_history(self):
        self._check_run()
        return list(self._filter.ess_history)

    @property
    def resampled(self):
        self._check_run()
        return list(self._filter.resampled)

    @property
    def ess(self):
        """Effective sample size of the final weights."""
        return self.ess_history[-1]

    def get_weighted_samples(self):
        """The final particles and their normalised log weights: ``({site: (n, ...)}, (n,))``."""
        self._check_run()
        x = self._filter.state["x"]
        samples = {self.likelihood.site: x}
        samples.update(self.likelihood.deterministic(x))
        return samples, self._filter.state._log_weights.clone()

    def get_samples(self, num_samples=None):
        """Equally weighted draws ``{site: (num_samples, ...)}`` by systematic resampling of
        the final particles (default: as many as there are particles). Repeated calls give
        fresh, reproducible resamplings."""
        samples, log_w = self.get_weighted_samples()
        num_samples = self.num_particles if num_samples is None else int(num_samples)
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        probs = log_w.exp()
        idx = systematic_resample(probs, num_samples, self._resample_generator)
        perm = torch.randperm(num_samples, device=probs.device,
                              generator=self._resample_generator)
        idx = idx[perm]
        return {k: v[idx] for k, v in samples.items()}

    def to_inference_data(self, num_samples=None, dims=None, coords=None):
        """ArviZ inference data of resampled draws (one chain; draws repeat particles, so
        judge ESS on :attr:`ess` rather than on ArviZ's autocorrelation estimate)."""
        samples = self.get_samples(num_samples)
        return to_inference_data({k: v.unsqueeze(0) for k, v in samples.items()}, dims=dims,
                                 coords=coords)

