"""Batched adaptive exit: a decoding row whose tokens have exited drops out of the later
iterations (only the running rows are computed), and the result is exactly that of decoding
each row alone at batch 1: the same tokens, iteration counts and logits."""

from __future__ import annotations

import pytest
import torch

from looped.model.depth_pass import DepthPass
from looped.model.exit import ExitCriterion

from conftest import decode_run, max_diff, rand_ids
from test_exit import MarginRecorder, exit_model, make_exit, pick_threshold

pytestmark = pytest.mark.usefixtures("single_thread")

R = 4
B = 4


@pytest.fixture
def row_counts(monkeypatch):
    """The rows each one-token core iteration computed (one entry per iteration run), and
    whether it ran on a subset of the batch: [(rows, subset)]."""
    counts = []
    original = DepthPass.iteration

    def spy(self, x, frozen=None, rows=None):
        if x.shape[1] == 1:
            counts.append((int(x.shape[0]), rows is not None))
        return original(self, x, frozen, rows)

    monkeypatch.setattr(DepthPass, "iteration", spy)
    return counts


class StopAfter(ExitCriterion):
    """Row b of the batch stops after after[b] iterations."""

    def __init__(self, after: list[int], drop_rows_from: int = 1):
        self.after, self.drop_rows_from = torch.tensor(after), drop_rows_from

    def check(self, it):
        b, t = it.state.shape[:2]
        return (it.r + 1 >= self.after[:b])[:, None].expand(b, t)


@pytest.mark.parametrize("kv", ["per_iteration", "last"])
@pytest.mark.parametrize("variant", ["same_layer", "dense-raw"])
@pytest.mark.parametrize("name", ["entropy", "kl", "gate"])
def test_batched_exit_equals_each_row_alone(kv, variant, name, row_counts):
    model = exit_model(variant, seed=95)
    ids = rand_ids(B, 10, seed=95)
    crit = MarginRecorder(name, make_exit(name, pick_threshold(model, ids, name)), R)
    crit.drop_rows_from = 2  # this batch of 4 drops rows; a row alone never does
    with torch.no_grad():
        logits, iters, _ = decode_run(model, ids, (3,), exit=crit, kv=kv)
        batch_counts = list(row_counts)
        alone = [decode_run(model, ids[i:i + 1], (3,), exit=crit, kv=kv) for i in range(B)]
    assert crit.margins and min(crit.margins) > 1e-5  # no decision sits on the threshold
    assert torch.equal(iters, torch.cat([a[1] for a in alone]))
    assert max_diff(logits, torch.cat([a[0] for a in alone])) <= 1e-5
    # rows exited at different iterations, and each row was computed in exactly the
    # iterations it ran: the rows computed over all one-token iterations sum to its counts
    decode_iters = iters[:, 3:]
    assert any(len(col.unique()) > 1 for col in decode_iters.T)
    assert any(subset for _, subset in batch_counts)
    assert sum(rows for rows, _ in batch_counts) == int(decode_iters.sum())


@pytest.mark.parametrize("kv", ["per_iteration", "last"])
def test_batched_exit_generation_equals_each_row_alone(kv):
    model = exit_model("same_layer", seed=96)
    prompt = rand_ids(B, 4, seed=96)
    crit = make_exit("entropy", pick_threshold(model, rand_ids(B, 10, seed=96), "entropy"))
    crit.drop_rows_from = 1
    with torch.no_grad():
        tokens, used = model.generate(prompt, 8, temperature=0, exit=crit, kv=kv,
                                      return_iterations=True)
        for i in range(B):
            row, row_used = model.generate(prompt[i:i + 1], 8, temperature=0, exit=crit, kv=kv,
                                           return_iterations=True)
            assert torch.equal(row, tokens[i:i + 1]) and torch.equal(row_used, used[i:i + 1])
    assert any(len(col.unique()) > 1 for col in used.T)  # rows exited at different iterations


def test_rows_still_running_keep_exited_rows_entries_frozen():
    """After a decode step in which rows exit at different iterations, every later iteration's
    cache entries of an exited row equal those of its exit iteration (per_iteration policy)."""
    model = exit_model("same_layer", seed=97)
    ids = rand_ids(B, 10, seed=97)
    crit = make_exit("entropy", pick_threshold(model, ids, "entropy"))
    crit.drop_rows_from = 1
    cache = model.new_cache(B, 10)
    with torch.no_grad():
        model(ids[:, :9], cache=cache)
        out = model(ids[:, 9:], cache=cache, exit=crit)
    it = out.iterations[:, 0]
    assert len(it.unique()) > 1
    layout, n = model.layout(), model.cfg.n_layers
    for row in range(B):
        last = int(it[row]) - 1
        for r in range(last + 1, R):
            for layer in range(n):
                src = layout.n_prelude + last * n + layer
                dst = layout.n_prelude + r * n + layer
                assert torch.equal(cache.kv[dst, :, row, :, 9], cache.kv[src, :, row, :, 9])


def test_a_batch_below_drop_rows_from_keeps_every_row(row_counts):
    """exit.drop_rows_from (default 16) leaves small batches whole: the same results, no
    row dropped; 0 never drops."""
    model = exit_model("same_layer", seed=98)
    ids = rand_ids(B, 10, seed=98)
    crit = make_exit("entropy", pick_threshold(model, ids, "entropy"))
    results = {}
    for drop in (1, 0, B + 1):
        crit.drop_rows_from = drop
        row_counts.clear()
        with torch.no_grad():
            results[drop] = decode_run(model, ids, (3,), exit=crit)
        assert any(subset for _, subset in row_counts) == (drop == 1)
    for drop in (0, B + 1):
        assert torch.equal(results[drop][1], results[1][1])
        assert max_diff(results[drop][0], results[1][0]) <= 1e-5


def test_build_exit_carries_drop_rows_from():
    from looped import load_config
    from looped.model.exit import build_exit

    crit = build_exit(load_config(["exit.criterion=kl", "exit.drop_rows_from=4"]).exit)
    assert crit.drop_rows_from == 4 and crit.threshold == 1e-3


@pytest.mark.parametrize("kv", ["per_iteration", "last"])
def test_rows_dropped_then_every_row_exits(kv, row_counts):
    """Row 0 stops after 1 iteration and leaves the batch; the others stop after 2, when every
    token has exited: the dropped row's entries and the rest's are carried to the last
    iteration, and each row equals itself decoded alone."""
    model = exit_model("dense-raw", seed=99)  # mix=raw: raw values are carried too
    ids = rand_ids(B, 8, seed=99)
    crit = StopAfter([1, 2, 2, 2])
    with torch.no_grad():
        logits, iters, cache = decode_run(model, ids, (3,), exit=crit, kv=kv)
        batch_counts = list(row_counts)
        alone = []
        for i in range(B):
            row_crit = StopAfter(crit.after[i:i + 1].tolist())
            alone.append(decode_run(model, ids[i:i + 1], (3,), exit=row_crit, kv=kv))
    assert torch.equal(iters[:, 3:], torch.tensor([[1] * 5, [2] * 5, [2] * 5, [2] * 5]))
    assert torch.equal(iters, torch.cat([a[1] for a in alone]))
    assert max_diff(logits, torch.cat([a[0] for a in alone])) <= 1e-5
    assert [rows for rows, _ in batch_counts] == [B, B - 1] * 5  # 5 decode steps
    if kv == "per_iteration":  # later iterations hold each row's exit-iteration entries
        n, pre = model.cfg.n_layers, model.layout().n_prelude
        for row, last in enumerate([0, 1, 1, 1]):
            for r in range(last + 1, R):
                for layer in range(n):
                    src, dst = pre + last * n + layer, pre + r * n + layer
                    assert torch.equal(cache.kv[dst, :, row, :, 3:], cache.kv[src, :, row, :, 3:])
