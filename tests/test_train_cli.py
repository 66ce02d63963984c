"""The real CLI in a subprocess: a short run trains, and bad input exits 2 with one line (the
bad inputs through train.py's main in the test's process; tests/test_failures.py also sends one
through the script)."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_in_process

ROOT = Path(__file__).resolve().parent.parent


def run_train(*args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_short_run_trains_and_loss_drops(tmp_path):
    proc = run_train("loop=2", "train.steps=40", "train.log_every=20", "train.batch_size=32",
                     "threads=1", f"out_dir={tmp_path}", "name=run", "eval.n_samples=64",
                     "train.loop_sampling.sampler=fixed",
                     "eval.loops=[1,2]", "eval.grid.levels=[8,12]", "eval.grid.n_samples=16")
    assert proc.returncode == 0, proc.stderr
    losses = [float(line.split()[3]) for line in proc.stdout.splitlines()
              if line.startswith("step")]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert "held-out accuracy by loop count" in proc.stdout
    # the main job's difficulty x R grid: a row per level, a column per R, both metrics
    for title in ("whole answers solved", "accuracy"):
        head = f"held-out {title} by length (trained: 8) and loop count R (trained: 2):"
        table = proc.stdout.split(head)[1].strip().splitlines()
        assert table[0].split() == ["length", "R=1", "R=2"]
        assert [row.split()[0] for row in table[1:3]] == ["8", "12"]
        assert all(0 <= float(v) <= 1 for row in table[1:3] for v in row.split()[1:])
    run = tmp_path / "run"
    assert "| 12 |" in (run / "eval" / "difficulty_grid.md").read_text()
    for name in ("config.yaml", "meta.json", "accuracy_vs_loops.png", "ckpt/latest"):
        assert (run / name).is_file(), name
    assert list((run / "tb").iterdir()), "no TensorBoard events written"


@pytest.mark.parametrize("args", [
    ["model.d_modl=3"], ["loop=0"], ["model.kernel=xformers"], ["task.name=nope"],
    ["model.vocab_size=2"], ["eval.grid.knob=hops"], ["eval.grid.levels=[0]"],
    ["eval.grid.levels=[400]"], ["recipe=nope"],
])
def test_bad_input_exits_2_with_one_line(args, tmp_path):
    from looped.tools.train import main

    proc = cli_in_process(main, [*args, "train.steps=1", f"out_dir={tmp_path}"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """train.compile=true runs and gives the eager run's losses (fp32 on CPU), also where the
    loop counts change from call to call, as the progressive loss's do (a bug: dynamo made
    them symbolic at their second value, and the loop raised an internal error)."""
    common = ["loop=3", "train.steps=4", "train.log_every=1", "train.loop_sampling.sampler=fixed",
              "train.objective.loss=progressive",
              "train.batch_size=16", "threads=1", f"out_dir={tmp_path}", "eval.n_samples=16",
              "eval.loops=[3]"]
    import torch._dynamo

    from looped.tools.train import main

    losses = {}
    for flag in ("false", "true"):  # in this process: a subprocess each would add ~4 s of start
        torch._dynamo.reset()
        proc = cli_in_process(main, [*common, f"name=c{flag}", f"train.compile={flag}"])
        torch._dynamo.reset()
        assert proc.returncode == 0, proc.stderr
        losses[flag] = [float(line.split()[3]) for line in proc.stdout.splitlines()
                        if line.startswith("step")]
    assert len(losses["true"]) == 4
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_help_lists_every_key_with_its_default_and_help():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    keys = {ln.split("=")[0].strip(): ln for ln in lines if ln.startswith("  ") and "=" in ln}
    from looped.config import load_config
    from omegaconf import OmegaConf

    def leaves(node, prefix=""):
        for k, v in node.items():
            if OmegaConf.is_dict(v):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    for key, value in leaves(load_config([])):
        assert key in keys, key
        shown = keys[key].split("=", 1)[1].split()[0]
        plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        assert shown == ("null" if plain is None else str(plain).replace(" ", "")
                         if isinstance(plain, list) else str(plain))
        assert len(keys[key].split("=", 1)[1].split()) > 1, f"{key} has no help"  # one line each
    assert "  task=NAME" in proc.stdout and "roots" in keys["task.name"]
