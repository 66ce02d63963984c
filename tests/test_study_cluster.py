"""The study runner on clusters: a run of several processes (slurm.nodes x one task per GPU)
trains in-process in every task of one submitit job, data-parallel, exactly as the same run on
one process does (here submitit's local executor, 2 CPU tasks, gloo); the job knobs fail with one
line; and the paper-scale recipe (configs/study/paper_360m.yaml) resolves for every run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from looped.errors import ConfigError
from looped.tools.study.launchers import run_submitit
from looped.tools.study.spec import check_run_config, expand, load_study, world_size
from test_distributed import TINY, close, printed_losses

ROOT = Path(__file__).resolve().parent.parent
BASE = [o for o in TINY if not o.startswith("threads=")]  # the study sets threads itself
PAPER = ROOT / "configs" / "study" / "paper_360m.yaml"


def write_study(path: Path, out: Path, slurm: str = "{}", launcher: str = "local",
                variants: str = "{dp: []}") -> Path:
    path.write_text("\n".join([
        "description: one tiny run", f"base: [{', '.join(repr(o) for o in BASE)}]",
        f"variants: {variants}", "seeds: [0]", "metric: loss",
        "eval: {loops: [3], n_samples: 16}", f"launcher: {launcher}", f"slurm: {slurm}",
        f"out: {out}"]) + "\n")
    return path


def study(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "looped", "study", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def final_state(run_dir: Path) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    """The loss history and the weights of a run's last checkpoint (step 4)."""
    last = run_dir / "ckpt" / "step_00000004"
    history = {h["step"]: h["loss"] for h in torch.load(last / "state.pt")["history"]}
    return history, load_file(last / "model.safetensors")


@pytest.mark.slow
def test_a_run_of_two_submitit_tasks_trains_as_one_process(tmp_path):
    pytest.importorskip("submitit")
    path = write_study(tmp_path / "s.yaml", tmp_path / "out", "{tasks_per_node: 2}",
                       launcher="submitit_local",
                       variants="{ddp: [], hsdp: [train.parallel=hsdp]}")
    proc = study(path)
    assert "submitted 2 job(s) through submitit (submitit_local), 2 processes each" in proc.stdout
    runs = {r.variant: r for r in expand(load_study(path))}
    # the same run on one process, as the local launcher would start it
    ref = tmp_path / "ref"
    one = subprocess.run([sys.executable, "-m", "looped", "train", *runs["ddp"].train_argv(),
                          f"out_dir={ref}", "name=one"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    ref_losses = printed_losses(one.stdout)
    ref_history, ref_w = final_state(ref / "one")
    for variant, run in runs.items():
        d = Path(run.run_dir)
        log = (d / "train.log").read_text()
        assert f"data parallel: {variant} on 2 processes, 4 of the 8 rows" in log
        assert json.loads((d / "result.json").read_text())["eval"]["3"]["loss"] > 0
        losses = printed_losses(log)  # rank 0's, each step once
        assert sorted(losses) == sorted(ref_losses) == [1, 2, 3, 4]
        assert all(close(losses[s], ref_losses[s]) for s in losses), (losses, ref_losses)
        history, w = final_state(d)
        assert all(close(history[s], ref_history[s]) for s in ref_history), (history, ref_history)
        assert w.keys() == ref_w.keys()
        # rounding moves weights by ~2e-6 (DDP), ~4e-5 (FSDP2); a wrong gradient by ~lr = 1e-2
        assert max((w[k] - ref_w[k]).abs().max().item() for k in w) < 5e-4
        assert len(list((d / "tb").iterdir())) == 1, "only rank 0 writes TensorBoard"
    # every job ran 2 tasks; rank 1 printed nothing of the training
    rank1 = sorted((tmp_path / "out" / ".submitit").rglob("*_1_log.out"))
    assert len(rank1) == 2
    assert not any(line.startswith("step ") for f in rank1 for line in f.read_text().splitlines())
    # an interrupted run (a checkpoint, no result): rank 0 tells rank 1 to resume it
    d = Path(runs["ddp"].run_dir)
    (d / "result.json").unlink()
    proc = study(path, "only=[ddp]")
    assert "done   ddp/seed0 (resumed)" in proc.stdout
    assert (d / "train.log").read_text().count("resumed from") == 1


@pytest.mark.parametrize("args,fragment", [
    (["slurm.nodes=0"], "slurm.nodes must be >= 1, got 0"),
    (["slurm.gpus_per_node=-1"], "slurm.gpus_per_node must be >= 1 for a GPU job"),
    (["slurm.tasks_per_node=-2"], "slurm.tasks_per_node must be >= 1"),
    (["slurm.gpus_per_node=8", "slurm.tasks_per_node=4"], "one process per GPU"),
    (["launcher=local", "slurm.gpus_per_node=2"], "launcher=local trains each run in one"),
    (["launcher=submitit_local", "slurm.nodes=2"], "slurm.nodes=2 needs launcher=slurm"),
    (["launcher=submitit_debug", "slurm.tasks_per_node=2"], "use launcher=submitit_local"),
])
def test_bad_job_knobs_are_one_line(tmp_path, args, fragment):
    path = write_study(tmp_path / "s.yaml", tmp_path / "out", launcher="slurm")
    with pytest.raises(ConfigError, match=fragment) as e:
        load_study(path, args)
    assert "\n" not in str(e.value)


def test_bad_job_knob_on_the_command_line_exits_2_with_one_line(tmp_path):
    path = write_study(tmp_path / "s.yaml", tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "looped", "study", str(path), "launcher=slurm",
                           "slurm.nodes=0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "slurm.nodes must be >= 1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_world_size_is_nodes_times_one_task_per_gpu(tmp_path):
    path = write_study(tmp_path / "s.yaml", tmp_path / "out", launcher="slurm")
    assert world_size(load_study(path)) == 1
    assert world_size(load_study(path, ["slurm.gpus_per_node=1"])) == 1
    assert world_size(load_study(path, ["slurm.nodes=4", "slurm.gpus_per_node=8"])) == 32
    assert world_size(load_study(path, ["slurm.nodes=2", "slurm.tasks_per_node=3"])) == 6


def test_run_configs_are_checked_against_the_job(tmp_path):
    path = write_study(tmp_path / "s.yaml", tmp_path / "out", launcher="slurm")
    (run,) = expand(load_study(path, ["slurm.tasks_per_node=3"]))
    assert "train.batch_size=8 is the global batch and must be divisible by the run's 3 " \
           "processes" in check_run_config(run)
    (run,) = expand(load_study(path, ["slurm.gpus_per_node=2", "extra=[device=cpu]"]))
    assert "device=cpu, but the run's job asks for slurm.gpus_per_node=2" in \
           check_run_config(run)
    (run,) = expand(load_study(path, ["extra=[train.parallel=zero]"]))
    assert "unknown train.parallel 'zero'" in check_run_config(run)


def test_missing_submitit_is_one_line(tmp_path, monkeypatch):
    spec = load_study(write_study(tmp_path / "s.yaml", tmp_path / "out", launcher="slurm"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "submitit" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'looped\[slurm\]'"):
        run_submitit(expand(spec), spec, lambda status: None)


def test_paper_recipe_resolves_for_every_run():
    spec = load_study(PAPER)
    runs = expand(spec)
    assert spec.launcher == "slurm" and world_size(spec) == 16
    assert sorted({r.variant for r in runs}) == ["depth_attention", "vanilla"]
    assert sorted({r.seed for r in runs}) == [0, 1, 2] and len(runs) == 6
    assert all(check_run_config(r) is None for r in runs), [check_run_config(r) for r in runs]
