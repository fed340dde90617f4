"""Covariance estimates that stay well conditioned with few samples."""

import torch


def shrunk_covariance(z):
    r"""Ledoit-Wolf estimate of the covariance of centred rows ``z`` ``(n, d)``, float64.

    Shrinks the sample covariance :math:`S` towards :math:`\mu I`, :math:`\mu = {\rm tr}\,S/d`,
    with the weight that minimises the expected squared Frobenius error.
    """
    z = z.reshape(z.shape[0], -1).to(torch.float64)
    n, d = z.shape
    s = z.T @ z / n
    mu = s.trace() / d
    delta2 = (s - mu * torch.eye(d, dtype=s.dtype, device=s.device)).square().sum()
    # sum_i ||z_i z_i^T - S||_F^2 = sum_i ||z_i||^4 - n ||S||_F^2
    beta2 = ((z.square().sum(1).square().sum() - n * s.square().sum()) / n ** 2).clamp(min=0.0)
    weight = (beta2 / delta2).clamp(max=1.0) if delta2 > 0 else torch.ones((), dtype=s.dtype)
    return (1 - weight) * s + weight * mu * torch.eye(d, dtype=s.dtype, device=s.device)


def shrunk_eigh(z):
    r"""Eigenvalues and eigenvectors of :func:`shrunk_covariance` of centred rows ``z``,
    float64, the eigenvalues floored at ``1e-10`` times the largest (no direction is exactly
    noise-free, which keeps :math:`\lambda / (\lambda + \sigma^2)` defined at
    :math:`\sigma = 0`)."""
    evals, evecs = torch.linalg.eigh(shrunk_covariance(z))
    return evals.clamp(min=1e-10 * float(evals.max().clamp(min=1e-30))), evecs
