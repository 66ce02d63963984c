"""Failure modes through the CLI: every bad input is one line on stderr and exit code 2; a NaN
stops the run (exit 3) and keeps the last good checkpoint. The cases run train.py's main in the
test's process (cli_in_process); one bad input goes through the script itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLI_TINY_MODEL, cli_in_process

from looped.tools.train import main as train_main


ROOT = Path(__file__).resolve().parent.parent
TINY = CLI_TINY_MODEL + ["train.batch_size=8", "eval.n_samples=16", "eval.loops=[1,2]",
                         "train.steps=2"]


def run(*args, module=None, timeout=300):
    """The real CLI: train.py, or `python -m <module>`."""
    cmd = [sys.executable, "-m", *module.split()] if module else [sys.executable, "train.py"]
    return subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    good = d / "good"
    proc = run(*TINY, f"out_dir={d}", "name=good")
    assert proc.returncode == 0, proc.stderr
    ckpt = good / "ckpt" / "step_00000002"
    trunc = d / "trunc"
    trunc.mkdir()
    data = (ckpt / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 3])
    (trunc / "state.pt").write_bytes((ckpt / "state.pt").read_bytes())
    return {"dir": d, "ckpt": ckpt, "trunc": trunc}


BAD_INPUTS = [  # (id, args, a fragment the error line must contain)
    ("unknown key", ["model.d_modl=64"], "did you mean model.d_model"),
    ("unknown top key", ["lop=3"], "did you mean loop"),
    ("wrong type", ["model.d_model=abc"], "model.d_model=abc"),
    ("loop zero", ["loop=0"], "loop must be >= 1"),
    ("negative lr", ["train.lr=-1e-3"], "train.lr must be > 0"),
    ("heads not divisible", ["model.n_heads=3", "model.n_kv_heads=2"], "divisible"),
    ("sequence too long", ["model.max_seq_len=16"], "max_seq_len"),
    ("missing data file", ["task=text", "model.vocab_size=256", "task.corpus={dir}/nope.txt"],
     "nope.txt"),
    ("empty data file", ["task=text", "model.vocab_size=256", "task.corpus={dir}/empty.txt"],
     "empty.txt"),
    ("unreadable data file", ["task=text", "model.vocab_size=256",
                              "task.corpus={dir}/bad.parquet"], "bad.parquet"),
    ("unknown task", ["task.name=sorting"], "choose one of"),
    ("unknown task preset", ["task=sorting"], "unknown task preset"),
    ("unknown kernel", ["model.kernel=flash"], "sdpa, eager, xformers"),
    ("unknown source policy", ["model.depth_attention.sources=all"], "same_layer"),
    ("unknown exit criterion", ["exit.criterion=halt"], "kl"),
    ("unknown loop sampler", ["train.loop_sampling.sampler=geometric"], "uniform"),
    ("unknown cross-layer method", ["model.cross_layer.method=densformer"], "denseformer"),
    ("other architecture", ["model.d_model=64", "resume_from={ckpt}"], "shape mismatch"),
    ("truncated checkpoint", ["resume_from={trunc}"], "truncated or corrupted"),
    ("missing checkpoint", ["resume_from={dir}/nowhere"], "does not exist"),
    ("xformers on cpu", ["model.kernel=xformers"], "sdpa"),
    ("cuda without gpu", ["device=cuda"], "no CUDA device"),
    ("resume without name", ["resume=true"], "name=<run>"),
    ("not key=value", ["loop"], "key=value"),
    ("gate without probe", ["exit.criterion=gate"], "exit_gate"),
    ("eval loops", ["eval.loops=[0,2]"], "eval.loops"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,args,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(files, tmp_path, name, args, fragment):
    if name == "xformers on cpu" and os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, ""):
        pytest.skip("a CUDA machine may run xformers")
    args = [a.format(dir=files["dir"], ckpt=files["ckpt"], trunc=files["trunc"]) for a in args]
    proc = cli_in_process(train_main, [*TINY, f"out_dir={tmp_path}", *args])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert fragment in lines[0]


def test_bad_input_through_train_py_is_one_line_and_exit_2(tmp_path):
    """The cases above run train.py's main in the test's process; here the script itself."""
    proc = run(*TINY, f"out_dir={tmp_path}", "model.d_modl=64")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "did you mean model.d_model" in lines[0], proc.stderr


def test_at_least_twenty_bad_inputs():
    assert len(BAD_INPUTS) >= 20


def test_evaluate_bad_inputs_are_one_line(tmp_path):
    for args in (["ckpt=/nowhere"], ["ckt=runs"], ["loops=[0]", "ckpt=/x"]):
        proc = run(*args, module="looped eval")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def train_with_nan_at(step: int, argv: list[str], monkeypatch):
    """train.py's main in this process with the loss of optimizer step `step` made NaN (as
    tests/faulty_train.py does in its own process), the patch undone after."""
    from faulty_train import poison_loss_at

    with monkeypatch.context() as m:
        poison_loss_at(step, patch=m.setattr)
        return cli_in_process(train_main, argv)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    args = [*TINY, "train.steps=6", "train.eval_every=2", f"out_dir={tmp_path}", "name=nan"]
    proc = train_with_nan_at(5, args, monkeypatch)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "at step 5" in lines[0] and "Traceback" not in proc.stderr
    ckpt = tmp_path / "nan" / "ckpt"
    assert (ckpt / "latest").read_text() == "step_00000004"
    assert "step_00000004" in lines[0]
    # the surviving checkpoint is intact and resumable
    resumed = cli_in_process(train_main, [*args, "name=after", f"resume_from={ckpt}"])
    assert resumed.returncode == 0, resumed.stderr


def test_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch):
    proc = train_with_nan_at(2, [*TINY, "train.steps=4", "train.log_every=1",
                                 "train.skip_nonfinite=true", f"out_dir={tmp_path}", "name=skip"],
                             monkeypatch)
    assert proc.returncode == 0, proc.stderr
    step_lines = [line for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(step_lines) == 4
    assert "skipped 1" in step_lines[1] and "skipped 1" in step_lines[3]
    assert "skipped" not in step_lines[0]
    # the count is saved with the checkpoint, so a resumed run keeps counting from it
    state = torch.load(tmp_path / "skip" / "ckpt" / "step_00000004" / "state.pt",
                       weights_only=True)
    assert state["skipped"] == 1
    more = cli_in_process(train_main, [*TINY, "train.steps=5", "train.log_every=1",
                                       "train.skip_nonfinite=true", f"out_dir={tmp_path}",
                                       "name=skip", "resume=true"])
    assert more.returncode == 0, more.stderr
    assert "skipped 1" in [ln for ln in more.stdout.splitlines() if ln.startswith("step")][0]
