"""One forward pass through the depth positions of a LoopedLM (looped.model.lm), and what its
loop hands back.

A DepthPlan lists, for a run of R iterations, what runs at each depth position (prelude, core x R,
coda): its block, its Depth-Attention sources and its cross-layer parameter slot. The model
builds the plan once per R; DepthPass walks it, running the layers on the plain residual path
(`x = block(x)`) or, for a model with a cross-layer method, through the method's stream (see
looped.model.cross_layer.base), and gives exited tokens the entries they keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from looped.model.attention import DepthContext, DepthPosition, Recorder
from looped.model.cross_layer import CrossLayer, LayerCall
from looped.model.depth import DepthLayout, DepthSlot
from looped.model.rope import RotaryEmbedding


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


@dataclass(frozen=True)
class DepthPlan:
    """What runs at each depth position of a forward pass with layout.loops iterations."""

    layout: DepthLayout
    blocks: tuple[nn.Module, ...]  # the block at each position
    sources: tuple[tuple[int, ...], ...]  # the earlier positions its Depth-Attention reads
    slots: tuple[int, ...]  # its cross-layer method's parameter slot
    scales: tuple[float, ...] = ()  # the factor on its depth scores; () is 1 everywhere


class DepthPass:
    """One forward pass through the depth positions of a plan, in order."""

    def __init__(self, plan: DepthPlan, store, rope: RotaryEmbedding, raw_mix: bool,
                 recorder: Recorder, method: CrossLayer, checkpoint_blocks: bool = False):
        self.plan, self.layout = plan, plan.layout
        # activation checkpointing per block: backward recomputes each block from its input
        self.checkpoint_blocks = checkpoint_blocks
        self.ctx = DepthContext(store, rope, raw_mix, recorder, self.attention_at)
        # the plain residual stream needs no method calls
        self.method = None if type(method) is CrossLayer else method
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

    def prelude(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.layout.n_prelude, x)

    def iteration(self, x: torch.Tensor, frozen: Optional[torch.Tensor] = None,
                  rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The core's layers at the next iteration. frozen (B, T): tokens that exited, which
        keep their entries of one iteration back. rows: x holds only these rows of the batch (a
        1-D index into the cache's rows; the plain path with a KVCache only)."""
        return self._run(self.layout.n_core, x, frozen, rows)

    def coda(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.layout.n_coda, x)

    def _run(self, n: int, x: torch.Tensor, frozen: Optional[torch.Tensor] = None,
             rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The next n positions; the hidden state after them (B, T, d). A method's stream
        already holds x."""
        ctx = self.ctx if rows is None else replace(self.ctx, store=self.ctx.store.rows(rows))
        for p in range(self.p, self.p + n):
            block = self.plan.blocks[p]
            # an exited token keeps the key and mixed value of the same layer one iteration back
            pos = DepthPosition(p, self.plan.sources[p], frozen,
                                None if frozen is None else p - self.layout.n_core,
                                self.plan.scales[p] if self.plan.scales else 1.0)
            if self.method is None:
                x = (checkpoint(block, x, ctx, pos, use_reentrant=False)
                     if self.checkpoint_blocks else block(x, ctx, pos))
            else:
                slot = self.plan.slots[p]
                hook = self.method.value_hook(self.stream, slot)
                self.method.apply(self.stream, slot, LayerCall(block, self.ctx, pos, hook))
        self.p += n
        return x if self.method is None else self.method.read(self.stream)

    def attention_at(self, p: int) -> nn.Module:
        """The attention module that runs at depth position p."""
        return self.plan.blocks[p].attn

    @property
    def can_drop_rows(self) -> bool:
        """Whether an iteration can run on a subset of the rows: the plain path through a
        KVCache (decoding), not a training store or a compiled step's cache."""
        return self.method is None and self.ctx.store.drops_rows

    def carry_forward(self, last: int, loops: int, rows: Optional[torch.Tensor] = None) -> None:
        """Rows (all when None) whose tokens all exited after iteration `last` keep its entries
        at the positions of the later iterations, as the frozen-token rule says."""
        for r in range(last + 1, loops):
            for layer in range(self.layout.n_core):
                src = self.layout.position(DepthSlot("core", layer, last))
                dst = self.layout.position(DepthSlot("core", layer, r))
                self.ctx.store.copy_position(src, dst, rows)

    def skip_core_iterations(self, last: int, loops: int) -> None:
        """All tokens exited after iteration `last`: later iterations' positions get copies."""
        self.carry_forward(last, loops)
        self.p = self.layout.position(DepthSlot("core", 0, loops - 1)) + self.layout.n_core
