import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_settings():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield


def random_cov(d, low=0.2, high=3.0, seed=0, dtype=torch.float64):
    """A random covariance with eigenvalues spread between ``low`` and ``high``."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=dtype))
    evals = torch.linspace(low, high, d, dtype=dtype)
    return (q * evals) @ q.T


def grid_mixture(d=2, seed=0, dtype=torch.float64):
    """The 25-component benchmark mixture of Cardoso et al. (2023), tiled to d."""
    from pyro_diffusion import GaussianMixtureDenoiser

    return GaussianMixtureDenoiser.grid_benchmark(d, seed=seed, dtype=dtype)
