"""NUTS on a hand-made mixture prior: does ``DiffusionLangevin`` sample its own target?

``bench/vs_nuts.py --binned-prior K`` scores ``DiffusionLangevin`` with a hand-made mixture prior
(the ``hyper`` form's exact scale mixture, 16 x 16 Gauss-Hermite nodes, pooled into ``K`` bins
along one hyperparameter; ``_common.binned_mixture``) against the ``hyper`` model's reference.
A miss there mixes two errors: the hand-made prior's posterior is not the ``hyper`` one, and
the sampler may not reach the hand-made prior's posterior. This script separates them: NumPyro
NUTS (dense mass, 2 sequential chains, one XLA thread) on the same data with the mixture prior's
exact log density, then ``DiffusionLangevin`` (defaults, the Gaussian preconditioner as in
``vs_nuts.py``) on that prior, each scored against the other and against the cached ``hyper``
reference (run ``bench/vs_nuts.py --dims 256 --forms hyper --ref-backend numpyro ...`` first).

Usage::

    python bench/binned_prior_nuts.py --likelihood poisson --seed 0 --bins 16 --axis lengthscale
"""

import argparse
import os
import shlex
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                           " intra_op_parallelism_threads=1").strip()

import numpy as np
import torch
import vs_nuts
from _common import binned_mixture, derived_seed

from pyro_diffusion import DiffusionLangevin, DiffusionPrior
from pyro_diffusion.diagnostics import compare_posteriors


def nuts_draws(mixture, lik, y, warmup, draws, seed):
    """NumPyro NUTS draws ``(n, d)`` of f under the mixture prior and the model's likelihood."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd
    from numpyro.infer import MCMC, NUTS, init_to_value

    jax.config.update("jax_enable_x64", True)
    chol = jnp.asarray(torch.linalg.cholesky(mixture.covs.double()).numpy())
    log_w = jnp.asarray(mixture.log_weights.double().numpy())
    d = chol.shape[-1]
    yy = jnp.asarray(y.numpy())

    def model():
        f = numpyro.sample("f", nd.ImproperUniform(nd.constraints.real_vector, (), (d,)))
        sol = jax.scipy.linalg.solve_triangular(
            chol, jnp.broadcast_to(f, (chol.shape[0], d))[..., None], lower=True)[..., 0]
        logdet = jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)).sum(-1)
        numpyro.factor("prior", jax.scipy.special.logsumexp(
            log_w - 0.5 * (sol ** 2).sum(-1) - logdet))
        if lik == "poisson":
            numpyro.sample("y", nd.Poisson(vs_nuts.EXPOSURE * jnp.exp(f)), obs=yy)
        else:
            numpyro.sample("y", nd.Binomial(vs_nuts.TRIALS, logits=f), obs=yy)

    start = np.log(np.clip(np.asarray(y), 0.5, None) / vs_nuts.EXPOSURE) if lik == "poisson" \
        else np.zeros(d)
    mcmc = MCMC(NUTS(model, dense_mass=True, init_strategy=init_to_value(
                values={"f": jnp.asarray(start)})),
                num_warmup=warmup, num_samples=draws, num_chains=2, chain_method="sequential",
                progress_bar=False)
    tic = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed))
    f = np.asarray(mcmc.get_samples(group_by_chain=True)["f"])
    from numpyro.diagnostics import summary

    s = summary({"f": f})["f"]
    note = (f"NUTS on the mixture prior: {time.perf_counter() - tic:.0f} s, min ESS "
            f"{s['n_eff'].min():.0f}, max R-hat {s['r_hat'].max():.3f}, divergences "
            f"{int(np.asarray(mcmc.get_extra_fields()['diverging']).sum())}")
    return f.reshape(-1, d), note


def against(draws, reference):
    """Mean abs smd and mean sd ratio of ``draws`` against ``reference`` (each ``(n, d)``),
    from :func:`pyro_diffusion.compare_posteriors` (as ``vs_nuts.py`` scores)."""
    table = compare_posteriors({"draws": {"f": draws[None]}, "reference": {"f": reference[None]}},
                               "f", reference="reference")
    row = table[(table["method"] == "draws") & (table["coord"] == "all")].iloc[0]
    return row["abs_smd"], row["sd_ratio"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--likelihood", choices=["poisson", "binomial"], default="poisson")
    parser.add_argument("--seed", type=int, default=0, help="the data set (vs_nuts.py --seed)")
    parser.add_argument("--bins", type=int, default=16)
    parser.add_argument("--axis", choices=["lengthscale", "variance"], default="lengthscale")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--cache", default="/tmp/pyro_diffusion_bench_cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the results here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    d = 256
    _, points = vs_nuts.grid("1d", d)
    sqdist = vs_nuts.squared_distances(points)
    full = vs_nuts.scale_mixture(sqdist)
    axis = ["lengthscale", "variance"].index(args.axis)
    mixture = binned_mixture(full, vs_nuts.NODES, args.bins, axis)
    _, y, _ = vs_nuts.simulate(points, "hyper", args.likelihood, args.seed)
    path = os.path.join(args.cache, f"ref_{d}_hyper_{args.likelihood}_seed{args.seed}_"
                                    "2x500+1000_numpyro.pt")
    saved = torch.load(path, weights_only=True)
    if not torch.equal(saved["y"], y):
        raise SystemExit(f"{path} holds other data")
    ref = saved["f"].reshape(-1, d).numpy()
    nuts, nuts_note = nuts_draws(mixture, args.likelihood, y, args.warmup, args.draws, args.seed)
    run = DiffusionLangevin(vs_nuts.diffusion_model, num_samples=2000, batch_size=500,
                            preconditioner="gaussian", progress=False,
                            seed=derived_seed(args.seed, "langevin", "256", "hyper",
                                              args.likelihood, 20))
    run.run(DiffusionPrior(mixture.float(), (d,)), args.likelihood, y.float())
    langevin = run.get_samples()["f"].double().numpy().reshape(-1, d)
    lines = [f"- command: `python {shlex.join(sys.argv)}`",
             f"- torch {torch.__version__}, threads {torch.get_num_threads()}", "",
             f"- {nuts_note}", "",
             f"{args.likelihood} counts, data seed {args.seed}, {args.axis} in {args.bins} bins "
             "(mean abs smd / mean sd ratio, against the second; "
             "`pyro_diffusion.compare_posteriors`):", "",
             "| draws | against | abs smd | sd ratio |", "|---|---|---:|---:|"]
    for name, a, label, b in [("Langevin", langevin, "NUTS, same prior", nuts),
                              ("Langevin", langevin, "hyper reference", ref),
                              ("NUTS, mixture prior", nuts, "hyper reference", ref)]:
        smd, ratio = against(a, b)
        lines.append(f"| {name} | {label} | {smd:.3f} | {ratio:.3f} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
