"""`python train.py loop=8 ...`: train a looped Depth-Attention model on a built-in task."""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from looped import build_model, load_config
from looped.data.tasks import IGNORE, build_task
from looped.errors import ConfigError, cli_main
from looped.model.kernels import check_kernel


def lr_at(step: int, cfg) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def accuracy(model, task, loops: int, n: int, seed: int) -> float:
    batch = task.sample(n, torch.Generator().manual_seed(seed))
    pred = model(batch.inputs, loops=loops).logits.argmax(-1)
    mask = batch.targets != IGNORE
    return (pred[mask] == batch.targets[mask]).float().mean().item()


def main(argv: list[str]) -> int:
    cfg = load_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task)
    if task.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"task '{cfg.task.name}' needs vocab_size >= {task.vocab_size}, "
                          f"model.vocab_size is {cfg.model.vocab_size}")
    if task.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"task '{cfg.task.name}' makes sequences of {task.seq_len} tokens, "
                          f"model.max_seq_len is {cfg.model.max_seq_len}")
    check_kernel(cfg.model.kernel, "cpu")
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, loop={cfg.loop}, "
          f"depth sources={model.policy}; task={cfg.task.name}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.train.steps), desc="train", dynamic_ncols=True, disable=None)
    t0, tokens = time.perf_counter(), 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = task.sample(cfg.train.batch_size, gen)
        logits = model(batch.inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(),
                               ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        tokens += batch.inputs.numel()
        bar.set_postfix(loss=f"{loss.item():.4f}",
                        tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            tqdm.write(f"step {step + 1:5d}  loss {loss.item():.4f}  lr {lr_at(step, cfg):.2e}")
    model.eval()
    loops = sorted({1, max(1, cfg.loop // 2), cfg.loop, 2 * cfg.loop})
    print("held-out accuracy by loop count:")
    for r in loops if cfg.model.share_weights else [cfg.loop]:
        print(f"  loops={r:3d}  acc={accuracy(model, task, r, 512, cfg.seed + 10_000):.3f}")
    return 0


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
