"""`looped eval ... knob=K levels=[...]`: held-out accuracy on a grid of loop counts x task
difficulties, the question of loop extrapolation (does more test-time R solve harder instances
than any trained?).

For every run and level, the run's task is built with task.eval.<K> = level (its other knobs as
trained) and scored at each R. Written to the output directory:

    difficulty_grid.csv    run, trained_loop, knob, trained_level, level, loops, accuracy,
                           solved, loss, mean_iterations (one row per cell)
    difficulty_grid.json   the same, nested by run, level and R
    difficulty_grid.md     per run and level: the best R, its score, and the overthinking drop
                           (the best score minus the score at the largest R scored)
    <run>_vs_loops.png     accuracy against R, one line per level (Deep Thinking's figure)
    <run>_heatmap.png      the grid as a heatmap

Runs of a study (<out>/<variant>/seed<k>) are named <variant>/seed<k>; where a variant has
several seeds, difficulty_grid.md also gives per variant the mean over seeds at every cell with
its min..max, and how many seeds reach a score of at least 0.9 at some R, and
<variant>_mean_vs_loops.png draws the mean with a min-max band.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from looped import build_model
from looped.config import load_run_config
from looped.training.checkpoint import load_weights, resolve_checkpoint, run_dir_of
from looped.model.exit import build_exit
from looped.training.device import pick_device
from looped.training.scoring import GRID_METRICS as METRICS, check_fits, level_task, score_grid
from looped.tools.plots import plot_bands, plot_heatmap, plot_metric_vs_loops

SOLVED_AT = 0.9  # a seed "reaches" a level when its best accuracy there is at least this


@dataclass
class GridRun:
    name: str
    trained_loop: int
    trained_level: object  # the knob's training value
    cells: dict[int, dict[int, dict[str, float]]]  # level -> R -> metrics

    @property
    def group(self) -> str:
        """The variant a study's seed run belongs to (its own name otherwise)."""
        return self.name.rpartition("/")[0] or self.name

    @property
    def file_stem(self) -> str:
        return self.name.replace("/", "_")


@dataclass
class LevelSummary:
    level: int
    best_loops: int
    best: float  # the score at best_loops
    at_trained: float | None  # the score at the trained R, where it was scored
    at_largest: float  # the score at the largest R scored
    largest_loops: int

    @property
    def overthinking_drop(self) -> float:
        return self.best - self.at_largest


def summarise(run: GridRun, metric: str = "accuracy") -> list[LevelSummary]:
    out = []
    for level, by_r in sorted(run.cells.items()):
        best_r = max(by_r, key=lambda r: (by_r[r][metric], -r))  # ties: the fewest iterations
        top = max(by_r)
        trained = by_r.get(run.trained_loop)
        out.append(LevelSummary(level, best_r, by_r[best_r][metric],
                                None if trained is None else trained[metric], by_r[top][metric],
                                top))
    return out


def grid_run(path: str, args) -> GridRun:
    ckpt = resolve_checkpoint(Path(path))
    run_dir = run_dir_of(ckpt)
    cfg = load_run_config(run_dir, args.config)
    tasks = {level: level_task(cfg.task, args.knob, level, f" of {run_dir.name}")
             for level in args.levels}
    for level, task in tasks.items():
        check_fits(task, cfg.model, f"{args.knob}={level} ({run_dir.name})")
    model = load_model(cfg, ckpt, args.device)

    def log(level, r, res):
        print(f"  {run_dir.name}  {args.knob}={level:<4d} R={r:3d}  accuracy "
              f"{res['accuracy']:.4f}  solved {res['solved']:.4f}", flush=True)

    cells = score_grid(model, tasks, model.runnable_loops(args.loops), args.n_samples,
                       args.batch_size, cfg.seed, exit=build_exit(cfg.exit), kv=args.kv, log=log)
    name = (f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name.startswith("seed")
            else run_dir.name)
    return GridRun(name, cfg.loop, cfg.task[args.knob], cells)


def seeded_groups(runs: list[GridRun]) -> dict[str, list[GridRun]]:
    """The variants with several runs (seeds), each with its runs."""
    groups: dict[str, list[GridRun]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return {g: members for g, members in groups.items() if len(members) > 1}


def seed_table(runs: list[GridRun], knob: str) -> list[str]:
    """Markdown: per variant with several runs, the mean (min..max) accuracy at each level and
    R, and the seeds reaching SOLVED_AT at some R."""
    lines = []
    for group, members in seeded_groups(runs).items():
        loops = sorted({r for m in members for by_r in m.cells.values() for r in by_r})
        lines += [f"## {group}: mean (min..max) over {len(members)} seeds", "",
                  f"| {knob} | " + " | ".join(f"R={r}" for r in loops) + " | seeds >= "
                  f"{SOLVED_AT} |", "|---" * (len(loops) + 2) + "|"]
        for level in sorted(members[0].cells):
            cells = []
            for r in loops:
                vals = [m.cells[level][r]["accuracy"] for m in members if r in m.cells[level]]
                cells.append(f"{sum(vals) / len(vals):.3f} ({min(vals):.2f}..{max(vals):.2f})"
                             if vals else "—")
            reach = sum(max(v["accuracy"] for v in m.cells[level].values()) >= SOLVED_AT
                        for m in members)
            lines.append(f"| {level} | " + " | ".join(cells) + f" | {reach}/{len(members)} |")
        lines.append("")
    return lines


def plot_seed_bands(runs: list[GridRun], knob: str, out: Path) -> list[Path]:
    figures = []
    for group, members in seeded_groups(runs).items():
        series = {f"{knob}={level}": {r: [m.cells[level][r]["accuracy"] for m in members
                                          if r in m.cells[level]]
                                      for r in members[0].cells[level]}
                  for level in sorted(members[0].cells)}
        figures.append(plot_bands(series, out / f"{group.replace('/', '_')}_mean_vs_loops.png",
                                  xlabel="loop count R (iterations of the core)",
                                  ylabel="held-out accuracy", log2_x=True,
                                  title=f"{group}: mean over {len(members)} seeds (band: "
                                        f"min-max)"))
    return figures


def write_grid(runs: list[GridRun], knob: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "difficulty_grid.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "trained_loop", "knob", "trained_level", "level", "loops", *METRICS])
        for run in runs:
            for level, by_r in run.cells.items():
                for r, v in by_r.items():
                    w.writerow([run.name, run.trained_loop, knob, run.trained_level, level, r,
                                *(f"{v[k]:.6f}" for k in METRICS)])
    (out / "difficulty_grid.json").write_text(json.dumps(
        {run.name: {"trained_loop": run.trained_loop, "knob": knob,
                    "trained_level": run.trained_level,
                    "cells": {str(lv): {str(r): v for r, v in by_r.items()}
                              for lv, by_r in run.cells.items()}} for run in runs},
        indent=2) + "\n")
    lines = [f"# Difficulty grid: {knob} x loop count R", ""]
    for run in runs:
        lines += [f"## {run.name} (trained at {knob}={run.trained_level}, R={run.trained_loop})",
                  "", f"| {knob} | best R | accuracy at best R | at trained R | at largest R "
                  "| overthinking drop |", "|---|---|---|---|---|---|"]
        for s in summarise(run):
            trained = "—" if s.at_trained is None else f"{s.at_trained:.3f}"
            lines.append(f"| {s.level} | {s.best_loops} | {s.best:.3f} | {trained} | "
                         f"{s.at_largest:.3f} (R={s.largest_loops}) | {s.overthinking_drop:.3f} |")
        lines.append("")
    lines += seed_table(runs, knob)
    (out / "difficulty_grid.md").write_text("\n".join(lines))
    figures = []
    for run in runs:
        curves = {f"{knob}={lv}": {r: v["accuracy"] for r, v in by_r.items()}
                  for lv, by_r in sorted(run.cells.items())}
        figures.append(plot_metric_vs_loops(curves, out / f"{run.file_stem}_vs_loops.png",
                                            trained_loop=run.trained_loop,
                                            title=f"{run.name}: held-out accuracy vs R"))
        figures.append(plot_heatmap({lv: {r: v["accuracy"] for r, v in by_r.items()}
                                     for lv, by_r in run.cells.items()},
                                    out / f"{run.file_stem}_heatmap.png", row_label=knob,
                                    title=f"{run.name} (trained {knob}={run.trained_level}, "
                                          f"R={run.trained_loop})"))
    return figures + plot_seed_bands(runs, knob, out)


def load_model(cfg, ckpt: Path, device: str):
    """A run's model with its checkpoint's weights, on the device asked for."""
    model = build_model(cfg)
    load_weights(model, ckpt)
    return model.to(pick_device(device))


def run_grid(args) -> int:
    runs = [grid_run(p, args) for p in args.ckpt]
    first = run_dir_of(resolve_checkpoint(Path(args.ckpt[0])))
    out = Path(args.out) if args.out else first / "eval"
    write_grid(runs, args.knob, out)
    print((out / "difficulty_grid.md").read_text())
    print(f"wrote {out / 'difficulty_grid.csv'}, difficulty_grid.json, difficulty_grid.md and "
          f"the figures in {out}")
    return 0
