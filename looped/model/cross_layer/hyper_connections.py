"""Hyper-connections (Zhu et al. 2024): n residual streams X (B, T, n, d) instead of one. The maps
are parameterised as in mHC (flattened streams, one projection phi) without its constraints, so
the two differ only in the constraint; Zhu et al.'s own dynamic maps read each stream separately
(about d (n + 1) parameters per position instead of n d (2n + n^2)). At each depth position, with
x~ = RMSNorm(flatten(X)) and dyn = x~ phi (phi: n d -> n + n + n^2):

    read   h  = sum_m H_pre[m] X_m                      (the layer's input)
    write  X' = H_res X + H_post (x) branch(h)          (branch: attention + MLP of the block)

    H_pre  = b_pre  + a_pre  tanh(dyn_pre)             (n)
    H_post = b_post + a_post tanh(dyn_post)            (n)
    H_res  = b_res  + a_res  tanh(dyn_res)             (n x n)

The streams start as n copies of the embedding output; the head reads their mean. Static parts
start as in the paper: position l reads stream l mod n (one-hot b_pre), writes to every stream
(b_post = 1) and keeps them (b_res = I); phi starts at 0 and a = 0.01. There every stream holds
the plain residual stream, so the model is exactly vanilla; the one-hot reads break the symmetry
between streams once training starts.

Extra parameters per depth position: n d (2n + n^2) + (2n + n^2) + 3.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from looped.errors import ConfigError
from looped.model.cross_layer.base import CrossLayer, LayerCall

DYNAMIC_SCALE_INIT = 0.01  # a_pre, a_post, a_res


class _Streams:
    __slots__ = ("x", "cached")

    def __init__(self, x: torch.Tensor):
        self.x = x  # (B, T, n, d)
        self.cached: Optional[torch.Tensor] = None


class HyperConnections(CrossLayer):
    @dataclass
    class Config:
        streams: int = 4  # residual streams

        def check(self, cfg) -> None:
            # mhc's initial read weights give every other stream 0.01 and must leave a rest
            if not 2 <= self.streams <= 64:
                raise ConfigError(f"model.cross_layer.streams must be in [2, 64], "
                                  f"got {self.streams}")

    position_params = True
    weight_matrices = ("phi",)  # per-slot projections: weight-decayed (looped.training.optim)

    def __init__(self, cfg, d_model: int, n_slots: int, kv_dim: int, eps: float = 1e-6):
        super().__init__(cfg, d_model, n_slots, kv_dim)
        n = self.n = cfg.streams
        self.eps = eps
        self.n_maps = 2 * n + n * n
        self.phi = nn.Parameter(torch.empty(n_slots, n * d_model, self.n_maps))
        self.bias = nn.Parameter(torch.empty(n_slots, self.n_maps))
        self.scale = nn.Parameter(torch.empty(n_slots, 3))  # a_pre, a_post, a_res
        self.reset_parameters()

    # -- the maps: subclasses change how raw maps become H_pre, H_post, H_res -----------------

    def static_init(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.n
        pre = torch.zeros(n)
        pre[slot % n] = 1.0
        return pre, torch.ones(n), torch.eye(n)

    def maps(self, pre, post, res, scale):
        """(B, T, n), (B, T, n), (B, T, n, n) raw dynamic maps -> H_pre, H_post, H_res."""
        return (pre.tanh() * scale[0], post.tanh() * scale[1], res.tanh() * scale[2])

    def combine(self, dyn, bias):
        return tuple(d + b for d, b in zip(dyn, bias))

    # -----------------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        n = self.n
        with torch.no_grad():
            self.phi.zero_()
            self.scale.fill_(DYNAMIC_SCALE_INIT)
            for s in range(self.n_slots):
                pre, post, res = self.static_init(s)
                self.bias[s] = torch.cat([pre, post, res.reshape(n * n)])

    def start(self, x0: torch.Tensor) -> _Streams:
        return _Streams(x0.unsqueeze(-2).expand(*x0.shape[:-1], self.n, x0.shape[-1]))

    def _split(self, t: torch.Tensor):
        n = self.n
        return t[..., :n], t[..., n:2 * n], t[..., 2 * n:].unflatten(-1, (n, n))

    def apply(self, stream: _Streams, slot: int, layer: LayerCall) -> None:
        x = stream.x  # (B, T, n, d)
        flat = x.flatten(-2)
        dyn = F.rms_norm(flat, (flat.shape[-1],), eps=self.eps) @ self.phi[slot]  # (B, T, maps)
        h_pre, h_post, h_res = self.combine(self.maps(*self._split(dyn), self.scale[slot]),
                                            self._split(self.bias[slot]))
        h = torch.einsum("btn,btnd->btd", h_pre, x)
        out = layer.branch(h)  # (B, T, d)
        stream.x = torch.einsum("btij,btjd->btid", h_res, x) + h_post.unsqueeze(-1) * out.unsqueeze(-2)
        stream.cached = None

    def read(self, stream: _Streams) -> torch.Tensor:
        if stream.cached is None:
            stream.cached = stream.x.mean(-2)
        return stream.cached

    def set_input(self, stream: _Streams, x: torch.Tensor) -> None:
        if x is not stream.cached:
            stream.x = stream.x + (x - self.read(stream)).unsqueeze(-2)
            stream.cached = None

    # -- accounting --------------------------------------------------------------------------

    def extra_flops_per_token(self) -> float:
        n, d = self.n, self.d_model
        per_position = (4.0 * n * d  # RMSNorm of the flattened streams
                        + 2.0 * n * d * self.n_maps  # dyn = x~ phi
                        + 10.0 * self.n_maps  # activations, scales, biases
                        + 2.0 * n * d  # read
                        + 2.0 * n * n * d  # H_res X
                        + 2.0 * n * d  # + H_post (x) branch
                        - d)  # a plain residual add, which this replaces
        return self.n_slots * per_position + n * d  # + the mean the head reads

    def extra_state_per_token(self) -> float:
        return float((self.n - 1) * self.d_model)
