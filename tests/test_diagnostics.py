"""NUTS reference runs, ArviZ conversion and posterior comparison, against closed forms.

The conjugate problem: a 3-D Gaussian prior ``f ~ N(mu0, S0)`` observed through
``y ~ N(A f, noise^2 I)``, whose posterior is Gaussian in closed form. NUTS runs on its whitened
form (``z ~ N(0, I)``, ``f = mu0 + L z``); the diffusion samplers use the exact
``GaussianDenoiser`` prior, so all three target the same posterior up to Monte Carlo error.
"""

import math
import random
import types
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC

from pyro_diffusion import (
    DiffusionPosterior,
    DiffusionPrior,
    DiffusionSMC,
    GaussianDenoiser,
    diagnostics,
)
from pyro_diffusion.diagnostics import (
    COLUMNS,
    compare_posteriors,
    plot_comparison,
    run_nuts,
    to_inference_data,
)
from pyro_diffusion.inference_data import _import_arviz

from .conftest import random_cov

F64 = torch.float64
NUM_SAMPLES, WARMUP, NUM_CHAINS = 300, 200, 2


def whitened_model(mu0, L, A, noise, y=None):
    z = pyro.sample("z", dist.Normal(torch.zeros_like(mu0), 1.0).to_event(1))
    f = pyro.deterministic("f", mu0 + L @ z)
    pyro.sample("y", dist.Normal(A @ f, noise).to_event(1), obs=y)


def diffusion_model(prior, A, noise, y=None):
    f = pyro.sample("f", prior)
    pyro.sample("y", dist.Normal(f @ A.T, noise).to_event(1), obs=y)


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(3)
    d, m, noise = 3, 4, 0.5
    mu0 = torch.tensor([0.5, -0.2, 1.0], dtype=F64)
    cov0 = random_cov(d, low=0.3, high=2.0, seed=3)
    A = torch.randn(m, d, generator=gen, dtype=F64)
    L = torch.linalg.cholesky(cov0)
    y = A @ (mu0 + L @ torch.randn(d, generator=gen, dtype=F64)) \
        + noise * torch.randn(m, generator=gen, dtype=F64)
    post_cov = torch.linalg.inv(torch.linalg.inv(cov0) + A.T @ A / noise**2)
    post_mean = post_cov @ (torch.linalg.solve(cov0, mu0) + A.T @ y / noise**2)
    prior = DiffusionPrior(GaussianDenoiser(mu0, cov0), (d,), num_steps=128)
    return types.SimpleNamespace(mu0=mu0, cov0=cov0, L=L, A=A, y=y, noise=noise, prior=prior,
                                 post_mean=post_mean, post_sd=post_cov.diag().sqrt())


@pytest.fixture(scope="module")
def nuts(problem):
    p = problem
    return run_nuts(whitened_model, p.mu0, p.L, p.A, p.noise, y=p.y, num_samples=NUM_SAMPLES,
                    warmup_steps=WARMUP, num_chains=NUM_CHAINS, seed=0, progress=False)


@pytest.fixture(scope="module")
def posterior(problem):
    p = problem
    return DiffusionPosterior(diffusion_model, num_samples=1000, batch_size=500, seed=0,
                              progress=False).run(p.prior, p.A, p.noise, y=p.y)


@pytest.fixture(scope="module")
def smc(problem):
    p = problem
    return DiffusionSMC(diffusion_model, num_particles=512, num_steps=64, seed=0,
                        progress=False).run(p.prior, p.A, p.noise, y=p.y)


# --- run_nuts ---------------------------------------------------------------------------------


def test_run_nuts_recovers_the_conjugate_posterior(nuts, problem):
    assert isinstance(nuts, MCMC)
    assert nuts.wall_time > 0
    z = nuts.get_samples(group_by_chain=True)["z"]
    f = nuts.deterministic_samples["f"]
    assert z.shape == f.shape == (NUM_CHAINS, NUM_SAMPLES, 3)
    torch.testing.assert_close(f, problem.mu0 + z @ problem.L.T)

    table = compare_posteriors({"nuts": nuts}, "f")
    ess = torch.tensor(table[table.coord != "all"].ess_bulk.to_numpy())
    # Measured: bulk ESS 260-390 of 600 draws (185-390 over seeds 0-2); below 150 the
    # tolerances would be loose.
    assert (ess > 150).all(), ess
    x = f.reshape(-1, 3)
    # Mean: Monte Carlo standard error sd / sqrt(ESS); 4 standard errors.
    mean_err = (x.mean(0) - problem.post_mean).abs() / problem.post_sd
    assert (mean_err < 4 / ess.sqrt()).all(), (mean_err, ess)
    # Sd: relative standard error of a Gaussian sd is 1 / sqrt(2 ESS2), ESS2 the ESS of the
    # second moment; NUTS's bulk ESS of a Gaussian is often super-efficient for the mean but not
    # for squares, so take ESS2 = ESS / 2, and 4 standard errors: 4 / sqrt(ESS).
    sd_err = (x.std(0) / problem.post_sd - 1).abs()
    assert (sd_err < 4 / ess.sqrt()).all(), (sd_err, ess)


def test_run_nuts_is_reproducible_and_leaves_the_global_rng(problem):
    p = problem
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    def run(seed):
        return run_nuts(whitened_model, p.mu0, p.L, p.A, p.noise, y=p.y, num_samples=20,
                        warmup_steps=20, num_chains=1, seed=seed, progress=False,
                        jit_compile=False).get_samples()["z"]

    first, again, other = run(0), run(0), run(1)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), before[0])
    np.testing.assert_array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]


def test_run_nuts_runs_chains_sequentially_unless_parallel(problem, monkeypatch):
    from pyro.infer.mcmc import api

    p = problem
    # Pretend to have 8 CPUs: Pyro would then run 2 chains in worker processes by itself.
    monkeypatch.setattr(api.mp, "cpu_count", lambda: 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "more than available_cpu" warning
        mcmc = run_nuts(whitened_model, p.mu0, p.L, p.A, p.noise, y=p.y, num_samples=10,
                        warmup_steps=10, num_chains=2, progress=False, jit_compile=False)
    assert isinstance(mcmc.sampler, api._UnarySampler)
    assert mcmc.get_samples(group_by_chain=True)["z"].shape == (2, 10, 3)
    # parallel=True: Pyro's multi-process sampler with the "spawn" context (not started here).
    kernel = pyro.infer.NUTS(whitened_model)
    parallel = diagnostics._build_mcmc(kernel, 10, 10, 2, progress=False, parallel=True)
    try:
        assert isinstance(parallel.sampler, api._MultiSampler)
        assert parallel.sampler.ctx.get_start_method() == "spawn"
    finally:
        parallel.sampler.terminate()


@pytest.mark.parametrize("kwargs, match", [
    ({"num_samples": 0}, "num_samples"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"num_chains": 1.5}, "num_chains"),
    ({"target_accept_prob": 1.0}, "target_accept_prob"),
    ({"init_to": "mode"}, "init_to.*'mode'"),
])
def test_run_nuts_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_nuts(whitened_model, progress=False, **kwargs)


# --- to_inference_data ------------------------------------------------------------------------


def test_to_inference_data_of_all_kinds(nuts, posterior, smc):
    az = _import_arviz()
    dims, coords = {"f": ["coord"], "z": ["white"]}, {"coord": ["a", "b", "c"]}
    expected = {"nuts": (nuts, (NUM_CHAINS, NUM_SAMPLES)), "posterior": (posterior, (2, 500)),
                "smc": (smc, (1, 512))}
    for label, (x, lead) in expected.items():
        idata = to_inference_data(x, var_names=["f"], dims=dims, coords=coords)
        f = idata.posterior["f"]
        assert f.dims == ("chain", "draw", "coord"), label
        assert f.shape == (*lead, 3), label
        assert list(f.coords["coord"].values) == ["a", "b", "c"], label
        assert "z" not in idata.posterior.data_vars, label
        summary = az.summary(idata)
        assert list(summary.index) == ["f[a]", "f[b]", "f[c]"], label
        np.testing.assert_allclose(summary["mean"].to_numpy(),
                                   f.values.reshape(-1, 3).mean(0), atol=0.01)
    # Without var_names every site comes, the deterministic ones of run_nuts included.
    assert set(to_inference_data(nuts).posterior.data_vars) == {"z", "f"}


def test_to_inference_data_errors(nuts):
    with pytest.raises(TypeError, match="inference_data.to_inference_data"):
        to_inference_data({"f": np.zeros((2, 10, 3))})
    with pytest.raises(TypeError, match="got int"):
        to_inference_data(3)
    with pytest.raises(ValueError, match="'g'.*MCMC.*'f', 'z'"):
        to_inference_data(nuts, var_names=["f", "g"])
    with pytest.raises(RuntimeError, match="run"):
        to_inference_data(DiffusionPosterior(diffusion_model, progress=False))


# --- compare_posteriors -----------------------------------------------------------------------


def _synthetic(n_ref=(4, 5000), n_method=(2, 10000), seed=0):
    """Reference: a ~ N(0, 1), b ~ N(0, I_2); method: a ~ N(0.5, 2^2), b ~ N((0, 1), I_2)."""
    rng = np.random.default_rng(seed)
    ref = {"a": rng.normal(size=n_ref), "b": rng.normal(size=(*n_ref, 2))}
    method = {"a": rng.normal(0.5, 2.0, size=n_method),
              "b": rng.normal(size=(*n_method, 2)) + np.array([0.0, 1.0])}
    return ref, method


def test_compare_posteriors_known_answers():
    from scipy import integrate, stats

    ref, method = _synthetic()
    n = 20000  # draws of each, both variables
    table = compare_posteriors({"method": method, "exact": ref}, ["a", "b"], reference="exact")
    assert list(table.columns) == list(COLUMNS)
    assert list(table.method) == ["exact"] * 5 + ["method"] * 5  # reference first
    assert list(table.coord) == ["", "all", "0", "1", "all"] * 2
    rows = table.set_index(["method", "variable", "coord"])

    # The reference against itself: exact zeros and ones; coverage of its own equal-tailed 90%
    # interval is 0.9 up to the interpolation of its quantiles (1 / n).
    own = rows.loc["exact"]
    assert (own.loc[own.index.get_level_values("coord") != "all", "smd"] == 0).all()
    assert (own.sd_ratio == 1).all() and (own.distance == 0).all()
    np.testing.assert_allclose(own.coverage, 0.9, atol=2 / n)

    a = rows.loc[("method", "a", "")]
    z = stats.norm.ppf(0.95)
    # smd: standard error sqrt(4 / n + 1 / n) = 0.016 (means) plus 0.4% of 0.5 (the reference
    # sd); 0.07 is over 4 standard errors.
    assert a.smd == pytest.approx(0.5, abs=0.07)
    # sd ratio: relative error sqrt(1 / 2n + 1 / 2n) = 0.7%, i.e. 0.014 at 2; 0.06 is 4 se.
    assert a.sd_ratio == pytest.approx(2.0, abs=0.06)
    # Coverage: P(-z < N(0.5, 4) < z). Binomial se 0.0035, plus the reference's quantile error
    # (se 0.015 at +-z) times the method's density there (0.15): 0.005 in all; 0.02 is 4 se.
    coverage = stats.norm.cdf((z - 0.5) / 2) - stats.norm.cdf((-z - 0.5) / 2)
    assert a.coverage == pytest.approx(coverage, abs=0.02)
    # W1 = int_0^1 |F1^-1(u) - F2^-1(u)| du, by quadrature (= E|0.5 + Z| = 0.895). The
    # empirical W1's error is O(sd / sqrt(n)) ~ 0.015; 0.05 is over 3 se.
    w1, _ = integrate.quad(
        lambda u: abs(stats.norm.ppf(u) - stats.norm.ppf(u, 0.5, 2.0)), 0, 1, limit=200)
    assert a.distance == pytest.approx(w1, abs=0.05)
    # With equally many draws the distance is the exact empirical W1 (as in scipy).
    assert a.distance == pytest.approx(
        stats.wasserstein_distance(method["a"].ravel(), ref["a"].ravel()), rel=1e-9)
    # Independent draws: bulk ESS is the number of draws up to its own noise (a few %).
    assert a.ess_bulk == pytest.approx(n, rel=0.15)
    assert math.isnan(a.wall_time) and math.isnan(a.ess_per_second)  # dicts carry no timing
    a_all = rows.loc[("method", "a", "all")]
    assert a_all.distance == a.distance  # a scalar's sliced distance is the 1-D one
    assert a_all.abs_smd == a_all.max_abs_smd == abs(a.smd)

    # b: coordinate 0 agrees, coordinate 1 is shifted by one reference sd.
    b0, b1 = rows.loc[("method", "b", "0")], rows.loc[("method", "b", "1")]
    b_all = rows.loc[("method", "b", "all")]
    assert b0.smd == pytest.approx(0.0, abs=0.04)  # se sqrt(2 / n) = 0.01
    assert b1.smd == pytest.approx(1.0, abs=0.04)
    assert b_all.abs_smd == pytest.approx((abs(b0.smd) + abs(b1.smd)) / 2)
    assert b_all.max_abs_smd == pytest.approx(max(abs(b0.smd), abs(b1.smd)))
    assert b_all.sd_ratio == pytest.approx((b0.sd_ratio + b1.sd_ratio) / 2)
    assert b_all.coverage == pytest.approx((b0.coverage + b1.coverage) / 2)
    assert b_all.ess_bulk == min(b0.ess_bulk, b1.ess_bulk)
    assert math.isnan(b_all["smd"]) and math.isnan(b_all["mean"])
    # Sliced W1 of a shift (0, 1) between unit Gaussians: a direction theta sees a shift
    # |theta_2|, and E|theta_2| = 2 / pi on the circle. 256 directions: se 0.31 / 16 = 0.02,
    # plus the sampling error (0.01); 0.07 is 3 se.
    assert b_all.distance == pytest.approx(2 / math.pi, abs=0.07)


def test_compare_posteriors_takes_read_only_draws_quietly():
    import pandas as pd

    # NumPyro's draws (np.asarray of a JAX array) and ArviZ's are read-only; torch warns when
    # it shares such memory, so the distances copy them instead: same table, no warning.
    ref, method = _synthetic()
    frozen = {name: {k: v.copy() for k, v in d.items()} for name, d in
              [("method", method), ("exact", ref)]}
    for d in frozen.values():
        for v in d.values():
            v.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = compare_posteriors(frozen, ["a", "b"], reference="exact")
    expected = compare_posteriors({"method": method, "exact": ref}, ["a", "b"],
                                  reference="exact")
    pd.testing.assert_frame_equal(table, expected)


def test_compare_posteriors_end_to_end(nuts, posterior, smc):
    table = compare_posteriors({"mmps": posterior, "smc": smc, "nuts": nuts}, "f")
    assert list(table.method.unique()) == ["nuts", "mmps", "smc"]
    coords = table[table.coord != "all"].set_index(["method", "coord"])
    # NUTS (bulk ESS 260-390) and MMPS with the exact prior (1000 draws, ESS ~1000; bias below
    # 0.08 sd in test_posterior) both target the closed-form posterior: their means differ by
    # Monte Carlo error, se <= sqrt(1 / 260 + 1 / 950) = 0.07 reference sd, so 0.2 is about
    # 3 se. Measured: |smd| <= 0.15. SMC's 512 particles keep a weight ESS of ~290 (its ArviZ
    # ESS, ~500, overstates it): se 0.085, and 0.3 is 3.5 se; measured |smd| <= 0.22.
    assert (coords.loc["mmps"].smd.abs() < 0.2).all(), coords.loc["mmps"]
    assert (coords.loc["smc"].smd.abs() < 0.3).all(), coords.loc["smc"]
    for label, x in {"nuts": nuts, "mmps": posterior, "smc": smc}.items():
        rows = table[table.method == label]
        assert (rows.wall_time == x.wall_time).all()
        np.testing.assert_allclose(rows.ess_per_second, rows.ess_bulk / x.wall_time)
    assert (table[table.method == "smc"].num_draws == 512).all()


def test_compare_posteriors_errors(nuts, posterior):
    ref, method = _synthetic(n_ref=(2, 50), n_method=(2, 50))
    with pytest.raises(ValueError, match="reference 'nuts'.*'exact', 'method'"):
        compare_posteriors({"exact": ref, "method": method}, "a")
    with pytest.raises(ValueError, match="'c'.*'method'"):
        compare_posteriors({"nuts": {**ref, "c": ref["a"]}, "method": method}, ["a", "c"])
    with pytest.raises(ValueError, match=r"'b'.*\(3,\) in 'method'.*\(2,\).*'nuts'"):
        compare_posteriors({"nuts": ref, "method": {"b": np.zeros((2, 50, 3))}}, "b")
    with pytest.raises(ValueError, match=r"'z'.*'mmps'"):
        compare_posteriors({"nuts": nuts, "mmps": posterior}, "z")
    with pytest.raises(ValueError, match=r"shape \(50,\)"):
        compare_posteriors({"nuts": {"a": np.zeros(50)}}, "a")
    with pytest.raises(TypeError, match="posteriors\\['method'\\].*got list"):
        compare_posteriors({"nuts": ref, "method": [1, 2]}, "a")
    with pytest.raises(ValueError, match="hdi_prob"):
        compare_posteriors({"nuts": ref}, "a", hdi_prob=90)
    broken = np.array(method["a"], dtype=float)
    broken[0, 3] = np.nan
    with pytest.raises(ValueError, match=r"\['method'\]\['a'\] holds 1 NaN or infinite"):
        compare_posteriors({"nuts": ref, "method": {"a": broken}}, "a")
    with pytest.raises(ValueError, match=r"\['method'\]\['a'\] holds no draws"):
        compare_posteriors({"nuts": ref, "method": {"a": np.zeros((1, 0))}}, "a")


def test_ess_uses_explicit_sample_axes_on_arviz_1(monkeypatch):
    # ArviZ 1.x's az.ess takes arrays with chain_axis / draw_axis (whose defaults changed
    # between arviz-stats releases); a stand-in with that signature must see axes 0 and 1.
    real = _import_arviz()
    x = np.random.default_rng(0).normal(size=(3, 40, 2))
    expected = diagnostics._ess_bulk(x)  # ArviZ 0.x path: one (chain, draw) array at a time

    def ess(data, sample_dims=None, method="bulk", chain_axis=0, draw_axis=1):
        assert (chain_axis, draw_axis, method) == (0, 1, "bulk")
        moved = np.moveaxis(data, (chain_axis, draw_axis), (-2, -1))
        return np.array([real.ess(moved[j], method=method) for j in range(moved.shape[0])])

    monkeypatch.setattr(diagnostics, "_import_arviz", lambda: types.SimpleNamespace(ess=ess))
    np.testing.assert_allclose(diagnostics._ess_bulk(x), expected)


# --- plot_comparison --------------------------------------------------------------------------


def test_plot_comparison():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    rng = np.random.default_rng(0)
    ref = {"g": rng.normal(size=(2, 200, 2, 3))}
    other = {"g": rng.normal(0.3, 1.2, size=(1, 300, 2, 3))}
    fig = plot_comparison({"nuts": ref, "diffusion": other}, "g", max_coords=4)
    try:
        assert isinstance(fig, Figure)
        assert len(fig.axes) == 2
        forest = fig.axes[0]
        assert [t.get_text() for t in forest.get_yticklabels()] == \
            ["g[0, 0]", "g[0, 2]", "g[1, 0]", "g[1, 2]"]
        assert "4 of 6" in forest.get_title()
    finally:
        plt.close(fig)

    fig, axes = plt.subplots(1, 2)
    try:
        assert plot_comparison({"nuts": {"g": ref["g"][..., 0, :]}}, "g", ax=axes) is fig
        with pytest.raises(ValueError, match="pair of matplotlib Axes"):
            plot_comparison({"nuts": ref}, "g", ax=axes[0])
        with pytest.raises(ValueError, match="'h'.*'nuts'"):
            plot_comparison({"nuts": ref}, "h")
    finally:
        plt.close(fig)


def test_plot_comparison_of_a_skewed_posterior_draws_each_interval():
    # exp of a wide normal: the mean lies above the central 50 % interval (matplotlib's error
    # bars refuse that); each method's intervals are drawn as they are.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(1)
    ref = {"rr": np.exp(rng.normal(0.0, 2.0, size=(2, 500, 3)))}
    other = {"rr": np.exp(rng.normal(0.2, 2.0, size=(1, 800, 3)))}
    fig = plot_comparison({"nuts": ref, "diffusion": other}, "rr", hdi_prob=0.5)
    try:
        lines = fig.axes[1].collections[0].get_segments()
        lower, upper = np.quantile(other["rr"].reshape(-1, 3), [0.25, 0.75], axis=0)
        np.testing.assert_allclose([seg[0][1] for seg in lines], lower)
        np.testing.assert_allclose([seg[1][1] for seg in lines], upper)
        assert (other["rr"].reshape(-1, 3).mean(0) > upper).any()
    finally:
        plt.close(fig)
