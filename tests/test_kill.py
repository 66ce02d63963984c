"""kill -9 at any moment, also in the middle of a checkpoint write, never corrupts the last good
checkpoint, and resuming continues bit-identically."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLI_TINY_MODEL, assert_same_checkpoint


ROOT = Path(__file__).resolve().parent.parent
PAUSE_HOOK = "LOOPED_TEST_PAUSE_IN_SAVE"  # read by tests/faulty_train.py
ARGS = CLI_TINY_MODEL + ["train.batch_size=8", "eval.n_samples=16", "eval.loops=[1,2]",
                         "train.steps=8", "train.eval_every=2", "train.log_every=1",
                         "train.loop_sampling.sampler=uniform"]


def losses(stdout: str) -> dict[int, float]:
    return {int(line.split()[1]): float(line.split()[3]) for line in stdout.splitlines()
            if line.startswith("step ")}


def train(*args, env=None):
    proc = subprocess.run([sys.executable, "train.py", *ARGS, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return losses(proc.stdout)


def start(*args, env=None):
    entry = "tests/faulty_train.py" if env else "train.py"
    return subprocess.Popen([sys.executable, entry, *ARGS, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_for(predicate, timeout=120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    losses = train(f"out_dir={out}", "name=ref")
    return losses, out / "ref" / "ckpt" / "step_00000008"


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_last_good_and_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = start(f"out_dir={tmp_path}", "name=run", env={PAUSE_HOOK: "6"})
    try:
        wait_for(lambda: any((run_dir / "ckpt").glob(".step_00000006.*/PAUSED")))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "ckpt" / "latest").read_text() == "step_00000004"  # the last good one
    resumed = train(f"out_dir={tmp_path}", "name=run", "resume=true")
    losses, final = reference
    assert sorted(resumed) == [5, 6, 7, 8]
    for step, loss in resumed.items():
        assert loss == losses[step], (step, loss, losses[step])
    assert_same_checkpoint(final, run_dir / "ckpt" / "step_00000008")


@pytest.mark.slow
def test_kill_during_training_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = start(f"out_dir={tmp_path}", "name=run")
    try:  # kill as soon as the first checkpoint exists, while training goes on
        wait_for(lambda: (run_dir / "ckpt" / "latest").is_file())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    latest = (run_dir / "ckpt" / "latest").read_text()
    done = int(latest.split("_")[1])
    assert done in (2, 4, 6)  # whichever was last complete when the kill landed
    resumed = train(f"out_dir={tmp_path}", "name=run", "resume=true")
    losses, final = reference
    assert sorted(resumed) == list(range(done + 1, 9))
    for step, loss in resumed.items():
        assert loss == losses[step], (step, loss, losses[step])
    assert_same_checkpoint(final, run_dir / "ckpt" / "step_00000008")


@pytest.mark.slow
def test_kill_during_an_async_sharded_save_keeps_the_previous_checkpoint(tmp_path, reference):
    run_dir = tmp_path / "run"
    sharded = ["train.checkpoint_format=sharded", "train.async_checkpoint=true"]
    proc = start(f"out_dir={tmp_path}", "name=run", *sharded,
                 env={"LOOPED_TEST_KILL_IN_ASYNC_SAVE": "6"})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    # step 4's save was published when step 6's began; step 6 never was
    assert (run_dir / "ckpt" / "latest").read_text() == "step_00000004"
    assert not (run_dir / "ckpt" / "step_00000006").exists()
    resumed = train(f"out_dir={tmp_path}", "name=run", "resume=true", *sharded)
    losses, _ = reference
    assert sorted(resumed) == [5, 6, 7, 8]
    for step, loss in resumed.items():  # sharded weights, optimizer and RNG restore exactly
        assert loss == losses[step], (step, loss, losses[step])
