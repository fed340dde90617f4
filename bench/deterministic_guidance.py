"""Guided posteriors with deterministic and stochastic reverse samplers, exact or learned prior.

A Gaussian process on 48 points of [0, 1] (RBF, lengthscale 0.15), every second point observed
with Gaussian noise 0.2: the posterior is Gaussian and known exactly. The prior is either the
exact ``GaussianDenoiser`` or a ``DiffusionPrior.fit`` on 4000 GP draws for each of
``--train-steps``; each is sampled with MMPS (direct solver, exact for the Gaussian prior) and
the evidence trick by the ancestral sampler, DDIM (``eta=0``) and Heun, 400 draws each, and
scored with ``compare_posteriors`` against 4000 exact posterior draws (mean error in posterior
sds, sd ratio, share of draws inside the exact 90 % intervals).

    .venv/bin/python bench/deterministic_guidance.py --threads 1
    .venv/bin/python bench/deterministic_guidance.py --threads 1 --train-steps 1500 6000

The deterministic samplers integrate the guided probability-flow ODE, which carries any error
of the posterior denoiser to the end; the ancestral sampler's fresh noise forgets part of it at
every step.
"""

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from _common import markdown_table

from pyro_diffusion import (
    MMPS,
    DiffusionPosterior,
    DiffusionPrior,
    EvidenceTrick,
    GaussianDenoiser,
)
from pyro_diffusion.datasets import gp_covariance, sample_gp
from pyro_diffusion.diagnostics import compare_posteriors

D, LENGTHSCALE, NOISE = 48, 0.15, 0.2
OBS = torch.arange(0, D, 2)


def model(prior, y):
    f = pyro.sample("f", prior)
    pyro.sample("y", dist.Normal(f[..., OBS], NOISE).to_event(1), obs=y)


def problem(seed=0):
    """The exact prior covariance, the data and 4000 exact posterior draws (float64)."""
    x = torch.linspace(0, 1, D)
    cov = gp_covariance(x, lengthscale=LENGTHSCALE) + 1e-6 * torch.eye(D, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    truth = sample_gp(1, x, lengthscale=LENGTHSCALE, seed=seed + 5)[0].double()
    y = truth[OBS] + NOISE * torch.randn(len(OBS), generator=gen, dtype=torch.float64)
    A = torch.eye(D, dtype=torch.float64)[OBS]
    post, _ = GaussianDenoiser(torch.zeros(D, dtype=torch.float64), cov).condition(
        A, y, NOISE ** 2)
    post_cov = 0.5 * (post.cov + post.cov.T) + 1e-9 * torch.eye(D, dtype=torch.float64)
    torch.manual_seed(seed)
    return x, cov, y, torch.distributions.MultivariateNormal(post.mean, post_cov).sample((4000,))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-steps", type=int, nargs="+", default=[1500])
    parser.add_argument("--num-steps", type=int, default=64, help="reverse steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, cov, y, exact = problem(args.seed)
    priors = {"exact": DiffusionPrior(GaussianDenoiser(torch.zeros(D), cov.float()), (D,))}
    draws = sample_gp(4000, x, lengthscale=LENGTHSCALE, seed=args.seed)
    for steps in args.train_steps:
        start = time.perf_counter()
        priors[f"learned, {steps} steps"] = DiffusionPrior.fit(draws, steps=steps,
                                                               seed=args.seed, progress=False)
        print(f"trained {steps} steps in {time.perf_counter() - start:.0f} s")
    rows = []
    for label, prior in priors.items():
        results = {"exact": {"f": exact[None]}}
        for name, guidance in (("MMPS", MMPS(solver="direct")), ("evidence", EvidenceTrick())):
            for sampler in ("ancestral", "ddim", "heun"):
                results[f"{name}|{sampler}"] = DiffusionPosterior(
                    model, guidance=guidance, sampler=sampler, num_samples=400,
                    batch_size=200, num_steps=args.num_steps, seed=args.seed,
                    progress=False).run(prior, y.float())
        table = compare_posteriors(results, "f", reference="exact")
        table = table[(table.coord == "all") & (table.method != "exact")]
        for _, r in table.iterrows():
            rows.append([label, *r.method.split("|"), f"{r.abs_smd:.3f}",
                         f"{r.max_abs_smd:.3f}", f"{r.sd_ratio:.3f}", f"{r.coverage:.3f}"])
    print(markdown_table(["prior", "guidance", "sampler", "abs smd", "max abs smd",
                          "sd ratio", "coverage"], rows))


if __name__ == "__main__":
    main()
