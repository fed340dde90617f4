"""How well a learned denoiser's score matches the exact one, overall and in smooth directions.

For the GP priors cached by ``bench/vs_nuts.py`` (fixed hyperparameters, 1-D grid of 256 points
and 16 x 16 grid; ``--priors`` picks which: trained without and with the Gaussian skip), the
relative error ``||s_learned - s_exact|| / ||s_exact||`` of the score
``(D(x; rho) - x) / rho^2`` at ``x = f + rho * eps``, for ``f`` drawn from the GP prior and from
the cached reference posterior (Poisson data), averaged over 500 points; once over all
coordinates and once projected on the ``--top`` leading eigenvectors of the kernel matrix (the
smoothest directions, which carry a field's large-scale uncertainty).

    .venv/bin/python bench/score_error.py --threads 1

With ``--form hyper`` the same for the priors of the ``hyper`` form (1-D grid of 256 points,
lengthscale and variance hyperpriors) against the exact scale mixture (``--exact-prior`` of
``bench/vs_nuts.py``), with the posterior draws of the cached NumPyro references for
``--likelihoods``; ``--skip-only`` adds a row per prior with its network's output set to zero
(the Gaussian or mixture skip alone), which shows what the network adds.

Needs the cache of a ``bench/vs_nuts.py`` run (``--cache``, default as there).
"""

import argparse
import copy
import os

import torch
import vs_nuts
from _common import markdown_table

from pyro_diffusion import DiffusionPrior, GaussianDenoiser
from pyro_diffusion.datasets import sample_gp


class _Zero(torch.nn.Module):
    """A network whose output is zero: an ``EDMDenoiser`` around it is its skip alone."""

    def forward(self, z, c_noise):
        return torch.zeros_like(z)


def skip_only(prior):
    """A copy of ``prior`` whose denoiser's network outputs zero."""
    den = copy.deepcopy(prior.denoiser)
    den.net = _Zero()
    return DiffusionPrior(den, prior.event_shape)


def problems(args):
    """``(tag, exact denoiser, {x from: draws}, smooth directions, prior file stem)``."""
    if args.form == "hyper":
        _, points = vs_nuts.grid("1d", 256)
        sqdist = vs_nuts.squared_distances(points)
        exact = vs_nuts.scale_mixture_prior(sqdist).denoiser
        cov = torch.exp(-0.5 * sqdist / vs_nuts.LENGTHSCALE ** 2)
        draws = {"prior": sample_gp(args.points, points, jitter=vs_nuts.JITTER, seed=1,
                                    **vs_nuts.gp_hyperparameters("hyper")).float()}
        for lik in args.likelihoods:
            path = os.path.join(args.cache,
                                f"ref_256_hyper_{lik}_seed0_2x500+1000_numpyro.pt")
            if not os.path.exists(path):
                print(f"skipping the {lik} posterior: run bench/vs_nuts.py for it first "
                      f"({path})")
                continue
            ref = torch.load(path, weights_only=True)["f"].reshape(-1, 256).float()
            draws[f"posterior ({lik})"] = ref[torch.randperm(ref.shape[0])[:args.points]]
        smooth = torch.linalg.eigh(cov)[1][:, -args.top:].float()
        yield "256", exact, draws, smooth, "prior_256_hyper_n20000"
        return
    for kind, size, tag in [("1d", 256, "256"), ("2d", 16, "16x16")]:
        _, points = vs_nuts.grid(kind, size)
        d = points.shape[0]
        cov = torch.exp(-0.5 * vs_nuts.squared_distances(points) / vs_nuts.LENGTHSCALE ** 2)
        cov = cov + vs_nuts.JITTER * torch.eye(d, dtype=cov.dtype)
        exact = GaussianDenoiser(torch.zeros(d), cov.float())
        ref_path = os.path.join(args.cache, f"ref_{tag}_fixed_poisson_seed0_4x500+500.pt")
        if not os.path.exists(ref_path):
            print(f"skipping {tag}: run bench/vs_nuts.py for it first ({ref_path})")
            continue
        ref = torch.load(ref_path, weights_only=True)["f"].reshape(-1, d).float()
        draws = {"prior": (torch.linalg.cholesky(cov) @ torch.randn(d, args.points,
                                                                    dtype=cov.dtype)).T.float(),
                 "posterior": ref[torch.randperm(ref.shape[0])[:args.points]]}
        yield tag, exact, draws, exact.evecs[:, -args.top:], f"prior_{tag}_fixed_n20000"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="/tmp/pyro_diffusion_bench_cache")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5, 1.0])
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--points", type=int, default=500)
    parser.add_argument("--priors", nargs="+", default=["s3000", "s2000_skip"],
                        help="cached priors to compare, by the end of their file name "
                             "(prior_<grid>_fixed_n20000_<this>.pt without the seed part): "
                             "s3000 (no Gaussian skip, runs 1-5), s2000_skip (runs 6-7), "
                             "s2000_skip_w128; with --form hyper e.g. s2000_mix8_w128")
    parser.add_argument("--form", choices=["fixed", "hyper"], default="fixed")
    parser.add_argument("--likelihoods", nargs="+", default=["poisson", "binomial"],
                        help="posterior draws of these references (--form hyper)")
    parser.add_argument("--skip-only", action="store_true",
                        help="also each prior with its network's output set to zero")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for tag, exact, draws, smooth, stem in problems(args):
        priors = []
        for variant in args.priors:
            steps, _, rest = variant.partition("_")
            prior_path = os.path.join(args.cache, f"{stem}_{steps}_seed0"
                                                  f"{'_' + rest if rest else ''}.pt")
            if not os.path.exists(prior_path):
                print(f"skipping {tag} {variant}: no cached prior {prior_path}")
                continue
            learned = DiffusionPrior.load(prior_path)
            priors.append((variant, learned))
            if args.skip_only:
                priors.append((f"{variant} (skip only)", skip_only(learned)))
        for variant, learned in priors:
            for name, base in draws.items():
                row_all = [tag, variant, name, "all"]
                row_top = [tag, variant, name, f"top {args.top}"]
                for rho in args.rhos:
                    x = base + rho * torch.randn_like(base)
                    sigma = torch.full((x.shape[0],), rho)
                    with torch.no_grad():
                        s_exact = (exact(x, sigma) - x) / rho ** 2
                        s_learned = (learned.denoise(x, sigma) - x) / rho ** 2
                    diff = s_learned - s_exact
                    err_all = diff.norm(dim=1).mean() / s_exact.norm(dim=1).mean()
                    err_top = ((diff @ smooth).norm(dim=1).mean()
                               / (s_exact @ smooth).norm(dim=1).mean())
                    row_all.append(f"{float(err_all):.3f}")
                    row_top.append(f"{float(err_top):.3f}")
                rows += [row_all, row_top]
    header = ["grid", "prior", "x from", "directions"] + [f"rho = {r:g}" for r in args.rhos]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
