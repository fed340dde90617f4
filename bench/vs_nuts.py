"""Time to an accurate posterior: a diffusion prior against NUTS on latent Gaussian-process fields.

Problem: a Gaussian-process field ``f`` on a grid of ``d`` points in [0, 1] (or a ``G x G`` grid
in [0, 1]^2 with ``--grid2d G``), RBF kernel, in two forms:

- ``fixed``: lengthscale 0.1, variance 1, mean 0;
- ``hyper``: lengthscale ~ LogNormal(log 0.1, 0.3), variance ~ LogNormal(0, 0.3). The diffusion
  prior absorbs the hyperpriors (it is trained on draws that integrate them); NUTS samples the
  two hyperparameters and factorises the ``d x d`` kernel matrix at every gradient.

One field is drawn per (grid, form) and observed through two likelihoods (seeded):
``poisson``, ``y_i ~ Poisson(5 exp(f_i))``, and ``binomial``, ``y_i ~ Binomial(20, logits=f_i)``.

Methods per setting:

- ``diffusion``: :class:`~pyro_diffusion.DiffusionPosterior` with ``guidance="auto"`` (the
  evidence trick for counts), ``--num-samples`` draws in ``--batches`` independent batches
  (ArviZ chains), ancestral sampler, ``--steps`` reverse steps. The prior is
  ``DiffusionPrior.fit(sample_gp(...), steps=--train-steps, seed=0)`` on ``--num-train`` draws,
  one per (grid, form), cached under ``--cache``; its training time is reported apart (it is
  paid once per prior, not per data set), with a check of its covariance against fresh GP draws.
- ``diffusion langevin``: :class:`~pyro_diffusion.DiffusionLangevin` with the same prior and
  the model's exact likelihood, ``--langevin-steps`` steps plus ``--denoise-steps`` denoising
  steps (its defaults), default blur, ``--preconditioner`` (auto: Gaussian when the prior has a
  Gaussian part); with ``--exact-prior`` also with the exact GP denoiser in place of the learned
  one (with hyperpriors: the exact scale mixture, up to a 16 x 16 Gauss-Hermite grid of
  lengthscales and variances), which isolates the sampler's own error from the learned prior's;
  with ``--binned-prior K`` also with that grid pooled into ``K`` bins of lengthscale nodes, and
  into ``K`` bins of variance nodes (hand-made ``K``-component mixture priors).

The diffusion rows run on the CPU, or with ``--devices cpu cuda`` on each device named (rows
off the CPU carry its name, e.g. ``diffusion langevin cuda 20``; the GPU's wall time is taken
after ``torch.cuda.synchronize``); NUTS always runs on the CPU.

The priors are trained with the Gaussian skip (``--no-gaussian-skip``: without, as before
it existed; ``--skip-components K``: a skip that is the denoiser of a ``K``-component Gaussian
mixture fitted to the draws by EM, for the ``hyper`` form) and the default network
(``--width W``: an MLP of width ``W``, on 2-D grids too).
- ``Pyro NUTS``: :func:`pyro_diffusion.diagnostics.run_nuts` on the whitened model
  ``f = L z``, ``z ~ N(0, I)``, ``L`` the Cholesky factor of the kernel matrix plus ``1e-6``
  times the variance on its diagonal (the jitter of ``sample_gp``), in float64; with
  hyperpriors ``L`` is recomputed from the sampled lengthscale and variance. ``--nuts-chains``
  chains of ``--nuts-warmup`` + ``--nuts-draws``, run one after the other.
- ``NumPyro NUTS``: the same model in NumPyro, only when ``numpyro`` and ``jax`` import
  (otherwise a note says it was skipped).

The reference is a longer Pyro NUTS run on the same data (``--ref-chains`` x ``--ref-warmup`` +
``--ref-draws``; ``--ref-backend numpyro``: NumPyro's NUTS on the same model, for hyperpriors at
``d >= 256`` where a long Pyro run takes hours, with ``--ref-parallel`` its chains at once,
one per core), cached under ``--cache``. Columns, per
coordinate of ``f`` and then summarised:

- abs smd mean / max: ``|mean - ref mean| / ref sd``, mean and largest over coordinates;
- sd ratio: ``sd / ref sd``, mean over coordinates (min-max);
- cov90 ref in m: the fraction of the reference draws inside the method's central 90 % interval,
  mean over coordinates (ideal 0.90; below it the method is over-confident or shifted);
- cov90 m in ref: the fraction of the method's draws inside the reference's central 90 % interval
  (``compare_posteriors``'s ``coverage``);
- min ESS: ArviZ bulk ESS, smallest over the coordinates of ``f``; ESS/s: that over the wall
  time (sampling only for the diffusion posterior, warm-up and JIT included for NUTS);
  x Pyro: the ratio to Pyro NUTS's ESS/s in the same setting.

"goal" marks the diffusion rows with d >= 256 against the issue's target: mean abs smd <= 0.1,
mean sd ratio within 10 % of 1, mean cov90 ref in m in [0.85, 0.95], and ESS/s >= 100 x Pyro's
and (when NumPyro ran) >= 10 x NumPyro's ("x NumPyro": the ratio to NumPyro's ESS/s).

Cost on a CPU: Pyro NUTS with hyperpriors factorises the kernel matrix at every gradient; at
d = 256 one chain of 150 + 150 iterations took 558 s on a shared core, so the default
configuration (whose reference is 4 x (1000 + 1000)) runs for many hours there. The evidence
trick computes its variance exactly up to 64 coordinates (one Jacobian product per
coordinate and step), which makes d = 64 slower per draw than d = 256 (8 random probes).
Priors and references are cached, so a configuration can be run in parts.

Usage::

    python bench/vs_nuts.py --quick --threads 1
    python bench/vs_nuts.py --threads 1 --out vs_nuts.md
"""

import argparse
import copy
import itertools
import json
import math
import os
import platform
import shlex
import sys
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from _common import binned_mixture, derived_seed, gp_scale_mixture, markdown_table
from pyro.ops.stats import split_gelman_rubin
from torch.distributions import LogNormal

import pyro_diffusion
from pyro_diffusion import (
    DiffusionLangevin,
    DiffusionPosterior,
    DiffusionPrior,
    GaussianDenoiser,
    default_network,
)
from pyro_diffusion.datasets import sample_gp
from pyro_diffusion.diagnostics import compare_posteriors, run_nuts

EXPOSURE = 5.0
TRIALS = 20
LENGTHSCALE = 0.1
LENGTHSCALE_LOG_SD = 0.3
VARIANCE_LOG_SD = 0.3
JITTER = 1e-6
HDI = 0.9
#: Gauss-Hermite nodes per hyperparameter of the ``hyper`` form's exact scale mixture.
NODES = 16
FORMS = ("fixed", "hyper")
LIKELIHOODS = ("poisson", "binomial")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="*", default=[64, 256],
                        help="1-D grid sizes (64 256)")
    parser.add_argument("--grid2d", type=int, nargs="*", default=[],
                        help="also G x G grids on [0, 1]^2, e.g. --grid2d 16 (none)")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    parser.add_argument("--likelihoods", nargs="+", choices=LIKELIHOODS,
                        default=list(LIKELIHOODS))
    parser.add_argument("--num-train", type=int, default=20000, help="GP draws to train on")
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--num-samples", type=int, default=2000, help="diffusion draws")
    parser.add_argument("--batches", type=int, default=4,
                        help="independent batches (= chains) of the diffusion draws")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200],
                        help="reverse steps of the diffusion posterior (100 200)")
    parser.add_argument("--langevin-steps", type=int, nargs="*", default=[None],
                        help="DiffusionLangevin steps (default: its own, 20 with the Gaussian "
                             "preconditioner, 40 for priors that declare a mixture, such as "
                             "the hyper ones with --skip-components > 1; none: skip it)")
    parser.add_argument("--step-size", type=float, nargs="+", default=[0.5],
                        help="DiffusionLangevin's step_size (0.5, its default); several give a "
                             "row for each with each --langevin-steps, labelled by the step")
    parser.add_argument("--rho-min", type=float, nargs="+", default=[None],
                        help="DiffusionLangevin's rho_min (default: its own, 0.05 data_std with "
                             "the Gaussian preconditioner, 0.1 for priors that declare a "
                             "mixture); several give a row for each, labelled by it")
    parser.add_argument("--repeats", type=int, default=1,
                        help="DiffusionLangevin runs per setting with different seeds (1); "
                             "several give a row for each, labelled by the repeat, the first "
                             "with the seed of a single run: the sampler's own spread")
    parser.add_argument("--denoise-steps", type=int, default=None,
                        help="DiffusionLangevin's final denoising steps (default: its own, 8 "
                             "with the Gaussian preconditioner, 32 with the diagonal one)")
    parser.add_argument("--preconditioner", choices=["auto", "gaussian", "diagonal"],
                        default="auto", help="DiffusionLangevin's preconditioner (auto)")
    parser.add_argument("--gaussian-skip", action=argparse.BooleanOptionalAction,
                        default=True, help="train the priors with the Gaussian skip (default "
                                           "on, as DiffusionPrior.fit for fields)")
    parser.add_argument("--skip-components", type=int, default=1,
                        help="Gaussian components of the skip: 1 the Wiener filter, K > 1 a "
                             "K-component mixture fitted by EM (gaussian_skip=K) (1)")
    parser.add_argument("--width", type=int, default=None,
                        help="MLP width of the learned priors (default: default_network's; "
                             "2-D grids then use an MLP instead of the U-Net)")
    parser.add_argument("--binned-prior", type=int, nargs="*", default=[],
                        help="with hyperpriors, also run DiffusionLangevin with the exact scale "
                             "mixture's 16 x 16 nodes pooled into K bins of adjacent "
                             "lengthscale nodes (every variance pooled), and into K bins of "
                             "variance nodes (every lengthscale pooled), for each K given "
                             "(bench/mixture_skip.py --oracle): which hyperparameter a "
                             "K-component mixture prior must resolve")
    parser.add_argument("--exact-prior", action="store_true",
                        help="also run DiffusionLangevin with the exact GP denoiser (with "
                             "hyperpriors: the scale mixture over a Gauss-Hermite grid of "
                             "lengthscales and variances), which separates the sampler's error "
                             "from the learned prior's")
    parser.add_argument("--skip-guided", action="store_true",
                        help="skip the guided DiffusionPosterior rows")
    parser.add_argument("--skip-nuts", action="store_true",
                        help="skip the Pyro and NumPyro NUTS rows (the reference still runs or "
                             "loads): accuracy only, for side runs of the diffusion samplers; "
                             "the speed columns and the goal's speed checks are then empty")
    parser.add_argument("--nuts-chains", type=int, default=2)
    parser.add_argument("--nuts-warmup", type=int, default=500)
    parser.add_argument("--nuts-draws", type=int, default=500)
    parser.add_argument("--ref-chains", type=int, default=4)
    parser.add_argument("--ref-backend", choices=["pyro", "numpyro"], default="pyro",
                        help="the reference's NUTS (numpyro: the same model, for settings where "
                             "a long Pyro run takes hours, e.g. hyperpriors at d >= 256)")
    parser.add_argument("--ref-parallel", action="store_true",
                        help="with --ref-backend numpyro: run the reference's chains at once, "
                             "one per CPU core (its wall time is not used in any ratio)")
    parser.add_argument("--data-from-cache", action="store_true",
                        help="take each setting's data from its cached reference when this "
                             "machine's simulation differs (another torch or LAPACK), rather "
                             "than rerunning the reference (as on a lent GPU machine)")
    parser.add_argument("--ref-warmup", type=int, default=1000)
    parser.add_argument("--ref-draws", type=int, default=1000)
    parser.add_argument("--check-samples", type=int, default=2000,
                        help="prior draws for the covariance check (0: skip it)")
    parser.add_argument("--cache", default="/tmp/pyro_diffusion_bench_cache",
                        help="folder for trained priors and reference runs")
    parser.add_argument("--devices", nargs="+", default=["cpu"],
                        help="where the diffusion rows run, e.g. --devices cpu cuda (NUTS "
                             "always runs on the CPU); rows on other devices than the CPU are "
                             "labelled with it (cpu)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: d = 64, Poisson, fixed hyperparameters, short runs")
    parser.add_argument("--out", default=None, help="also write the tables here (markdown)")
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.grid2d, args.forms, args.likelihoods = [64], [], ["fixed"], ["poisson"]
        args.num_train, args.train_steps = 5000, 500
        args.num_samples, args.steps, args.check_samples = 200, [50], 500
        args.langevin_steps = [30]
        args.nuts_warmup = args.nuts_draws = 100
        args.ref_chains, args.ref_warmup, args.ref_draws = 2, 200, 200
    for dev in args.devices:
        try:
            kind = torch.device(dev).type
        except RuntimeError as err:
            parser.error(f"--devices {dev}: {err}")
        if kind == "cuda" and not torch.cuda.is_available():
            parser.error(f"--devices {dev}: CUDA is not available on this machine")
    if args.ref_parallel and args.ref_backend != "numpyro":
        parser.error("--ref-parallel needs --ref-backend numpyro")
    if args.num_samples % args.batches:
        parser.error("--num-samples must be a multiple of --batches")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


# --- fields, data and models ------------------------------------------------------------------


def grid(kind, size):
    """``(label, points)``: ``size`` points on [0, 1], or ``size x size`` on [0, 1]^2."""
    line = torch.linspace(0.0, 1.0, size, dtype=torch.float64)
    if kind == "1d":
        return f"{size}", line
    pts = torch.stack(torch.meshgrid(line, line, indexing="ij"), -1).reshape(-1, 2)
    return f"{size}x{size}", pts


def gp_hyperparameters(form):
    if form == "fixed":
        return {"lengthscale": LENGTHSCALE, "variance": 1.0}
    return {"lengthscale": LogNormal(math.log(LENGTHSCALE), LENGTHSCALE_LOG_SD),
            "variance": LogNormal(0.0, VARIANCE_LOG_SD)}


def squared_distances(points):
    x = points if points.dim() == 2 else points[:, None]
    return (x[:, None] - x[None]).square().sum(-1)


def observe(f, lik, y):
    with pyro.plate("points", f.shape[-1]):
        if lik == "poisson":
            pyro.sample("y", dist.Poisson(EXPOSURE * f.exp()), obs=y)
        else:
            pyro.sample("y", dist.Binomial(total_count=TRIALS, logits=f), obs=y)


def nuts_model(sqdist, lik, y, chol=None):
    """The GP model itself, whitened: ``f = L z``; ``chol=None`` samples the hyperparameters."""
    d = sqdist.shape[0]
    if chol is None:
        ls = pyro.sample("lengthscale",
                         dist.LogNormal(sqdist.new_tensor(math.log(LENGTHSCALE)),
                                        LENGTHSCALE_LOG_SD))
        var = pyro.sample("variance", dist.LogNormal(sqdist.new_tensor(0.0), VARIANCE_LOG_SD))
        corr = torch.exp(-0.5 * sqdist / ls.square())
        eye = torch.eye(d, dtype=sqdist.dtype, device=sqdist.device)
        chol = var.sqrt() * torch.linalg.cholesky(corr + JITTER * eye)
    z = pyro.sample("z", dist.Normal(sqdist.new_zeros(d), 1.0).to_event(1))
    f = pyro.deterministic("f", chol @ z)
    observe(f, lik, y)


def diffusion_model(prior, lik, y):
    f = pyro.sample("f", prior)
    observe(f, lik, y)


def simulate(points, form, lik, seed):
    """The field (one per grid and form) and the data of one likelihood."""
    field, params = sample_gp(1, points, seed=derived_seed(seed, "field", len(points), form),
                              jitter=JITTER, return_hyperparameters=True,
                              **gp_hyperparameters(form))
    f = field[0].double()
    gen = torch.Generator().manual_seed(derived_seed(seed, "data", len(points), form, lik))
    if lik == "poisson":
        y = torch.poisson(EXPOSURE * f.exp(), generator=gen)
    else:
        y = torch.binomial(torch.full_like(f, TRIALS), torch.sigmoid(f), generator=gen)
    return f, y, {k: float(v[0]) for k, v in params.items()}


# --- runs -------------------------------------------------------------------------------------


def gaussian_skip_option(args):
    """``DiffusionPrior.fit``'s ``gaussian_skip`` for the command line's options."""
    if not args.gaussian_skip:
        return False
    return True if args.skip_components == 1 else args.skip_components


def scale_mixture(sqdist, nodes=NODES, dtype=torch.float64):
    """The exact denoiser of the ``hyper`` form's prior up to quadrature, a mixture over a
    ``nodes x nodes`` grid (see ``_common.gp_scale_mixture``)."""
    return gp_scale_mixture(sqdist, LENGTHSCALE, LENGTHSCALE_LOG_SD, VARIANCE_LOG_SD, JITTER,
                            nodes=nodes, dtype=dtype)


def scale_mixture_prior(sqdist, nodes=NODES):
    """The exact prior of the ``hyper`` form up to quadrature (float32)."""
    return DiffusionPrior(scale_mixture(sqdist, nodes, torch.float32), (sqdist.shape[0],))


def cached_prior(args, label, points, form, log):
    skip = gaussian_skip_option(args)
    variant = ("" if not skip else "_skip" if skip is True else f"_mix{skip}") + \
        (f"_w{args.width}" if args.width else "")
    path = os.path.join(args.cache, f"prior_{label}_{form}_n{args.num_train}_"
                                    f"s{args.train_steps}_seed{args.seed}{variant}.pt")
    meta_path = path[:-3] + ".json"
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as fh:
            meta = json.load(fh)
        log(f"prior {label} {form}: loaded {path} (trained in {meta['train_s']:.0f} s)")
        return DiffusionPrior.load(path), meta, True
    tic = time.perf_counter()
    draws = sample_gp(args.num_train, points, jitter=JITTER,
                      seed=derived_seed(args.seed, "train", label, form),
                      **gp_hyperparameters(form))
    draw_s = time.perf_counter() - tic
    net = None
    if args.width:
        torch.manual_seed(derived_seed(args.seed, "net", label, form))
        # With the skip, the zero start DiffusionPrior.fit gives its own networks.
        net = default_network((points.shape[0],), "mlp", zero_output=bool(skip),
                              width=args.width)
    prior = DiffusionPrior.fit(draws, net=net, steps=args.train_steps, seed=0, progress=False,
                               validation_fraction=0.1, gaussian_skip=skip)
    hist = prior.training_history
    meta = {"train_s": hist["seconds"], "draw_s": draw_s,
            "val_loss": hist["val_loss"][-1][1] if hist["val_loss"] else None,
            "num_train": args.num_train, "train_steps": args.train_steps}
    os.makedirs(args.cache, exist_ok=True)
    prior.save(path)
    with open(meta_path, "w") as fh:
        json.dump(meta, fh)
    log(f"prior {label} {form}: trained in {meta['train_s']:.0f} s "
        f"(+ {draw_s:.1f} s drawing), saved to {path}")
    return prior, meta, False


def check_prior(args, prior, points, form, label):
    """Relative Frobenius error of the covariance of prior draws against fresh GP draws, the
    same for as many fresh GP draws (the floor), and the mean marginal sd ratio."""
    n = args.check_samples
    gp = gp_hyperparameters(form)
    ref = sample_gp(20000, points, jitter=JITTER, seed=derived_seed(args.seed, "chk", label, form),
                    **gp).double()
    fresh = sample_gp(n, points, jitter=JITTER, seed=derived_seed(args.seed, "chk2", label, form),
                      **gp).double()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(args.seed, "prior draws", label, form))
        x = prior.replace(num_steps=max(args.steps)).sample((n,)).double()
    ref_cov = torch.cov(ref.T)

    def err(s):
        return ((torch.cov(s.T) - ref_cov).norm() / ref_cov.norm()).item()

    sd_ratio = (x.std(0) / ref.std(0)).mean().item()
    return err(x), err(fresh), sd_ratio


def flat_draws(mcmc):
    """``f`` draws ``(chains, draws, d)`` of a ``run_nuts`` result, float64."""
    return mcmc.deterministic_samples["f"].double()


def nuts_run(args, sqdist, chol, lik, y, chains, warmup, draws, seed):
    mcmc = run_nuts(nuts_model, sqdist, lik, y, chol, num_samples=draws, warmup_steps=warmup,
                    num_chains=chains, seed=seed, progress=False)
    divergences = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    return flat_draws(mcmc), mcmc.wall_time, divergences


def cached_reference(args, label, form, lik, sqdist, chol, y, log):
    tag = f"{args.ref_chains}x{args.ref_warmup}+{args.ref_draws}"
    backend = "" if args.ref_backend == "pyro" else f"_{args.ref_backend}"
    path = os.path.join(args.cache,
                        f"ref_{label}_{form}_{lik}_seed{args.seed}_{tag}{backend}.pt")
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        same = saved["y"].shape == y.shape and torch.equal(saved["y"], y)
        if same or args.data_from_cache:
            note = "" if same else (f" and its data ({int((saved['y'] != y).sum())} counts "
                                    "differ from this machine's simulation)")
            log(f"reference {label} {form} {lik}: loaded {path}{note}")
            return (saved["f"], float(saved["wall"]), int(saved["divergences"]), tag,
                    saved["y"].to(y.dtype))
        log(f"reference {label} {form} {lik}: {path} holds other data; rerunning")
    seed = derived_seed(args.seed, "ref", label, form, lik) % 2**31
    if args.ref_backend == "numpyro":
        f, wall, div = numpyro_run(args, sqdist, chol, lik, y, seed, args.ref_chains,
                                   args.ref_warmup, args.ref_draws, parallel=args.ref_parallel)
    else:
        f, wall, div = nuts_run(args, sqdist, chol, lik, y, args.ref_chains, args.ref_warmup,
                                args.ref_draws, seed)
    os.makedirs(args.cache, exist_ok=True)
    torch.save({"f": f, "wall": wall, "divergences": div, "y": y}, path)
    log(f"reference {label} {form} {lik}: {tag} in {wall:.0f} s, {div} divergences")
    return f, wall, div, tag, y


def batch_result(run, size, note):
    """The ``methods`` entry of a finished ``DiffusionPosterior`` or ``DiffusionLangevin``."""
    return {"f": run.get_samples(group_by_chain=True)["f"].double().cpu(),
            "wall": run.wall_time, "size": size, "note": note}


def on_devices(candidates, devices):
    """``(tag, prior, preconditioner, device)`` for every candidate on every device: the
    CPU's rows keep their tag, the others' get the device's name and a copy of the prior."""
    out = []
    for dev in devices:
        for tag, prior, pre in candidates:
            if torch.device(dev).type == "cpu":
                out.append((tag, prior, pre, dev))
            else:
                out.append((f"{tag} {dev}", copy.deepcopy(prior).to(dev), pre, dev))
    return out


def numpyro_run(args, sqdist, chol, lik, y, seed, chains=None, warmup=None, draws=None,
                parallel=False):
    """NumPyro NUTS on the same whitened model (only called when numpyro and jax import);
    ``parallel``: the chains at once, on the host devices ``numpyro_available`` set up."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer import MCMC, NUTS

    jax.config.update("jax_enable_x64", True)
    d2 = jnp.asarray(sqdist.numpy())
    fixed = None if chol is None else jnp.asarray(chol.numpy())
    yy = jnp.asarray(y.numpy())

    def model():
        L = fixed
        if L is None:
            ls = numpyro.sample("lengthscale",
                                ndist.LogNormal(math.log(LENGTHSCALE), LENGTHSCALE_LOG_SD))
            var = numpyro.sample("variance", ndist.LogNormal(0.0, VARIANCE_LOG_SD))
            corr = jnp.exp(-0.5 * d2 / ls ** 2) + JITTER * jnp.eye(d2.shape[0])
            L = jnp.sqrt(var) * jnp.linalg.cholesky(corr)
        z = numpyro.sample("z", ndist.Normal(jnp.zeros(d2.shape[0]), 1.0).to_event(1))
        f = numpyro.deterministic("f", L @ z)
        if lik == "poisson":
            numpyro.sample("y", ndist.Poisson(EXPOSURE * jnp.exp(f)).to_event(1), obs=yy)
        else:
            numpyro.sample("y", ndist.Binomial(TRIALS, logits=f).to_event(1), obs=yy)

    mcmc = MCMC(NUTS(model), num_warmup=warmup or args.nuts_warmup,
                num_samples=draws or args.nuts_draws, num_chains=chains or args.nuts_chains,
                chain_method="parallel" if parallel else "sequential", progress_bar=False)
    tic = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed))
    f = mcmc.get_samples(group_by_chain=True)["f"]
    jax.block_until_ready(f)
    wall = time.perf_counter() - tic
    divergences = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    return torch.from_numpy(np.array(f, dtype=np.float64)), wall, divergences


def numpyro_available(threads, host_devices=1):
    # XLA's CPU backend uses every core unless told otherwise: match --threads.
    # ``host_devices``: CPU devices for chains run in parallel (set before JAX starts).
    # NUTS runs on the CPU, also where JAX sees a GPU (as on a lent GPU machine).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if host_devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                   f"platform_device_count={host_devices}").strip()
    if threads == 1 and "intra_op_parallelism_threads" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread"
                                   "_eigen=false intra_op_parallelism_threads=1").strip()
    try:
        import jax  # noqa: F401
        import numpyro  # noqa: F401
    except ImportError as err:
        return False, f"NumPyro NUTS skipped: numpyro/jax not importable ({err})"
    return True, ""


# --- scoring ----------------------------------------------------------------------------------


def score(methods, ref):
    """Summary numbers of each method against the reference draws ``ref`` (chains, draws, d)."""
    posteriors = {"reference": {"f": ref.numpy()}}
    posteriors.update({name: {"f": m["f"].numpy()} for name, m in methods.items()})
    table = compare_posteriors(posteriors, "f", reference="reference", hdi_prob=HDI)
    rows = table[table["coord"] != "all"]
    summary = table[table["coord"] == "all"].set_index("method")
    rf = ref.reshape(-1, ref.shape[-1])
    out = {}
    for name in ["reference"] + list(methods):
        per = rows[rows["method"] == name]
        x = ref if name == "reference" else methods[name]["f"]
        xf = x.reshape(-1, x.shape[-1])
        lo, hi = torch.quantile(xf, torch.tensor([(1 - HDI) / 2, (1 + HDI) / 2],
                                                 dtype=xf.dtype), dim=0)
        ref_in = ((rf >= lo) & (rf <= hi)).double().mean(0)
        out[name] = {
            "abs_smd": summary.loc[name, "abs_smd"], "max_abs_smd": summary.loc[name,
                                                                                "max_abs_smd"],
            "sd_ratio": summary.loc[name, "sd_ratio"], "sd_min": per["sd_ratio"].min(),
            "sd_max": per["sd_ratio"].max(), "cov_ref_in": ref_in.mean().item(),
            "cov_in_ref": summary.loc[name, "coverage"], "ess": summary.loc[name, "ess_bulk"],
            "rhat": split_gelman_rubin(x, chain_dim=0, sample_dim=1).max().item()
            if x.shape[0] > 1 else math.nan,
        }
    return out


def goal_met(s, wall, nuts_ess_s, numpyro_ess_s, d):
    if d < 256:
        return "–"
    ess_s = s["ess"] / wall
    checks = {"mean": s["abs_smd"] <= 0.1, "sd": abs(s["sd_ratio"] - 1) <= 0.1,
              "cov": 0.85 <= s["cov_ref_in"] <= 0.95}
    if nuts_ess_s is not None:
        checks["x100 Pyro"] = ess_s >= 100 * nuts_ess_s
    if numpyro_ess_s is not None:
        checks["x10 NumPyro"] = ess_s >= 10 * numpyro_ess_s
    failed = [k for k, ok in checks.items() if not ok]
    return "yes" if not failed else "no (" + ", ".join(failed) + ")"


def fmt_row(label, form, lik, method, size, wall, s, ess_s, ratio, ratio_numpyro, note):
    return [label, form, lik, method, size, f"{wall:.1f}", f"{s['abs_smd']:.3f}",
            f"{s['max_abs_smd']:.3f}",
            f"{s['sd_ratio']:.3f} ({s['sd_min']:.2f}-{s['sd_max']:.2f})",
            f"{s['cov_ref_in']:.3f}", f"{s['cov_in_ref']:.3f}", f"{s['ess']:.0f}",
            f"{s['rhat']:.3f}" if math.isfinite(s["rhat"]) else "–",
            f"{ess_s:.1f}" if ess_s is not None else "–",
            ratio, ratio_numpyro, note]


# --- main -------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
    has_numpyro, numpyro_note = numpyro_available(
        args.threads, args.ref_chains if args.ref_parallel else 1)
    if args.ref_backend == "numpyro" and not has_numpyro:
        raise SystemExit(f"--ref-backend numpyro: {numpyro_note}")
    info = [f"command: `{command}`",
            f"torch {torch.__version__}, pyro {pyro.__version__}, pyro_diffusion "
            f"{pyro_diffusion.__version__}, python {platform.python_version()}, threads "
            f"{torch.get_num_threads()}, {os.cpu_count()} logical cores visible, 1-min load "
            f"average at the start {os.getloadavg()[0]:.2f}",
            f"priors: {args.num_train} GP draws, {args.train_steps} training steps, seed 0 "
            f"(cache {args.cache}); diffusion posterior: {args.num_samples} draws in "
            f"{args.batches} batches, ancestral, guidance auto; "
            + ("NUTS rows skipped" if args.skip_nuts else
               f"Pyro NUTS: {args.nuts_chains} x ({args.nuts_warmup} + {args.nuts_draws})")
            + "; reference: "
            f"{'Pyro' if args.ref_backend == 'pyro' else 'NumPyro'} NUTS "
            f"{args.ref_chains} x ({args.ref_warmup} + {args.ref_draws})"
            f"{' in parallel' if args.ref_parallel else ''}; seed {args.seed}"]
    if not has_numpyro:
        info.append(numpyro_note)
    print("\n".join(info), flush=True)

    grids = [grid("1d", d) for d in args.dims] + [grid("2d", g) for g in args.grid2d]
    prior_rows, rows = [], []
    header = ["d", "form", "lik", "method", "draws / steps", "wall s", "abs smd mean",
              "abs smd max", "sd ratio (min-max)", "cov90 ref in m", "cov90 m in ref", "min ESS",
              "max R-hat", "ESS/s", "x Pyro", "x NumPyro", "goal (d >= 256) / notes"]
    for label, points in grids:
        d = points.shape[0]
        sqdist = squared_distances(points)
        for form in args.forms:
            prior, meta, loaded = cached_prior(args, label, points, form, log)
            prior = prior.replace(progress=False)
            if args.check_samples:
                err, floor, sd_ratio = check_prior(args, prior, points, form, label)
                log(f"prior {label} {form}: covariance rel. error {err:.4f} (floor {floor:.4f}),"
                    f" marginal sd ratio {sd_ratio:.3f}")
                check = (f"{err:.3f}", f"{floor:.3f}", f"{sd_ratio:.3f}")
            else:
                check = ("–", "–", "–")
            prior_rows.append([label, form, args.num_train, meta["train_steps"],
                               f"{meta['train_s']:.0f}" + (" (cached)" if loaded else ""),
                               f"{meta['val_loss']:.4f}" if meta["val_loss"] else "–", *check])
            fixed_chol = None
            # (tag, prior, preconditioner): the exact scale mixture has no Gaussian part of its
            # own, so "auto" would anneal with the diagonal mass; it gets the Gaussian
            # preconditioner with the moments estimated from its draws, as a learned prior
            # with a skip has.
            candidates = [("langevin", prior, args.preconditioner)]
            if form == "fixed":
                kernel = torch.exp(-0.5 * sqdist / LENGTHSCALE ** 2)
                kernel = kernel + JITTER * torch.eye(d, dtype=kernel.dtype)
                fixed_chol = torch.linalg.cholesky(kernel)
                if args.exact_prior:  # built once per grid, used for every likelihood
                    exact = DiffusionPrior(GaussianDenoiser(torch.zeros(d), kernel.float()), (d,))
                    candidates.append(("langevin, exact prior", exact, args.preconditioner))
            else:
                pre = "gaussian" if args.preconditioner == "auto" else args.preconditioner
                if args.exact_prior:
                    candidates.append(("langevin, exact prior", scale_mixture_prior(sqdist),
                                       pre))
                if args.binned_prior:
                    full = scale_mixture(sqdist)
                    for k in args.binned_prior:
                        for axis, name in enumerate(["lengthscale", "variance"]):
                            den = binned_mixture(full, NODES, k, axis).float()
                            candidates.append((f"langevin, {name} in {k} bins",
                                               DiffusionPrior(den, (d,)), pre))
            guided = on_devices([("", prior, None)], args.devices)
            candidates = on_devices(candidates, args.devices)
            for lik in args.likelihoods:
                truth, y, params = simulate(points, form, lik, args.seed)
                log(f"setting d={label} {form} {lik}: field lengthscale "
                    f"{params['lengthscale']:.3f}, variance {params['variance']:.3f}, "
                    f"y total {int(y.sum())}")
                ref, ref_wall, ref_div, tag, y = cached_reference(
                    args, label, form, lik, sqdist, fixed_chol, y, log)
                methods = {}
                if not args.skip_nuts:
                    f, wall, div = nuts_run(args, sqdist, fixed_chol, lik, y, args.nuts_chains,
                                            args.nuts_warmup, args.nuts_draws,
                                            derived_seed(args.seed, "nuts", label, form,
                                                         lik) % 2**31)
                    methods["Pyro NUTS"] = {"f": f, "wall": wall,
                                            "size": f"{args.nuts_chains}x({args.nuts_warmup}+"
                                                    f"{args.nuts_draws})",
                                            "note": f"{div} divergences"}
                    log(f"  Pyro NUTS: {wall:.0f} s, {div} divergences")
                if has_numpyro and not args.skip_nuts:
                    try:
                        f, wall, div = numpyro_run(args, sqdist, fixed_chol, lik, y,
                                                   derived_seed(args.seed, "numpyro", label,
                                                                form, lik) % 2**31)
                        methods["NumPyro NUTS"] = {
                            "f": f, "wall": wall, "note": f"{div} divergences",
                            "size": f"{args.nuts_chains}x({args.nuts_warmup}+"
                                    f"{args.nuts_draws})"}
                        log(f"  NumPyro NUTS: {wall:.0f} s")
                    except Exception as err:  # an optional baseline never stops the run
                        log(f"  NumPyro NUTS failed: {type(err).__name__}: {err}")
                for _, p_, pre, dev in candidates if args.langevin_steps else []:
                    # Untimed: the first double backward of a process imports torch._dynamo
                    # (and sympy), 0.3-2 s once, which would land on the first timed run; on
                    # a GPU the first run also pays for CUDA's start and its kernels' loading.
                    DiffusionLangevin(diffusion_model, num_samples=2, num_steps=1, batch_size=2,
                                      preconditioner=pre, progress=False,
                                      seed=0).run(p_, lik, y.float().to(dev))
                for _, p_, _, dev in [] if args.skip_guided else guided:
                    DiffusionPosterior(diffusion_model, num_samples=2, num_steps=2,
                                       progress=False, seed=0).run(p_, lik, y.float().to(dev))
                for steps in [] if args.skip_guided else args.steps:
                    for tag_, p_, _, dev in guided:
                        post = DiffusionPosterior(diffusion_model, guidance="auto",
                                                  num_samples=args.num_samples,
                                                  batch_size=args.num_samples // args.batches,
                                                  num_steps=steps, progress=False,
                                                  seed=derived_seed(args.seed, "diffusion", label,
                                                                    form, lik, steps))
                        post.run(p_, lik, y.float().to(dev))
                        name = f"diffusion{tag_} {steps}"
                        methods[name] = batch_result(post, f"{args.num_samples} / {steps}",
                                                     type(post.guidance_used).__name__)
                        log(f"  {name}: {post.wall_time:.1f} s")
                for steps, step_size, rho_min, repeat in itertools.product(
                        args.langevin_steps, args.step_size, args.rho_min,
                        range(args.repeats)):
                    # Default steps: the seed of an explicit 20, as before mixture priors had
                    # their own; repeat 0: the seed of a single run.
                    key = (steps or 20,) + ((repeat,) if repeat else ())
                    for tag_, p_, pre, dev in candidates:
                        run = DiffusionLangevin(diffusion_model, num_samples=args.num_samples,
                                                num_steps=steps,
                                                denoise_steps=args.denoise_steps,
                                                step_size=step_size, rho_min=rho_min,
                                                preconditioner=pre,
                                                batch_size=args.num_samples // args.batches,
                                                progress=False,
                                                seed=derived_seed(args.seed, "langevin", label,
                                                                  form, lik, *key))
                        run.run(p_, lik, y.float().to(dev))
                        name = f"diffusion {tag_} {run.num_steps_used}"
                        if len(args.step_size) > 1:
                            name += f" step {step_size:g}"
                        if len(args.rho_min) > 1 or rho_min is not None:
                            name += f" rho {run.rho_min_used:.3g}"
                        if args.repeats > 1:
                            name += f" repeat {repeat}"
                        methods[name] = batch_result(
                            run, f"{args.num_samples} / {run.num_steps_used}+"
                                 f"{run.denoise_steps_used}",
                            f"{run.preconditioner_used}, rho_min {run.rho_min_used:.3g}, "
                            f"{run.divergences} divergences")
                        log(f"  {name}: {run.wall_time:.1f} s")
                scores = score(methods, ref)
                rs = scores["reference"]
                rows.append(fmt_row(label, form, lik, "reference (Pyro NUTS)"
                                    if args.ref_backend == "pyro" else
                                    "reference (NumPyro NUTS)",
                                    tag.replace("x", "x(") + ")", ref_wall, rs,
                                    rs["ess"] / ref_wall, "–", "–", f"{ref_div} divergences"))
                nuts_ess_s, numpyro_ess_s = (
                    scores[k]["ess"] / methods[k]["wall"] if k in methods else None
                    for k in ("Pyro NUTS", "NumPyro NUTS"))
                for name, m in methods.items():
                    s = scores[name]
                    ess_s = s["ess"] / m["wall"]
                    note = m["note"]
                    if name.startswith("diffusion"):
                        note = goal_met(s, m["wall"], nuts_ess_s, numpyro_ess_s, d) + f"; {note}"
                    ratios = ("–" if base is None else f"{ess_s / base:.1f}"
                              for base in (nuts_ess_s, numpyro_ess_s))
                    rows.append(fmt_row(label, form, lik, name, m["size"], m["wall"], s, ess_s,
                                        *ratios, note))
                    log("  " + " | ".join(map(str, rows[-1][3:])))
    prior_header = ["d", "form", "train draws", "train steps", "train s", "val loss",
                    "cov rel. error", "floor", "sd ratio"]
    prior_table = markdown_table(prior_header, prior_rows)
    table = markdown_table(header, rows)
    total = time.perf_counter() - start
    footer = (f"total time {total:.0f} s (cached priors and references not re-run); 1-min load "
              f"average at the end {os.getloadavg()[0]:.2f}")
    print()
    print(prior_table)
    print()
    print(table)
    print(f"\n{footer}")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(f"- {line}" for line in info) + "\n\nPriors (covariance check: "
                     f"{args.check_samples} prior draws, {max(args.steps)} ancestral steps, "
                     "against 20000 fresh GP draws):\n\n" + prior_table + "\n\n" + table +
                     f"\n\n{footer}\n")


if __name__ == "__main__":
    main()
