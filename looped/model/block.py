"""The decoder block: pre-norm RMSNorm, attention (GQA or MLA, with Depth-Attention), SwiGLU MLP."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from looped.model import mla  # noqa: F401  (registers model.attention=mla)
from looped.model.attention import ATTENTION_KINDS, DepthContext, DepthPosition
from looped.model.norm import RMSNorm


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.gate = nn.Linear(d_model, ffn_dim, bias=False)
        self.up = nn.Linear(d_model, ffn_dim, bias=False)
        self.down = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = ATTENTION_KINDS[cfg.attention](cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, ctx: DepthContext, pos: DepthPosition,
                value_hook: Optional[Callable] = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx, pos, value_hook)
        return x + self.mlp(self.mlp_norm(x))

    def branch(self, x: torch.Tensor, ctx: DepthContext, pos: DepthPosition,
               value_hook: Optional[Callable] = None) -> torch.Tensor:
        """forward(x) - x without the rounding of a subtraction: for cross-layer methods that
        accumulate layer outputs themselves."""
        a = self.attn(self.attn_norm(x), ctx, pos, value_hook)
        return a + self.mlp(self.mlp_norm(x + a))
