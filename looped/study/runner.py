"""One run of a study: train (or resume, or skip), then the looped.evaluate sweep.

A run directory holds, besides what train.py writes:
    study_run.json   what the run is (overrides, seed) and the wall time of each training attempt
    train.log        the training subprocess's output (appended on every attempt)
    eval/            looped.evaluate's loop_sweep.csv / .json / .png
    result.json      written last: the run is finished, and a rerun of the study skips it
    error.txt        the one-line reason of the last failed attempt (removed on success)

`run_one` never raises for a failed run; it returns a RunStatus, so one bad variant does not stop
the others. It is a plain function of a picklable RunSpec, so submitit can ship it to a cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from looped.config import eval_loops, load_config
from looped.study.spec import RunSpec

RESULT = "result.json"
RECORD = "study_run.json"
ERROR = "error.txt"
LATEST = Path("ckpt") / "latest"


@dataclass
class RunStatus:
    run: RunSpec
    state: str  # finished | skipped (finished earlier) | failed
    error: Optional[str] = None
    resumed: bool = False
    result: dict = field(default_factory=dict)


def run_state(run: RunSpec) -> str:
    """finished | interrupted (has a checkpoint) | failed (last attempt) | new."""
    d = Path(run.run_dir)
    if (d / RESULT).is_file():
        return "finished"
    if (d / LATEST).is_file():
        return "interrupted"
    if (d / ERROR).is_file():
        return "failed"
    return "new"


def _last_error(output: str, code: int) -> str:
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    line = errors[-1][len("error:"):].strip() if errors else (lines[-1] if lines else "")
    return f"{line} (exit code {code})" if line else f"exit code {code}"


def _run(cmd: list[str], log: Path) -> tuple[int, str]:
    """Run a subprocess with its output appended to `log` as it goes (tail -f works); returns
    (exit code, what it wrote)."""
    with open(log, "a") as f:
        start = f.tell()
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    with open(log) as f:
        f.seek(start)
        return code, f.read()


def _load_record(d: Path, run: RunSpec) -> tuple[dict, Optional[str]]:
    record = {"variant": run.variant, "seed": run.seed, "grid": dict(run.grid),
              "overrides": list(run.overrides), "attempt_seconds": []}
    path = d / RECORD
    if not path.is_file():
        return record, None
    old = json.loads(path.read_text())
    if old.get("overrides") != record["overrides"] or old.get("seed") != run.seed:
        return old, (f"{d} holds a run with other overrides than the study's now; move it away "
                     f"or give the study another out=")
    return old, None


def run_one(run: RunSpec) -> RunStatus:
    """Train the run (resuming from its checkpoint if interrupted), evaluate it, record it."""
    d = Path(run.run_dir)
    if (d / RESULT).is_file():
        return RunStatus(run, "skipped", result=json.loads((d / RESULT).read_text()))
    d.mkdir(parents=True, exist_ok=True)
    record, conflict = _load_record(d, run)
    if conflict:
        return _fail(run, conflict)
    resumed = (d / LATEST).is_file()
    cmd = [sys.executable, "-m", "looped.train", *run.train_argv()]
    t0 = time.perf_counter()
    code, output = _run(cmd + (["resume=true"] if resumed else []), d / "train.log")
    record["attempt_seconds"].append(round(time.perf_counter() - t0, 1))
    (d / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    if code != 0:
        return _fail(run, _last_error(output, code), resumed)
    cmd = [sys.executable, "-m", "looped.evaluate", f"ckpt={d}", f"out={d / 'eval'}",
           f"n_samples={run.eval_n_samples}", f"batch_size={run.eval_batch_size}",
           f"threads={run.threads}"]
    # default: the loop counts training scored (eval.loops, or its default for the run's loop)
    loops = run.eval_loops or eval_loops(load_config([*run.overrides, f"seed={run.seed}"]))
    cmd.append(f"loops=[{','.join(map(str, loops))}]")
    code, output = _run(cmd, d / "eval.log")
    if code != 0:
        return _fail(run, "evaluation: " + _last_error(output, code), resumed)
    sweep = json.loads((d / "eval" / "loop_sweep.json").read_text())
    (entry,) = sweep.values()
    result = {"variant": run.variant, "seed": run.seed, "grid": dict(run.grid),
              "trained_loop": entry["trained_loop"], "eval": entry["results"],
              "train_seconds": sum(record["attempt_seconds"]),
              "attempts": len(record["attempt_seconds"]), "resumed": resumed or
              len(record["attempt_seconds"]) > 1}
    (d / ERROR).unlink(missing_ok=True)
    tmp = d / f".{RESULT}.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(d / RESULT)  # atomic: a run is finished exactly when result.json exists
    return RunStatus(run, "finished", resumed=resumed, result=result)


def _fail(run: RunSpec, message: str, resumed: bool = False) -> RunStatus:
    d = Path(run.run_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / ERROR).write_text(message + "\n")
    return RunStatus(run, "failed", error=message, resumed=resumed)


def status_dict(status: RunStatus) -> dict:
    return {**asdict(status), "run": asdict(status.run)}
