"""One run of a study: train (or resume, or skip), then the `looped eval` sweep.

A run directory holds, besides what train.py writes:
    study_run.json   what the run is (overrides, seed) and the wall time of each training attempt
    train.log        the training subprocess's output (appended on every attempt)
    eval/            `looped eval`'s loop_sweep.csv / .json / .png
    difficulty/      the study's difficulty grid, if it has one (looped.tools.study.difficulty)
    result.json      written last: the run is finished, and a rerun of the study skips it as
                     long as it was made with the same overrides and evaluation settings; the
                     difficulty grid is added to it afterwards, and scored again (without
                     training) when the study's grid changes
    error.txt        the one-line reason of the last failed attempt (removed on success)
    .lock            held while a process works on the run

`run_one` never raises: it returns a RunStatus, so one bad run does not stop the others. It is a
plain function of a picklable RunSpec, so submitit can ship it to a cluster. `run_one_distributed`
is what each task of a multi-process job (slurm.nodes x one task per GPU) runs instead: all tasks
train the run in-process, data-parallel, and rank 0 alone does the rest of what `run_one` does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from looped.training.checkpoint import CKPT_DIR, LATEST
from looped.config import RECIPE, load_config, named_recipes, renamed_override
from looped.errors import EXIT_BAD_INPUT, LoopedError
from looped.training.distributed import DistEnv
from looped.training.scoring import eval_loops
from looped.tools.study.difficulty import difficulty_command, is_scored, read_cells
from looped.tools.study.spec import RunSpec

RESULT = "result.json"
RECORD = "study_run.json"
ERROR = "error.txt"
LOCK = ".lock"
# the torchrun variables a task of a multi-process job trains under (run_one_distributed)
TORCH_ENVIRON = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                 "LOCAL_WORLD_SIZE")


@dataclass
class RunStatus:
    run: RunSpec
    state: str  # finished | skipped (finished earlier) | failed
    error: Optional[str] = None
    resumed: bool = False
    result: dict = field(default_factory=dict)


# The defaults every run recorded before recipes existed was made on: they are this recipe now.
LEGACY_RECIPE = "roots_staircase"


def settings(run: RunSpec) -> dict:
    """What a finished result must have been made with to count for this run. `recipe`: the
    defaults under its overrides (configs/defaults.yaml, or the recipe= it names)."""
    return {"overrides": list(run.overrides), "seed": run.seed,
            "eval_loops": list(run.eval_loops), "eval_n_samples": run.eval_n_samples,
            "eval_batch_size": run.eval_batch_size,
            "recipe": _named_recipe(run.overrides) or "defaults"}


def _named_recipe(overrides) -> Optional[str]:
    named = named_recipes(overrides)
    return named[-1] if named else None


def _comparable(recorded: dict) -> dict:
    """Settings in today's terms: overrides in today's keys (a study file updated for a renamed
    key keeps the runs made before the rename), and the recipe apart from them (a record without
    one was made on the defaults of its day, LEGACY_RECIPE)."""
    overrides = [renamed_override(o) for o in recorded.get("overrides", [])]
    recipe = _named_recipe(overrides) or recorded.get("recipe", LEGACY_RECIPE)
    return {**recorded, "recipe": recipe,
            "overrides": [o for o in overrides if o.split("=", 1)[0] != RECIPE]}


def same_settings(recorded: Optional[dict], run: RunSpec) -> bool:
    """Whether settings recorded with a run are this run's (see _comparable)."""
    if not isinstance(recorded, dict):
        return False
    return _comparable(recorded) == _comparable(settings(run))


def read_json(path: Path) -> Optional[dict]:
    """A JSON file's content, or None if it is missing or unreadable (e.g. cut by a kill)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finished_result(run: RunSpec) -> Optional[dict]:
    """The run's result if it finished with this run's settings, else None."""
    result = read_json(Path(run.run_dir) / RESULT)
    if result is None or not same_settings(result.get("settings"), run):
        return None
    return result


def run_state(run: RunSpec) -> str:
    """finished | to score (finished, without the study's difficulty grid) | stale (finished
    with other settings) | interrupted (has a checkpoint) | failed (last attempt) | new."""
    d = Path(run.run_dir)
    if (d / RESULT).is_file():
        result = finished_result(run)
        if result is None:
            return "stale"
        return "finished" if is_scored(result, run.difficulty) else "to score"
    if (d / CKPT_DIR / LATEST).is_file():
        return "interrupted"
    if (d / ERROR).is_file():
        return "failed"
    return "new"


def _last_error(output: str, code: int) -> str:
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    line = errors[-1][len("error:"):].strip() if errors else (lines[-1] if lines else "")
    return f"{line} (exit code {code})" if line else f"exit code {code}"


def _run(cmd: list[str], log: Path, environ: Optional[dict[str, str]] = None
         ) -> tuple[int, str]:
    """Run a subprocess with its output appended to `log` as it goes (tail -f works); returns
    (exit code, what it wrote)."""
    with open(log, "a") as f:
        start = f.tell()
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=environ).returncode
    with open(log) as f:
        f.seek(start)
        return code, f.read()


# Trains a run: (train.py arguments, the log its output is appended to) -> (exit code, output).
Train = Callable[[list[str], Path], tuple[int, str]]


def train_subprocess(argv: list[str], log: Path) -> tuple[int, str]:
    return _run([sys.executable, "-m", "looped", "train", *argv], log)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)  # atomic: a reader sees the old file or the new one, never half of one


def run_one(run: RunSpec, train: Train = train_subprocess) -> RunStatus:
    """Train the run (resuming from its checkpoint if interrupted), evaluate it, record it."""
    d = Path(run.run_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with open(d / LOCK, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return RunStatus(run, "failed", error=f"another process is working on {d}")
            return _train_and_evaluate(run, d, train)
    except Exception as e:  # a bug or an OS error: report it with the run, keep the others
        return _fail(run, _one_line(e))


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _train_and_evaluate(run: RunSpec, d: Path, train: Train) -> RunStatus:
    if (d / RESULT).is_file():
        result = finished_result(run)
        if result is None:
            return _fail(run, f"{d} holds a finished run made with other overrides or "
                              f"evaluation settings than the study's now; move it away or give "
                              f"the study another out=")
        if is_scored(result, run.difficulty):
            return RunStatus(run, "skipped", result=result)
        return _score_difficulty(run, d, result, resumed=False)
    resumed = (d / CKPT_DIR / LATEST).is_file()
    record = read_json(d / RECORD)
    if record is None or (not same_settings(record.get("settings"), run) and not resumed):
        # new, or only failed attempts without a checkpoint: start afresh
        record = {"settings": settings(run), "attempt_seconds": []}
    elif not same_settings(record.get("settings"), run):
        return _fail(run, f"{d} holds a checkpoint of a run with other overrides than the "
                          f"study's now; move it away or give the study another out=")
    t0 = time.perf_counter()
    code, output = train([*run.train_argv(), *(["resume=true"] if resumed else [])],
                         d / "train.log")
    record["attempt_seconds"].append(round(time.perf_counter() - t0, 1))
    _write_json(d / RECORD, record)
    if code != 0:
        return _fail(run, _last_error(output, code), resumed)
    # default: the loop counts training scored (eval.loops, or its default for the run's loop)
    loops = run.eval_loops or eval_loops(load_config([*run.overrides, f"seed={run.seed}"]))
    cmd = [sys.executable, "-m", "looped", "eval", f"ckpt={d}", f"out={d / 'eval'}",
           f"n_samples={run.eval_n_samples}", f"batch_size={run.eval_batch_size}",
           f"threads={run.threads}", f"loops=[{','.join(map(str, loops))}]"]
    code, output = _run(cmd, d / "eval.log", _one_process_environ())
    if code != 0:
        return _fail(run, "evaluation: " + _last_error(output, code), resumed)
    (entry,) = json.loads((d / "eval" / "loop_sweep.json").read_text()).values()
    attempts = record["attempt_seconds"]
    result = {"variant": run.variant, "seed": run.seed, "grid": dict(run.grid),
              "settings": settings(run), "trained_loop": entry["trained_loop"],
              "eval": entry["results"], "train_seconds": sum(attempts),
              "attempts": len(attempts), "resumed": resumed or len(attempts) > 1}
    (d / ERROR).unlink(missing_ok=True)
    _write_json(d / RESULT, result)  # the run is finished exactly when result.json exists
    return _score_difficulty(run, d, result, resumed)


def _one_process_environ() -> dict[str, str]:
    """The environment for an evaluation: one process, also when rank 0 of a multi-process
    job starts it."""
    return {k: v for k, v in os.environ.items() if k not in TORCH_ENVIRON}


def _score_difficulty(run: RunSpec, d: Path, result: dict, resumed: bool) -> RunStatus:
    """Add the study's difficulty grid to a finished run's result (nothing to do without one).
    A failure here leaves the finished training and loop sweep in place."""
    if run.difficulty is None or is_scored(result, run.difficulty):
        return RunStatus(run, "finished", resumed=resumed, result=result)
    code, output = _run(difficulty_command(d, run.difficulty, run.threads), d / "eval.log",
                        _one_process_environ())
    if code != 0:
        return _fail(run, "difficulty grid: " + _last_error(output, code), resumed)
    result = {**result, "difficulty": {"settings": run.difficulty.settings(),
                                       "cells": read_cells(d)}}
    (d / ERROR).unlink(missing_ok=True)
    _write_json(d / RESULT, result)
    return RunStatus(run, "finished", resumed=resumed, result=result)


def _fail(run: RunSpec, message: str, resumed: bool = False) -> RunStatus:
    try:
        (Path(run.run_dir) / ERROR).write_text(message + "\n")
    except OSError:
        pass  # the status still carries the message
    return RunStatus(run, "failed", error=message, resumed=resumed)


# -- one run over several processes: what each task of its submitit job does -----------------

def run_one_distributed(run: RunSpec) -> Optional[RunStatus]:
    """Join the run's process group (every task of its job, on every node), then train the run
    in this process, data-parallel over all tasks. Rank 0 alone reads and writes the run
    directory: it decides (skip, resume, refuse) and tells the others, then trains with them,
    evaluates, and returns the RunStatus; the other ranks return None."""
    import torch.distributed as dist

    from looped.training.distributed import setup
    from looped.training.device import pick_device

    with _torch_environ() as env:
        try:
            cfg = load_config([*run.overrides, f"seed={run.seed}"])
            # gloo on CPU, nccl (and this rank's GPU) on CUDA, as the trainer would choose;
            # the trainer then finds the group formed
            setup(env, pick_device(cfg.device, env.local_rank if env.enabled else None))
        except Exception as e:  # the same on every rank: rank 0 reports it
            return _fail(run, str(e) if isinstance(e, LoopedError) else _one_line(e)) \
                if env.is_main else None
        try:
            # the others wait for rank 0's decision rather than read the directory it writes
            if not env.is_main:
                argv = _broadcast(None)
                if argv is not None:
                    _train_in_process(argv, env, None)
                return None
            trained = False

            def train(argv: list[str], log: Path) -> tuple[int, str]:
                nonlocal trained
                trained = True
                _broadcast(argv)
                return _train_in_process(argv, env, log)

            status = run_one(run, train)
            if not trained:  # skipped or refused: nothing for the others to train
                _broadcast(None)
            return status
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


@contextlib.contextmanager
def _torch_environ() -> Iterator[DistEnv]:
    """This task's torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR/PORT) from submitit's view of the job, set while the task trains (the process
    group reads them, train.parallel=hsdp its ranks per node) and restored after."""
    import submitit

    saved = {k: os.environ.get(k) for k in TORCH_ENVIRON}
    # set_cuda_visible_devices=False: every task keeps the node's GPUs and the trainer takes
    # cuda:LOCAL_RANK, as under torchrun. overwrite: a job submitted from inside another job's
    # shell inherits that job's variables.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                          overwrite=True)
    try:
        yield DistEnv.from_environ()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _broadcast(argv: Optional[list[str]]) -> Optional[list[str]]:
    """Rank 0's train.py arguments on every rank (None: nothing to train)."""
    import torch.distributed as dist

    box = [argv]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _train_in_process(argv: list[str], env: DistEnv, log: Optional[Path]) -> tuple[int, str]:
    """train.py's `run` in this process: rank 0's output appended to `log`, the other ranks'
    (errors only: they print nothing else) left in their job's own log. Leaves the process
    group at the end. Returns (exit code, output)."""
    from looped.tools.train import run as train

    stream = open(log, "a") if log else sys.stdout
    start = stream.tell() if log else 0
    code = 0
    try:
        print(f"$ looped train {shlex.join(argv)}  # in-process, rank {env.rank} of "
              f"{env.world_size}", file=stream, flush=True)
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            try:
                code = train(argv, env) or 0
            except LoopedError as e:
                print(f"error: {e}")
                code = getattr(e, "exit_code", EXIT_BAD_INPUT)
            except Exception as e:  # a bug, out of memory, a peer gone: the trace, then one line
                traceback.print_exc()
                print(f"error: {_one_line(e)}")
                code = 1
        stream.flush()
    finally:
        if log:
            stream.close()
    _leave_process_group(ok=code == 0)
    if not log:
        return code, ""
    with open(log) as f:
        f.seek(start)
        return code, f.read()


def _leave_process_group(ok: bool) -> None:
    """After a run's training: wait for every rank (unless a failure makes the ranks' paths
    differ, when some may never come), then leave."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()
