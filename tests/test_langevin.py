"""DiffusionLangevin against exact answers.

With a Gaussian prior (exact denoiser) and Gaussian observations the sampler's target is closed
form: the posterior with the observation covariance increased by ``rho_min^2 A A^T``. For counts
in two dimensions the posterior follows by quadrature.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_diffusion import DiffusionLangevin, DiffusionPosterior, DiffusionPrior, GaussianDenoiser
from pyro_diffusion.diagnostics import compare_posteriors, to_inference_data

from .conftest import random_cov

F64 = torch.float64


def gaussian_posterior(mean, cov, A, noise_cov, y):
    prec = torch.linalg.inv(cov) + A.T @ torch.linalg.solve(noise_cov, A)
    post_cov = torch.linalg.inv(prec)
    post_mean = post_cov @ (torch.linalg.solve(cov, mean) + A.T @ torch.linalg.solve(noise_cov, y))
    return post_mean, post_cov


PRECONDITIONERS = pytest.mark.parametrize("preconditioner", ["diagonal", "gaussian"])


@PRECONDITIONERS
def test_gaussian_target_is_the_blurred_posterior(preconditioner):
    # A dense 2 x 4 observation couples the coordinates (the Hessian probe is then unbiased,
    # not exact); the target is N(y; A z, s^2 I + rho^2 A A^T) times the prior.
    d = 4
    mean = torch.tensor([0.5, -0.2, 0.1, 0.3], dtype=F64)
    cov = random_cov(d, low=0.3, high=2.0, seed=1)
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(2, d, generator=gen, dtype=F64)
    scale = 0.3
    y = torch.tensor([1.0, -0.5], dtype=F64)
    prior = DiffusionPrior(GaussianDenoiser(mean, cov), (d,))

    def model(prior, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Normal(f @ A.T, scale).to_event(1), obs=y)
        pyro.deterministic("total", f.sum(-1))

    rho = 0.1
    post = DiffusionLangevin(model, num_samples=4000, num_steps=300, rho_min=rho,
                             batch_size=2000, seed=0, progress=False,
                             preconditioner=preconditioner).run(prior, y)
    assert post.preconditioner_used == preconditioner
    f = post.get_samples()["f"]
    target_mean, target_cov = gaussian_posterior(
        mean, cov, A, scale ** 2 * torch.eye(2, dtype=F64) + rho ** 2 * A @ A.T, y)
    sd = target_cov.diagonal().sqrt()
    # 4000 draws: se of a mean 0.016 sd, of a variance 2.2 %.
    assert ((f.mean(0) - target_mean) / sd).abs().max() < 0.08
    assert (f.T.cov().diagonal() / target_cov.diagonal() - 1).abs().max() < 0.1
    corr = torch.corrcoef(f.T)
    target_corr = target_cov / (sd[:, None] * sd[None])
    assert (corr - target_corr).abs().max() < 0.05
    assert post.divergences == 0
    assert post.denoise_steps_used == {"diagonal": 32, "gaussian": 8}[preconditioner]
    # With the Gaussian preconditioner the prior's curvature at the mode costs d evaluations
    # and the mode's refinement 41 evaluations of one point, once per run, and d more if the
    # refinement moved the start by 0.001 sds or more (here the Newton mode is only as exact
    # as its curvature probes of the dense observation).
    jacobian = 0.0
    if preconditioner == "gaussian":
        jacobian = (d + 41 + (d if post.mode_shift >= 1e-3 else 0)) / 4000
    assert post.num_evaluations == pytest.approx(300 + 1 + post.denoise_steps_used + jacobian)
    assert torch.allclose(post.get_samples()["total"], f.sum(-1))
    # The blur is small: the exact posterior itself is within 0.1 sd and 10 % as well.
    exact_mean, exact_cov = gaussian_posterior(mean, cov, A, scale ** 2 * torch.eye(2, dtype=F64),
                                               y)
    assert ((f.mean(0) - exact_mean) / exact_cov.diagonal().sqrt()).abs().max() < 0.1


def _quadrature_2d(mean, cov, log_lik, half_width=7.0, num=401):
    sd = cov.diagonal().sqrt()
    axes = [mean[i] + sd[i] * torch.linspace(-half_width, half_width, num, dtype=F64)
            for i in range(2)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    log_joint = dist.MultivariateNormal(mean, cov).log_prob(grid) + log_lik(grid)
    w = (log_joint - log_joint.logsumexp(0)).exp()
    post_mean = (w[:, None] * grid).sum(0)
    post_sd = (w[:, None] * (grid - post_mean) ** 2).sum(0).sqrt()
    return post_mean, post_sd


class _Opaque(torch.nn.Module):
    """A denoiser that hides its Gaussian part (like a network without the Gaussian skip)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, sigma):
        return self.inner(x, sigma)


@pytest.mark.parametrize("preconditioner,num_steps", [("diagonal", 300), ("gaussian", 300),
                                                     ("estimated", 300), ("gaussian", None)])
@pytest.mark.parametrize("family", ["poisson", "binomial"])
def test_counts_against_quadrature(family, preconditioner, num_steps):
    # Skewed posteriors (a zero count, 8 of 10): the Gaussian preconditioner's Laplace start
    # is not the target here, and its default 20 steps must correct it.
    mean = torch.tensor([0.2, -0.3], dtype=F64)
    cov = torch.tensor([[0.8, 0.5], [0.5, 1.0]], dtype=F64)
    prior = DiffusionPrior(GaussianDenoiser(mean, cov), (2,))
    if preconditioner == "estimated":  # from 1000 prior draws
        prior = DiffusionPrior(_Opaque(prior.denoiser), (2,), sigma_max=prior.sigma_max)
    if family == "poisson":
        exposure = torch.tensor([3.0, 5.0], dtype=F64)
        y = torch.tensor([7.0, 0.0], dtype=F64)

        def likelihood(f):
            return dist.Poisson(exposure * f.exp())
    else:
        total = torch.tensor([10.0, 20.0], dtype=F64)
        y = torch.tensor([8.0, 5.0], dtype=F64)

        def likelihood(f):
            return dist.Binomial(total, logits=f)

    def model(prior, y):
        f = pyro.sample("f", prior)
        with pyro.plate("areas", 2):
            pyro.sample("y", likelihood(f), obs=y)

    post_mean, post_sd = _quadrature_2d(mean, cov,
                                        lambda f: likelihood(f).log_prob(y).sum(-1))
    run = DiffusionLangevin(model, num_samples=4000, num_steps=num_steps, rho_min=0.03,
                            batch_size=2000, seed=1, progress=False,
                            preconditioner=preconditioner.replace("estimated", "gaussian"))
    run.run(prior, y)
    assert run.preconditioner_used == preconditioner.replace("estimated", "gaussian")
    f = run.get_samples()["f"]
    assert ((f.mean(0) - post_mean) / post_sd).abs().max() < 0.08
    assert (f.std(0) / post_sd - 1).abs().max() < 0.06
    assert run.divergences == 0


def test_laplace_start_is_the_mode_and_curvature_of_the_blurred_posterior():
    # A 16-point GP with Poisson counts: the Gaussian preconditioner's Newton iterations
    # (float32 likelihood, Rademacher curvature probes) against an exact float64 Newton with
    # the analytic gradient y - E e^f and Hessian -diag(E e^f).
    d, rho = 16, 0.1
    t = torch.linspace(0, 1, d, dtype=F64)
    cov = torch.exp(-0.5 * (t[:, None] - t[None]) ** 2 / 0.3 ** 2) + 1e-4 * torch.eye(d, dtype=F64)
    mean = torch.full((d,), 0.5, dtype=F64)
    prior = DiffusionPrior(GaussianDenoiser(mean, cov), (d,))
    exposure = torch.linspace(1.0, 8.0, d, dtype=F64)
    gen = torch.Generator().manual_seed(4)
    y = torch.poisson(exposure * (mean + torch.linalg.cholesky(cov)
                                  @ torch.randn(d, generator=gen, dtype=F64)).exp(),
                      generator=gen)

    def model(prior, y):
        f = pyro.sample("f", prior)
        with pyro.plate("areas", d):
            pyro.sample("y", dist.Poisson(exposure * f.exp()), obs=y)

    prec = torch.linalg.inv(cov + rho ** 2 * torch.eye(d, dtype=F64))
    f = mean.clone()
    for _ in range(30):
        rate = exposure * f.exp()
        f = f + torch.linalg.solve(prec + torch.diag(rate), y - rate - prec @ (f - mean))
    hessian = prec + torch.diag(exposure * f.exp())
    run = DiffusionLangevin(model, num_samples=8, num_steps=1, rho_min=rho, seed=0,
                            progress=False).run(prior, y)
    assert run.preconditioner_used == "gaussian" and 2 <= run.newton_iterations <= 10
    b_mode, k = run._laplace_state  # x = m + K b, with K K^T the approximation's covariance
    mode = mean + k.double() @ b_mode.double()
    assert torch.allclose(mode, f, atol=2e-4)
    assert torch.allclose(k.double() @ k.double().T, torch.linalg.inv(hessian), rtol=1e-3,
                          atol=1e-5)
    # For a Gaussian prior the refinement with the prior's own score has nothing to move.
    assert run.mode_shift < 1e-3 and torch.allclose(run.mode.double(), f, atol=2e-4)


def test_binomial_curvature_at_a_logit_of_exactly_zero():
    # A zero-mean prior and y = n / 2: the Laplace mode sits at logit 0, where autograd's
    # second derivative of torch's Binomial log-density (written with |logit|) is 0; the true
    # curvature there is n / 4. The start's covariance and the draws must see it.
    mean = torch.zeros(2, dtype=F64)
    cov = torch.tensor([[0.8, 0.5], [0.5, 1.0]], dtype=F64)
    prior = DiffusionPrior(GaussianDenoiser(mean, cov), (2,))
    total = torch.tensor([100.0, 40.0], dtype=F64)
    y = total / 2

    def model(prior, y):
        f = pyro.sample("f", prior)
        with pyro.plate("areas", 2):
            pyro.sample("y", dist.Binomial(total, logits=f), obs=y)

    run = DiffusionLangevin(model, num_samples=2000, rho_min=0.03, batch_size=1000, seed=1,
                            progress=False).run(prior, y)
    _, k = run._laplace_state
    prec = torch.linalg.inv(cov + 0.03 ** 2 * torch.eye(2, dtype=F64))
    torch.testing.assert_close(k.double() @ k.double().T,
                               torch.linalg.inv(prec + torch.diag(total / 4)), rtol=1e-3,
                               atol=1e-6)
    post_mean, post_sd = _quadrature_2d(
        mean, cov, lambda f: dist.Binomial(total, logits=f).log_prob(y).sum(-1))
    f = run.get_samples()["f"]
    assert ((f.mean(0) - post_mean) / post_sd).abs().max() < 0.08
    assert (f.std(0) / post_sd - 1).abs().max() < 0.06


@pytest.mark.parametrize("preconditioner,num_steps", [("diagonal", 200), ("gaussian", 200),
                                                     ("gaussian", 1)])
def test_gp_field_matches_the_exact_posterior(preconditioner, num_steps):
    # A smooth GP on 32 points, each seen with Gaussian noise: smooth directions have large
    # posterior variance and rough ones almost none, the case the momentum and the mass matrix
    # are for. The exact posterior is closed form; the blur (0.02 against noise 0.2) is 1 %.
    d = 32
    t = torch.linspace(0, 1, d, dtype=F64)
    cov = torch.exp(-0.5 * (t[:, None] - t[None]) ** 2 / 0.2 ** 2) + 1e-4 * torch.eye(d, dtype=F64)
    prior = DiffusionPrior(GaussianDenoiser(torch.zeros(d, dtype=F64), cov), (d,))
    scale = 0.2
    gen = torch.Generator().manual_seed(3)
    truth = torch.linalg.cholesky(cov) @ torch.randn(d, generator=gen, dtype=F64)
    y = truth + scale * torch.randn(d, generator=gen, dtype=F64)

    def model(prior, y):
        f = pyro.sample("f", prior)
        with pyro.plate("points", d):
            pyro.sample("y", dist.Normal(f, scale), obs=y)

    exact_mean, exact_cov = gaussian_posterior(torch.zeros(d, dtype=F64), cov,
                                               torch.eye(d, dtype=F64),
                                               scale ** 2 * torch.eye(d, dtype=F64), y)
    sd = exact_cov.diagonal().sqrt()
    # With a Gaussian prior and Gaussian observations the Gaussian preconditioner's Laplace
    # start is the (blurred) target and BAOAB keeps it: one step is as exact as 200.
    lang = DiffusionLangevin(model, num_samples=2000, num_steps=num_steps, rho_min=0.02,
                             seed=0, progress=False, preconditioner=preconditioner).run(prior, y)
    f = lang.get_samples()["f"]
    smd = ((f.mean(0) - exact_mean) / sd).abs()
    ratio = f.std(0) / sd
    assert smd.mean() < 0.06 and smd.max() < 0.15
    assert (ratio.mean() - 1).abs() < 0.05
    assert (ratio - 1).abs().max() < 0.12
    # Diagnostics accept it like a DiffusionPosterior: batches are chains.
    table = compare_posteriors({"ref": {"f": (exact_mean + torch.randn(1, 4000, d, dtype=F64)
                                               @ torch.linalg.cholesky(exact_cov).T).numpy()},
                                "langevin": lang}, "f", reference="ref")
    row = table[(table.method == "langevin") & (table.coord == "all")].iloc[0]
    assert row["sd_ratio"] == pytest.approx(float(ratio.mean()), rel=0.03)
    idata = to_inference_data(lang)
    assert idata.posterior["f"].shape[:2] == (2, 1000)


def test_seeded_runs_repeat_and_settings_are_checked():
    prior = DiffusionPrior(GaussianDenoiser(torch.zeros(2, dtype=F64),
                                            torch.eye(2, dtype=F64)), (2,))
    y = torch.tensor([3.0, 1.0], dtype=F64)

    def model(prior, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Poisson(2.0 * f.exp()).to_event(1), obs=y)

    a = DiffusionLangevin(model, 50, 20, seed=7, progress=False).run(prior, y)
    b = DiffusionLangevin(model, 50, 20, seed=7, progress=False).run(prior, y)
    assert torch.equal(a.get_samples()["f"], b.get_samples()["f"])
    # Also when the Gaussian preconditioner is estimated from prior draws (and the global RNG
    # is left as it was).
    opaque = DiffusionPrior(_Opaque(prior.denoiser), prior.event_shape, num_steps=8)
    state = torch.get_rng_state()
    a, b = (DiffusionLangevin(model, 50, 20, seed=7, progress=False,
                              preconditioner="gaussian").run(opaque, y) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.get_samples()["f"], b.get_samples()["f"])
    for kwargs, match in [({"num_steps": 0}, "num_steps"), ({"step_size": 2.5}, "step_size"),
                          ({"persistence": 1.0}, "persistence"), ({"rho_min": -1}, "rho_min"),
                          ({"anneal": 1.5}, "anneal"), ({"denoise_steps": 0}, "denoise_steps"),
                          ({"preconditioner": "dense"}, "preconditioner"),
                          ({"mode_iterations": -1}, "mode_iterations"),
                          ({"num_samples": 0}, "num_samples")]:
        with pytest.raises(ValueError, match=match):
            DiffusionLangevin(model, **kwargs)
    with pytest.raises(ValueError, match="must not exceed rho_max"):
        DiffusionLangevin(model, 10, 5, rho_min=2.0, rho_max=1.0, progress=False).run(prior, y)
    with pytest.raises(ValueError, match="sigma_min"):
        DiffusionLangevin(model, 10, 5, rho_min=1e-4, progress=False).run(prior, y)
    with pytest.raises(RuntimeError, match="run"):
        DiffusionLangevin(model).get_samples()


@pytest.mark.parametrize("preconditioner,step_size", [("diagonal", 1.9), ("gaussian", 1.4)])
def test_non_finite_steps_are_undone(preconditioner, step_size):
    # The likelihood and its gradient are NaN beyond |f| = 3 and the posterior sits just inside:
    # steps that cross are undone (momentum redrawn) and counted; every draw is finite. (The
    # Gaussian preconditioner's mass is exact here, the diagonal one's twice too large, so
    # equal step sizes are not equally bold.)
    prior = DiffusionPrior(GaussianDenoiser(torch.zeros(1), torch.eye(1)), (1,))
    y = torch.tensor([2.9])

    def model(prior, y):
        f = pyro.sample("f", prior)
        loc = f + 0.0 * (3.0 - f.abs()).sqrt()
        pyro.sample("y", dist.Normal(loc, 0.1).to_event(1), obs=y)

    run = DiffusionLangevin(model, 200, 50, step_size=step_size, persistence=0.95, seed=0,
                            preconditioner=preconditioner, progress=False)
    with pytest.warns(RuntimeWarning, match="chain-steps reached a non-finite state"):
        run.run(prior, y)
    f = run.get_samples()["f"]
    assert torch.isfinite(f).all()
    assert run.divergences > 0
    assert (f - 2.85).abs().max() < 0.6


def test_chains_that_start_where_the_likelihood_overflows_restart_at_the_mean():
    prior = DiffusionPrior(GaussianDenoiser(torch.zeros(1), torch.eye(1)), (1,))
    y = torch.tensor([3.0])

    def model(prior, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Poisson(f.exp()).to_event(1), obs=y)

    # Starting blur 200: about a third of the chains start beyond exp's float32 range
    # (f > 88.7), where the gradient overflows; they restart at the prior mean, 0. (Chains
    # that start far out on the finite side crawl back slowly on this log-link: a starting
    # blur of this size is a stress test, not a setting to use.)
    run = DiffusionLangevin(model, 300, 10, rho_max=200.0, anneal=0.0, seed=0,
                            progress=False).run(prior, y)
    f = run.get_samples()["f"]
    assert torch.isfinite(f).all()

    def broken(prior, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Poisson((f + 100.0).exp()).to_event(1), obs=y)

    with pytest.raises(ValueError, match="not finite at the prior mean of 'f'"):
        DiffusionLangevin(broken, 10, 5, progress=False).run(prior, y)


def test_guided_and_langevin_share_the_batch_interface():
    prior = DiffusionPrior(GaussianDenoiser(torch.zeros(3), torch.eye(3)), (3,))
    y = torch.tensor([1.0, 0.0, 2.0])

    def model(prior, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Poisson(f.exp()).to_event(1), obs=y)

    for cls, kw in [(DiffusionPosterior, {"num_steps": 8}), (DiffusionLangevin,
                                                              {"num_steps": 8})]:
        run = cls(model, num_samples=30, batch_size=10, seed=0, progress=False, **kw)
        run.run(prior, y)
        assert run.get_samples(group_by_chain=True)["f"].shape == (3, 10, 3)
        assert run.wall_time > 0


def _scale_mixture_problem(d=24, scale=0.5):
    """A GP under a hyperprior on its lengthscale as a 3-component scale mixture (exact
    denoiser), one field from its smoothest component seen with Gaussian noise: ``(mixture
    denoiser, y, model, noise scale)``."""
    from pyro_diffusion import GaussianMixtureDenoiser

    t = torch.linspace(0, 1, d, dtype=F64)
    covs = torch.stack([torch.exp(-0.5 * (t[:, None] - t[None]) ** 2 / ls ** 2)
                        + 1e-6 * torch.eye(d, dtype=F64) for ls in (0.05, 0.1, 0.2)])
    mix = GaussianMixtureDenoiser(torch.tensor([0.3, 0.4, 0.3], dtype=F64),
                                  torch.zeros(3, d, dtype=F64), covs)
    gen = torch.Generator().manual_seed(4)
    truth = torch.linalg.cholesky(covs[2]) @ torch.randn(d, generator=gen, dtype=F64)
    y = truth + scale * torch.randn(d, generator=gen, dtype=F64)

    def model(prior, y):
        f = pyro.sample("f", prior)
        with pyro.plate("points", d):
            pyro.sample("y", dist.Normal(f, scale), obs=y)

    return mix, y, model, scale


def _blurred_posterior_moments(mix, y, scale, rho):
    """Per-coordinate mean and sd of the exact posterior of the mixture prior ``mix`` given
    ``y`` seen with noise ``scale``, blurred by ``rho`` (noise variance ``scale^2 + rho^2``)."""
    post, _ = mix.condition(torch.eye(y.shape[0], dtype=F64), y, scale ** 2 + rho ** 2)
    mean = post.weights @ post.means
    sd = (post.weights @ (post.covs.diagonal(dim1=-2, dim2=-1) + post.means.square())
          - mean.square()).sqrt()
    return mean, sd


@pytest.mark.parametrize("local_curvature", [True, False])
def test_scale_mixture_prior_needs_its_own_curvature(local_curvature):
    # A GP under a hyperprior on the lengthscale, as a 3-component scale mixture (exact
    # denoiser), seen with Gaussian noise: the exact posterior is a Gaussian mixture. The
    # prior's Gaussian part (its overall covariance) is far rougher than the components the
    # data favour, so a mass built from it is too soft for their smooth directions and the
    # chains escape to the rough component (draws too wide); the prior's own curvature at the
    # mode (the denoiser's Jacobian) fixes it.
    mix, y, model, scale = _scale_mixture_problem()
    prior = DiffusionPrior(mix, y.shape)
    # The blur makes the target the posterior with noise variance scale^2 + rho^2.
    rho = 0.02
    mean, sd = _blurred_posterior_moments(mix, y, scale, rho)
    lang = DiffusionLangevin(model, num_samples=2000, num_steps=20, rho_min=rho, seed=0,
                             progress=False, preconditioner="gaussian",
                             local_curvature=local_curvature).run(prior, y)
    f = lang.get_samples()["f"]
    smd = ((f.mean(0) - mean) / sd).abs().mean()
    ratio = (f.std(0) / sd).mean()
    # Measured: 0.043 / 0.978 with the local curvature, 0.273 / 1.267 without.
    if local_curvature:
        assert smd < 0.08 and abs(ratio - 1) < 0.05, (smd, ratio)
    else:
        assert ratio > 1.1, ratio


def test_start_moves_to_the_mode_of_the_blurred_posterior_with_a_mixture_prior():
    # A 3-component GP scale mixture (exact denoiser) seen with Gaussian noise. The Laplace
    # mode of the prior's Gaussian part is not the blurred posterior's mode; the refinement
    # with the prior's own score must end where the exact gradient of
    # log sum_k w_k N(x; 0, C_k + rho^2) + log N(y; x, s^2) vanishes (autograd, float64).
    mix, y, model, scale = _scale_mixture_problem()
    prior, d, covs, weights, rho = DiffusionPrior(mix, y.shape), y.shape[0], mix.covs, \
        mix.weights, 0.02
    blurred = dist.MixtureSameFamily(
        dist.Categorical(weights),
        dist.MultivariateNormal(torch.zeros(3, d, dtype=F64),
                                covs + rho ** 2 * torch.eye(d, dtype=F64)))

    def gradient_norm(x):
        x = x.double().detach().requires_grad_(True)
        value = blurred.log_prob(x) + dist.Normal(x, scale).log_prob(y).sum()
        (grad,) = torch.autograd.grad(value, x)
        return float(grad.norm())

    runs = {mi: DiffusionLangevin(model, num_samples=8, num_steps=1, rho_min=rho, seed=0,
                                  progress=False, preconditioner="gaussian",
                                  mode_iterations=mi).run(prior, y) for mi in (0, 40)}
    # Measured: 175 at the Gaussian part's mode, 2e-10 after the refinement (a shift of 4.2
    # sds of the local mass).
    assert gradient_norm(runs[0].mode) > 10
    assert gradient_norm(runs[40].mode) < 1e-5
    assert runs[40].mode_shift > 1 and runs[0].mode_shift == 0


def test_mixture_priors_get_their_own_defaults_and_match_the_blurred_posterior():
    # A prior that declares itself a Gaussian mixture (an exact mixture denoiser here, a
    # mixture skip for trained ones) gets the "mixture" defaults: more steps and a larger
    # blur, which smooths the mixture's curvature for the fixed step. The draws must match
    # the exact posterior with the noise variance raised by the blur that resolved.
    from pyro_diffusion import MLP, EDMDenoiser
    from pyro_diffusion.langevin import DEFAULT_RHO_MIN, DEFAULT_STEPS, declares_mixture

    mix, y, model, scale = _scale_mixture_problem()
    prior, d = DiffusionPrior(mix, y.shape), y.shape[0]
    assert declares_mixture(prior)
    assert not declares_mixture(DiffusionPrior(GaussianDenoiser(torch.zeros(d, dtype=F64),
                                                                mix.covs[0]), y.shape))
    for k, expected in [(1, False), (3, True)]:
        den = EDMDenoiser(MLP((d,)), (d,), gaussian_skip=k)
        assert declares_mixture(DiffusionPrior(den, (d,))) is expected
    lang = DiffusionLangevin(model, num_samples=2000, seed=0, progress=False,
                             preconditioner="gaussian").run(prior, y)
    rho = lang.rho_min_used
    assert lang.num_steps_used == DEFAULT_STEPS["mixture"]
    assert rho == pytest.approx(DEFAULT_RHO_MIN["mixture"] * float(mix.data_std))
    mean, sd = _blurred_posterior_moments(mix, y, scale, rho)
    f = lang.get_samples()["f"]
    smd = ((f.mean(0) - mean) / sd).abs().mean()
    ratio = (f.std(0) / sd).mean()
    # Measured: 0.032 / 0.975 (seeds 1-3: 0.028-0.030 / 0.969-0.978).
    assert smd < 0.08 and abs(ratio - 1) < 0.05, (smd, ratio)
