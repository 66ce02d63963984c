"""`looped bench loop`: a trained looped checkpoint, each figure against a baseline from the
same run.

    looped bench loop ckpt=runs/main

1. Adaptive exit vs fixed R. Every held-out sequence is decoded token by token with the KV
   cache at batch size 1. For each criterion, the threshold is calibrated on one held-out set
   (the largest saving whose accuracy stays within `tolerance` of fixed R) and then reported
   on a fresh one.
2. Batched exit: the first calibrated criterion at batch sizes `batches`. A row whose token
   exited drops out of the later iterations, so wall time should follow the iterations run.
3. Cached decode vs recompute: seconds for `new_tokens` greedy tokens with the KV cache and
   with a full forward per token.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from looped import build_model
from looped.config import load_run_config
from looped.training.checkpoint import load_weights, resolve_checkpoint, run_dir_of
from looped.data import IGNORE, build_task
from looped.config import parse_tool_args
from looped.config_help import tool_help
from looped.errors import ConfigError, cli_main
from looped.model.exit import EXIT_CRITERIA
from looped.model.lm import LoopedLM

THRESHOLDS = {  # candidate thresholds per criterion, from permissive (exits late) to eager
    "kl": [1e-3, 1e-2, 1e-1, 3e-1, 1.0],
    "entropy": [1e-3, 1e-2, 1e-1, 3e-1, 1.0],
    "latent": [1e-2, 1e-1, 3e-1, 5e-1, 1.0],
}
CALIBRATION_SEED, REPORT_SEED = 101, 202


@torch.no_grad()
def decode_sequences(model: LoopedLM, task, n: int, seed: int, loops: int, exit=None,
                     batch: int = 1):
    """Token-by-token cached decoding of n held-out sequences, `batch` at a time (teacher
    forced). Returns accuracy on answer tokens, mean iterations per answer token and per
    token, and seconds."""
    gen = torch.Generator().manual_seed(seed)
    correct = answers = 0
    iters_answer = iters_all = n_tokens = 0
    t0 = time.perf_counter()
    for _ in range(0, n, batch):
        seqs = task.sample(batch, gen)
        cache = model.new_cache(batch, seqs.inputs.shape[1], loops)
        for t in range(seqs.inputs.shape[1]):
            out = model(seqs.inputs[:, t:t + 1], loops=loops, cache=cache, exit=exit)
            it = out.iterations[:, 0]
            iters_all += int(it.sum())
            n_tokens += batch
            target = seqs.targets[:, t]
            scored = target != IGNORE
            answers += int(scored.sum())
            iters_answer += int(it[scored].sum())
            correct += int((out.logits[:, 0].argmax(-1)[scored] == target[scored]).sum())
    return {"accuracy": correct / max(answers, 1), "iters_answer": iters_answer / max(answers, 1),
            "iters_all": iters_all / n_tokens, "seconds": time.perf_counter() - t0}


def bench_exit(model, task, loops: int, n: int, tolerance: float) -> dict[str, float]:
    """Calibrated thresholds per criterion (those that stayed within tolerance)."""
    print(f"\n== adaptive exit vs fixed R={loops} (batch 1, cached decode, {n} sequences) ==")
    fixed_cal = decode_sequences(model, task, n, CALIBRATION_SEED, loops)
    fixed = decode_sequences(model, task, n, REPORT_SEED, loops)
    print(f"fixed R={loops}: accuracy {fixed['accuracy']:.4f}, {fixed['seconds']:.1f} s")
    print("criterion  threshold  accuracy  d_acc(pts)  iters/answer  iters/token  "
          "iters/R(answers)  time ratio")
    calibrated = {}
    for name, candidates in THRESHOLDS.items():
        chosen = None
        for thr in candidates:  # calibration: keep the most eager that stays accurate
            res = decode_sequences(model, task, n, CALIBRATION_SEED, loops,
                                   EXIT_CRITERIA[name](threshold=thr))
            if fixed_cal["accuracy"] - res["accuracy"] <= tolerance:
                chosen = thr
        if chosen is None:
            print(f"{name:9s}  no threshold within {tolerance * 100:.1f} points")
            continue
        calibrated[name] = chosen
        res = decode_sequences(model, task, n, REPORT_SEED, loops,
                               EXIT_CRITERIA[name](threshold=chosen))
        print(f"{name:9s}  {chosen:9.0e}  {res['accuracy']:.4f}  "
              f"{(res['accuracy'] - fixed['accuracy']) * 100:+9.2f}  "
              f"{res['iters_answer']:12.2f}  {res['iters_all']:11.2f}  "
              f"{res['iters_answer'] / loops:16.2f}  {res['seconds'] / fixed['seconds']:10.2f}")
    return calibrated


def bench_batched_exit(model, task, loops: int, n: int, name: str, threshold: float,
                       batches: list[int]) -> None:
    """Wall time of decoding under exit against fixed R at several batch sizes: rows whose
    token exited drop out of the later iterations, so the time should follow the iterations
    run (iters/token / R) rather than the slowest row."""
    print(f"\n== batched exit: {name} at threshold {threshold:.0e} vs fixed R={loops} "
          f"({n} sequences, cached decode) ==")
    print("batch  fixed s  exit s  time ratio  iters/token / R  accuracy fixed  accuracy exit")
    for b in batches:
        fixed = decode_sequences(model, task, n, REPORT_SEED, loops, batch=b)
        res = decode_sequences(model, task, n, REPORT_SEED, loops,
                               EXIT_CRITERIA[name](threshold=threshold), batch=b)
        print(f"{b:5d}  {fixed['seconds']:7.2f}  {res['seconds']:6.2f}  "
              f"{res['seconds'] / fixed['seconds']:10.2f}  {res['iters_all'] / loops:15.2f}  "
              f"{fixed['accuracy']:14.4f}  {res['accuracy']:13.4f}")


@torch.no_grad()
def bench_decode_vs_recompute(model, task, loops: int, new_tokens: int) -> None:
    prompt = task.sample(1, torch.Generator().manual_seed(0)).inputs
    total = prompt.shape[1] + new_tokens
    if total > model.cfg.max_seq_len:
        raise ConfigError(f"prompt ({prompt.shape[1]}) + --new-tokens ({new_tokens}) exceeds "
                          f"the model's max_seq_len ({model.cfg.max_seq_len})")
    print(f"\n== cached decode vs recompute: {new_tokens} new tokens after a "
          f"{prompt.shape[1]}-token prompt, R={loops}, batch 1 ==")
    times = {}
    outs = {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        outs[use_cache] = model.generate(prompt, new_tokens, temperature=0, loops=loops,
                                         use_cache=use_cache)
        times[use_cache] = time.perf_counter() - t0
    same = torch.equal(outs[True], outs[False])
    print(f"cached {times[True]:.2f} s, recompute {times[False]:.2f} s, "
          f"speed-up {times[False] / times[True]:.1f}x (goal >= 10x); same tokens: {same}")


@dataclass
class BenchLoopArgs:
    ckpt: str = ""  # a run dir or checkpoint dir (required)
    sequences: int = 100  # held-out sequences per setting
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])  # batched exit; []: skip
    batched_sequences: int = 256  # held-out sequences per batched-exit setting
    tolerance: float = 0.005  # accuracy drop allowed when calibrating exit thresholds
    new_tokens: int = 256  # greedy tokens for cached decode vs recompute
    threads: int = 0  # torch threads; 0: default


def help_text(argv: list[str] = ()) -> str:
    return tool_help(__doc__, BenchLoopArgs)


def main(argv: list[str]) -> int:
    args: BenchLoopArgs = parse_tool_args(BenchLoopArgs, argv)
    if not args.ckpt:
        raise ConfigError("give the checkpoint: looped bench loop ckpt=runs/NAME")
    if args.sequences < 1 or args.new_tokens < 1 or args.tolerance < 0 or \
            args.batched_sequences < 1 or any(b < 1 for b in args.batches):
        raise ConfigError("sequences, batched_sequences, new_tokens and every batch must be "
                          ">= 1, tolerance >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = resolve_checkpoint(Path(args.ckpt))
    cfg = load_run_config(run_dir_of(ckpt))
    model = build_model(cfg)
    load_weights(model, ckpt)
    model.eval()
    task = build_task(cfg.task, split="eval")
    gc.disable()
    print(f"checkpoint {ckpt}: task {cfg.task.name}, trained R={cfg.loop}, "
          f"threads={torch.get_num_threads()}")
    calibrated = bench_exit(model, task, cfg.loop, args.sequences, args.tolerance)
    if args.batches and calibrated:
        name = min(calibrated, key=lambda k: list(THRESHOLDS).index(k))
        bench_batched_exit(model, task, cfg.loop, args.batched_sequences, name,
                           calibrated[name], args.batches)
    bench_decode_vs_recompute(model, task, cfg.loop, args.new_tokens)
    return 0


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
