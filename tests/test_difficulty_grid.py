"""`looped eval knob=... levels=[...]`: the R x difficulty grid equals scoring each cell by hand
(task_accuracy on the task built at that level), and its summary's best R and overthinking drop
follow the grid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from looped import build_model
from looped.config import load_run_config
from looped.training.checkpoint import load_weights, resolve_checkpoint
from looped.data import build_task
from looped.errors import ConfigError
from looped.training.scoring import task_accuracy
from looped.tools.difficulty_grid import GridRun, summarise
from looped.tools.evaluate import main as evaluate_main
from looped.tools.train import main as train_main

from conftest import cli_in_process

ROOT = Path(__file__).resolve().parent.parent
RUN = ["task=prefix_sums", "task.length=6", "model.vocab_size=4", "model.d_model=16",
       "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=8",
       "model.ffn_dim=32", "model.max_seq_len=13", "loop=3", "train.steps=3",
       "train.eval_every=3", "eval.loops=[3]", "eval.n_samples=8", "threads=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grid")
    proc = cli_in_process(train_main, [*RUN, f"out_dir={out}", "name=ps"])
    assert proc.returncode == 0, proc.stderr
    return out / "ps"


def test_grid_cells_equal_scoring_each_level_by_hand(run, tmp_path, single_thread):
    out = tmp_path / "grid"
    assert evaluate_main([f"ckpt={run}", "loops=[1,4]", "knob=length", "levels=[6,12]",
                          "n_samples=32", "batch_size=16", f"out={out}"]) == 0
    rows = list(csv.DictReader(open(out / "difficulty_grid.csv")))
    assert [(int(r["level"]), int(r["loops"])) for r in rows] == [(6, 1), (6, 4), (12, 1), (12, 4)]
    assert {r["trained_level"] for r in rows} == {"6"} and {r["knob"] for r in rows} == {"length"}
    cfg = load_run_config(run)
    model = build_model(cfg)
    load_weights(model, resolve_checkpoint(run))
    for r in rows:
        level_cfg = load_run_config(run, [f"task.eval.length={r['level']}"])
        task = build_task(level_cfg.task, split="eval")
        assert task.seq_len == int(r["level"]) + 1  # the BOS token
        want = task_accuracy(model, task, int(r["loops"]), 32, 16, cfg.seed)
        for key in ("accuracy", "solved", "loss"):
            assert float(r[key]) == pytest.approx(want[key], abs=1e-6)
    grid = json.loads((out / "difficulty_grid.json").read_text())["ps"]
    assert grid["trained_loop"] == 3 and set(grid["cells"]) == {"6", "12"}
    assert "| 12 |" in (out / "difficulty_grid.md").read_text()
    for name in ("ps_vs_loops.png", "ps_heatmap.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_summary_picks_the_best_r_and_measures_the_drop_after_it():
    cells = {16: {8: {"accuracy": 0.5}, 16: {"accuracy": 0.9}, 32: {"accuracy": 0.9},
                  64: {"accuracy": 0.7}},
             64: {8: {"accuracy": 0.1}, 16: {"accuracy": 0.2}, 32: {"accuracy": 0.6},
                  64: {"accuracy": 0.95}}}
    first, second = summarise(GridRun("r", 16, 16, cells))
    assert (first.best_loops, first.best, first.at_trained) == (16, 0.9, 0.9)  # ties: fewer R
    assert first.overthinking_drop == pytest.approx(0.2) and first.largest_loops == 64
    assert (second.best_loops, second.overthinking_drop) == (64, 0.0)


@pytest.mark.parametrize("args,fragment", [
    (["knob=length"], "give knob=<task knob> and levels=[...] together"),
    (["levels=[8]"], "give knob=<task knob> and levels=[...] together"),
    (["knob=hops", "levels=[8]"], "task 'prefix_sums' of ps has no such knob; its knobs: length"),
    (["knob=length", "levels=[64]"], "needs sequences of 65 tokens"),
    (["knob=length", "levels=[0]"], "length must be >= 1"),
])
def test_grid_bad_input_is_one_line(run, args, fragment):
    with pytest.raises(ConfigError) as err:
        evaluate_main([f"ckpt={run}", "loops=[1]", "n_samples=4", *args])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_seed_table_gives_mean_min_max_and_seeds_reaching():
    from looped.tools.difficulty_grid import seed_table

    def run(name, a, b):
        return GridRun(name, 4, 8, {8: {4: {"accuracy": a}, 8: {"accuracy": b}}})

    lines = seed_table([run("v/seed0", 0.5, 0.95), run("v/seed1", 0.7, 0.85),
                        run("other", 0.1, 0.2)], "length")
    assert lines[0] == "## v: mean (min..max) over 2 seeds"
    assert lines[4] == "| 8 | 0.600 (0.50..0.70) | 0.900 (0.85..0.95) | 1/2 |"
    assert not any("other" in line for line in lines)


def test_study_figures_draw_a_plain_decoder_only_at_r_1():
    """A plain decoder (trained at R = 1) run past R = 1 is no experiment; its points there used
    to dominate text_looped's bits_per_byte_vs_R.png."""
    from looped.tools.study.aggregate import meant_for

    rows = [{"variant": "plain", "trained_loop": 1, "R": r} for r in (1, 2, 8)] + \
           [{"variant": "looped", "trained_loop": 4, "R": r} for r in (1, 4, 16)] + \
           [{"variant": "unrolled", "trained_loop": 4, "R": 4}]
    kept = [(r["variant"], r["R"]) for r in meant_for(rows)]
    assert kept == [("plain", 1), ("looped", 1), ("looped", 4), ("looped", 16), ("unrolled", 4)]
