"""fit_prior (DiEM) against known truths, and its checkpoints."""

import math
import os

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_diffusion import fit_prior, sliced_wasserstein
from pyro_diffusion.em import CHECKPOINT_NAME


def projection_model(noise):
    def model(prior, A, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Normal((A @ f[..., None])[..., 0], noise).to_event(1), obs=y)

    return model


def gaussian_projections(N=2000, d=4, m=2, noise=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    cov = (q * torch.tensor([0.2, 0.5, 1.0, 3.0])) @ q.T
    mean = torch.tensor([1.0, -0.5, 0.0, 2.0])
    x = mean + torch.randn(N, d, generator=gen) @ torch.linalg.cholesky(cov).T
    A = torch.randn(N, m, d, generator=gen) / math.sqrt(d)
    y = (A @ x[..., None])[..., 0] + noise * torch.randn(N, m, generator=gen)
    return mean, cov, {"A": A, "y": y}


@pytest.mark.parametrize("gaussian_skip", [False, True])
def test_gaussian_truth_through_random_projections(gaussian_skip):
    mean, cov, data = gaussian_projections()
    seen = {}

    def callback(lap, prior, metrics):
        if lap == 0:  # the exact Gaussian of the closed-form EM rounds
            seen[0] = prior.denoiser.mean, prior.denoiser.cov
        else:
            torch.manual_seed(1)
            x = prior.replace(sampler="heun", num_steps=64).sample((8000,))
            seen[lap] = x.mean(0), x.T.cov()

    prior = fit_prior(projection_model(0.1), data, event_shape=(4,), laps=1, train_steps=800,
                      callback=callback, progress=False, seed=0, gaussian_skip=gaussian_skip)
    assert prior.denoiser.gaussian_skip == gaussian_skip
    assert [h["lap"] for h in prior.fit_history] == [0, 1]

    def errors(lap):
        m, c = seen[lap]
        return float((m - mean).norm()), float((c - cov).norm() / cov.norm())

    # 2000 draws of the truth itself estimate the covariance to 0.033 (relative Frobenius).
    # Measured: the Gaussian EM's maximum-likelihood fit 0.048 (mean error 0.06); after one
    # diffusion lap 0.07 (0.07).
    mean_err, cov_err = errors(0)
    assert mean_err < 0.1 and cov_err < 0.08
    mean_err, cov_err = errors(1)
    assert mean_err < 0.15 and cov_err < 0.15


def helix(n, gen):
    t = torch.rand(n, generator=gen) * 4 * math.pi
    return torch.stack([torch.cos(t), torch.sin(t), t / (2 * math.pi) - 1.0], -1)


@pytest.mark.slow
def test_manifold_learned_from_projections_beats_the_gaussian():
    # A helix in R^3 seen through random 2 x 3 projections with noise 0.05 (as in Rozet et al.
    # 2024). Measured with N = 4096, 1000 steps a lap: sliced W1 to the truth 0.62 of the
    # Gaussian's after one lap, 0.52 after four; here N = 2048, 800 steps, two laps: 0.59 and
    # 0.56 (0.172 -> 0.102 -> 0.096).
    gen = torch.Generator().manual_seed(0)
    N, noise = 2048, 0.05
    x = helix(N, gen)
    A = torch.randn(N, 2, 3, generator=gen)
    A = A / A.norm(dim=-1, keepdim=True)
    y = (A @ x[..., None])[..., 0] + noise * torch.randn(N, 2, generator=gen)
    truth = helix(4000, gen)
    dist_to_truth = {}

    def callback(lap, prior, metrics):
        torch.manual_seed(1)
        s = prior.denoiser.sample_data(4000) if lap == 0 else \
            prior.replace(sampler="heun", num_steps=32).sample((4000,))
        dist_to_truth[lap] = sliced_wasserstein(s, truth, seed=0)

    fit_prior(projection_model(noise), {"A": A, "y": y}, event_shape=(3,), laps=2,
              train_steps=800, callback=callback, progress=False, seed=0)
    assert dist_to_truth[2] < 0.75 * dist_to_truth[0], dist_to_truth


def test_poisson_observed_fields_beat_the_gaussian():
    # Bimodal log-rates in 2-D (two areas, two regimes), observed as Poisson counts with
    # exposures 5-50: the Gaussian fitted by Monte Carlo EM (evidence-trick posteriors) is
    # unimodal; the diffusion prior learns both modes. Scored on held-out true fields:
    # sliced W1 0.39 (Gaussian), 0.16 and 0.11 after laps 1 and 2.
    gen = torch.Generator().manual_seed(3)

    def fields(n):
        mode = torch.randint(2, (n, 1), generator=gen).float()
        centre = torch.tensor([[-1.0, 0.8]]) * (1 - mode) + torch.tensor([[0.8, -1.0]]) * mode
        return centre + 0.25 * torch.randn(n, 2, generator=gen)

    N = 1500
    x = fields(N)
    exposure = 5.0 + 45.0 * torch.rand(N, 2, generator=gen)
    y = torch.poisson(exposure * x.exp(), generator=gen)
    held_out = fields(4000)

    def model(prior, exposure, y):
        f = pyro.sample("f", prior)
        with pyro.plate("areas", 2):
            pyro.sample("y", dist.Poisson(exposure * f.exp()), obs=y)

    scores = {}

    def callback(lap, prior, metrics):
        torch.manual_seed(1)
        s = prior.denoiser.sample_data(4000) if lap == 0 else \
            prior.replace(sampler="heun", num_steps=32).sample((4000,))
        scores[lap] = sliced_wasserstein(s, held_out, seed=0)

    fit_prior(model, {"exposure": exposure, "y": y}, event_shape=(2,), laps=2,
              train_steps=600, callback=callback, progress=False, seed=0)
    assert scores[2] < 0.7 * scores[0], scores


def _small_problem():
    mean, cov, data = gaussian_projections(N=256)
    return {k: v[:, :, :2] if k == "A" else v for k, v in data.items()}


def _fit(tmp, laps, callback=None, **kw):
    data = _small_problem()

    def model(prior, A, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Normal((A @ f[..., None])[..., 0], 0.1).to_event(1), obs=y)

    settings = dict(event_shape=(2,), train_steps=40, num_steps=16, gaussian_rounds=4,
                    batch_size=64, progress=False, seed=5)
    settings.update(kw)
    return fit_prior(model, data, laps=laps, checkpoint_dir=tmp, callback=callback,
                     **settings)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("gaussian_skip", [False, True])
def test_interrupted_run_resumes_to_the_same_prior(tmp_path, gaussian_skip):
    full = _fit(tmp_path / "full", laps=2, gaussian_skip=gaussian_skip)

    def stop_after_first(lap, prior, metrics):
        if lap == 1:
            raise _Stop

    with pytest.raises(_Stop):
        _fit(tmp_path / "cut", laps=2, callback=stop_after_first, gaussian_skip=gaussian_skip)
    ck = torch.load(tmp_path / "cut" / CHECKPOINT_NAME, weights_only=True)
    assert ck["lap"] == 1
    resumed = _fit(tmp_path / "cut", laps=2, gaussian_skip=gaussian_skip)
    assert resumed.denoiser.gaussian_skip == gaussian_skip
    for a, b in zip(full.denoiser.state_dict().values(), resumed.denoiser.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert [h["lap"] for h in resumed.fit_history] == [0, 1, 2]
    # More laps later continue from the saved ones; a finished run just loads.
    again = _fit(tmp_path / "cut", laps=2, gaussian_skip=gaussian_skip)
    assert torch.equal(next(iter(again.denoiser.state_dict().values())),
                       next(iter(full.denoiser.state_dict().values())))


def test_checkpoint_from_other_settings_or_garbage_is_refused(tmp_path):
    _fit(tmp_path, laps=1)
    with pytest.raises(ValueError, match="other settings.*lr"):
        _fit(tmp_path, laps=1, lr=1e-4)
    # resume=False starts over and overwrites.
    _fit(tmp_path, laps=1, lr=1e-4, resume=False)
    with open(tmp_path / CHECKPOINT_NAME, "wb") as fh:
        fh.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable fit_prior checkpoint"):
        _fit(tmp_path, laps=1, lr=1e-4)
    os.remove(tmp_path / CHECKPOINT_NAME)
    torch.save({"format": "pyro_diffusion.fit_prior", "format_version": 99}, tmp_path /
               CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="format 99"):
        _fit(tmp_path, laps=1, lr=1e-4)


def test_bad_data_is_refused():
    model = projection_model(0.1)
    with pytest.raises(ValueError, match="same leading size"):
        fit_prior(model, {"A": torch.zeros(5, 2, 3), "y": torch.zeros(4, 2)}, event_shape=(3,))
    with pytest.raises(ValueError, match="NaN"):
        fit_prior(model, {"A": torch.zeros(4, 2, 3), "y": torch.full((4, 2), float("nan"))},
                  event_shape=(3,))
    with pytest.raises(ValueError, match=r"data\['y'\] contains infinite values"):
        fit_prior(model, {"A": torch.zeros(4, 2, 3), "y": torch.full((4, 2), float("inf"))},
                  event_shape=(3,))
    with pytest.raises(ValueError, match=r"data\['y'\] must be a tensor"):
        fit_prior(model, {"A": torch.zeros(4, 2, 3), "y": [1.0, 2.0]}, event_shape=(3,))
    good = {"A": torch.zeros(4, 2, 3), "y": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match="train_steps must be a positive integer, got -3"):
        fit_prior(model, good, event_shape=(3,), train_steps=-3)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        fit_prior(model, good, event_shape=(3,), batch_size=0)
    with pytest.raises(ValueError, match="N = 0"):
        fit_prior(model, {"A": torch.zeros(0, 2, 3), "y": torch.zeros(0, 2)}, event_shape=(3,))
    with pytest.raises(ValueError, match="non-empty dict"):
        fit_prior(model, {}, event_shape=(3,))


def test_masked_projections_give_the_gaussian_rounds_of_the_unmasked_ones():
    # poutine.mask drops the masked coordinates of each observation (here the second of three,
    # holding placeholders far from any projection of the field): the closed-form Gaussian EM
    # rounds must give what the same data without that coordinate gives.
    _, _, data = gaussian_projections(N=400, m=3, seed=2)
    mask = torch.tensor([True, False, True])
    data["y"][:, 1] = 1e3

    def masked(prior, A, y):
        f = pyro.sample("f", prior)
        with pyro.plate("coords", 3), pyro.poutine.mask(mask=mask):
            pyro.sample("y", dist.Normal((A @ f[..., None])[..., 0], 0.1), obs=y)

    kept = {"A": data["A"][:, mask], "y": data["y"][:, mask]}
    fits = []
    for model, d in [(masked, data), (projection_model(0.1), kept)]:
        fit_prior(model, d, event_shape=(4,), laps=0, progress=False, seed=0, train_steps=1,
                  callback=lambda lap, prior, metrics: fits.append(prior.denoiser))
    assert len(fits) == 2
    torch.testing.assert_close(fits[0].mean, fits[1].mean)
    torch.testing.assert_close(fits[0].cov, fits[1].cov)


def test_pure_denoising_model_with_one_data_row_per_field():
    # y = f + N(0, 0.5^2) with y of shape (N, d): the model's observed site has the field's
    # shape, not the data's, until the field carries the particle dim; the Gaussian rounds
    # must reach the maximum-likelihood Gaussian, whose covariance is cov(y) - 0.25 I.
    mean, cov, _ = gaussian_projections()
    gen = torch.Generator().manual_seed(5)
    x = mean + torch.randn(4000, 4, generator=gen) @ torch.linalg.cholesky(cov).T
    y = x + 0.5 * torch.randn(4000, 4, generator=gen)

    def model(prior, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Normal(f, 0.5).to_event(1), obs=y)

    seen = []
    fit_prior(model, {"y": y}, event_shape=(4,), laps=0, progress=False, seed=0,
              gaussian_rounds=60, callback=lambda lap, prior, m: seen.append(prior.denoiser))
    torch.testing.assert_close(seen[0].mean, y.mean(0), atol=1e-3, rtol=0)
    ml_cov = torch.cov(y.T, correction=0) - 0.25 * torch.eye(4)
    torch.testing.assert_close(seen[0].cov, ml_cov, atol=2e-3, rtol=0)
