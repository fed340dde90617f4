"""The EDM noise grid on which every reverse process runs.

Reference: Karras, Aittala, Aila, Laine (2022), *Elucidating the Design Space of
Diffusion-Based Generative Models*, eq. (5).
"""

import math

import torch

from ._checks import check_positive_int


def check_num_steps(num_steps):
    """``num_steps`` as an int, or ``None`` (the prior's); a clear error for anything else."""
    if num_steps is None:
        return None
    try:
        return check_positive_int(num_steps, "num_steps")
    except ValueError:
        raise ValueError(f"num_steps must be None or an integer >= 1, got {num_steps!r}") from None


def noise_grid(num_steps, sigma_min, sigma_max, rho=7.0, *, dtype=None, device=None):
    r"""Decreasing noise levels :math:`\sigma_0 > \dots > \sigma_{N-1}` followed by :math:`0`.

    .. math::

        \sigma_i = \left(\sigma_{\max}^{1/\rho} + \tfrac{i}{N-1}
        \left(\sigma_{\min}^{1/\rho} - \sigma_{\max}^{1/\rho}\right)\right)^{\rho},
        \qquad \sigma_N = 0.

    :param int num_steps: number :math:`N` of reverse steps (denoiser calls of an ancestral
        sampler); at least 1.
    :param float sigma_min: smallest positive noise level.
    :param float sigma_max: largest noise level, where sampling starts.
    :param float rho: grid curvature; larger values spend more steps at low noise.
    :returns: a tensor of shape ``(num_steps + 1,)`` ending with ``0``.
    """
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max)) or not (
        0.0 < sigma_min < sigma_max
    ):
        raise ValueError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    dtype = dtype or torch.get_default_dtype()
    if num_steps == 1:
        levels = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        i = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
        hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
        levels = (hi + i * (lo - hi)) ** rho
    grid = torch.cat([levels, levels.new_zeros(1)])
    return grid.to(dtype=dtype, device=device)
