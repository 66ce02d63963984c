"""Held-out scoring of a model on a built-in task, at any loop count."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from omegaconf import OmegaConf, open_dict

from looped.data import build_task
from looped.data.base import IGNORE, Task
from looped.errors import ConfigError
from looped.data.text import TextTask
from looped.model.head_scores import head_scores
from looped.model.exit import ExitCriterion
from looped.training.device import autocast


@dataclass
class GridConfig:
    """The `eval.grid` node: after training, held-out scores on a grid of task difficulties x
    loop counts (the task's held-out split with task.eval.<knob> = each level, at eval.loops),
    as `looped eval knob=... levels=...` scores a saved run."""

    knob: str = ""  # a knob of the task (e.g. length, hops)
    levels: list[int] = field(default_factory=list)  # the knob's values, one row each; []: no grid
    n_samples: int = 256  # held-out sequences per cell


@dataclass
class EvalConfig:
    """The `eval` node: what training scores on the held-out split."""

    # loop counts to score during training; empty: follow `loop` (see default_eval_loops)
    loops: list[int] = field(default_factory=list)
    n_samples: int = 1024  # held-out sequences per loop count
    # held-out sequences per forward; 0: as many as fit the memory budget (eval_batch_size)
    batch_size: int = 0
    grid: GridConfig = field(default_factory=GridConfig)


# Automatic evaluation batches (eval.batch_size=0): at most this many rows, the old fixed default,
MAX_EVAL_BATCH = 256
# within this share of the GPU's free memory, or this many bytes on CPU
GPU_MEMORY_SHARE = 0.25
CPU_MEMORY_BUDGET = 2 * 2 ** 30
# live activations of one no-grad layer per token, in widths of max(d_model, ffn_dim): its input,
# the attention's q/k/v and output, the FFN's gate, up and product
ACTIVATION_WIDTHS = 6


def eval_batch_size(model, seq_len: int, loops: int, device: torch.device) -> int:
    """Rows per scoring forward that fit the memory budget: each token holds its keys and mixed
    values at every depth position (an upper bound: without Depth-Attention they are dropped),
    plus one layer's activations; the head runs in chunks of its own (looped.model.head_scores).
    At a 50k vocabulary and 2k context the old fixed 256 rows needed 105 GB for logits alone."""
    cfg = model.cfg
    width = max(cfg.d_model, cfg.ffn_dim) * model.embed.weight.element_size()
    per_token = model.cache_bytes_per_token(loops) + ACTIVATION_WIDTHS * width
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = GPU_MEMORY_SHARE * free
    else:
        budget = CPU_MEMORY_BUDGET
    return int(max(1, min(MAX_EVAL_BATCH, budget // (seq_len * per_token))))


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
    if batch_size == 0:
        batch_size = eval_batch_size(model, task.seq_len, loops, device)
    correct = total = solved = 0
    iters = nll = 0.0
    done = 0
    while done < n_samples:
        batch = task.sample(min(batch_size, n_samples - done), gen).to(device)
        out, ce, right = forward_scores(model, batch.inputs, batch.targets, loops=loops,
                                        exit=exit, kv=kv)
        mask = batch.targets != IGNORE
        correct += right.sum().item()
        solved += (right | ~mask).all(dim=1).sum().item()
        total += mask.sum().item()
        iters += out.iterations[mask].float().sum().item()
        nll += ce.sum().item()
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


GRID_METRICS = ("accuracy", "solved", "loss", "iterations")


def level_task(task_cfg, knob: str, level, owner: str = "") -> Task:
    """The held-out task with task.eval.<knob> = level (its other knobs as configured); owner
    names whose task it is in errors ("of <run>")."""
    knobs = [k for k in task_cfg if k not in ("name", "eval")]
    if knob not in knobs:
        raise ConfigError(f"knob={knob}: task '{task_cfg.name}'{owner} has no such knob; its "
                          f"knobs: {', '.join(knobs)}")
    node = OmegaConf.create(OmegaConf.to_container(task_cfg))
    with open_dict(node):
        node.eval[knob] = level
    return build_task(node, split="eval")


def check_fits(task: Task, model_cfg, what: str) -> None:
    """A one-line error where the model cannot read the task's sequences."""
    if task.seq_len > model_cfg.max_seq_len or task.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"{what}: the task needs sequences of {task.seq_len} tokens and a "
                          f"vocabulary of {task.vocab_size}; the model was built for "
                          f"{model_cfg.max_seq_len} and {model_cfg.vocab_size}")


def score_grid(model, tasks: dict, loops: list[int], n_samples: int, batch_size: int, seed: int,
               exit=None, kv: Optional[str] = None, log=None) -> dict:
    """{level: {R: GRID_METRICS}} for each level's task (from level_task) at each loop count."""
    cells = {}
    for level, task in tasks.items():
        cells[level] = {}
        for r in loops:
            res = task_accuracy(model, task, r, n_samples, batch_size, seed, exit=exit, kv=kv)
            cells[level][r] = {k: res[k] for k in GRID_METRICS}
            if log:
                log(level, r, res)
    return cells


def forward_scores(model, inputs: torch.Tensor, targets: torch.Tensor, *,
                   loops: Optional[int] = None, exit=None, kv: Optional[str] = None):
    """(output, cross-entropy, right) per token (B, T) of one scoring forward: the head runs in
    chunks of answer tokens (looped.model.head_scores), so no (B, T, vocab) logits are built; a
    cached decode (kv) scores the logits it made token by token."""
    with autocast(inputs.device):
        if kv is None:
            out = model(inputs, loops=loops, exit=exit, logits=False)
            return (out, *head_scores(model.head, out.hidden, targets))
        out = model.cached_forward(inputs, kv=kv, loops=loops, exit=exit)
        return (out, *head_scores(lambda logits: logits, out.logits, targets))


@torch.no_grad()
def lm_metrics(model, task: TextTask, loops: Optional[int] = None,
               max_batches: Optional[int] = None, batch_size: int = 32,
               kv: Optional[str] = None) -> dict:
    """Language-modelling metrics of `model` (a LoopedLM: `model(inputs, loops=loops).logits`,
    or with kv its cached decode of each window, see LoopedLM.cached_forward) on the task's
    deterministic held-out windows (whatever the task's own split):
    loss (nats per token), bits_per_byte (total nats / (ln 2 * bytes the scored tokens cover)),
    perplexity (exp(loss)), tokens and bytes scored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats, tokens, n_bytes = 0.0, 0, 0
    try:
        for batch in task.held_out_batches(batch_size, max_batches):
            targets = batch.targets.to(device)
            _, ce, _ = forward_scores(model, batch.inputs.to(device), targets, loops=loops, kv=kv)
            nats += ce.sum().item()
            tokens += int((targets != IGNORE).sum())
            n_bytes += task.n_bytes(batch.targets)
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ConfigError("no held-out windows to evaluate: the held-out text is shorter than "
                          "task.seq_len + 1 tokens")
    loss = nats / tokens
    return dict(loss=loss, bits_per_byte=nats / (math.log(2) * n_bytes),
                perplexity=math.exp(loss), tokens=tokens, bytes=n_bytes)
