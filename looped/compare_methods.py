"""Depth-Attention against vanilla and every cross-layer baseline at equal budget and seeds.

    python -m looped.compare_methods                       # looped main job, 250 steps, seeds 0 1
    python -m looped.compare_methods shape=plain steps=500 seeds=[0]

Each (method, seed) is one `python train.py` run of the same config (the main job's looped model,
or with shape=plain an 8-layer decoder trained on the final answer); baselines run without
Depth-Attention, as in the paper. Finished runs are reused, so an interrupted comparison resumes.
Writes <out>/methods.csv and <out>/methods.md (mean and spread over seeds).
"""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from looped.config import parse_tool_args
from looped.errors import ConfigError, cli_main
from looped.evaluate import EvaluateArgs, evaluate_run
from looped.model.cross_layer import CROSS_LAYER_METHODS

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "looped": ["loop=8"],  # the main job: one shared layer, R ~ U{1..8}, per-iteration loss
    "plain": ["loop=1", "model.n_layers=8", "train.loops.sampler=fixed", "train.loss=final"],
}


@dataclass
class CompareArgs:
    shape: str = "looped"
    steps: int = 250
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    out: str = "runs/methods"
    n_samples: int = 1024
    threads: int = 0
    methods: list[str] = field(default_factory=list)  # a subset of variants(); empty: all
    extra: list[str] = field(default_factory=list)  # more train.py overrides for every run


def variants() -> dict[str, list[str]]:
    """Name -> overrides: vanilla, Depth-Attention, then each cross-layer method without it."""
    out = {"vanilla": ["model.depth_attention.enabled=false"], "depth_attention": []}
    for name in CROSS_LAYER_METHODS:
        if name != "none":
            out[name] = ["model.depth_attention.enabled=false",
                         f"model.cross_layer.method={name}"]
    # blocks of 2 positions: 4 blocks in the 8-position looped model (flops.py's tables use ~8
    # blocks over the 32-48 layers of the paper's models)
    out["attn_res_block"] = out["attn_res"] + ["model.cross_layer.block_size=2"]
    return out


def parse_args(argv: list[str]) -> CompareArgs:
    args: CompareArgs = parse_tool_args(CompareArgs, argv)
    if args.shape not in SHAPES:
        raise ConfigError(f"unknown shape '{args.shape}'; choose one of: {', '.join(SHAPES)}")
    if args.steps < 1 or not args.seeds:
        raise ConfigError("steps must be >= 1 and seeds non-empty")
    known = variants()
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from: "
                          f"{', '.join(known)}")
    return args


def train(args: CompareArgs, name: str, overrides: list[str], seed: int) -> tuple[Path, float]:
    """Train (or finish: an interrupted run resumes from its checkpoint) one run."""
    run = Path(args.out) / f"{name}-s{seed}"
    resume = (run / "ckpt" / "latest").exists()
    cmd = [sys.executable, "train.py", *SHAPES[args.shape], *args.extra, *overrides,
           f"seed={seed}", f"train.steps={args.steps}", f"out_dir={args.out}",
           f"name={run.name}", "eval.loops=[1]", f"threads={args.threads}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + (["resume=true"] if resume else []), cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise ConfigError(f"run {run.name} failed: {last}")
    # a resumed run's time covers only its remaining steps
    return run, float("nan") if resume else time.perf_counter() - t0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    loops = [8, 4] if args.shape == "looped" else [1]
    rows = []
    for name, overrides in variants().items():
        if args.methods and name not in args.methods:
            continue
        for seed in args.seeds:
            run, seconds = train(args, name, overrides, seed)
            _, res, _ = evaluate_run(str(run), EvaluateArgs(loops=loops, n_samples=args.n_samples,
                                                            threads=args.threads))
            rows.append({"method": name, "seed": seed, "seconds": seconds,
                         **{f"acc_R{r}": res[r]["accuracy"] for r in loops},
                         **{f"loss_R{r}": res[r]["loss"] for r in loops}})
    out = Path(args.out)
    with open(out / "methods.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = summarise(rows, loops, args)
    (out / "methods.md").write_text(table + "\n")
    print(table)
    return 0


def summarise(rows: list[dict], loops: list[int], args: CompareArgs) -> str:
    def stat(values):
        mean = statistics.fmean(values)
        spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
        return f"{mean:.3f} ± {spread:.3f}" if len(values) > 1 else f"{mean:.3f}"

    cols = [f"acc_R{r}" for r in loops] + [f"loss_R{r}" for r in loops]
    lines = [f"{args.shape}, {args.steps} steps, seeds {list(args.seeds)} (mean ± half range)",
             "", "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        lines.append(f"| {name} | " + " | ".join(stat([r[c] for r in mine]) for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
