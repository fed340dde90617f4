r"""``fit_prior``: learn a diffusion prior from incomplete, noisy observations (DiEM).

Given observations :math:`y_1, \dots, y_N` of unseen fields :math:`x_i \sim p` through a
measurement model written in Pyro (each with its own operator: mask, projection, exposure,
trial counts), expectation-maximisation alternates

- **E-step**: draw posterior samples :math:`x_i \sim q_k(x \mid y_i)` under the current prior
  :math:`q_k` with a guided sampler (MMPS for Gaussian sites, the evidence trick for counts);
- **M-step**: train the denoiser on those samples by denoising score matching, starting from
  the previous lap's weights (optimiser and EMA reset), so :math:`q_{k+1}` fits the samples.

Its fixed point is a prior whose posteriors, pooled over the observations, reproduce it: the
empirical-Bayes estimate of :math:`p`. The first prior is a Gaussian fitted by a few rounds of
EM with its exact denoiser: closed-form (exact posterior moments) when every observed site is
Gaussian and linear in the field, Monte Carlo with guided samples otherwise.

Reference: Rozet, Andry, Lanusse, Louppe (2024), *Learning Diffusion Priors from Observations
by Expectation Maximization*.
"""

import copy
import hashlib
import math
import os
import time
import warnings
import zlib

import torch
from tqdm.auto import tqdm

from ._checks import check_positive_int
from ._version import __version__
from .exact import GaussianDenoiser
from .guidance import (
    GAUSSIAN,
    _flat_sites,
    _Linearized,
    _noise_operator,
    observation_kinds,
)
from .likelihood import ModelLikelihood
from .networks import default_network
from .posterior import DiffusionPosterior
from .preconditioning import EDMDenoiser, use_gaussian_skip
from .prior import DiffusionPrior
from .seeding import forked, manual_seed
from .serialization import module_from_dict, module_to_dict
from .training import train_denoiser

__all__ = ["fit_prior"]

_FORMAT = "pyro_diffusion.fit_prior"
_FORMAT_VERSION = 1
CHECKPOINT_NAME = "fit_prior.pt"


def _seed(seed, *key):
    """A seed that depends only on ``seed`` and ``key`` (so a resumed run repeats a lap)."""
    return (int(seed) * 1_000_003 + zlib.crc32(repr(key).encode())) % 2**63


def _check_data(data):
    if not isinstance(data, dict) or not data:
        raise ValueError("data must be a non-empty dict of tensors with a leading observation "
                         "dimension, e.g. {'A': (N, m, d), 'y': (N, m)}")
    sizes = {}
    for name, value in data.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise ValueError(f"data[{name!r}] must be a tensor with a leading observation "
                             f"dimension, got {type(value).__name__}"
                             + (f" of shape {tuple(value.shape)}"
                                if isinstance(value, torch.Tensor) else ""))
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = "NaN" if torch.isnan(value).any() else "infinite"
            raise ValueError(f"data[{name!r}] contains {bad} values")
        sizes[name] = value.shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"every data tensor needs the same leading size N; got {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"data holds no observations: leading size N = 0 ({sizes})")
    return n


def _fingerprint(data):
    """A short hash of the data (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name in sorted(data):
        t = data[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def _chunks(data, n, size, repeat=1, device=None):
    for start in range(0, n, size):
        chunk = {k: v[start:start + size] for k, v in data.items()}
        if repeat > 1:
            chunk = {k: v.repeat_interleave(repeat, dim=0) for k, v in chunk.items()}
        if device is not None:
            chunk = {k: v.to(device) for k, v in chunk.items()}
        yield chunk


def _gaussian_moments(x):
    """Mean ``(d,)`` and covariance ``(d, d)`` of draws ``(n, *event)`` (flattened)."""
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(0)
    centred = flat - mean
    return mean, centred.T @ centred / max(flat.shape[0] - 1, 1)


def _linear_gaussian_moments(model, prior, chunk):
    """Exact posterior means ``(n, d)`` and summed covariances ``(d, d)`` of a Gaussian prior
    under the chunk's Gaussian observed sites, linearised at the prior mean (exact when the
    sites' ``loc`` is linear in the field)."""
    g = prior.denoiser
    n = next(iter(chunk.values())).shape[0]
    lik = ModelLikelihood(model, (prior,), chunk, num_particles=n)
    mu = g.mean.reshape((1,) + tuple(prior.event_shape)).expand(
        (n,) + tuple(prior.event_shape))
    state = {}

    def fn(z):
        state["trace"] = lik.trace(z)
        return _flat_sites(lik, state["trace"], n, GAUSSIAN, lambda s, b: b.loc,
                           weight_power=0.5)

    with torch.enable_grad():
        lin = _Linearized(fn, mu)
        m = lin.value.shape[-1]
        eye = torch.eye(m, dtype=mu.dtype, device=mu.device)
        A = torch.stack([lin.vjp(eye[j].expand(n, m)).reshape(n, -1) for j in range(m)], 1)
    trace = state["trace"]
    # Masked (or scaled) observations: sqrt(weight) on both sides, as MMPS does.
    y = _flat_sites(lik, trace, n, GAUSSIAN, lambda s, b: s["value"], weight_power=0.5).detach()
    noise_mv, _ = _noise_operator(lik, trace, n)
    noise = torch.stack([noise_mv(eye[j].expand(n, m)) for j in range(m)], -1)
    A = A.detach()
    cov = g.cov
    a_cov = A @ cov                                          # (n, m, d)
    S = a_cov @ A.transpose(-1, -2) + noise                   # (n, m, m)
    S = 0.5 * (S + S.transpose(-1, -2))
    L = torch.linalg.cholesky(S)
    X = torch.cholesky_solve(a_cov, L)                        # S^-1 A Sigma, (n, m, d)
    resid = (y - lin.value.detach()).unsqueeze(-1)            # (n, m, 1)
    means = g.mean + (X.transpose(-1, -2) @ resid).squeeze(-1)
    cov_sum = n * cov - torch.einsum("nmd,nme->de", a_cov, X)
    return means, cov_sum


def _tail_mean(values, k=100):
    tail = values[-k:]
    return float(sum(tail) / len(tail)) if tail else float("nan")


class _Settings(dict):
    """The settings a checkpoint must agree on to be resumed."""

    IGNORED = ("laps",)

    def mismatch(self, other):
        keys = sorted((set(self) | set(other)) - set(self.IGNORED))
        return [k for k in keys if self.get(k) != other.get(k)]


def fit_prior(model, data, *, event_shape, laps=8, prior=None, guidance="auto",
              samples_per_observation=1, train_steps=2000, batch_size=256, lr=2e-3,
              net=None, num_steps=64, sampler="ancestral", e_batch_size=2048,
              gaussian_rounds=None, gaussian_skip=False, prior_settings=None, checkpoint_dir=None,
              resume=True, callback=None, device=None, seed=0, progress=True):
    r"""Learn a :class:`~pyro_diffusion.DiffusionPrior` from observations alone, by EM.

    :param callable model: ``model(prior, **chunk)``: a Pyro model with one sample site
        distributed as ``prior`` and observed sites, where ``chunk`` holds rows of ``data``.
        **The model must broadcast over a leading batch dimension**: the field it receives has
        shape ``(n, *event_shape)`` and every data tensor ``(n, ...)``, row ``i`` of each
        belonging to observation ``i``; e.g. ``(A @ f[..., None])[..., 0]`` with ``A`` of
        shape ``(n, m, d)``, or ``f * mask`` with ``mask`` of shape ``(n, d)``.
    :param dict data: name -> tensor with a leading observation dimension ``N`` (values,
        operators, masks, exposures, trial counts).
    :param tuple event_shape: the field's shape.
    :param int laps: EM laps after the Gaussian initialisation.
    :param DiffusionPrior prior: a prior to start the laps from (skips the Gaussian
        initialisation; its denoiser must be an :class:`~pyro_diffusion.EDMDenoiser`).
    :param guidance: the E-step's guidance (``"auto"``: MMPS for Gaussian sites, the evidence
        trick for Poisson/Binomial/Bernoulli).
    :param int samples_per_observation: posterior draws per observation and lap.
    :param int train_steps: optimisation steps per M-step.
    :param int batch_size: training batch size.
    :param float lr: peak learning rate of each M-step.
    :param net: the network for the first M-step (``None``: chosen from the event shape, as
        in :meth:`DiffusionPrior.fit`; ``"mlp"``, ``"unet"`` or a module).
    :param int num_steps: reverse steps of the E-step sampler.
    :param str sampler: the E-step sampler (``"ancestral"``, ``"ddim"`` or ``"heun"``).
    :param int e_batch_size: observations per E-step batch (bounds memory).
    :param int gaussian_rounds: EM rounds of the Gaussian initialisation (default 32 in
        closed form for linear-Gaussian sites, 4 Monte Carlo rounds otherwise).
    :param gaussian_skip: the network learns only the non-Gaussian part of the field, on
        top of the Wiener filter of each lap's samples, or of a ``K``-component Gaussian
        mixture refitted to them by EM for an integer ``K > 1`` (see
        :meth:`DiffusionPrior.fit <pyro_diffusion.DiffusionPrior.fit>`).
    :param dict prior_settings: sampling settings of the returned prior (``num_steps``,
        ``sampler``, ...).
    :param str checkpoint_dir: if given, the state after the initialisation and after every
        lap is written to ``checkpoint_dir/fit_prior.pt`` (weights, lap, history, settings,
        RNG state; loaded with ``weights_only=True``).
    :param bool resume: continue from the checkpoint in ``checkpoint_dir`` if there is one.
        A resumed run gives the same prior as an uninterrupted one with the same seed; one
        written with other settings (or data) is refused. ``laps`` may grow between runs.
    :param callable callback: ``callback(lap, prior, metrics)`` after each lap (and after
        the initialisation, with ``lap = 0``); ``metrics`` is a dict of floats.
    :param device: where to compute (default: the data's device).
    :param int seed: seed of the whole run (the global RNG is restored afterwards).
    :param bool progress: progress bars for laps and for the steps inside them.
    :returns: the learned prior, with ``prior.fit_history`` (one metrics dict per lap).
    """
    n_obs = _check_data(data)
    event_shape = tuple(int(s) for s in event_shape)
    if int(laps) < 0 or int(samples_per_observation) < 1 or int(e_batch_size) < 1:
        raise ValueError("laps must be >= 0, samples_per_observation and e_batch_size >= 1")
    train_steps = check_positive_int(train_steps, "train_steps")
    batch_size = check_positive_int(batch_size, "batch_size")
    device = torch.device(device) if device is not None else next(iter(data.values())).device
    settings = _Settings(
        event_shape=list(event_shape), guidance=repr(guidance) if not isinstance(
            guidance, str) else guidance,
        samples_per_observation=int(samples_per_observation), train_steps=int(train_steps),
        batch_size=int(batch_size), lr=float(lr), net=net if isinstance(net, str) or net is None
        else type(net).__name__, num_steps=int(num_steps), sampler=sampler,
        e_batch_size=int(e_batch_size), gaussian_rounds=gaussian_rounds,
        gaussian_skip=gaussian_skip, seed=int(seed),
        data=_fingerprint(data), start_prior=prior is not None,
        prior_settings=sorted((prior_settings or {}).items()))
    run = _EMRun(model, data, n_obs, event_shape, settings, guidance, net, prior_settings or {},
                 device, progress)
    path = None
    state = None
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME)
        if resume and os.path.exists(path):
            state = run.load(path)
    with forked(device):
        if state is None:
            manual_seed(_seed(seed, "init"), device)
            if prior is not None:
                if not isinstance(prior.denoiser, EDMDenoiser):
                    raise ValueError("a starting prior for fit_prior needs an EDMDenoiser "
                                     f"(got {type(prior.denoiser).__name__})")
                state = {"lap": 0, "denoiser": copy.deepcopy(prior.denoiser).to(device),
                         "gaussian": None, "history": []}
            else:
                state = run.initialise(callback)
            if path is not None:
                run.save(path, state)
        elif callback is None and progress:
            tqdm.write(f"fit_prior: resuming after lap {state['lap']} from {path}")
        bar = tqdm(total=int(laps), initial=min(state["lap"], int(laps)), desc="EM laps",
                   disable=not progress)
        try:
            while state["lap"] < int(laps):
                lap = state["lap"] + 1
                manual_seed(_seed(seed, "lap", lap), device)
                state, interrupted = run.lap(state, lap)
                if interrupted:
                    warnings.warn(
                        f"fit_prior interrupted in lap {lap}; returning its partly trained "
                        "prior" + (f"; the last complete lap is saved in {path}: rerun to "
                                   "resume" if path else ""), stacklevel=2)
                    return run.make_prior(state)
                if path is not None:
                    run.save(path, state)
                bar.update(1)
                if callback is not None:
                    callback(lap, run.make_prior(state), dict(state["history"][-1]))
        finally:
            bar.close()
    return run.make_prior(state)


class _EMRun:
    """The pieces of one ``fit_prior`` run (kept together so laps can be resumed)."""

    def __init__(self, model, data, n_obs, event_shape, settings, guidance, net,
                 prior_settings, device, progress):
        self.model = model
        self.data = data
        self.n_obs = n_obs
        self.event_shape = event_shape
        self.settings = settings
        self.guidance = guidance
        self.net = net
        self.prior_settings = dict(prior_settings)
        self.device = device
        self.progress = progress

    # ----- priors ---------------------------------------------------------------------------
    def make_prior(self, state):
        prior = DiffusionPrior(state["denoiser"], self.event_shape,
                               **{"progress": False, **self.prior_settings})
        prior.fit_history = [dict(h) for h in state["history"]]
        return prior

    def _gaussian_prior(self, mean, cov):
        d = mean.numel()
        cov = 0.5 * (cov + cov.T) + 1e-6 * cov.diagonal().mean().clamp(min=1e-12) * torch.eye(
            d, dtype=cov.dtype, device=cov.device)
        g = GaussianDenoiser(mean.reshape(self.event_shape), cov, self.event_shape)
        return DiffusionPrior(g, self.event_shape, num_steps=self.settings["num_steps"],
                              progress=False)

    # ----- E-step ---------------------------------------------------------------------------
    def posterior_samples(self, prior, lap, desc):
        """One posterior draw set per observation (``samples_per_observation`` each)."""
        reps = self.settings["samples_per_observation"]
        size = max(1, self.settings["e_batch_size"] // reps)
        out = []
        chunks = list(_chunks(self.data, self.n_obs, size, reps, self.device))
        for b, chunk in enumerate(tqdm(chunks, desc=desc, leave=False,
                                       disable=not self.progress or len(chunks) == 1)):
            num = next(iter(chunk.values())).shape[0]
            post = DiffusionPosterior(self.model, guidance=self.guidance, num_samples=num,
                                      batch_size=num, num_steps=self.settings["num_steps"],
                                      sampler=self.settings["sampler"], progress=False,
                                      seed=_seed(self.settings["seed"], "e-step", lap, b))
            post._num_particles = num  # the chunk's rows belong to the particles
            post.run(prior, **chunk)
            out.append(post.get_samples()[post.likelihood.site].detach())
        return torch.cat(out)

    # ----- initialisation -------------------------------------------------------------------
    def initialise(self, callback):
        """A Gaussian prior by EM with its exact denoiser; the state of lap 0."""
        start = time.perf_counter()
        d = math.prod(self.event_shape)
        dtype = torch.get_default_dtype()
        mean = torch.zeros(d, dtype=dtype, device=self.device)
        cov = torch.eye(d, dtype=dtype, device=self.device)
        probe = ModelLikelihood(self.model, (self._gaussian_prior(mean, cov),),
                                {k: v[:1].to(self.device) for k, v in self.data.items()},
                                num_particles=1)
        closed_form = observation_kinds(probe) <= set(GAUSSIAN)
        rounds = self.settings["gaussian_rounds"]
        rounds = (32 if closed_form else 4) if rounds is None else int(rounds)
        for r in tqdm(range(rounds), desc="Gaussian EM", leave=False,
                      disable=not self.progress):
            prior = self._gaussian_prior(mean, cov)
            if closed_form:
                means, cov_sum = [], 0.0
                for chunk in _chunks(self.data, self.n_obs, self.settings["e_batch_size"],
                                     1, self.device):
                    m, c = _linear_gaussian_moments(self.model, prior, chunk)
                    means.append(m)
                    cov_sum = cov_sum + c
                means = torch.cat(means)
                mean = means.mean(0)
                centred = means - mean
                cov = (cov_sum + centred.T @ centred) / self.n_obs
            else:
                x = self.posterior_samples(prior, 0, f"Gaussian EM {r + 1}/{rounds}")
                mean, cov = _gaussian_moments(x)
        # The first network's standardisation comes from the Gaussian; lap 1 refits it.
        samples = self._gaussian_prior(mean, cov).denoiser.sample_data(max(self.n_obs, 1024))
        skip = use_gaussian_skip(self.event_shape, self.settings["gaussian_skip"])
        network = default_network(self.event_shape, self.net, zero_output=skip).to(self.device)
        denoiser = EDMDenoiser.from_samples(network, samples, gaussian_skip=skip,
                                            progress=self.progress)
        denoiser = denoiser.to(self.device)
        metrics = {"lap": 0, "seconds": time.perf_counter() - start,
                   "gaussian_rounds": float(rounds), "closed_form": float(closed_form),
                   "mean_norm": float(mean.norm()), "cov_trace": float(cov.trace())}
        state = {"lap": 0, "denoiser": denoiser, "gaussian": {"mean": mean, "cov": cov},
                 "history": [metrics]}
        if callback is not None:
            callback(0, self._gaussian_prior(mean, cov), dict(metrics))
        return state

    # ----- one lap --------------------------------------------------------------------------
    def _current_prior(self, state):
        if state["lap"] == 0 and state["gaussian"] is not None:
            g = state["gaussian"]
            return self._gaussian_prior(g["mean"], g["cov"])
        return DiffusionPrior(state["denoiser"], self.event_shape,
                              num_steps=self.settings["num_steps"], progress=False)

    def lap(self, state, lap):
        start = time.perf_counter()
        x = self.posterior_samples(self._current_prior(state), lap, f"E-step {lap}")
        e_seconds = time.perf_counter() - start
        mean, cov = _gaussian_moments(x)
        denoiser = copy.deepcopy(state["denoiser"]).requires_grad_(True)
        # Refit the standardisation (and the Gaussian skip) to the new samples; the network
        # adapts in the M-step.
        if not x.reshape(x.shape[0], -1).var(0).sum() > 0:
            raise FloatingPointError(f"the E-step samples of lap {lap} collapsed to a point")
        denoiser.set_statistics(x, progress=self.progress)
        ema, history = train_denoiser(
            denoiser, x, steps=self.settings["train_steps"],
            batch_size=self.settings["batch_size"], lr=self.settings["lr"],
            progress=self.progress, desc=f"M-step {lap}")
        metrics = {"lap": lap, "seconds": time.perf_counter() - start, "e_seconds": e_seconds,
                   "m_seconds": history["seconds"],
                   "loss": _tail_mean(history["loss"]),
                   "mean_norm": float(mean.norm()), "cov_trace": float(cov.trace())}
        new = {"lap": lap, "denoiser": ema.to(self.device),
               "gaussian": {"mean": mean, "cov": cov}, "history": state["history"] + [metrics]}
        return new, history["interrupted"]

    # ----- checkpoints ----------------------------------------------------------------------
    def save(self, path, state):
        checkpoint = {
            "format": _FORMAT, "format_version": _FORMAT_VERSION, "package_version": __version__,
            "settings": dict(self.settings), "lap": state["lap"],
            "denoiser": module_to_dict(state["denoiser"]),
            "gaussian": None if state["gaussian"] is None else {
                k: v.detach().cpu() for k, v in state["gaussian"].items()},
            "history": [dict(h) for h in state["history"]],
            "rng": torch.get_rng_state(),
        }
        tmp = path + ".tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)

    def load(self, path):
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).splitlines() or ["empty or truncated file"])[0][:200]
            raise ValueError(f"{path} is not a readable fit_prior checkpoint "
                             f"({type(e).__name__}: {first}); delete it or pass "
                             "resume=False") from e
        if not isinstance(ck, dict) or ck.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a fit_prior checkpoint; delete it or pass "
                             "resume=False")
        if ck.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{path} was written in fit_prior checkpoint format "
                             f"{ck.get('format_version')} (pyro-diffusion "
                             f"{ck.get('package_version')}); this version reads format "
                             f"{_FORMAT_VERSION}. Delete it or pass resume=False")
        diff = self.settings.mismatch(ck.get("settings", {}))
        if diff:
            details = ", ".join(f"{k}: saved {ck['settings'].get(k)!r}, now "
                                f"{self.settings.get(k)!r}" for k in diff)
            raise ValueError(f"{path} was written by fit_prior with other settings ({details}); "
                             "use another checkpoint_dir or pass resume=False")
        gaussian = ck["gaussian"]
        if gaussian is not None:
            gaussian = {k: v.to(self.device) for k, v in gaussian.items()}
        return {"lap": int(ck["lap"]), "denoiser": module_from_dict(ck["denoiser"]).to(
            self.device).eval(), "gaussian": gaussian, "history": list(ck["history"])}
