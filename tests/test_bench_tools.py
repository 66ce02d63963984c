"""The measurement tools on a tiny trained looped run: `looped bench cache` scores the exact
cache like `looped eval` scores the full forward, and reports the documented bytes; `looped
bench loop` runs its batched-exit section."""

from __future__ import annotations

import csv
import json

import pytest

from test_cli import _train, looped_here as looped


@pytest.mark.slow
def test_bench_cache_and_bench_loop_on_a_trained_run(tmp_path):
    run = _train(tmp_path, "loop=3", "model.n_prelude=1", "model.n_coda=1")
    out = tmp_path / "cache.csv"
    proc = looped("bench", "cache", f"ckpt=[{run}]", "loops=[1,3,5]", "n_samples=16",
                  "batch_size=8", f"out={out}", "threads=1")
    assert proc.returncode == 0, proc.stderr
    rows = {(int(r["loops"]), r["kv"]): r for r in csv.DictReader(open(out))}
    assert set(rows) == {(r, kv) for r in (1, 3, 5) for kv in ("per_iteration", "last")}
    # bytes: (prelude + core x R + coda) layers' worth against (prelude + core + coda)
    unit = int(rows[(1, "last")]["cache_bytes"]) // 3
    for r in (1, 3, 5):
        assert int(rows[(r, "per_iteration")]["cache_bytes"]) == (2 + r) * unit
        assert int(rows[(r, "last")]["cache_bytes"]) == 3 * unit
    assert "| 5 | last | " in proc.stdout
    # the exact cache scores what the full forward scores (same held-out draw)
    ev = looped("eval", f"ckpt={run}", "loops=[1,3,5]", "n_samples=16", "batch_size=8",
                f"out={tmp_path / 'eval'}", "threads=1")
    assert ev.returncode == 0, ev.stderr
    full = json.loads((tmp_path / "eval" / "loop_sweep.json").read_text())["run"]["results"]
    for r in (1, 3, 5):
        assert abs(float(rows[(r, "per_iteration")]["value"]) - full[str(r)]["accuracy"]) < 1e-9
    # `looped eval kv=last` scores what bench cache reports for last
    ev = looped("eval", f"ckpt={run}", "loops=[5]", "n_samples=16", "batch_size=8", "kv=last",
                f"out={tmp_path / 'eval_last'}", "threads=1")
    assert ev.returncode == 0, ev.stderr
    last = json.loads((tmp_path / "eval_last" / "loop_sweep.json").read_text())["run"]["results"]
    assert abs(float(rows[(5, "last")]["value"]) - last["5"]["accuracy"]) < 1e-9
    assert float(rows[(1, "last")]["value"]) == float(rows[(1, "per_iteration")]["value"])

    bench = looped("bench", "loop", f"ckpt={run}", "sequences=4", "batches=[1,3]",
                   "batched_sequences=6", "new_tokens=4", "tolerance=1.0", "threads=1")
    assert bench.returncode == 0, bench.stderr
    assert "== batched exit: kl" in bench.stdout
    lines = bench.stdout.split("== batched exit")[1].splitlines()
    assert [ln.split()[0] for ln in lines[2:4]] == ["1", "3"]
