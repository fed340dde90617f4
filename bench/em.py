"""EM benchmark: ``fit_prior`` learning a helix in R^3 from random projections (DiEM).

Truth: points on a helix ``(cos t, sin t, t / 2 pi - 1)``, ``t ~ U(0, 4 pi)``. Each of the
``N`` observations sees one point through its own random ``rows x 3`` projection (unit-norm
rows) with Gaussian noise. After the Gaussian initialisation (lap 0) and every lap the script
reports the sliced Wasserstein-1 distance (256 projections) between 4000 draws of the current
prior (Heun, 32 steps) and 4000 fresh draws of the truth, its ratio to the Gaussian's, the
floor (truth against truth), and the time of the E-step (posterior sampling, MMPS) and of the
M-step (denoiser training).

Usage::

    python bench/em.py --quick
    python bench/em.py --device cuda --out em_cuda.md
"""

import argparse
import math
import os
import platform
import shlex
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from _common import markdown_table

import pyro_diffusion
from pyro_diffusion import fit_prior, sliced_wasserstein


def helix(n, gen):
    t = torch.rand(n, generator=gen) * 4 * math.pi
    return torch.stack([torch.cos(t), torch.sin(t), t / (2 * math.pi) - 1.0], -1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--observations", type=int, default=8192)
    parser.add_argument("--rows", type=int, nargs="+", default=[2],
                        help="projection rows per observation (2; 1 is much harder)")
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--laps", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--num-steps", type=int, default=64, help="E-step sampler steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="2048 observations, 3 laps, 600 steps a lap")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.observations, args.laps, args.train_steps = 2048, 3, 600
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    info = [f"command: `{command}`",
            f"torch {torch.__version__}, pyro {pyro.__version__}, pyro_diffusion "
            f"{pyro_diffusion.__version__}, python {platform.python_version()}, float32",
            f"device {device} ({name}), threads {torch.get_num_threads()}; N = "
            f"{args.observations}, noise {args.noise}, {args.train_steps} training steps a "
            f"lap, E-step {args.num_steps} ancestral steps (MMPS), seed {args.seed}"]
    print("\n".join(info), flush=True)
    header = ["rows", "lap", "SW1 to truth", "ratio to Gaussian", "floor", "E-step s",
              "M-step s", "lap s"]
    rows = []
    start = time.perf_counter()
    for r in args.rows:
        gen = torch.Generator().manual_seed(args.seed)
        N = args.observations
        x = helix(N, gen)
        A = torch.randn(N, r, 3, generator=gen)
        A = A / A.norm(dim=-1, keepdim=True)
        y = (A @ x[..., None])[..., 0] + args.noise * torch.randn(N, r, generator=gen)
        truth, truth2 = helix(4000, gen), helix(4000, gen)
        floor = sliced_wasserstein(truth2, truth, seed=args.seed)
        def model(prior, A, y, noise=args.noise):
            f = pyro.sample("f", prior)
            pyro.sample("y", dist.Normal((A @ f[..., None])[..., 0], noise).to_event(1),
                        obs=y)

        scores = {}

        def callback(lap, prior, metrics, r=r, truth=truth, floor=floor, scores=scores):
            torch.manual_seed(args.seed + 1)
            if lap == 0:
                s = prior.denoiser.sample_data(4000)
            else:
                s = prior.replace(sampler="heun", num_steps=32).sample((4000,))
            scores[lap] = sliced_wasserstein(s.cpu(), truth, seed=args.seed)
            rows.append([r, lap, f"{scores[lap]:.4f}", f"{scores[lap] / scores[0]:.3f}",
                         f"{floor:.4f}", f"{metrics.get('e_seconds', float('nan')):.1f}",
                         f"{metrics.get('m_seconds', float('nan')):.1f}",
                         f"{metrics['seconds']:.1f}"])
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)

        fit_prior(model, {"A": A.to(device), "y": y.to(device)}, event_shape=(3,),
                  laps=args.laps, train_steps=args.train_steps, num_steps=args.num_steps,
                  callback=callback, device=device, progress=False, seed=args.seed)
    table = markdown_table(header, rows)
    print()
    print(table)
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(f"- {line}" for line in info) + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
