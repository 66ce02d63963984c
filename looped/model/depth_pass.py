"""One forward pass through the depth positions of a LoopedLM (looped.model.lm), and what its
loop hands back.

DepthPass numbers the layer applications in depth order (prelude, core x R, coda), gives each
its Depth-Attention sources and, for exited tokens, the entries they keep, and runs the layers:
on the plain residual path `x = block(x)`, or, for a model with a cross-layer method, through
the method's stream (see looped.model.cross_layer.base).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from looped.model.attention import DepthContext, DepthPosition, Recorder
from looped.model.cross_layer import CrossLayer, LayerCall
from looped.model.depth import DepthSlot


@dataclass
class CoreResult:
    """What the loop hands back to the forward pass."""

    state: torch.Tensor  # (B, T, d) after the last iteration
    iterations: torch.Tensor  # (B, T) iterations each token used
    states: list[torch.Tensor] = field(default_factory=list)  # with return_states: each s_r
    gates: list[torch.Tensor] = field(default_factory=list)  # halting logits, each (B, T)

    @property
    def gate_logits(self) -> Optional[torch.Tensor]:
        return torch.stack(self.gates) if self.gates else None


class DepthPass:
    """One forward pass through the depth positions, in order: it numbers them, gives each its
    Depth-Attention sources, and runs the layers, on the plain residual path (`x = block(x)`)
    or, for a model with a cross-layer method, through the method's stream."""

    def __init__(self, model, store, loops: int, recorder: Recorder):
        self.model = model
        self.ctx = DepthContext(store, model.rope, model.cfg.depth_attention.mix == "raw",
                                recorder, self.attention_at)
        self.layout = model.layout(loops)
        self.sources = model.depth_sources(loops)
        self.slots = model.position_slots(loops)
        plain = type(model.cross_layer) is CrossLayer
        self.method = None if plain else model.cross_layer
        self.stream = None  # the method's state of this forward pass
        self.p = 0  # the next depth position

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding output, before the first layer."""
        if self.method is not None:
            self.stream = self.method.start(x)
        return x

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        """The loop's input to the next iteration."""
        if self.method is not None:
            self.method.set_input(self.stream, x)
        return x

    def stack(self, blocks, x: torch.Tensor, frozen: Optional[torch.Tensor] = None,
              rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run blocks at the next depth positions; the hidden state after them (B, T, d). A
        method's stream already holds x. rows: x holds only these rows of the batch (a 1-D
        index into the cache's rows; the plain path with a KVCache only)."""
        ctx = self.ctx if rows is None else replace(self.ctx, store=self.ctx.store.rows(rows))
        for block in blocks:
            p, self.p = self.p, self.p + 1
            # an exited token keeps the key and mixed value of the same layer one iteration back
            pos = DepthPosition(p, self.sources[p], frozen,
                                None if frozen is None else p - self.model.cfg.n_layers)
            if self.method is None:
                x = block(x, ctx, pos)
            else:
                slot = self.slots[p]
                hook = self.method.value_hook(self.stream, slot)
                self.method.apply(self.stream, slot, LayerCall(block, self.ctx, pos, hook))
        return x if self.method is None else self.method.read(self.stream)

    def attention_at(self, p: int):
        """The attention module that runs at depth position p."""
        return self.model.block_at(p, self.layout.loops).attn

    @property
    def can_drop_rows(self) -> bool:
        """Whether an iteration can run on a subset of the rows: the plain path through a
        KVCache (decoding), not a training store or a compiled step's cache."""
        return self.method is None and self.ctx.store.drops_rows

    def carry_forward(self, last: int, loops: int, rows: Optional[torch.Tensor] = None) -> None:
        """Rows (all when None) whose tokens all exited after iteration `last` keep its entries
        at the positions of the later iterations, as the frozen-token rule says."""
        n = self.model.cfg.n_layers
        for r in range(last + 1, loops):
            for layer in range(n):
                src = self.layout.position(DepthSlot("core", layer, last))
                dst = self.layout.position(DepthSlot("core", layer, r))
                self.ctx.store.copy_position(src, dst, rows)

    def skip_core_iterations(self, last: int, loops: int) -> None:
        """All tokens exited after iteration `last`: later iterations' positions get copies."""
        self.carry_forward(last, loops)
        self.p = self.layout.position(DepthSlot("core", 0, loops - 1)) + self.model.cfg.n_layers
