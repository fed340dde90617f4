"""Reverse samplers against exact answers, using exact denoisers."""

import pytest
import torch

from pyro_diffusion import DiffusionPrior, GaussianDenoiser, noise_grid, sliced_wasserstein
from pyro_diffusion.samplers import num_evaluations, reverse_sample

from .conftest import grid_mixture, random_cov

SETTINGS = [  # (sampler, eta, steps): enough steps for each to reach the noise floor
    ("ancestral", None, 256),
    ("ddim", 0.0, 256),
    ("ddim", 0.5, 128),
    ("heun", None, 48),
]


def _mode_tv(gm, x):
    freq = torch.bincount(gm.component_of(x), minlength=gm.weights.numel()) / x.shape[0]
    return 0.5 * (freq.double() - gm.weights.double()).abs().sum().item()


@pytest.mark.parametrize("sampler,eta,steps", [
    # First-order samplers under-disperse by O(1/steps) (about 15% at 64 ancestral steps on
    # this problem); these step counts bring the bias under the tolerance below.
    ("ancestral", None, 1024),
    ("ddim", 0.0, 512),
    ("ddim", 0.5, 512),
    ("heun", None, 48),
])
def test_gaussian_moments(sampler, eta, steps):
    d, n = 4, 20_000
    mean = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.float64)
    cov = random_cov(d, 0.2, 3.0)
    prior = DiffusionPrior(GaussianDenoiser(mean, cov), (d,), num_steps=steps, sampler=sampler,
                           eta=eta)
    x = prior.sample((n,))
    assert x.dtype == torch.float64 and x.shape == (n, d)
    # Sampling error of the mean is sd/sqrt(n) <= 0.013; 5 of them allow for the discretisation.
    torch.testing.assert_close(x.mean(0), mean, atol=5 * (3.0 / n) ** 0.5, rtol=0)
    # Relative Frobenius error of a sample covariance at n=20000 is about 0.01; allow 0.04.
    err = torch.linalg.norm(torch.cov(x.T) - cov) / torch.linalg.norm(cov)
    assert err < 0.04, err


@pytest.mark.parametrize("sampler,eta,steps", SETTINGS)
def test_mixture_reproduced_near_noise_floor(sampler, eta, steps):
    gm = grid_mixture(d=2, dtype=torch.float32)
    n = 10_000
    prior = DiffusionPrior(gm, (2,), num_steps=steps, sampler=sampler, eta=eta)
    x = prior.sample((n,))
    ref = gm.sample_data(n)
    # Mode weights: the multinomial noise floor of their total variation at n=10^4 is ~0.02.
    assert _mode_tv(gm, x) < 0.05
    # Shape within modes: residuals from the nearest component mean are N(0, I). The sample
    # variance's sd at n=10^4 is 0.014, so 0.06 is four of them; 64 ancestral steps (variance
    # about 0.9) would fail.
    resid = (x - gm.means[gm.component_of(x)]).double()
    torch.testing.assert_close(torch.cov(resid.T), torch.eye(2, dtype=torch.float64),
                               atol=0.06, rtol=0)
    # Whole distribution, sliced W1 (W2 magnifies mode-weight noise): the floor is the mean
    # distance between two exact sets of 10^4 draws (0.17 on average; single pairs range
    # 0.12 to 0.30, so the bound is 2.5 times the mean of six).
    floor = sum(sliced_wasserstein(gm.sample_data(n), gm.sample_data(n), p=1, seed=s)
                for s in range(6)) / 6
    sw = sliced_wasserstein(x, ref, p=1)
    assert sw < 2.5 * floor, (sw, floor)


@pytest.mark.parametrize("sampler,eta,coarse,fine", [
    ("ancestral", None, 8, 64),
    ("ddim", 0.0, 8, 64),
    ("heun", None, 4, 24),
])
def test_error_falls_as_steps_grow(sampler, eta, coarse, fine):
    gm = grid_mixture(d=2, dtype=torch.float32)
    n = 3000
    ref = gm.sample_data(n)
    errors = []
    for steps in (coarse, 2 * coarse, fine):
        prior = DiffusionPrior(gm, (2,), num_steps=steps, sampler=sampler, eta=eta)
        errors.append(sliced_wasserstein(prior.sample((n,)), ref, p=1))
    assert errors[0] > errors[1] > errors[2], errors


def test_deterministic_samplers_are_deterministic_given_the_start():
    gm = grid_mixture(d=2)
    sigmas = noise_grid(16, 0.01, 100.0, dtype=torch.float64)
    x0 = 100 * torch.randn(50, 2, dtype=torch.float64)
    for sampler in ("ddim", "heun"):
        a = reverse_sample(gm, x0.clone(), sigmas, sampler=sampler)
        b = reverse_sample(gm, x0.clone(), sigmas, sampler=sampler)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddim_eta_one_is_ancestral():
    gm = grid_mixture(d=2)
    sigmas = noise_grid(8, 0.01, 100.0, dtype=torch.float64)
    x0 = 100 * torch.randn(20, 2, dtype=torch.float64)
    torch.manual_seed(1)
    a = reverse_sample(gm, x0, sigmas, sampler="ancestral")
    torch.manual_seed(1)
    b = reverse_sample(gm, x0, sigmas, sampler="ddim", eta=1.0)
    torch.testing.assert_close(a, b)


def test_evaluation_counts():
    calls = []

    def denoise(x, sigma):
        calls.append(sigma[0].item())
        return torch.zeros_like(x)

    for sampler, steps in [("ancestral", 10), ("ddim", 10), ("heun", 10)]:
        calls.clear()
        reverse_sample(denoise, torch.ones(3, 2), noise_grid(steps, 0.01, 10.0), sampler=sampler)
        assert len(calls) == num_evaluations(sampler, steps)
        assert 0.0 not in calls  # the denoiser is never asked about sigma = 0


def test_bad_sampler_settings():
    gm = grid_mixture(d=2)
    with pytest.raises(ValueError, match="unknown sampler"):
        DiffusionPrior(gm, (2,), sampler="euler-maruyama")
    with pytest.raises(ValueError, match="ddim"):
        DiffusionPrior(gm, (2,), sampler="ancestral", eta=0.3)
    with pytest.raises(ValueError, match="eta"):
        DiffusionPrior(gm, (2,), sampler="ddim", eta=1.5)
    with pytest.raises(ValueError, match="ending with 0"):
        reverse_sample(gm, torch.ones(2, 2), torch.tensor([2.0, 1.0]))
