"""Reading the likelihood from a Pyro model: values, gradients and errors."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_diffusion import DiffusionPrior, GaussianDenoiser
from pyro_diffusion.likelihood import ModelLikelihood, site_weight

D = 4


def _prior(d=D):
    return DiffusionPrior(GaussianDenoiser(torch.zeros(d), torch.eye(d)), (d,), num_steps=4)


def linear_gaussian(prior, A, y, noise=0.5):
    f = pyro.sample("f", prior)
    pyro.sample("y", dist.Normal(f @ A.T, noise).to_event(1), obs=y)


def poisson_in_plate(prior, idx, exposure, y):
    f = pyro.sample("f", prior)
    with pyro.plate("areas", len(y)):
        pyro.sample("y", dist.Poisson(exposure * f[..., idx].exp()), obs=y)
        pyro.deterministic("risk", f[..., idx].exp())


def binomial_two_sites(prior, n, y, z):
    f = pyro.sample("f", prior)
    with pyro.plate("villages", len(y)):
        pyro.sample("y", dist.Binomial(n, logits=f[..., :len(y)]), obs=y)
    pyro.sample("z", dist.Normal(f.sum(-1), 1.0), obs=z)


def test_linear_gaussian_values_and_gradient():
    A = torch.randn(3, D)
    y = torch.randn(3)
    lik = ModelLikelihood(linear_gaussian, (_prior(), A, y))
    assert lik.site == "f" and lik.observed_sites == ["y"] and lik.max_plate_nesting == 0
    x = torch.randn(5, D, requires_grad=True)
    ll = lik.log_likelihood(x)
    expected = dist.Normal(x @ A.T, 0.5).log_prob(y).sum(-1)
    torch.testing.assert_close(ll, expected)
    (grad,) = torch.autograd.grad(ll.sum(), x)
    torch.testing.assert_close(grad, ((y - x @ A.T) / 0.25) @ A)


def test_poisson_in_a_plate_and_deterministic_sites():
    idx = torch.tensor([0, 2, 3, 3, 1])
    exposure = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    y = torch.tensor([0.0, 3.0, 1.0, 7.0, 2.0])
    lik = ModelLikelihood(poisson_in_plate, (_prior(), idx, exposure, y))
    assert lik.max_plate_nesting == 1 and lik.deterministic_sites == ["risk"]
    x = torch.randn(6, D)
    expected = dist.Poisson(exposure * x[:, idx].exp()).log_prob(y).sum(-1)
    torch.testing.assert_close(lik.log_likelihood(x), expected)
    risk = lik.deterministic(x)["risk"]
    torch.testing.assert_close(risk, x[:, idx].exp())


def test_several_observed_sites_add_up():
    n = torch.tensor([10.0, 20.0])
    y = torch.tensor([3.0, 15.0])
    z = torch.tensor(0.7)
    lik = ModelLikelihood(binomial_two_sites, (_prior(), n, y, z))
    x = torch.randn(7, D)
    expected = (dist.Binomial(n, logits=x[:, :2]).log_prob(y).sum(-1)
                + dist.Normal(x.sum(-1), 1.0).log_prob(z))
    torch.testing.assert_close(lik.log_likelihood(x), expected)


def test_masked_and_scaled_sites():
    y = torch.tensor([1.0, 2.0, 3.0])
    mask = torch.tensor([True, False, True])

    def model(prior):
        f = pyro.sample("f", prior)
        with pyro.plate("obs", 3), pyro.poutine.scale(scale=2.0), pyro.poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal(f[..., :3], 1.0), obs=y)

    x = torch.randn(4, D)
    lp = dist.Normal(x[:, :3], 1.0).log_prob(y)
    expected = 2.0 * (lp * mask).sum(-1)
    torch.testing.assert_close(ModelLikelihood(model, (_prior(),)).log_likelihood(x), expected)


def test_site_weight_multiplies_masks_scales_and_mask_wrappers():
    keep = torch.tensor([True, False, True])
    wrap = torch.tensor([True, True, False])

    def model(prior):
        f = pyro.sample("f", prior)
        with pyro.plate("obs", 3), pyro.poutine.scale(scale=2.0), pyro.poutine.mask(mask=keep):
            pyro.sample("y", dist.Poisson(f[..., :3].exp()), obs=torch.ones(3))
        pyro.sample("z", dist.Normal(f[..., :3], 1.0).mask(wrap).to_event(1),
                    obs=torch.zeros(3))
        pyro.sample("u", dist.Normal(f, 1.0).to_event(1), obs=torch.zeros(D))

    lik = ModelLikelihood(model, (_prior(),))
    x = torch.randn(5, D)
    trace = lik.trace(x)
    torch.testing.assert_close(site_weight(trace.nodes["y"]),
                               2.0 * keep.float().expand(5, 3))
    torch.testing.assert_close(site_weight(trace.nodes["z"]), wrap.float().expand(5, 3))
    assert site_weight(trace.nodes["u"]) is None
    # The likelihood is the weighted sum of the observations' log-densities.
    expected = (2.0 * keep * dist.Poisson(x[:, :3].exp()).log_prob(torch.ones(3))).sum(-1) + (
        wrap * dist.Normal(x[:, :3], 1.0).log_prob(torch.zeros(3))).sum(-1) + dist.Normal(
        x, 1.0).log_prob(torch.zeros(D)).sum(-1)
    torch.testing.assert_close(lik.log_likelihood(x), expected)


def _no_diffusion(prior):
    f = pyro.sample("f", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(f, 1.0).to_event(1), obs=torch.zeros(D))


def _two_diffusion(prior):
    f = pyro.sample("f", prior)
    g = pyro.sample("g", prior)
    pyro.sample("y", dist.Normal(f + g, 1.0).to_event(1), obs=torch.zeros(D))


def _extra_latent(prior):
    f = pyro.sample("f", prior)
    s = pyro.sample("noise_scale", dist.HalfNormal(1.0))
    pyro.sample("y", dist.Normal(f, s).to_event(1), obs=torch.zeros(D))


def _obs_mask(prior):
    f = pyro.sample("f", prior)
    pyro.sample("y", dist.Normal(f, 1.0).to_event(1), obs=torch.zeros(D),
                obs_mask=torch.tensor([True, False, True, True]))


def _indexed_without_ellipsis(prior):
    f = pyro.sample("f", prior)
    pyro.sample("y", dist.Normal(f[torch.tensor([3, 2, 1, 0])], 1.0).to_event(1),
                obs=torch.zeros(D))


def _summed_over_the_batch(prior):
    f = pyro.sample("f", prior)
    pyro.sample("y", dist.Poisson(f.exp().sum()), obs=torch.tensor(3.0))


def _first_row(prior):
    f = pyro.sample("f", prior)
    pyro.sample("y", dist.Normal(f[0], 1.0), obs=torch.tensor(0.5))


def _expanded(prior):
    f = pyro.sample("f", prior.expand([3]).to_event(1))
    pyro.sample("y", dist.Normal(f, 1.0).to_event(2), obs=torch.zeros(3, D))


def _list_observation(prior):
    f = pyro.sample("f", prior)
    pyro.sample("y", dist.Normal(f[..., 0], 1.0), obs=[0.5])


def _subsampled(prior):
    f = pyro.sample("f", prior)
    with pyro.plate("areas", D, subsample_size=2) as idx:
        pyro.sample("y", dist.Normal(f[..., idx], 1.0), obs=torch.zeros(2))


def _in_plate(prior):
    with pyro.plate("rep", 2):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Normal(f, 1.0).to_event(1), obs=torch.zeros(2, D))


def _counts(kind, y, n=None):
    def model(prior):
        f = pyro.sample("f", prior)
        if kind == "poisson":
            d = dist.Poisson(f[..., :2].exp())
        elif kind == "binomial":
            d = dist.Binomial(n, logits=f[..., :2])
        elif kind == "bernoulli":
            d = dist.Bernoulli(logits=f[..., :2])
        else:
            d = dist.Normal(f[..., :2], 1.0)
        pyro.sample("y", d.to_event(1), obs=y)
    return model


@pytest.mark.parametrize("model,match", [
    (_no_diffusion, "no sample site distributed as a DiffusionPrior"),
    (_two_diffusion, "2 DiffusionPrior sites"),
    (_extra_latent, "'noise_scale' are not DiffusionPrior sites.*train the diffusion prior"),
    (_obs_mask, "'y_unobserved' come from pyro.sample\\(..., obs_mask=...\\).*poutine.mask"),
    (_in_plate, "inside plate 'rep'"),
    (_subsampled, "plate 'areas' subsamples 2 of 4.*drop subsample_size"),
    (_indexed_without_ellipsis,
     "fails with a batch of 3 fields \\(IndexError.*f\\[\\.\\.\\., idx\\]"),
    (_summed_over_the_batch, "batch of 3 fields.*is not that of each field alone.*f.sum"),
    (_first_row, "'y' has shape \\(4,\\) for a batch of 3 fields and \\(\\) for one"),
    (_expanded, "'f' has shape \\(3, 4\\), not the prior's event shape \\(4,\\)"),
    (_list_observation, "'y' holds a list; pass a tensor"),
    (_counts("poisson", torch.tensor([1.0, -2.0])),
     "'y' \\(Poisson\\): y must be a non-negative count, got y=-2 at index \\(1,\\)"),
    (_counts("poisson", torch.tensor([1.0, 2.5])), "integer-valued count, got y=2.5"),
    (_counts("binomial", torch.tensor([3.0, 12.0]), torch.tensor([5.0, 10.0])),
     "must not exceed total_count, got y=12 > total_count=10 at index \\(1,\\)"),
    (_counts("bernoulli", torch.tensor([1.0, 2.0])),
     "\\(Bernoulli\\): y must not exceed total_count, got y=2 > total_count=1"),
    (_counts("normal", torch.tensor([1.0, float("nan")])), "'y' contains NaN"),
    (_counts("normal", torch.tensor([1.0, 2.0, 3.0])), "shape \\(3,\\) but the model's"),
])
def test_clear_errors(model, match):
    with pytest.raises(ValueError, match=match):
        ModelLikelihood(model, (_prior(),))


def test_to_device_moves_the_tensors_inside_containers():
    from collections import defaultdict, namedtuple

    from pyro_diffusion.likelihood import to_device

    Pair = namedtuple("Pair", "a b")
    value = (torch.ones(2), [torch.zeros(1), 3], {"k": Pair(torch.ones(1), "s")}, "text")
    moved = to_device(value, "meta")
    table = to_device(defaultdict(list, {"x": torch.ones(1)}), "meta")
    assert isinstance(table, defaultdict) and table["x"].device.type == "meta"
    assert table["new"] == []
    assert isinstance(moved, tuple) and isinstance(moved[1], list)
    assert moved[0].device.type == moved[1][0].device.type == "meta" and moved[1][1] == 3
    pair = moved[2]["k"]
    assert isinstance(pair, Pair) and pair.a.device.type == "meta" and pair.b == "s"
    assert moved[3] == "text" and value[0].device.type == "cpu"


def test_tensor_devices_finds_the_devices_to_device_moves():
    from collections import namedtuple

    from pyro_diffusion.likelihood import tensor_devices

    Pair = namedtuple("Pair", "a b")
    value = (torch.ones(2), [torch.zeros(1, device="meta"), 3],
             {"k": Pair(torch.ones(1), "s"), "m": torch.ones(1, device="meta")}, "text")
    assert tensor_devices(value) == [torch.device("cpu"), torch.device("meta")]
    assert tensor_devices(("no", ["tensors"], {})) == []


def test_a_model_that_mixes_devices_gets_a_clear_error_and_the_prior_stays():
    # device= moves the arguments, not what the model takes from its enclosing scope.
    scale = torch.ones(D)

    def model(prior, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Normal(f * scale, 1.0).to_event(1), obs=y)

    prior = _prior()
    with pytest.raises(ValueError, match="mixes devices when traced with its DiffusionPrior "
                                         "site's value moved to meta.*as arguments"):
        ModelLikelihood(model, (prior, torch.zeros(D)), device="meta")
    assert prior.device.type == "cpu"


def test_other_errors_of_the_model_are_not_called_device_errors():
    # Pyro appends the site names to a model's error: a plate named "devices" must not turn a
    # shape bug into a device message.
    def model(prior, y):
        f = pyro.sample("f", prior)
        with pyro.plate("devices", D):
            pyro.sample("y", dist.Normal(f @ torch.ones(D + 1), 1.0), obs=y)

    with pytest.raises(RuntimeError) as info:
        ModelLikelihood(model, (_prior(), torch.zeros(D)))
    assert "mixes devices" not in str(info.value)
