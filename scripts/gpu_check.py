"""GPU checks, one pass/fail line each (run by scripts/gpu_check.sh; never part of CI).

    bash scripts/gpu_check.sh        # < 5 minutes on one GPU

Each check catches its own failure, so one broken piece does not hide the others; the exit code
is the number of checks that failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from looped import build_model, load_config  # noqa: E402
from looped.model.head_scores import head_ce  # noqa: E402
from looped.model.parallelize import apply_compile  # noqa: E402
from looped.training.flops import train_flops_per_token  # noqa: E402
from looped.training.throughput import device_peak  # noqa: E402

DEVICE = torch.device("cuda")
# on the roots recipe: full causal attention, no state norm (the main job's window and norm are
# not what a GPU check is for)
SMALL = ["recipe=roots_staircase", "loop=4", "model.d_model=256", "model.n_heads=8",
         "model.n_kv_heads=4", "model.head_dim=32", "model.ffn_dim=768", "model.n_layers=2", "model.n_prelude=1",
         "model.n_coda=1", "model.vocab_size=256", "model.max_seq_len=256",
         "model.depth_attention.enabled=true"]


def _model(*extra: str):
    torch.manual_seed(0)
    return build_model(load_config([*SMALL, *extra])).to(DEVICE)


def bf16_training() -> str:
    """A small looped Depth-Attention model trained in bf16 autocast: the loss falls."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    ids = torch.randint(0, 256, (16, 128), device=DEVICE)
    targets = ids.roll(-3, dims=1)  # a copy task the model can learn in a few steps
    losses = []
    for _ in range(60):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids, loops=4).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ok = losses[-1] < 0.7 * losses[0]
    return _line(ok, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def xformers_kernel() -> str:
    """model.kernel=xformers against SDPA, same weights, under bf16 autocast."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return "SKIP (xformers not installed: pip install 'looped[xformers]')"
    sdpa, xf = _model(), _model("model.kernel=xformers")
    xf.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 256, (4, 128), device=DEVICE)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        diff = (sdpa(ids).logits.float() - xf(ids).logits.float()).abs().max().item()
    return _line(diff < 5e-2, f"max |logit diff| {diff:.2e} (bf16)")


def fsdp_nccl() -> str:
    """train.py under torchrun with FSDP2 on NCCL, one rank: it trains and exits 0."""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
             "train.py", "recipe=roots_staircase", "loop=4", "train.steps=20",
             "train.parallel=fsdp", "train.eval_every=20", "eval.n_samples=64", f"out_dir={out}",
             "name=fsdp"],
            cwd=ROOT, capture_output=True, text=True, timeout=240,
            env={**os.environ, "WORLD_SIZE": "1"})
    steps = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    return _line(proc.returncode == 0 and bool(steps),
                 steps[-1] if steps else proc.stderr.strip().splitlines()[-1:])


def compiled_blocks() -> str:
    """train.compile's per-block compile on GPU (inductor): equal to eager, any R."""
    eager, compiled = _model(), _model()
    apply_compile(compiled)
    ids = torch.randint(0, 256, (4, 128), device=DEVICE)
    diff = 0.0
    with torch.no_grad():
        for r in (2, 5, 9):
            diff = max(diff, (eager(ids, loops=r).logits - compiled(ids, loops=r).logits)
                       .abs().max().item())
    return _line(diff < 1e-3, f"max |logit diff| {diff:.2e} at R = 2, 5, 9")


def cuda_graph_decode() -> str:
    """The compiled (CUDA-graph) decoder against eager cached decoding: the same tokens."""
    model = _model().eval()
    prompt = torch.randint(0, 256, (2, 16), device=DEVICE)
    with torch.no_grad():
        eager = model.generate(prompt, max_new_tokens=32, temperature=0)
        graph = model.generate(prompt, max_new_tokens=32, temperature=0, compile=True)
    same = torch.equal(eager, graph)
    return _line(same, "greedy tokens equal" if same else "greedy tokens differ")


def mfu_360m() -> str:
    """One training step of the 360M preset (bf16 autocast, seq 2048): its MFU."""
    torch.manual_seed(0)
    cfg = load_config(["recipe=roots_staircase", "model=360m", "loop=1",
                       "train.loop_sampling.sampler=fixed"])
    model = build_model(cfg).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.model.vocab_size, (8, 2048), device=DEVICE)
    seconds = []
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, logits=False)
        loss = head_ce(model.head, out.hidden, ids.roll(-1, 1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    step = min(seconds[1:])  # the first step warms up
    flops = train_flops_per_token(model, 1, None, 2048) * ids.numel()
    peak, source = device_peak(DEVICE)
    mfu = flops / step / peak if peak else float("nan")
    return _line(peak is not None and mfu > 0.1,
                 f"{ids.numel() / step:,.0f} tok/s, MFU {100 * mfu:.1f}% of {source}")


def _line(ok: bool, detail) -> str:
    return f"{'PASS' if ok else 'FAIL'} ({detail})"


CHECKS = [bf16_training, xformers_kernel, fsdp_nccl, compiled_blocks, cuda_graph_decode, mfu_360m]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU check needs one")
        return 1
    print(f"GPU check on {torch.cuda.get_device_name(DEVICE)}, torch {torch.__version__}")
    failed = 0
    for check in CHECKS:
        t0 = time.perf_counter()
        try:
            result = check()
        except Exception as e:  # a check that crashes fails; the others still run
            result = f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        failed += result.startswith("FAIL")
        print(f"{check.__name__:18s} {result}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
