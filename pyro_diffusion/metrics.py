"""Distances between sample sets, used to score samplers against exact answers."""

import torch


def _quantiles(x, num):
    """Empirical quantile function of each column of ``x`` at ``num`` mid-points."""
    x = x.sort(dim=0).values
    n = x.shape[0]
    if n == num:
        return x
    pos = (torch.arange(num, dtype=x.dtype, device=x.device) + 0.5) * n / num - 0.5
    pos = pos.clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo).unsqueeze(-1)
    return x[lo] * (1 - w) + x[hi] * w


def sliced_wasserstein(x, y, num_projections=256, p=2, seed=0):
    r"""Sliced :math:`W_p` distance between two sample sets.

    Averages the one-dimensional :math:`W_p^p` distance of the sets projected on
    ``num_projections`` random unit directions (drawn from a private generator with ``seed``,
    so repeated calls are comparable), then takes the ``p``-th root.

    :param torch.Tensor x: samples ``(n, *event_shape)``.
    :param torch.Tensor y: samples ``(m, *event_shape)``; ``m`` may differ from ``n``.
    :returns: a float.

    Reference: Bonneel, Rabin, Peyré, Pfister (2015), *Sliced and Radon Wasserstein Barycenters
    of Measures*.
    """
    x = torch.as_tensor(x).flatten(1).double()
    y = torch.as_tensor(y).flatten(1).double().to(x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sample sets differ in size: {x.shape[1]} vs {y.shape[1]} coordinates")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dirs = torch.randn(x.shape[1], num_projections, generator=gen, dtype=torch.float64)
    dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(x.device)
    num = max(x.shape[0], y.shape[0])
    qx, qy = _quantiles(x @ dirs, num), _quantiles(y @ dirs, num)
    return (qx - qy).abs().pow(p).mean().pow(1.0 / p).item()
