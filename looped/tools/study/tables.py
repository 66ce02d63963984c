"""The small pieces a study's tables are made of: per-seed lookups, paired differences and
the markdown cells that show them (mean ± std over seeds, differences with their interval)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

from looped.tools.study.stats import Spread, paired_difference


def num(x) -> float:
    return float(x) if x not in (None, "") else math.nan


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.10g}" if isinstance(v, float) else v) for k, v in row.items()})


def by_seed(rows: list[dict], metric: str, *keys: str) -> dict[tuple, dict[int, float]]:
    """(key values) -> {seed: metric}, skipping missing values."""
    out: dict[tuple, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if not math.isnan(row[metric]):
            out[tuple(row[k] for k in keys)][row["seed"]] = row[metric]
    return out


def paired_or_none(values: Optional[dict[int, float]],
                   reference: Optional[dict[int, float]]) -> Optional[Spread]:
    """The paired difference, or None where either side is missing or no seed is shared."""
    if not values or not reference or not set(values) & set(reference):
        return None
    return paired_difference(values, reference)


def spread_cols(s: Spread) -> dict:
    return {"n": s.n, "mean": s.mean, "std": s.std, "min": s.min, "max": s.max,
            "ci95_low": s.ci_low, "ci95_high": s.ci_high}


def fmt(x: float, digits: int = 3) -> str:
    return "—" if math.isnan(x) else f"{x:.{digits}f}"


def seeds_note(s: Spread, n_seeds: int) -> str:
    return f" ({s.n} of {n_seeds} seeds)" if s.n < n_seeds else ""


def cell(s: Spread, n_seeds: int) -> str:
    if s.n == 1:
        return f"{fmt(s.mean)}{seeds_note(s, n_seeds) or ' (1 seed)'}"
    return (f"{fmt(s.mean)} ± {fmt(s.std)} ({fmt(s.min)}–{fmt(s.max)})"
            + seeds_note(s, n_seeds))


def signed(x: float) -> str:
    return f"{x:+.3f}"


def diff_cell(s: Spread, n_seeds: int) -> str:
    if s.n == 1:
        return f"{signed(s.mean)}{seeds_note(s, n_seeds) or ' (1 seed)'}"
    return f"{signed(s.mean)} [{signed(s.ci_low)}, {signed(s.ci_high)}]" + \
        seeds_note(s, n_seeds)
