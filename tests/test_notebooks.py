"""The notebooks execute headless in their small mode; a notebook that raises fails the test."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name,figures", [
    ("depth_attention_weights.ipynb", {"depth_weights_mean.png", "depth_weights_per_head.png",
                                       "depth_weights_iterations.png", "depth_weights_entropy.png",
                                       "depth_weights_exit.png"}),
    ("loop_scaling.ipynb", {"loop_scaling.png"}),
])
def test_notebook_runs_in_small_mode(name, figures, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPED_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("LOOPED_OUT_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LOOPED_FIG_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("LOOPED_COMPARE_DIR", str(tmp_path / "compare"))
    monkeypatch.delenv("LOOPED_RUN_DIR", raising=False)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "notebooks are stored without outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    made = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert made == figures
