"""A study's difficulty grid across its runs (looped.tools.study.difficulty): per level and R,
each variant's mean over seeds and its paired difference to the reference.

Written to the study's `results` directory beside the rest of the report:
    difficulty.csv           one row per (run, level, R): accuracy, solved, loss, iterations
    difficulty_summary.csv   per (grid point, variant, level, R): the spread over seeds
    difficulty_paired.csv    per (grid point, variant, level, R): value - reference by seed
    [<grid point>_]difficulty_<knob><level>.png   the metric against R, a band per variant
and a section of summary.md (`report_lines`).
"""

from __future__ import annotations

from pathlib import Path

from looped.tools.plots import plot_bands
from looped.tools.study.difficulty import difficulty_rows, is_scored
from looped.tools.study.runner import finished_result
from looped.tools.study.spec import RunSpec, StudySpec, comparisons
from looped.tools.study.stats import spread
from looped.tools.study.tables import by_seed, cell, diff_cell, paired_or_none, spread_cols


def collect_difficulty(runs: list[RunSpec]) -> list[dict]:
    """The grid's rows of every finished run scored with the study's grid (a grid made with
    other settings is left out until the run is scored again)."""
    rows = []
    for run in runs:
        result = finished_result(run)
        if result is None or run.difficulty is None or not is_scored(result, run.difficulty):
            continue
        rows += difficulty_rows(result, {"grid": run.grid_label, "variant": run.variant,
                                         "seed": run.seed})
    return rows


def summary_rows(rows: list[dict], spec: StudySpec) -> list[dict]:
    table = by_seed(rows, spec.metric, "grid", "variant", "level", "R")
    return [{"grid": g, "variant": v, "level": lv, "R": r, "metric": spec.metric,
             **spread_cols(spread(list(vals.values())))}
            for (g, v, lv, r), vals in table.items()]


def paired_rows(rows: list[dict], spec: StudySpec) -> list[dict]:
    table = by_seed(rows, spec.metric, "grid", "variant", "level", "R")
    pairs = comparisons(spec)
    out = []
    for (g, v, lv, r), vals in table.items():
        for baseline in (b for a, b in pairs if a == v):
            s = paired_or_none(vals, table.get((g, baseline, lv, r)))
            if s is not None:
                out.append({"grid": g, "variant": v, "reference": baseline, "level": lv, "R": r,
                            "metric": spec.metric, **spread_cols(s)})
    return out


def report_lines(rows: list[dict], spec: StudySpec, grid: str) -> list[str]:
    """The markdown section of one grid point: the metric's spread over seeds, then the paired
    difference to the reference, per variant and level, with a column per R."""
    mine = [r for r in rows if r["grid"] == grid]
    if not mine:
        return []
    m, knob, n = spec.metric, spec.difficulty.knob, len(spec.seeds)
    table = by_seed(mine, m, "variant", "level", "R")
    variants = list(dict.fromkeys(r["variant"] for r in mine))
    levels = sorted({r["level"] for r in mine})
    loops = sorted({r["R"] for r in mine})
    head = f"| variant | {knob} | " + " | ".join(f"R={r}" for r in loops) + " |"
    rule = "|---|---:|" + "---:|" * len(loops)
    spreads, diffs = [head, rule], [head, rule]
    for v in variants:
        for lv in levels:
            spreads.append(f"| {v} | {lv} | " + " | ".join(
                cell(spread(list(table[(v, lv, r)].values())), n) if (v, lv, r) in table else ""
                for r in loops) + " |")
            if v == spec.reference:
                continue
            pairs = [paired_or_none(table.get((v, lv, r)), table.get((spec.reference, lv, r)))
                     for r in loops]
            diffs.append(f"| {v} | {lv} | " + " | ".join(
                diff_cell(s, n) if s is not None else "" for s in pairs) + " |")
    return [f"Harder held-out splits (`{knob}` at each level; trained: the run's own "
            f"task.{knob}), `{m}` at each R, mean ± std over seeds (min–max):", "", *spreads,
            "", f"The same, value − `{spec.reference}` paired by seed, mean [95% interval]:",
            "", *diffs]


def figures(rows: list[dict], spec: StudySpec, out: Path) -> list[Path]:
    made = []
    m, knob = spec.metric, spec.difficulty.knob
    for grid in dict.fromkeys(r["grid"] for r in rows):
        prefix = f"{grid}_" if grid else ""
        mine = [r for r in rows if r["grid"] == grid]
        for level in sorted({r["level"] for r in mine}):
            bands: dict[str, dict[int, list[float]]] = {}
            for (v, r), vals in by_seed([r for r in mine if r["level"] == level], m, "variant",
                                        "R").items():
                bands.setdefault(v, {})[r] = list(vals.values())
            made.append(plot_bands(bands, out / f"{prefix}difficulty_{knob}{level}.png",
                                   xlabel="loop count R", ylabel=f"held-out {m}", log2_x=True,
                                   title=f"{spec.name}: {knob}={level} (band: min–max over "
                                         f"seeds)"))
    return made
