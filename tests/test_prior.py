"""DiffusionPrior as a Pyro distribution: shapes, plates, Predictive, checkpoints, errors."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_diffusion import (
    MLP,
    DiffusionPrior,
    EDMDenoiser,
    GaussianDenoiser,
    GaussianMixtureDenoiser,
    UNet,
)
from pyro_diffusion._version import CHECKPOINT_FORMAT_VERSION

from .conftest import grid_mixture, random_cov


def _gaussian_prior(d=3, **kw):
    return DiffusionPrior(GaussianDenoiser(torch.zeros(d), torch.eye(d)), (d,), num_steps=8, **kw)


def test_shapes_support_and_expand():
    prior = _gaussian_prior()
    assert prior.batch_shape == () and prior.event_shape == (3,)
    assert prior.sample().shape == (3,)
    assert prior.sample((4, 5)).shape == (4, 5, 3)
    assert prior.support.event_dim == 1
    assert prior.support.check(torch.zeros(2, 3)).shape == (2,)
    wide = prior.expand((2, 6))
    assert isinstance(wide, DiffusionPrior) and wide.batch_shape == (2, 6)
    assert wide.sample((4,)).shape == (4, 2, 6, 3)
    assert wide.denoiser is prior.denoiser


def test_inside_plates_and_predictive():
    prior = _gaussian_prior()

    def model():
        with pyro.plate("regions", 7):
            f = pyro.sample("f", prior)
            pyro.deterministic("total", f.sum(-1))
        return f

    trace = pyro.poutine.trace(model).get_trace()
    assert trace.nodes["f"]["value"].shape == (7, 3)
    for parallel in (False, True):
        samples = pyro.infer.Predictive(model, num_samples=11, parallel=parallel)()
        assert samples["f"].shape == (11, 7, 3)
        assert samples["total"].shape == (11, 7)


def test_chunked_sampling_has_the_right_law():
    d = 2
    mean, cov = torch.tensor([1.0, -1.0]), random_cov(d, dtype=torch.float32)
    prior = DiffusionPrior(GaussianDenoiser(mean, cov), (d,), num_steps=32, sampler="heun",
                           chunk_size=1000)
    calls = []
    den = prior.denoiser
    prior.denoiser = lambda x, s: (calls.append(x.shape[0]), den(x, s))[1]
    x = prior.sample((4500,))
    assert max(calls) == 1000 and x.shape == (4500, d)
    torch.testing.assert_close(x.mean(0), mean, atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.15, rtol=0)


def test_denoise_and_score_broadcast():
    gm = grid_mixture(d=2)
    prior = DiffusionPrior(gm, (2,))
    x = torch.randn(4, 5, 2, dtype=torch.float64) * 10
    out = prior.denoise(x, 3.0)
    assert out.shape == (4, 5, 2)
    torch.testing.assert_close(out[1, 2], gm(x[1, 2][None], torch.tensor([3.0]).double())[0])
    sigma = torch.rand(4, 5, dtype=torch.float64) + 0.5
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_density(xr.reshape(-1, 2), sigma.reshape(-1)).sum(), xr)
    torch.testing.assert_close(prior.score(x, sigma), grad)


def test_log_prob_points_to_the_posterior_samplers():
    with pytest.raises(NotImplementedError, match="posterior samplers"):
        _gaussian_prior().log_prob(torch.zeros(3))


def test_default_noise_range_follows_the_data_scale():
    gm = grid_mixture(d=2)
    prior = DiffusionPrior(gm, (2,))
    scale = gm.data_std.item()
    assert prior.sigma_max == pytest.approx(80 * scale)
    assert prior.sigma_min == pytest.approx(0.002 * scale)
    grid = prior.sigmas
    assert grid.shape == (prior.num_steps + 1,) and grid[-1] == 0


def _trained_like_prior(net, gaussian_skip=False):
    torch.manual_seed(3)
    den = EDMDenoiser(net, net.event_shape, mean=torch.randn(net.event_shape), std=2.5,
                      gaussian_skip=gaussian_skip)
    if gaussian_skip:
        den.set_statistics(torch.randn((200,) + net.event_shape).cumsum(-1))
    for p in den.parameters():  # make the weights non-trivial without training
        nn.init.normal_(p, std=0.05)
    return DiffusionPrior(den, net.event_shape, num_steps=6, sampler="ddim", eta=0.3)


@pytest.mark.parametrize("make", [
    lambda: _trained_like_prior(MLP((5,), width=32, depth=2)),
    lambda: _trained_like_prior(MLP((5,), width=32, depth=2), gaussian_skip=True),
    lambda: _trained_like_prior(UNet((12,), channels=(8, 16))),
    lambda: _trained_like_prior(UNet((6, 10), channels=(8, 16))),
    lambda: DiffusionPrior(grid_mixture(d=3), (3,), num_steps=5),
    lambda: DiffusionPrior(GaussianDenoiser(torch.zeros(4), random_cov(4)), (4,), num_steps=5,
                           sampler="heun"),
])
def test_save_load_round_trip_gives_identical_samples(tmp_path, make):
    prior = make()
    path = tmp_path / "prior.pt"
    prior.save(path)
    loaded = DiffusionPrior.load(path)
    assert type(loaded.denoiser) is type(prior.denoiser)
    assert (loaded.sampler, loaded.eta, loaded.num_steps) == (prior.sampler, prior.eta,
                                                              prior.num_steps)
    assert loaded.sigma_min == prior.sigma_min and loaded.sigma_max == prior.sigma_max
    torch.manual_seed(11)
    a = prior.sample((16,))
    torch.manual_seed(11)
    b = loaded.sample((16,))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert DiffusionPrior.load(path, num_steps=3).num_steps == 3
    assert loaded.training_history == prior.training_history


def test_checkpoint_errors(tmp_path):
    prior = _trained_like_prior(MLP((5,), width=16, depth=1))
    good = tmp_path / "good.pt"
    prior.save(good)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a readable pyro-diffusion checkpoint"):
        DiffusionPrior.load(garbage)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable"):
        DiffusionPrior.load(truncated)

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable.*empty or truncated"):
        DiffusionPrior.load(empty)

    ckpt = torch.load(good, weights_only=True)
    broken = dict(ckpt, denoiser="not a dict")
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="corrupt DiffusionPrior checkpoint"):
        DiffusionPrior.load(tmp_path / "broken.pt")

    name = next(k for k, v in ckpt["denoiser"]["state"].items() if v.is_floating_point())
    nan = torch.load(good, weights_only=True)
    nan["denoiser"]["state"][name] = torch.full_like(nan["denoiser"]["state"][name], float("nan"))
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=f"'{name}' holds NaN"):
        DiffusionPrior.load(tmp_path / "nan.pt")

    torch.save(dict(ckpt, event_shape=[7]), tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="event_shape \\(7,\\) does not match the denoiser's"):
        DiffusionPrior.load(tmp_path / "shape.pt")

    ckpt = torch.load(good, weights_only=True)
    ckpt["format_version"] = CHECKPOINT_FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(ckpt, newer)
    with pytest.raises(ValueError, match=f"format {CHECKPOINT_FORMAT_VERSION + 1}"):
        DiffusionPrior.load(newer)

    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DiffusionPrior checkpoint"):
        DiffusionPrior.load(tmp_path / "other.pt")

    ckpt["format_version"] = CHECKPOINT_FORMAT_VERSION
    ckpt["denoiser"]["__module__"] = "os.system"
    torch.save(ckpt, tmp_path / "unknown.pt")
    with pytest.raises(ValueError, match="unknown denoiser"):
        DiffusionPrior.load(tmp_path / "unknown.pt")

    with pytest.raises(FileNotFoundError):
        DiffusionPrior.load(tmp_path / "missing.pt")

    # map_location is a device: torch.load's dict and callable forms are refused up front.
    assert DiffusionPrior.load(good, map_location="cpu").device.type == "cpu"
    for location in ({"cuda:0": "cpu"}, lambda storage, loc: storage):
        with pytest.raises(TypeError, match="map_location must be a device"):
            DiffusionPrior.load(good, map_location=location)


class _Pickled:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_checkpoints_never_unpickle_objects(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "pyro_diffusion.DiffusionPrior", "payload": _Pickled()}, path)
    with pytest.raises(ValueError, match="not a readable"):
        DiffusionPrior.load(path)
    assert "unpickled!" not in capsys.readouterr().out


def test_unregistered_denoiser_cannot_be_saved(tmp_path):
    class Custom(nn.Module):
        def forward(self, x, sigma):
            return x

    prior = DiffusionPrior(Custom(), (2,))
    assert prior.sample((3,)).shape == (3, 2)
    with pytest.raises(TypeError, match="register_denoiser"):
        prior.save(tmp_path / "custom.pt")


def test_denoiser_with_wrong_output_shape_is_reported():
    prior = DiffusionPrior(lambda x, sigma: x[..., :1], (3,), sigma_min=0.01, sigma_max=10.0)
    with pytest.raises(ValueError, match=r"returned \(4, 1\) for input of shape \(4, 3\)"):
        prior.sample((4,))


def test_bad_arguments_are_reported():
    den = GaussianDenoiser(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        DiffusionPrior(den, (2,), sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="num_steps"):
        DiffusionPrior(den, (2,), num_steps=0)
    with pytest.raises(TypeError, match="callable"):
        DiffusionPrior("not a denoiser", (2,))
    prior = DiffusionPrior(den, (2,))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 2\)"):
        prior.denoise(torch.zeros(4, 3), 1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        prior.denoise(torch.zeros(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match=r"sample_shape must not be negative, got \(-1,\)"):
        prior.sample((-1,))
    with pytest.raises(ValueError, match="rho must be positive"):
        DiffusionPrior(den, (2,), rho=0.0)
    with pytest.raises(ValueError, match="event_shape \\(3,\\) does not match"):
        DiffusionPrior(den, (3,))
    with pytest.raises(ValueError, match="sigma_max=1e\\+20.*range"):
        DiffusionPrior(den, (2,), sigma_max=1e20)
    den64 = GaussianDenoiser(torch.zeros(2, dtype=torch.float64), torch.eye(2))
    with pytest.raises(ValueError, match="sigma_max=1e\\+160.*float64's range"):
        DiffusionPrior(den64, (2,), sigma_max=1e160)


def test_replace_changes_sampling_settings_only():
    prior = _gaussian_prior(sampler="ddim", eta=0.5)
    other = prior.replace(sampler="heun", num_steps=20)
    assert (other.sampler, other.eta, other.num_steps) == ("heun", 0.0, 20)
    assert other.denoiser is prior.denoiser
    assert (prior.sampler, prior.eta) == ("ddim", 0.5)


def test_mixture_prior_as_pyro_site_matches_the_mixture():
    gm = GaussianMixtureDenoiser(torch.tensor([0.25, 0.75]), torch.tensor([[-4.0], [4.0]]),
                                 torch.tensor([0.5, 0.5]))
    prior = DiffusionPrior(gm, (1,), num_steps=48, sampler="heun")
    # parallel=True: one reverse process for all draws, through Pyro's vectorising plate.
    predictive = pyro.infer.Predictive(lambda: pyro.sample("f", prior), num_samples=8000,
                                       parallel=True)
    x = predictive()["f"]
    assert x.shape == (8000, 1)
    frac = (x > 0).double().mean().item()
    # Binomial sd at n=8000 is 0.005; the sampler's own error is below that at 48 Heun steps.
    assert frac == pytest.approx(0.75, abs=0.02)
    ref = dist.Normal(4.0, 0.5 ** 0.5)
    assert x[x > 0].std().item() == pytest.approx(ref.stddev.item(), rel=0.05)


def test_a_plain_callable_denoiser_runs_where_its_attributes_say():
    class Shrink:  # not an nn.Module: the prior reads its device and dtype attributes
        device, dtype = torch.device("cpu"), torch.float64

        def __call__(self, x, sigma):
            return x / (1 + sigma[:, None] ** 2)

    prior = DiffusionPrior(Shrink(), (2,))
    assert prior.device.type == "cpu" and prior.dtype == torch.float64
    out = prior.denoise(torch.ones(3, 2), 1.0)
    assert out.dtype == torch.float64 and torch.allclose(out, torch.full((3, 2), 0.5,
                                                                         dtype=torch.float64))
    unset = Shrink()
    unset.device = unset.dtype = None  # an optional attribute left unset: the defaults
    assert DiffusionPrior(unset, (2,)).device.type == "cpu"
    assert DiffusionPrior(unset, (2,)).dtype == torch.get_default_dtype()
    plain = DiffusionPrior(lambda x, sigma: x, (2,))
    assert plain.device.type == "cpu" and plain.dtype == torch.get_default_dtype()
    with pytest.raises(TypeError, match="not an nn.Module and has no 'to' method"):
        plain.to("cpu")


def test_edm_denoiser_statistics_live_with_the_network():
    # A network moved before it is wrapped: the mean and the skip's buffers follow it (the
    # meta device stands in for a GPU; the mixture skip's checks need values, so CUDA only).
    for k in (0, 1):
        den = EDMDenoiser(MLP((6,)).to("meta"), (6,), gaussian_skip=k)
        assert {b.device.type for b in den.buffers()} == {"meta"}, k
