"""Value residual learning (ResFormer, Zhou et al. 2024): every layer's value mixes in the first
layer's value of the same token,

    V'_n = lambda_1 V_n + lambda_2 V_1        (n >= 2; V_1 itself is unchanged),

with lambda fixed at 0.5 / 0.5, or learnable per depth position (initialised at 0.5 / 0.5). V'_n
goes where V_n went: into Depth-Attention when it is on, then into the cache's V slot.

Extra parameters: 0, or 2 (S - 1) when learnable. No state beyond the KV cache: V_1 of a token is
exactly the cache's V entry at depth position 0 (no depth source precedes it).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable, Optional

import torch
from torch import nn

from looped.model.cross_layer.base import CrossLayer, _Residual

FIXED_LAMBDA = 0.5


class _ValueStream(_Residual):
    __slots__ = ("v_first",)

    def __init__(self, x: torch.Tensor):
        super().__init__(x)
        self.v_first: Optional[torch.Tensor] = None  # (B, Hkv, T, D)


class ValueResidual(CrossLayer):
    @dataclass
    class Config:
        learnable: bool = False  # learnable lambdas per position (init 0.5 / 0.5), else fixed

    def __init__(self, cfg, d_model: int, n_slots: int, kv_dim: int):
        super().__init__(cfg, d_model, n_slots, kv_dim)
        # row s - 1 holds (lambda_1, lambda_2) of depth position s >= 1
        self.lambdas = (nn.Parameter(torch.empty(max(n_slots - 1, 0), 2)) if cfg.learnable
                        else None)
        self.reset_parameters()

    @classmethod
    def has_position_params(cls, cfg) -> bool:
        return cfg.learnable

    def reset_parameters(self) -> None:
        if self.lambdas is not None:
            nn.init.constant_(self.lambdas, FIXED_LAMBDA)

    def start(self, x0: torch.Tensor) -> _ValueStream:
        return _ValueStream(x0)

    def value_hook(self, stream: _ValueStream, slot: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if slot == 0:
            def record(v: torch.Tensor) -> torch.Tensor:
                stream.v_first = v
                return v
            return record
        if self.lambdas is None:
            return lambda v: FIXED_LAMBDA * (v + stream.v_first)
        lam = self.lambdas[slot - 1]
        return lambda v: lam[0] * v + lam[1] * stream.v_first

    def extra_flops_per_token(self) -> float:
        per_element = 3.0 if self.lambdas is not None else 2.0  # l1 v + l2 v1, or (v + v1) / 2
        return per_element * self.kv_dim * (self.n_slots - 1)
