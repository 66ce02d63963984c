"""Source policies of looped models: which earlier iterations a core position reads.

A core position is (layer l, iteration r). Every policy here reads only the same layer l at
earlier iterations (and, where it says so, the prelude), and every one gives the prelude and the
coda the same sources:

    prelude position i   reads the earlier prelude positions
    coda position c      reads the prelude, the core's last iteration and the earlier coda

What differs is the core. With R iterations and the prelude's n_prelude positions:

    same_layer     prelude + iterations 0 .. r-1                       grows with R
    anchor         prelude + iteration 0                               at most n_prelude + 1
    window         iterations r-k .. r-1 (knob `window` = k)           at most k
    anchor_window  prelude + iteration 0 + iterations r-k .. r-1       at most n_prelude + 1 + k
    loop_strided   prelude + every s-th iteration before r (knob `stride` = s; default R // 2,
                   the authors' n_layers // 2 with the R iterations as the layers)

A softmax over a set that grows with R meets, at a test R beyond the trained one, more sources
than it was ever trained on; the bounded policies keep the set the trained model knows.
`loop_strided` with its default stride has at most 3 cross sources at any R (2 when R is even),
but it cannot be R-invariant in *which* iterations it reads: the authors' rule names positions by
their fraction of the depth (0 and the middle), so at R' != R the middle source moves from
iteration R // 2 to R' // 2. With a fixed `stride` the sources stay put and their count grows as
R / stride instead.

A frozen token (adaptive exit) runs no later core position: its later positions carry the key and
mixed value of its exit iteration (looped.model.depth_pass), which is what later tokens' sequence
attention and its own coda read; no policy changes that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from looped.errors import ConfigError
from looped.model.depth import DepthLayout, DepthSlot, register_source_policy


def _prelude(p: int, layout: DepthLayout) -> tuple[int, ...]:
    return tuple(range(min(p, layout.n_prelude)))


def _coda(p: int, layout: DepthLayout) -> tuple[int, ...]:
    """The prelude, the core's last iteration, then the earlier coda positions."""
    start = layout.position(DepthSlot("core", 0, layout.loops - 1)) if layout.n_core \
        else layout.n_prelude
    return _prelude(p, layout) + tuple(range(start, p))


def looped_sources(p: int, layout: DepthLayout, core_iterations, with_prelude: bool
                   ) -> tuple[int, ...]:
    """Sources of position p for a policy whose core position (l, r) reads layer l at the
    iterations core_iterations(r, loops) (each < r), plus the prelude when with_prelude."""
    slot = layout.slot(p)
    if slot.stage == "prelude":
        return _prelude(p, layout)
    if slot.stage == "coda":
        return _coda(p, layout)
    iterations = sorted(set(core_iterations(slot.iteration, layout.loops)))
    same = tuple(layout.position(DepthSlot("core", slot.layer, r)) for r in iterations)
    return (_prelude(p, layout) if with_prelude else ()) + same


@register_source_policy("same_layer")
def _same_layer(p: int, layout: DepthLayout, cfg) -> tuple[int, ...]:
    """Every earlier iteration of the same layer, plus the prelude: grows with R."""
    return looped_sources(p, layout, lambda r, loops: range(r), with_prelude=True)


@register_source_policy("anchor")
def _anchor(p: int, layout: DepthLayout, cfg) -> tuple[int, ...]:
    """The prelude and iteration 0 of the same layer."""
    return looped_sources(p, layout, lambda r, loops: range(min(r, 1)), with_prelude=True)


@dataclass
class WindowKnobs:
    window: int = 1  # the last `window` iterations of the same layer

    def check(self, cfg) -> None:
        if self.window < 1:
            raise ConfigError(f"model.depth_attention.window must be >= 1 iteration, got "
                              f"{self.window}")


def _recent(r: int, k: int) -> range:
    return range(max(0, r - k), r)


@register_source_policy("window", config=WindowKnobs)
def _window(p: int, layout: DepthLayout, cfg) -> tuple[int, ...]:
    """The last k iterations of the same layer (no prelude)."""
    return looped_sources(p, layout, lambda r, loops: _recent(r, cfg.window), with_prelude=False)


@register_source_policy("anchor_window", config=WindowKnobs)
def _anchor_window(p: int, layout: DepthLayout, cfg) -> tuple[int, ...]:
    """The prelude, iteration 0 and the last k iterations of the same layer."""
    return looped_sources(p, layout,
                          lambda r, loops: [*range(min(r, 1)), *_recent(r, cfg.window)],
                          with_prelude=True)


@dataclass
class LoopStrideKnobs:
    # every stride-th iteration; None: R // 2 of the run's R (the authors' n_layers // 2)
    stride: Optional[int] = None

    def check(self, cfg) -> None:
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"model.depth_attention.stride must be >= 1, got {self.stride}")


def loop_stride(loops: int, stride: Optional[int]) -> int:
    return stride if stride is not None else max(1, loops // 2)


@register_source_policy("loop_strided", config=LoopStrideKnobs)
def _loop_strided(p: int, layout: DepthLayout, cfg) -> tuple[int, ...]:
    """The prelude and every s-th earlier iteration of the same layer (iteration 0 included)."""
    def every_s(r: int, loops: int):
        s = loop_stride(loops, cfg.stride)
        return range(0, r, s)
    return looped_sources(p, layout, every_s, with_prelude=True)
