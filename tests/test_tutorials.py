"""Every tutorial notebook runs top to bottom in smoke mode (small steps and samples)."""

import os
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parent.parent / "tutorials").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PYRO_DIFFUSION_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()


def test_every_tutorial_has_a_smoke_switch_and_recorded_outputs():
    nbformat = pytest.importorskip("nbformat")
    for path in TUTORIALS:
        nb = nbformat.read(path, as_version=4)
        source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "PYRO_DIFFUSION_SMOKE" in source, path.name
        outputs = [c for c in nb.cells if c.cell_type == "code" and c.get("outputs")]
        assert outputs, f"{path.name} is committed without outputs"
