"""Train the diffusion prior shipped in ``pyro_diffusion/weights/nc_sids_car.pt``.

The prior is over the log relative risks of the 100 North Carolina counties under the CAR model
with hyperpriors of :mod:`pyro_diffusion.disease_mapping` (intercept, spatial dependence and
precision drawn per field). The script draws training fields, trains an EDM-preconditioned MLP,
checks the learned prior against fresh CAR draws (covariance and marginal sds) and writes the
checkpoint plus a JSON record of the settings and checks.

Usage (from the repository root)::

    python scripts/train_nc_sids_prior.py                 # the shipped settings
    python scripts/train_nc_sids_prior.py --steps 500 --out /tmp/prior.pt   # a quick try
    python scripts/train_nc_sids_prior.py --gaussian-skip --steps 2000 --out /tmp/skip.pt
"""

import argparse
import json
import os
import time

import torch

from pyro_diffusion import DiffusionPrior, __version__
from pyro_diffusion.datasets import load_nc_sids
from pyro_diffusion.disease_mapping import nc_sids_prior_path, sample_log_risk


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-train", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gaussian-skip", action="store_true",
                        help="train with the Gaussian skip (the shipped prior has none)")
    parser.add_argument("--out", default=nc_sids_prior_path())
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    sids = load_nc_sids()
    train = sample_log_risk(args.num_train, sids.adjacency, seed=args.seed)
    prior = DiffusionPrior.fit(train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               seed=args.seed, validation_fraction=0.02, num_steps=64,
                               sampler="heun", gaussian_skip=args.gaussian_skip)
    fresh = sample_log_risk(20_000, sids.adjacency, seed=args.seed + 1000)
    torch.manual_seed(args.seed)
    draws = prior.sample((20_000,))
    ref_cov, cov = fresh.T.cov(), draws.T.cov()
    half = sample_log_risk(20_000, sids.adjacency, seed=args.seed + 2000)
    checks = {
        "cov_rel_frobenius": float((cov - ref_cov).norm() / ref_cov.norm()),
        "cov_rel_frobenius_floor": float((half.T.cov() - ref_cov).norm() / ref_cov.norm()),
        "sd_ratio_min": float((draws.std(0) / fresh.std(0)).min()),
        "sd_ratio_max": float((draws.std(0) / fresh.std(0)).max()),
        "mean_abs_diff": float((draws.mean(0) - fresh.mean(0)).abs().max()),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    prior.save(args.out)
    record = {"package_version": __version__, "settings": vars(args), "checks": checks,
              "seconds": time.perf_counter() - start,
              "final_val_loss": prior.training_history["val_loss"][-1][1]}
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(record, fh, indent=2)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
