r"""``python -m pyro_diffusion gp-demo``: learn a Gaussian-process prior with a diffusion model.

The demo draws fields on a 64-point grid of :math:`[0, 1]` from a GP with an RBF kernel, unit
variance and a log-normal hyperprior on the lengthscale (median 0.2), trains a
:class:`~pyro_diffusion.DiffusionPrior` on them (or loads the one a previous run saved), samples
it, and compares the samples with fresh GP draws:

- the relative Frobenius error of the sample covariance against the covariance of
  ``20000`` fresh GP draws, and
- the sliced Wasserstein distance to those draws,

each next to its *noise floor*: the same figure for a set of fresh GP draws as large as the
diffusion sample, i.e. what a perfect model would score; and the mean squared increment between
neighbouring grid points, which shows small-scale noise in the samples. It writes
``gp_prior.pt`` (the checkpoint), ``gp_prior.json`` (how it was trained) and ``gp_prior.png``
(draws, covariance matrices, marginal standard deviations and correlation against distance) to
``--output``.

Run ``python -m pyro_diffusion gp-demo --help`` for the options; :func:`main` takes the same
arguments as a list.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torch.distributions import LogNormal

from ._version import __version__
from .datasets import sample_gp
from .metrics import sliced_wasserstein
from .prior import DiffusionPrior
from .samplers import SAMPLERS
from .seeding import seeded

#: Points of the grid on [0, 1].
GRID_SIZE = 64
#: Median of the lengthscale hyperprior and the standard deviation of its logarithm.
LENGTHSCALE = 0.2
LENGTHSCALE_LOG_SD = 0.3
#: Fresh GP draws the diffusion samples are compared with.
NUM_REFERENCE = 20000

# Defaults chosen by measurement (training seed 0, 2000 samples; noise floors: covariance error
# 0.052, sliced Wasserstein 0.045). 3000 training steps take about 80 s on one CPU core; Heun
# with 32 steps from sigma_max = 80 then scores (0.045-0.064, 0.040-0.055) over two sampling
# seeds. With sigma_max = 20 the start N(m, (sigma_max^2 + std^2) I) misses the field's top
# covariance eigenvalue (about 28 std^2 here) and the samples lose variance (0.081, 0.049);
# the ancestral sampler with 64 steps scores (0.146, 0.084); 2000 training steps (0.107, 0.054).
DEFAULT_TRAIN_STEPS = 3000
DEFAULT_NUM_TRAIN = 20000
DEFAULT_NUM_SAMPLES = 2000
DEFAULT_SAMPLER = "heun"
DEFAULT_SAMPLING_STEPS = 32
DEFAULT_SIGMA_MAX = None  # the package default, 80 x the data scale

CHECKPOINT = "gp_prior.pt"
METADATA = "gp_prior.json"
FIGURE = "gp_prior.png"

DESCRIPTION = (
    "Train a diffusion prior on Gaussian-process draws (64-point grid on [0, 1], RBF kernel, "
    f"lengthscale ~ LogNormal(log {LENGTHSCALE}, {LENGTHSCALE_LOG_SD}), variance 1), sample it "
    "and compare the samples with fresh GP draws. A checkpoint saved by an earlier run in the "
    "output folder is loaded instead of training, unless --retrain is given."
)


def _count(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_arguments(parser):
    """Add the demo's options to an ``argparse`` parser (used by ``python -m pyro_diffusion``)."""
    parser.add_argument("--device", default="cpu",
                        help="where to train and sample: cpu, cuda, cuda:1, mps, ... "
                             "(default: %(default)s)")
    parser.add_argument("--train-steps", type=_count(1), default=None, metavar="N",
                        help=f"optimisation steps when training (default: {DEFAULT_TRAIN_STEPS})")
    parser.add_argument("--num-train", type=_count(16), default=DEFAULT_NUM_TRAIN, metavar="N",
                        help="GP draws to train on, 10%% held out for validation "
                             "(default: %(default)s)")
    parser.add_argument("--num-samples", type=_count(2), default=DEFAULT_NUM_SAMPLES,
                        metavar="N", help="diffusion samples to draw and score "
                                          "(default: %(default)s)")
    parser.add_argument("--sampling-steps", type=_count(1), default=DEFAULT_SAMPLING_STEPS,
                        metavar="N", help="reverse-process steps per sample; Heun calls the "
                                          "network 2N - 1 times (default: %(default)s)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER,
                        help="reverse-process sampler (default: %(default)s)")
    parser.add_argument("--sigma-max", type=_positive_float, default=DEFAULT_SIGMA_MAX,
                        metavar="S", help="noise level where sampling starts; smooth fields need "
                                          "it well above the root of their largest covariance "
                                          "eigenvalue (default: 80 x the data's scale)")
    parser.add_argument("--output", default="demo_output", metavar="DIR",
                        help="folder for the checkpoint and the figure (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data, the training and the sampling "
                             "(default: %(default)s)")
    parser.add_argument("--retrain", action="store_true",
                        help="train even if the output folder holds a checkpoint")
    parser.add_argument("--threads", type=_count(1), default=None, metavar="N",
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bars")
    return parser


def build_parser(prog="python -m pyro_diffusion gp-demo"):
    """The demo's own argument parser."""
    return add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION))


def main(argv=None):
    """Run the demo with command-line arguments (``sys.argv[1:]`` when ``argv`` is ``None``).

    :param list argv: the options, e.g. ``["--train-steps", "500", "--output", "out"]``.
    :returns: a dict with the summary figures and the absolute paths of the files written.
    """
    parser = build_parser()
    return run(parser.parse_args(argv), parser)


def _check_device(name, parser):
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        parser.error(f"--device: unknown device {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: CUDA is not available in this torch build or machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"--device {name}: MPS is not available on this machine")
    return device


def _read_metadata(path):
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _write_metadata(path, meta):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _covariance(x):
    return torch.cov(x.double().T)


def _rel_frobenius(cov, ref):
    return ((cov - ref).norm() / ref.norm()).item()


def _roughness(x):
    """Mean squared increment between neighbouring grid points: small-scale noise shows here
    long before it shows in the covariance error, which the large eigenvalues dominate."""
    return x.double().diff(dim=1).square().mean().item()


def _correlation_by_lag(cov):
    """Mean correlation of grid points ``k`` apart, for ``k = 0, ..., n - 1``."""
    sd = cov.diagonal().sqrt()
    corr = cov / torch.outer(sd, sd)
    return torch.stack([corr.diagonal(k).mean() for k in range(corr.shape[0])])


def _plot(path, grid, gp_draws, diffusion_draws, gp_cov, diffusion_cov, num_lines=6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = grid.numpy()
    fig = Figure(figsize=(14, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    colors = [f"C{i}" for i in range(num_lines)]
    lim = 1.05 * max(gp_draws[:num_lines].abs().max().item(),
                     diffusion_draws[:num_lines].abs().max().item())
    for ax, draws, title in ((axes[0, 0], gp_draws, "GP draws"),
                             (axes[0, 1], diffusion_draws, "diffusion prior draws")):
        for i in range(min(num_lines, draws.shape[0])):
            ax.plot(x, draws[i].numpy(), color=colors[i], lw=1.3)
        ax.set(title=title, xlabel="x", ylabel="f(x)", ylim=(-lim, lim))

    ax = axes[0, 2]
    ax.plot(x, gp_cov.diagonal().sqrt().numpy(), "k-", lw=2, label="GP draws")
    ax.plot(x, diffusion_cov.diagonal().sqrt().numpy(), "C3--", lw=2, label="diffusion")
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set(title="marginal standard deviation", xlabel="x", ylim=(0, 1.5))
    ax.legend(loc="lower center")

    vmax = max(gp_cov.abs().max().item(), diffusion_cov.abs().max().item())
    for ax, cov, title in ((axes[1, 0], gp_cov, "covariance of GP draws"),
                           (axes[1, 1], diffusion_cov, "covariance of diffusion draws")):
        image = ax.imshow(cov.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                          extent=(0, 1, 1, 0), interpolation="nearest")
        ax.set(title=title, xlabel="x", ylabel="x'")
    fig.colorbar(image, ax=axes[1, :2].tolist(), shrink=0.9)

    ax = axes[1, 2]
    lags = (grid - grid[0]).numpy()
    ax.plot(lags, _correlation_by_lag(gp_cov).numpy(), "k-", lw=2, label="GP draws")
    ax.plot(lags, _correlation_by_lag(diffusion_cov).numpy(), "C3--", lw=2, label="diffusion")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set(title="correlation against distance", xlabel="|x - x'|", ylabel="correlation")
    ax.legend()
    fig.savefig(path, dpi=110)


def _print_table(title, rows):
    width = max(len(label) for label, _ in rows)
    print(title)
    print("-" * len(title))
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


def run(args, parser=None):
    """Run the demo with parsed arguments (see :func:`add_arguments`); returns the summary."""
    parser = parser or build_parser()
    start = time.perf_counter()
    device = _check_device(args.device, parser)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train_steps = DEFAULT_TRAIN_STEPS if args.train_steps is None else args.train_steps
    output = Path(args.output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    checkpoint, metadata_path, figure = output / CHECKPOINT, output / METADATA, output / FIGURE

    grid = torch.linspace(0.0, 1.0, GRID_SIZE)
    gp = dict(kernel="rbf", variance=1.0,
              lengthscale=LogNormal(math.log(LENGTHSCALE), LENGTHSCALE_LOG_SD))
    gp_text = (f"RBF kernel, lengthscale ~ LogNormal(log {LENGTHSCALE}, {LENGTHSCALE_LOG_SD}), "
               "variance 1")

    sampling = dict(num_steps=args.sampling_steps, sampler=args.sampler,
                    sigma_max=args.sigma_max, progress=args.progress)
    if checkpoint.exists() and not args.retrain:
        print(f"loading the prior from {checkpoint} (pass --retrain to train a new one)")
        try:
            prior = DiffusionPrior.load(checkpoint, map_location=device)
        except ValueError as e:
            parser.error(f"{e}; delete it or pass --retrain")
        if tuple(prior.event_shape) != (GRID_SIZE,):
            parser.error(f"{checkpoint} holds a prior over shape {tuple(prior.event_shape)}, "
                         f"not the demo's ({GRID_SIZE},); delete it or pass --retrain")
        meta = _read_metadata(metadata_path)
        trained = False
        if args.train_steps is not None and meta.get("train_steps") not in (None, train_steps):
            print(f"note: the saved prior was trained for {meta['train_steps']} steps, not "
                  f"--train-steps {train_steps}; pass --retrain to train again")
    else:
        print(f"drawing {args.num_train} GP fields on a {GRID_SIZE}-point grid ({gp_text})")
        data = sample_gp(args.num_train, grid, seed=args.seed, **gp)
        print(f"training a diffusion prior for {train_steps} steps on {device}")
        prior = DiffusionPrior.fit(data, steps=train_steps, device=device, seed=args.seed,
                                   progress=args.progress, validation_fraction=0.1)
        history = prior.training_history
        prior.save(checkpoint)
        meta = {
            "train_steps": len(history["loss"]),
            "interrupted": bool(history.get("interrupted", False)),
            "train_seconds": history["seconds"],
            "val_loss": history["val_loss"][-1][1] if history["val_loss"] else None,
            "num_train": args.num_train,
            "seed": args.seed,
            "device": str(device),
            "gp": {"grid_size": GRID_SIZE, "kernel": "rbf", "variance": 1.0,
                   "lengthscale_median": LENGTHSCALE, "lengthscale_log_sd": LENGTHSCALE_LOG_SD},
            "pyro_diffusion_version": __version__,
        }
        _write_metadata(metadata_path, meta)
        trained = True
    try:
        prior = prior.replace(**sampling)
    except ValueError as e:
        parser.error(f"sampling settings: {e}")

    # Fresh GP draws: a large reference set, and a set as large as the diffusion sample whose
    # distance to the reference is the noise floor of each score.
    reference = sample_gp(NUM_REFERENCE, grid, seed=args.seed + 1, **gp)
    baseline = sample_gp(args.num_samples, grid, seed=args.seed + 2, **gp)

    how_sampled = (f"{prior.sampler}, {prior.num_steps} steps ({prior.num_evaluations} network "
                   f"calls), sigma_max {prior.sigma_max:g}")
    print(f"drawing {args.num_samples} samples ({how_sampled})")
    t = time.perf_counter()
    with seeded(args.seed + 3, device):
        samples = prior.sample((args.num_samples,))
    samples = samples.detach().to("cpu", torch.float32)
    sampling_seconds = time.perf_counter() - t
    if not torch.isfinite(samples).all():
        print("warning: the diffusion samples contain NaN or infinite values")

    ref_cov, base_cov, sample_cov = (_covariance(s) for s in (reference, baseline, samples))
    cov_error = _rel_frobenius(sample_cov, ref_cov)
    cov_floor = _rel_frobenius(base_cov, ref_cov)
    sw = sliced_wasserstein(samples, reference)
    sw_floor = sliced_wasserstein(baseline, reference)
    roughness, roughness_ref = _roughness(samples), _roughness(reference)
    _plot(figure, grid, baseline, samples, ref_cov, sample_cov)
    total_seconds = time.perf_counter() - start

    def fmt(value, spec=".4f"):
        return "n/a" if value is None else format(value, spec)

    train_seconds, val_loss = meta.get("train_seconds"), meta.get("val_loss")
    steps_done = meta.get("train_steps", "?")
    how = "trained now" if trained else "loaded"
    rows = [
        ("prior", f"{how}: {steps_done} steps"
                  + (" (interrupted)" if meta.get("interrupted") else "")),
        ("training time", f"{fmt(train_seconds, '.1f')} s"
                          + ("" if trained else " (when it was trained)")),
        ("validation loss", fmt(val_loss)),
        ("sampling", f"{sampling_seconds:.1f} s for {args.num_samples} samples ({how_sampled})"),
        ("covariance rel. error", f"{cov_error:.4f}   (noise floor {cov_floor:.4f})"),
        ("sliced Wasserstein", f"{sw:.4f}   (noise floor {sw_floor:.4f})"),
        ("mean squared increment", f"{roughness:.5f}   (GP draws {roughness_ref:.5f})"),
        ("total time", f"{total_seconds:.1f} s"),
        ("figure", str(figure)),
        ("checkpoint", str(checkpoint)),
    ]
    print()
    _print_table(f"GP prior on {GRID_SIZE} points ({gp_text})", rows)
    print("\nScores compare with 20000 fresh GP draws; the noise floor is the score of "
          f"{args.num_samples} other fresh GP draws.")

    return {
        "trained": trained,
        "train_steps": meta.get("train_steps"),
        "train_seconds": train_seconds,
        "val_loss": val_loss,
        "sampling_seconds": sampling_seconds,
        "cov_rel_error": cov_error,
        "cov_rel_error_floor": cov_floor,
        "sliced_wasserstein": sw,
        "sliced_wasserstein_floor": sw_floor,
        "mean_squared_increment": roughness,
        "mean_squared_increment_gp": roughness_ref,
        "total_seconds": total_seconds,
        "figure": str(figure),
        "checkpoint": str(checkpoint),
        "metadata": str(metadata_path),
    }
