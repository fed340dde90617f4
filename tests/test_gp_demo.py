import json
import os
import subprocess
import sys

import pytest
import torch

from pyro_diffusion import DiffusionPrior, GaussianDenoiser
from pyro_diffusion import __main__ as cli
from pyro_diffusion import gp_demo as demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _restore_threads():
    # The runs below pass --threads 1 (a small MLP trains faster on one thread, and much faster
    # on a machine with contended cores); put torch's setting back for the other tests.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _tiny(output, *extra):
    return ["--train-steps", "200", "--num-train", "2000", "--num-samples", "64",
            "--sampling-steps", "8", "--output", str(output), "--no-progress", "--threads", "1",
            *extra]


def test_demo_trains_then_loads(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    first = demo.main(_tiny(out))
    text = capsys.readouterr().out

    assert first["trained"] and first["train_steps"] == 200
    checkpoint, figure = out / "gp_prior.pt", out / "gp_prior.png"
    assert first["checkpoint"] == str(checkpoint.resolve())
    assert first["figure"] == str(figure.resolve())
    assert os.path.isabs(first["checkpoint"]) and os.path.isabs(first["figure"])
    with open(figure, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert figure.stat().st_size > 10_000
    prior = DiffusionPrior.load(checkpoint)
    assert tuple(prior.event_shape) == (demo.GRID_SIZE,)
    meta = json.loads((out / "gp_prior.json").read_text())
    assert meta["train_steps"] == 200 and meta["train_seconds"] > 0

    for key in ("val_loss", "cov_rel_error", "cov_rel_error_floor", "sliced_wasserstein",
                "sliced_wasserstein_floor"):
        assert first[key] > 0 and torch.isfinite(torch.tensor(first[key]))
    # the noise floors come from fresh GP draws and do not depend on the model
    assert first["cov_rel_error_floor"] < 0.5
    for path in (first["checkpoint"], first["figure"]):
        assert path in text
    assert "sliced Wasserstein" in text and "noise floor" in text and "trained now" in text

    # A second run must load the checkpoint: training would fail here.
    def no_training(*args, **kwargs):
        raise AssertionError("the demo retrained although a checkpoint exists")

    monkeypatch.setattr(demo.DiffusionPrior, "fit", no_training)
    mtime = checkpoint.stat().st_mtime_ns
    figure.unlink()
    second = demo.main(_tiny(out))
    text = capsys.readouterr().out
    assert not second["trained"]
    assert "loading the prior" in text and "loaded" in text
    assert checkpoint.stat().st_mtime_ns == mtime
    assert figure.exists()
    # the training figures come from the first run's record
    assert second["train_steps"] == 200
    assert second["val_loss"] == pytest.approx(first["val_loss"])
    # same seed, same checkpoint: the same samples, hence the same scores
    assert second["sliced_wasserstein"] == pytest.approx(first["sliced_wasserstein"], rel=1e-5)

    # sampling settings the prior rejects are reported as a usage error
    with pytest.raises(SystemExit) as info:
        demo.main(_tiny(out, "--sigma-max", "1e-6"))
    assert info.value.code == 2
    assert "sampling settings" in capsys.readouterr().err

    # --retrain trains again even though the checkpoint exists.
    class Retrained(Exception):
        pass

    def record(*args, **kwargs):
        raise Retrained

    monkeypatch.setattr(demo.DiffusionPrior, "fit", record)
    with pytest.raises(Retrained):
        demo.main(_tiny(out, "--retrain"))


def test_incompatible_checkpoint_is_reported(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    other = DiffusionPrior(GaussianDenoiser(torch.zeros(3), torch.eye(3)), (3,))
    other.save(out / "gp_prior.pt")
    with pytest.raises(SystemExit) as info:
        demo.main(_tiny(out))
    assert info.value.code == 2
    assert "--retrain" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--train-steps", "0"], ["--num-samples", "1"],
                                  ["--sampling-steps", "x"], ["--device", "nonsense"],
                                  ["--sampler", "euler"], ["--sigma-max", "-1"],
                                  ["--bogus"]])
def test_bad_options_exit_with_usage(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(argv + ["--output", str(tmp_path)])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_reported(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--device", "cuda", "--output", str(tmp_path)])
    assert "CUDA is not available" in capsys.readouterr().err


def test_cli_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["gp-demo", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--device", "--train-steps", "--num-samples", "--sampling-steps",
                   "--output", "--seed", "--retrain", "--no-progress", "--threads", "--sampler",
                   "--sigma-max"):
        assert option in text
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "pyro_diffusion", "gp-demo", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "python -m pyro_diffusion gp-demo" in result.stdout
    assert "--sampling-steps" in result.stdout
