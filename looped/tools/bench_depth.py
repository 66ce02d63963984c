"""`looped bench depth`: the training-step cost of Depth-Attention against vanilla, same
weights, timed in the same run: the plain bench model, and looped models whose every iteration
adds a depth source (one shared core layer at R = 4, 8, 16, same_layer sources).

    looped bench depth                          # d_model 512 x 8 layers, then the looped models
    looped bench depth steps=5 looped=[]        # the plain model only

Decoding is benchmarked by `looped bench decode`.

This machine is noisy, so the two models are timed in alternation (A B A B ...) and each figure
is the median over repeats; only the ratios are meant to be compared across machines.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from looped import build_model, load_config
from looped.config import parse_tool_args
from looped.config_help import tool_help
from looped.errors import ConfigError, cli_main

BENCH_MODEL = ["model=bench", "loop=1"]  # configs/model/bench.yaml: d_model 512, 8 layers


def bench_models(vocab: int, kernel: str, sources: str, longest: int,
                 extra: tuple[str, ...] = ()) -> dict[str, torch.nn.Module]:
    """The bench model without and with Depth-Attention, same weights, in eval mode."""
    base = BENCH_MODEL + [f"model.vocab_size={vocab}", f"model.kernel={kernel}",
                          f"model.max_seq_len={max(1024, longest)}", *extra]
    vanilla = build_model(load_config(base + ["model.depth_attention.enabled=false"]))
    depth = build_model(load_config(base + [f"model.depth_attention.sources={sources}"]))
    depth.load_state_dict(vanilla.state_dict())  # same weights: only the value mixing differs
    return {"vanilla": vanilla.eval(), "depth": depth.eval()}


def _alternate(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, `repeats` times, in A B / B A order so drift cancels."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-repeat ratios: robust to load that comes and goes between repeats."""
    return statistics.median(n / d for n, d in zip(num, den))


def bench_train_step(models, batch: int, seq_len: int, args) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (batch, seq_len + 1), generator=gen)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

    def step(name):
        m, opt = models[name], opts[name]
        logits = m(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fns = {k: (lambda k=k: step(k)) for k in models}
    for fn in fns.values():  # warm-up: allocator, optimizer state
        fn()
    return _alternate(fns, args.steps)


def kv_cache_bytes(models, args) -> dict[str, int]:
    return {k: m.new_cache(1, args.seq_len).nbytes for k, m in models.items()}


LOOPED_MODEL = ("model.d_model=256", "model.n_heads=4", "model.n_kv_heads=2",
                "model.ffn_dim=768", "model.n_layers=1", "train.loop_sampling.sampler=fixed")


def looped_models(args, loops: int) -> dict[str, torch.nn.Module]:
    """One shared 256-wide core layer run `loops` times, without and with same_layer
    Depth-Attention (every iteration reads the layer's earlier iterations)."""
    base = ["model=bench", f"loop={loops}", f"model.vocab_size={args.vocab}",
            f"model.kernel={args.kernel}", *LOOPED_MODEL]
    vanilla = build_model(load_config(base + ["model.depth_attention.enabled=false"]))
    depth = build_model(load_config(base + ["model.depth_attention.sources=same_layer"]))
    depth.load_state_dict(vanilla.state_dict())
    return {"vanilla": vanilla, "depth": depth}


@dataclass
class BenchDepthArgs:
    seq_len: int = 256  # training sequence length (plain model)
    batch: int = 4  # training batch (plain model)
    vocab: int = 256  # vocabulary size
    sources: str = "strided"  # Depth-Attention source policy of the plain model
    kernel: str = "sdpa"  # sequence-attention kernel
    steps: int = 16  # timed training steps per model
    looped: list[int] = field(default_factory=lambda: [4, 8, 16])  # R of the looped models
    looped_seq_len: int = 128  # training sequence length (looped models)
    looped_batch: int = 16  # training batch (looped models)
    compile: bool = False  # also time the looped models under torch.compile (train.compile)
    threads: int = 0  # torch threads; 0: default


def help_text(argv: list[str] = ()) -> str:
    return tool_help(__doc__, BenchDepthArgs)


def main(argv: list[str]) -> int:
    args: BenchDepthArgs = parse_tool_args(BenchDepthArgs, argv)
    for name in ("seq_len", "batch", "vocab", "steps", "looped_seq_len", "looped_batch"):
        if getattr(args, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(args, name)}")
    if any(r < 1 for r in args.looped):
        raise ConfigError(f"looped must list loop counts >= 1, got {args.looped}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gc.disable()  # a collection inside one timed call would land on one model only
    models = bench_models(args.vocab, args.kernel, args.sources, args.seq_len)
    for m in models.values():
        m.train()
    print(f"model: d_model 512, 8 layers, 8 heads / 4 KV heads, head_dim 64, ffn 1536, "
          f"vocab {args.vocab}; Depth-Attention sources={args.sources}; "
          f"threads={torch.get_num_threads()}", flush=True)

    med = statistics.median
    train = bench_train_step(models, args.batch, args.seq_len, args)
    print(f"train step (batch {args.batch} x {args.seq_len} tokens): vanilla "
          f"{med(train['vanilla']) * 1e3:.1f} ms, depth {med(train['depth']) * 1e3:.1f} ms "
          f"(medians of {args.steps})", flush=True)
    kv = kv_cache_bytes(models, args)
    rows = [("plain 8 layers", paired_ratio(train["depth"], train["vanilla"]))]
    for r in args.looped:
        for compiled in (False, True) if args.compile else (False,):
            looped = looped_models(args, r)
            if compiled:  # the first (warm-up) step pays the compile
                torch._dynamo.reset()  # earlier R's graphs would count against its limit
                looped = {k: torch.compile(m) for k, m in looped.items()}
            t = bench_train_step(looped, args.looped_batch, args.looped_seq_len, args)
            name = f"looped 1 layer x R={r}" + (", compiled" if compiled else "")
            rows.append((name, paired_ratio(t["depth"], t["vanilla"])))
            print(f"{name} (d_model 256, batch {args.looped_batch} x {args.looped_seq_len}): "
                  f"vanilla {med(t['vanilla']) * 1e3:.1f} ms, depth "
                  f"{med(t['depth']) * 1e3:.1f} ms", flush=True)

    print("\ntrain-step time, depth / vanilla         value   goal")
    for name, ratio in rows:
        print(f"{name:40s} {ratio:.3f}   <= 1.03")
    print(f"\nKV-cache bytes, depth / vanilla          {kv['depth'] / kv['vanilla']:.3f}"
          "   == 1.000")
    return 0


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
