"""Rotary position embedding (rotate-half convention), precomputed for max_seq_len positions."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (T, D)
        # not persistent: derived from the config, so checkpoints carry only learned weights
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int | torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, T, D) whose tokens sit at positions offset .. offset + T - 1; offset
        may be a 0-d tensor (a compiled decode step, where a Python int would be baked in)."""
        t = x.shape[-2]
        if isinstance(offset, torch.Tensor):
            idx = offset + torch.arange(t, device=offset.device)
            cos, sin = self.cos.index_select(0, idx), self.sin.index_select(0, idx)
        else:
            cos, sin = self.cos[offset:offset + t], self.sin[offset:offset + t]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
