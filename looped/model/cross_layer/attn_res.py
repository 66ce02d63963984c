"""Attention Residuals (Kimi Team, arXiv 2603.15031): each layer's input is a softmax attention
over the outputs of all earlier layers of the same token, instead of their plain sum:

    h_l = sum_{i < l} alpha_{i->l} v_i,    alpha_{i->l} = softmax_i( w_l . RMSNorm(v_i) ),

v_0 = the embedding output, v_i = layer i's residual branch (attention + MLP) output. w_l is a
zero-initialised pseudo-query per depth position (so every h_l starts as the mean of the v_i),
plus one for the output read by the head. The RMSNorm of the keys has no gain of its own: a gain
would be redundant with w_l.

Block variant (`block_size` k > 0): layers are grouped in blocks of k depth positions; inside a
block outputs are summed as in a plain residual stream, and the attention runs over the finished
blocks' sums plus the current block's partial sum (O(S/k) vectors per token instead of O(S)).

The loop's input injection adds its increment as one more value (to the partial sum in the block
variant). There is no identity initialisation: at init the model averages instead of summing.

Extra parameters: d (S + 1).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from looped.model.cross_layer.base import CrossLayer, LayerCall

SOFTMAX_FLOPS = 5.0  # exp, max, sum, divide, subtract per score (the usual estimate)


class _Values:
    __slots__ = ("values", "keys", "partial", "in_block", "cached")

    def __init__(self, x0: torch.Tensor, eps: float):
        self.values = [x0]  # full: v_0..v_i; block: v_0 and finished block sums
        self.keys = [_norm(x0, eps)]
        self.partial: Optional[torch.Tensor] = None  # block variant: sum of the open block
        self.in_block = 0
        self.cached: Optional[torch.Tensor] = None  # the last read(), until the stream changes


def _norm(v: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(v, (v.shape[-1],), eps=eps)


class AttnRes(CrossLayer):
    per_position = True

    def __init__(self, cfg, d_model: int, n_slots: int, kv_dim: int, eps: float = 1e-6):
        super().__init__(cfg, d_model, n_slots, kv_dim)
        self.block_size, self.eps = cfg.block_size, eps
        self.queries = nn.Parameter(torch.zeros(n_slots + 1, d_model))  # the last: the output
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.queries)

    def start(self, x0: torch.Tensor) -> _Values:
        return _Values(x0, self.eps)

    def _aggregate(self, s: _Values, query: torch.Tensor) -> torch.Tensor:
        values, keys = s.values, s.keys
        if s.partial is not None:
            values, keys = values + [s.partial], keys + [_norm(s.partial, self.eps)]
        if len(values) == 1:
            return values[0]  # softmax over one source is 1: no arithmetic
        logits = torch.stack([k @ query for k in keys], dim=-1)  # (B, T, n)
        alpha = logits.float().softmax(-1).to(values[0].dtype)
        h = values[0] * alpha[..., 0:1]
        for i in range(1, len(values)):
            h = h + values[i] * alpha[..., i:i + 1]
        return h

    def _add_value(self, s: _Values, v: torch.Tensor) -> None:
        s.cached = None
        if self.block_size == 0:
            s.values.append(v)
            s.keys.append(_norm(v, self.eps))
            return
        s.partial = v if s.partial is None else s.partial + v

    def apply(self, stream: _Values, slot: int, layer: LayerCall) -> None:
        h = self._aggregate(stream, self.queries[slot])
        self._add_value(stream, layer.branch(h))
        if self.block_size:
            stream.in_block += 1
            if stream.in_block == self.block_size:  # close the block
                stream.values.append(stream.partial)
                stream.keys.append(_norm(stream.partial, self.eps))
                stream.partial, stream.in_block = None, 0

    def read(self, stream: _Values) -> torch.Tensor:
        if stream.cached is None:
            stream.cached = self._aggregate(stream, self.queries[-1])
        return stream.cached

    def set_input(self, stream: _Values, x: torch.Tensor) -> None:
        if x is not stream.cached:  # an unchanged input adds nothing
            self._add_value(stream, x - self.read(stream))

    # -- accounting --------------------------------------------------------------------------

    def _sources_seen(self) -> list[int]:
        """How many vectors each of the S + 1 aggregations attends over (no injections)."""
        if self.block_size == 0:
            return list(range(1, self.n_slots + 2))
        k = self.block_size
        return [1 + i // k + (1 if i % k else 0) for i in range(self.n_slots + 1)]

    def extra_flops_per_token(self) -> float:
        d = self.d_model
        flops = 0.0
        for n in self._sources_seen():
            if n > 1:
                flops += 4.0 * n * d + SOFTMAX_FLOPS * n  # scores, mix, softmax
        # one RMSNorm (about 4 FLOPs per element) per stored value; the block variant also
        # normalises its partial sum at every aggregation inside a block
        n_keys = self.n_slots + 1 if self.block_size == 0 else (
            math.ceil(self.n_slots / self.block_size) + self.n_slots)
        return flops + 4.0 * d * n_keys

    def extra_state_per_token(self) -> float:
        # every value stays until the output aggregation (keys can be recomputed from them)
        return float(max(self._sources_seen()) * self.d_model)
