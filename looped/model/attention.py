"""GQA causal self-attention with QK-norm and RoPE, whose value is first mixed across depth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from looped.model.cache import ActivationStore, KVCache
from looped.model.depth import DepthWeights, depth_mix
from looped.model.kernels import attend
from looped.model.norm import RMSNorm
from looped.model.rope import RotaryEmbedding


@dataclass
class DepthStep:
    """What one layer application needs to know about its depth position, and what it reports."""

    position: int
    sources: tuple[int, ...]  # earlier depth positions Depth-Attention reads; () means vanilla
    store: Union[ActivationStore, KVCache]
    raw_mix: bool = False  # mix=raw: sources contribute raw values, not mixed ones
    want_depth_weights: bool = False
    want_attn_weights: bool = False
    # (B, T) tokens that exited earlier: they keep the entries of position frozen_from
    frozen: Optional[torch.Tensor] = None
    frozen_from: Optional[int] = None
    # a cross-layer method's change to the value (B, Hkv, T, D), e.g. value residual learning
    value_hook: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    depth_weights: Optional[DepthWeights] = None
    attn_weights: Optional[torch.Tensor] = None  # (B, H, Tq, Tk)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.kernel = cfg.kernel
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)  # per head, before RoPE (Qwen3)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, step: DepthStep) -> torch.Tensor:
        b, t, _ = x.shape
        h, h_kv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_norm(self.q_proj(x).view(b, t, h, d))
        k = self.k_norm(self.k_proj(x).view(b, t, h_kv, d))
        v = self.v_proj(x).view(b, t, h_kv, d).transpose(1, 2)  # (B, Hkv, T, D)
        if step.value_hook is not None:
            v = step.value_hook(v)
        offset = step.store.offset
        q = rope(q.transpose(1, 2), offset)  # (B, H, T, D)
        k = rope(k.transpose(1, 2), offset)  # (B, Hkv, T, D)

        raw_v = v if step.raw_mix else None
        if step.sources:
            k_src, v_src = step.store.depth_sources(step.position, step.sources, k, v,
                                                    raw=step.raw_mix)
            v, alpha = depth_mix(q, k_src, v_src)  # v: (B, Hkv, T, D) mixed across depth
            if step.want_depth_weights:
                step.depth_weights = DepthWeights(alpha.transpose(1, 2).detach(),
                                                  step.sources + (step.position,))
        elif step.want_depth_weights:  # no source: all weight on itself, exactly vanilla
            step.depth_weights = DepthWeights(v.new_ones(b, t, h_kv, 1), (step.position,))
        if step.frozen is not None:
            k, v, raw_v = self._keep_frozen(step, k, v, raw_v)
        step.store.put(step.position, k, v, raw_v)

        k_all, v_all = step.store.history(step.position)  # (B, Hkv, Tk, D)
        out, weights = attend(q, k_all, v_all, kernel=self.kernel, q_offset=offset,
                              need_weights=step.want_attn_weights)
        step.attn_weights = weights
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * d))

    @staticmethod
    def _keep_frozen(step: DepthStep, k, v, raw_v):
        """Exited tokens reuse their last key and mixed value (and raw value, for mix=raw)."""
        keep = step.frozen[:, None, :, None]  # (B, 1, T, 1)
        k_old, v_old, raw_old = step.store.entries(step.frozen_from)
        k, v = torch.where(keep, k_old, k), torch.where(keep, v_old, v)
        if raw_v is not None:
            raw_v = torch.where(keep, raw_old, raw_v)
        return k, v, raw_v
