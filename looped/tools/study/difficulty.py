"""A study's difficulty grid: every finished run scored on harder held-out splits than it was
trained on, at more loop counts than it was trained with (`looped eval knob=K levels=[...]
loops=[...]`, looped.tools.difficulty_grid). The question of loop extrapolation: does a run
that is given more iterations solve harder instances?

    difficulty: {knob: length, levels: [32, 64, 128], loops: [32, 96, 192], n_samples: 256}

It is a stage after training and the loop sweep. Its cells go into the run's result.json under
"difficulty", with the settings they were scored with: a study file that gains a grid, or
changes one, scores its finished runs again without training them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from looped.tools.study.spec import DifficultySweep

DIFFICULTY_DIR = "difficulty"  # in a run directory: `looped eval`'s difficulty_grid.*
GRID_METRICS = ("accuracy", "solved", "loss", "iterations")  # what the grid scores per cell


def is_scored(result: dict, sweep: Optional[DifficultySweep]) -> bool:
    """Whether a finished run's result holds the study's grid (trivially, where it has none)."""
    if sweep is None:
        return True
    done = result.get("difficulty")
    return isinstance(done, dict) and done.get("settings") == sweep.settings()


def difficulty_command(run_dir: Path, sweep: DifficultySweep, threads: int) -> list[str]:
    return [sys.executable, "-m", "looped", "eval", f"ckpt={run_dir}",
            f"out={run_dir / DIFFICULTY_DIR}", f"knob={sweep.knob}",
            f"levels=[{','.join(map(str, sweep.levels))}]",
            f"loops=[{','.join(map(str, sweep.loops))}]", f"n_samples={sweep.n_samples}",
            f"batch_size={sweep.batch_size}", f"threads={threads}"]


def read_cells(run_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """level -> R -> metrics, as `looped eval` wrote them for the one run it scored."""
    (entry,) = json.loads((run_dir / DIFFICULTY_DIR / "difficulty_grid.json").read_text()).values()
    return entry["cells"]


def difficulty_rows(result: dict, base: dict) -> list[dict]:
    """One row per (level, R) of a run's grid, on top of `base` (its grid point, variant,
    seed); none if the run has no grid."""
    cells = (result.get("difficulty") or {}).get("cells", {})
    return [{**base, "level": int(level), "R": int(r),
             **{m: float(metrics[m]) for m in GRID_METRICS}}
            for level, by_r in cells.items() for r, metrics in by_r.items()]
