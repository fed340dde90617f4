"""Helpers shared by the benchmark scripts (run them from the repository root)."""

import math
import zlib

import numpy as np
import torch


def derived_seed(seed, *key):
    """A seed for one measurement that depends only on ``seed`` and ``key``, not on run order."""
    return (seed * 1_000_003 + zlib.crc32(repr(key).encode())) % 2**63


def fmt_pm(values, digits=3):
    """``mean ± sd`` of a list of floats (``nan (k of n)`` if any is not finite)."""
    t = torch.tensor(values, dtype=torch.float64)
    if not torch.isfinite(t).all():
        return f"nan ({int((~torch.isfinite(t)).sum())} of {t.numel()})"
    sd = t.std().item() if t.numel() > 1 else 0.0
    return f"{t.mean().item():.{digits}f} ± {sd:.{digits}f}"


def markdown_table(header, rows):
    """A markdown table; the first three columns left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def gp_scale_mixture(sqdist, lengthscale, lengthscale_log_sd, variance_log_sd, jitter=1e-6,
                     nodes=16, dtype=torch.float64):
    """The exact prior of an RBF GP under LogNormal(log lengthscale, lengthscale_log_sd) and
    LogNormal(0, variance_log_sd) hyperpriors, up to quadrature: a zero-mean
    ``GaussianMixtureDenoiser`` over a ``nodes x nodes`` Gauss-Hermite grid of log lengthscales
    and log variances. ``sqdist``: the ``(d, d)`` squared distances (float64)."""
    from pyro_diffusion import GaussianMixtureDenoiser

    g, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    d = sqdist.shape[0]
    covs, weights = [], []
    for gl, wl in zip(g, w, strict=True):
        ls = math.exp(math.log(lengthscale) + lengthscale_log_sd * gl)
        corr = torch.exp(-0.5 * sqdist / ls ** 2) + jitter * torch.eye(d, dtype=sqdist.dtype)
        for gv, wv in zip(g, w, strict=True):
            covs.append(math.exp(variance_log_sd * gv) * corr)
            weights.append(wl * wv)
    return GaussianMixtureDenoiser(torch.tensor(weights, dtype=dtype),
                                   torch.zeros(len(weights), d, dtype=dtype),
                                   torch.stack(covs).to(dtype))


def binned_mixture(exact, nodes, k, axis):
    """The exact ``nodes x nodes`` mixture (lengthscale-major) with its nodes pooled into ``k``
    runs of adjacent nodes along ``axis`` (0: lengthscale, 1: variance) and all nodes along the
    other: each bin one Gaussian with the bin's weight and weighted average covariance."""
    from pyro_diffusion import GaussianMixtureDenoiser

    d = exact.covs.shape[-1]
    w = exact.weights.reshape(nodes, nodes)
    covs = exact.covs.reshape(nodes, nodes, d, d)
    bins = torch.arange(nodes).tensor_split(k)
    weights, pooled = [], []
    for b in bins:
        wb = w[b] if axis == 0 else w[:, b]
        cb = covs[b] if axis == 0 else covs[:, b]
        weights.append(wb.sum())
        pooled.append(torch.einsum("ij,ijde->de", wb, cb) / wb.sum())
    return GaussianMixtureDenoiser(torch.stack(weights), exact.means.new_zeros(len(bins), d),
                                   torch.stack(pooled))
