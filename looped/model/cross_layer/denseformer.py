"""DenseFormer (Pagliardini et al. 2024): depth-weighted averages of all earlier block outputs.

Block n (n = 1..S, one per depth position) maps Y_{n-1} to X_n, then a depth-weighted average

    Y_n = sum_{j in J(n)} alpha_{n,j} X_j,      X_0 = the embedding output,

feeds the next block (and Y_S the head). J(n) = {j <= n : (n - j) % dilation == 0}; with a
period p the average exists only after blocks with n % p == 0 (elsewhere Y_n = X_n). alpha
starts as the identity (alpha_{n,n} = 1, the rest 0), where the model is exactly vanilla.

Extra parameters: sum over averaged blocks n of |J(n)|; S(S+3)/2 for dilation = period = 1.
Extra state: X_j is kept until the last average that reads it, S vectors more than vanilla at
dilation = period = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from looped.errors import ConfigError
from looped.model.cross_layer.base import CrossLayer, LayerCall


class _History:
    __slots__ = ("xs", "y")

    def __init__(self, x0: torch.Tensor):
        self.xs = {0: x0}  # history index (0: embedding, n: block n's output) -> (B, T, d)
        self.y = x0


class DenseFormer(CrossLayer):
    @dataclass
    class Config:
        dilation: int = 1  # average every dilation-th earlier output
        period: int = 1  # an average after every period-th block

        def check(self, cfg) -> None:
            for name in ("dilation", "period"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"model.cross_layer.{name} must be >= 1, "
                                      f"got {getattr(self, name)}")

    position_params = True

    def __init__(self, cfg, d_model: int, n_slots: int, kv_dim: int):
        super().__init__(cfg, d_model, n_slots, kv_dim)
        self.dilation, self.period = cfg.dilation, cfg.period
        # sources[s]: the history indices block n = s + 1 averages over ([] when it does not)
        self.sources = [self._sources(s + 1) for s in range(n_slots)]
        averaged = [s for s, src in enumerate(self.sources) if src]
        self.alpha_index = {s: k for k, s in enumerate(averaged)}  # slot -> its alpha
        self.alpha = nn.ParameterList(nn.Parameter(torch.zeros(len(self.sources[s])))
                                      for s in averaged)
        self.reset_parameters()

    def _sources(self, n: int) -> list[int]:
        if n % self.period:
            return []
        return [j for j in range(n + 1) if (n - j) % self.dilation == 0]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for a in self.alpha:
                a.zero_()
                a[-1] = 1.0  # the block's own output

    def start(self, x0: torch.Tensor) -> _History:
        return _History(x0)

    def apply(self, stream: _History, slot: int, layer: LayerCall) -> None:
        n = slot + 1
        stream.xs[n] = x = layer(stream.y)
        src = self.sources[slot]
        if not src:
            stream.y = x
            return
        alpha = self.alpha[self.alpha_index[slot]]
        y = None
        # a shorter run (fewer loops than the slots) lacks some indices: they drop out
        for k, j in enumerate(src):
            if j in stream.xs:
                term = stream.xs[j] * alpha[k]
                y = term if y is None else y + term
        stream.y = y

    def read(self, stream: _History) -> torch.Tensor:
        return stream.y

    def set_input(self, stream: _History, x: torch.Tensor) -> None:
        stream.y = x

    def extra_flops_per_token(self) -> float:
        return sum(2.0 * len(src) * self.d_model for src in self.sources)

    def extra_state_per_token(self) -> float:
        # X_j must be kept from its block until the last average that reads it
        last_use = {}
        for s, src in enumerate(self.sources):
            for j in src:
                last_use[j] = s
        live = max((sum(1 for j, last in last_use.items() if j <= s + 1 and last >= s)
                    for s in range(self.n_slots)), default=0)
        live = max(live - 1, 0)  # a vanilla model holds one vector too
        return float(live * self.d_model)
