"""The NC SIDS demo problem with each posterior sampler against NUTS with the CAR prior.

North Carolina SIDS deaths 1974-78 with expected counts, the shipped CAR diffusion prior
(``load_nc_sids_prior``), and NUTS on ``car_model`` (2 x (500 + 500)) as the reference; the
guided evidence trick (``DiffusionPosterior``, 200 steps) and ``DiffusionLangevin`` (100 and 200
steps), 1000 draws each in 4 batches. Prints ``compare_posteriors``'s summary rows.

    .venv/bin/python bench/sids_samplers.py --threads 1
    .venv/bin/python bench/sids_samplers.py --threads 1 --prior /tmp/skip.pt --langevin-steps 50
    .venv/bin/python bench/sids_samplers.py --threads 1 --langevin-steps --guided-samplers \
        ancestral ddim heun --guided-steps 64 200

``--prior`` takes another prior over the 100 counties (e.g. one trained by
``scripts/train_nc_sids_prior.py --gaussian-skip``); ``--langevin-steps`` the
``DiffusionLangevin`` step counts (its preconditioner is chosen from the prior: Gaussian with
a Gaussian skip, else diagonal); ``--guided-samplers`` and ``--guided-steps`` the reverse
samplers and step counts of the guided rows.
"""

import argparse

import torch
from _common import markdown_table

from pyro_diffusion import DiffusionLangevin, DiffusionPosterior, DiffusionPrior
from pyro_diffusion.datasets import load_nc_sids
from pyro_diffusion.diagnostics import compare_posteriors, run_nuts
from pyro_diffusion.disease_mapping import car_model, diffusion_model, load_nc_sids_prior


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prior", default=None, help="a saved prior (default: the shipped one)")
    parser.add_argument("--langevin-steps", type=int, nargs="*", default=[100, 200])
    parser.add_argument("--skip-guided", action="store_true")
    parser.add_argument("--guided-samplers", nargs="+", default=["ancestral"],
                        choices=["ancestral", "ddim", "heun"],
                        help="reverse samplers of the guided evidence-trick rows")
    parser.add_argument("--guided-steps", type=int, nargs="+", default=[200])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sids = load_nc_sids()
    y, expected = sids.deaths[0].float(), sids.expected[0].float()
    prior = (load_nc_sids_prior(progress=False) if args.prior is None
             else DiffusionPrior.load(args.prior, progress=False))
    results = {"NUTS (CAR prior)": run_nuts(car_model, sids.adjacency.float(), expected, y,
                                            num_samples=500, warmup_steps=500, num_chains=2,
                                            seed=0, progress=False)}
    for steps in args.langevin_steps:
        results[f"DiffusionLangevin {steps}"] = DiffusionLangevin(
            diffusion_model, 1000, steps, batch_size=250, seed=0, progress=False,
        ).run(prior, expected, y)
    for sampler in [] if args.skip_guided else args.guided_samplers:
        for steps in args.guided_steps:
            label = f"evidence trick {steps}" + ("" if sampler == "ancestral" else f" {sampler}")
            results[label] = DiffusionPosterior(
                diffusion_model, num_samples=1000, num_steps=steps, batch_size=250, seed=0,
                sampler=sampler, progress=False,
            ).run(prior, expected, y)
    table = compare_posteriors(results, var_names=["f"], reference="NUTS (CAR prior)")
    columns = ["method", "abs_smd", "max_abs_smd", "sd_ratio", "coverage", "ess_bulk",
               "wall_time", "ess_per_second"]
    rows = table[table.coord == "all"][columns].round(3).values.tolist()
    print(markdown_table(columns, rows))


if __name__ == "__main__":
    main()
