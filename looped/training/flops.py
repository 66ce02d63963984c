"""FLOPs per token of a LoopedLM at any loop count: what MFU divides by, and what
`python -m looped flops` prints.

Conventions (Kaplan et al.; torch's FlopCounterMode counts the same): a forward costs 2 FLOPs
per weight used per token, plus 4 x H x D x context per depth position for attention (QK^T and
AV over the full context), plus Depth-Attention's mixing. Norms and activations are left out.
Training costs 3 forwards (backward is twice the forward) over the iterations that carry
gradient, and 1 over those run without (truncated backprop, the progressive loss's n);
recomputation by activation checkpointing is not counted (MFU counts the model's FLOPs).
"""

from __future__ import annotations

from typing import Optional

from torch import nn


def linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def other_layers(model, p: int, sources: tuple[int, ...], loops: Optional[int] = None) -> int:
    """How many distinct layers other than p's own the sources of p are (weights, not positions:
    a looped core's earlier iterations are the same layer)."""
    return len({id(model.block_at(j, loops)) for j in sources} - {id(model.block_at(p, loops))})


def depth_attention_flops(model, loops: Optional[int] = None, cfg=None, **kw) -> float:
    """Depth-Attention's FLOPs per token over all positions (cfg: the model config to price,
    default the model's own; the flops tool prices MLA's alternatives with it)."""
    kind, cfg = model.attention_kind, cfg or model.cfg
    return float(sum(kind.depth_flops(cfg, len(s), other_layers(model, p, s, loops), **kw)
                     for p, s in enumerate(model.depth_sources(model._check_loops(loops)))))


def forward_flops_per_token(model, loops: Optional[int] = None,
                            context: Optional[int] = None) -> float:
    """One forward's FLOPs per token at `loops` iterations (default the model's), over a
    context of `context` tokens (default model.max_seq_len)."""
    c = model.cfg
    loops = model._check_loops(loops)
    context = context or c.max_seq_len
    positions = model.layout(loops).n_positions
    weights = sum(linear_weights(model.block_at(p, loops)) for p in range(positions))
    weights += c.vocab_size * c.d_model  # the head (tied or not, it runs once per token)
    if model.adapter is not None:
        weights += model.adapter.weight.numel() * loops
    attention = model.attention_kind.attention_flops(c, context) * positions
    return 2.0 * weights + attention + depth_attention_flops(model, loops)


def train_flops_per_token(model, loops: int, grad_loops: Optional[int] = None,
                          context: Optional[int] = None) -> float:
    """A training forward + backward at `loops` iterations, of which the last `grad_loops`
    (None: all) carry gradient."""
    full = forward_flops_per_token(model, loops, context)
    no_grad = 0 if grad_loops is None else max(0, loops - grad_loops)
    if no_grad == 0:
        return 3 * full
    # what the iterations without gradient cost: the difference of two forwards
    frozen = full - forward_flops_per_token(model, loops - no_grad, context)
    return 3 * full - 2 * frozen
