"""Host reads per sampler step: how often each sampler makes the CPU wait for the device.

On a GPU every read of a tensor's value on the host (``bool(t)``, ``t.item()``, ``float(t)``,
``t.tolist()``, ``t.nonzero()``, a constraint check in a distribution) waits for all queued
kernels to finish, so the host cannot queue the next step's kernels while the GPU works. With
small batches, where the GPU is bound by kernel launches, these waits cost time; on a CPU they
cost nothing. This script counts them.

Counting: on every device, calls of those ``torch.Tensor`` methods are counted while a sampler
runs (a proxy that works on a CPU); on CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` also
counts the synchronising CUDA calls themselves. Each sampler runs twice, with ``--steps`` and
twice as many steps (Langevin: its Langevin steps; the rest: reverse steps), so

    reads per step = (reads at 2 S - reads at S) / S

separates the per-step reads from the once-per-run ones (setting up, the Laplace start,
resampling decisions of SMC are per step too).

Problem: the shipped North Carolina prior (``load_nc_sids_prior``: an ``EDMDenoiser`` with the
default network over 100 counties) with simulated Poisson counts (expected counts 5), and for
MMPS, Gaussian observations of the same field. ``--validation off`` runs with Pyro's and
torch's distribution argument checks off (``pyro.validation_enabled(False)``), which shows how
many reads those checks make.

Usage::

    python bench/host_syncs.py --threads 1
    python bench/host_syncs.py --device cuda --validation on off --out host_syncs_cuda.md
"""

import argparse
import contextlib
import os
import platform
import shlex
import sys
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from _common import markdown_table

import pyro_diffusion
from pyro_diffusion import DiffusionLangevin, DiffusionPosterior, DiffusionSMC
from pyro_diffusion.disease_mapping import diffusion_model, load_nc_sids_prior

#: Tensor methods that read a value back to the host.
READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "nonzero")


class HostReads:
    """Counts calls of :data:`READS` while active (and, on CUDA, synchronising calls)."""

    def __init__(self, cuda):
        self.cuda = cuda
        self.reads = 0
        self.syncs = 0
        self._saved = {}

    def _wrap(self, original):
        def counted(tensor, *args, **kwargs):
            self.reads += 1
            return original(tensor, *args, **kwargs)
        return counted

    @contextlib.contextmanager
    def __call__(self):
        self.reads = self.syncs = 0
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(original))
        try:
            if not self.cuda:
                yield self
                return
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    yield self
                    torch.cuda.synchronize()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            self.syncs = sum("synchroniz" in str(w.message) for w in caught)
        finally:
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)


def gaussian_model(prior, y, scale=0.5):
    f = pyro.sample("f", prior)
    with pyro.plate("areas", y.shape[-1]):
        pyro.sample("y", dist.Normal(f, scale), obs=y)


def samplers(prior, data, num_samples, seed):
    """``name -> run(steps)``: one seeded run of each sampler on the problem with ``steps``
    steps (reverse steps; Langevin steps for ``DiffusionLangevin``), returning the draws (prior
    sampling) or the finished sampler."""
    common = {"num_samples": num_samples, "batch_size": num_samples, "seed": seed,
              "progress": False}
    counts = (data["expected"], data["counts"])

    def prior_sampling(sampler):
        def run(steps):
            with pyro_diffusion.seeding.seeded(seed, prior.device):
                return prior.replace(num_steps=steps, sampler=sampler).sample((num_samples,))
        return run

    def guided(guidance):
        model, args = ((gaussian_model, (data["gaussian"],)) if guidance == "mmps"
                       else (diffusion_model, counts))
        return lambda steps: DiffusionPosterior(model, guidance=guidance, num_steps=steps,
                                                **common).run(prior, *args)

    return {
        "prior ancestral": prior_sampling("ancestral"),
        "prior heun": prior_sampling("heun"),
        "posterior dps": guided("dps"),
        "posterior evidence": guided("evidence"),
        "posterior mmps": guided("mmps"),
        "langevin": lambda steps: DiffusionLangevin(diffusion_model, num_steps=steps,
                                                    **common).run(prior, *counts),
        "smc": lambda steps: DiffusionSMC(diffusion_model, num_particles=num_samples,
                                          num_steps=steps, seed=seed, progress=False).run(
            prior, *counts),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--samplers", nargs="+", default=None,
                        help="names from the table (default: all)")
    parser.add_argument("--validation", nargs="+", choices=["on", "off"], default=["on"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    prior = load_nc_sids_prior(progress=False).to(device)
    n = prior.event_shape.numel()
    gen = torch.Generator().manual_seed(args.seed)
    truth = 0.3 * torch.randn(n, generator=gen)  # a log relative risk field
    expected = torch.full((n,), 5.0)
    counts = torch.poisson(expected * truth.exp(), generator=gen)
    gaussian = truth + 0.5 * torch.randn(n, generator=gen)
    data = {"expected": expected.to(device), "counts": counts.to(device),
            "gaussian": gaussian.to(device)}
    counter = HostReads(cuda)
    table = []
    chosen = samplers(prior, data, args.num_samples, args.seed)
    names = args.samplers or list(chosen)
    for validation in args.validation:
        for name in names:
            run = chosen[name]
            counts_at = {}
            for steps in (args.steps, 2 * args.steps):
                with pyro.validation_enabled(validation == "on"):
                    run(steps)  # warm-up, uncounted
                    tic = time.perf_counter()
                    with counter():
                        run(steps)
                    wall = time.perf_counter() - tic
                counts_at[steps] = (counter.reads, counter.syncs, wall)
            (r1, s1, _), (r2, s2, w2) = counts_at[args.steps], counts_at[2 * args.steps]
            row = {"sampler": name, "validation": validation,
                   f"reads ({args.steps} steps)": r1,
                   f"reads ({2 * args.steps} steps)": r2,
                   "reads / step": f"{(r2 - r1) / args.steps:.2f}"}
            if cuda:
                row[f"CUDA syncs ({2 * args.steps} steps)"] = s2
                row["CUDA syncs / step"] = f"{(s2 - s1) / args.steps:.2f}"
            row[f"wall s ({2 * args.steps} steps)"] = f"{w2:.3f}"
            table.append(row)
            print(row, flush=True)
    header = [
        f"- command: `python {shlex.join(sys.argv)}`",
        f"- torch {torch.__version__}, pyro {pyro.__version__}, pyro_diffusion "
        f"{pyro_diffusion.__version__}, python {platform.python_version()}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
        + f", threads {torch.get_num_threads()}, {os.cpu_count()} logical cores",
        f"- prior: shipped NC SIDS prior (d = {n}); {args.num_samples} draws per run, seed "
        f"{args.seed}",
        "",
    ]
    text = "\n".join(header) + markdown_table(list(table[0]), [list(r.values()) for r in table])
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
