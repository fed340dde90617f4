"""SMC benchmark: ``DiffusionSMC`` accuracy and cost against particles and steps.

Problem: the 25-component Gaussian-mixture benchmark of Cardoso et al. (2023) with its exact
denoiser (``GaussianMixtureDenoiser.grid_benchmark``), linear-Gaussian observations
``y = A x + 0.1 eps`` with a random ``A`` (``d_y x d_x``, singular values uniform on [0, 1]).
The exact posterior and evidence are in closed form (``gm.condition``).

For each ``(d_x, d_y)``, twist, number of particles and number of steps the script reports, over
the instances (mean ± sd):

- SW2: sliced Wasserstein-2 (256 projections) between ``num_samples`` resampled SMC draws and as
  many exact posterior draws (a row "exact (noise floor)" gives two exact sets);
- |log Z error|: absolute error of ``log_evidence`` against the exact ``log p(y)`` of the
  mixture prior (the SMC targets the prior of the discretised chain, which differs from it
  by the grid's error, small at these step counts);
- final ESS and the number of resampling steps;
- wall time and its split: time inside the guidance (denoiser, its Jacobian products and the
  model's trace) against everything else, which is the per-step overhead of
  ``pyro.infer.SMCFilter`` (tracing, replay, weights, resampling), in ms per step.

Twists: "MMPS" (the default for these Gaussian observations: the moment-matched covariance
``Sigma_y + sigma^2 A J A^T``) and "isotropic" (the evidence trick with the Gaussian-prior
variance ``sigma^2 sd^2 / (sigma^2 + sd^2)``, per observation; close to azula's TDS twist).
Particles sweep at ``--main-steps``; steps sweep at ``--main-particles``. Rows "guided (MMPS)"
give ``DiffusionPosterior`` with the same steps for comparison.

Usage::

    python bench/smc.py --quick
    python bench/smc.py --out smc.md
"""

import argparse
import os
import platform
import shlex
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from _common import derived_seed, fmt_pm, markdown_table

import pyro_diffusion
from pyro_diffusion import (
    DiffusionPosterior,
    DiffusionPrior,
    DiffusionSMC,
    EvidenceTrick,
    GaussianMixtureDenoiser,
    Guidance,
    sliced_wasserstein,
)
from pyro_diffusion.likelihood import ModelLikelihood
from pyro_diffusion.smc import resolve_twist

F64 = torch.float64


class TimedGuidance(Guidance):
    """Delegates to a guidance and accumulates the time spent in it."""

    def __init__(self, inner):
        self.inner = inner
        self.kinds = inner.kinds
        self.seconds = 0.0

    def evaluate(self, lik, prior, x, sigma, value=False):
        tic = time.perf_counter()
        out = self.inner.evaluate(lik, prior, x, sigma, value=value)
        self.seconds += time.perf_counter() - tic
        return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 80], help="d_x (8 80)")
    parser.add_argument("--obs-dims", type=int, nargs="+", default=[1, 2], help="d_y (1 2)")
    parser.add_argument("--particles", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--main-steps", type=int, default=100,
                        help="steps of the particle sweep (100); other steps run with "
                             "--main-particles only")
    parser.add_argument("--main-particles", type=int, default=1024,
                        help="particles of the step sweep and of the isotropic twist (1024)")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=2000,
                        help="resampled draws and exact draws for SW2 (2000)")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="d_x = 8, d_y = 1, 2 instances, particles 64 256 1024, 100 steps")
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.obs_dims, args.instances = [8], [1], 2
        args.particles, args.steps = [64, 256, 1024], [100]
    return args


def instance(gm, d, m, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    A = u @ torch.diag(torch.rand(m, generator=gen, dtype=F64)) @ v[:m]
    torch.manual_seed(seed)
    y = A @ gm.sample_data(1)[0] + noise * torch.randn(m, dtype=F64)
    return A, y


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
    info = [f"command: `{command}`",
            f"torch {torch.__version__}, pyro {pyro.__version__}, pyro_diffusion "
            f"{pyro_diffusion.__version__}, python {platform.python_version()}, float64, "
            f"threads {torch.get_num_threads()}, {os.cpu_count()} logical cores visible",
            f"instances {args.instances}, noise sd {args.noise}, draws {args.num_samples}, "
            f"seed {args.seed}"]
    print("\n".join(info), flush=True)
    header = ["d_x", "d_y", "method", "particles", "steps", "wall s", "guidance s",
              "overhead ms/step", "final ESS", "resamples", "|log Z error|", "SW2"]
    rows = []
    n = args.num_samples
    for d in args.dims:
        gm = GaussianMixtureDenoiser.grid_benchmark(d, seed=0)
        for m in args.obs_dims:
            cases = []
            for i in range(args.instances):
                A, y = instance(gm, d, m, args.noise, derived_seed(args.seed, "A", d, m, i))
                post, log_z = gm.condition(A, y, args.noise ** 2)
                torch.manual_seed(derived_seed(args.seed, "ref", d, m, i))
                ref = post.sample_data(n)
                floor = sliced_wasserstein(post.sample_data(n), ref, seed=args.seed)
                cases.append((A, y, ref, float(log_z), floor))
            rows.append([d, m, "exact (noise floor)", "–", "–", "–", "–", "–", "–", "–", "–",
                         fmt_pm([c[4] for c in cases])])
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
            for steps in args.steps:
                prior = DiffusionPrior(gm, (d,), num_steps=steps)
                res = []
                for i, (A, y, ref, _, _) in enumerate(cases):
                    model = _model(A, args.noise)
                    post = DiffusionPosterior(model, num_samples=n, batch_size=n,
                                              num_steps=steps, progress=False,
                                              seed=derived_seed(args.seed, "mmps", d, m, i))
                    post.run(prior, y)
                    res.append((post.wall_time, sliced_wasserstein(
                        post.get_samples()["f"], ref, seed=args.seed)))
                rows.append([d, m, "guided (MMPS)", n, steps,
                             f"{sum(r[0] for r in res) / len(res):.2f}", "–", "–", "–", "–",
                             "–", fmt_pm([r[1] for r in res])])
                print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
                twists = [("SMC (MMPS twist)", "auto"),
                          ("SMC (isotropic twist)", EvidenceTrick(variance="isotropic"))]
                for label, twist in twists:
                    sweep = args.particles if steps == args.main_steps else [args.main_particles]
                    for particles in sweep:
                        if twist != "auto" and particles != args.main_particles:
                            continue
                        res = []
                        for i, (A, y, ref, log_z, _) in enumerate(cases):
                            model = _model(A, args.noise)
                            inner = resolve_twist(twist, ModelLikelihood(model, (prior, y)))
                            timed = TimedGuidance(inner)
                            smc = DiffusionSMC(model, guidance=timed, num_particles=particles,
                                               num_steps=steps, progress=False,
                                               seed=derived_seed(args.seed, label, d, m, i,
                                                                 steps, particles))
                            smc.run(prior, y)
                            x = smc.get_samples(n)["f"]
                            res.append((smc.wall_time, timed.seconds,
                                        1e3 * (smc.wall_time - timed.seconds) / steps,
                                        smc.ess, sum(smc.resampled),
                                        abs(smc.log_evidence - log_z),
                                        sliced_wasserstein(x, ref, seed=args.seed)))
                        cols = list(zip(*res, strict=True))
                        rows.append([d, m, label, particles, steps,
                                     f"{sum(cols[0]) / len(res):.2f}",
                                     f"{sum(cols[1]) / len(res):.2f}",
                                     f"{sum(cols[2]) / len(res):.1f}",
                                     f"{sum(cols[3]) / len(res):.0f}",
                                     f"{sum(cols[4]) / len(res):.1f}",
                                     fmt_pm(cols[5]), fmt_pm(cols[6])])
                        print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    table = markdown_table(header, rows)
    print()
    print(table)
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(f"- {line}" for line in info) + "\n\n" + table + "\n")


def _model(A, noise):
    def model(prior, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Normal(f @ A.T, noise).to_event(1), obs=y)

    return model


if __name__ == "__main__":
    main()
