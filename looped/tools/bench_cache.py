"""`looped bench cache`: what each cache policy keeps and what it costs in quality, on trained
looped runs (several seeds give the spread).

    looped bench cache ckpt=[runs/study/main_job/looped_da/seed0,...] loops=[1,4,8,16,32]

For every run, loop count R and policy: the cache's bytes for one sequence of the model's
full context (batch 1, the bytes kept between decode steps), and the held-out metric (accuracy;
bits per byte for text) with every token decoded one at a time through a cache of that policy
(LoopedLM.cached_forward), so `last` is measured at its worst: no token is prefilled exactly.
`per_iteration` equals the full forward. The table gives the mean and std over the runs, and
each policy's paired difference against per_iteration.
"""

from __future__ import annotations

import csv
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from looped import build_model
from looped.config import load_run_config
from looped.training.checkpoint import load_weights, resolve_checkpoint, run_dir_of
from looped.config import parse_tool_args
from looped.config_help import tool_help
from looped.data import build_task
from looped.data.text import TextTask
from looped.errors import ConfigError, cli_main
from looped.model.cache_policy import CACHE_POLICIES
from looped.training.scoring import task_accuracy


@dataclass
class BenchCacheArgs:
    ckpt: list[str] = field(default_factory=list)  # run dirs (required); several: the spread
    loops: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])  # R values
    policies: list[str] = field(default_factory=lambda: ["per_iteration", "last"])
    n_samples: int = 256  # held-out sequences per (run, R, policy)
    batch_size: int = 64  # sequences decoded side by side
    out: Optional[str] = None  # a CSV of every (run, R, policy) row; null: none
    threads: int = 0  # torch CPU threads; 0 keeps torch's default


def help_text(argv: list[str] = ()) -> str:
    return tool_help(__doc__, BenchCacheArgs)


def _check(args: BenchCacheArgs) -> None:
    if not args.ckpt:
        raise ConfigError("give the runs: looped bench cache ckpt=[runs/A,runs/B]")
    if not args.loops or min(args.loops) < 1:
        raise ConfigError(f"loops must be a non-empty list of counts >= 1, got {args.loops}")
    if not args.policies:
        raise ConfigError("policies must name at least one cache policy, the first being the "
                          "reference: policies=[per_iteration,last]")
    for name in args.policies:
        CACHE_POLICIES.lookup(name)
    if args.n_samples < 1 or args.batch_size < 1:
        raise ConfigError("n_samples and batch_size must be >= 1")


def measure_run(path: str, args: BenchCacheArgs) -> list[dict]:
    ckpt = resolve_checkpoint(Path(path))
    cfg = load_run_config(run_dir_of(ckpt))
    model = build_model(cfg)
    load_weights(model, ckpt)
    model.eval()
    task = build_task(cfg.task, split="eval")
    metric = "bits_per_byte" if isinstance(task, TextTask) else "accuracy"
    rows = []
    for r in model.runnable_loops(args.loops):
        for kv in args.policies:
            nbytes = model.new_cache(1, cfg.model.max_seq_len, r, kv).nbytes
            res = task_accuracy(model, task, r, args.n_samples, args.batch_size, cfg.seed, kv=kv)
            rows.append(dict(run=str(run_dir_of(ckpt)), loops=r, kv=kv, cache_bytes=nbytes,
                             metric=metric, value=res[metric]))
            print(f"  {run_dir_of(ckpt)}  R={r:3d}  kv={kv:13s}  cache {nbytes / 1024:9.1f} KiB"
                  f"  {metric} {res[metric]:.4f}", flush=True)
    return rows


def summary_table(rows: list[dict], policies: list[str]) -> str:
    """Markdown: per R and policy, cache KiB, the metric's mean ± std over runs, and the paired
    difference against the first policy (mean, min..max)."""
    metric = rows[0]["metric"]
    ref = policies[0]
    by = {(row["run"], row["loops"], row["kv"]): row for row in rows}
    runs = sorted({row["run"] for row in rows})
    lines = [f"| R | policy | cache KiB | {metric} (mean ± std, n={len(runs)}) | "
             f"Δ vs {ref} (min..max) |", "|---|---|---|---|---|"]
    for r in sorted({row["loops"] for row in rows}):
        for kv in policies:
            have = [run for run in runs if (run, r, kv) in by]  # runs may differ in their R
            if not have:
                continue
            vals = [by[(run, r, kv)]["value"] for run in have]
            kib = by[(have[0], r, kv)]["cache_bytes"] / 1024
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cell = ""
            d = [by[(run, r, kv)]["value"] - by[(run, r, ref)]["value"] for run in have]
            if kv != ref and d:
                cell = f"{statistics.mean(d):+.4f} ({min(d):+.4f}..{max(d):+.4f})"
            lines.append(f"| {r} | {kv} | {kib:.1f} | {statistics.mean(vals):.4f} ± {std:.4f} "
                         f"| {cell} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args: BenchCacheArgs = parse_tool_args(BenchCacheArgs, argv)
    _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for path in args.ckpt for row in measure_run(path, args)]
    if not rows:
        raise ConfigError(f"none of the runs can be scored at loops={args.loops} (an unrolled "
                          f"run only at its own R)")
    print()
    print(summary_table(rows, args.policies))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
