import sys
import types

import numpy as np
import pytest
import torch

from pyro_diffusion import inference_data
from pyro_diffusion.inference_data import arviz_major_version, split_chains, to_inference_data

NUM_CHAINS, NUM_DRAWS = 4, 500


@pytest.fixture
def az():
    return inference_data._import_arviz()


def _iid_chains(seed=0, shift=None):
    """Posterior with scalar ``a`` (mean 1) and ``b`` of shape (3,) (means 0, 1, 2)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(1.0, 1.0, size=(NUM_CHAINS, NUM_DRAWS))
    b = rng.normal(size=(NUM_CHAINS, NUM_DRAWS, 3)) + np.array([0.0, 1.0, 2.0])
    if shift is not None:  # per-chain offsets: chains no longer agree
        a = a + np.asarray(shift)[:, None]
        b = b + np.asarray(shift)[:, None, None]
    return {"a": a, "b": b}


# --- real ArviZ (whatever is installed) --------------------------------------------------------


def test_major_version_matches_installed(az):
    assert arviz_major_version() == int(az.__version__.split(".")[0])


def test_summary_means(az):
    post = _iid_chains()
    idata = to_inference_data(post, dims={"b": ["coord"]}, coords={"coord": ["x", "y", "z"]})
    summary = az.summary(idata)
    assert summary.loc["a", "mean"] == pytest.approx(post["a"].mean(), abs=0.01)
    assert summary.loc["a", "mean"] == pytest.approx(1.0, abs=0.1)
    for label, expected in zip(["b[x]", "b[y]", "b[z]"], [0.0, 1.0, 2.0], strict=True):
        assert summary.loc[label, "mean"] == pytest.approx(expected, abs=0.1)


def test_ess_and_rhat_iid_chains(az):
    idata = to_inference_data(_iid_chains())
    rhat, ess = az.rhat(idata), az.ess(idata)
    for var in ("a", "b"):
        assert np.all(np.abs(rhat[var].values - 1.0) < 0.02)
        assert np.all(ess[var].values > 0.5 * NUM_CHAINS * NUM_DRAWS)


def test_rhat_flags_chains_with_shifted_means(az):
    idata = to_inference_data(_iid_chains(shift=[0.0, 0.0, 3.0, 3.0]))
    rhat = az.rhat(idata)
    assert float(rhat["a"]) > 1.1
    assert np.all(rhat["b"].values > 1.1)


def test_dims_coords_observed_and_sample_stats(az):
    rng = np.random.default_rng(1)
    y = rng.normal(size=(6, 2))
    lp = rng.normal(size=(NUM_CHAINS, NUM_DRAWS))
    idata = to_inference_data(
        _iid_chains(),
        observed_data={"y": y},
        sample_stats={"lp": lp, "diverging": np.zeros((NUM_CHAINS, NUM_DRAWS), dtype=bool)},
        dims={"b": ["coord"], "y": ["obs", "xy"]},
        coords={"coord": ["x", "y", "z"], "obs": np.arange(10, 16)},
    )
    b = idata.posterior["b"]
    assert b.dims == ("chain", "draw", "coord")
    assert list(b.coords["coord"].values) == ["x", "y", "z"]
    assert idata.posterior["a"].dims == ("chain", "draw")
    obs = idata.observed_data["y"]
    assert obs.dims == ("obs", "xy")  # no chain/draw dims on observed data
    assert list(obs.coords["obs"].values) == list(range(10, 16))
    np.testing.assert_array_equal(obs.values, y)
    np.testing.assert_array_equal(idata.sample_stats["lp"].values, lp)
    assert idata.sample_stats["diverging"].dtype == bool


def test_torch_inputs(az):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_CHAINS, NUM_DRAWS, 2, generator=gen, requires_grad=True)
    half = torch.randn(NUM_CHAINS, NUM_DRAWS, generator=gen).to(torch.bfloat16)
    y = torch.randn(7, generator=gen)
    idata = to_inference_data(
        {"x": x * 2, "h": half},
        observed_data={"y": y},
        coords={"k": torch.arange(2)},
        dims={"x": ["k"]},
    )
    np.testing.assert_allclose(idata.posterior["x"].values, (x * 2).detach().numpy())
    assert idata.posterior["x"].dtype == np.float32
    assert idata.posterior["h"].dtype == np.float32  # bfloat16 upcast, numpy has none
    np.testing.assert_array_equal(idata.posterior["x"].coords["k"].values, [0, 1])
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    assert az.summary(idata, var_names=["x"]).shape[0] == 2


def test_split_chains_round_trip(az):
    flat = torch.arange(24.0).reshape(12, 2)
    grouped = split_chains({"x": flat, "s": np.arange(12)}, 3)
    assert isinstance(grouped["x"], torch.Tensor) and grouped["x"].shape == (3, 4, 2)
    assert isinstance(grouped["s"], np.ndarray) and grouped["s"].shape == (3, 4)
    # chains are contiguous blocks: chain c, draw d is flat sample c * 4 + d
    assert torch.equal(grouped["x"][1, 2], flat[6])
    np.testing.assert_array_equal(grouped["s"][2], [8, 9, 10, 11])
    idata = to_inference_data(grouped)
    assert idata.posterior["x"].shape == (3, 4, 2)


# --- validation --------------------------------------------------------------------------------


def test_split_chains_errors():
    with pytest.raises(ValueError, match="not divisible by num_chains=4"):
        split_chains({"x": torch.zeros(10, 3)}, 4)
    with pytest.raises(ValueError, match="positive integer"):
        split_chains({"x": torch.zeros(10)}, 0)
    with pytest.raises(ValueError, match="positive integer"):
        split_chains({"x": torch.zeros(10)}, 2.0)
    with pytest.raises(ValueError, match="earlier values have 10"):
        split_chains({"x": torch.zeros(10), "y": torch.zeros(12)}, 2)
    with pytest.raises(ValueError, match="scalar"):
        split_chains({"x": torch.tensor(1.0)}, 1)
    assert split_chains({"x": [1, 2, 3, 4]}, 1)["x"].shape == (1, 4)


def test_to_inference_data_errors(az):
    with pytest.raises(ValueError, match="split_chains"):
        to_inference_data({"x": np.zeros(10)})
    with pytest.raises(ValueError, match="empty"):
        to_inference_data({})
    with pytest.raises(ValueError, match=r"\(num_chains, num_draws\)"):
        to_inference_data({"x": np.zeros((2, 5)), "y": np.zeros((2, 6))})
    with pytest.raises(ValueError, match="sample_stats"):
        to_inference_data({"x": np.zeros((2, 5))}, sample_stats={"lp": np.zeros((3, 5))})
    with pytest.raises(TypeError, match="dict"):
        to_inference_data(np.zeros((2, 5)))


def test_missing_arviz_raises_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)  # makes `import arviz` fail
    with pytest.raises(ImportError, match="pip install arviz"):
        to_inference_data({"x": np.zeros((2, 5))})
    with pytest.raises(ImportError, match="needs ArviZ"):
        arviz_major_version()


# --- both from_dict APIs, through fake ArviZ modules -------------------------------------------


def _fake_arviz(monkeypatch, version, from_dict):
    module = types.ModuleType("arviz")
    module.__version__ = version
    module.from_dict = from_dict
    monkeypatch.setitem(sys.modules, "arviz", module)
    return module


class _Recorder:
    def __init__(self):
        self.calls = []
        self.result = object()


def _fake_from_dict_v1(recorder):
    # the signature of arviz_base.from_dict, re-exported as arviz.from_dict in ArviZ 1.x
    def from_dict(
        data,
        *,
        name=None,
        sample_dims=None,
        save_warmup=None,
        index_origin=None,
        coords=None,
        dims=None,
        pred_dims=None,
        pred_coords=None,
        check_conventions=True,
        attrs=None,
    ):
        recorder.calls.append(
            ((data,), {"sample_dims": sample_dims, "coords": coords, "dims": dims, "name": name})
        )
        return recorder.result

    return from_dict


def _fake_from_dict_v0(recorder):
    # the (abridged) signature of arviz.from_dict in ArviZ 0.x
    def from_dict(
        posterior=None,
        *,
        posterior_predictive=None,
        sample_stats=None,
        observed_data=None,
        coords=None,
        dims=None,
        **kwargs,
    ):
        recorder.calls.append(
            (
                (),
                {
                    "posterior": posterior,
                    "sample_stats": sample_stats,
                    "observed_data": observed_data,
                    "coords": coords,
                    "dims": dims,
                    **kwargs,
                },
            )
        )
        return recorder.result

    return from_dict


def test_v1_branch_passes_group_dict(monkeypatch):
    rec = _Recorder()
    _fake_arviz(monkeypatch, "1.0.0", _fake_from_dict_v1(rec))
    assert arviz_major_version() == 1
    x = torch.randn(2, 5, 3, requires_grad=True)
    y = torch.arange(4.0)
    lp = np.ones((2, 5))
    out = to_inference_data(
        {"x": x},
        observed_data={"y": y},
        sample_stats={"lp": lp},
        dims={"x": ("k",)},
        coords={"k": torch.arange(3)},
    )
    assert out is rec.result
    assert len(rec.calls) == 1
    (data,), kwargs = rec.calls[0]
    assert set(data) == {"posterior", "observed_data", "sample_stats"}
    assert isinstance(data["posterior"]["x"], np.ndarray)
    np.testing.assert_array_equal(data["posterior"]["x"], x.detach().numpy())
    np.testing.assert_array_equal(data["observed_data"]["y"], y.numpy())
    np.testing.assert_array_equal(data["sample_stats"]["lp"], lp)
    assert kwargs["sample_dims"] == ["chain", "draw"]
    assert kwargs["dims"] == {"x": ["k"]}
    np.testing.assert_array_equal(kwargs["coords"]["k"], [0, 1, 2])
    assert isinstance(kwargs["coords"]["k"], np.ndarray)


def test_v1_branch_omits_absent_groups(monkeypatch):
    rec = _Recorder()
    _fake_arviz(monkeypatch, "1.2.3", _fake_from_dict_v1(rec))
    to_inference_data({"x": np.zeros((1, 3))}, observed_data={}, sample_stats=None)
    (data,), kwargs = rec.calls[0]
    assert list(data) == ["posterior"]
    assert kwargs["dims"] is None and kwargs["coords"] is None


def test_v0_branch_passes_group_keywords(monkeypatch):
    rec = _Recorder()
    _fake_arviz(monkeypatch, "0.20.0", _fake_from_dict_v0(rec))
    assert arviz_major_version() == 0
    to_inference_data({"x": torch.zeros(2, 5)}, observed_data={"y": [1.0, 2.0]})
    args, kwargs = rec.calls[0]
    assert args == ()
    assert set(kwargs["posterior"]) == {"x"}
    assert isinstance(kwargs["posterior"]["x"], np.ndarray)
    np.testing.assert_array_equal(kwargs["observed_data"]["y"], [1.0, 2.0])
    assert kwargs["sample_stats"] is None
    assert "sample_dims" not in kwargs


def test_signature_overrides_unhelpful_version(monkeypatch):
    # 1.x-style signature behind a version string that does not parse: group dict API
    rec = _Recorder()
    _fake_arviz(monkeypatch, "dev", _fake_from_dict_v1(rec))
    assert arviz_major_version() == 1
    to_inference_data({"x": np.zeros((1, 3))})
    assert rec.calls[0][0][0].keys() == {"posterior"}
    # a 0.x-style signature wins over a 1.x version number
    rec = _Recorder()
    _fake_arviz(monkeypatch, "1.0.0", _fake_from_dict_v0(rec))
    to_inference_data({"x": np.zeros((1, 3))})
    assert rec.calls[0][0] == () and "x" in rec.calls[0][1]["posterior"]


def test_version_decides_when_signature_is_inconclusive(monkeypatch):
    calls = []

    def opaque(*args, **kwargs):
        calls.append((args, kwargs))

    _fake_arviz(monkeypatch, "1.1.0", opaque)
    to_inference_data({"x": np.zeros((1, 3))})
    _fake_arviz(monkeypatch, "0.23.4", opaque)
    to_inference_data({"x": np.zeros((1, 3))})
    (v1_args, v1_kwargs), (v0_args, v0_kwargs) = calls
    assert set(v1_args[0]) == {"posterior"} and "sample_dims" not in v1_kwargs
    assert v0_args == () and "posterior" in v0_kwargs
