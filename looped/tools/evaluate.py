"""Loop-count sweeps of trained runs: held-out accuracy and loss at each R, as CSV, JSON and PNG.

    python -m looped eval ckpt=runs/my-run loops=[1,2,4,8,16,32]
    python -m looped eval ckpt=[runs/looped,runs/unrolled,runs/vanilla] out=runs/compare
    python -m looped eval ckpt=runs/ps loops=[8,16,32,64,128] knob=length levels=[16,32,64]

With `knob` and `levels`, every run is scored on a grid of loop counts x held-out difficulties
(task.eval.<knob> at each level): difficulty_grid.csv, one plot per run with a line per level
(accuracy against R) and a heatmap, and per level the best R and the drop from it at the
largest R scored (overthinking); see looped.tools.difficulty_grid.

Each run is scored on its own task's held-out split. A shared-core model runs at every R, also
past the R it was trained with; an unrolled model (share_weights=false) only at its own R.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from looped.config import load_run_config
from looped.training.checkpoint import resolve_checkpoint, run_dir_of
from looped.config import parse_tool_args
from looped.config_help import tool_help
from looped.data import build_task
from looped.errors import ConfigError, cli_main
from looped.model.exit import build_exit
from looped.training.device import pick_device
from looped.training.scoring import task_accuracy
from looped.tools.difficulty_grid import load_model, run_grid
from looped.tools.plots import plot_metric_vs_loops


@dataclass
class EvaluateArgs:
    ckpt: list[str] = field(default_factory=list)  # run dirs or checkpoint dirs (required)
    loops: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # R values to score
    out: Optional[str] = None  # the output directory; default: <first run>/eval
    n_samples: int = 1024  # held-out sequences per R
    batch_size: int = 0  # held-out sequences per forward; 0: as many as fit in memory
    device: str = "auto"  # auto (CUDA if available) | cpu | cuda; bf16 autocast on CUDA
    exit: Optional[str] = None  # an exit criterion to apply (kl, entropy, latent, gate, ...)
    threshold: Optional[float] = None  # the exit criterion's threshold; null: its default
    # score through a KV cache of this policy (per_iteration | last), every token decoded one
    # at a time; null: one full forward per batch (what per_iteration equals)
    kv: Optional[str] = None
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    knob: Optional[str] = None  # a task knob to sweep on the held-out split (e.g. length, hops)
    levels: list[int] = field(default_factory=list)  # its values, with `knob`
    # overrides of every run's saved config, for what a trained model can change at test time
    # (e.g. [model.depth_attention.log_scale=true]); the weights must still fit
    config: list[str] = field(default_factory=list)


def help_text(argv: list[str] = ()) -> str:
    return tool_help(__doc__, EvaluateArgs)


def parse_args(argv: list[str]) -> EvaluateArgs:
    args: EvaluateArgs = parse_tool_args(EvaluateArgs, argv, bare_lists=("ckpt",))
    if not args.ckpt:
        raise ConfigError("give at least one run: ckpt=<run dir>")
    if not args.loops or min(args.loops) < 1:
        raise ConfigError(f"loops must be a non-empty list of counts >= 1, got {args.loops}")
    if args.batch_size < 0:
        raise ConfigError(f"batch_size must be >= 0 (0: what fits in memory), got "
                          f"{args.batch_size}")
    pick_device(args.device)  # a bad name or a missing GPU fails before any run is read
    if args.kv is not None:
        from looped.model.cache_policy import CACHE_POLICIES

        CACHE_POLICIES.lookup(args.kv)
    if (args.knob is None) != (not args.levels):
        raise ConfigError("give knob=<task knob> and levels=[...] together (a difficulty grid), "
                          "or neither")
    return args


def evaluate_run(path: str, args: EvaluateArgs) -> tuple[str, dict[int, dict[str, float]], int]:
    ckpt = resolve_checkpoint(Path(path))
    run_dir = run_dir_of(ckpt)
    overrides = list(args.config)
    if args.exit is not None:
        overrides.append(f"exit.criterion={args.exit}")
    if args.threshold is not None:
        overrides.append(f"exit.threshold={args.threshold}")
    cfg = load_run_config(run_dir, overrides)
    model = load_model(cfg, ckpt, args.device)
    task = build_task(cfg.task, split="eval")
    exit = build_exit(cfg.exit)
    loops = model.runnable_loops(args.loops)
    if cfg.model.share_weights and len(loops) < len(args.loops):
        print(f"  {run_dir.name}: cross_layer.method={cfg.model.cross_layer.method} runs at most "
              f"{model.param_loops} iterations; skipping loops "
              f"{[r for r in args.loops if r not in loops]}", flush=True)
    results = {}
    for r in loops:
        results[r] = task_accuracy(model, task, r, args.n_samples, args.batch_size, cfg.seed,
                                   exit=exit, kv=args.kv)
        extra = f"  loss {results[r]['loss']:.4f}"
        if "bits_per_byte" in results[r]:
            extra += f"  bits/byte {results[r]['bits_per_byte']:.4f}"
        print(f"  {run_dir.name}  R={r:3d}  accuracy {results[r]['accuracy']:.4f}  "
              f"mean iterations {results[r]['iterations']:.2f}{extra}", flush=True)
    return run_dir.name, results, cfg.loop


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.knob is not None:
        return run_grid(args)
    runs = [evaluate_run(p, args) for p in args.ckpt]
    if args.out:
        out = Path(args.out)
    else:  # beside the first run
        out = run_dir_of(resolve_checkpoint(Path(args.ckpt[0]))) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "loop_sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "trained_loop", "loops", "accuracy", "mean_iterations", "loss",
                    "bits_per_byte"])
        for name, res, trained in runs:
            for r, v in res.items():
                w.writerow([name, trained, r, f"{v['accuracy']:.6f}", f"{v['iterations']:.4f}",
                            f"{v['loss']:.6f}",
                            f"{v['bits_per_byte']:.6f}" if "bits_per_byte" in v else ""])
    (out / "loop_sweep.json").write_text(json.dumps(
        {name: {"trained_loop": trained, "results": {str(r): v for r, v in res.items()}}
         for name, res, trained in runs}, indent=2) + "\n")
    trained = runs[0][2] if len({t for _, _, t in runs}) == 1 else None
    plot = plot_metric_vs_loops({name: {r: v["accuracy"] for r, v in res.items()}
                                 for name, res, _ in runs}, out / "loop_sweep.png",
                                trained_loop=trained, title="held-out accuracy vs loop count")
    print(f"wrote {out / 'loop_sweep.csv'}, {out / 'loop_sweep.json'}, {plot}")
    return 0


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
