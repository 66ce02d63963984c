"""`python train.py loop=8 ...` (or `looped train ...`): train a looped Depth-Attention model.

Under `torchrun --nproc_per_node=N train.py ...` it trains data-parallel (DDP, or FSDP2 with
train.parallel=fsdp) on N processes; rank 0 alone writes and prints. See
looped.training.distributed."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.tensorboard import SummaryWriter

from looped.config import load_config
from looped.training.scoring import eval_loops
from looped.training.distributed import ERROR_GRACE_S, DistEnv, finish, local_batch_size
from looped.errors import EXIT_BAD_INPUT, ConfigError, LoopedError, cli_main
from looped.tools.difficulty_grid import GridRun, write_grid
from looped.tools.plots import plot_metric_vs_loops
from looped.training.trainer import Trainer


class _NoWriter:
    """The TensorBoard writer of ranks other than 0."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_scalar(self, *args, **kwargs):
        pass

    def add_histogram(self, *args, **kwargs):
        pass


def help_text(argv: list[str] = ()) -> str:
    from looped.config_help import config_help

    return config_help()


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    env = DistEnv.from_environ()
    if not env.enabled:
        return run(argv, env)
    # Distributed: every rank ends here, through barrier -> destroy_process_group -> os._exit.
    try:
        code = run(argv, env)
    except LoopedError as e:
        # A user error (config, paths) is the same on every rank and should print once: rank 0
        # prints it and exits 2, and torchrun then stops the other ranks, which wait a little
        # first. An error of one rank alone still gets printed, after that wait.
        if not env.is_main:
            time.sleep(ERROR_GRACE_S)
        print(f"error: {e}", file=sys.stderr)
        finish(getattr(e, "exit_code", EXIT_BAD_INPUT), wait=False)
    finish(code or 0)


def run(argv: list[str], env: DistEnv) -> int:
    cfg = load_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.resume and not cfg.name:
        raise ConfigError("resume=true continues the run named by name=<run>; give its name")
    per_rank = local_batch_size(cfg.train.batch_size, env)  # before any process group
    # (other ranks may name an unnamed run a second apart; only rank 0 writes to it)
    name = cfg.name or time.strftime("%Y%m%d-%H%M%S") + f"-loop{cfg.loop}"
    run_dir = Path(cfg.out_dir) / name
    main_rank = env.is_main
    say = print if main_rank else (lambda *a, **k: None)
    trainer = Trainer(cfg, run_dir, env)
    if cfg.resume or cfg.resume_from:
        ckpt = trainer.resume(Path(cfg.resume_from) if cfg.resume_from else None)
        say(f"resumed from {ckpt} at step {trainer.step}", flush=True)
    trainer.start_run_dir()
    n_params = sum(p.numel() for p in trainer.model.parameters())
    say(f"run {run_dir}: {n_params / 1e6:.2f}M parameters, loop={cfg.loop}, "
        f"depth sources={trainer.model.policy}, task={cfg.task.name}, "
        f"loss={cfg.train.objective.loss}, loop sampler={cfg.train.loop_sampling.sampler}",
        flush=True)
    if env.enabled:
        say(f"data parallel: {cfg.train.parallel} on {env.world_size} processes, "
            f"{per_rank} of the {cfg.train.batch_size} rows of each batch per process",
            flush=True)
    t0 = time.perf_counter()
    writer = SummaryWriter(str(run_dir / "tb")) if main_rank else _NoWriter()
    with writer:
        results = trainer.fit(writer, log=lambda s: say(s, flush=True))
    trainer.wait_for_checkpoint()  # the last asynchronous checkpoint, published before exit
    if not results:  # resumed at the end: nothing trained, still report
        results = trainer.evaluate(eval_loops(cfg))
    # every evaluating rank scores the grid (under FSDP its forwards are collectives)
    grid = trainer.evaluate_grid(eval_loops(cfg))
    if not main_rank:
        return 0
    plot = plot_metric_vs_loops({name: {r: v["accuracy"] for r, v in results.items()}},
                                run_dir / "accuracy_vs_loops.png", trained_loop=cfg.loop,
                                title=f"{cfg.task.name}: held-out accuracy")
    print(f"\ntrained {trainer.step} steps in {time.perf_counter() - t0:.0f} s")
    print("held-out accuracy by loop count:")
    print("   R  accuracy")
    for r, v in results.items():
        marker = "  <- trained" if r == cfg.loop else ""
        print(f"{r:4d}  {v['accuracy']:.3f}{marker}")
    grid_dir = print_grid(grid, cfg, name, run_dir)
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    print(f"checkpoint:  {run_dir / 'ckpt'}")
    print(f"plot:        {plot}")
    if grid_dir:
        print(f"grid:        {grid_dir / 'difficulty_grid.md'} (and .csv, .json, figures)")
    return 0


def print_grid(cells: dict, cfg, name: str, run_dir: Path) -> Optional[Path]:
    """Print eval.grid's cells (whole answers solved, then accuracy per answer token) and write
    them as `looped eval knob=...` does; None without a grid."""
    knob = cfg.eval.grid.knob
    if not cells:
        return None
    loops = sorted({r for by_r in cells.values() for r in by_r})
    trained = cfg.task[knob]
    for metric, title in (("solved", "whole answers solved"), ("accuracy", "accuracy")):
        print(f"\nheld-out {title} by {knob} (trained: {trained}) and loop count R "
              f"(trained: {cfg.loop}):")
        print(f"{knob:>8}  " + "  ".join(f"{'R=' + str(r):>6}" for r in loops))
        for level, by_r in cells.items():
            print(f"{level:>8}  " + "  ".join(f"{by_r[r][metric]:6.3f}" for r in loops))
    out = run_dir / "eval"
    write_grid([GridRun(name, cfg.loop, trained, cells)], knob, out)
    return out


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
