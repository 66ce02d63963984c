"""`looped bench depth`: Depth-Attention against vanilla, same weights, timed in the same run.

    looped bench depth                          # d_model 512, 8 layers
    looped bench depth steps=5 decode_tokens=64

This machine is noisy, so the two models are timed in alternation (A B A B ...) and each figure
is the median over repeats; only the ratios are meant to be compared across machines.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from looped import build_model, load_config
from looped.config import parse_tool_args
from looped.config_help import tool_help
from looped.errors import ConfigError, cli_main

BENCH_MODEL = ["model=bench", "loop=1"]  # configs/model/bench.yaml: d_model 512, 8 layers


def _models(args) -> dict[str, torch.nn.Module]:
    longest = max(1024, args.seq_len, args.prompt_len + args.decode_tokens)
    base = BENCH_MODEL + [f"model.vocab_size={args.vocab}", f"model.kernel={args.kernel}",
                          f"model.max_seq_len={longest}"]
    vanilla = build_model(load_config(base + ["model.depth_attention.enabled=false"]))
    depth = build_model(load_config(base + [f"model.depth_attention.sources={args.sources}"]))
    depth.load_state_dict(vanilla.state_dict())  # same weights: only the value mixing differs
    return {"vanilla": vanilla, "depth": depth}


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


def bench_train_step(models, args) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
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


@torch.no_grad()
def bench_decode(models, args) -> dict[str, list[float]]:
    """Seconds per cached one-token decode step after a prompt of prompt_len tokens.

    The models decode token by token in alternation (A B, then B A), each with its own cache,
    so that both see the same load at nearly the same moment."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len), generator=gen)
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for _ in range(args.repeats):
        caches = {k: m.new_cache(1, args.prompt_len + args.decode_tokens)
                  for k, m in models.items()}
        nxt = {}
        for k, m in models.items():
            nxt[k] = m(prompt, cache=caches[k]).logits[:, -1:].argmax(-1)
        for i in range(args.decode_tokens):
            for k in names if i % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                logits = models[k](nxt[k], cache=caches[k]).logits
                times[k].append(time.perf_counter() - t0)
                nxt[k] = logits[:, -1:].argmax(-1)
    return times


def kv_cache_bytes(models, args) -> dict[str, int]:
    return {k: m.new_cache(1, args.seq_len).nbytes for k, m in models.items()}


@dataclass
class BenchDepthArgs:
    seq_len: int = 256  # training sequence length
    batch: int = 4  # training batch
    vocab: int = 256  # vocabulary size
    sources: str = "strided"  # Depth-Attention source policy
    kernel: str = "sdpa"  # sequence-attention kernel
    steps: int = 16  # timed training steps per model
    prompt_len: int = 128  # decode prompt length
    decode_tokens: int = 128  # new tokens (prompt + new = 256 by default)
    repeats: int = 3  # decode runs per model
    threads: int = 0  # torch threads; 0: default


def help_text(argv: list[str] = ()) -> str:
    return tool_help(__doc__, BenchDepthArgs)


def main(argv: list[str]) -> int:
    args: BenchDepthArgs = parse_tool_args(BenchDepthArgs, argv)
    for name in ("seq_len", "batch", "vocab", "steps", "prompt_len", "decode_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gc.disable()  # a collection inside one timed call would land on one model only
    models = _models(args)
    print(f"model: d_model 512, 8 layers, 8 heads / 4 KV heads, head_dim 64, ffn 1536, "
          f"vocab {args.vocab}; Depth-Attention sources={args.sources}; "
          f"threads={torch.get_num_threads()}", flush=True)

    med = statistics.median
    train = bench_train_step(models, args)
    print(f"train step (batch {args.batch} x {args.seq_len} tokens): vanilla "
          f"{med(train['vanilla']) * 1e3:.1f} ms, depth {med(train['depth']) * 1e3:.1f} ms "
          f"(medians of {args.steps})", flush=True)
    decode = bench_decode(models, args)
    print(f"cached decode (batch 1, prompt {args.prompt_len} + {args.decode_tokens} tokens): "
          f"vanilla {1 / med(decode['vanilla']):.1f} tok/s, depth "
          f"{1 / med(decode['depth']):.1f} tok/s (medians of {len(decode['depth'])} steps)",
          flush=True)
    kv = kv_cache_bytes(models, args)

    print("\nratio                                    value   goal")
    print(f"train-step time, depth / vanilla         "
          f"{paired_ratio(train['depth'], train['vanilla']):.3f}   <= 1.03")
    print(f"cached-decode tok/s, depth / vanilla     "
          f"{med(decode['vanilla']) / med(decode['depth']):.3f}   >= 0.97")
    print(f"KV-cache bytes, depth / vanilla          {kv['depth'] / kv['vanilla']:.3f}"
          "   == 1.000")
    return 0


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
