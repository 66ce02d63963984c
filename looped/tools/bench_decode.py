"""`looped bench decode`: one-token decode at batch 1, eager and compiled, vanilla and
Depth-Attention (same weights), each against the memory-bandwidth bound measured in the
same process; batched adaptive exit with and without dropping the exited rows; and cached
decode against recomputing the prefix.

    looped bench decode                      # d_model 512, 8 layers (configs/model/bench.yaml)
    looped bench decode compile=false recompute_tokens=0 exit_batches=[]

The bound: a decode step must read every weight and the cache entries it attends to, so
tokens/s <= bandwidth / (weight bytes + cache bytes read). The bandwidth is the faster of two
measured here on the same threads: a large fp32 matrix-vector product (torch.mv), and the
model's own weight matrices read once by compiled fused reductions (the weights-only part of a
step). The eager cache reads the tokens so far; the compiled step reads its whole
preallocated buffer (masked).
Models are timed in alternation (A B, then B A) and each figure is a median.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from looped import build_model, load_config
from looped.config import parse_tool_args
from looped.config_help import tool_help
from looped.errors import ConfigError, cli_main
from looped.model.exit import ExitCriterion
from looped.tools.bench_depth import bench_models

MV_SIZE = 4096  # a 64 MiB fp32 matrix: far larger than the caches, so it streams from memory


@dataclass
class BenchDecodeArgs:
    prompt_len: int = 128  # prompt tokens, prefilled once per repeat
    decode_tokens: int = 128  # timed one-token steps per repeat
    repeats: int = 3  # prompt + decode runs per model
    sources: str = "strided"  # Depth-Attention source policy
    compile: bool = True  # also time the compiled step (first compile: tens of seconds)
    recompute_tokens: int = 512  # new tokens for cached vs recompute; 0 skips it
    exit_batches: list[int] = field(default_factory=lambda: [1, 8, 32, 64])  # []: skip
    exit_steps: int = 32  # timed decode steps per batched-exit setting
    vocab: int = 256  # vocabulary size
    threads: int = 0  # torch threads; 0: default


def help_text(argv: list[str] = ()) -> str:
    return tool_help(__doc__, BenchDecodeArgs)


def _median_seconds(fn, repeats: int) -> float:
    for _ in range(3):  # warm-up
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matvec_bandwidth(repeats: int = 30) -> float:
    """Bytes per second a BLAS matrix-vector product (torch.mv) streams from a large matrix."""
    w = torch.randn(MV_SIZE, MV_SIZE)
    x, y = torch.randn(MV_SIZE), torch.empty(MV_SIZE)
    return w.nbytes / _median_seconds(lambda: torch.mv(w, x, out=y), repeats)


def weight_stream_bandwidth(model, repeats: int = 30) -> float:
    """Bytes per second of reading the model's own weight matrices once, as matrix-vector
    products written as fused reductions and compiled: the weights-only part of a decode step
    with nothing else in it."""
    mats = [p.detach() for p in model.parameters() if p.dim() == 2]
    if model.lm_head is not None:  # untied: the input embedding is a lookup, not a product
        mats = [m for m in mats if m is not model.embed.weight.detach()]
    if model.pos_embed is not None:
        mats = [m for m in mats if m is not model.pos_embed.weight.detach()]
    xs = {m.shape[1]: torch.randn(m.shape[1]) for m in mats}

    @torch.compile
    def read_all(mats, xs):
        return [(m * xs[m.shape[1]]).sum(-1) for m in mats]

    nbytes = sum(m.nbytes for m in mats)
    return nbytes / _median_seconds(lambda: read_all(mats, xs), repeats)


def weight_bytes(model) -> int:
    """Bytes of the parameters one decode step reads: all but the unused rows of an input
    embedding that the head does not share."""
    total = sum(p.nbytes for p in model.parameters())
    if model.lm_head is not None:  # untied: the embedding lookup reads one row
        total -= model.embed.weight.nbytes
    if model.pos_embed is not None:
        total -= model.pos_embed.weight.nbytes
    return total


@torch.no_grad()
def time_decode(steppers: dict, prompt: torch.Tensor, args) -> dict[str, list[float]]:
    """Seconds per decode step of each stepper (name -> Stepper), alternating."""
    times: dict[str, list[float]] = {k: [] for k in steppers}
    names = list(steppers)
    for _ in range(args.repeats):
        nxt = {}
        for k, stepper in steppers.items():
            stepper.reset()
            nxt[k] = stepper.prefill(prompt)[:, -1:].argmax(-1)
        for i in range(args.decode_tokens):
            for k in names if i % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                logits = steppers[k].step(nxt[k])
                times[k].append(time.perf_counter() - t0)
                nxt[k] = logits[:, -1:].argmax(-1)
    return times


class Stepper(NamedTuple):
    """One way to decode: prefill(prompt ids) and step(one token's ids) -> logits, and reset()
    to start a new sequence."""

    prefill: Callable[[torch.Tensor], torch.Tensor]
    step: Callable[[torch.Tensor], torch.Tensor]
    reset: Callable[[], None]


def eager_stepper(model, max_len: int) -> Stepper:
    state = {}

    def reset():
        state["cache"] = model.new_cache(1, max_len)

    def run(ids):
        return model(ids, cache=state["cache"]).logits
    return Stepper(prefill=run, step=run, reset=reset)


def compiled_stepper(model, max_len: int) -> Stepper:
    decoder = model.compiled_decoder(1, max_len)
    return Stepper(prefill=decoder.prefill, step=decoder.step, reset=decoder.reset)


def bench_recompute(model, args) -> dict[str, float]:
    prompt = torch.randint(0, args.vocab, (1, 16), generator=torch.Generator().manual_seed(2))
    out = {}
    for name, kw in (("cached", {}), ("compiled", {"compile": True}),
                     ("recompute", {"use_cache": False})):
        if name == "compiled" and not args.compile:
            continue
        if name == "compiled":  # compile the decoder of this length outside the timing
            decoder = model.compiled_decoder(1, prompt.shape[1] + args.recompute_tokens)
            decoder.reset()
            decoder.step(decoder.prefill(prompt)[:, -1:].argmax(-1))
        t0 = time.perf_counter()
        model.generate(prompt, args.recompute_tokens, temperature=0, **kw)
        out[name] = time.perf_counter() - t0
    return out


class StaggeredExit(ExitCriterion):
    """Row b of the batch stops after 1 + (b mod R) iterations: a fixed spread of iteration
    counts, so the timing shows what dropping exited rows buys, whatever a criterion decides."""

    def __init__(self, loops: int, drop_rows_from: int):
        self.loops, self.drop_rows_from = loops, drop_rows_from

    def check(self, it) -> torch.Tensor:
        b, t = it.state.shape[:2]
        after = 1 + torch.arange(b, device=it.state.device) % self.loops
        return (it.r + 1 >= after)[:, None].expand(b, t)


EXIT_MODEL = ("model=bench", "model.n_layers=1", "loop=8", "train.loop_sampling.sampler=fixed")


@torch.no_grad()
def bench_batched_exit(args) -> None:
    """Decode steps of a looped bench-width model (one 512-wide core layer, R = 8) at each
    batch size: fixed R, StaggeredExit with exited rows dropped, and with every row kept."""
    model = build_model(load_config(list(EXIT_MODEL) + [f"model.vocab_size={args.vocab}"]))
    model.eval()
    loops = model.loop
    print(f"\n== batched exit, one 512-wide core layer x R={loops}: row b stops after "
          f"1 + (b mod {loops}) iterations; {args.exit_steps} decode steps after a "
          f"{args.exit_steps}-token prompt ==")
    print("batch  iters/R  fixed ms/step  exit, rows dropped  exit, rows kept   (time / fixed)")
    for b in args.exit_batches:
        ids = torch.randint(0, args.vocab, (b, 2 * args.exit_steps))
        times = {}
        for name, exit in (("fixed", None), ("dropped", StaggeredExit(loops, 1)),
                           ("kept", StaggeredExit(loops, 0))):
            best = float("inf")
            for _ in range(args.repeats):
                cache = model.new_cache(b, ids.shape[1])
                model(ids[:, :args.exit_steps], cache=cache)
                t0 = time.perf_counter()
                for t in range(args.exit_steps, ids.shape[1]):
                    model(ids[:, t:t + 1], cache=cache, exit=exit)
                best = min(best, (time.perf_counter() - t0) / args.exit_steps)
            times[name] = best
        iters = float((1 + torch.arange(b) % loops).float().mean()) / loops
        print(f"{b:5d}  {iters:7.2f}  {times['fixed'] * 1e3:13.1f}  "
              f"{times['dropped'] / times['fixed']:18.2f}  {times['kept'] / times['fixed']:15.2f}",
              flush=True)


def main(argv: list[str]) -> int:
    args: BenchDecodeArgs = parse_tool_args(BenchDecodeArgs, argv)
    for name in ("prompt_len", "decode_tokens", "repeats", "vocab", "exit_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.recompute_tokens < 0 or any(b < 1 for b in args.exit_batches):
        raise ConfigError("recompute_tokens must be >= 0 (0 skips it) and every exit batch "
                          ">= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gc.disable()  # a collection inside one timed step would land on one model only
    longest = max(args.prompt_len + args.decode_tokens, 16 + args.recompute_tokens)
    models = bench_models(args.vocab, "sdpa", args.sources, longest)
    max_len = args.prompt_len + args.decode_tokens
    bw_mv = matvec_bandwidth()
    bw_weights = weight_stream_bandwidth(models["vanilla"])
    bw = max(bw_mv, bw_weights)  # the bound: the fastest streaming measured here
    print(f"model: configs/model/bench.yaml, vocab {args.vocab}; Depth-Attention "
          f"sources={args.sources}; threads={torch.get_num_threads()}")
    print(f"matrix-vector bandwidth: torch.mv ({MV_SIZE}x{MV_SIZE} fp32) {bw_mv / 1e9:.1f} GB/s;"
          f" the model's weights as compiled fused reductions {bw_weights / 1e9:.1f} GB/s; "
          f"the bound uses {bw / 1e9:.1f} GB/s", flush=True)

    steppers = {f"{k} eager": eager_stepper(m, max_len) for k, m in models.items()}
    if args.compile:
        for k, m in models.items():
            compiled = steppers[f"{k} compiled"] = compiled_stepper(m, max_len)
            prompt = torch.randint(0, args.vocab, (1, args.prompt_len))
            compiled.reset()
            compiled.prefill(prompt)
            t0 = time.perf_counter()
            compiled.step(prompt[:, :1])  # compile outside the timing
            print(f"compiled {k} step in {time.perf_counter() - t0:.1f} s", flush=True)
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(1))
    times = time_decode(steppers, prompt, args)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'decode (batch 1)':24s} {'tok/s':>8s} {'bound':>8s} {'fraction':>9s}   "
          f"(prompt {args.prompt_len} + {args.decode_tokens} tokens, medians of "
          f"{args.repeats * args.decode_tokens} steps)")
    for k, sec in med.items():
        model = models[k.split()[0]]
        cached_tokens = (compiled_len(model, max_len) if k.endswith("compiled")
                         else args.prompt_len + args.decode_tokens / 2)
        step_bytes = weight_bytes(model) + model.cache_bytes_per_token() * cached_tokens
        print(f"{k:24s} {1 / sec:8.1f} {bw / step_bytes:8.1f} {step_bytes / (bw * sec):9.3f}"
              f"   reads {step_bytes / 1e6:.1f} MB/step")
    print("\nratio                                          value   goal")
    for mode in ("eager", "compiled") if args.compile else ("eager",):
        goal = ">= 0.97" if mode == "compiled" else ""
        print(f"decode tok/s, depth / vanilla ({mode:8s})      "
              f"{med[f'vanilla {mode}'] / med[f'depth {mode}']:.3f}   {goal}")
    if args.compile:
        print(f"compiled / eager tok/s (vanilla)               "
              f"{med['vanilla eager'] / med['vanilla compiled']:.3f}")
    if args.exit_batches:
        bench_batched_exit(args)
    if args.recompute_tokens:
        rec = bench_recompute(models["vanilla"], args)
        print(f"\n== {args.recompute_tokens} greedy tokens after a 16-token prompt (vanilla) ==")
        for name, sec in rec.items():
            print(f"{name:10s} {sec:7.2f} s" + ("" if name == "recompute" else
                                               f"   recompute / {name}: "
                                               f"{rec['recompute'] / sec:.1f}x (goal >= 10x)"))
    return 0


def compiled_len(model, max_len: int) -> int:
    return model.compiled_decoder(1, max_len).cache.max_len


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
