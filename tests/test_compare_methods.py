"""`python -m looped.compare_methods` runs each method through train.py at the same seed and
budget, evaluates them, and writes its table."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLI_TINY_MODEL

from looped.compare_methods import variants

ROOT = Path(__file__).resolve().parent.parent


def test_variants_cover_every_method_and_switch_depth_attention_off_for_baselines():
    v = variants()
    assert {"vanilla", "depth_attention", "denseformer", "value_residual", "attn_res",
            "attn_res_block", "mhc", "hyper_connections"} == set(v)
    assert v["depth_attention"] == []
    for name, overrides in v.items():
        if name != "depth_attention":
            assert "model.depth_attention.enabled=false" in overrides


@pytest.mark.slow
def test_runs_and_writes_its_table(tmp_path):
    extra = ",".join(o for o in CLI_TINY_MODEL if not o.startswith(("loop=", "threads=")))
    proc = subprocess.run(
        [sys.executable, "-m", "looped.compare_methods", "steps=2", "seeds=[0]",
         f"out={tmp_path}", "n_samples=16", "threads=1", "methods=[vanilla,mhc]",
         f"extra=[{extra},train.batch_size=8]"], cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "methods.csv")))
    assert [r["method"] for r in rows] == ["vanilla", "mhc"]
    assert all(0.0 <= float(r["acc_R8"]) <= 1.0 and float(r["loss_R8"]) > 0 for r in rows)
    assert "| mhc |" in (tmp_path / "methods.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "looped.compare_methods", "methods=[mhcc]"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown method(s) mhcc" in bad.stderr
