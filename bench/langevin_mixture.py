"""DiffusionLangevin on a multimodal posterior: the 25-component mixture benchmark.

The grid mixture of Cardoso et al. (2023) (``GaussianMixtureDenoiser.grid_benchmark``) in
d = 2 and 8, one noisy linear observation, exact posterior by conditioning the mixture. Sliced
Wasserstein-2 (256 projections) to 2000 exact posterior draws for ``DiffusionLangevin`` (200 and
1000 steps) and guided MMPS (100 steps), and the floor (two sets of exact draws).

    .venv/bin/python bench/langevin_mixture.py --threads 1
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from _common import markdown_table

from pyro_diffusion import (
    DiffusionLangevin,
    DiffusionPosterior,
    DiffusionPrior,
    GaussianMixtureDenoiser,
    sliced_wasserstein,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--draws", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for d, noise in [(2, 0.5), (8, 1.0)]:
        gm = GaussianMixtureDenoiser.grid_benchmark(d, seed=0, dtype=torch.float64)
        gen = torch.Generator().manual_seed(1)
        A = torch.randn(1, d, generator=gen, dtype=torch.float64)
        torch.manual_seed(0)
        y = A @ gm.sample_data(1)[0] + noise * torch.randn(1, generator=gen, dtype=torch.float64)
        post, _ = gm.condition(A, y, noise ** 2)
        exact = post.sample_data(args.draws)
        prior = DiffusionPrior(gm, (d,))

        def model(prior, y, A=A, noise=noise):
            f = pyro.sample("f", prior)
            pyro.sample("y", dist.Normal(f @ A.T, noise).to_event(1), obs=y)

        def sw(x, exact=exact):
            return float(sliced_wasserstein(x, exact, num_projections=256))

        rows.append([d, "floor (exact vs exact)", "–", f"{sw(post.sample_data(args.draws)):.2f}",
                     "–"])
        for steps in (200, 1000):
            run = DiffusionLangevin(model, args.draws, steps, seed=0, progress=False).run(prior, y)
            rows.append([d, "DiffusionLangevin", steps, f"{sw(run.get_samples()['f']):.2f}",
                         f"{run.wall_time:.1f}"])
        run = DiffusionPosterior(model, num_samples=args.draws, num_steps=100, seed=0,
                                 progress=False).run(prior, y)
        rows.append([d, "guided MMPS", 100, f"{sw(run.get_samples()['f']):.2f}",
                     f"{run.wall_time:.1f}"])
    print(markdown_table(["d", "method", "steps", "SW2 to exact", "wall s"], rows))


if __name__ == "__main__":
    main()
