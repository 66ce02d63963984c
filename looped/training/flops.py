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
    return float(sum(_depth_flops(model, loops, cfg, **kw)))


def _depth_flops(model, loops: Optional[int], cfg=None, **kw) -> list[int]:
    kind, cfg = model.attention_kind, cfg or model.cfg
    return [kind.depth_flops(cfg, len(s), other_layers(model, p, s, loops), **kw)
            for p, s in enumerate(model.depth_sources(model._check_loops(loops)))]


def position_flops(model, loops: Optional[int] = None, context: Optional[int] = None
                   ) -> list[float]:
    """Forward FLOPs per token of each depth position (its layer, attention and
    Depth-Attention) at `loops` iterations over a context of `context` tokens."""
    c = model.cfg
    loops = model._check_loops(loops)
    attention = model.attention_kind.attention_flops(c, context or c.max_seq_len)
    return [2.0 * linear_weights(model.block_at(p, loops)) + attention + depth
            for p, depth in enumerate(_depth_flops(model, loops))]


def forward_flops_per_token(model, loops: Optional[int] = None,
                            context: Optional[int] = None) -> float:
    """One forward's FLOPs per token at `loops` iterations (default the model's), over a
    context of `context` tokens (default model.max_seq_len)."""
    c = model.cfg
    loops = model._check_loops(loops)
    head = 2.0 * c.vocab_size * c.d_model  # tied or not, it runs once per token
    adapter = 0.0 if model.adapter is None else 2.0 * model.adapter.weight.numel() * loops
    return sum(position_flops(model, loops, context)) + head + adapter


def train_flops_per_token(model, loops: int, grad_loops: Optional[int] = None,
                          context: Optional[int] = None) -> float:
    """A training forward + backward at `loops` iterations, of which the last `grad_loops`
    (None: all) carry gradient."""
    full = forward_flops_per_token(model, loops, context)
    no_grad = 0 if grad_loops is None else max(0, loops - grad_loops)
    if no_grad == 0:
        return 3 * full
    layout = model.layout(loops)
    first_core = layout.n_prelude
    frozen = sum(position_flops(model, loops, context)[first_core:first_core
                                                      + no_grad * layout.n_core])
    if model.adapter is not None:
        frozen += 2.0 * model.adapter.weight.numel() * no_grad
    return 3 * full - 2 * frozen
