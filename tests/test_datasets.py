import math
import time

import pytest
import torch
from torch.distributions import Gamma, LogNormal, Normal

from pyro_diffusion.datasets import (
    KERNELS,
    gp_covariance,
    matern32_kernel,
    matern52_kernel,
    rbf_kernel,
    sample_gp,
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
