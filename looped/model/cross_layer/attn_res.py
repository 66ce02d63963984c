"""Attention Residuals (Kimi Team, arXiv 2603.15031): each layer's input is a softmax attention
over the outputs of all earlier layers of the same token, instead of their plain sum:

    h_l = sum_{i < l} alpha_{i->l} v_i,    alpha_{i->l} = softmax_i( w_l . RMSNorm(v_i) ),

v_0 = the embedding output, v_i = layer i's residual branch (attention + MLP) output. w_l is a
zero-initialised pseudo-query per depth position (so every h_l starts as the mean of the v_i),
plus one for the output read by the head. The first position has only v_0 to read and no query.
The RMSNorm of the keys has no gain of its own: a gain would be redundant with w_l.

Block variant (`block_size` k > 0): position s belongs to block s // k; inside a block outputs
are summed as in a plain residual stream, and the attention runs over v_0, the finished blocks'
sums and the current block's partial sum (O(S/k) vectors per token instead of O(S)).

The loop's input injection adds its increment as one more value (to the partial sum in the block
variant). There is no identity initialisation: at init the model averages instead of summing.

Extra parameters: d S.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from looped.errors import ConfigError
from looped.model.cross_layer.base import CrossLayer, LayerCall
from looped.model.depth import SOFTMAX_FLOPS

NORM_FLOPS = 4  # per element of an RMSNorm: square, sum, scale, multiply


class _Values:
    __slots__ = ("values", "keys", "partial", "block", "cached")

    def __init__(self, x0: torch.Tensor, eps: float):
        self.values = [x0]  # full: v_0..v_i; block: v_0 and finished block sums
        self.keys = [_norm(x0, eps)]
        self.partial: Optional[torch.Tensor] = None  # block variant: sum of the open block
        self.block: Optional[int] = None  # the open block's index (None: joins the next one)
        self.cached: Optional[torch.Tensor] = None  # the last read(), until the stream changes


def _norm(v: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(v, (v.shape[-1],), eps=eps)


class AttnRes(CrossLayer):
    @dataclass
    class Config:
        block_size: int = 0  # 0: full; k > 0: the block variant, blocks of k positions

        def check(self, cfg) -> None:
            if self.block_size < 0:
                raise ConfigError(f"model.cross_layer.block_size must be >= 0, "
                                  f"got {self.block_size}")

    position_params = True

    def __init__(self, cfg, d_model: int, n_slots: int, kv_dim: int, eps: float = 1e-6):
        super().__init__(cfg, d_model, n_slots, kv_dim)
        self.block_size, self.eps = cfg.block_size, eps
        # row s - 1: the query of position s >= 1; the last row: the output's
        self.queries = nn.Parameter(torch.zeros(n_slots, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.queries)

    def start(self, x0: torch.Tensor) -> _Values:
        return _Values(x0, self.eps)

    def _aggregate(self, s: _Values, query: Optional[torch.Tensor]) -> torch.Tensor:
        values, keys = s.values, s.keys
        if s.partial is not None:
            values, keys = values + [s.partial], keys + [_norm(s.partial, self.eps)]
        if len(values) == 1:
            return values[0]  # softmax over one source is 1: no arithmetic
        if query is None:  # position 0 behind an injection: the mean, as a zero query gives
            return sum(values) / len(values)
        logits = torch.stack([k @ query for k in keys], dim=-1)  # (B, T, n)
        alpha = logits.float().softmax(-1).to(values[0].dtype)
        h = values[0] * alpha[..., 0:1]
        for i in range(1, len(values)):
            h = h + values[i] * alpha[..., i:i + 1]
        return h

    def _close_block(self, s: _Values) -> None:
        s.values.append(s.partial)
        s.keys.append(_norm(s.partial, self.eps))
        s.partial, s.block = None, None

    def _add_value(self, s: _Values, v: torch.Tensor) -> None:
        s.cached = None
        if self.block_size == 0:
            s.values.append(v)
            s.keys.append(_norm(v, self.eps))
            return
        s.partial = v if s.partial is None else s.partial + v

    def apply(self, stream: _Values, slot: int, layer: LayerCall) -> None:
        if self.block_size:
            block = slot // self.block_size
            if stream.partial is not None and stream.block not in (None, block):
                self._close_block(stream)  # the previous block is complete (or skipped into)
        h = self._aggregate(stream, self.queries[slot - 1] if slot > 0 else None)
        self._add_value(stream, layer.branch(h))
        if self.block_size:
            stream.block = block

    def read(self, stream: _Values) -> torch.Tensor:
        if stream.cached is None:
            stream.cached = self._aggregate(stream, self.queries[-1])
        return stream.cached

    def set_input(self, stream: _Values, x: torch.Tensor) -> None:
        if x is not stream.cached:  # an unchanged input adds nothing
            self._add_value(stream, x - self.read(stream))

    # -- accounting --------------------------------------------------------------------------

    def _aggregation_sizes(self) -> list[int]:
        """Vectors each of the S + 1 aggregations attends over, at param_loops iterations, with
        the injections the model makes (`injected_before`)."""
        sizes, n_values, partial, block = [], 1, False, None
        for s in range(self.n_slots + 1):
            if s in self.injected_before:
                if self.block_size == 0:
                    n_values += 1
                else:
                    partial = True
            if s == self.n_slots:
                sizes.append(n_values + partial)
                break
            if self.block_size and partial and block not in (None, s // self.block_size):
                n_values, partial = n_values + 1, False
            sizes.append(n_values + partial)
            if self.block_size:
                partial, block = True, s // self.block_size
            else:
                n_values += 1
        return sizes

    def extra_flops_per_token(self) -> float:
        d = self.d_model
        sizes = self._aggregation_sizes()
        flops = sum(4.0 * n * d + SOFTMAX_FLOPS * n for n in sizes if n > 1)  # scores, mix
        # an RMSNorm per stored value; the block variant normalises its partial sum each time
        n_norms = (len(sizes) + len(self.injected_before) if self.block_size == 0
                   else sum(1 for n in sizes if n > 1) + max(sizes))
        return flops + NORM_FLOPS * d * n_norms

    def extra_state_per_token(self) -> float:
        # every value stays until the output's aggregation; a vanilla model holds one vector
        return float((max(self._aggregation_sizes()) - 1) * self.d_model)
