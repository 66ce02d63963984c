"""`looped weights`: the split of Depth-Attention's weight into self / first / previous / middle /
prelude equals a split computed by hand from the raw weights, the parts sum to 1, and the tool
writes its table, CSV and figure for runs grouped by variant."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from looped.errors import ConfigError
from looped.tools.depth_weights import PARTS, main as weights_main, split_weights
from looped.tools.train import main as train_main

from conftest import LOOPED_MODEL, cli_in_process, make_model, rand_ids

ROOT = Path(__file__).resolve().parent.parent
RUN = ["task=prefix_sums", "task.length=6", "model.vocab_size=4", "model.d_model=16",
       "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=8",
       "model.ffn_dim=32", "model.max_seq_len=13", "loop=3", "train.steps=3",
       "train.eval_every=3", "eval.loops=[3]", "eval.n_samples=8", "threads=1",
       "train.loop_sampling.sampler=fixed"]


def by_hand(weights: torch.Tensor, sources: tuple[int, ...], p: int, n_prelude: int,
            n_core: int) -> dict[str, float]:
    """Positions to (iteration) by arithmetic: prelude below n_prelude, then n_core a row."""
    r = (p - n_prelude) // n_core
    w = weights.double()
    parts = dict.fromkeys(PARTS, 0.0)
    for i, j in enumerate(sources):
        rr = (j - n_prelude) // n_core
        name = ("prelude" if j < n_prelude else "first" if rr == 0 else
                "previous" if rr == r - 1 else "middle")
        parts[name] += float(w[..., i].mean())
    parts["self"] = float(w[..., -1].mean())
    return parts


@pytest.mark.parametrize("policy", ["same_layer", "anchor_window", "loop_strided"])
def test_split_equals_the_split_by_hand(policy):
    model = make_model(seed=5, loop=6, policy=policy, **LOOPED_MODEL)
    with torch.no_grad():
        out = model(rand_ids(2, 7, seed=5), return_depth_weights=True)
    layout, checked = out.layout, 0
    for p in range(layout.n_prelude + layout.n_core, layout.n_prelude + layout.n_core * 6):
        dw = out.depth_weights[p]
        got = split_weights(layout, p, dw.sources[:-1], dw.weights)
        want = by_hand(dw.weights, dw.sources[:-1], p, layout.n_prelude, layout.n_core)
        for part in PARTS:
            assert got[part] == pytest.approx(want[part], abs=1e-12)
        assert sum(got[part] for part in PARTS) == pytest.approx(1.0, abs=1e-6)  # fp32 weights
        entropy = torch.distributions.Categorical(probs=dw.weights.double()).entropy().mean()
        assert got["entropy"] == pytest.approx(float(entropy), abs=1e-6)
        checked += 1
    assert checked == 2 * 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("weights")
    for variant, extra in [("anchor_window", ["model.depth_attention.sources=anchor_window"]),
                           ("vanilla", ["model.depth_attention.enabled=false"])]:
        proc = cli_in_process(train_main, [*RUN, *extra, f"out_dir={out / variant}",
                                           "name=seed0"])
        assert proc.returncode == 0, proc.stderr
    return out


def test_tool_writes_table_csv_and_figure_by_variant(runs, tmp_path, single_thread):
    out = tmp_path / "w"
    assert weights_main([f"ckpt={runs / 'anchor_window' / 'seed0'}", "loops=[3,24]",
                         "n_samples=8", f"out={out}"]) == 0
    table = (out / "depth_weights.md").read_text()
    # anchor_window reads iteration 0 and the previous one: 2 sources at R = 3 and at R = 24
    assert "| anchor_window | 3 | 3 | 2 |" in table and "| anchor_window | 3 | 24 | 2 |" in table
    rows = list(csv.DictReader(open(out / "depth_weights.csv")))
    assert [int(r["iteration"]) for r in rows if r["R"] == "24"] == list(range(1, 24))
    for r in rows:
        assert sum(float(r[p]) for p in PARTS) == pytest.approx(1.0, abs=1e-5)
        assert float(r["middle"]) == 0.0 and float(r["prelude"]) == 0.0
    assert (out / "depth_weights.png").stat().st_size > 0


def test_bad_inputs_are_one_line(runs):
    with pytest.raises(ConfigError, match="no Depth-Attention"):
        weights_main([f"ckpt={runs / 'vanilla' / 'seed0'}", "loops=[3]"])
    with pytest.raises(ConfigError, match="loops must be"):
        weights_main([f"ckpt={runs / 'anchor_window' / 'seed0'}", "loops=[1]"])
    with pytest.raises(ConfigError, match="give at least one run"):
        weights_main(["loops=[3]"])
