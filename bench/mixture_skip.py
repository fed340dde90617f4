"""How well a Gaussian-mixture skip fitted by EM denoises GP draws under hyperpriors.

Data: GP fields on ``d`` points in [0, 1] (RBF kernel) with lengthscale ~ LogNormal(log 0.1,
0.3) and variance ~ LogNormal(0, 0.3), as in ``bench/vs_nuts.py``'s ``hyper`` form: 20000
training draws, ``--num-test`` held-out draws. The exact denoiser is the scale mixture over a
``--nodes`` x ``--nodes`` Gauss-Hermite grid of log lengthscales and log variances (24 x 24,
576 components, by default).

For each number of components K (K = 1 is the Wiener filter of the samples' Ledoit-Wolf
covariance, the plain Gaussian skip), :func:`pyro_diffusion.fit_gaussian_mixture` is fitted and
its exact denoiser compared with the scale mixture's on noisy held-out draws:

- rel. score error at sigma: ``sqrt(mean ||D_fit - D_exact||^2 / ||D_exact - x||^2)``, the
  relative error of the score the skip contributes at that noise level (before any network);
- test loglik / d: the fitted mixture's mean log density per coordinate on the held-out draws
  (the exact one in the header);
- EM iterations and fit time.

``--oracle`` adds mixtures made by hand from the exact one, with no sampling error, which ask
what a mixture skip must resolve: "lengthscale in K bins" pools the exact mixture's components
into K runs of adjacent lengthscale nodes (equal numbers of nodes; K = ``--nodes``: one bin
per node), each one Gaussian with their weighted average covariance (every variance pooled);
"variance in K bins" bins the variance nodes the same way and pools the lengthscales. They
show along which hyperparameter a fit's components must be spent.

Usage::

    python bench/mixture_skip.py --dims 64 --components 1 4 8 16 --threads 1
    python bench/mixture_skip.py --dims 256 --components 8 16 --oracle 4 8 16 --nodes 16
"""

import argparse
import math
import time

import torch
from _common import binned_mixture, gp_scale_mixture, markdown_table
from torch.distributions import LogNormal

from pyro_diffusion import fit_gaussian_mixture
from pyro_diffusion.datasets import sample_gp

SIGMAS = (0.05, 0.1, 0.3, 1.0)


def exact_scale_mixture(points, nodes=24):
    sqdist = (points[:, None] - points[None]).square()
    return gp_scale_mixture(sqdist, 0.1, 0.3, 0.3, jitter=1e-6, nodes=nodes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64])
    parser.add_argument("--components", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--oracle", type=int, nargs="*", default=[],
                        help="also the exact mixture pooled into these numbers of lengthscale "
                             "bins, and of variance bins (see above)")
    parser.add_argument("--nodes", type=int, default=24,
                        help="Gauss-Hermite nodes per hyperparameter of the exact mixture")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hyper = {"lengthscale": LogNormal(math.log(0.1), 0.3), "variance": LogNormal(0.0, 0.3)}
    for d in args.dims:
        points = torch.linspace(0, 1, d, dtype=torch.float64)
        train = sample_gp(20000, points, jitter=1e-6, seed=1, **hyper).double()
        test = sample_gp(args.num_test, points, jitter=1e-6, seed=2, **hyper).double()
        exact = exact_scale_mixture(points, args.nodes)
        noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(3),
                            dtype=torch.float64)
        targets = {}
        for s in SIGMAS:
            xs = test + s * noise
            targets[s] = (xs, exact(xs, torch.full((len(xs),), s, dtype=torch.float64)))
        rows = []
        candidates = [(f"EM fit, K = {k}", k) for k in args.components]
        candidates += [(f"lengthscale in {k} bins", (k, 0)) for k in args.oracle]
        candidates += [(f"variance in {k} bins", (k, 1)) for k in args.oracle]
        for label, k in candidates:
            tic = time.perf_counter()
            if isinstance(k, tuple):
                fit, history = binned_mixture(exact, args.nodes, *k), []
                k = fit.log_weights.numel()
            else:
                fit, history = fit_gaussian_mixture(train, k, return_history=True)
            seconds = time.perf_counter() - tic
            errs = []
            for s in SIGMAS:
                xs, want = targets[s]
                got = fit(xs, torch.full((len(xs),), s, dtype=torch.float64))
                rel = (got - want).square().sum(1) / (want - xs).square().sum(1)
                errs.append(f"{rel.mean().sqrt().item():.3f}")
            ll = fit.log_density(test).mean().item() / d
            rows.append([d, label, k, len(history) or "–", f"{seconds:.1f}", f"{ll:.3f}",
                         *errs])
        exact_ll = exact.log_density(test).mean().item() / d
        print(f"\nd = {d}: exact scale mixture ({args.nodes} x {args.nodes} nodes)'s test "
              f"loglik / d {exact_ll:.3f}, torch threads {torch.get_num_threads()}\n")
        print(markdown_table(["d", "mixture", "K", "EM iterations", "fit s", "test loglik / d"]
                             + [f"rel. score error at {s}" for s in SIGMAS], rows))


if __name__ == "__main__":
    main()
