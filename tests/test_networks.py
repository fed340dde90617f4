"""Networks and the EDM preconditioning."""

import pytest
import torch

from pyro_diffusion import MLP, EDMDenoiser, UNet, default_network


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


def test_default_network_choice():
    assert isinstance(default_network((10,)), MLP)
    assert isinstance(default_network((8, 8)), UNet)
    assert isinstance(default_network((64,), "unet"), UNet)
    assert default_network((300,)).config["width"] == 512
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
