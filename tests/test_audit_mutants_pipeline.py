"""Audit: one-line bugs ("mutants") in the pipeline around the model that the suite let through.

Each test names the bug it catches in its docstring. They cover the study statistics (the sign
of summary.md's difference column, pairing by seed rather than by order, stale results after
the study's eval settings change), the trainer (the learning rate each optimizer step uses, the
exit gate's loss detached from the LM losses), plugins declared through the `looped.plugins`
entry-point group, and the held-out task that eval, export, generate and both checkpoint
benchmarks build: the run's saved task knobs plus its task.eval.* overrides, never the defaults.

Everything is tiny and runs in-process: runs are written directly (config.yaml + a checkpoint of
random weights), nothing is trained in a subprocess.
"""

from __future__ import annotations

import gc
import json
import math
import sys

import pytest
import torch
from conftest import CLI_TINY_MODEL, LOOPED_MODEL, make_model, randomize_

from looped import build_model, load_config
from looped.data.base import IGNORE, Batch

T_975 = {1: 12.706204736174698, 2: 4.302652729749464}  # Student t 0.975 quantiles (tables)


# -- 1. study statistics -----------------------------------------------------------------------


def _write_study(path, out, eval_node="{loops: [1, 2], n_samples: 32, batch_size: 16}",
                 seeds=(0, 1, 2)):
    path.write_text("\n".join([
        "description: audit study", "base: []", "variants:", "  ref: []", "  new: []",
        f"seeds: {list(seeds)}", "reference: ref", "metric: loss", f"eval: {eval_node}",
        f"out: {out}"]) + "\n")
    return path


def _row(variant, seed, loss, R=2, trained=2):
    return {"grid": "", "variant": variant, "seed": seed, "R": R, "trained_loop": trained,
            "accuracy": math.nan, "solved": math.nan, "loss": loss, "bits_per_byte": math.nan,
            "iterations": float(R), "train_seconds": 10.0, "resumed": False}


def _hand(values):
    """(n, mean, sample std, ci low, ci high), by hand."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975[n - 1] * std / math.sqrt(n)
    return n, mean, std, mean - half, mean + half


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    from looped.tools.study.spec import load_study

    tmp = tmp_path_factory.mktemp("audit_study")
    return load_study(_write_study(tmp / "s.yaml", tmp / "out"))


def _main_table_row(md: str, variant: str) -> str:
    lines = md.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| variant |"))
    return next(ln for ln in lines[head:] if ln.startswith(f"| {variant} |"))


def test_summary_md_delta_column_is_variant_minus_reference(spec):
    """Bug caught: summary.md's "Δ vs reference at trained R" column sign-flipped (reference −
    variant, or the interval's bounds negated)."""
    from looped.tools.study.aggregate import report

    ref = {0: 2.00, 1: 2.40, 2: 2.10}
    new = {0: 1.70, 1: 2.25, 2: 1.55}  # lower loss in every seed: the difference is negative
    rows = [_row("ref", s, v) for s, v in ref.items()] + [_row("new", s, v)
                                                          for s, v in new.items()]
    md = report(rows, [], spec, "cmd", {}, 6)
    n, mean, std, lo, hi = _hand([new[s] - ref[s] for s in (0, 1, 2)])
    assert (round(mean, 3), round(lo, 3), round(hi, 3)) == (-0.333, -0.835, 0.169)
    assert "Δ vs ref at trained R" in md
    new_row = _main_table_row(md, "new")
    # R=1 column empty (only R=2 rows), R=2 cell, Δ cell, train time
    assert new_row == ("| new | 2 | 1.833 ± 0.369 (1.550–2.250) | -0.333 [-0.835, +0.169] "
                       "| 10 |"), new_row
    assert _main_table_row(md, "ref").endswith("| (reference) | 10 |")


def test_paired_differences_pair_by_seed_not_by_order(spec):
    """Bug caught: paired differences paired by position (rows' finishing order, or the i-th
    shared value of each side) instead of by seed; seeds finished in a shuffled order and the
    variant is missing a middle seed."""
    from looped.tools.study.aggregate import paired, report
    from looped.tools.study.stats import paired_difference, paired_values

    ref = {2: 0.75, 0: 0.40, 3: 1.30, 1: 0.90}  # the order the runs finished in
    new = {0: 0.60, 3: 1.15, 1: 0.95}  # seed 2 missing; another order again
    want = [0.60 - 0.40, 0.95 - 0.90, 1.15 - 1.30]  # seeds 0, 1, 3
    assert paired_values(new, ref) == pytest.approx(want, abs=1e-12)
    n, mean, std, lo, hi = _hand(want)
    d = paired_difference(new, ref)
    assert (d.n, d.min, d.max) == (3, pytest.approx(-0.15), pytest.approx(0.20))
    assert (d.mean, d.std) == (pytest.approx(mean, abs=1e-12), pytest.approx(std, abs=1e-12))
    assert (d.ci_low, d.ci_high) == (pytest.approx(lo, rel=1e-9), pytest.approx(hi, rel=1e-9))
    assert mean == pytest.approx(0.1 / 3)  # (0.20 + 0.05 - 0.15) / 3

    rows = [_row("ref", s, v) for s, v in ref.items()] + [_row("new", s, v)
                                                          for s, v in new.items()]
    got = {r["R"]: r for r in paired(rows, spec) if r["metric"] == "loss"}
    assert set(got) == {2, "trained"}
    for r in got.values():
        assert r["variant"] == "new" and r["reference"] == "ref" and r["n"] == 3
        assert r["mean"] == pytest.approx(mean, abs=1e-12)
        assert r["std"] == pytest.approx(std, rel=1e-9)
        assert (r["min"], r["max"]) == (pytest.approx(-0.15), pytest.approx(0.20))
        assert r["ci95_low"] == pytest.approx(lo, rel=1e-9)
        assert r["ci95_high"] == pytest.approx(hi, rel=1e-9)
        # relative: against the reference's mean over the shared seeds 0, 1, 3
        assert r["relative"] == pytest.approx(mean / ((0.40 + 0.90 + 1.30) / 3), abs=1e-12)
    assert (round(lo, 3), round(hi, 3)) == (-0.403, 0.470)
    row = _main_table_row(report(rows, [], spec, "cmd", {}, 7), "new")
    assert "| +0.033 [-0.403, +0.470] |" in row, row


def _finished_run(tmp, eval_node):
    """A study's run with a result.json as the runner writes it, under these eval settings."""
    from looped.tools.study.runner import RESULT, settings
    from looped.tools.study.spec import expand, load_study

    path = _write_study(tmp / "s.yaml", tmp / "out", eval_node, seeds=(0,))
    run = next(r for r in expand(load_study(path)) if r.variant == "new")
    result = {"variant": "new", "seed": 0, "grid": {}, "settings": settings(run),
              "trained_loop": 2, "eval": {"1": {"accuracy": 0.25, "loss": 1.75},
                                          "2": {"accuracy": 0.5, "loss": 1.25}},
              "train_seconds": 3.0, "attempts": 1, "resumed": False}
    (tmp / "out" / "new" / "seed0").mkdir(parents=True)
    (tmp / "out" / "new" / "seed0" / RESULT).write_text(json.dumps(result))
    return path, run


@pytest.mark.parametrize("changed", [
    "{loops: [1, 2, 3], n_samples: 32, batch_size: 16}",
    "{loops: [1, 2], n_samples: 64, batch_size: 16}",
    "{loops: [1, 2], n_samples: 32, batch_size: 8}",
], ids=["loops", "n_samples", "batch_size"])
def test_changed_study_eval_settings_do_not_reuse_stale_results(tmp_path, changed):
    """Bug caught: rerunning a study after changing its `eval` settings (loops, n_samples,
    batch_size) reuses the results evaluated under the old ones: the run must be re-evaluated
    or refused, and the stale numbers must not reach the report."""
    from looped.tools.study.aggregate import collect
    from looped.tools.study.runner import finished_result, run_one, run_state
    from looped.tools.study.spec import expand, load_study

    path, old = _finished_run(tmp_path, "{loops: [1, 2], n_samples: 32, batch_size: 16}")
    # the same study again: the finished run is reused
    assert finished_result(old) is not None and run_state(old) == "finished"
    assert run_one(old).state == "skipped"
    assert [r["R"] for r in collect([old])[0]] == [1, 2]
    # the study file edited: other evaluation settings
    _write_study(path, tmp_path / "out", changed, seeds=(0,))
    run = next(r for r in expand(load_study(path)) if r.variant == "new")
    assert run.run_dir == old.run_dir
    assert finished_result(run) is None
    assert run_state(run) == "stale"
    status = run_one(run)
    assert status.state != "skipped" and status.result.get("eval") != {
        "1": {"accuracy": 0.25, "loss": 1.75}, "2": {"accuracy": 0.5, "loss": 1.25}}
    assert status.state == "failed" and "evaluation settings" in status.error
    rows, _, _ = collect([run])
    assert rows == []


# -- 2. trainer --------------------------------------------------------------------------------

TINY_RUN = [o for o in CLI_TINY_MODEL if not o.startswith("threads=")] + [
    "model.vocab_size=12", "model.max_seq_len=16", "device=cpu",
    "train.loop_sampling.sampler=fixed", "task=roots", "task.n_chains=2", "task.chain_len=3",
    "task.n_queries=3"]


def test_each_optimizer_step_uses_the_lr_of_its_own_step(tmp_path):
    """Bug caught: the LR schedule applied one step off (`lr_at(step + 1)` when setting the
    optimizer's lr): step 0 must run at lr / warmup, not 2 lr / warmup."""
    from looped.training.trainer import Trainer

    cfg = load_config([*TINY_RUN, "train.lr=0.001", "train.warmup_steps=4",
                       "train.warmup_fraction=null", "train.steps=10", "train.batch_size=4"])
    trainer = Trainer(cfg, tmp_path)
    seen = []
    real_step = trainer.opt.step

    def step(*a, **k):  # the lr of every group at the moment the update is applied
        seen.append([g["lr"] for g in trainer.opt.param_groups])
        return real_step(*a, **k)

    trainer.opt.step = step
    rows = [trainer.train_step(), trainer.train_step()]  # steps 0 and 1: warmup (s + 1) / 4
    trainer.step = 6  # cosine: progress (6 - 4) / (10 - 4) = 1/3, cos(pi/3) = 1/2
    rows.append(trainer.train_step())
    want = [0.001 * 1 / 4, 0.001 * 2 / 4, 0.001 * (0.1 + 0.9 * 0.5 * (1 + 0.5))]
    assert len(seen) == 3
    for lrs, row, w in zip(seen, rows, want):
        assert lrs == [pytest.approx(w, rel=1e-12)] * 2
        assert row["lr"] == pytest.approx(w, rel=1e-12)


@pytest.fixture(scope="module")
def gate_setup():
    kw = dict(loop=3, exit_gate="true", **LOOPED_MODEL)
    model = make_model(seed=5, **kw)
    g = torch.Generator().manual_seed(77)
    ids = torch.randint(0, 50, (2, 10), generator=g)
    targets = torch.randint(0, 50, (2, 10), generator=g)
    targets[:, :3] = IGNORE
    hops = torch.randint(0, 50, (2, 2, 10), generator=g)
    hops[:, :, :3] = IGNORE
    return model, Batch(ids, targets, hops)


def _grads(model, batch, kind, *, gate: bool, detach_gate_input: bool = False):
    from looped.training.losses import compute_loss

    model.zero_grad(set_to_none=True)
    out = model(batch.inputs, return_states=True)
    assert out.gate_logits is not None and out.gate_logits.shape == (3, 2, 10)
    if detach_gate_input:  # the gate loss reaches the LM only through the L_r it weighs
        out.gate_logits = out.gate_logits.detach()
    if not gate:
        out.gate_logits = None
    loss = compute_loss(model, batch, out, kind, gate_beta=0.3)
    loss.backward()
    return float(loss.detach()), {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                         for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["final", "per_iteration"])
def test_gate_loss_does_not_backpropagate_into_the_lm_losses(gate_setup, kind):
    """Bug caught: the exit gate's loss not detached from the LM losses (gate_loss fed
    `per_iter` instead of `per_iter.detach()` in looped/training/losses.py): its gradient would
    reach the LM's weights through the per-iteration losses L_r it weighs."""
    model, batch = gate_setup
    lm_loss, lm = _grads(model, batch, kind, gate=False)
    total, with_gate = _grads(model, batch, kind, gate=True, detach_gate_input=True)
    assert abs(total - lm_loss) > 1e-3  # the gate term is there and not negligible
    lm_params = [n for n in lm if not n.startswith("exit_gate.")]
    assert any(lm[n].abs().max() > 0 for n in lm_params if n.startswith("core."))
    for n in lm_params:  # exactly the LM loss's gradient: the gate adds nothing through L_r
        assert torch.equal(with_gate[n], lm[n]), n
    # the gate itself learns from its loss
    _, full = _grads(model, batch, kind, gate=True)
    assert full["exit_gate.weight"].abs().max() > 1e-4
    assert full["exit_gate.bias"].abs().max() > 1e-4
    assert lm["exit_gate.weight"].abs().max() == 0


def test_gate_loss_gradient_does_not_reach_the_core_through_the_gate_input(gate_setup):
    """Bug caught: the gate loss pushing the LM's core weights through the states the gate
    reads (losses.py: the gate "must not push the LM around"); found by this audit and fixed
    (the gate reads a detached state). Backward of LM loss + gate loss must give the core the LM loss's gradient."""
    model, batch = gate_setup
    _, lm = _grads(model, batch, "final", gate=False)
    _, full = _grads(model, batch, "final", gate=True)
    for n in lm:
        if n.startswith("core."):
            assert torch.allclose(full[n], lm[n], rtol=0, atol=1e-9), n


# -- 3. plugins through the `looped.plugins` entry-point group ---------------------------------

EP_MODULE = '''
from dataclasses import dataclass

import torch
from looped.data import IGNORE, Batch, Task, register_task

IMPORTS = globals().get("IMPORTS", 0) + 1


@register_task("audit_ep_task")
class AuditEntryPointTask(Task):
    @dataclass
    class Config:
        span: int = 2

    def __init__(self, span: int = Config.span, **_):
        self.span, self.vocab_size, self.seq_len = span, 7, 3 * span

    def sample(self, batch_size, generator):
        x = torch.randint(0, 7, (batch_size, self.seq_len), generator=generator)
        return Batch(x, torch.full_like(x, IGNORE))
'''


def test_a_distribution_advertising_a_looped_plugins_entry_point_is_imported(tmp_path,
                                                                             monkeypatch):
    """Bug caught: the `looped.plugins` entry-point group never read, or read under another
    group name: an installed distribution's plugin must load when a config resolves."""
    from looped import plugins
    from looped.data import TASKS, build_task

    mod = "audit_ep_plugin_mod_7c1"
    site = tmp_path / "site"
    dist = site / "audit_ep_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / f"{mod}.py").write_text(EP_MODULE)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: audit-ep-plugin\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[looped.plugins]\naudit = {mod}\n")
    monkeypatch.syspath_prepend(str(site))
    assert mod not in sys.modules and "audit_ep_task" not in TASKS
    try:
        cfg = load_config(["task=audit_ep_task", "task.span=3"])  # no imports=[...] given
        assert mod in sys.modules and sys.modules[mod].IMPORTS == 1
        assert cfg.task.name == "audit_ep_task" and cfg.task.span == 3
        task = build_task(cfg.task)
        assert type(task).__name__ == "AuditEntryPointTask" and task.seq_len == 9
        load_config(["task=audit_ep_task"])  # each entry point loads once
        assert sys.modules[mod].IMPORTS == 1
    finally:
        sys.modules.pop(mod, None)
        TASKS.pop("audit_ep_task", None)
        TASKS.configs.pop("audit_ep_task", None)
        plugins._imported.discard(f"ep:{mod}")


# -- 4. the held-out task of eval, export, generate and the benchmarks -------------------------

# the run trains on 2 chains of 3 nodes (vocab 7, 10 tokens) and is scored on deeper trees:
# task.eval.chain_len=4 (vocab 9, 12 tokens); the default roots task has 4 chains of 6 nodes
# (vocab 25 > the model's 12, 33 tokens > max_seq_len 16)
HELD_OUT = dict(n_chains=2, chain_len=4, n_queries=3, vocab_size=9, seq_len=12)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from looped.training.checkpoint import save_checkpoint, save_run_config

    cfg = load_config([*TINY_RUN, "task.eval.chain_len=4"])
    assert cfg.task.chain_len == 3 and cfg.task.eval.chain_len == 4
    run = tmp_path_factory.mktemp("audit_run") / "run"
    torch.manual_seed(0)
    model = randomize_(build_model(cfg), seed=11)
    save_run_config(run, cfg)
    save_checkpoint(run, 1, model, {"step": 1})
    return run


def held_out_reference():
    """The run's held-out task, built by hand from its knobs (not through build_task)."""
    from looped.data.tasks import RootsTask

    return RootsTask(n_chains=2, chain_len=4, n_queries=3, split="eval")


def assert_held_out(task):
    from looped.data.tasks import RootsTask

    assert isinstance(task, RootsTask)
    got = {k: getattr(task, k) for k in HELD_OUT}
    assert got == HELD_OUT, got


class Recorder:
    """Wraps a function, keeps the task each call passed (positional index or keyword)."""

    def __init__(self, fn, index):
        self.fn, self.index, self.tasks = fn, index, []

    def __call__(self, *a, **k):
        self.tasks.append(k["task"] if "task" in k else a[self.index])
        return self.fn(*a, **k) if self.fn is not None else {}


def test_eval_scores_the_runs_held_out_task(run_dir, monkeypatch):
    """Bug caught: `looped eval` (looped/tools/evaluate.py) building the held-out task with
    default knobs (or without task.eval.*) instead of the run's saved task config."""
    from looped import load_run
    from looped.training.scoring import task_accuracy
    from looped.tools import evaluate

    rec = Recorder(evaluate.task_accuracy, 1)
    monkeypatch.setattr(evaluate, "task_accuracy", rec)
    args = evaluate.parse_args([f"ckpt={run_dir}", "loops=[1,2]", "n_samples=8",
                                "batch_size=8"])
    _, results, trained = evaluate.evaluate_run(str(run_dir), args)
    assert trained == 2 and set(results) == {1, 2} and len(rec.tasks) == 2
    for task in rec.tasks:
        assert_held_out(task)
    cfg, model = load_run(run_dir)
    for r in (1, 2):
        want = task_accuracy(model, held_out_reference(), r, 8, 8, cfg.seed)
        assert results[r]["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert results[r]["accuracy"] == want["accuracy"]


def test_export_writes_the_runs_held_out_task(run_dir, tmp_path, monkeypatch):
    """Bug caught: `looped export` (looped/tools/export.py) building the task it exports the
    tokenizer from with default knobs (or without task.eval.*) instead of the run's."""
    import looped.integrations.hf.export as hf_export
    from looped.tools import export

    rec = Recorder(hf_export.export_model, 2)
    monkeypatch.setattr(hf_export, "export_model", rec)
    out = tmp_path / "hf"
    assert export.main([f"run={run_dir}", f"out={out}", "check=false"]) == 0
    (task,) = rec.tasks
    assert_held_out(task)
    names = json.loads((out / "tokens.json").read_text())
    assert names == [str(i) for i in range(12)]  # the model's 12 ids, not the default 25


def test_generate_prompts_with_the_runs_held_out_task(run_dir, monkeypatch, capsys):
    """Bug caught: `looped generate` (looped/tools/generate.py) drawing its held-out prompt
    from a task built with default knobs (or without task.eval.*) instead of the run's."""
    from looped.tools import generate

    rec = Recorder(generate._prompt_ids, 1)
    monkeypatch.setattr(generate, "_prompt_ids", rec)
    assert generate.main([f"run={run_dir}", "max_new_tokens=2", "temperature=0", "seed=3"]) == 0
    (task,) = rec.tasks
    assert_held_out(task)
    batch = held_out_reference().sample(1, torch.Generator().manual_seed(3))
    cut = 2 * 4 + 1 + 1  # the nodes, SEP, then the first query: its answer follows
    assert int((batch.targets[0] >= 0).nonzero()[0]) + 1 == cut
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "prompt:    " + " ".join(map(str, batch.inputs[0, :cut].tolist()))
    assert out[2] == "held out:  " + " ".join(map(str, batch.inputs[0, cut:cut + 2].tolist()))


def test_bench_cache_scores_the_runs_held_out_task(run_dir, monkeypatch):
    """Bug caught: `looped bench cache` (looped/tools/bench_cache.py) scoring a task built with
    default knobs (or without task.eval.*) instead of the run's."""
    from looped import load_run
    from looped.training.scoring import task_accuracy
    from looped.tools import bench_cache

    rec = Recorder(bench_cache.task_accuracy, 1)
    monkeypatch.setattr(bench_cache, "task_accuracy", rec)
    args = bench_cache.BenchCacheArgs(ckpt=[str(run_dir)], loops=[2],
                                      policies=["per_iteration"], n_samples=8, batch_size=8)
    (row,) = bench_cache.measure_run(str(run_dir), args)
    (task,) = rec.tasks
    assert_held_out(task)
    cfg, model = load_run(run_dir)
    want = task_accuracy(model, held_out_reference(), 2, 8, 8, cfg.seed, kv="per_iteration")
    assert row["metric"] == "accuracy" and row["value"] == want["accuracy"]


def test_bench_loop_runs_on_the_runs_held_out_task(run_dir, monkeypatch):
    """Bug caught: `looped bench loop` (looped/tools/bench_loop.py) benchmarking a task built
    with default knobs (or without task.eval.*) instead of the run's."""
    from looped.tools import bench_loop

    exit_rec, decode_rec = Recorder(None, 1), Recorder(None, 1)
    monkeypatch.setattr(bench_loop, "bench_exit", exit_rec)
    monkeypatch.setattr(bench_loop, "bench_decode_vs_recompute", decode_rec)
    gc_was = gc.isenabled()
    try:
        assert bench_loop.main([f"ckpt={run_dir}", "batches=[]"]) == 0
    finally:
        if gc_was:
            gc.enable()  # main disables the collector for its timings
    assert len(exit_rec.tasks) == 1 and len(decode_rec.tasks) == 1
    assert_held_out(exit_rec.tasks[0])
    assert_held_out(decode_rec.tasks[0])
