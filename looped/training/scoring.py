"""Held-out scoring of a model on a built-in task, at any loop count."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from looped.data.base import IGNORE, Task
from looped.data.text import TextTask, lm_metrics
from looped.model.exit import ExitCriterion


@dataclass
class EvalConfig:
    """The `eval` node: what training scores on the held-out split."""

    # loop counts to score during training; empty: follow `loop` (see default_eval_loops)
    loops: list[int] = field(default_factory=list)
    n_samples: int = 1024  # held-out sequences per loop count
    batch_size: int = 256  # held-out sequences per forward


def default_eval_loops(loop: int) -> list[int]:
    """What training scores when eval.loops is empty: a plain decoder (loop=1) at R = 1 only; a
    looped model at 1..loop (above 8: 1, 2, 3, 4, 6, 8, 12, ... and loop) and past it, at 1.5
    and 2 times loop."""
    if loop == 1:
        return [1]
    ladder = {k * 2 ** e for k in (2, 3) for e in range(loop.bit_length())}
    inside = range(1, loop + 1) if loop <= 8 else {1, loop} | {r for r in ladder if r <= loop}
    return sorted(set(inside) | {loop + loop // 2, 2 * loop})


def eval_loops(cfg) -> list[int]:
    """The loop counts training evaluates: eval.loops, or default_eval_loops(loop)."""
    return list(cfg.eval.loops) or default_eval_loops(cfg.loop)


# Held-out data comes from a seed stream disjoint from training's (seed, step) draws.
HELD_OUT_SEED_OFFSET = 1_000_003


@torch.no_grad()
def task_accuracy(model, task: Task, loops: int, n_samples: int, batch_size: int, seed: int,
                  exit: Optional[ExitCriterion] = None, kv: Optional[str] = None
                  ) -> dict[str, float]:
    """Exact-match accuracy and cross-entropy on answer tokens (next-token accuracy for text),
    `solved`: the fraction of sequences with every answer token right (a whole prefix-sum string,
    as Bansal et al. score), mean iterations per answer token, and for text also bits per byte
    and perplexity.

    kv: score through a cache of this policy, every token decoded one at a time
    (LoopedLM.cached_forward); None: one full forward per batch."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed + HELD_OUT_SEED_OFFSET)
    device = next(model.parameters()).device
    correct = total = solved = 0
    iters = nll = 0.0
    done = 0
    while done < n_samples:
        batch = task.sample(min(batch_size, n_samples - done), gen).to(device)
        if kv is None:
            out = model(batch.inputs, loops=loops, exit=exit)
        else:
            out = model.cached_forward(batch.inputs, kv=kv, loops=loops, exit=exit)
        mask = batch.targets != IGNORE
        right = (out.logits.argmax(-1) == batch.targets) | ~mask
        correct += (right & mask).sum().item()
        solved += right.all(dim=1).sum().item()
        total += mask.sum().item()
        iters += out.iterations[mask].float().sum().item()
        nll += F.cross_entropy(out.logits[mask].float(), batch.targets[mask], reduction="sum").item()
        done += batch.inputs.shape[0]
    model.train(was_training)
    result = {"accuracy": correct / max(total, 1), "solved": solved / max(done, 1),
              "iterations": iters / max(total, 1),
              "loss": nll / max(total, 1)}
    if isinstance(task, TextTask):  # language modelling: loss over whole windows, bits per byte
        lm = lm_metrics(model, task, loops, max_batches=max(1, n_samples // batch_size),
                        batch_size=batch_size, kv=kv)
        result.update({k: lm[k] for k in ("loss", "bits_per_byte", "perplexity")})
    return result
