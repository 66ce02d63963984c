"""The study runner (`python -m looped study`), on a tiny grid of 2 variants x 2 seeds plus a
variant that fails: it completes, reruns skip finished runs, a killed run resumes to the same
result, a failing variant is reported while the others complete, the summary's statistics match
a hand computation, the markdown renders, and the submitit path runs under its debug executor."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLI_TINY_MODEL, cli_in_process

from looped.tools.study.spec import check_run_config, expand, load_study
from looped.tools.study.stats import incomplete_beta, spread, t_cdf, t_quantile

ROOT = Path(__file__).resolve().parent.parent
BASE = [o for o in CLI_TINY_MODEL if not o.startswith("threads=")] + [
    "train.steps=6", "train.batch_size=8", "train.eval_every=3", "eval.n_samples=16"]


def write_study(path: Path, out: Path, variants: dict, seeds=(0, 1), extra: str = "",
                base_extra=()) -> Path:
    lines = [f"description: a tiny study", f"base: [{', '.join([*BASE, *base_extra])}]",
             "variants:"]
    lines += [f"  {name}: [{', '.join(o)}]" for name, o in variants.items()]
    lines += [f"seeds: {list(seeds)}", "reference: vanilla", "metric: loss",
              "eval: {loops: [1, 2, 3], n_samples: 32}", f"out: {out}", extra]
    path.write_text("\n".join(lines) + "\n")
    return path


VARIANTS = {"vanilla": ["model.depth_attention.enabled=false"], "da": [],
            "broken": ["model.vocab_size=4"]}  # roots needs 25 tokens: fails when training


def study_here(*args):
    """`looped study` in this process: for invocations that train nothing (each subprocess
    pays torch's import again)."""
    from looped.tools.study.cli import main

    return cli_in_process(main, args)


def study(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "looped", "study", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    path = write_study(tmp / "tiny.yaml", tmp / "out", VARIANTS)
    proc = study(path, "jobs=2")
    return path, tmp / "out", proc


@pytest.mark.slow
def test_completes_and_reports_the_failing_variant(done):
    path, out, proc = done
    assert proc.returncode == 1, proc.stderr[-2000:]  # 1: some run failed
    assert "FAILED broken/seed0: task 'roots' needs model.vocab_size >= 25, got 4" in proc.stdout
    for v in ("vanilla", "da"):
        for s in (0, 1):
            result = json.loads((out / v / f"seed{s}" / "result.json").read_text())
            assert result["trained_loop"] == 2 and set(result["eval"]) == {"1", "2", "3"}
            assert result["eval"]["2"]["loss"] > 0
    assert not (out / "broken" / "seed0" / "result.json").exists()
    assert "needs model.vocab_size" in (out / "broken" / "seed0" / "error.txt").read_text()
    rows = list(csv.DictReader(open(out / "results" / "runs.csv")))
    assert len(rows) == 2 * 2 * 3  # (variant, seed, R), the failed variant absent
    md = (out / "results" / "summary.md").read_text()
    assert "runs finished: 4 of 6" in md and "- `broken/seed0`: task 'roots'" in md


@pytest.mark.slow
def test_rerun_skips_finished_runs(done):
    path, out, _ = done
    result = out / "da" / "seed0" / "result.json"
    before = (result.stat().st_mtime_ns, (out / "da" / "seed0" / "train.log").read_text())
    proc = study_here(path, "only=[vanilla,da]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 runs (4 finished, 0 to resume, 0 to start" in proc.stdout
    assert (result.stat().st_mtime_ns, (out / "da" / "seed0" / "train.log").read_text()) == before


@pytest.mark.slow
def test_report_only_reports_what_is_finished_and_trains_nothing(done, tmp_path):
    """report_only=true: the report of the runs finished so far (e.g. while the study runs in
    another process), with an unstarted seed counted as not finished, and no run started."""
    _, out, _ = done
    path = write_study(tmp_path / "more.yaml", out, VARIANTS, seeds=(0, 1, 2),
                       extra=f"results: {tmp_path / 'report'}")
    proc = study_here(path, "report_only=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any((out / v / "seed2").exists() for v in VARIANTS)
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "runs finished: 4 of 9" in md


def _hand_stats(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = 12.706204736 * std / math.sqrt(n)  # t_{0.975, 1}: two seeds
    return mean, std, mean - half, mean + half


@pytest.mark.slow
def test_summary_and_paired_statistics_match_a_hand_computation(done):
    _, out, _ = done
    runs = list(csv.DictReader(open(out / "results" / "runs.csv")))
    loss = {(r["variant"], int(r["seed"]), int(r["R"])): float(r["loss"]) for r in runs}
    summary = {(r["variant"], r["R"], r["metric"]): r
               for r in csv.DictReader(open(out / "results" / "summary.csv"))}
    for v in ("vanilla", "da"):
        for R in (1, 2, 3):
            mean, std, lo, hi = _hand_stats([loss[(v, 0, R)], loss[(v, 1, R)]])
            row = summary[(v, str(R), "loss")]
            assert int(row["n"]) == 2
            assert float(row["mean"]) == pytest.approx(mean, rel=1e-5)
            assert float(row["std"]) == pytest.approx(std, rel=1e-4)
            assert float(row["min"]) == pytest.approx(min(loss[(v, 0, R)], loss[(v, 1, R)]),
                                                      rel=1e-5)
            assert float(row["ci95_low"]) == pytest.approx(lo, rel=1e-4, abs=1e-6)
            assert float(row["ci95_high"]) == pytest.approx(hi, rel=1e-4, abs=1e-6)
    paired = {(r["variant"], r["R"], r["metric"]): r
              for r in csv.DictReader(open(out / "results" / "paired.csv"))}
    for R in ("1", "2", "3", "trained"):
        r_ = 2 if R == "trained" else int(R)
        diffs = [loss[("da", s, r_)] - loss[("vanilla", s, r_)] for s in (0, 1)]
        mean, std, lo, hi = _hand_stats(diffs)
        row = paired[("da", R, "loss")]
        assert float(row["mean"]) == pytest.approx(mean, rel=1e-4, abs=1e-7)
        assert float(row["ci95_low"]) == pytest.approx(lo, rel=1e-4, abs=1e-6)
        assert float(row["ci95_high"]) == pytest.approx(hi, rel=1e-4, abs=1e-6)
    assert ("vanilla", "1", "loss") not in paired  # the reference has no difference to itself


@pytest.mark.slow
def test_markdown_table_and_figures_are_rendered(done):
    _, out, _ = done
    md = (out / "results" / "summary.md").read_text()
    lines = md.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| variant |"))
    assert lines[head] == ("| variant | trained R | R=1 | R=2 | R=3 | Δ vs vanilla at trained R "
                           "| train time (s) |")
    assert lines[head + 2].startswith("| vanilla | 2 | ") and "(reference)" in lines[head + 2]
    assert lines[head + 3].startswith("| da | 2 | ")
    summary = {(r["variant"], r["R"], r["metric"]): r
               for r in csv.DictReader(open(out / "results" / "summary.csv"))}
    s = summary[("da", "1", "loss")]
    assert (f"{float(s['mean']):.3f} ± {float(s['std']):.3f} ({float(s['min']):.3f}–"
            f"{float(s['max']):.3f})") in lines[head + 3]
    assert "Along training" in md and "| 3 |" in md and "| 6 |" in md  # the eval steps
    curves = list(csv.DictReader(open(out / "results" / "curves.csv")))
    assert {int(c["step"]) for c in curves} == {3, 6}
    for name in ("loss_vs_R.png", "curves.png", "gap_curves.png"):
        assert (out / "results" / name).stat().st_size > 1000


HARD = "difficulty: {knob: chain_len, levels: [4, 5], loops: [1, 3], n_samples: 16}"


@pytest.mark.slow
def test_a_difficulty_grid_added_later_scores_finished_runs_without_training(done, tmp_path):
    """The same study with a difficulty grid: its finished runs are scored on the harder
    splits (no training), the cells land in result.json, the paired differences match a hand
    computation, and a rerun has nothing left to do."""
    _, out, _ = done
    path = write_study(tmp_path / "hard.yaml", out, VARIANTS,
                       extra=f"results: {tmp_path / 'report'}\n{HARD}")
    runs = [out / v / f"seed{s}" for v in ("vanilla", "da") for s in (0, 1)]
    logs = [(d / "train.log").read_text() for d in runs]
    proc = study_here(path, "only=[vanilla,da]")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "4 to score on the difficulty grid" in proc.stdout
    assert [(d / "train.log").read_text() for d in runs] == logs  # nothing trained again
    loss = {}
    for d in runs:
        grid = json.loads((d / "result.json").read_text())["difficulty"]
        assert grid["settings"] == {"knob": "chain_len", "levels": [4, 5], "loops": [1, 3],
                                    "n_samples": 16, "batch_size": 64}
        assert {lv: set(by_r) for lv, by_r in grid["cells"].items()} == {
            "4": {"1", "3"}, "5": {"1", "3"}}
        loss[(d.parent.name, int(d.name[4:]))] = grid["cells"]["5"]["3"]["loss"]
    hard = list(csv.DictReader(open(tmp_path / "report" / "difficulty.csv")))
    assert len(hard) == 2 * 2 * 2 * 2  # (variant, seed, level, R)
    got = {(r["variant"], r["level"], r["R"]): r
           for r in csv.DictReader(open(tmp_path / "report" / "difficulty_paired.csv"))}
    mean, _, lo, hi = _hand_stats([loss[("da", s)] - loss[("vanilla", s)] for s in (0, 1)])
    assert float(got[("da", "5", "3")]["mean"]) == pytest.approx(mean, rel=1e-4, abs=1e-7)
    assert float(got[("da", "5", "3")]["ci95_low"]) == pytest.approx(lo, rel=1e-4, abs=1e-6)
    assert float(got[("da", "5", "3")]["ci95_high"]) == pytest.approx(hi, rel=1e-4, abs=1e-6)
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "Harder held-out splits (`chain_len`" in md and "| da | 5 | " in md
    assert (tmp_path / "report" / "difficulty_chain_len5.png").stat().st_size > 1000
    again = study_here(path, "only=[vanilla,da]", "dry_run=true")
    assert "4 runs (4 finished, 0 to resume, 0 to start, 0 with a bad config)" in again.stdout


@pytest.mark.parametrize("setting,fragment", [
    ("difficulty: {levels: [4]}", "levels and loops need a knob"),
    ("difficulty: {knob: chain_len, loops: [2]}", "needs levels=[...] and loops=[...] too"),
    ("difficulty: {knob: chain_len, levels: [4], loops: [0]}", "difficulty.loops must be >= 1"),
    ("difficulty: {knob: chain_len, levels: [4, 4], loops: [2]}", "must not repeat a value"),
    ("difficulty: {knob: chain_len, levels: [4], loops: [2], n_samples: 0}",
     "difficulty.n_samples and difficulty.batch_size must be >= 1"),
    ("metric: bits_per_byte\ndifficulty: {knob: chain_len, levels: [4], loops: [2]}",
     "metric=bits_per_byte has no harder split"),
])
def test_bad_difficulty_grids_are_one_line(tmp_path, setting, fragment):
    from looped.errors import ConfigError

    path = write_study(tmp_path / "s.yaml", tmp_path / "out", VARIANTS)
    path.write_text(path.read_text().replace("metric: loss\n", "") + setting + "\n")
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_study(path)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    variants = {"vanilla": ["model.depth_attention.enabled=false"]}
    longer = "extra: [train.steps=40, train.eval_every=4, train.log_every=1]"
    ref = write_study(tmp_path / "ref.yaml", tmp_path / "ref", variants, seeds=(0,), extra=longer)
    assert study_here(ref).returncode == 0
    path = write_study(tmp_path / "kill.yaml", tmp_path / "kill", variants, seeds=(0,),
                       extra=longer)
    proc = subprocess.Popen([sys.executable, "-m", "looped", "study", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run = tmp_path / "kill" / "vanilla" / "seed0"
    try:
        t0 = time.monotonic()
        while not (run / "ckpt" / "latest").is_file():
            assert time.monotonic() - t0 < 300 and proc.poll() is None
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the study and its training subprocess
        proc.wait()
    assert not (run / "result.json").exists()
    again = study_here(path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1 to resume" in again.stdout and "(resumed)" in again.stdout
    assert "resumed from" in (run / "train.log").read_text()
    got = json.loads((run / "result.json").read_text())
    want = json.loads((tmp_path / "ref" / "vanilla" / "seed0" / "result.json").read_text())
    assert got["eval"] == want["eval"]  # resume is exact, so the evaluation is too
    assert got["resumed"]
    curves = [c for c in csv.DictReader(open(tmp_path / "kill" / "results" / "curves.csv"))]
    assert [int(c["step"]) for c in curves] == list(range(4, 41, 4))  # each step once


@pytest.mark.slow
def test_submitit_debug_executor_runs_the_study(tmp_path):
    pytest.importorskip("submitit")
    path = write_study(tmp_path / "s.yaml", tmp_path / "out",
                       {"vanilla": ["model.depth_attention.enabled=false"], "da": []},
                       seeds=(0,))
    proc = study_here(path, "launcher=submitit_debug")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "submitted 2 job(s) through submitit (submitit_debug)" in proc.stdout
    for v in ("vanilla", "da"):
        assert (tmp_path / "out" / v / "seed0" / "result.json").is_file()


@pytest.mark.parametrize("args,fragment", [
    ([], "give a study file first"),
    (["missing.yaml"], "study file missing.yaml does not exist"),
    (["{study}", "seeds=[]"], "seeds must be a non-empty list"),
    (["{study}", "bogus=1"], "Key 'bogus' not in 'StudySpec'"),
    (["{study}", "reference=nope"], "reference 'nope' is not a variant"),
    (["{study}", "only=[nope]"], "only: unknown variant(s) nope"),
    (["{study}", "launcher=nope"], "unknown launcher 'nope'"),
    (["{study}", "extra=[seed=3]"], "the study sets seed, out_dir, name"),
    (["{study}", "grid.seed=[1,2]"], "grid axis 'seed': the study sets it itself"),
    (["{study}", "grid.task=[roots,roots]"], "grid axis 'task' repeats a value"),
    (["{study}", "seeds=[0,1"], "while parsing a flow sequence"),
    (["{study}", "launcher=submitit_debug", "slurm.parameters={bogus_key: 1}"], "bogus_key"),
])
def test_bad_study_input_is_one_line(tmp_path, args, fragment):
    from looped.tools.study.cli import main

    path = write_study(tmp_path / "s.yaml", tmp_path / "out", VARIANTS)
    proc = cli_in_process(main, [a.replace("{study}", str(path)) for a in args])
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_grid_expands_every_combination_into_its_own_directory(tmp_path):
    path = write_study(tmp_path / "s.yaml", tmp_path / "out", VARIANTS,
                       extra="grid: {task: [roots, chain], train.lr: [0.001]}")
    runs = expand(load_study(path, ["only=[da]"]))
    assert [(r.grid_label, r.seed) for r in runs] == [
        ("task=roots,train.lr=0.001", 0), ("task=roots,train.lr=0.001", 1),
        ("task=chain,train.lr=0.001", 0), ("task=chain,train.lr=0.001", 1)]
    assert runs[2].run_dir == str((tmp_path / "out" / "task=chain,train.lr=0.001" / "da" /
                                   "seed0").resolve())
    assert runs[2].overrides[-2:] == ("task=chain", "train.lr=0.001")
    assert runs[2].train_argv()[-4:] == ["seed=0", f"out_dir={Path(runs[2].run_dir).parent}",
                                         "name=seed0", "threads=1"]


def test_a_grid_value_brings_its_own_overrides(tmp_path):
    """Each task has its own knobs, so a grid over tasks sets each task's knobs with it."""
    path = write_study(tmp_path / "s.yaml", tmp_path / "out", VARIANTS,
                       extra="grid: {task: {roots: [task.chain_len=3], chain: [task.hops=2]}}")
    runs = expand(load_study(path, ["only=[da]", "seeds=[0]"]))
    assert [r.grid_label for r in runs] == ["task=roots", "task=chain"]
    assert runs[0].overrides[-2:] == ("task=roots", "task.chain_len=3")
    assert runs[1].overrides[-2:] == ("task=chain", "task.hops=2")
    assert [check_run_config(r) for r in runs] == [None, None]
    # the same knob in the base fits one task only: the other run is reported, in one line
    shared = write_study(tmp_path / "b.yaml", tmp_path / "out2", VARIANTS,
                         extra="grid: {task: [roots, chain]}", base_extra=["task.hops=2"])
    problems = [check_run_config(r) for r in expand(load_study(shared, ["only=[da]"]))]
    assert problems[0].startswith("unknown config key 'task.hops' (task 'roots' has knobs")


def test_t_quantiles_and_spread():
    for df, q in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)  # published t tables
    assert t_cdf(0.0, 5) == pytest.approx(0.5)
    assert t_cdf(-t_quantile(0.975, 7), 7) == pytest.approx(0.025, abs=1e-9)
    assert incomplete_beta(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-4)  # closed form
    s = spread([1.5, 2.5, 4.0])
    assert (s.mean, s.min, s.max) == (pytest.approx(8 / 3), 1.5, 4.0)
    assert s.std == pytest.approx(math.sqrt(((1.5 - 8 / 3) ** 2 + (2.5 - 8 / 3) ** 2 +
                                             (4 - 8 / 3) ** 2) / 2))
    assert s.ci_high - s.mean == pytest.approx(4.3027 * s.std / math.sqrt(3), rel=1e-4)
    one = spread([0.7])
    assert one.mean == 0.7 and math.isnan(one.std) and math.isnan(one.ci_low)


@pytest.mark.slow
def test_changed_overrides_are_refused_and_failed_runs_retried(tmp_path):
    first = {"vanilla": ["model.depth_attention.enabled=false"], "broken": ["model.vocab_size=4"]}
    path = write_study(tmp_path / "s.yaml", tmp_path / "out", first, seeds=(0,))
    assert study_here(path).returncode == 1
    assert (tmp_path / "out" / "broken" / "seed0" / "error.txt").is_file()
    # the same directories, now with vanilla changed and broken fixed
    second = {"vanilla": ["model.depth_attention.enabled=false", "train.lr=0.001"],
              "broken": []}
    write_study(path, tmp_path / "out", second, seeds=(0,))
    proc = study_here(path)
    assert proc.returncode == 1
    assert "FAILED vanilla/seed0" in proc.stdout and "other overrides" in proc.stdout
    assert "done   broken/seed0" in proc.stdout  # retried: its failed attempt left no checkpoint
    assert not (tmp_path / "out" / "broken" / "seed0" / "error.txt").exists()
    rows = list(csv.DictReader(open(tmp_path / "out" / "results" / "runs.csv")))
    assert {r["variant"] for r in rows} == {"broken"}  # the stale result is not reported


def test_paired_difference_pairs_only_shared_seeds(tmp_path):
    from looped.tools.study.aggregate import paired

    def row(variant, seed, acc):
        return {"grid": "", "variant": variant, "seed": seed, "R": 2, "trained_loop": 2,
                "accuracy": acc, "solved": math.nan, "loss": math.nan,
                "bits_per_byte": math.nan}

    rows = [row("ref", 0, 0.50), row("ref", 1, 0.60), row("ref", 2, 0.90),
            row("new", 0, 0.55), row("new", 1, 0.75)]  # seed 2 of "new" is missing
    spec = load_study(write_study(tmp_path / "s.yaml", tmp_path / "out",
                                  {"ref": [], "new": []}), ["reference=ref"])
    out = {(r["R"], r["metric"]): r for r in paired(rows, spec) if r["variant"] == "new"}
    d = out[(2, "accuracy")]
    assert d["n"] == 2 and d["mean"] == pytest.approx((0.05 + 0.15) / 2)
    half = 12.706204736 * math.sqrt((0.05 - 0.1) ** 2 + (0.15 - 0.1) ** 2) / math.sqrt(2)
    assert d["ci95_high"] == pytest.approx(0.1 + half)
    assert d["relative"] == pytest.approx(0.1 / 0.55)  # the reference's mean over seeds 0, 1
    assert out[("trained", "accuracy")]["mean"] == pytest.approx(0.1)


def test_runs_whose_trained_loop_is_not_evaluated_are_refused_up_front(tmp_path):
    path = write_study(tmp_path / "s.yaml", tmp_path / "out", VARIANTS)
    proc = study_here(path, "eval.loops=[1,3]", "only=[da]", "dry_run=true")
    assert "0 to start, 2 with a bad config" in proc.stdout
    assert "FAILED da/seed0: the study's eval.loops [1, 3] leave out this run's trained loop=2" \
        in proc.stdout


def test_extra_pairs_are_compared_like_the_reference(tmp_path):
    from looped.tools.study.aggregate import paired, report

    def row(variant, seed, bpb):
        return {"grid": "", "variant": variant, "seed": seed, "R": 1, "trained_loop": 1,
                "accuracy": math.nan, "solved": math.nan, "loss": math.nan,
                "bits_per_byte": bpb, "train_seconds": 1.0}

    rows = [row("ref", 0, 2.0), row("ref", 1, 2.2), row("a", 0, 1.9), row("a", 1, 2.0),
            row("b", 0, 1.7), row("b", 1, 2.0)]
    spec = load_study(write_study(tmp_path / "s.yaml", tmp_path / "out",
                                  {"ref": [], "a": [], "b": []},
                                  extra="pairs: [[b, a]]"), ["reference=ref", "metric=loss"])
    got = {(r["variant"], r["reference"], r["R"]): r for r in paired(rows, spec)
           if r["metric"] == "bits_per_byte"}
    assert got[("b", "a", 1)]["mean"] == pytest.approx(((1.7 - 1.9) + (2.0 - 2.0)) / 2)
    assert got[("b", "ref", 1)]["mean"] == pytest.approx(((1.7 - 2.0) + (2.0 - 2.2)) / 2)
    spec.metric = "bits_per_byte"
    md = report(rows, [], spec, "cmd", {}, 6)
    assert "| b | a | -0.100 [" in md


@pytest.mark.parametrize("pairs", ["[[a, nope]]", "[[a]]"])
def test_bad_pairs_are_one_line(tmp_path, pairs):
    from looped.errors import ConfigError

    path = write_study(tmp_path / "s.yaml", tmp_path / "out", {"vanilla": [], "a": []},
                       extra=f"pairs: {pairs}")
    with pytest.raises(ConfigError, match="pairs: each entry is"):
        load_study(path)


def test_cache_bytes_per_token_follow_each_runs_attention(tmp_path):
    """GQA: 2 x n_kv_heads x head_dim per layer; MLA: kv_rank + rope_dim; fp32."""
    from looped import load_config
    from looped.training.checkpoint import save_run_config
    from looped.tools.study.aggregate import run_cache_bytes_per_token

    for name, extra, per_layer in (("gqa", [], 2 * 1 * 16),
                                   ("mla", ["model.attention=mla", "model.mla.kv_rank=12",
                                            "model.mla.rope_dim=4"], 12 + 4)):
        save_run_config(tmp_path / name, load_config([*BASE, *extra]))
        positions = 1 * 2  # the default one-layer core x loop 2 (CLI_TINY_MODEL)
        assert run_cache_bytes_per_token(tmp_path / name) == positions * per_layer * 4


def test_runs_recorded_under_a_renamed_key_still_count():
    """A study file updated for a renamed config key (train.loops -> train.loop_sampling) keeps
    the runs finished before the rename: recorded overrides are read in today's keys. A changed
    value is still a change."""
    from looped.tools.study.runner import same_settings, settings
    from looped.tools.study.spec import RunSpec

    run = RunSpec("v", 0, (), ("train.loop_sampling.sampler=fixed", "loop=2"), "unused", 1,
                  (1, 2), 16, 8)
    recorded = {**settings(run), "overrides": ["train.loops.sampler=fixed", "loop=2"]}
    assert same_settings(recorded, run)
    assert not same_settings({**recorded, "overrides": ["train.loops.sampler=uniform",
                                                        "loop=2"]}, run)
    assert not same_settings({**recorded, "seed": 1}, run)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "study").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_study_file_of_the_project_resolves(path, monkeypatch):
    """A study file whose variant no longer resolves (a renamed key, a removed policy) fails
    here, not hours into its run."""
    monkeypatch.chdir(ROOT)
    runs = expand(load_study(str(path)))
    assert runs
    first = runs[0].seed  # the seed changes no config key: one seed's runs are every variant
    problems = {run.key: check_run_config(run) for run in runs if run.seed == first}
    assert not any(problems.values()), problems


def test_a_grid_scored_with_other_settings_is_left_out_of_the_report(tmp_path):
    """A run's difficulty cells count only if they were scored with the study's grid now: a
    changed grid reports nothing for the run (and lists it "to score") until it is scored again."""
    from looped.tools.study.difficulty_report import collect_difficulty
    from looped.tools.study.runner import run_state, settings

    path = write_study(tmp_path / "s.yaml", tmp_path / "out", {"vanilla": []}, seeds=(0,),
                       extra=HARD)
    (run,) = expand(load_study(path))
    cells = {"4": {"1": {"accuracy": 0.5, "solved": 0.25, "loss": 1.0, "iterations": 1.0}}}
    d = Path(run.run_dir)
    d.mkdir(parents=True)
    for grid, state, n_rows in ((run.difficulty.settings(), "finished", 1),
                                ({**run.difficulty.settings(), "levels": [4]}, "to score", 0)):
        result = {"settings": settings(run), "trained_loop": 2, "eval": {}, "train_seconds": 1,
                  "resumed": False, "difficulty": {"settings": grid, "cells": cells}}
        (d / "result.json").write_text(json.dumps(result))
        assert run_state(run) == state
        assert len(collect_difficulty([run])) == n_rows


def test_runs_recorded_before_recipes_count_for_the_roots_staircase_recipe():
    """A result recorded before recipes existed was made on the defaults of its day, which are
    recipe=roots_staircase now: it counts for a study file that names that recipe, and not for
    one on today's defaults (the prefix-sums main job)."""
    from types import SimpleNamespace

    from looped.tools.study.runner import same_settings, settings

    def run(*overrides):
        return SimpleNamespace(overrides=list(overrides), seed=1, eval_loops=[1, 2],
                               eval_n_samples=8, eval_batch_size=0)

    legacy = {k: v for k, v in settings(run("loop=8")).items() if k != "recipe"}
    assert same_settings(legacy, run("recipe=roots_staircase", "loop=8"))
    assert not same_settings(legacy, run("loop=8"))
    today = settings(run("loop=8"))
    assert same_settings(today, run("loop=8"))
    assert not same_settings(today, run("recipe=roots_staircase", "loop=8"))
    assert not same_settings({**legacy, "seed": 2}, run("recipe=roots_staircase", "loop=8"))
