"""CUDA checks: run where a GPU is present (skipped on CPU-only machines such as CI)."""

import pytest
import torch

from pyro_diffusion import DiffusionPrior, GaussianMixtureDenoiser, sliced_wasserstein

from .conftest import grid_mixture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_float32_thousands_of_steps_without_nans():
    gm = grid_mixture(d=8, dtype=torch.float32).to("cuda")
    for sampler in ("ancestral", "heun", "ddim"):
        prior = DiffusionPrior(gm, (8,), num_steps=4000, sampler=sampler)
        x = prior.sample((2048,))
        assert x.device.type == "cuda" and x.dtype == torch.float32
        assert torch.isfinite(x).all()
        freq = torch.bincount(gm.component_of(x), minlength=25) / x.shape[0]
        assert 0.5 * (freq - gm.weights).abs().sum().item() < 0.08


def test_edge_noise_levels_float32():
    gm = GaussianMixtureDenoiser(torch.ones(3), torch.randn(3, 4) * 5, torch.full((3,), 1e-3))
    gm = gm.to("cuda")
    prior = DiffusionPrior(gm, (4,))
    x = torch.randn(64, 4, device="cuda") * 1e3
    for sigma in (0.0, 1e-8, 1e-3, 1e4, 1e8):
        assert torch.isfinite(prior.denoise(x, sigma)).all(), sigma
        if sigma > 0:
            assert torch.isfinite(prior.score(x, sigma)).all(), sigma


def test_fit_on_cuda_then_load_on_cpu(tmp_path):
    gm = grid_mixture(d=2, dtype=torch.float32)
    data = gm.sample_data(20_000).cuda()
    prior = DiffusionPrior.fit(data, steps=3000, seed=0, progress=False, num_steps=64,
                               sampler="heun")
    assert prior.device.type == "cuda"
    x = prior.sample((8000,))
    assert torch.isfinite(x).all()
    ref = gm.sample_data(8000)
    assert sliced_wasserstein(x.cpu(), ref, p=1) < 0.6
    prior.save(tmp_path / "p.pt")
    cpu = DiffusionPrior.load(tmp_path / "p.pt")
    assert cpu.device.type == "cpu"
    z = torch.randn(10, 2) * 5
    torch.testing.assert_close(cpu.denoise(z, 1.0), prior.denoise(z.cuda(), 1.0).cpu(),
                               atol=1e-4, rtol=1e-4)


def _poisson_gp_problem(device="cuda", **prior_settings):
    """A 5-point GP prior (exact denoiser, on ``device``) with Poisson counts, the model, and
    the posterior mean and sd by importance sampling 400 000 prior draws on the CPU."""
    import pyro
    import pyro.distributions as dist

    from pyro_diffusion import GaussianDenoiser

    d = 5
    pts = torch.linspace(0, 1, d)
    cov = torch.exp(-0.5 * (pts[:, None] - pts[None]) ** 2 / 0.3**2) + 1e-3 * torch.eye(d)
    prior = DiffusionPrior(GaussianDenoiser(torch.zeros(d), cov).to(device), (d,),
                           **prior_settings)
    exposure = torch.full((d,), 3.0, device=device)
    y = torch.tensor([2.0, 5.0, 1.0, 0.0, 7.0], device=device)

    def model(prior, exposure, y):
        f = pyro.sample("f", prior)
        with pyro.plate("areas", d):
            pyro.sample("y", dist.Poisson(exposure * f.exp()), obs=y)

    z = torch.distributions.MultivariateNormal(torch.zeros(d), cov).sample((400_000,))
    w = torch.softmax(dist.Poisson(exposure.cpu() * z.exp()).log_prob(y.cpu()).sum(-1), 0)
    mean = w @ z
    sd = (w @ (z - mean) ** 2).sqrt()
    return model, (prior, exposure, y), mean, sd


def test_guided_posterior_on_cuda_float32():
    from pyro_diffusion import DiffusionPosterior

    model, args, mean, sd = _poisson_gp_problem(num_steps=100)
    post = DiffusionPosterior(model, num_samples=4000, batch_size=2000, seed=0,
                              progress=False).run(*args)
    x = post.get_samples()["f"]
    assert x.device.type == "cuda" and torch.isfinite(x).all()
    assert ((x.mean(0).cpu() - mean) / sd).abs().max() < 0.3


def test_smc_on_cuda_float32():
    import pyro
    import pyro.distributions as dist

    from pyro_diffusion import DiffusionSMC, GaussianDenoiser, noise_grid

    d = 4
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    cov = (q * torch.linspace(0.3, 2.0, d)) @ q.T
    g = GaussianDenoiser(torch.zeros(d), cov)
    prior = DiffusionPrior(g.to("cuda"), (d,), num_steps=64)
    A = torch.randn(2, d, generator=gen)
    y = torch.tensor([0.7, -1.2])

    def model(prior, A, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Normal(f @ A.T, 0.3).to_event(1), obs=y)

    smc = DiffusionSMC(model, num_particles=4096, seed=0, progress=False).run(
        prior, A.cuda(), y.cuda())
    x = smc.get_samples()["f"]
    assert x.device.type == "cuda" and torch.isfinite(x).all()
    g64 = GaussianDenoiser(torch.zeros(d, dtype=torch.float64), cov.double())
    sigmas = noise_grid(64, prior.sigma_min, prior.sigma_max, prior.rho,
                        dtype=torch.float64)[:-1]
    post, log_z = g64.ancestral_marginal(sigmas).condition(A.double(), y.double(), 0.09)
    assert abs(smc.log_evidence - float(log_z)) < 0.1
    assert ((x.double().mean(0).cpu() - post.mean) / post.cov.diagonal().sqrt()).abs().max() < 0.2


def test_langevin_on_cuda_float32():
    from pyro_diffusion import DiffusionLangevin

    model, args, mean, sd = _poisson_gp_problem()
    run = DiffusionLangevin(model, num_samples=4000, num_steps=2000, rho_min=0.05, seed=0,
                            progress=False).run(*args)
    x = run.get_samples()["f"]
    assert x.device.type == "cuda" and torch.isfinite(x).all()
    assert ((x.mean(0).cpu() - mean) / sd).abs().max() < 0.1
    assert ((x.std(0).cpu() / sd) - 1).abs().max() < 0.1


def test_mixture_skip_fitted_on_cuda_matches_cpu():
    # The EM fit and the mixture skip run on the samples' device; the result is the CPU one.
    import copy

    from pyro_diffusion import EDMDenoiser, default_network

    gm = GaussianMixtureDenoiser(torch.tensor([0.6, 0.4]), torch.zeros(2, 5),
                                 torch.tensor([0.2, 3.0]))
    torch.manual_seed(0)
    data = gm.sample_data(4000)
    net = default_network((5,), "mlp", zero_output=True, width=16)
    cpu = EDMDenoiser.from_samples(net, data, gaussian_skip=2)
    gpu = EDMDenoiser.from_samples(copy.deepcopy(net).cuda(), data.cuda(), gaussian_skip=2)
    x = torch.randn(16, 5) * 2
    for s in (1e-6, 0.05, 1.0, 1e4):
        sigma = torch.full((16,), s)
        out = gpu(x.cuda(), sigma.cuda())
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.cpu(), cpu(x, sigma), atol=1e-3, rtol=1e-3)


def test_device_argument_moves_the_prior_and_the_model_arguments():
    # Everything built on the CPU; device="cuda" moves the prior (in place) and the tensor
    # arguments, so the model's exposure * f.exp() meets no CPU tensor.
    from pyro_diffusion import DiffusionLangevin, DiffusionPosterior

    for make in (lambda m: DiffusionPosterior(m, num_samples=4000, batch_size=2000, seed=0,
                                              progress=False, device="cuda"),
                 lambda m: DiffusionLangevin(m, num_samples=4000, seed=0, progress=False,
                                             device="cuda")):
        model, args, mean, sd = _poisson_gp_problem(device="cpu", num_steps=100)
        x = make(model).run(*args).get_samples()["f"]
        assert x.device.type == "cuda" and args[0].device.type == "cuda"
        assert args[1].device.type == "cpu"  # the caller's tensors are copied, not moved
        assert ((x.mean(0).cpu() - mean) / sd).abs().max() < 0.3


def test_a_seeded_cpu_run_leaves_the_cuda_generator_alone():
    from pyro_diffusion import DiffusionPosterior

    model, args, _, _ = _poisson_gp_problem(device="cpu", num_steps=20)
    torch.cuda.init()
    torch.cuda.manual_seed(123)
    state = torch.cuda.get_rng_state()
    DiffusionPosterior(model, num_samples=16, seed=0, progress=False).run(*args)
    assert torch.equal(torch.cuda.get_rng_state(), state)


def test_denoisers_built_from_gpu_parts_live_on_the_gpu():
    from pyro_diffusion import MLP, EDMDenoiser, GaussianDenoiser

    for k in (0, 1, 3):
        den = EDMDenoiser(MLP((6,)).cuda(), (6,), gaussian_skip=k)
        assert {b.device.type for b in den.buffers()} == {"cuda"}, k
        out = DiffusionPrior(den, (6,)).denoise(torch.randn(4, 6), 0.5)
        assert out.device.type == "cuda" and torch.isfinite(out).all()
    g = GaussianDenoiser(torch.zeros(3), torch.eye(3, device="cuda"))
    m = GaussianMixtureDenoiser(torch.ones(2), torch.zeros(2, 3, device="cuda"), torch.ones(2))
    for den in (g, m):
        assert {b.device.type for b in den.buffers()} == {"cuda"}


def test_run_nuts_on_gpu_arguments_is_seeded_there_and_restores_the_generator():
    import pyro
    import pyro.distributions as dist

    from pyro_diffusion.diagnostics import run_nuts

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), device=y.device), 1.0))
        pyro.sample("y", dist.Normal(mu, 0.5).expand(y.shape).to_event(1), obs=y)

    y = torch.tensor([0.3, 0.9, 0.4], device="cuda")
    torch.cuda.manual_seed(123)
    state = torch.cuda.get_rng_state()
    runs = [run_nuts(model, y, num_samples=50, warmup_steps=50, num_chains=1, seed=3,
                     progress=False, jit_compile=False).get_samples()["mu"] for _ in range(2)]
    assert torch.equal(runs[0].cpu(), runs[1].cpu())
    assert torch.equal(torch.cuda.get_rng_state(), state)


def test_sample_gp_with_a_gpu_hyperprior_is_reproducible():
    import math

    from torch.distributions import LogNormal

    from pyro_diffusion.datasets import sample_gp

    hyper = LogNormal(torch.tensor(math.log(0.2), device="cuda"), 0.3)
    points = torch.linspace(0, 1, 6)[:, None]
    draws = [sample_gp(5, points, lengthscale=hyper, seed=7, return_hyperparameters=True)
             for _ in range(2)]
    assert torch.equal(draws[0][0], draws[1][0])
    assert torch.equal(draws[0][1]["lengthscale"], draws[1][1]["lengthscale"])
