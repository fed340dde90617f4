"""Posterior-sampling benchmark: guided samplers against the exact posterior of a mixture prior.

The prior is the 25-component Gaussian mixture of Cardoso et al. (2023): unit covariances, means
on the grid ``{-16, -8, 0, 8, 16}^2`` tiled to ``d_x`` coordinates, seeded random weights
(``rand + 0.5``, one mixture per ``d_x``, shared by all instances). Each instance draws an
observation matrix ``A`` (``d_y x d_x``, random orthogonal factors and singular values uniform on
``[0, 1]``), ``x_true`` from the prior and ``y = A x_true + noise * eps``. With the exact
denoiser (:class:`pyro_diffusion.GaussianMixtureDenoiser`) there is no training error and the
posterior is known in closed form (``gm.condition``), so what is measured is the guidance's
approximation and the sampler's discretisation alone.

For every ``d_x``, ``d_y``, method and step count the script reports, over the instances,

- denoiser forward evaluations per sample (counted as batch rows through the denoiser), and
  vector-Jacobian products through the denoiser per sample (rows of gradients flowing back
  through its output, counted by an identity autograd function);
- wall time of one run (``num_samples`` draws, one batch);
- SW2: sliced Wasserstein-2 (``pyro_diffusion.sliced_wasserstein``, ``p=2``, 256 projections)
  between the samples and as many exact posterior draws, mean ± sd over instances;
- one "exact (noise floor)" row per ``(d_x, d_y)``: SW2 between two independent exact sets.

Methods: this package's MMPS (conjugate gradients, and the direct solve), DPS (several
``zeta``) and ``DiffusionSMC`` (as many particles as samples, MMPS twist); with ``--azula``
also azula's MMPS (GMRES and CG), DPS and TDS on the same exact denoiser, wrapped as an azula
``Denoiser`` with ``alpha = 1`` and the same EDM noise grid (azula's samplers stop at
``sigma_min`` rather than 0).

Usage::

    python bench/gmm_posterior.py --quick            # d_x = 8, 2 instances
    python bench/gmm_posterior.py --azula --out results.md

Reference: Cardoso, Janati El Idrissi, Le Corff, Moulines (2023), *Monte Carlo guided
diffusion for Bayesian linear inverse problems*.
"""

import argparse
import os
import platform
import shlex
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from _common import derived_seed, fmt_pm, markdown_table
from torch import nn

import pyro_diffusion
from pyro_diffusion import (
    DPS,
    MMPS,
    DiffusionPosterior,
    DiffusionPrior,
    DiffusionSMC,
    GaussianMixtureDenoiser,
    sliced_wasserstein,
)

F64 = torch.float64
NUM_PROJECTIONS = 256
DEFAULT_DIMS = (8, 80, 800)
DEFAULT_OBS_DIMS = (1, 2, 4)
DEFAULT_ZETAS = (0.01, 0.1, 1.0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=None,
                        help="d_x values (default: 8 80 800; --quick: 8)")
    parser.add_argument("--obs-dims", type=int, nargs="+", default=list(DEFAULT_OBS_DIMS),
                        help="d_y values (default: 1 2 4)")
    parser.add_argument("--instances", type=int, default=None,
                        help="random instances per (d_x, d_y) (default: 5; --quick: 2)")
    parser.add_argument("--steps", type=int, nargs="+", default=[100],
                        help="reverse steps (default: 100)")
    parser.add_argument("--num-samples", type=int, default=1000,
                        help="posterior samples per run (default: 1000)")
    parser.add_argument("--large-dim-samples", type=int, default=200,
                        help="samples per run for d_x >= 400 (default: 200; CPU cost)")
    parser.add_argument("--zetas", type=float, nargs="+", default=list(DEFAULT_ZETAS),
                        help="DPS step sizes of this package (default: 0.01 0.1 1)")
    parser.add_argument("--mmps-iterations", type=int, default=5,
                        help="CG (and azula GMRES/CG) iterations of MMPS (default: 5)")
    parser.add_argument("--noise", type=float, default=0.1,
                        help="observation noise sd (default: 0.1)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument("--quick", action="store_true", help="d_x = 8 only, 2 instances")
    parser.add_argument("--azula", action="store_true",
                        help="also run azula's DPS, MMPS and TDS (needs `import azula`)")
    parser.add_argument("--out", default=None, help="also write the results as markdown here")
    args = parser.parse_args(argv)
    args.dims = args.dims or ([8] if args.quick else list(DEFAULT_DIMS))
    if args.instances is None:
        args.instances = 2 if args.quick else 5
    if min(args.dims + args.obs_dims + args.steps) < 1 or args.instances < 1 \
            or args.num_samples < 2 or args.threads < 1:
        parser.error("dimensions, steps, instances, threads must be positive")
    return args


def gmm_instance(seed, d, m):
    """Random ``A`` (m x d) with orthogonal factors and singular values uniform on [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return U @ torch.diag(torch.rand(m, generator=g, dtype=F64)) @ V[:m]


class _CountVJP(torch.autograd.Function):
    """Identity whose backward counts the rows of the gradient flowing through it."""

    @staticmethod
    def forward(ctx, x, counts):
        ctx.counts = counts
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.counts["vjp"] += grad.shape[0]
        return grad, None


class CountingDenoiser(nn.Module):
    """Wraps a denoiser; counts forward rows and vector-Jacobian-product rows through it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.counts = {"fwd": 0, "vjp": 0}

    def reset(self):
        self.counts["fwd"] = self.counts["vjp"] = 0

    @property
    def data_mean(self):
        return self.inner.data_mean

    @property
    def data_std(self):
        return self.inner.data_std

    def forward(self, x, sigma):
        self.counts["fwd"] += x.shape[0]
        out = self.inner(x, sigma)
        if torch.is_grad_enabled() and out.requires_grad:
            out = _CountVJP.apply(out, self.counts)
        return out


def run_ours(den, prior, A, y, noise, guidance, n, steps, seed):
    def model(prior, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Normal(f @ A.T, noise).to_event(1), obs=y)

    den.reset()
    post = DiffusionPosterior(model, guidance=guidance, num_samples=n, batch_size=n,
                              num_steps=steps, seed=seed, progress=False).run(prior, y)
    return post.get_samples()["f"], post.wall_time


def run_smc(den, prior, A, y, noise, n, steps, seed):
    """``DiffusionSMC`` with ``n`` particles (as azula's TDS), ``n`` resampled draws."""
    def model(prior, y):
        f = pyro.sample("f", prior)
        pyro.sample("y", dist.Normal(f @ A.T, noise).to_event(1), obs=y)

    den.reset()
    smc = DiffusionSMC(model, num_particles=n, num_steps=steps, seed=seed,
                       progress=False).run(prior, y)
    return smc.get_samples(n)["f"], smc.wall_time


def azula_methods(den, prior, A, y, noise, n, steps, iterations):
    """``{label: callable(seed) -> samples}`` for azula's samplers on the same denoiser."""
    import azula
    from azula.denoise import DiracPosterior
    from azula.guidance import DPSSampler, MMPSDenoiser, TDSSampler
    from azula.linalg.covariance import DiagonalCovariance
    from azula.noise import Schedule
    from azula.sample import DDPMSampler

    lo, hi, rho = prior.sigma_min, prior.sigma_max, prior.rho

    class EDMSchedule(Schedule):
        """alpha = 1, sigma(t) the EDM grid of the package's prior (t = 1: sigma_max)."""

        def __call__(self, t):
            return torch.ones_like(t), self.sigma(t)

        def alpha(self, t):
            return torch.ones_like(t)

        def sigma(self, t):
            return (lo ** (1 / rho) + t * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho

    class Wrapped(azula.denoise.Denoiser):
        def __init__(self):
            super().__init__()
            self.den = den
            self.schedule = EDMSchedule()

        def forward(self, x_t, t, **kwargs):
            sigma = self.schedule.sigma(t).to(x_t).expand(x_t.shape[0])
            return DiracPosterior(mean=self.den(x_t, sigma))

    wrapped = Wrapped()
    m = A.shape[0]

    def A_fn(x):
        return x @ A.T

    cov_y = DiagonalCovariance(torch.full((m,), noise**2, dtype=F64))
    S_base = noise**2 * torch.eye(m, dtype=F64)
    AAt = A @ A.T

    def twist(x_hat, sigma):
        # log N(y; A x_hat, noise^2 I + sigma^2 A A^T): the unit-variance Gaussian closure.
        cov = S_base + sigma.to(F64) ** 2 * AAt
        return dist.MultivariateNormal(A_fn(x_hat), covariance_matrix=cov).log_prob(y)

    class PerSampleDPS(DPSSampler):
        """azula's DPS with the residual norm per sample (Chung et al.), not per batch."""

        @torch.no_grad()
        def step(self, x_t, t, s, **kwargs):
            alpha_s, sigma_s = self.denoiser.schedule(s)
            alpha_t, sigma_t = self.denoiser.schedule(t)
            tau = 1 - (alpha_t / alpha_s * sigma_s / sigma_t) ** 2
            eps = torch.randn_like(x_t)
            with torch.enable_grad():
                x_t = x_t.detach().requires_grad_()
                x_hat = self.denoiser(x_t, t, **kwargs).mean
                norm = torch.linalg.vector_norm(self.y - self.A(x_hat), dim=-1).sum()
            x_s = alpha_s * x_hat
            x_s = x_s + sigma_s * torch.sqrt(1 - tau) / sigma_t * (x_t - alpha_t * x_hat)
            x_s = x_s + sigma_s * torch.sqrt(tau) * eps
            grad = torch.autograd.grad(norm, x_t)[0]
            return x_s - self.zeta * grad

    common = dict(steps=steps, silent=True, dtype=F64)
    mean, var = den.data_mean.to(F64), float(den.data_std) ** 2
    d = A.shape[1]

    def sampler_run(make):
        def go(seed):
            torch.manual_seed(seed)
            sampler = make()
            x = sampler.init((n, d), mean=mean, var=var)
            return sampler(x)
        return go

    return {
        f"azula MMPS (GMRES {iterations})": sampler_run(lambda: DDPMSampler(
            MMPSDenoiser(wrapped, y, A_fn, cov_y, solver="gmres", iterations=iterations),
            **common)),
        f"azula MMPS (CG {iterations})": sampler_run(lambda: DDPMSampler(
            MMPSDenoiser(wrapped, y, A_fn, cov_y, solver="cg", iterations=iterations),
            **common)),
        "azula DPS (zeta=1, batch norm)": sampler_run(
            lambda: DPSSampler(wrapped, y, A_fn, zeta=1.0, **common)),
        "azula DPS (zeta=1, per-sample norm)": sampler_run(
            lambda: PerSampleDPS(wrapped, y, A_fn, zeta=1.0, **common)),
        "azula TDS (n particles)": sampler_run(
            lambda: TDSSampler(wrapped, twist, **common)),
    }


def sw(x, ref, seed, p=2):
    if not torch.isfinite(x).all():
        return float("nan")
    return sliced_wasserstein(x, ref, NUM_PROJECTIONS, p=p, seed=seed)


def floor_study(gm, d, m, noise, seed, instances):
    """Exact-vs-exact sliced Wasserstein under several conventions (the noise floor)."""
    rows = []
    for n in (1000, 10000):
        for p, squared in ((2, False), (2, True), (1, False)):
            vals = []
            for i in range(instances):
                A = gmm_instance(derived_seed(seed, "A", d, m, i), d, m)
                torch.manual_seed(derived_seed(seed, "y", d, m, i))
                y = A @ gm.sample_data(1)[0] + noise * torch.randn(m, dtype=F64)
                post, _ = gm.condition(A, y, noise**2)
                a, b = post.sample_data(n), post.sample_data(n)
                v = sliced_wasserstein(a, b, NUM_PROJECTIONS, p=p, seed=seed)
                vals.append(v**2 if squared else v)
            label = f"SW{p}" + ("^2 (no root)" if squared else "")
            rows.append([d, m, n, label, fmt_pm(vals, 4)])
    return rows


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()

    azula_version = None
    if args.azula:
        try:
            from importlib.metadata import version

            import azula  # noqa: F401

            azula_version = version("azula")
        except Exception as exc:
            print(f"--azula: cannot import azula ({exc!r}); skipping it", file=sys.stderr)
            args.azula = False

    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
    info = [
        f"command: `{command}`",
        f"torch {torch.__version__}, pyro {pyro.__version__}, pyro_diffusion "
        f"{pyro_diffusion.__version__}, azula {azula_version or 'not used'}, python "
        f"{platform.python_version()}, float64",
        f"threads: {torch.get_num_threads()} (torch.set_num_threads); machine: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores visible",
        f"instances: {args.instances}; noise sd: {args.noise}; samples per run: "
        f"{args.num_samples}"
        + (f" ({args.large_dim_samples} for d_x >= 400)" if args.large_dim_samples else "")
        + f"; seed: {args.seed}; MMPS iterations: {args.mmps_iterations}",
    ]
    for line in info:
        print(line)
    print(flush=True)

    header = ["d_x", "d_y", "method", "steps", "fwd/sample", "VJP/sample", "wall s",
              "SW2 (mean ± sd)"]
    rows = []
    for d in args.dims:
        gm = GaussianMixtureDenoiser.grid_benchmark(d, seed=0)
        den = CountingDenoiser(gm)
        n = args.large_dim_samples if (args.large_dim_samples and d >= 400) else args.num_samples
        for m in args.obs_dims:
            instances = []
            for i in range(args.instances):
                A = gmm_instance(derived_seed(args.seed, "A", d, m, i), d, m)
                torch.manual_seed(derived_seed(args.seed, "y", d, m, i))
                y = A @ gm.sample_data(1)[0] + args.noise * torch.randn(m, dtype=F64)
                post, _ = gm.condition(A, y, args.noise**2)
                torch.manual_seed(derived_seed(args.seed, "ref", d, m, i))
                ref = post.sample_data(n)
                floor = sw(post.sample_data(n), ref, args.seed)
                instances.append((A, y, ref, floor))
            floor = [inst[3] for inst in instances]
            rows.append([d, m, "exact (noise floor)", "–", "–", "–", "–", fmt_pm(floor)])
            print("  ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
            for steps in args.steps:
                prior = DiffusionPrior(den, (d,), num_steps=steps)
                methods = [(f"MMPS (CG {args.mmps_iterations})",
                            MMPS(args.mmps_iterations, solver="cg")),
                           ("MMPS (direct)", MMPS(solver="direct"))]
                methods += [(f"DPS (zeta={z:g})", DPS(z)) for z in args.zetas]
                results = {label: [] for label, _ in methods}
                for label, guidance in methods:
                    for i, (A, y, ref, _) in enumerate(instances):
                        seed = derived_seed(args.seed, "run", d, m, i, steps, label)
                        x, wall = run_ours(den, prior, A, y, args.noise, guidance, n, steps,
                                           seed)
                        results[label].append((sw(x, ref, args.seed), wall,
                                               den.counts["fwd"] / n, den.counts["vjp"] / n))
                for i, (A, y, ref, _) in enumerate(instances):
                    seed = derived_seed(args.seed, "smc", d, m, i, steps)
                    x, wall = run_smc(den, prior, A, y, args.noise, n, steps, seed)
                    results.setdefault("SMC (n particles, MMPS twist)", []).append(
                        (sw(x, ref, args.seed), wall, den.counts["fwd"] / n,
                         den.counts["vjp"] / n))
                if args.azula:
                    for i, (A, y, ref, _) in enumerate(instances):
                        fns = azula_methods(den, prior, A, y, args.noise, n, steps,
                                            args.mmps_iterations)
                        for label, fn in fns.items():
                            den.reset()
                            seed = derived_seed(args.seed, "azula", d, m, i, steps, label)
                            tic = time.perf_counter()
                            x = fn(seed)
                            wall = time.perf_counter() - tic
                            results.setdefault(label, []).append(
                                (sw(x, ref, args.seed), wall, den.counts["fwd"] / n,
                                 den.counts["vjp"] / n))
                for label, res in results.items():
                    sws, walls, fwd, vjp = zip(*res, strict=True)
                    rows.append([d, m, label, steps, f"{fwd[0]:g}", f"{vjp[0]:g}",
                                 f"{sum(walls) / len(walls):.2f}", fmt_pm(sws)])
                    print("  ".join(map(str, rows[-1])), file=sys.stderr, flush=True)

    gm8 = GaussianMixtureDenoiser.grid_benchmark(8, seed=0)
    floor_rows = floor_study(gm8, 8, 2, args.noise, args.seed, args.instances)
    total = time.perf_counter() - start
    table = markdown_table(header, rows)
    floor_table = markdown_table(["d_x", "d_y", "n per set", "metric", "exact vs exact"],
                                 floor_rows)
    print(table)
    print("\nNoise floor under other conventions (d_x = 8, d_y = 2, same instances):\n")
    print(floor_table)
    footer = (f"SW2: sliced Wasserstein-2, {NUM_PROJECTIONS} projections, against one set of "
              f"as many exact posterior draws per instance; mean ± sd over {args.instances} "
              f"instances. fwd/VJP per sample: denoiser rows per sample (forward calls; "
              f"vector-Jacobian products through the denoiser). wall s: mean per run.\n\n"
              f"total run time: {total:.0f} s")
    print(f"\n{footer}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(f"- {line}" for line in info) + f"\n\n{table}\n\n"
                    f"Noise floor under other conventions (d_x = 8, d_y = 2):\n\n"
                    f"{floor_table}\n\n{footer}\n")


if __name__ == "__main__":
    main()
