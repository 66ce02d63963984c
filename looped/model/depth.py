"""Depth-Attention: which earlier depth positions a position reads, and how it mixes their values.

A depth position is one layer application in the unrolled order: the prelude's layers, then the
core's layers for each iteration, then the coda's. At position p, for each token t and KV head g:

    q_bar   = mean of the (QK-normed, RoPE'd) queries of the query heads in group g
    S       = sources(p) + [p]
    alpha_j = softmax_{j in S}( q_bar . k_j / sqrt(D) )        k_j: position j's key for token t
    v_mix_p = sum_{j in S, j < p} alpha_j v_mix_j + alpha_p v_p

RoPE rotates q_bar and every k_j by the same angle (all sit at token t), so the scores equal
those of the unrotated vectors. With no source, alpha_p = 1 and the layer is exactly vanilla.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from looped.errors import ConfigError
from looped.registry import Registry

# ---------------------------------------------------------------------------------------------
# Layout of depth positions


@dataclass(frozen=True)
class DepthSlot:
    stage: str  # "prelude" | "core" | "coda"
    layer: int  # index of the layer within its stage
    iteration: int  # loop iteration for core slots; 0 for prelude and coda


@dataclass(frozen=True)
class DepthLayout:
    n_prelude: int
    n_core: int
    loops: int
    n_coda: int

    @property
    def n_positions(self) -> int:
        return self.n_prelude + self.n_core * self.loops + self.n_coda

    @property
    def n_distinct_layers(self) -> int:
        return self.n_prelude + self.n_core + self.n_coda

    def slot(self, p: int) -> DepthSlot:
        if not 0 <= p < self.n_positions:
            raise IndexError(f"depth position {p} out of range [0, {self.n_positions})")
        if p < self.n_prelude:
            return DepthSlot("prelude", p, 0)
        p -= self.n_prelude
        if p < self.n_core * self.loops:
            return DepthSlot("core", p % self.n_core, p // self.n_core)
        return DepthSlot("coda", p - self.n_core * self.loops, 0)

    def position(self, slot: DepthSlot) -> int:
        if slot.stage == "prelude":
            return slot.layer
        if slot.stage == "core":
            return self.n_prelude + slot.iteration * self.n_core + slot.layer
        return self.n_prelude + self.n_core * self.loops + slot.layer


# ---------------------------------------------------------------------------------------------
# Source policies: name -> function(p, layout, cfg) giving the earlier positions p reads.

MIXES = ("mixed", "raw")


@dataclass
class DepthAttentionConfig:
    """The `model.depth_attention` node's shared fields; the chosen source policy adds its knobs."""

    enabled: bool = True  # false: the vanilla model
    # Name in SOURCE_POLICIES (knobs: `strided` has stride and window; the looped models'
    # policies are in looped.model.loop_sources). None picks the default for the model
    # (default_policy: `anchor` for a looped one, `strided` for a plain one).
    sources: Optional[str] = None
    mix: str = "mixed"  # mixed: sources contribute their mixed values; raw: their raw values
    # true: a position with more sources than any position has at the trained R scales its depth
    # scores by log(n) / log(n_trained) (n: sources + itself), so the softmax does not flatten
    # as the count grows past what training saw (see score_scales); no parameters
    log_scale: bool = False

    def check(self, cfg) -> None:
        if self.mix not in MIXES:
            raise ConfigError(f"unknown model.depth_attention.mix '{self.mix}'; choose one of: "
                              f"{', '.join(MIXES)}")
        if self.log_scale and cfg.model.attention != "gqa":
            raise ConfigError(f"model.depth_attention.log_scale is implemented for GQA "
                              f"attention only, not model.attention={cfg.model.attention}")


def default_policy(looped: bool) -> str:
    """The source policy of `sources: null`: a looped model reads its prelude and iteration 0 of
    the same layer (`anchor`: a source set that does not grow with R; the only policy that
    matched no Depth-Attention at every seed in loop_extrapolation_da, up to 16x the trained
    length), a plain decoder every stride-th layer (the authors' released setting). Runs saved
    before `anchor` became the default load with `same_layer` (config.LEGACY_DEFAULT_POLICY)."""
    return "anchor" if looped else "strided"


def _resolve_sources(value, loose) -> str:
    """The policy a loosely merged config (untyped, see looped.components) chooses."""
    if value is not None:
        return value
    try:
        looped = int(loose.get("loop", 1)) > 1
    except Exception:  # `loop=abc`, a bad ${...}: reported against the schema later
        looped = False
    return default_policy(looped)


SourcePolicy = Callable[[int, DepthLayout, DepthAttentionConfig], tuple[int, ...]]
# The plain decoder's policies are below; the looped models' (same_layer, anchor, window, ...)
# register themselves in looped.model.loop_sources, which the package imports.
SOURCE_POLICIES = Registry("depth source policy", path="model.depth_attention",
                           selector="sources", base=DepthAttentionConfig,
                           resolve=_resolve_sources)  # name -> SourcePolicy
register_source_policy = SOURCE_POLICIES.register


@register_source_policy("none")
def _none(p: int, layout: DepthLayout, cfg) -> tuple[int, ...]:
    return ()


@register_source_policy("dense")
def _dense(p: int, layout: DepthLayout, cfg) -> tuple[int, ...]:
    return tuple(range(p))


def default_stride(layout: DepthLayout) -> int:
    """The authors' released setting: s = n_layers // 2, counting distinct layers."""
    return max(1, layout.n_distinct_layers // 2)


@dataclass
class StridedKnobs:
    stride: Optional[int] = None  # every stride-th position; None: n_layers // 2 (the authors')
    window: int = 0  # also attend to the w most recent depth positions

    def check(self, cfg) -> None:
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"model.depth_attention.stride must be >= 1, got {self.stride}")
        if self.window < 0:
            raise ConfigError(f"model.depth_attention.window must be >= 0, got {self.window}")


@register_source_policy("strided", config=StridedKnobs)
def _strided(p: int, layout: DepthLayout, cfg) -> tuple[int, ...]:
    stride = cfg.stride or default_stride(layout)
    picked = {j for j in range(p) if j % stride == 0}
    picked.update(range(max(0, p - cfg.window), p))
    return tuple(sorted(picked))


def resolve_policy(cfg, looped: bool) -> str:
    """The configured policy, or the default for the model (default_policy)."""
    if not cfg.enabled:
        return "none"
    return cfg.sources if cfg.sources is not None else default_policy(looped)


def sources_for_layout(policy: str, layout: DepthLayout, cfg) -> list[tuple[int, ...]]:
    fn = SOURCE_POLICIES[policy]
    out = []
    for p in range(layout.n_positions):
        src = tuple(fn(p, layout, cfg))
        if any(not 0 <= j < p for j in src) or len(set(src)) != len(src):
            raise ValueError(f"source policy '{policy}' gave invalid sources {src} at position {p}")
        out.append(src)
    return out


def score_scales(sources: Sequence[tuple[int, ...]], trained: Sequence[tuple[int, ...]]
                 ) -> tuple[float, ...]:
    """Per position, the factor on its depth scores under log_scale: log(n) / log(n_max) where n
    is its softmax's size (sources + itself) and n_max the largest size at the trained R; 1 where
    n <= n_max, so that every position training saw is unchanged. As length-extrapolating
    attention scales by log(length), this keeps a softmax over more values about as peaked."""
    n_max = max((len(s) + 1 for s in trained), default=1)
    if n_max < 2:  # nothing was mixed in training: no size to keep
        return tuple(1.0 for _ in sources)
    return tuple(max(1.0, math.log(len(s) + 1) / math.log(n_max)) for s in sources)


# ---------------------------------------------------------------------------------------------
# The mixing itself


@dataclass
class DepthWeights:
    """Depth-attention weights of one position: weights[b, t, g, i] is the weight that token t,
    KV head g puts on depth position sources[i]. The last source is the position itself."""

    weights: torch.Tensor  # (B, T, Hkv, S + 1)
    sources: tuple[int, ...]


def depth_mix(q: torch.Tensor, k_src: Sequence[torch.Tensor] | torch.Tensor,
              v_src: Sequence[torch.Tensor] | torch.Tensor):
    """Mix values across depth for every token.

    q: (B, H, T, D), this position's queries. k_src, v_src: the keys and values of the sources,
    this position's own last, either as a list of S + 1 tensors (B, Hkv, T, D) or stacked into
    one (S + 1, B, Hkv, T, D). Returns the mixed value (B, Hkv, T, D) and alpha (B, Hkv, T, S + 1).

    Two equivalent paths: a list avoids copying the sources into a stack (training, where the
    tensors are large); a stack needs the fewest kernel launches (decoding one token, where
    launch overhead dominates and the cache hands out a stack in one gather).
    """
    b, h, t, d = q.shape
    stacked = isinstance(k_src, torch.Tensor)
    n_kv = k_src.shape[2] if stacked else k_src[0].shape[1]
    group = h // n_kv
    # q_bar = mean over the group, with the 1/sqrt(D) score scale folded in: one op fewer
    q_bar = q.view(b, n_kv, group, t, d).sum(2).mul_(1.0 / (group * math.sqrt(d)))
    if stacked:
        scores = torch.linalg.vecdot(k_src, q_bar)  # (S + 1, B, Hkv, T)
        alpha = _softmax(scores, 0)
        v_mix = torch.linalg.vecdot(v_src, alpha.unsqueeze(-1), dim=0)
        return v_mix, alpha.permute(1, 2, 3, 0)
    # sources on the first dim, so that each one's weights are a contiguous (B, Hkv, T, 1)
    scores = torch.stack([torch.linalg.vecdot(k, q_bar) for k in k_src])  # (S + 1, B, Hkv, T)
    alpha = _softmax(scores, 0)
    return weighted_sum(v_src, alpha.unsqueeze(-1)), alpha.permute(1, 2, 3, 0)


def weighted_sum(values: Sequence[torch.Tensor] | torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights[i] * values[i] over the first dim of both (a list of values, or a stack):
    one addcmul per source, one pass each rather than a product and a sum."""
    out = values[0] * weights[0]
    for v, w in zip(values[1:], weights[1:]):
        out = torch.addcmul(out, v, w)
    return out


SOFTMAX_FLOPS = 5  # per score: max, subtract, exp, sum, divide (the usual estimate)


def depth_mix_flops(n_sources: int, n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    """Arithmetic FLOPs per token of `depth_mix` at a position with n_sources earlier sources
    (0 when it has none: the layer is then exactly vanilla and runs no depth mixing)."""
    if n_sources == 0:
        return 0
    n = n_sources + 1
    return (n_heads * head_dim  # q_bar: the group sum (the scale rides on it)
            + 2 * n * n_kv_heads * head_dim  # scores
            + SOFTMAX_FLOPS * n * n_kv_heads
            + 2 * n * n_kv_heads * head_dim)  # the weighted sum of values


def _softmax(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax in at least fp32 (bf16 scores would round the weights), back in the input dtype."""
    if scores.dtype in (torch.float32, torch.float64):
        return scores.softmax(dim)
    return scores.float().softmax(dim).to(scores.dtype)
