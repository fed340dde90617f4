"""Networks and the EDM preconditioning."""

import pytest
import torch

from pyro_diffusion import (
    MLP,
    DiffusionPrior,
    EDMDenoiser,
    GaussianDenoiser,
    UNet,
    default_network,
)

from .conftest import random_cov


@pytest.mark.parametrize("event_shape,kwargs", [
    ((13,), {}),
    ((64,), {}),
    ((7, 9), {}),          # 2-D grid, odd sizes: padded and cropped
    ((2, 16, 12), {}),     # channels first
    ((3, 20), {"spatial_dims": 1}),
])
def test_unet_keeps_shapes(event_shape, kwargs):
    net = UNet(event_shape, channels=(8, 16, 16), **kwargs)
    x = torch.randn((5,) + event_shape)
    out = net(x, torch.randn(5))
    assert out.shape == x.shape


def test_mlp_shapes_and_zero_initial_residual():
    net = MLP((3, 4), width=32, depth=2)
    x = torch.randn(6, 3, 4)
    assert net(x, torch.zeros(6)).shape == (6, 3, 4)


@pytest.mark.parametrize("make", [lambda: MLP((12,), width=32, depth=2),
                                  lambda: UNet((6, 8), channels=(8, 16))])
def test_a_shared_noise_level_gives_the_per_row_output(make):
    # With one noise level for the whole batch the embedding and modulations are computed once
    # and broadcast; the output must equal the row-by-row one (which takes the general path).
    torch.manual_seed(0)
    net = make()
    for p in net.parameters():  # no zero-initialised layers: every path contributes
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn((5,) + tuple(net.event_shape))
    c = torch.full((5,), 0.7)
    rows = torch.cat([net(x[i:i + 1], c[i:i + 1]) for i in range(5)])
    assert torch.allclose(net(x, c), rows, atol=1e-5)
    mixed = torch.tensor([0.7, 0.7, -1.0, 0.7, 0.7])
    rows = torch.cat([net(x[i:i + 1], mixed[i:i + 1]) for i in range(5)])
    assert torch.allclose(net(x, mixed), rows, atol=1e-5)


def test_default_network_choice():
    assert isinstance(default_network((10,)), MLP)
    assert isinstance(default_network((8, 8)), UNet)
    assert isinstance(default_network((64,), "unet"), UNet)
    assert default_network((300,)).config["width"] == 512
    net = default_network((300,), "mlp", zero_output=True, width=64)
    assert net.config["width"] == 64 and not net.out.weight.any()
    with pytest.raises(ValueError, match="MLPs only"):
        default_network((8, 8), width=64)
    with pytest.raises(ValueError, match="net must be"):
        default_network((3,), "transformer")


def test_preconditioning_limits():
    # c_skip -> 1 and c_out -> 0 as sigma -> 0, so D(x; 0+) = x for any network output;
    # as sigma -> inf, c_skip -> 0 and the output is mean + std * sigma_data * F.
    torch.manual_seed(0)
    net = MLP((4,), width=16, depth=1)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    mean = torch.tensor([1.0, 2.0, 3.0, 4.0])
    den = EDMDenoiser(net, (4,), mean=mean, std=3.0)
    x = torch.randn(5, 4) * 3
    torch.testing.assert_close(den(x, torch.full((5,), 1e-6)), x, atol=1e-5, rtol=0)
    big = den(x, torch.full((5,), 1e8))
    z_in = torch.zeros(5, 4)  # c_in * z -> 0
    c_noise = torch.full((5,), torch.log(torch.tensor(1e8 / 3.0)).item() / 4)
    torch.testing.assert_close(big, mean + 3.0 * net(z_in, c_noise), atol=1e-4, rtol=1e-4)


def test_standardisation_from_samples():
    samples = torch.randn(1000, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([5.0, 0.0, -5.0])
    den = EDMDenoiser.from_samples(MLP((3,)), samples)
    torch.testing.assert_close(den.mean, samples.mean(0))
    assert den.std == pytest.approx(samples.var(0, unbiased=False).mean().sqrt().item())
    with pytest.raises(ValueError, match="identical"):
        EDMDenoiser.from_samples(MLP((3,)), torch.ones(10, 3))


def _silenced(net):
    """``net`` with a zero output layer: the denoiser is then its skip connection alone."""
    out = net.out if hasattr(net, "out") else None
    torch.nn.init.zeros_(out.weight)
    torch.nn.init.zeros_(out.bias)
    return net


def test_gaussian_skip_is_the_wiener_filter_of_the_samples():
    # With a silent network, D is the exact posterior mean of a Gaussian with the samples'
    # (shrunk) mean and covariance, at every noise level, in the data's own units.
    from pyro_diffusion.covariance import shrunk_covariance

    torch.manual_seed(0)
    d = 6
    cov = random_cov(d, low=0.01, high=4.0, dtype=torch.float32)
    mean = torch.linspace(-3.0, 3.0, d)
    samples = mean + torch.randn(5000, d) @ torch.linalg.cholesky(cov).T
    den = EDMDenoiser.from_samples(_silenced(MLP((d,), width=16, depth=1)), samples,
                                   gaussian_skip=True)
    assert den.gaussian_skip
    centred = samples - samples.mean(0)
    emp_cov = (shrunk_covariance(centred) * 1.0).float()
    exact = GaussianDenoiser(samples.mean(0), emp_cov)
    x = mean + 3 * torch.randn(7, d)
    for s in [1e-6, 0.01, 0.3, 1.0, 10.0, 1e4]:
        sigma = torch.full((7,), s)
        torch.testing.assert_close(den(x, sigma), exact(x, sigma), atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(den(x, torch.full((7,), 1e-6)), x, atol=1e-4, rtol=0)
    torch.testing.assert_close(den(x, torch.full((7,), 1e8)), samples.mean(0).expand(7, d),
                               atol=1e-4, rtol=0)


def test_ledoit_wolf_shrinkage():
    from pyro_diffusion.covariance import shrunk_covariance

    gen = torch.Generator().manual_seed(1)
    cov = random_cov(40, low=0.1, high=2.0)
    chol = torch.linalg.cholesky(cov)
    # Many samples: the estimate is the sample covariance, up to a vanishing weight.
    z = torch.randn(20000, 40, generator=gen, dtype=torch.float64) @ chol.T
    z = z - z.mean(0)
    sample_cov = z.T @ z / z.shape[0]
    assert (shrunk_covariance(z) - sample_cov).norm() / sample_cov.norm() < 0.01
    # Fewer samples than dimensions: positive definite and closer to the truth than S.
    z = torch.randn(20, 40, generator=gen, dtype=torch.float64) @ chol.T
    z = z - z.mean(0)
    shrunk, sample_cov = shrunk_covariance(z), z.T @ z / z.shape[0]
    assert torch.linalg.eigvalsh(shrunk).min() > 0
    assert (shrunk - cov).norm() < 0.8 * (sample_cov - cov).norm()


def test_gaussian_skip_is_opt_in_and_bounded():
    samples = torch.randn(50, 3)
    assert not EDMDenoiser.from_samples(MLP((3,)), samples).gaussian_skip
    den = EDMDenoiser.from_samples(MLP((3,)), samples)
    assert not hasattr(den, "skip_basis")
    from pyro_diffusion import preconditioning

    old = preconditioning.GAUSSIAN_SKIP_MAX_DIM
    try:
        preconditioning.GAUSSIAN_SKIP_MAX_DIM = 2
        with pytest.raises(ValueError, match="3 x 3 eigenbasis"):
            DiffusionPrior.fit(samples, steps=1, gaussian_skip=True, progress=False)
    finally:
        preconditioning.GAUSSIAN_SKIP_MAX_DIM = old


def test_mixture_skip_is_the_denoiser_of_the_fitted_mixture(tmp_path):
    # With a silent network and gaussian_skip=K, D is the exact denoiser of the K-component
    # mixture fitted to the standardised samples, mapped back to the data's units; it is
    # saved and reloaded with the prior, and its Wiener filter stays as the Gaussian part.
    from pyro_diffusion.langevin import gaussian_part
    from pyro_diffusion.mixture_em import fit_gaussian_mixture

    torch.manual_seed(4)
    d = 5
    covs = torch.stack([0.2 * random_cov(d, 0.1, 1.0, seed=1, dtype=torch.float32),
                        3.0 * random_cov(d, 0.3, 1.0, seed=2, dtype=torch.float32)])
    truth_mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.tensor([0.6, 0.4])),
        torch.distributions.MultivariateNormal(torch.zeros(2, d) + 2.0, covs))
    samples = truth_mix.sample((4000,))
    den = EDMDenoiser.from_samples(_silenced(MLP((d,), width=16, depth=1)), samples,
                                   gaussian_skip=2)
    assert den.gaussian_skip and den.skip_components == 2
    m, s = samples.mean(0), (samples - samples.mean(0)).square().mean().sqrt()
    mix = fit_gaussian_mixture((samples - m) / s, 2, seed=0)
    x = 2.0 + 2 * torch.randn(7, d)
    for sig in [1e-4, 0.05, 0.5, 3.0, 1e3]:
        sigma = torch.full((7,), sig)
        want = m + s * mix(((x - m) / s).double(), (sigma / s).double()).float()
        torch.testing.assert_close(den(x, sigma), want, atol=2e-4, rtol=2e-4)
    prior = DiffusionPrior(den, (d,))
    prior.save(tmp_path / "p.pt")
    back = DiffusionPrior.load(tmp_path / "p.pt")
    assert back.denoiser.skip_components == 2
    sigma = torch.full((7,), 0.1)
    torch.testing.assert_close(back.denoiser(x, sigma), den(x, sigma), atol=0, rtol=0)
    mean, lam, basis = gaussian_part(prior)
    cov = (basis * lam) @ basis.T
    torch.testing.assert_close(cov, torch.cov(samples.T, correction=0), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("bad", [0.5, -1, "two", 0])
def test_gaussian_skip_option_is_checked(bad):
    if bad == 0:  # zero is "no skip", like False
        assert EDMDenoiser(MLP((3,)), (3,), gaussian_skip=0).skip_components == 0
        return
    with pytest.raises(ValueError, match="gaussian_skip must be"):
        EDMDenoiser(MLP((3,)), (3,), gaussian_skip=bad)
