"""Test-only entry point: `python tests/faulty_train.py <train.py arguments>` runs train.py's
main with faults injected from the environment, so production code carries no test hooks.

    LOOPED_TEST_NAN_AT_STEP=N     the loss of optimizer step N (1-based) becomes NaN
    LOOPED_TEST_PAUSE_IN_SAVE=N   the checkpoint of step N stops after its files are written and
                                  fsynced, before the rename that publishes it, and marks its
                                  temporary directory with a PAUSED file (to be killed there)
    LOOPED_TEST_KILL_IN_ASYNC_SAVE=N  the process SIGKILLs itself as soon as the asynchronous
                                  (sharded) checkpoint of step N has started writing
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import looped.training.checkpoint as checkpoint  # noqa: E402
import looped.training.trainer as trainer  # noqa: E402
from looped.errors import cli_main  # noqa: E402
from looped.tools.train import main  # noqa: E402

NAN_AT = "LOOPED_TEST_NAN_AT_STEP"
PAUSE_AT = "LOOPED_TEST_PAUSE_IN_SAVE"
KILL_IN_ASYNC = "LOOPED_TEST_KILL_IN_ASYNC_SAVE"
PAUSE_S = 600


def poison_loss_at(step: int, patch=setattr) -> None:
    """`patch`: setattr in this script; a test in its own process passes monkeypatch.setattr,
    which undoes the patch after it."""
    original_step, original_build = trainer.Trainer.train_step, trainer.build_objective
    current = {"step": 0}

    def train_step(self):
        current["step"] = self.step + 1  # the step this call computes
        return original_step(self)

    def build_objective(cfg):
        objective = original_build(cfg)

        def poisoned(s):
            loss = objective(s)
            return loss * float("nan") if current["step"] == step else loss
        return poisoned

    patch(trainer.Trainer, "train_step", train_step)
    patch(trainer, "build_objective", build_objective)


class _PausingOs:
    """The os module as looped.training.checkpoint sees it, with a replace() that holds still before
    publishing the checkpoint of one step."""

    def __init__(self, step: int):
        self.name = f"step_{step:08d}"

    def __getattr__(self, attr):
        return getattr(os, attr)

    def replace(self, src, dst):
        if Path(dst).name == self.name:
            (Path(src) / "PAUSED").touch()
            time.sleep(PAUSE_S)
        return os.replace(src, dst)


def kill_in_async_save(step: int) -> None:
    original = trainer.save_sharded

    def save_sharded(run_dir, at, *args, **kwargs):
        out = original(run_dir, at, *args, **kwargs)
        if at == step and kwargs.get("async_save"):
            os.kill(os.getpid(), signal.SIGKILL)  # the background write is in flight
        return out

    trainer.save_sharded = save_sharded


if __name__ == "__main__":
    if os.environ.get(KILL_IN_ASYNC):
        kill_in_async_save(int(os.environ[KILL_IN_ASYNC]))
    if os.environ.get(NAN_AT):
        poison_loss_at(int(os.environ[NAN_AT]))
    if os.environ.get(PAUSE_AT):
        checkpoint.os = _PausingOs(int(os.environ[PAUSE_AT]))
    cli_main(main, sys.argv[1:])
