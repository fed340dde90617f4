"""Gaussian mixtures fitted by EM, against the mixtures that drew the samples."""

import itertools

import pytest
import torch

from pyro_diffusion import GaussianMixtureDenoiser
from pyro_diffusion.covariance import shrunk_covariance
from pyro_diffusion.mixture_em import fit_gaussian_mixture

from .conftest import grid_mixture, random_cov


def _scale_mixture(d=6):
    """Three zero-mean components that differ only in scale and correlation (a stand-in for GP
    draws under hyperpriors), with unequal weights."""
    covs = torch.stack([0.3 * random_cov(d, 0.05, 1.0, seed=1),
                        random_cov(d, 0.2, 2.0, seed=2),
                        4.0 * random_cov(d, 0.5, 1.5, seed=3)])
    return GaussianMixtureDenoiser(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
                                   torch.zeros(3, d, dtype=torch.float64), covs)


def _matched(fit, truth):
    """The permutation of the fitted components closest to the true ones (by covariance)."""
    K = truth.weights.shape[0]
    return min(itertools.permutations(range(K)),
               key=lambda p: sum((fit.covs[j] - truth.covs[k]).norm().item()
                                 for k, j in enumerate(p)))


def test_em_recovers_a_scale_mixture_with_a_shared_mean():
    torch.manual_seed(0)
    truth = _scale_mixture()
    x = truth.sample_data(20000)
    fit, history = fit_gaussian_mixture(x, 3, seed=0, return_history=True)
    # EM never decreases the likelihood.
    assert all(b >= a - 1e-9 for a, b in zip(history[:-1], history[1:], strict=True))
    perm = _matched(fit, truth)
    for k, j in enumerate(perm):
        assert abs(fit.weights[j] - truth.weights[k]) < 0.02
        rel = (fit.covs[j] - truth.covs[k]).norm() / truth.covs[k].norm()
        assert rel < 0.08, (k, rel)
        assert fit.means[j].abs().max() < 0.1 * truth.covs[k].diagonal().sqrt().min()
    # Its denoiser is the true one, to within the estimation error, at every noise level.
    probe = truth.sample_data(500)
    for s in [0.02, 0.2, 1.0, 5.0]:
        xs = probe + s * torch.randn_like(probe)
        sig = torch.full((500,), s, dtype=torch.float64)
        exact, got = truth(xs, sig), fit(xs, sig)
        rel = ((got - exact).square().sum(1) / (exact - xs).square().sum(1)).mean().sqrt()
        assert rel < 0.06, (s, rel)
    # Held-out likelihood: as good as the truth's, far better than one Gaussian's.
    test = truth.sample_data(5000)
    one = fit_gaussian_mixture(x, 1)
    ll_truth, ll_fit = truth.log_density(test).mean(), fit.log_density(test).mean()
    assert ll_fit > ll_truth - 0.01
    assert ll_fit > one.log_density(test).mean() + 0.5


def test_em_recovers_separated_means():
    # Four well-separated unit-covariance components of the 25-component benchmark.
    grid = grid_mixture(d=2)
    keep = torch.tensor([0, 6, 18, 24])
    truth = GaussianMixtureDenoiser(grid.weights[keep], grid.means[keep], torch.ones(4))
    torch.manual_seed(1)
    # (The pooled covariance, ~130 I here, adds one pseudo-sample: a bias of ~0.03.)
    fit = fit_gaussian_mixture(truth.sample_data(20000), 4, seed=3)
    order = torch.cdist(truth.means, fit.means).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(fit.means[order], truth.means, atol=0.1, rtol=0)
    torch.testing.assert_close(fit.weights[order], truth.weights, atol=0.02, rtol=0)
    torch.testing.assert_close(fit.covs[order], torch.eye(2, dtype=torch.float64).expand(4, 2, 2),
                               atol=0.1, rtol=0)


def test_one_component_is_the_mean_and_ledoit_wolf_covariance():
    torch.manual_seed(2)
    x = torch.randn(300, 2, 3) * torch.tensor([1.0, 2.0, 0.5]) + 1.0
    fit = fit_gaussian_mixture(x, 1)
    assert fit.event_shape == (2, 3)
    flat = x.reshape(300, -1).double()
    torch.testing.assert_close(fit.means[0], flat.mean(0))
    torch.testing.assert_close(fit.covs[0], shrunk_covariance(flat - flat.mean(0)))


def test_fewer_samples_than_coordinates_and_seeding():
    torch.manual_seed(3)
    x = _scale_mixture(d=40).sample_data(30)
    a = fit_gaussian_mixture(x, 2, seed=5)
    b = fit_gaussian_mixture(x, 2, seed=5)
    assert torch.linalg.eigvalsh(a.covs).min() > 0  # pulled to the (shrunk) pooled covariance
    torch.testing.assert_close(a.covs, b.covs, rtol=0, atol=0)


@pytest.mark.parametrize("samples,k,match", [
    (torch.randn(10, 3), 0, "positive integer"),
    (torch.randn(10, 3), True, "positive integer"),
    (torch.randn(10, 3), 2.5, "positive integer"),
    (torch.randn(3, 3), 4, "at least"),
    (torch.randn(10), 1, "at least"),
    (torch.tensor([[0.0, float("nan")]] * 5), 1, "NaN"),
])
def test_bad_input_is_rejected(samples, k, match):
    with pytest.raises(ValueError, match=match):
        fit_gaussian_mixture(samples, k)
