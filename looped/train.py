"""`python train.py loop=8 ...`: train a looped Depth-Attention model on a built-in task."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from looped.config import load_config
from looped.errors import ConfigError, cli_main
from looped.plots import plot_metric_vs_loops
from looped.trainer import Trainer


def main(argv: list[str]) -> int:
    cfg = load_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.resume and not cfg.name:
        raise ConfigError("resume=true continues the run named by name=<run>; give its name")
    name = cfg.name or time.strftime("%Y%m%d-%H%M%S") + f"-loop{cfg.loop}"
    run_dir = Path(cfg.out_dir) / name
    trainer = Trainer(cfg, run_dir)
    if cfg.resume or cfg.resume_from:
        ckpt = trainer.resume(Path(cfg.resume_from) if cfg.resume_from else None)
        print(f"resumed from {ckpt} at step {trainer.step}", flush=True)
    trainer.start_run_dir()
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(f"run {run_dir}: {n_params / 1e6:.2f}M parameters, loop={cfg.loop}, "
          f"depth sources={trainer.model.policy}, task={cfg.task.name}, "
          f"loss={cfg.train.loss}, loop sampler={cfg.train.loops.sampler}", flush=True)
    t0 = time.perf_counter()
    with SummaryWriter(str(run_dir / "tb")) as writer:
        results = trainer.fit(writer, log=lambda s: print(s, flush=True))
    if not results:  # resumed at the end: nothing trained, still report
        results = trainer.evaluate(list(cfg.eval.loops))
    plot = plot_metric_vs_loops({name: {r: v["accuracy"] for r, v in results.items()}},
                                run_dir / "accuracy_vs_loops.png", trained_loop=cfg.loop,
                                title=f"{cfg.task.name}: held-out accuracy")
    print(f"\ntrained {trainer.step} steps in {time.perf_counter() - t0:.0f} s")
    print("held-out accuracy by loop count:")
    print("   R  accuracy")
    for r, v in results.items():
        marker = "  <- trained" if r == cfg.loop else ""
        print(f"{r:4d}  {v['accuracy']:.3f}{marker}")
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    print(f"checkpoint:  {run_dir / 'ckpt'}")
    print(f"plot:        {plot}")
    return 0


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
