import pytest
import torch

from pyro_diffusion import noise_grid


@pytest.mark.parametrize("num_steps", [1, 2, 10, 257])
def test_grid_endpoints_and_order(num_steps):
    grid = noise_grid(num_steps, 0.002, 80.0, dtype=torch.float64)
    assert grid.shape == (num_steps + 1,)
    assert grid[0].item() == pytest.approx(80.0)
    assert grid[-1].item() == 0.0
    if num_steps > 1:
        assert grid[-2].item() == pytest.approx(0.002)
    assert (grid[1:] < grid[:-1]).all()


def test_grid_matches_karras_formula():
    rho, lo, hi, n = 7.0, 0.01, 10.0, 5
    grid = noise_grid(n, lo, hi, rho, dtype=torch.float64)
    for i in range(n):
        expected = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        assert grid[i].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("args", [(0, 0.1, 1.0), (5, 0.0, 1.0), (5, 2.0, 1.0),
                                  (5, 0.1, float("nan"))])
def test_grid_rejects_bad_input(args):
    with pytest.raises(ValueError):
        noise_grid(*args)
