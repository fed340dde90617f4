"""Seeding a run: torch.manual_seed's CPU stream, every state restored, no GPU generator
touched by a run on the CPU."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_diffusion import (
    DiffusionLangevin,
    DiffusionPosterior,
    DiffusionPrior,
    DiffusionSMC,
    GaussianDenoiser,
    fit_prior,
)
from pyro_diffusion.datasets import sample_gp
from pyro_diffusion.diagnostics import run_nuts
from pyro_diffusion.seeding import forked, manual_seed, seeded


def test_seeded_gives_the_stream_of_torch_manual_seed_and_restores_the_state():
    for seed in (0, 7, 2 ** 62 + 17):
        torch.manual_seed(seed)
        expected = torch.randn(5)
        torch.manual_seed(123)
        before = torch.get_rng_state()
        with seeded(seed):
            got = torch.randn(5)
        assert torch.equal(got, expected)
        assert torch.equal(torch.get_rng_state(), before)
        manual_seed(seed)
        assert torch.equal(torch.randn(5), expected)


def test_seed_none_uses_and_advances_the_global_stream():
    torch.manual_seed(3)
    a, b = torch.randn(2), torch.randn(2)
    torch.manual_seed(3)
    with seeded(None):
        a2 = torch.randn(2)
    assert torch.equal(a, a2) and torch.equal(torch.randn(2), b)
    with forked():
        torch.randn(10)
    torch.manual_seed(3)
    torch.randn(2)
    state = torch.get_rng_state()
    with forked():
        torch.randn(10)
    assert torch.equal(torch.get_rng_state(), state)


def _gaussian_problem():
    prior = DiffusionPrior(GaussianDenoiser(torch.zeros(3), torch.eye(3)), (3,), num_steps=8)

    def model(prior, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Normal(f, 0.5).to_event(1), obs=y)

    return model, prior, torch.tensor([0.3, -0.2, 1.0])


def _projection_model(prior, A, y):
    f = pyro.sample("f", prior)
    pyro.sample("y", dist.Normal((A @ f[..., None])[..., 0], 0.5).to_event(1), obs=y)


def _nuts_model(y):
    f = pyro.sample("f", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(f, 0.5).to_event(1), obs=y)


RUNS = {
    "posterior": lambda m, p, y: DiffusionPosterior(m, num_samples=8, seed=1,
                                                    progress=False).run(p, y),
    "langevin": lambda m, p, y: DiffusionLangevin(m, num_samples=8, num_steps=2, seed=1,
                                                  progress=False).run(p, y),
    "smc": lambda m, p, y: DiffusionSMC(m, num_particles=16, seed=1, progress=False).run(p, y),
    "fit": lambda m, p, y: DiffusionPrior.fit(torch.arange(192.0).reshape(64, 3).sin(),
                                              steps=2, seed=1, progress=False),
    "fit_prior": lambda m, p, y: fit_prior(
        _projection_model, {"A": torch.eye(3).expand(16, 3, 3), "y": y.expand(16, 3)},
        event_shape=(3,), laps=1, train_steps=2, num_steps=4, gaussian_rounds=1,
        progress=False, seed=1),
    "sample_gp": lambda m, p, y: sample_gp(4, torch.linspace(0, 1, 5), seed=1,
                                           lengthscale=dist.LogNormal(math.log(0.2), 0.3)),
    "run_nuts": lambda m, p, y: run_nuts(_nuts_model, y[:2], num_samples=3, warmup_steps=3,
                                         num_chains=1, seed=1, progress=False,
                                         jit_compile=False),
}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_seeded_cpu_runs_touch_no_gpu_generator(run, monkeypatch):
    # torch.manual_seed would reseed every CUDA device (or queue that until CUDA starts),
    # outside what fork_rng restores: a seeded run on the CPU must not call it.
    def refuse(*args, **kwargs):
        raise AssertionError("a seeded CPU run reached a CUDA generator")

    model, prior, y = _gaussian_problem()
    torch.manual_seed(0)
    for name in ("manual_seed", "manual_seed_all", "get_rng_state", "set_rng_state",
                 "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    state = torch.get_rng_state()
    RUNS[run](model, prior, y)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's CPU stream is restored
