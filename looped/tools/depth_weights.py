"""Where Depth-Attention's weight goes in looped runs, at the trained R and beyond it.

    python -m looped weights ckpt=[runs/study/loop_extrapolation_da/anchor_window/seed0,...] \
        loops=[12,96] out=docs/results/study/loop_extrapolation_da/weights

Every run is scored on one batch of its own task's held-out split. At each core position
(layer l, iteration r >= 1, where a position has earlier sources) a token's depth weights split
into disjoint parts:

    self      the position's own value
    first     layer l at iteration 0 (the anchor)
    previous  layer l at iteration r - 1 (when r - 1 > 0; at r = 1 that source is `first`)
    middle    layer l at iterations 1 .. r - 2 (only `same_layer` and `loop_strided` read these)
    prelude   the prelude's positions

and the entropy of the whole distribution (nats). Runs in folders named <variant>/seed<k> are
averaged by variant. Writes depth_weights.csv (run, R, iteration: the parts and the entropy),
depth_weights.md (per variant and R, over core positions with sources: mean ± std over seeds)
and depth_weights.png (the parts against the iteration's fraction of R, one panel per variant).
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from looped.config import load_run_config, parse_tool_args
from looped.config_help import tool_help
from looped.data import build_task
from looped.errors import ConfigError, cli_main
from looped.model.depth import DepthSlot
from looped.tools.difficulty_grid import load_model
from looped.tools.plots import plot_panels
from looped.training.checkpoint import resolve_checkpoint, run_dir_of
from looped.training.scoring import HELD_OUT_SEED_OFFSET

PARTS = ("self", "first", "previous", "middle", "prelude")


@dataclass
class WeightsArgs:
    ckpt: list[str] = field(default_factory=list)  # run dirs or checkpoint dirs (required)
    loops: list[int] = field(default_factory=lambda: [12, 96])  # R values to read the weights at
    n_samples: int = 64  # held-out sequences (one forward per R)
    out: Optional[str] = None  # the output directory; default: <first run>/depth_weights
    threads: int = 0  # torch CPU threads; 0 keeps torch's default


def help_text(argv: list[str] = ()) -> str:
    return tool_help(__doc__, WeightsArgs)


def parse_args(argv: list[str]) -> WeightsArgs:
    args: WeightsArgs = parse_tool_args(WeightsArgs, argv, bare_lists=("ckpt",))
    if not args.ckpt:
        raise ConfigError("give at least one run: ckpt=<run dir>")
    if not args.loops or min(args.loops) < 2:
        raise ConfigError(f"loops must be a non-empty list of counts >= 2, got {args.loops}")
    if args.n_samples < 1:
        raise ConfigError(f"n_samples must be >= 1, got {args.n_samples}")
    return args


def split_weights(layout, p: int, sources: tuple[int, ...], weights: torch.Tensor
                  ) -> dict[str, float]:
    """The mean mass of each part (PARTS) and the mean entropy at core position p, from its
    earlier sources and its depth weights (B, T, Hkv, S + 1), the position itself last."""
    slot = layout.slot(p)
    layer, r = slot.layer, slot.iteration
    part_of = {}
    for j in sources:
        s = layout.slot(j)
        if s.stage == "prelude":
            part_of[j] = "prelude"
        elif s.iteration == 0:
            part_of[j] = "first"
        elif s.iteration == r - 1:
            part_of[j] = "previous"
        else:
            part_of[j] = "middle"
        assert s.stage != "core" or s.layer == layer, "a looped policy reads the same layer"
    w = weights.double().flatten(0, 2)  # (B * T * Hkv, S + 1)
    out = {part: 0.0 for part in PARTS}
    for i, j in enumerate(sources):
        out[part_of[j]] += float(w[:, i].mean())
    out["self"] = float(w[:, -1].mean())
    out["entropy"] = float(-(w * w.clamp_min(1e-30).log()).sum(-1).mean())
    out["n_sources"] = len(sources)
    return out


@torch.no_grad()
def run_weights(path: str, loops: list[int], n_samples: int) -> tuple[Path, int, list[dict]]:
    """Rows (R, iteration, parts, entropy) of one run, averaged over its core layers."""
    ckpt = resolve_checkpoint(Path(path))
    run_dir = run_dir_of(ckpt)
    cfg = load_run_config(run_dir, [])
    if not cfg.model.share_weights:
        raise ConfigError(f"{run_dir}: an unrolled model runs only at its own R; the weights "
                          f"beyond it need a shared core")
    model = load_model(cfg, ckpt, "cpu").eval()
    if model.policy == "none":
        raise ConfigError(f"{run_dir}: has no Depth-Attention (policy 'none'), so no weights")
    gen = torch.Generator().manual_seed(cfg.seed + HELD_OUT_SEED_OFFSET)
    batch = build_task(cfg.task, split="eval").sample(n_samples, gen)
    rows = []
    for r_total in loops:
        out = model(batch.inputs, loops=r_total, return_depth_weights=True)
        layout = out.layout
        for it in range(1, r_total):
            per_layer = []
            for layer in range(layout.n_core):
                p = layout.position(DepthSlot("core", layer, it))
                dw = out.depth_weights.get(p)
                if dw is not None and len(dw.sources) > 1:  # its own position comes last
                    per_layer.append(split_weights(layout, p, dw.sources[:-1], dw.weights))
            if per_layer:
                mean = {k: statistics.fmean(d[k] for d in per_layer) for k in per_layer[0]}
                rows.append({"R": r_total, "iteration": it, **mean})
    return run_dir, cfg.loop, rows


def variant_of(run_dir: Path) -> str:
    """`<variant>/seed<k>` folders group by variant; any other run stands alone."""
    return run_dir.parent.name if run_dir.name.startswith("seed") else run_dir.name


def summarise(runs: list[tuple[Path, int, list[dict]]]) -> list[str]:
    """Markdown: per variant and R, the most sources a core position reads, and each part's
    mass and the entropy over the core positions that have sources, mean ± std over the
    variant's runs."""
    by = defaultdict(lambda: defaultdict(list))  # (variant, R) -> key -> per-run means
    trained = {}
    for run_dir, loop, rows in runs:
        v = variant_of(run_dir)
        trained[v] = loop
        for r_total in sorted({row["R"] for row in rows}):
            mine = [row for row in rows if row["R"] == r_total]
            for key in (*PARTS, "entropy"):
                by[(v, r_total)][key].append(statistics.fmean(row[key] for row in mine))
            by[(v, r_total)]["n_sources"].append(max(row["n_sources"] for row in mine))
    head = "| variant | trained R | R | most sources | " + " | ".join(PARTS) + " | entropy (nats) |"
    lines = [head, "|---|---:|---:|---:|" + "---:|" * (len(PARTS) + 1)]
    for (v, r_total), vals in sorted(by.items()):
        cells = [_mean_std(vals[k]) for k in (*PARTS, "entropy")]
        lines.append(f"| {v} | {trained[v]} | {r_total} | {max(vals['n_sources']):.0f} | "
                     + " | ".join(cells) + " |")
    return lines


def _mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def write_csv(runs, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "run", "trained_R", "R", "iteration", *PARTS, "entropy",
                    "n_sources"])
        for run_dir, loop, rows in runs:
            for row in rows:
                w.writerow([variant_of(run_dir), str(run_dir), loop, row["R"], row["iteration"],
                            *(f"{row[k]:.6f}" for k in (*PARTS, "entropy")), row["n_sources"]])


def curves(runs) -> dict[str, dict[str, dict[float, float]]]:
    """Per variant, each part's mean mass against iteration / R, one line per (part, R); parts
    that stay under 1 % are left out."""
    panels = {}
    for v in sorted({variant_of(d) for d, _, _ in runs}):
        mine = [row for d, _, rows in runs if variant_of(d) == v for row in rows]
        lines = {}
        for r_total in sorted({row["R"] for row in mine}):
            for part in PARTS:
                points = defaultdict(list)
                for row in mine:
                    if row["R"] == r_total:
                        points[row["iteration"] / r_total].append(row[part])
                curve = {x: statistics.fmean(ys) for x, ys in points.items()}
                if max(curve.values(), default=0.0) >= 0.01:
                    lines[f"{part}, R={r_total}"] = curve
        panels[v] = lines
    return panels


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = []
    for p in args.ckpt:
        runs.append(run_weights(p, args.loops, args.n_samples))
        print(f"  read {runs[-1][0]}", flush=True)
    out = Path(args.out) if args.out else runs[0][0] / "depth_weights"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(runs, out / "depth_weights.csv")
    table = summarise(runs)
    (out / "depth_weights.md").write_text("\n".join(table) + "\n")
    plot_panels(curves(runs), out / "depth_weights.png", xlabel="iteration / R",
                ylabel="mean depth weight")
    print("\n".join(table))
    print(f"wrote depth_weights.csv, depth_weights.md and depth_weights.png in {out}")
    return 0


if __name__ == "__main__":
    cli_main(main)
