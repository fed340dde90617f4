"""The sampler loops never read tensor values back to the host per step.

On a GPU each such read (``bool(t)``, ``t.item()``, ``float(t)``, ``t.tolist()``, ...) makes
the host wait until every queued kernel has run, so it cannot queue the next step's work while
the GPU computes. The reads are counted on the CPU, where they cost nothing, by wrapping those
``torch.Tensor`` methods; runs of ``S`` and ``2 S`` steps separate the per-step reads from the
once-per-run ones. Pyro's and torch's distribution argument checks read values too (two per
observed site and step): they are the user's setting, switched off here.
"""

import contextlib

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_diffusion import DiffusionLangevin, DiffusionPosterior, DiffusionSMC
from pyro_diffusion.disease_mapping import diffusion_model, load_nc_sids_prior
from pyro_diffusion.seeding import seeded

READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "nonzero")


@contextlib.contextmanager
def host_reads():
    count = {"reads": 0}
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(original):
        def read(tensor, *args, **kwargs):
            count["reads"] += 1
            return original(tensor, *args, **kwargs)
        return read

    for name, original in saved.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield count
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture(scope="module")
def problem():
    prior = load_nc_sids_prior(progress=False)  # an EDMDenoiser with the default network
    n = prior.event_shape.numel()
    gen = torch.Generator().manual_seed(0)
    field = 0.3 * torch.randn(n, generator=gen)
    expected = torch.full((n,), 5.0)
    counts = torch.poisson(expected * field.exp(), generator=gen)
    gaussian = field + 0.5 * torch.randn(n, generator=gen)
    return prior, expected, counts, gaussian


def gaussian_model(prior, y):
    f = pyro.sample("f", prior)
    with pyro.plate("areas", y.shape[-1]):
        pyro.sample("y", dist.Normal(f, 0.5), obs=y)


def reads_per_step(run, steps=4):
    """``run(steps)`` counted at ``steps`` and ``2 * steps``: the reads each step adds."""
    counts = []
    with pyro.validation_enabled(False):
        for s in (steps, 2 * steps):
            with host_reads() as count:
                run(s)
            counts.append(count["reads"])
    return (counts[1] - counts[0]) / steps


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "heun"])
def test_prior_sampling_reads_nothing_per_step(problem, sampler):
    prior = problem[0]

    def run(steps):
        with seeded(0):
            prior.replace(num_steps=steps, sampler=sampler).sample((16,))

    assert reads_per_step(run) == 0


@pytest.mark.parametrize("guidance", ["dps", "evidence", "mmps"])
def test_guided_sampling_reads_nothing_per_step(problem, guidance):
    prior, expected, counts, gaussian = problem

    def run(steps):
        post = DiffusionPosterior(diffusion_model if guidance != "mmps" else gaussian_model,
                                  guidance=guidance, num_samples=16, batch_size=16,
                                  num_steps=steps, seed=0, progress=False)
        if guidance == "mmps":  # 100 observations: conjugate gradients
            post.run(prior, gaussian)
        else:
            post.run(prior, expected, counts)

    assert reads_per_step(run) == 0


@pytest.mark.parametrize("preconditioner", ["gaussian", "diagonal"])
def test_langevin_reads_nothing_per_step(problem, preconditioner):
    prior, expected, counts, _ = problem

    def run(steps):
        DiffusionLangevin(diffusion_model, num_samples=16, num_steps=steps, denoise_steps=2,
                          preconditioner=preconditioner, seed=0, progress=False).run(
            prior, expected, counts)

    assert reads_per_step(run) == 0


def test_smc_reads_once_per_step(problem):
    # The resampling decision needs the ESS on the host: one read per step, which also
    # carries the evidence increment and the all-particles-dead check.
    prior, expected, counts, _ = problem

    def run(steps):
        DiffusionSMC(diffusion_model, num_particles=16, num_steps=steps, seed=0,
                     progress=False).run(prior, expected, counts)

    assert reads_per_step(run) == 1
