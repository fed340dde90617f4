"""Sampling benchmark: speed and accuracy of the reverse-process samplers on an exact prior.

The prior is the 25-component Gaussian mixture of Cardoso et al. (2023): unit covariances, means
on the grid ``{-16, -8, 0, 8, 16}^2`` tiled to ``d`` coordinates (component ``(i, j)`` has mean
``(8i, 8j, 8i, 8j, ...)`` truncated to ``d``), and seeded random weights. Its exact denoiser
(:class:`pyro_diffusion.GaussianMixtureDenoiser`) removes any training error, so what is measured
is the sampler alone: its discretisation error against exact draws from the mixture.

For every device, dimension, sampler and step count the script reports

- network (denoiser) evaluations per sample;
- samples/s: ``n`` over the wall time of one ``prior.sample((n,))`` call, timed after one
  identical warm-up call (with ``torch.cuda.synchronize()`` on CUDA); with ``--repeats R``, the
  median over ``R`` timed calls;
- SW2: sliced Wasserstein-2 distance (256 projections) between the ``n`` samples and ``n`` exact
  draws from the mixture (one reference set per ``d``);
- mode TV: ``0.5 * sum_k |freq_k - w_k|``, the total-variation error of the component
  frequencies, with samples assigned by ``gm.component_of``.

Both metrics are read from the first timed call's samples.

One "exact" row per ``d`` gives the noise floors: the same two metrics for fresh exact sets of
``n`` draws in place of the sampler's output (mean +- sd over 20 independent sets). A sampler
whose errors sit within that spread is indistinguishable from exact sampling at this ``n``.
Single values scatter: SW2 between sets of ``n`` draws is dominated by the sampling noise of the
mode weights and has a long right tail, so judge convergence on the trend over step counts.

Usage::

    python bench/sampling.py                      # CPU (+ CUDA if present), 2 threads
    python bench/sampling.py --quick              # < 1 min on 2 cores
    python bench/sampling.py --devices cuda --dims 2 8 32 --out results.md

Reference: Cardoso, Janati El Idrissi, Le Corff, Moulines (2023), *Monte Carlo guided
diffusion for Bayesian linear inverse problems*.
"""

import argparse
import copy
import os
import platform
import shlex
import subprocess
import sys
import time

import torch
from _common import derived_seed, fmt_pm, markdown_table

import pyro_diffusion
from pyro_diffusion import DiffusionPrior, GaussianMixtureDenoiser, sliced_wasserstein

#: (label, sampler, eta) in table order.
SAMPLERS = (
    ("ancestral", "ancestral", None),
    ("ddim (eta=0)", "ddim", 0.0),
    ("ddim (eta=0.5)", "ddim", 0.5),
    ("heun", "heun", None),
)
DEFAULT_STEPS = (8, 16, 32, 64, 128, 256)
QUICK_STEPS = (8, 32, 128)
DEFAULT_DIMS = (2, 8)
NUM_PROJECTIONS = 256
FLOOR_REPEATS = 20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default=None,
                        help="comma-separated devices (default: cpu, plus cuda if available)")
    parser.add_argument("--dims", type=int, nargs="+", default=None,
                        help=f"data dimensions (default: {' '.join(map(str, DEFAULT_DIMS))})")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help=f"step counts (default: {' '.join(map(str, DEFAULT_STEPS))}; "
                             f"--quick: {' '.join(map(str, QUICK_STEPS))})")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="samples per measurement (default: 10000; --quick: 2000)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads (default: 2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of weights, noise and metrics (default: 0)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and samples (well under a minute on 2 CPU cores)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed calls per measurement; samples/s is their median "
                             "(default: 1)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="samples per denoiser batch (default: the package's default)")
    parser.add_argument("--out", default=None, help="also write the results as markdown here")
    args = parser.parse_args(argv)
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        args.devices = [s.strip() for s in args.devices.split(",") if s.strip()]
    for device in args.devices:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            parser.error(f"device {device!r} requested but CUDA is not available")
    args.dims = args.dims or list(DEFAULT_DIMS)
    args.steps = args.steps or list(QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if args.num_samples is None:
        args.num_samples = 2000 if args.quick else 10000
    if min(args.dims) < 1 or min(args.steps) < 1 or args.num_samples < 2 or args.threads < 1 \
            or args.repeats < 1 or (args.chunk_size is not None and args.chunk_size < 1):
        parser.error("--dims, --steps, --threads, --repeats, --chunk-size must be positive and "
                     "--num-samples at least 2")
    return args


def mode_tv(gm, x):
    """Total-variation error of the component frequencies of ``x`` (CPU) against the weights."""
    counts = torch.bincount(gm.component_of(x), minlength=gm.weights.numel())
    freq = counts.double() / x.shape[0]
    return 0.5 * (freq - gm.weights.double()).abs().sum().item()


def exact_draws(gm, n, seed, *key):
    torch.manual_seed(derived_seed(seed, *key))
    return gm.sample_data(n)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical cores visible)"


def package_revision():
    """Git commit of the package's checkout, with "+dirty" for uncommitted changes, if known."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(pyro_diffusion.__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, check=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "git revision unknown"
    return f"git {head}{'+dirty' if dirty else ''}"


def load_average():
    """1-minute load average (timings on a busy CPU are not meaningful), or "n/a"."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(args.seed)
    devices = [torch.device(d) for d in args.devices]
    n = args.num_samples
    start = time.perf_counter()

    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
    info = [
        f"command: `{command}`",
        f"torch {torch.__version__}, python {platform.python_version()}, float32",
        f"threads: {torch.get_num_threads()} (torch.set_num_threads)",
        f"samples per measurement: {n}, seed: {args.seed}, timing: "
        + ("one call" if args.repeats == 1 else f"median of {args.repeats} calls")
        + " after one warm-up call",
    ] + [f"device {d}: {device_name(d)}" for d in devices]
    info.append(f"pyro_diffusion {pyro_diffusion.__version__} ({package_revision()})")
    mixtures = {d: GaussianMixtureDenoiser.grid_benchmark(
        d, seed=derived_seed(args.seed, "weights"), dtype=torch.float32) for d in args.dims}
    settings = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    for d, gm in mixtures.items():
        probe = DiffusionPrior(gm, (d,), **settings)
        info.append(f"d={d}: data_std {gm.data_std.item():.4g}; prior grid (package defaults) "
                    f"sigma_min {probe.sigma_min:.4g}, sigma_max {probe.sigma_max:.4g}, "
                    f"rho {probe.rho:g}; chunk_size {probe.chunk_size}")
    info.append(f"1-min load average at the start: {load_average()}")
    for line in info:
        print(line)
    print(flush=True)

    header = ["device", "d", "sampler", "steps", "NFE/sample", "samples/s", "SW2",
              "mode TV"]
    rows = []
    for d, gm in mixtures.items():
        reference = exact_draws(gm, n, args.seed, d, "reference")
        sw_floor, tv_floor = [], []
        for r in range(FLOOR_REPEATS):
            exact = exact_draws(gm, n, args.seed, d, "floor", r)
            sw_floor.append(sliced_wasserstein(exact, reference, NUM_PROJECTIONS, p=2,
                                               seed=args.seed))
            tv_floor.append(mode_tv(gm, exact))
        rows.append(["–", d, "exact (noise floor)", "–", "–", "–",
                     fmt_pm(sw_floor, 4), fmt_pm(tv_floor, 4)])
        print(f"d={d}: noise floor SW2 {fmt_pm(sw_floor, 4)}, mode TV {fmt_pm(tv_floor, 4)}",
              file=sys.stderr, flush=True)

        for device in devices:
            gm_dev = copy.deepcopy(gm).to(device)
            for label, sampler, eta in SAMPLERS:
                for steps in args.steps:
                    prior = DiffusionPrior(gm_dev, (d,), num_steps=steps, sampler=sampler,
                                           eta=eta, **settings)
                    torch.manual_seed(derived_seed(args.seed, d, device.type, label, steps))
                    prior.sample((n,))  # warm-up
                    times = []
                    for r in range(args.repeats):
                        sync(device)
                        tic = time.perf_counter()
                        out = prior.sample((n,))
                        sync(device)
                        times.append(time.perf_counter() - tic)
                        if r == 0:
                            x = out.cpu()
                    elapsed = sorted(times)[(len(times) - 1) // 2]
                    if not torch.isfinite(x).all():
                        sw, tv = float("nan"), float("nan")
                    else:
                        sw = sliced_wasserstein(x, reference, NUM_PROJECTIONS, p=2,
                                                seed=args.seed)
                        tv = mode_tv(gm, x)
                    row = [device.type, d, label, steps, prior.num_evaluations,
                           f"{n / elapsed:,.0f}", f"{sw:.4f}", f"{tv:.4f}"]
                    rows.append(row)
                    print("  ".join(str(c) for c in row), file=sys.stderr, flush=True)

    total = time.perf_counter() - start
    table = markdown_table(header, rows)
    print(table)
    footer = (f"Noise-floor rows: mean ± sd over {FLOOR_REPEATS} sets of {n} exact draws. "
              f"SW2 is against one reference set of {n} exact draws per d.\n\n"
              f"total run time: {total:.0f} s; 1-min load average at the end "
              f"(this run included): {load_average()}")
    print(f"\n{footer}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(f"- {line}" for line in info) + f"\n\n{table}\n\n{footer}\n")


if __name__ == "__main__":
    main()
