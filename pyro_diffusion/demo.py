r"""``python -m pyro_diffusion demo``: disease mapping of SIDS in North Carolina, checked by NUTS.

The main job, on bundled defaults and on CPU in a few minutes:

1. loads the North Carolina SIDS counts (1974-78) with their expected counts and county
   adjacency (:func:`~pyro_diffusion.datasets.load_nc_sids`, offline from libpysal);
2. loads the :class:`~pyro_diffusion.DiffusionPrior` shipped with the package, trained on
   draws of a CAR field with hyperpriors (:mod:`pyro_diffusion.disease_mapping`;
   ``scripts/train_nc_sids_prior.py`` retrains it);
3. samples the posterior of the log relative risks under Poisson counts with the evidence
   trick (:class:`~pyro_diffusion.DiffusionPosterior`);
4. runs NUTS on the same model with the CAR prior itself
   (:func:`~pyro_diffusion.diagnostics.run_nuts`);
5. prints the comparison table (:func:`~pyro_diffusion.diagnostics.compare_posteriors`) and
   writes relative-risk maps and the comparison plot as PNG files.

Run ``python -m pyro_diffusion demo --help`` for the options; :func:`main` takes the same
arguments as a list. ``python -m pyro_diffusion gp-demo`` trains a Gaussian-process prior
instead (:mod:`pyro_diffusion.gp_demo`).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from ._version import __version__
from .datasets import load_nc_sids
from .diagnostics import compare_posteriors, plot_comparison, run_nuts
from .disease_mapping import car_model, diffusion_model, load_nc_sids_prior
from .gp_demo import _check_device, _count
from .posterior import DiffusionPosterior

DESCRIPTION = (
    "Map the relative risk of sudden infant death in the 100 North Carolina counties with a "
    "diffusion prior (trained on CAR fields with hyperpriors, shipped with the package) and "
    "the evidence-trick posterior; check it against NUTS on the same model with the CAR prior "
    "and print the ArviZ-based comparison. Writes maps and a comparison plot to --output."
)

PERIODS = {"1974": 0, "1979": 1}


def add_arguments(parser):
    """Add the demo's options to ``parser``; returns it."""
    parser.add_argument("--device", default="cpu",
                        help="device for the diffusion posterior: cpu or cuda (default: cpu); "
                             "NUTS always runs on the CPU")
    parser.add_argument("--period", choices=sorted(PERIODS), default="1974",
                        help="SIDS counts of 1974-78 or 1979-84 (default: 1974)")
    parser.add_argument("--num-samples", type=_count(4), default=2000, metavar="N",
                        help="diffusion posterior draws, in 4 independent chains (default: 2000)")
    parser.add_argument("--steps", type=_count(1), default=200, metavar="N",
                        help="reverse steps of the posterior sampler (default: 200)")
    parser.add_argument("--guidance", choices=["auto", "evidence", "dps"], default="auto",
                        help="guidance (default: auto, the evidence trick for Poisson counts)")
    parser.add_argument("--nuts-samples", type=_count(1), default=500, metavar="N",
                        help="NUTS draws per chain (default: 500)")
    parser.add_argument("--nuts-warmup", type=_count(1), default=500, metavar="N",
                        help="NUTS warm-up steps per chain (default: 500)")
    parser.add_argument("--nuts-chains", type=_count(1), default=2, metavar="N",
                        help="NUTS chains, run one after the other (default: 2)")
    parser.add_argument("--skip-nuts", action="store_true",
                        help="only the diffusion posterior (no comparison)")
    parser.add_argument("--output", default="demo_output", metavar="DIR",
                        help="folder for the figures and the summary (default: demo_output)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--threads", type=_count(1), default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide progress bars")
    return parser


def build_parser(prog="python -m pyro_diffusion demo"):
    """The demo's own argument parser."""
    return add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION))


def main(argv=None):
    """Run the demo with command-line arguments (``sys.argv[1:]`` when ``argv`` is ``None``).

    :returns: a dict with the summary figures and the absolute paths of the files written.
    """
    parser = build_parser()
    return run(parser.parse_args(argv), parser)


def _draw_map(ax, outlines, values, norm, cmap, title):
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Polygon

    patches, colours = [], []
    for parts, v in zip(outlines, values, strict=True):
        for part in parts:
            patches.append(Polygon(part.numpy(), closed=True))
            colours.append(v)
    coll = PatchCollection(patches, cmap=cmap, norm=norm, edgecolor="0.3", linewidth=0.3)
    coll.set_array(torch.tensor(colours).numpy())
    ax.add_collection(coll)
    ax.autoscale_view()
    ax.set_aspect(1.25)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    return coll


def _maps(path, sids, panels):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, Normalize

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)))
    axes = [axes] if len(panels) == 1 else list(axes)
    rr_norm = LogNorm(vmin=0.25, vmax=4.0)
    for ax, (title, values, kind) in zip(axes, panels, strict=True):
        if kind == "rr":
            coll = _draw_map(ax, sids.outlines, values.clamp(0.25, 4.0), rr_norm, "RdBu_r", title)
            bar = fig.colorbar(coll, ax=ax, fraction=0.025, label="relative risk")
            bar.minorticks_off()
            bar.set_ticks([0.25, 0.5, 1.0, 2.0, 4.0], labels=["0.25", "0.5", "1", "2", "4"])
        else:
            coll = _draw_map(ax, sids.outlines, values, Normalize(0, 1), "viridis", title)
            fig.colorbar(coll, ax=ax, fraction=0.025, label="probability")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args, parser=None):
    """Run the demo with parsed arguments (see :func:`add_arguments`); returns the summary."""
    parser = parser or build_parser()
    start = time.perf_counter()
    device = _check_device(args.device, parser)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    output = Path(args.output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)

    sids = load_nc_sids()
    t = PERIODS[args.period]
    y, expected = sids.deaths[t].float(), sids.expected[t].float()
    print(f"North Carolina SIDS {sids.periods[t]}: {int(y.sum())} deaths in "
          f"{sids.num_regions} counties, {int((y == 0).sum())} counties without any")

    prior = load_nc_sids_prior(progress=False).to(device)
    print(f"diffusion prior: {prior.event_shape[0]} log relative risks, trained on CAR fields "
          "with hyperpriors (pyro_diffusion/weights/nc_sids_car.pt)")
    batch = args.num_samples // 4
    posterior = DiffusionPosterior(diffusion_model, guidance=args.guidance,
                                   num_samples=4 * batch, batch_size=batch,
                                   num_steps=args.steps, device=device, seed=args.seed,
                                   progress=args.progress)
    posterior.run(prior, expected.to(device), y.to(device))
    f_diff = posterior.get_samples()["f"].cpu()
    print(f"diffusion posterior ({type(posterior.guidance_used).__name__}, {args.steps} steps):"
          f" {f_diff.shape[0]} draws in {posterior.wall_time:.1f} s")

    results = {"diffusion": posterior}
    mcmc = None
    if not args.skip_nuts:
        mcmc = run_nuts(car_model, sids.adjacency.float(), expected, y,
                        num_samples=args.nuts_samples, warmup_steps=args.nuts_warmup,
                        num_chains=args.nuts_chains, seed=args.seed, progress=args.progress)
        print(f"NUTS with the CAR prior: {args.nuts_chains} x {args.nuts_samples} draws in "
              f"{mcmc.wall_time:.1f} s")
        results["nuts"] = mcmc

    files = {}
    summary = {"package_version": __version__, "period": sids.periods[t],
               "diffusion_seconds": posterior.wall_time}
    rr_diff = f_diff.exp()
    panels = [("observed / expected deaths", (y / expected), "rr"),
              ("relative risk: diffusion prior, posterior mean", rr_diff.mean(0), "rr"),
              ("P(relative risk > 1): diffusion prior", (rr_diff > 1).float().mean(0), "p")]
    if mcmc is not None:
        table = compare_posteriors(results, var_names=["f"], reference="nuts")
        overall = table[table["coord"] == "all"]
        columns = ["method", "num_draws", "abs_smd", "max_abs_smd", "sd_ratio", "coverage",
                   "distance", "ess_bulk", "wall_time", "ess_per_second"]
        print("\nposterior of the log relative risks f over the 100 counties, against NUTS:\n"
              "  abs_smd / max_abs_smd: mean / largest |posterior mean difference| in NUTS sds;"
              "\n  sd_ratio: mean sd ratio; coverage: share of draws inside NUTS's central 90 %"
              " intervals;\n  distance: sliced Wasserstein-1 to the NUTS draws")
        print(overall[columns].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        table.to_csv(output / "nc_sids_comparison.csv", index=False)
        files["table"] = str(output / "nc_sids_comparison.csv")
        f_nuts = mcmc.deterministic_samples["f"].cpu().float().reshape(-1, sids.num_regions)
        panels.insert(2, ("relative risk: NUTS with the CAR prior, posterior mean",
                          f_nuts.exp().mean(0), "rr"))
        fig = plot_comparison(results, "f", reference="nuts")
        fig.savefig(output / "nc_sids_comparison.png", dpi=110)
        files["comparison_plot"] = str(output / "nc_sids_comparison.png")
        summary.update(nuts_seconds=mcmc.wall_time,
                       comparison=json.loads(overall.to_json(orient="records")))
    _maps(output / "nc_sids_relative_risk.png", sids, panels)
    files["maps"] = str(output / "nc_sids_relative_risk.png")
    top = torch.argsort(rr_diff.mean(0), descending=True)[:5]
    print("\nhighest posterior relative risk (diffusion prior):")
    for i in top.tolist():
        print(f"  {sids.names[i]:<14} RR {rr_diff[:, i].mean():.2f} "
              f"(90% {rr_diff[:, i].quantile(0.05):.2f}-{rr_diff[:, i].quantile(0.95):.2f}), "
              f"P(RR > 1) = {(rr_diff[:, i] > 1).float().mean():.2f}, "
              f"{int(y[i])} deaths / {expected[i]:.1f} expected")
    summary["seconds"] = time.perf_counter() - start
    summary["files"] = files
    with open(output / "nc_sids_summary.json", "w") as fh:
        json.dump(summary, fh, indent=2)
    files["summary"] = str(output / "nc_sids_summary.json")
    print("\nwrote:")
    for path in files.values():
        print(f"  {path}")
    print(f"total {summary['seconds']:.0f} s")
    return summary
