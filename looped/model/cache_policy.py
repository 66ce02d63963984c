"""Cache policies: where each depth position's (K, mixed V) lives between forward passes.

A policy maps every depth position of a layout to a storage slot of the KVCache. Sequence
attention at position p reads slot(p): the earlier tokens' entries that were last written to
that slot, and the current chunk's own entries at p (written just before they are read).

- `per_iteration` (the default) gives every position its own slot: the exact cache, whose
  memory grows with the loop count R (one slot per core layer and iteration).
- `last` gives each distinct layer one slot: a core layer's slot keeps, for every earlier
  token, its entries from its final iteration (or its exit iteration, which a frozen token
  carries to the end). Memory is independent of R, and one cache serves any R. It is an
  approximation of the trained model (the family of Huginn's "latest" KV lookup): at iteration
  r a token reads earlier tokens' last-iteration entries instead of their iteration-r ones.
  Within one forward chunk the tokens still read each other at the same iteration, so a
  single prefill is exact and the approximation starts with the tokens decoded after it.

A new policy is one small class: `slots(layout)` and, when its slots do not depend on R alone,
`serves(made_for, layout)`.
"""

from __future__ import annotations

from looped.model.depth import DepthLayout
from looped.registry import Registry

CACHE_POLICIES = Registry("cache policy")


class CachePolicy:
    name = ""

    def slots(self, layout: DepthLayout) -> list[int]:
        """The storage slot of each depth position of `layout`."""
        raise NotImplementedError

    def n_slots(self, layout: DepthLayout) -> int:
        return max(self.slots(layout), default=-1) + 1

    def serves(self, made_for: DepthLayout, layout: DepthLayout) -> bool:
        """Whether a cache made for `made_for` can hold a forward pass over `layout`."""
        return made_for == layout

    def describe(self) -> str:
        return self.name


@CACHE_POLICIES.register("per_iteration")
class PerIteration(CachePolicy):
    """One slot per depth position: exact, and R times a plain model's core cache."""

    name = "per_iteration"

    def slots(self, layout: DepthLayout) -> list[int]:
        return list(range(layout.n_positions))


@CACHE_POLICIES.register("last")
class LastIteration(CachePolicy):
    """One slot per distinct layer: each token's entries from its last (or exit) iteration."""

    name = "last"

    def slots(self, layout: DepthLayout) -> list[int]:
        pre, core = layout.n_prelude, layout.n_core
        out = list(range(pre))
        for _ in range(layout.loops):
            out.extend(range(pre, pre + core))
        out.extend(range(pre + core, pre + core + layout.n_coda))
        return out

    def serves(self, made_for: DepthLayout, layout: DepthLayout) -> bool:
        return (made_for.n_prelude, made_for.n_core, made_for.n_coda) == \
            (layout.n_prelude, layout.n_core, layout.n_coda)


def cache_policy(name: str) -> CachePolicy:
    """The policy registered under `name`; an unknown name is a one-line ConfigError."""
    return CACHE_POLICIES.lookup(name)()
