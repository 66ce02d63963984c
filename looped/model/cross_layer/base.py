"""The interface every cross-layer method implements, and the plain residual stream it replaces.

A cross-layer method decides how hidden states travel between depth positions (layer
applications in the unrolled order: prelude, core x R, coda). On the plain path the model keeps
the residual state itself (`x = block(x)`); a model with a method instead hands the method each
layer as a `LayerCall`, and the method keeps the state in its own stream:

    stream = method.start(x0)               # x0: the embedding output (B, T, d)
    method.apply(stream, slot, layer)       # once per depth position, in order
    method.set_input(stream, x)             # the loop's input injection: "the current input is x"
    h = method.read(stream)                 # the current hidden state (B, T, d)

Parameters that belong to a depth position are indexed by its *slot*: the position in the layout
of the model's own `loop` (or `cross_layer.param_loops`). A run with fewer iterations uses the
slots of the iterations it runs, and the coda keeps its own slots.

Every method works per token, so cached decoding needs nothing but the KV cache; what a method
holds per token while a forward pass runs is its `extra_state_vectors` (see looped.tools.flops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from looped.errors import ConfigError


@dataclass
class CrossLayerConfig:
    """The `model.cross_layer` node's shared fields; `none` is the plain residual stream."""

    # none | denseformer | value_residual | attn_res | mhc | hyper_connections (knobs: each
    # method's Config)
    method: str = "none"
    # methods with parameters per depth position hold them for this many iterations; 0: loop
    param_loops: int = 0

    def check(self, cfg) -> None:
        loop = cfg.loop
        if not (self.param_loops == 0 or self.param_loops >= loop):
            raise ConfigError(f"model.cross_layer.param_loops must be 0 (= loop) or >= "
                              f"loop={loop}, got {self.param_loops}")
        if not (cfg.model.share_weights or self.param_loops in (0, loop)):
            raise ConfigError(f"an unrolled model (share_weights=false) runs exactly loop={loop} "
                              f"iterations; model.cross_layer.param_loops must be 0 or {loop}")
        if cfg.exit.criterion != "none" and exit_conflict(self.method):
            raise ConfigError(exit_conflict(self.method))


def exit_conflict(method: str) -> str:
    """Why adaptive exit cannot run with `method` ('' when it can): the one home of the rule,
    checked by the config and by the model."""
    if method == "none":
        return ""
    return (f"adaptive exit freezes the plain residual state; cross_layer.method={method} keeps "
            f"other state, so use exit.criterion=none")


class LayerCall:
    """One layer application at its depth position: the whole block (x + attention + MLP) or
    only its residual branch (attention + MLP, for methods that do their own accumulation)."""

    def __init__(self, block, ctx, pos, value_hook=None):
        self.block, self.ctx, self.pos, self.value_hook = block, ctx, pos, value_hook

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, self.ctx, self.pos, self.value_hook)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.branch(x, self.ctx, self.pos, self.value_hook)


class CrossLayer(nn.Module):
    """Base class. Subclasses override the hooks they change; the defaults are a plain residual
    stream, so `CrossLayer` itself is the vanilla model (method `none`, which the model runs on
    its own plain path; the hooks here define what every method reduces to)."""

    # True when the method has parameters per depth position: runs are limited to param_loops
    # iterations (a method whose answer depends on its config overrides has_position_params)
    position_params = False

    def __init__(self, cfg, d_model: int, n_slots: int, kv_dim: int):
        super().__init__()
        self.cfg, self.d_model, self.n_slots, self.kv_dim = cfg, d_model, n_slots, kv_dim
        # slots before which the loop injects an input that changes the stream (set by the
        # model; only the accounting reads it)
        self.injected_before: frozenset[int] = frozenset()

    @classmethod
    def has_position_params(cls, cfg) -> bool:
        """Whether the method built from cfg has parameters per depth position."""
        return cls.position_params

    @property
    def per_position(self) -> bool:
        return self.has_position_params(self.cfg)

    def reset_parameters(self) -> None:
        """The method's own initialisation (the model's std-0.02 init skips these parameters)."""

    # -- the forward pass --------------------------------------------------------------------

    def start(self, x0: torch.Tensor):
        return _Residual(x0)

    def apply(self, stream, slot: int, layer: LayerCall) -> None:
        stream.x = layer(stream.x)

    def read(self, stream) -> torch.Tensor:
        return stream.x

    def set_input(self, stream, x: torch.Tensor) -> None:
        stream.x = x

    def value_hook(self, stream, slot: int) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """A function applied to the layer's value (B, Hkv, T, D) before Depth-Attention."""
        return None

    # -- accounting (looped.tools.flops) --------------------------------------------------------

    def extra_flops_per_token(self) -> float:
        """Arithmetic FLOPs per token the method adds to a vanilla forward pass."""
        return 0.0

    def extra_state_per_token(self) -> float:
        """Elements per token held during decoding beyond a vanilla model (its one residual
        vector) and the KV cache: what the method must keep while a token goes through depth."""
        return 0.0


class _Residual:
    __slots__ = ("x",)

    def __init__(self, x: torch.Tensor):
        self.x = x
