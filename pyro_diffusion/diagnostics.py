r"""Diagnostics: NUTS reference runs, ArviZ data and side-by-side comparison of posteriors.

A diffusion posterior (:class:`~pyro_diffusion.DiffusionPosterior`, guided and approximate;
:class:`~pyro_diffusion.DiffusionLangevin`, annealed Langevin) or a twisted SMC run
(:class:`~pyro_diffusion.DiffusionSMC`) is best judged against a reference: for
a prior that has a tractable density (a Gaussian process, a CAR field) that is NUTS on the same
measurement model. This module

* runs that reference (:func:`run_nuts`, Pyro's NUTS with sensible defaults, seeded and timed),
* turns any of the three kinds of result into ArviZ data (:func:`to_inference_data`),
* tabulates, per variable and coordinate, how far each method is from the reference
  (:func:`compare_posteriors`), and plots the posterior means and intervals side by side
  (:func:`plot_comparison`).

The table's measures, for a method's draws :math:`x` and the reference's draws :math:`r` of one
coordinate:

* standardised mean difference :math:`\mathrm{smd} = (\bar x - \bar r) / s_r`, the bias in
  reference posterior standard deviations (0 is ideal; :math:`|\mathrm{smd}| < 0.1` is
  usually negligible against Monte Carlo error, above 0.5 the posterior means disagree);
* the standard deviation ratio :math:`s_x / s_r` (1 is ideal; below 1 the method is
  over-confident, a common failure of guided diffusion samplers);
* coverage: the fraction of the method's draws inside the reference's central (equal-tailed)
  ``hdi_prob`` interval (ideal: ``hdi_prob``; lower means the method puts mass where the
  reference does not);
* the Wasserstein-1 distance between the two sets of draws, in the variable's units;
* ArviZ's rank-normalised bulk effective sample size (Vehtari et al. 2021) and, with the
  method's wall time, effective draws per second.

References:

* Hoffman, Gelman (2014), *The No-U-Turn Sampler*, JMLR 15.
* Papaspiliopoulos, Roberts, Sköld (2007), *A General Framework for the Parametrization of
  Hierarchical Models*, Statistical Science 22 (whitened, i.e. non-centred, fields).
* Vehtari, Gelman, Simpson, Carpenter, Bürkner (2021), *Rank-Normalization, Folding, and
  Localization: An Improved R-hat for Assessing Convergence of MCMC*, Bayesian Analysis 16.
* Bonneel, Rabin, Peyré, Pfister (2015), *Sliced and Radon Wasserstein Barycenters of
  Measures* (the sliced distance of the summary rows).
"""

import contextlib
import inspect
import math
import numbers
import random
import time
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_median, init_to_sample

from .inference_data import _import_arviz, _to_numpy
from .inference_data import to_inference_data as _build_inference_data
from .likelihood import tensor_devices
from .metrics import _quantiles, sliced_wasserstein
from .posterior import BatchPosterior
from .seeding import seeded
from .smc import DiffusionSMC

__all__ = ["compare_posteriors", "plot_comparison", "run_nuts", "to_inference_data"]

#: Columns of :func:`compare_posteriors`, in order.
COLUMNS = (
    "method", "variable", "coord", "num_draws", "mean", "sd", "lower", "upper", "ref_mean",
    "ref_sd", "smd", "abs_smd", "max_abs_smd", "sd_ratio", "coverage", "distance", "ess_bulk",
    "wall_time", "ess_per_second",
)

_INIT_STRATEGIES = {"median": init_to_median, "sample": init_to_sample}


# --- NUTS -------------------------------------------------------------------------------------


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_prob(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a probability strictly between 0 and 1, got {value!r}")
    return float(value)


def _init_strategy(init_to):
    if init_to is None:
        return init_to_median
    if isinstance(init_to, str) and init_to in _INIT_STRATEGIES:
        return _INIT_STRATEGIES[init_to]
    if callable(init_to) and not isinstance(init_to, str):
        return init_to
    raise ValueError(
        f"init_to must be None, 'median', 'sample' or a Pyro init strategy (callable), "
        f"got {init_to!r}"
    )


@contextlib.contextmanager
def _seeded(seed, args=(), kwargs=None):
    """Seed torch, numpy and ``random`` with ``seed`` (``None``: leave them) and restore all
    three global generators afterwards. Torch's CPU generator is seeded, and the generator of
    every accelerator that holds a tensor among the model's ``args`` and ``kwargs`` (NUTS draws
    where the model's tensors are), and of the current GPU once CUDA is in use."""
    if seed is None:
        yield
        return
    devices = [d for d in tensor_devices((args, kwargs or {})) if d.type != "cpu"]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        current = torch.device("cuda", torch.cuda.current_device())
        if current not in devices:  # a tensor's device always carries its index
            devices.append(current)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with contextlib.ExitStack() as stack:
            for device in devices or [None]:
                stack.enter_context(seeded(seed, device))
            random.seed(seed)
            np.random.seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _build_mcmc(kernel, num_samples, warmup_steps, num_chains, progress, parallel):
    """A :class:`~pyro.infer.MCMC` whose chains run in worker processes (``spawn``) only when
    ``parallel``; otherwise one after the other in this process."""
    common = {"num_samples": num_samples, "warmup_steps": warmup_steps,
              "num_chains": num_chains, "disable_progbar": not progress}
    if num_chains == 1:
        return MCMC(kernel, **common)
    if parallel:
        return MCMC(kernel, mp_context="spawn", **common)
    # Pyro has no switch for sequential chains: it runs them in worker processes whenever
    # there are more CPUs than chains, and sequentially (with a warning) otherwise. Sequential
    # chains were asked for, so the warning is noise, and a multi-process sampler (which has
    # only started its logging thread so far) is swapped for Pyro's in-process one.
    from pyro.infer.mcmc import api as mcmc_api

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"num_chains=\d+ is more than available_cpu")
        mcmc = MCMC(kernel, **common)
    multi = getattr(mcmc_api, "_MultiSampler", None)
    unary = getattr(mcmc_api, "_UnarySampler", None)
    if multi is not None and unary is not None and isinstance(mcmc.sampler, multi):
        mcmc.sampler.terminate()
        mcmc.sampler = unary(kernel, num_samples, mcmc.warmup_steps, num_chains,
                             not progress)
    return mcmc


def _deterministic_samples(model, mcmc, args, kwargs):
    """The model's ``pyro.deterministic`` sites at every MCMC draw, ``{name: (chains, draws,
    ...)}``, by replaying the model on each draw (Pyro's MCMC does not record them)."""
    samples = mcmc.get_samples(group_by_chain=True)
    if not samples:
        return {}
    num_chains, num_draws = next(iter(samples.values())).shape[:2]
    flat = {k: v.reshape((num_chains * num_draws,) + v.shape[2:]) for k, v in samples.items()}
    values = {}
    try:
        with torch.no_grad():
            for i in range(num_chains * num_draws):
                draw = {k: v[i] for k, v in flat.items()}
                trace = poutine.trace(poutine.condition(model, data=draw)).get_trace(
                    *args, **kwargs)
                sites = [(name, site) for name, site in trace.nodes.items()
                         if site["type"] == "sample" and site["infer"].get("_deterministic")]
                if not sites:
                    return {}
                for name, site in sites:
                    values.setdefault(name, []).append(site["value"].detach())
    except Exception as err:  # never lose a finished NUTS run to a replay failure
        warnings.warn(f"run_nuts: could not replay the model to record its deterministic "
                      f"sites ({type(err).__name__}: {err}); mcmc.deterministic_samples is "
                      "empty")
        return {}
    return {name: torch.stack(vals).reshape((num_chains, num_draws) + vals[0].shape)
            for name, vals in values.items()}


def run_nuts(model, *args, num_samples=500, warmup_steps=500, num_chains=2, seed=0,
             progress=True, jit_compile=True, target_accept_prob=0.8, max_tree_depth=10,
             init_to=None, parallel=False, **kwargs):
    r"""Run Pyro's NUTS on ``model(*args, **kwargs)``: the reference posterior for comparisons.

    Uses :class:`pyro.infer.NUTS` (Hoffman and Gelman 2014) with a diagonal mass matrix adapted
    during warm-up (``adapt_mass_matrix=True, full_mass=False``) inside
    :class:`pyro.infer.MCMC`, and returns the ``MCMC`` object after ``mcmc.run(*args,
    **kwargs)``, with two attributes added:

    * ``mcmc.wall_time``: seconds spent in ``mcmc.run`` (warm-up and sampling, all chains);
    * ``mcmc.deterministic_samples``: the model's ``pyro.deterministic`` sites at every draw,
      ``{name: (num_chains, num_samples, ...)}``, found by replaying the model on each draw
      (Pyro's MCMC records only latent sample sites); :func:`to_inference_data` and
      :func:`compare_posteriors` include them, so a whitened field can be compared by name.

    **Write latent Gaussian fields whitened.** NUTS adapts only a diagonal mass matrix here, so
    a correlated prior such as ``f ~ MultivariateNormal(0, K)`` for a smooth GP gives a posterior
    with long, narrow ridges: tiny step sizes, trees at ``max_tree_depth``, low ESS, and, with
    hyperparameters, divergences in the funnel. Sample independent standard normals and
    transform them instead (the non-centred parametrisation of Papaspiliopoulos, Roberts and
    Sköld 2007); the prior is the same, the geometry NUTS sees is close to isotropic::

        def gp_model(x, exposure, y=None, lengthscale=0.3):
            K = torch.exp(-0.5 * (x[:, None] - x[None]) ** 2 / lengthscale**2)
            L = torch.linalg.cholesky(K + 1e-5 * torch.eye(len(x)))
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x)), 1.0).to_event(1))
            f = pyro.deterministic("f", L @ z)                 # f ~ N(0, K)
            pyro.sample("y", dist.Poisson(exposure * f.exp()).to_event(1), obs=y)

        mcmc = run_nuts(gp_model, x, exposure, y=counts, num_samples=1000, warmup_steps=1000)
        mcmc.get_samples()["z"]                    # (2000, d): the whitened latent
        mcmc.deterministic_samples["f"]            # (2, 1000, d): the field itself
        compare_posteriors({"nuts": mcmc, "diffusion": posterior}, "f")

    Seeding: with an integer ``seed`` the run seeds torch (the CPU generator, the generator of
    every GPU that holds a tensor among the model's arguments, and the current GPU's once CUDA
    is in use), ``numpy`` and ``random`` with it, as ``pyro.set_rng_seed(seed)``
    does, and restores all of them afterwards (:func:`~pyro_diffusion.seeding.seeded`), so the
    caller's global random state is untouched and the run is reproducible (parallel chain
    ``i`` is seeded ``seed + i`` by Pyro). ``seed=None`` uses and advances the global
    generators.

    :param callable model: a Pyro model whose latent sites all have tractable densities
        (a :class:`~pyro_diffusion.DiffusionPrior` site has none; use the package's samplers).
    :param args: positional arguments of the model.
    :param int num_samples: draws kept per chain.
    :param int warmup_steps: warm-up (step size and mass matrix adaptation) iterations per
        chain, discarded.
    :param int num_chains: independent chains; at least 2 for R-hat.
    :param int seed: seed of the run, or ``None`` (see above).
    :param bool progress: show Pyro's progress bar.
    :param bool jit_compile: trace the potential energy with the PyTorch JIT (faster for
        models with many small operations; the first iterations pay for compilation).
    :param float target_accept_prob: step-size adaptation target; raise it (0.9-0.99) when
        the run reports divergences.
    :param int max_tree_depth: largest tree depth (at most :math:`2^{10}` gradient steps per
        draw by default).
    :param init_to: initialisation of the chains: ``None`` or ``"median"``
        (:func:`~pyro.infer.autoguide.initialization.init_to_median`), ``"sample"``
        (:func:`~pyro.infer.autoguide.initialization.init_to_sample`), or any Pyro init
        strategy callable.
    :param bool parallel: run the chains in worker processes (``mp_context="spawn"``, which
        needs a picklable model defined at module level) instead of one after the other in
        this process (the default, which works everywhere, notebooks included).
    :param kwargs: keyword arguments of the model.
    :returns: the :class:`pyro.infer.MCMC` object, run, with ``wall_time`` and
        ``deterministic_samples``.
    :raises ValueError: if a count is not a positive integer (``warmup_steps`` may be 0),
        ``target_accept_prob`` is not in (0, 1) or ``init_to`` is not recognised.
    """
    num_samples = _check_int(num_samples, "num_samples", 1)
    warmup_steps = _check_int(warmup_steps, "warmup_steps", 0)
    num_chains = _check_int(num_chains, "num_chains", 1)
    max_tree_depth = _check_int(max_tree_depth, "max_tree_depth", 1)
    target_accept_prob = _check_prob(target_accept_prob, "target_accept_prob")
    if seed is not None:
        seed = _check_int(seed, "seed", 0)
    kernel = NUTS(model, jit_compile=jit_compile, adapt_mass_matrix=True, full_mass=False,
                  ignore_jit_warnings=True, target_accept_prob=target_accept_prob,
                  max_tree_depth=max_tree_depth, init_strategy=_init_strategy(init_to))
    with _seeded(seed, args, kwargs):
        mcmc = _build_mcmc(kernel, num_samples, warmup_steps, num_chains, progress, parallel)
        start = time.perf_counter()
        mcmc.run(*args, **kwargs)
        mcmc.wall_time = time.perf_counter() - start
        mcmc.deterministic_samples = _deterministic_samples(model, mcmc, args, kwargs)
    return mcmc


# --- samples of the supported kinds -----------------------------------------------------------


def _grouped_samples(x, label, allow_dict):
    """``{site: (num_chains, num_draws, *shape)}`` of a result of one of the supported kinds."""
    if isinstance(x, BatchPosterior):  # DiffusionPosterior, DiffusionLangevin
        return x.get_samples(group_by_chain=True)
    if isinstance(x, DiffusionSMC):
        # One chain of equally weighted draws, resampled from the final particles.
        return {k: v.unsqueeze(0) for k, v in x.get_samples().items()}
    if isinstance(x, MCMC):
        if getattr(x, "_samples", None) is None:
            raise RuntimeError(f"{label}: the MCMC has not been run; call .run(...) first")
        samples = dict(x.get_samples(group_by_chain=True))
        for name, value in (getattr(x, "deterministic_samples", None) or {}).items():
            samples.setdefault(name, value)
        return samples
    if allow_dict and isinstance(x, Mapping):
        out = {}
        for name, value in x.items():
            shape = tuple(np.shape(value))
            if len(shape) < 2:
                raise ValueError(
                    f"posteriors[{label!r}][{name!r}] has shape {shape}; expected "
                    "(num_chains, num_draws, *shape)"
                )
            out[name] = value
        return out
    if allow_dict:
        raise TypeError(
            f"posteriors[{label!r}] must be a DiffusionPosterior, a DiffusionLangevin, a "
            "DiffusionSMC, a pyro.infer.MCMC (run) or a dict of (num_chains, num_draws, *shape) "
            "draws, got "
            f"{type(x).__name__}"
        )
    hint = ""
    if isinstance(x, Mapping):
        hint = ("; for a dict of (num_chains, num_draws, *shape) draws use "
                "pyro_diffusion.inference_data.to_inference_data")
    raise TypeError(
        "x must be a DiffusionPosterior, a DiffusionLangevin, a DiffusionSMC or a "
        "pyro.infer.MCMC (run), got "
        f"{type(x).__name__}{hint}"
    )


def _as_names(var_names):
    if isinstance(var_names, str):
        return [var_names]
    names = list(var_names)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"var_names must be a site name or a non-empty list of them, "
                         f"got {var_names!r}")
    return names


def _select(samples, var_names, label):
    if var_names is None:
        return dict(samples)
    out = {}
    for name in _as_names(var_names):
        if name not in samples:
            raise ValueError(f"variable {name!r} is not in posterior {label!r}, which has "
                             f"{sorted(samples)}")
        out[name] = samples[name]
    return out


def to_inference_data(x, *, var_names=None, dims=None, coords=None):
    """ArviZ inference data of a diffusion posterior, an SMC run or a Pyro MCMC run.

    * :class:`~pyro_diffusion.DiffusionPosterior` and :class:`~pyro_diffusion.DiffusionLangevin`:
      their independent batches are the chains
      (``get_samples(group_by_chain=True)``);
    * :class:`~pyro_diffusion.DiffusionSMC`: one chain of ``num_particles`` equally weighted
      draws resampled from the final particles (draws repeat particles, so judge its ESS on
      ``smc.ess`` rather than on ArviZ's, which treats the draws as independent);
    * :class:`pyro.infer.MCMC`: its chains (``get_samples(group_by_chain=True)``), plus the
      deterministic sites recorded by :func:`run_nuts`.

    Built by :func:`pyro_diffusion.inference_data.to_inference_data`, so it works with the
    installed ArviZ (0.x or 1.x): ``az.summary``, ``az.ess``, ``az.plot_forest`` and so on.

    Example::

        idata = to_inference_data(mcmc, var_names=["f"], dims={"f": ["area"]},
                                  coords={"area": area_names})
        az.summary(idata)

    :param x: the result, after its ``run``.
    :param var_names: a site name or list of them (default: all sites).
    :param dict dims: ``site -> list of dimension names`` after ``chain`` and ``draw``; entries
        for unselected sites are dropped.
    :param dict coords: ``dimension name -> coordinate values``.
    :returns: an ``arviz.InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ 1.x) with a
        ``posterior`` group.
    :raises TypeError: if ``x`` is of another kind (plain dicts of draws go to
        :func:`pyro_diffusion.inference_data.to_inference_data`).
    :raises ValueError: if a name in ``var_names`` is not a site of ``x``.
    :raises RuntimeError: if ``x`` has not been run.
    """
    samples = _select(_grouped_samples(x, type(x).__name__, allow_dict=False), var_names,
                      type(x).__name__)
    if dims is not None:
        dims = {name: d for name, d in dims.items() if name in samples}
    return _build_inference_data(samples, dims=dims, coords=coords)


# --- comparison -------------------------------------------------------------------------------


def _wall_time(x):
    value = getattr(x, "wall_time", None)
    return math.nan if value is None else float(value)


def _collect(posteriors, var_names, reference):
    """Labels (reference first), draws ``{label: {var: (chains, draws, *shape) float64}}`` and
    wall times, after checking labels, variables and shapes."""
    if not isinstance(posteriors, Mapping):
        raise TypeError("posteriors must be a dict label -> DiffusionPosterior, DiffusionSMC, "
                        f"MCMC or dict of draws, got {type(posteriors).__name__}")
    if not posteriors:
        raise ValueError("posteriors is empty; pass at least the reference")
    if reference not in posteriors:
        raise ValueError(f"reference {reference!r} is not among the posteriors "
                         f"{list(posteriors)}")
    names = _as_names(var_names)
    labels = [reference] + [label for label in posteriors if label != reference]
    draws, wall = {}, {}
    for label in labels:
        samples = _select(_grouped_samples(posteriors[label], label, allow_dict=True), names,
                          label)
        draws[label] = {name: np.asarray(_to_numpy(v), dtype=np.float64)
                        for name, v in samples.items()}
        for name, value in draws[label].items():
            if value.shape[0] * value.shape[1] == 0:
                raise ValueError(f"posteriors[{label!r}][{name!r}] holds no draws "
                                 f"(shape {value.shape})")
            if not np.isfinite(value).all():
                bad = int((~np.isfinite(value)).sum())
                raise ValueError(f"posteriors[{label!r}][{name!r}] holds {bad} NaN or infinite "
                                 f"values of {value.size}")
        wall[label] = _wall_time(posteriors[label])
    for name in names:
        ref_shape = draws[reference][name].shape[2:]
        for label in labels[1:]:
            shape = draws[label][name].shape[2:]
            if shape != ref_shape:
                raise ValueError(
                    f"variable {name!r} has shape {shape} in {label!r} but {ref_shape} in the "
                    f"reference {reference!r}"
                )
    return labels, names, draws, wall


def _coord_labels(shape):
    """ArviZ-style labels of a variable's coordinates: ``""`` for a scalar, ``"3"``, ``"1, 2"``."""
    if not shape:
        return [""]
    return [", ".join(str(i) for i in idx) for idx in np.ndindex(*shape)]


def _ess_bulk(x):
    """Bulk ESS of each coordinate of ``x`` ``(chains, draws, k)``, by the installed ArviZ."""
    az = _import_arviz()
    try:
        params = inspect.signature(az.ess).parameters
    except (TypeError, ValueError):
        params = {}
    k = x.shape[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if "chain_axis" in params and "draw_axis" in params:
            # ArviZ 1.x (arviz_stats): array input with the sample axes named explicitly (their
            # defaults changed between releases).
            out = az.ess(x, method="bulk", chain_axis=0, draw_axis=1)
            return np.asarray(out, dtype=np.float64).reshape(k)
        # ArviZ 0.x: array input must be one (chain, draw) variable.
        return np.array([float(az.ess(x[:, :, j], method="bulk")) for j in range(k)])


def _as_torch(array, order="C"):
    """A tensor sharing ``array``'s memory where it can; read-only draws (NumPyro's, ArviZ's)
    are copied, as torch cannot share memory it may not write."""
    return torch.from_numpy(np.require(array, requirements=[order, "W"]))


def _wasserstein1(x, y, max_elements=2**22):
    """1-D Wasserstein-1 distance between the columns of ``x`` ``(n, k)`` and ``y`` ``(m, k)``:
    the mean absolute difference of their empirical quantile functions (exact for ``n == m``,
    interpolated at ``max(n, m)`` mid-points otherwise), a block of columns at a time so that
    memory stays near ``max_elements`` numbers whatever the number of coordinates."""
    num = max(x.shape[0], y.shape[0])
    step = max(1, max_elements // num)
    out = []
    for j in range(0, x.shape[1], step):
        # Column-major blocks: the sort along draws then runs over contiguous memory.
        qx = _quantiles(_as_torch(x[:, j:j + step], "F"), num)
        qy = _quantiles(_as_torch(y[:, j:j + step], "F"), num)
        out.append((qx - qy).abs().mean(0).numpy())
    return np.concatenate(out)


def _summarise(x, hdi_prob):
    """Mean, sd and central interval of each column of ``x`` ``(n, k)``."""
    alpha = (1.0 - hdi_prob) / 2.0
    sd = x.std(0, ddof=1) if x.shape[0] > 1 else np.full(x.shape[1], math.nan)
    lower, upper = np.quantile(x, [alpha, 1.0 - alpha], axis=0)
    return x.mean(0), sd, lower, upper


def _compare_variable(label, name, x, r, hdi_prob, wall, num_projections, seed, is_reference):
    shape = x.shape[2:]
    k = int(np.prod(shape, dtype=np.int64))
    chains, draws = x.shape[:2]
    xf, rf = x.reshape(-1, k), r.reshape(-1, k)
    mean, sd, lower, upper = _summarise(xf, hdi_prob)
    ref_mean, ref_sd, ref_lower, ref_upper = _summarise(rf, hdi_prob)
    with np.errstate(divide="ignore", invalid="ignore"):
        smd = (mean - ref_mean) / ref_sd
        sd_ratio = sd / ref_sd
    coverage = ((xf >= ref_lower) & (xf <= ref_upper)).mean(0)
    # The reference against itself: distances are 0 by definition (sorting is the cost).
    distance = np.zeros(k) if is_reference else _wasserstein1(xf, rf)
    ess = _ess_bulk(x.reshape(chains, draws, k))
    with np.errstate(divide="ignore", invalid="ignore"):
        ess_per_second = ess / wall
    rows = []
    for j, coord in enumerate(_coord_labels(shape)):
        rows.append({
            "method": label, "variable": name, "coord": coord, "num_draws": chains * draws,
            "mean": mean[j], "sd": sd[j], "lower": lower[j], "upper": upper[j],
            "ref_mean": ref_mean[j], "ref_sd": ref_sd[j], "smd": smd[j],
            "abs_smd": abs(smd[j]), "max_abs_smd": abs(smd[j]), "sd_ratio": sd_ratio[j],
            "coverage": coverage[j], "distance": distance[j], "ess_bulk": ess[j],
            "wall_time": wall, "ess_per_second": ess_per_second[j],
        })
    if is_reference or k == 1:
        sliced = float(distance[0])  # every projection of a scalar is +-1: the 1-D distance
    else:
        sliced = sliced_wasserstein(_as_torch(xf), _as_torch(rf),
                                    num_projections=num_projections, p=1, seed=seed)
    abs_smd = np.abs(smd)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        min_ess = float(np.nanmin(ess)) if np.isfinite(ess).any() else math.nan
        rows.append({
            "method": label, "variable": name, "coord": "all", "num_draws": chains * draws,
            "mean": math.nan, "sd": math.nan, "lower": math.nan, "upper": math.nan,
            "ref_mean": math.nan, "ref_sd": math.nan, "smd": math.nan,
            "abs_smd": float(np.mean(abs_smd)), "max_abs_smd": float(np.max(abs_smd)),
            "sd_ratio": float(np.mean(sd_ratio)), "coverage": float(np.mean(coverage)),
            "distance": sliced, "ess_bulk": min_ess,
            "wall_time": wall, "ess_per_second": float(np.float64(min_ess) / wall),
        })
    return rows


def compare_posteriors(posteriors, var_names, reference="nuts", *, hdi_prob=0.9,
                       num_projections=256, seed=0):
    r"""Compare posteriors variable by variable and coordinate by coordinate against a reference.

    Example::

        mcmc = run_nuts(gp_model, x, exposure, y=counts)           # the reference
        table = compare_posteriors({"nuts": mcmc, "mmps": posterior, "smc": smc}, "f")
        table[table.coord == "all"][["method", "abs_smd", "max_abs_smd", "sd_ratio",
                                     "coverage", "distance", "ess_per_second"]]

    One row per (method, variable, coordinate), then a summary row per (method, variable) with
    ``coord == "all"``; the reference's rows come first (``smd`` 0, ``sd_ratio`` 1,
    ``distance`` 0, ``coverage`` about ``hdi_prob``), then the other methods in the order
    given, variables in the order of ``var_names``. Coordinates are labelled as in ArviZ
    (``"0"``, ``"1, 2"``; ``""`` for a scalar). Draws of all chains are pooled for the
    statistics; chains matter only to the ESS. Columns:

    * ``method``, ``variable``, ``coord``, ``num_draws`` (chains times draws);
    * ``mean``, ``sd``, ``lower``, ``upper``: this method's posterior mean, standard
      deviation and central (equal-tailed) ``hdi_prob`` interval;
    * ``ref_mean``, ``ref_sd``: the reference's mean and standard deviation;
    * ``smd``: standardised mean difference ``(mean - ref_mean) / ref_sd``; ``abs_smd`` its
      absolute value; ``max_abs_smd`` the same on coordinate rows;
    * ``sd_ratio``: ``sd / ref_sd`` (below 1: over-confident);
    * ``coverage``: fraction of this method's draws inside the reference's central
      ``hdi_prob`` interval (ideal value ``hdi_prob``);
    * ``distance``: Wasserstein-1 distance between this method's and the reference's draws of
      the coordinate, from their sorted draws (quantile functions), in the variable's units;
    * ``ess_bulk``: ArviZ's bulk effective sample size (Vehtari et al. 2021); for a
      :class:`~pyro_diffusion.DiffusionSMC` (one chain of resampled draws) it treats the draws
      as independent and overstates the information, which ``smc.ess`` bounds;
    * ``wall_time``: the result's ``wall_time`` attribute in seconds (NaN for a dict of draws,
      or an ``MCMC`` not run by :func:`run_nuts`), and ``ess_per_second``.

    The ``"all"`` row aggregates over the variable's coordinates: ``abs_smd`` is the mean and
    ``max_abs_smd`` the maximum of ``|smd|``, ``sd_ratio`` and ``coverage`` are means,
    ``distance`` is the sliced Wasserstein-1 distance of the whole variable
    (:func:`~pyro_diffusion.sliced_wasserstein`, ``p=1``; the exact 1-D distance for a scalar),
    ``ess_bulk`` the minimum over coordinates and ``ess_per_second`` that minimum over the wall
    time; ``mean``, ``sd``, ``lower``, ``upper``, ``ref_mean``, ``ref_sd`` and ``smd`` are NaN.

    :param dict posteriors: ``label -> result``: a :class:`~pyro_diffusion.DiffusionPosterior`,
        a :class:`~pyro_diffusion.DiffusionLangevin`,
        a :class:`~pyro_diffusion.DiffusionSMC`, a :class:`pyro.infer.MCMC` (see
        :func:`to_inference_data` for how each becomes chains) or a dict
        ``{site: (num_chains, num_draws, *shape)}`` of tensors or arrays.
    :param var_names: a site name or a list of them; each must be in every posterior with the
        same shape.
    :param str reference: label of the reference posterior (e.g. the NUTS run).
    :param float hdi_prob: probability of the central intervals (equal-tailed, not highest
        density, so that coverage has a closed form for any shape of posterior).
    :param int num_projections: random directions of the sliced distance.
    :param int seed: seed of those directions, so tables are comparable across calls.
    :returns: a :class:`pandas.DataFrame` with the columns above.
    :raises ValueError: if ``reference`` is not a label of ``posteriors``, a variable is
        missing from a posterior (both named), a variable's shape differs between methods,
        ``hdi_prob`` is not in (0, 1) or ``num_projections`` is not positive.
    :raises TypeError: if a posterior is of an unsupported kind.
    """
    import pandas as pd

    hdi_prob = _check_prob(hdi_prob, "hdi_prob")
    num_projections = _check_int(num_projections, "num_projections", 1)
    labels, names, draws, wall = _collect(posteriors, var_names, reference)
    rows = []
    for label in labels:
        for name in names:
            rows.extend(_compare_variable(label, name, draws[label][name],
                                          draws[reference][name], hdi_prob, wall[label],
                                          num_projections, seed, label == reference))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def plot_comparison(posteriors, var_name, reference="nuts", *, hdi_prob=0.9, max_coords=50,
                    ax=None):
    """Plot per-coordinate posterior means and central intervals of several methods.

    Left: a forest plot, one row per coordinate (flattened, ArviZ-style labels), one marker
    (mean) and line (central ``hdi_prob`` interval) per method, offset vertically, the reference
    first; at most ``max_coords`` evenly spaced coordinates are shown. Right: each method's
    means against the reference's means for all coordinates, with the method's intervals as
    vertical lines and the identity line: points on the line agree in location, error bars that
    are short relative to the reference's spread mean over-confidence.

    :param dict posteriors: as for :func:`compare_posteriors`.
    :param str var_name: the variable to plot (any shape; coordinates are flattened).
    :param str reference: label of the reference posterior.
    :param float hdi_prob: probability of the central (equal-tailed) intervals.
    :param int max_coords: most coordinates in the forest panel.
    :param ax: ``None`` (a new figure) or a pair of matplotlib Axes to draw on.
    :returns: the :class:`matplotlib.figure.Figure`.
    :raises ValueError: as :func:`compare_posteriors`, and if ``ax`` is not a pair of Axes or
        ``max_coords`` is not a positive integer.
    """
    import matplotlib.pyplot as plt

    hdi_prob = _check_prob(hdi_prob, "hdi_prob")
    max_coords = _check_int(max_coords, "max_coords", 1)
    if not isinstance(var_name, str):
        raise ValueError(f"var_name must be one site name, got {var_name!r}")
    labels, _, draws, _ = _collect(posteriors, [var_name], reference)
    shape = draws[reference][var_name].shape[2:]
    k = int(np.prod(shape, dtype=np.int64))
    coord_labels = _coord_labels(shape)
    stats = {label: _summarise(draws[label][var_name].reshape(-1, k), hdi_prob)
             for label in labels}
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}

    if ax is None:
        shown = min(k, max_coords)
        fig, axes = plt.subplots(1, 2, figsize=(11, min(3 + 0.22 * shown, 14)))
    else:
        axes = list(ax) if not hasattr(ax, "plot") else [ax]
        if len(axes) != 2 or not all(hasattr(a, "vlines") for a in axes):
            raise ValueError(f"ax must be None or a pair of matplotlib Axes, got {ax!r}")
        fig = axes[0].figure
    forest, scatter = axes

    idx = np.unique(np.linspace(0, k - 1, min(k, max_coords)).round().astype(int))
    pos = np.arange(len(idx), dtype=float)
    width = 0.7 / len(labels)
    for i, label in enumerate(labels):
        mean, _, lower, upper = stats[label]
        y = pos + (i - (len(labels) - 1) / 2) * width
        forest.hlines(y, lower[idx], upper[idx], color=colors[label], lw=1.2)
        forest.plot(mean[idx], y, "o", ms=3.5, color=colors[label],
                    label=f"{label} (reference)" if label == reference else label)
    forest.set_yticks(pos)
    forest.set_yticklabels([f"{var_name}[{coord_labels[j]}]" if coord_labels[j] else var_name
                            for j in idx], fontsize=8)
    forest.set_ylim(pos[-1] + 0.6, pos[0] - 0.6)  # first coordinate on top
    forest.set_xlabel(f"posterior mean and central {hdi_prob:.0%} interval")
    title = f"{var_name}: {len(idx)} of {k} coordinates" if len(idx) < k else var_name
    forest.set_title(title)
    forest.legend(fontsize=8, loc="best")

    ref_mean = stats[reference][0]
    others = labels[1:] or labels
    lo, hi = ref_mean.min(), ref_mean.max()
    for label in others:
        mean, _, lower, upper = stats[label]
        # Intervals as lines, not error bars: the mean of a skewed posterior (a relative
        # risk) can lie outside its own central interval.
        scatter.vlines(ref_mean, lower, upper, lw=0.8, alpha=0.8, color=colors[label])
        scatter.plot(ref_mean, mean, "o", ms=3.5, alpha=0.8, color=colors[label], label=label)
        lo, hi = min(lo, lower.min()), max(hi, upper.max())
    scatter.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
    scatter.set_xlabel(f"reference ({reference}) posterior mean")
    scatter.set_ylabel(f"posterior mean, central {hdi_prob:.0%} interval")
    scatter.set_title(f"{var_name}: means against the reference")
    scatter.legend(fontsize=8, loc="best")
    if ax is None:
        fig.tight_layout()
    return fig
