import contextlib
import math
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributions import Beta, Gamma, LogNormal, Normal, Uniform

from pyro_diffusion import datasets
from pyro_diffusion.datasets import (
    CAR_MODELS,
    KERNELS,
    PrevalenceSurvey,
    car_covariance,
    gp_covariance,
    knn_adjacency,
    load_nc_sids,
    load_tokyo_mortality,
    matern32_kernel,
    matern52_kernel,
    rbf_kernel,
    sample_car,
    sample_gp,
    simulate_prevalence_survey,
)

# Tolerances. For zero-mean Gaussian draws the sample covariance of coordinates i, j has
# standard error sqrt((K_ii K_jj + K_ij^2) / N) <= sqrt(2 / N) * max_i K_ii, and the sample mean
# sqrt(K_ii / N). We allow 5 standard errors on every entry: a single entry exceeds that with
# probability ~6e-7, so even over the ~150 entries of a 16-point field a correct sampler fails
# with probability ~1e-4 (and the draws are seeded, so the outcome is fixed anyway).
N = 20000
Z = 5.0


def _sample_cov(x):
    return torch.cov(x.double().T)


def test_kernels_closed_forms():
    pts = torch.tensor([[0.0, 0.0], [0.3, 0.4]], dtype=torch.float64)  # distance 0.5
    ell, s2 = 0.5, 2.0
    r = 0.5 / ell
    expected = {
        "rbf": s2 * math.exp(-0.5 * r ** 2),
        "matern32": s2 * (1 + math.sqrt(3) * r) * math.exp(-math.sqrt(3) * r),
        "matern52": s2 * (1 + math.sqrt(5) * r + 5 * r ** 2 / 3) * math.exp(-math.sqrt(5) * r),
    }
    fns = {"rbf": rbf_kernel, "matern32": matern32_kernel, "matern52": matern52_kernel}
    assert set(KERNELS) == set(expected)
    for name, value in expected.items():
        k = fns[name](pts, lengthscale=ell, variance=s2)
        assert k.dtype == torch.float64 and k.shape == (2, 2)
        assert k[0, 1].item() == pytest.approx(value, rel=1e-12)
        assert k[1, 0].item() == pytest.approx(value, rel=1e-12)
        assert k.diagonal().tolist() == pytest.approx([s2, s2], rel=1e-12)
        assert torch.equal(gp_covariance(pts, ell, s2, kernel=name), k)


def test_covariance_batches_over_hyperparameters():
    x = torch.linspace(0, 1, 5)
    ls = torch.tensor([0.1, 0.3])
    var = torch.tensor([1.0, 4.0])
    batch = gp_covariance(x, ls, var)
    assert batch.shape == (2, 5, 5)
    for i in range(2):
        torch.testing.assert_close(batch[i], rbf_kernel(x, ls[i].item(), var[i].item()))
    assert gp_covariance(x, ls, 2.0).shape == (2, 5, 5)
    with pytest.raises(ValueError, match="must match"):
        gp_covariance(x, ls, torch.ones(3))


@pytest.mark.parametrize("kernel", ["rbf", "matern32", "matern52"])
def test_draws_reproduce_kernel_covariance(kernel):
    x = torch.linspace(0, 1, 16)
    ell, s2, mean = 0.3, 2.0, 1.5
    draws = sample_gp(N, x, kernel=kernel, lengthscale=ell, variance=s2, mean=mean, seed=1)
    assert draws.shape == (N, 16) and draws.dtype == torch.float32
    K = gp_covariance(x, ell, s2, kernel=kernel)
    se_cov = (torch.outer(K.diagonal(), K.diagonal()) + K.square()).div(N).sqrt()
    assert ((_sample_cov(draws) - K).abs() < Z * se_cov).all()
    se_mean = (K.diagonal() / N).sqrt()
    assert ((draws.double().mean(0) - mean).abs() < Z * se_mean).all()


def test_two_dimensional_points_and_tensor_mean():
    pts = torch.rand(10, 2, generator=torch.Generator().manual_seed(0))
    mean = torch.arange(10.0)
    draws = sample_gp(N, pts, kernel="matern32", lengthscale=0.5, mean=mean, seed=2)
    K = matern32_kernel(pts, 0.5)
    se_cov = (torch.outer(K.diagonal(), K.diagonal()) + K.square()).div(N).sqrt()
    assert ((_sample_cov(draws) - K).abs() < Z * se_cov).all()
    assert ((draws.double().mean(0) - mean).abs() < Z / math.sqrt(N)).all()


def test_hyperpriors_give_the_marginal_covariance():
    # f | l, s2 ~ N(0, s2 K_l) with l ~ LogNormal(log 0.2, 0.5) and s2 ~ LogNormal(0, 0.7):
    # the marginal variance of each coordinate is E[s2] = exp(0.7^2 / 2) ~ 1.278, not 1.
    x = torch.linspace(0, 1, 12)
    var_prior = LogNormal(0.0, 0.7)
    draws, params = sample_gp(N, x, lengthscale=LogNormal(math.log(0.2), 0.5),
                              variance=var_prior, seed=3, return_hyperparameters=True)
    ls, var = params["lengthscale"], params["variance"]
    assert ls.shape == var.shape == (N,)
    # every draw has its own hyperparameters (up to a few float32 ties from LogNormal.sample)
    assert ls.unique().numel() > 0.99 * N
    # the hyperparameter draws follow their priors: log l has mean log 0.2 and sd 0.5
    assert ls.log().mean().item() == pytest.approx(math.log(0.2), abs=Z * 0.5 / math.sqrt(N))
    assert ls.log().std().item() == pytest.approx(0.5, abs=Z * 0.5 / math.sqrt(2 * N))

    # Var(f_i^2) = 3 E[s2^2] - E[s2]^2 with E[s2^k] = exp(k^2 0.7^2 / 2); the mean over the 12
    # coordinates has at most that standard error (they are positively correlated).
    e_var = math.exp(0.7 ** 2 / 2)
    se = math.sqrt((3 * math.exp(2 * 0.7 ** 2) - e_var ** 2) / N)
    marginal_var = draws.double().var(0)
    assert marginal_var.mean().item() == pytest.approx(e_var, abs=Z * se)
    assert ((marginal_var - e_var).abs() < Z * se).all()

    # The full covariance is E[s2 K_l], here averaged over the draws' own hyperparameters.
    expected = gp_covariance(x, ls, var).mean(0)
    se_cov = math.sqrt((3 * math.exp(2 * 0.7 ** 2)) / N)  # bounds sqrt(E[f_i^2 f_j^2] / N)
    assert (_sample_cov(draws) - expected).abs().max().item() < Z * se_cov
    # ... which differs from the kernel at the median lengthscale with unit variance
    assert (_sample_cov(draws) - rbf_kernel(x, 0.2)).abs().max().item() > Z * se_cov


def test_per_draw_hyperparameters_are_used():
    # Condition on the drawn lengthscale: short-lengthscale draws are rougher.
    x = torch.linspace(0, 1, 32)
    draws, params = sample_gp(N, x, lengthscale=LogNormal(math.log(0.1), 0.8), seed=4,
                              return_hyperparameters=True)
    roughness = draws.diff(dim=1).square().mean(1)
    ls = params["lengthscale"]
    short, long_ = ls < ls.median(), ls >= ls.median()
    assert roughness[short].mean() > 3 * roughness[long_].mean()
    # For an RBF field, E[(f(x + h) - f(x))^2] = 2 (1 - exp(-h^2 / 2 l^2)) given l. Each
    # draw's roughness has a relative sd of at most sqrt(2) (chi-square, one degree of freedom,
    # when its 31 increments are fully correlated), so the mean over N draws is within 1% (1 sd)
    # of its expectation: 5% is 5 standard errors.
    h = (x[1] - x[0]).item()
    expected = (2 * (1 - torch.exp(-(h ** 2) / (2 * ls.square())))).mean().item()
    assert roughness.double().mean().item() == pytest.approx(expected, rel=0.05)


def test_discrete_hyperprior_shares_factors():
    # A hyperprior with few distinct values exercises the repeated-value path.
    x = torch.linspace(0, 1, 8)

    class TwoValues(torch.distributions.Distribution):
        arg_constraints = {}

        def sample(self, sample_shape=()):
            return 0.1 + 0.4 * torch.randint(2, sample_shape).double()

    draws, params = sample_gp(N, x, lengthscale=TwoValues(validate_args=False), seed=5,
                              return_hyperparameters=True)
    ls = params["lengthscale"]
    for value in (0.1, 0.5):
        rows = draws[ls == value]
        K = rbf_kernel(x, value)
        se = (torch.outer(K.diagonal(), K.diagonal()) + K.square()).div(rows.shape[0]).sqrt()
        assert ((_sample_cov(rows) - K).abs() < Z * se).all()


def test_seeding_is_reproducible_and_private():
    x = torch.linspace(0, 1, 20)
    hyper = dict(lengthscale=LogNormal(math.log(0.2), 0.3), variance=Gamma(2.0, 2.0))
    for kwargs in ({}, hyper):
        state = torch.get_rng_state()
        a = sample_gp(100, x, seed=7, **kwargs)
        assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
        b = sample_gp(100, x, seed=7, **kwargs)
        c = sample_gp(100, x, seed=8, **kwargs)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    # without a seed the global RNG is used (and advanced)
    torch.manual_seed(11)
    d = sample_gp(50, x, **hyper)
    torch.manual_seed(11)
    e = sample_gp(50, x, **hyper)
    assert torch.equal(d, e)
    assert not torch.equal(sample_gp(50, x, **hyper), d)


def test_edge_cases():
    x = torch.linspace(0, 1, 10)
    assert sample_gp(0, x).shape == (0, 10)
    assert sample_gp(0, x, lengthscale=LogNormal(0.0, 1.0)).shape == (0, 10)
    one = sample_gp(5, torch.tensor([0.5]), variance=4.0, seed=0)
    assert one.shape == (5, 1)
    assert sample_gp(3, [0.0, 0.5, 1.0], seed=0).shape == (3, 3)  # lists are points too
    assert sample_gp(3, x.double(), seed=0).dtype == torch.float32


def test_hyperprior_draws_are_fast():
    # 20000 draws of a 64-point field, each with its own lengthscale: one batched Cholesky per
    # draw. About 1 s on one core (3-5 s with two threads on a machine whose cores are shared);
    # the bound leaves room for a slow CI machine.
    x = torch.linspace(0, 1, 64)
    start = time.perf_counter()
    draws = sample_gp(20000, x, lengthscale=LogNormal(math.log(0.2), 0.3), seed=0)
    assert time.perf_counter() - start < 20.0
    assert torch.isfinite(draws).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(lengthscale=0.0), "lengthscale must be positive"),
    (dict(lengthscale=-0.2), "lengthscale must be positive"),
    (dict(lengthscale=float("nan")), "lengthscale must be positive"),
    (dict(variance=0.0), "variance must be positive"),
    (dict(variance=float("inf")), "variance must be positive"),
    (dict(lengthscale=torch.tensor([0.1, 0.2])), "number or a Distribution"),
    (dict(lengthscale=Normal(0.2, 1.0)), "non-positive"),
    (dict(lengthscale=LogNormal(torch.zeros(2), 1.0)), "scalar distribution"),
    (dict(kernel="cosine"), "unknown kernel"),
    (dict(jitter=-1e-6), "jitter"),
    (dict(mean=torch.zeros(3)), "mean must be"),
    (dict(mean=torch.zeros(10, 2)), "mean must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_gp(100, torch.linspace(0, 1, 10), **kwargs)


@pytest.mark.parametrize("points", [torch.zeros(2, 3, 4), torch.zeros(0), torch.zeros(0, 2),
                                    torch.tensor([0.0, float("nan")]), torch.tensor(0.5)])
def test_bad_points(points):
    with pytest.raises(ValueError, match="points"):
        sample_gp(10, points)
    with pytest.raises(ValueError, match="points"):
        rbf_kernel(points)


@pytest.mark.parametrize("num", [-1, 2.5, True, "3"])
def test_bad_num_samples(num):
    with pytest.raises(ValueError, match="num_samples"):
        sample_gp(num, torch.linspace(0, 1, 4))


def test_kernel_argument_errors():
    x = torch.linspace(0, 1, 4)
    with pytest.raises(ValueError, match="lengthscale must be positive"):
        rbf_kernel(x, lengthscale=torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="unknown kernel"):
        gp_covariance(x, kernel="rq")


def test_singular_kernel_matrix_is_reported():
    # duplicate points make the kernel matrix singular without jitter
    with pytest.raises(ValueError, match="not positive definite"):
        sample_gp(5, torch.tensor([0.0, 0.0, 1.0]), jitter=0.0, seed=0)
    assert sample_gp(5, torch.tensor([0.0, 0.0, 1.0]), seed=0).shape == (5, 3)


# ---------------------------------------------------------------------------------------------
# CAR fields

def _graph(edges, n):
    a = torch.zeros(n, n, dtype=torch.float64)
    for i, j in edges:
        a[i, j] = a[j, i] = 1.0
    return a


# Six nodes, one component, degrees 1 to 4.
SMALL = _graph([(0, 1), (1, 2), (2, 3), (3, 0), (1, 3), (3, 4), (4, 5)], 6)
# Two components: a 4-cycle with a chord, and a path of three nodes.
TWO_PARTS = _graph([(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (4, 5), (5, 6)], 7)
PARTS = [[0, 1, 2, 3], [4, 5, 6]]


def _frobenius_bound(cov, n_draws, z=4.0):
    # For the sample covariance S of N Gaussian draws, E ||S - C||_F^2 = (||C||_F^2 + tr(C)^2)
    # / N (Var S_ij = (C_ij^2 + C_ii C_jj) / N, summed over i, j; to O(1/N^2)). ||S - C||_F^2
    # is a non-negative combination of squares of (asymptotically) Gaussian variables, and among
    # those with a given mean a single scaled chi-square(1) has the heaviest tail beyond 1.6
    # times the mean (Szekely & Bakirov 2003), so P(||S - C||_F > z * rms) <= P(|Z| > z) = 6e-5
    # for z = 4. The bound is relative to ||C||_F; on these 6- and 7-node graphs with N = 20000
    # it is about 0.06.
    rms = math.sqrt((cov.square().sum() + cov.trace() ** 2).item() / n_draws)
    return z * rms / cov.norm().item()


def _check_gaussian_draws(draws, cov, mean=0.0):
    n_draws = draws.shape[0]
    sample = _sample_cov(draws)
    se_cov = (torch.outer(cov.diagonal(), cov.diagonal()) + cov.square()).div(n_draws).sqrt()
    assert ((sample - cov).abs() < Z * se_cov).all()
    rel = ((sample - cov).norm() / cov.norm()).item()
    assert rel < _frobenius_bound(cov, n_draws)
    se_mean = (cov.diagonal() / n_draws).sqrt()
    assert ((draws.double().mean(0) - mean).abs() < Z * se_mean).all()


def test_car_covariance_is_the_inverse_precision():
    d = torch.diag(SMALL.sum(1))
    for rho, tau in [(0.9, 1.0), (-0.5, 2.5), (0.0, 0.3)]:
        expected = torch.linalg.inv(tau * (d - rho * SMALL))
        cov = car_covariance(SMALL, rho=rho, tau=tau)
        assert cov.dtype == torch.float64 and cov.shape == (6, 6)
        torch.testing.assert_close(cov, expected, rtol=1e-10, atol=1e-12)
    assert car_covariance(SMALL).allclose(torch.linalg.inv(d - 0.9 * SMALL))  # rho = 0.9
    # batches over parameter tensors, as gp_covariance
    rho, tau = torch.tensor([0.2, 0.95]), torch.tensor([1.0, 4.0])
    batch = car_covariance(SMALL, rho=rho, tau=tau)
    assert batch.shape == (2, 6, 6)
    for i in range(2):
        torch.testing.assert_close(batch[i], car_covariance(SMALL, rho=rho[i].item(),
                                                            tau=tau[i].item()))
    assert car_covariance(SMALL, tau=tau).shape == (2, 6, 6)
    with pytest.raises(ValueError, match="must match"):
        car_covariance(SMALL, rho=rho, tau=torch.ones(3))


def test_icar_and_bym2_covariances():
    # The constrained ICAR covariance is the pseudo-inverse of tau (D - W): the components'
    # indicators span the Laplacian's null space.
    lap = torch.diag(TWO_PARTS.sum(1)) - TWO_PARTS
    tau = 2.0
    icar = car_covariance(TWO_PARTS, model="icar", tau=tau)
    torch.testing.assert_close(icar, torch.linalg.pinv(tau * lap), rtol=1e-9, atol=1e-12)
    for part in PARTS:
        assert icar[part].sum(0).abs().max() < 1e-12  # no variance along a component's sum
    assert icar[:4, 4:].abs().max() < 1e-12  # the components are independent
    # BYM2: each component's ICAR block scaled to geometric-mean marginal variance 1
    scaled = torch.linalg.pinv(lap)
    for part in PARTS:
        block = scaled[part][:, part]
        scaled[[[i] for i in part], part] = block / block.diagonal().log().mean().exp()
    phi = 0.7
    bym2 = car_covariance(TWO_PARTS, model="bym2", tau=tau, phi=phi)
    expected = (phi * scaled + (1 - phi) * torch.eye(7, dtype=torch.float64)) / tau
    torch.testing.assert_close(bym2, expected, rtol=1e-9, atol=1e-12)
    star = car_covariance(TWO_PARTS, model="bym2", phi=1.0)
    for part in PARTS:
        assert star.diagonal()[part].log().mean().item() == pytest.approx(0.0, abs=1e-12)
    assert car_covariance(TWO_PARTS, model="bym2", phi=0.0).equal(torch.eye(7).double())


def test_proper_car_draws_have_the_inverse_precision_covariance():
    rho, tau, mean = 0.8, 2.0, torch.arange(6.0)
    draws = sample_car(N, SMALL, rho=rho, tau=tau, mean=mean, seed=0)
    assert draws.shape == (N, 6) and draws.dtype == torch.float32
    cov = torch.linalg.inv(tau * (torch.diag(SMALL.sum(1)) - rho * SMALL))
    _check_gaussian_draws(draws, cov, mean.double())


@pytest.mark.parametrize("model", ["icar", "bym2"])
def test_intrinsic_draws(model):
    kwargs = dict(tau=0.5, phi=0.6) if model == "bym2" else dict(tau=0.5)
    draws = sample_car(N, TWO_PARTS, model=model, mean=1.5, seed=1, **kwargs)
    cov = car_covariance(TWO_PARTS, model=model, **kwargs)
    _check_gaussian_draws(draws, cov, 1.5)
    if model == "icar":
        for part in PARTS:  # sum-to-zero on every component, up to float32 rounding
            assert (draws[:, part] - 1.5).sum(1).abs().max() < 1e-5


def test_car_hyperpriors_give_the_marginal_covariance():
    rho_prior, tau_prior = Uniform(0.0, 0.95), Gamma(4.0, 4.0)
    draws, params = sample_car(N, SMALL, rho=rho_prior, tau=tau_prior, seed=2,
                               return_hyperparameters=True)
    rho, tau = params["rho"], params["tau"]
    assert set(params) == {"rho", "tau"} and rho.shape == tau.shape == (N,)
    assert rho.dtype == torch.float64 and ((rho >= 0) & (rho < 0.95)).all()
    # Uniform(0, 0.95) has mean 0.475 and sd 0.95 / sqrt(12)
    assert rho.mean().item() == pytest.approx(0.475, abs=Z * 0.95 / math.sqrt(12 * N))
    assert tau.mean().item() == pytest.approx(1.0, abs=Z * 0.5 / math.sqrt(N))  # sd 1/2
    # every draw uses its own parameters: the covariance is E[Cov(rho, tau)]; the draws are a
    # scale mixture, not Gaussian, so the standard errors are estimated from the products.
    expected = car_covariance(SMALL, rho=rho, tau=tau).mean(0)
    x = draws.double()
    centred = x - x.mean(0)
    products = centred.unsqueeze(-1) * centred.unsqueeze(-2)
    se = products.std(0) / math.sqrt(N)
    assert ((_sample_cov(draws) - expected).abs() < Z * se).all()
    assert ((_sample_cov(draws) - car_covariance(SMALL, rho=0.475)).abs() > Z * se).any()

    draws, params = sample_car(N, TWO_PARTS, model="bym2", phi=Beta(2.0, 2.0), seed=3,
                               return_hyperparameters=True)
    assert set(params) == {"tau", "phi"} and (params["tau"] == 1.0).all()
    assert params["phi"].mean().item() == pytest.approx(0.5, abs=Z * math.sqrt(0.05 / N))
    # Cov is linear in phi, so the marginal covariance is the covariance at the mean phi.
    expected = car_covariance(TWO_PARTS, model="bym2", phi=params["phi"].mean().item())
    _check_gaussian_draws(draws, expected)


def test_car_seeding_is_reproducible_and_private():
    for kwargs in ({}, dict(rho=Beta(4.0, 1.0), tau=Gamma(2.0, 2.0)),
                   dict(model="bym2", phi=Beta(1.0, 1.0))):
        state = torch.get_rng_state()
        a = sample_car(100, SMALL, seed=7, **kwargs)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(a, sample_car(100, SMALL, seed=7, **kwargs))
        assert not torch.equal(a, sample_car(100, SMALL, seed=8, **kwargs))
    torch.manual_seed(11)
    d = sample_car(50, SMALL, rho=Beta(4.0, 1.0))
    torch.manual_seed(11)
    assert torch.equal(d, sample_car(50, SMALL, rho=Beta(4.0, 1.0)))
    assert sample_car(0, SMALL, tau=Gamma(2.0, 2.0)).shape == (0, 6)
    assert CAR_MODELS == ("proper", "icar", "bym2")


@pytest.mark.parametrize("kwargs, match", [
    (dict(rho=1.0), r"rho must lie in \(-1, 1\)"),
    (dict(rho=-1.0), r"rho must lie in \(-1, 1\)"),
    (dict(rho=float("nan")), "rho must lie"),
    (dict(rho=Normal(0.5, 1.0)), "outside"),
    (dict(rho=torch.tensor([0.1, 0.2])), "number or a Distribution"),
    (dict(tau=0.0), "tau must be positive"),
    (dict(tau=Normal(1.0, 1.0)), "non-positive"),
    (dict(model="bym2", phi=1.5), r"phi must lie in \[0, 1\]"),
    (dict(model="bym2", phi=Normal(0.5, 1.0)), "outside"),
    (dict(model="icar", rho=0.5), "rho is the dependence parameter"),
    (dict(model="proper", phi=0.5), "phi is the mixing parameter"),
    (dict(model="leroux"), "unknown CAR model"),
    (dict(mean=torch.zeros(5)), "mean must be"),
])
def test_car_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_car(10, SMALL, **kwargs)


@pytest.mark.parametrize("adjacency, match", [
    (torch.zeros(2, 3), "square"),
    (torch.zeros(0, 0), "square"),
    (SMALL - 2 * torch.eye(6), "non-negative"),
    (SMALL + torch.eye(6), "zero diagonal"),
    (torch.triu(SMALL), "symmetric"),
    (_graph([(0, 1), (1, 2)], 4), r"node\(s\) \[3\] have none"),
    ("graph", "square matrix"),
])
def test_car_bad_adjacency(adjacency, match):
    with pytest.raises(ValueError, match=match):
        sample_car(10, adjacency, model="icar")
    with pytest.raises(ValueError, match=match):
        car_covariance(adjacency)


def test_knn_adjacency():
    # points 0, 1, 2, 10 on a line, k = 1: 0 -> 1, 1 -> 0 (tie with 2, broken by index),
    # 2 -> 1, 3 -> 2; symmetrised: the path 0 - 1 - 2 - 3.
    adj = knn_adjacency(torch.tensor([0.0, 1.0, 2.0, 10.0]), k=1)
    assert adj.dtype == torch.float64
    assert torch.equal(adj, _graph([(0, 1), (1, 2), (2, 3)], 4))
    assert torch.equal(knn_adjacency(torch.rand(5, 2), k=4), 1 - torch.eye(5).double())
    for k in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            knn_adjacency(torch.rand(5, 2), k=k)


# ---------------------------------------------------------------------------------------------
# Prevalence surveys

def test_prevalence_survey_counts():
    survey = simulate_prevalence_survey(300, seed=0)
    assert isinstance(survey, PrevalenceSurvey) and survey.num_sites == 300
    assert survey.locations.shape == (300, 2)
    assert ((survey.locations >= 0) & (survey.locations <= 1)).all()
    for t in (survey.locations, survey.examined, survey.positive, survey.field):
        assert t.dtype == torch.float64
    n, y = survey.examined, survey.positive
    assert n.shape == y.shape == survey.field.shape == (300,)
    assert torch.equal(n, n.round()) and torch.equal(y, y.round())
    assert ((n >= 20) & (n <= 200)).all() and n.unique().numel() > 100
    assert ((y >= 0) & (y <= n)).all()
    torch.testing.assert_close(survey.prevalence, torch.sigmoid(survey.field))
    assert survey.lengthscale == 0.2 and survey.variance == 1.0
    assert "num_sites=300" in repr(survey)


def test_prevalence_survey_seeding():
    state = torch.get_rng_state()
    a = simulate_prevalence_survey(100, seed=3, lengthscale=LogNormal(math.log(0.2), 0.5))
    assert torch.equal(torch.get_rng_state(), state)
    b = simulate_prevalence_survey(100, seed=3, lengthscale=LogNormal(math.log(0.2), 0.5))
    c = simulate_prevalence_survey(100, seed=4, lengthscale=LogNormal(math.log(0.2), 0.5))
    for name in ("locations", "examined", "positive", "field"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(getattr(a, name), getattr(c, name))
    assert a.lengthscale == b.lengthscale != c.lengthscale  # the drawn lengthscale is recorded
    torch.manual_seed(5)
    d = simulate_prevalence_survey(50)
    torch.manual_seed(5)
    assert torch.equal(d.positive, simulate_prevalence_survey(50).positive)


def test_prevalence_survey_rates_match_the_field():
    # Given the field, y_i ~ Binomial(n_i, p_i) independently: the mean of the site rates
    # y_i / n_i has expectation mean(p_i) and standard error sqrt(sum p_i (1 - p_i) / n_i) / S.
    survey = simulate_prevalence_survey(2000, seed=6)
    p, n, y = survey.prevalence, survey.examined, survey.positive
    se = (p * (1 - p) / n).sum().sqrt().item() / 2000
    assert (y / n).mean().item() == pytest.approx(p.mean().item(), abs=Z * se)
    # ... and the pooled rate, weighted by the numbers examined
    se_total = (n * p * (1 - p)).sum().sqrt().item()
    assert y.sum().item() == pytest.approx((n * p).sum().item(), abs=Z * se_total)
    # The field is a GP draw with mean -1; with a tiny variance it is flat at the mean.
    flat = simulate_prevalence_survey(500, variance=1e-12, mean=0.0, examined=40, seed=7)
    assert flat.field.abs().max() < 1e-4 and torch.equal(flat.examined, torch.full((500,), 40.0))
    assert (flat.positive / 40).mean().item() == pytest.approx(0.5, abs=Z * 0.5 / 141.4)


def test_prevalence_survey_with_a_given_field():
    x = torch.rand(400, 2, generator=torch.Generator().manual_seed(0))
    field = 3.0 * x[:, 0] - 2.0  # prevalence rising from 12% to 73% west to east
    examined = torch.full((400,), 100.0)
    survey = simulate_prevalence_survey(400, locations=x, field=field, examined=examined, seed=8)
    assert torch.equal(survey.locations, x.double()) and torch.equal(survey.field, field.double())
    assert survey.lengthscale is None and survey.variance is None
    p = torch.sigmoid(field.double())
    se = (p * (1 - p) / 100).sum().sqrt().item() / 400
    assert (survey.positive / 100).mean().item() == pytest.approx(p.mean().item(), abs=Z * se)
    west, east = x[:, 0] < 0.5, x[:, 0] >= 0.5
    assert (survey.positive[west] / 100).mean() < (survey.positive[east] / 100).mean() - 0.2


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_sites=0), "num_sites"),
    (dict(num_sites=2.5), "num_sites"),
    (dict(field=torch.zeros(10)), "pass locations"),
    (dict(locations=torch.rand(10, 2), field=torch.zeros(9)), "field must have shape"),
    (dict(locations=torch.rand(10, 2), field=torch.full((10,), float("nan"))), "NaN"),
    (dict(locations=torch.rand(9, 2)), "10 rows"),
    (dict(examined=0), "at least 1"),
    (dict(examined=(50, 20)), "low <= high"),
    (dict(examined=(0, 20)), "low <= high"),
    (dict(examined=torch.full((10,), 2.5)), "whole numbers"),
    (dict(examined=torch.ones(3)), "shape"),
    (dict(examined="many"), "examined must be"),
    (dict(lengthscale=-1.0), "lengthscale must be positive"),
    (dict(kernel="cosine"), "unknown kernel"),
])
def test_prevalence_survey_bad_arguments(kwargs, match):
    kwargs = {"num_sites": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        simulate_prevalence_survey(kwargs.pop("num_sites"), **kwargs)


# ---------------------------------------------------------------------------------------------
# Data sets bundled with libpysal, read offline

@contextlib.contextmanager
def _no_network():
    def refuse(*args, **kwargs):
        raise AssertionError("a data set loader tried to use the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


# The first load imports libpysal (with geopandas and scikit-learn: about 2 s, once).
@pytest.fixture(scope="module")
def sids():
    with _no_network():
        return load_nc_sids()


@pytest.fixture(scope="module")
def tokyo():
    with _no_network():
        return load_tokyo_mortality()


def _check_graph(adjacency, n, min_degree=1):
    assert adjacency.dtype == torch.float64 and adjacency.shape == (n, n)
    assert torch.equal(adjacency, adjacency.T)
    assert (adjacency.diagonal() == 0).all()
    assert ((adjacency == 0) | (adjacency == 1)).all()
    assert (adjacency.sum(1) >= min_degree).all()


def test_nc_sids_counts(sids):
    assert sids.num_regions == 100 and len(sids.names) == len(sids.fips) == 100
    assert sids.names[:3] == ("Ashe", "Alleghany", "Surry") and sids.fips[0] == 37009
    assert sids.periods == ("1974-78", "1979-84")
    for t in (sids.births, sids.deaths, sids.expected):
        assert t.dtype == torch.float64 and t.shape == (2, 100)
    # the totals of Cressie (1993)
    assert sids.births.sum(1).tolist() == [329962.0, 422392.0]
    assert sids.deaths.sum(1).tolist() == [667.0, 836.0]
    assert torch.equal(sids.births, sids.births.round()) and (sids.births > 0).all()
    # internal standardisation: births times the period's state-wide rate
    rate = torch.tensor([[667 / 329962], [836 / 422392]], dtype=torch.float64)
    torch.testing.assert_close(sids.expected, sids.births * rate, rtol=1e-14, atol=0.0)
    torch.testing.assert_close(sids.expected.sum(1), sids.deaths.sum(1), rtol=1e-12, atol=0.0)
    assert "deaths=[667, 836]" in repr(sids)


def test_nc_sids_graph_and_centroids(sids):
    _check_graph(sids.adjacency, 100)
    assert sids.contiguity == "queen" and int(sids.adjacency.sum()) == 2 * 245
    assert sids.neighbors[0] == (1, 17, 18)  # Ashe: Alleghany, Wilkes, Watauga
    assert {sids.names[j] for j in sids.neighbors[0]} == {"Alleghany", "Wilkes", "Watauga"}
    for i, nbrs in enumerate(sids.neighbors):
        assert nbrs == tuple(sids.adjacency[i].nonzero().flatten().tolist())
    # longitude and latitude inside North Carolina; Ashe in the north-west corner
    lon, lat = sids.centroids.unbind(-1)
    assert sids.centroids.dtype == torch.float64 and sids.centroids.shape == (100, 2)
    assert ((lon > -84.4) & (lon < -75.4) & (lat > 33.8) & (lat < 36.6)).all()
    assert sids.centroids[0].tolist() == pytest.approx([-81.498, 36.431], abs=1e-3)


def test_nc_sids_rook_graph_is_the_bundled_gal():
    with _no_network():
        rook = load_nc_sids(contiguity="rook")
    _check_graph(rook.adjacency, 100)
    # read sids2.gal (FIPS codes) by hand: a header line, then "id count" and the neighbours
    gal = datasets._libpysal_examples_dir("test") / "sids2" / "sids2.gal"
    lines = gal.read_text().split("\n")[1:]
    index = {fips: i for i, fips in enumerate(rook.fips)}
    expected = torch.zeros(100, 100, dtype=torch.float64)
    for head, nbrs in zip(lines[0::2], lines[1::2], strict=False):
        if head.strip():
            i = index[int(head.split()[0])]
            expected[i, [index[int(j)] for j in nbrs.split()]] = 1.0
    assert torch.equal(rook.adjacency, expected) and int(expected.sum()) == 2 * 231
    queen = load_nc_sids()
    assert (rook.adjacency <= queen.adjacency).all()  # a shared edge is a shared point
    with pytest.raises(ValueError, match="contiguity must be"):
        load_nc_sids(contiguity="bishop")


def test_tokyo_mortality(tokyo):
    assert tokyo.num_regions == 262 and len(tokyo.codes) == 262
    assert tokyo.names[0] == "Tsuchiura-shi" and tokyo.codes[0] == "08203"
    assert len(set(tokyo.codes)) == 262 and tokyo.names.count("Ina-machi") == 2
    for t in (tokyo.observed, tokyo.expected):
        assert t.dtype == torch.float64 and t.shape == (262,)
    assert tokyo.observed.sum().item() == 46163.0
    assert tokyo.expected.sum().item() == pytest.approx(48257.455, abs=1e-6)
    assert torch.equal(tokyo.observed, tokyo.observed.round()) and (tokyo.expected > 0).all()
    assert tokyo.covariates.shape == (262, 4)
    assert tokyo.covariate_names == ("OCC_TEC", "OWNH", "POP65", "UNEMP")
    assert tokyo.coordinates.shape == (262, 2)
    # the first row of Tokyomortality.txt
    assert tokyo.coordinates[0].tolist() == [378906.83, 17310.41]
    assert (tokyo.observed[0].item(), tokyo.expected[0].item()) == (189.0, 194.572)
    assert tokyo.covariates[0].tolist() == [0.126, 0.606, 0.104, 2.865]


def test_tokyo_knn_graph(tokyo):
    k = tokyo.k
    assert k == 6
    _check_graph(tokyo.adjacency, 262, min_degree=k)
    # j is a neighbour of i iff one of them is among the other's k nearest
    dist = torch.cdist(tokyo.coordinates, tokyo.coordinates)
    dist.fill_diagonal_(math.inf)
    kth = dist.sort(1).values[:, k - 1 : k]  # distance to the k-th nearest (no ties here)
    nearest = (dist <= kth).double()
    assert (nearest.sum(1) == k).all()
    assert torch.equal(tokyo.adjacency, torch.maximum(nearest, nearest.T))
    for i, nbrs in enumerate(tokyo.neighbors):
        assert nbrs == tuple(tokyo.adjacency[i].nonzero().flatten().tolist())
    with _no_network():
        three = load_tokyo_mortality(k=3)
    _check_graph(three.adjacency, 262, min_degree=3)
    assert (three.adjacency <= tokyo.adjacency).all() and three.k == 3
    for k in (0, 262, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            load_tokyo_mortality(k=k)


def test_data_sets_feed_car_models(sids, tokyo):
    draws = sample_car(200, sids.adjacency, model="icar", seed=0)
    assert draws.shape == (200, 100) and draws.sum(1).abs().max() < 1e-4  # connected graph
    assert sample_car(200, tokyo.adjacency, rho=0.99, seed=0).shape == (200, 262)


def test_missing_libpysal_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "libpysal", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install libpysal"):
        load_nc_sids()
    with pytest.raises(ImportError, match="pip install libpysal"):
        load_tokyo_mortality()


def test_missing_files_are_not_downloaded(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "_libpysal_examples_dir", lambda function: Path(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not download"):
        load_nc_sids()
    with pytest.raises(FileNotFoundError, match="Tokyomortality.txt"):
        load_tokyo_mortality()
