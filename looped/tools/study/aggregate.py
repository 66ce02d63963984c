"""A study's results from its run directories: CSVs, a markdown report and figures.

Written to the study's `results` directory:
    runs.csv      one row per (run, R): every metric, the training wall time
    summary.csv   per (grid point, variant, R, metric): n, mean, std, min, max, 95% interval
    paired.csv    per (grid point, variant, R): value - reference over shared seeds, 95% interval
    curves.csv    the learning curves: each run's held-out metric at its trained R by step
    difficulty*.csv, difficulty_*.png   the study's difficulty grid, if it has one
    summary.md    the tables the README quotes
    <grid point>metric_vs_R.png, <grid point>curves.png
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from looped.training.checkpoint import METRICS_FILE
from looped.tools.plots import plot_bands
from looped.tools.study import difficulty_report
from looped.tools.study.runner import ERROR, finished_result
from looped.tools.study.spec import METRICS, RunSpec, StudySpec, comparisons
from looped.tools.study.stats import paired_values, spread
from looped.tools.study.tables import (by_seed, cell, diff_cell, num, paired_or_none, spread_cols,
                                      write_csv)

TRAINED = "trained"  # the R column that means "each run at the R it was trained with"


def run_cache_bytes_per_token(run_dir: Path) -> int:
    """LoopedLM.cache_bytes_per_token of a run's model (fp32, at its trained loop count), from
    its config, built on the meta device."""
    import torch

    from looped import build_model
    from looped.config import load_run_config

    with torch.device("meta"):
        return build_model(load_run_config(run_dir)).cache_bytes_per_token()


def collect(runs: list[RunSpec], spec_cache: bool = False
            ) -> tuple[list[dict], list[dict], dict[str, str]]:
    """(rows: one per finished run and evaluated R, curves: one per run and step, the errors
    of failed runs). Results made with other settings than the run's are left out. With
    spec_cache, each row also carries the run's KV-cache bytes per token."""
    rows, curves, errors = [], [], {}
    for run in runs:
        d = Path(run.run_dir)
        result = finished_result(run)
        if result is None:
            if (d / ERROR).is_file():
                errors[run.key] = (d / ERROR).read_text().strip()
            continue
        base = {"grid": run.grid_label, "variant": run.variant, "seed": run.seed,
                "trained_loop": result["trained_loop"]}
        cache = {"cache_bytes": run_cache_bytes_per_token(d)} if spec_cache else {}
        for r, metrics in result["eval"].items():
            rows.append({**base, "R": int(r), **{m: num(metrics.get(m)) for m in METRICS},
                         "iterations": num(metrics.get("iterations")),
                         "train_seconds": result["train_seconds"],
                         "resumed": result["resumed"], **cache})
        curves.extend(_curve(d / METRICS_FILE, base))
    return rows, curves, errors


def _curve(path: Path, base: dict) -> list[dict]:
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # empty, or cut by a kill mid-write
            continue
        by_step[row["step"]] = row  # a resumed run may repeat a step: keep the last
    out = []
    for step, row in sorted(by_step.items()):
        metrics = row["eval"].get(str(base["trained_loop"]))
        if metrics is not None:
            self_w = list(row.get("depth_self_weight", {}).values())
            out.append({**base, "step": step, **{m: num(metrics.get(m)) for m in METRICS},
                        "train_loss": num(row.get("train_loss")),
                        "mean_self_weight": (sum(self_w) / len(self_w)) if self_w else math.nan})
    return out


def _with_trained(rows: list[dict]) -> list[dict]:
    """rows plus a copy of each run's row at its trained R, under R = TRAINED."""
    return rows + [{**r, "R": TRAINED} for r in rows if r["R"] == r["trained_loop"]]


def summarise(rows: list[dict], spec: StudySpec) -> list[dict]:
    out = []
    for metric in METRICS:
        for (grid, variant, R), vals in by_seed(rows, metric, "grid", "variant", "R").items():
            s = spread(list(vals.values()))
            out.append({"grid": grid, "variant": variant, "R": R, "metric": metric,
                        **spread_cols(s)})
    return out


def paired(rows: list[dict], spec: StudySpec) -> list[dict]:
    out = []
    for metric in METRICS:
        table = by_seed(_with_trained(rows), metric, "grid", "variant", "R")
        for grid, R in dict.fromkeys((g, r) for g, _, r in table):
            for variant, baseline in comparisons(spec):
                vals, ref = table.get((grid, variant, R)), table.get((grid, baseline, R))
                s = paired_or_none(vals, ref)
                if s is None:
                    continue
                ref_mean = statistics.fmean(ref[k] for k in set(vals) & set(ref))
                out.append({"grid": grid, "variant": variant, "reference": baseline, "R": R,
                            "metric": metric, **spread_cols(s),
                            "relative": s.mean / ref_mean if ref_mean else math.nan})
    return out


# -- markdown ----------------------------------------------------------------------------------


def report(rows: list[dict], curves: list[dict], spec: StudySpec, command: str,
           failed: dict[str, str], n_runs: int, hard: list[dict] = ()) -> str:
    """summary.md; `hard`: the rows of the difficulty grid (difficulty_report)."""
    m, better = spec.metric, METRICS[spec.metric]
    finished = len({(r["grid"], r["variant"], r["seed"]) for r in rows})
    lines = [f"# Study `{spec.name}`", "", spec.description.strip(), "",
             f"- command: `{command}`",
             f"- seeds: {list(spec.seeds)}; runs finished: {finished} of {n_runs}",
             f"- metric: `{m}` ({better} is better), held-out; cells: mean ± std over seeds "
             f"(min–max); differences: value − `{spec.reference}`, paired by seed, mean "
             f"[95% Student-t interval]", ""]
    grids = list(dict.fromkeys(r["grid"] for r in rows))
    for grid in grids:
        mine = [r for r in rows if r["grid"] == grid]
        if grid:
            lines += [f"## {grid}", ""]
        mine_curves = [c for c in curves if c["grid"] == grid]
        lines += _main_table(mine, spec) + [""] + _pairs_table(mine, spec) + [""]
        lines += _gap_table(mine_curves, spec) + [""]
        lines += _self_weight_table(mine_curves, len(spec.seeds)) + [""]
        lines += difficulty_report.report_lines(hard, spec, grid) + [""]
    if failed:
        lines += ["Failed runs:", ""] + [f"- `{k}`: {v}" for k, v in sorted(failed.items())]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _main_table(rows: list[dict], spec: StudySpec) -> list[str]:
    m, n = spec.metric, len(spec.seeds)
    all_r = sorted({r["R"] for r in rows})
    loops = [r for r in (spec.report_loops or all_r) if r in all_r]
    cells = by_seed(rows, m, "variant", "R")
    trained = by_seed(_with_trained(rows), m, "variant", "R")
    times = by_seed(rows, "train_seconds", "variant")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    head = ["variant", "trained R"] + [f"R={r}" for r in loops] + \
           [f"Δ vs {spec.reference} at trained R", "train time (s)"]
    cache = by_seed(rows, "cache_bytes", "variant") if spec.cache_bytes else {}
    if spec.cache_bytes:
        head.append("KV cache / token (fp32)")
    out = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for v in variants:
        trained_r = sorted({r["trained_loop"] for r in rows if r["variant"] == v})
        row = [v, ",".join(map(str, trained_r))]
        row += [cell(spread(list(cells[(v, r)].values())), n) if (v, r) in cells else ""
                for r in loops]
        diff = paired_or_none(trained.get((v, TRAINED)), trained.get((spec.reference, TRAINED)))
        row.append("(reference)" if v == spec.reference else
                   diff_cell(diff, n) if diff is not None else "")
        row.append(f"{spread(list(times[(v,)].values())).mean:.0f}" if (v,) in times else "")
        if spec.cache_bytes:
            row.append(f"{int(next(iter(cache[(v,)].values()))):,} B" if (v,) in cache else "")
        out.append("| " + " | ".join(row) + " |")
    return out


def _pairs_table(rows: list[dict], spec: StudySpec) -> list[str]:
    """The study's extra [variant, baseline] pairs, at each run's trained R."""
    if not spec.pairs:
        return []
    m, n = spec.metric, len(spec.seeds)
    trained = by_seed(_with_trained(rows), m, "variant", "R")
    out = [f"Paired comparisons (`{m}`, variant − baseline, paired by seed, at trained R):", "",
           "| variant | baseline | Δ |", "|---|---|---:|"]
    for variant, baseline in spec.pairs:
        diff = paired_or_none(trained.get((variant, TRAINED)), trained.get((baseline, TRAINED)))
        out.append(f"| {variant} | {baseline} | "
                   f"{diff_cell(diff, n) if diff is not None else ''} |")
    return out


def _gap_table(curves: list[dict], spec: StudySpec) -> list[str]:
    """The paired difference against the reference along training, at each run's trained R."""
    m = spec.metric
    table = by_seed(curves, m, "variant", "step")
    steps = sorted({c["step"] for c in curves})
    others = [v for v in dict.fromkeys(c["variant"] for c in curves) if v != spec.reference]
    if not steps or not others or not any((spec.reference, s) in table for s in steps):
        return []
    out = [f"Along training (`{m}` − `{spec.reference}`, at each run's trained R):", "",
           "| step | " + " | ".join(others) + " |", "|---:|" + "---:|" * len(others)]
    for step in steps:
        ref = table.get((spec.reference, step))
        row = [str(step)]
        for v in others:
            diff = paired_or_none(table.get((v, step)), ref)
            row.append(diff_cell(diff, len(spec.seeds)) if diff is not None else "")
        out.append("| " + " | ".join(row) + " |")
    return out


def _self_weight_table(curves: list[dict], n_seeds: int) -> list[str]:
    """Depth-Attention's mean weight on a position's own value along training (1 = vanilla)."""
    table = by_seed(curves, "mean_self_weight", "variant", "step")
    variants = list(dict.fromkeys(v for v, _ in table))
    steps = sorted({s for _, s in table})
    if not variants:
        return []
    out = ["Depth-Attention's weight on a position's own value along training (mean over "
           "positions with earlier sources and over a held-out batch; 1 would be vanilla):", "",
           "| step | " + " | ".join(variants) + " |", "|---:|" + "---:|" * len(variants)]
    for step in steps:
        out.append(f"| {step} | " + " | ".join(
            cell(spread(list(table[(v, step)].values())), n_seeds) if (v, step) in table else ""
            for v in variants) + " |")
    return out


# -- figures -----------------------------------------------------------------------------------


def meant_for(rows: list[dict]) -> list[dict]:
    """The rows at the R each model is meant for: a plain decoder (trained at R = 1) only at
    R = 1, where running it further is no experiment anyone would run; an unrolled model is
    only ever scored at its own R, and so draws as one marker."""
    return [r for r in rows if r["trained_loop"] != 1 or r["R"] == 1]


def figures(rows: list[dict], curves: list[dict], spec: StudySpec, out: Path) -> list[Path]:
    m = spec.metric
    made = []
    for grid in dict.fromkeys(r["grid"] for r in rows):
        prefix = f"{grid}_" if grid else ""
        title = f"{spec.name} ({grid})" if grid else spec.name
        bands = {}
        mine = [r for r in meant_for(rows) if r["grid"] == grid]
        for (v, R), vals in by_seed(mine, m, "variant", "R").items():
            bands.setdefault(v, {})[R] = list(vals.values())
        if len({R for curve in bands.values() for R in curve}) > 1:  # plain decoders: R = 1
            made.append(plot_bands(bands, out / f"{prefix}{m}_vs_R.png", xlabel="loop count R",
                                   ylabel=f"held-out {m}", log2_x=True,
                                   title=f"{title}: {m} vs R (band: min–max over seeds)"))
        lc: dict[str, dict[int, dict[int, float]]] = {}  # variant -> step -> seed -> value
        for (v, step), vals in by_seed([c for c in curves if c["grid"] == grid], m, "variant",
                                       "step").items():
            lc.setdefault(v, {})[step] = vals
        if lc:
            per_step = {v: {step: list(vals.values()) for step, vals in steps.items()}
                        for v, steps in lc.items()}
            made.append(plot_bands(per_step, out / f"{prefix}curves.png", xlabel="training step",
                                   ylabel=f"held-out {m} at trained R",
                                   title=f"{title}: learning curves"))
            ref = lc.get(spec.reference, {})
            gaps = {v: {step: paired_values(lc[v][step], ref[step])
                        for step in lc[v] if step in ref}
                    for v in lc if v != spec.reference}
            gaps = {v: {k: d for k, d in g.items() if d} for v, g in gaps.items() if g}
            if gaps:
                made.append(plot_bands(gaps, out / f"{prefix}gap_curves.png",
                                       xlabel="training step",
                                       ylabel=f"{m} − {spec.reference} (paired by seed)",
                                       zero_line=True,
                                       title=f"{title}: difference to {spec.reference} along "
                                             f"training (band: min–max over seeds)"))
    return made


def write_all(runs: list[RunSpec], spec: StudySpec, command: str,
              failed: dict[str, str]) -> Path:
    """Aggregate every finished run of `runs`; `failed` adds this invocation's failures to
    those the run directories record."""
    out = Path(spec.results)
    out.mkdir(parents=True, exist_ok=True)
    rows, curves, errors = collect(runs, spec.cache_bytes)
    failed = {**errors, **failed}
    write_csv(out / "runs.csv", rows)
    write_csv(out / "summary.csv", summarise(rows, spec))
    write_csv(out / "paired.csv", paired(rows, spec))
    write_csv(out / "curves.csv", curves)
    hard = difficulty_report.collect_difficulty(runs)
    if spec.difficulty.knob is not None:
        write_csv(out / "difficulty.csv", hard)
        write_csv(out / "difficulty_summary.csv", difficulty_report.summary_rows(hard, spec))
        write_csv(out / "difficulty_paired.csv", difficulty_report.paired_rows(hard, spec))
    (out / "summary.md").write_text(report(rows, curves, spec, command, failed, len(runs), hard))
    if rows:
        figures(rows, curves, spec, out)
    if hard:
        difficulty_report.figures(hard, spec, out)
    return out
