"""GQA causal self-attention with QK-norm and RoPE, whose value is first mixed across depth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import nn

from looped.model.cache import ActivationStore, KVCache
from looped.model.depth import DepthWeights, depth_mix, depth_mix_flops
from looped.model.kernels import attend
from looped.model.norm import RMSNorm
from looped.model.rope import RotaryEmbedding
from looped.registry import Registry

# model.attention -> the attention class of every block. A class also says what a token caches
# per depth position (cache_geometry), how wide its RoPE is, and what its attention and its
# Depth-Attention cost (looped flops).
ATTENTION_KINDS = Registry("attention kind")


@dataclass(frozen=True)
class DepthPosition:
    """One layer application's place in depth: what its Depth-Attention reads, and which tokens
    stay frozen there."""

    index: int
    sources: tuple[int, ...] = ()  # earlier depth positions Depth-Attention reads; () is vanilla
    # (B, T) tokens that exited earlier: they keep the entries of position frozen_from
    frozen: Optional[torch.Tensor] = None
    frozen_from: Optional[int] = None
    score_scale: float = 1.0  # the factor on its depth scores (model.depth_attention.log_scale)


class Recorder:
    """What a forward pass was asked to report, by depth position: Depth-Attention weights and
    sequence-attention weights. Layers hand their weights over; the recorder keeps what was
    asked for."""

    def __init__(self, depth_weights: bool = False, attn_weights: bool = False):
        self.want_depth, self.want_attn = depth_weights, attn_weights
        self.depth_weights: dict[int, DepthWeights] = {}
        self.attn_weights: dict[int, torch.Tensor] = {}  # (B, H, Tq, Tk)


@dataclass
class DepthContext:
    """What every layer of one forward pass shares."""

    store: Union[ActivationStore, KVCache]  # keys and (mixed) values by depth position
    rope: RotaryEmbedding
    raw_mix: bool = False  # mix=raw: sources contribute raw values, not mixed ones
    recorder: Recorder = field(default_factory=Recorder)
    # depth position -> the attention module that runs there (MLA's depth_keys=own reads it)
    attention_at: Optional[Callable[[int], nn.Module]] = None


class DepthAttentionLayer(nn.Module):
    """The skeleton every attention kind shares: Depth-Attention over the same token's earlier
    depth positions, then causal attention over the sequence reading the mixed values.

        q, k, v  = project(x)                    the kind's projections (v: what is cached and
                                                 mixed; GQA's values, MLA's latent)
        k_src, v_src = store.depth_sources(...)  position p's sources and itself
        v, alpha = mix(q, k_src, v_src)          only where p has sources; else v, exactly
        (exited tokens keep their k and mixed v of one iteration back)
        store.put(p, k, v)                       the cache holds the mixed v
        out      = read(q, store.history(p))     sequence attention, the output projection

    A kind implements project, mix and read (and the static hooks the config, the cache and
    the flops tool ask of it: check_config, cache_geometry, rope_dim, attention_flops,
    depth_flops)."""

    def project(self, x: torch.Tensor, ctx: DepthContext,
                value_hook: Optional[Callable[[torch.Tensor], torch.Tensor]]):
        """(queries in the kind's form, key (B, Hkv, T, Dk), value (B, Hkv, T, Dv))."""
        raise NotImplementedError

    def mix(self, q, k_src, v_src, pos: DepthPosition, ctx: DepthContext):
        """(the mixed value (B, Hkv, T, Dv), the weights (B, Hkv, T, S + 1))."""
        raise NotImplementedError

    def read(self, q, k_all: torch.Tensor, v_all: torch.Tensor, ctx: DepthContext,
             pos: DepthPosition) -> torch.Tensor:
        """Sequence attention over every token's cached (k, mixed v) -> (B, T, d_model)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ctx: DepthContext, pos: DepthPosition,
                value_hook: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                ) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d). value_hook: a cross-layer method's change to the value
        (B, Hkv, T, D) before Depth-Attention (value residual learning)."""
        q, k, v = self.project(x, ctx, value_hook)
        store, recorder = ctx.store, ctx.recorder
        raw_v = v if ctx.raw_mix else None
        if pos.sources:
            k_src, v_src = store.depth_sources(pos.index, pos.sources, k, v, raw=ctx.raw_mix)
            v, alpha = self.mix(q, k_src, v_src, pos, ctx)  # v mixed across depth
            if recorder.want_depth:
                recorder.depth_weights[pos.index] = DepthWeights(
                    alpha.transpose(1, 2).detach(), pos.sources + (pos.index,))
        elif recorder.want_depth:  # no source: all weight on itself, exactly vanilla
            recorder.depth_weights[pos.index] = DepthWeights(
                v.new_ones(x.shape[0], x.shape[1], v.shape[1], 1), (pos.index,))
        if pos.frozen is not None:
            k, v, raw_v = self._keep_frozen(store, pos, k, v, raw_v)
        # the handshake of looped.model.cache.DepthStore: depth_sources stored this key
        store.put(pos.index, k, v, raw_v, key_stored=bool(pos.sources) and pos.frozen is None)
        k_all, v_all = store.history(pos.index)  # (B, Hkv, Tk, D)
        return self.read(q, k_all, v_all, ctx, pos)

    @staticmethod
    def _keep_frozen(store, pos: DepthPosition, k, v, raw_v):
        """Exited tokens reuse their last key and mixed value (and raw value, for mix=raw)."""
        keep = pos.frozen[:, None, :, None]  # (B, 1, T, 1)
        k_old, v_old, raw_old = store.entries(pos.frozen_from)
        k, v = torch.where(keep, k_old, k), torch.where(keep, v_old, v)
        if raw_v is not None:
            raw_v = torch.where(keep, raw_old, raw_v)
        return k, v, raw_v


@ATTENTION_KINDS.register("gqa")
class Attention(DepthAttentionLayer):
    """GQA with QK-norm and RoPE (Qwen3)."""

    # -- what the config, the flops tool and the cache ask of an attention kind -----------------

    @staticmethod
    def check_config(m) -> None:
        """Checks of the resolved `model` node that only this kind needs (a one-line
        ConfigError); GQA's shapes are the general ones."""

    @staticmethod
    def cache_geometry(cfg) -> tuple[int, int, int]:
        """(heads, key width, value width) of the cache's entries per token and depth position."""
        return cfg.n_kv_heads, cfg.head_dim, cfg.head_dim

    @staticmethod
    def rope_dim(cfg) -> int:
        return cfg.head_dim

    @staticmethod
    def attention_flops(cfg, context: int) -> int:
        """Per token and depth position: QK^T and AV over `context` keys."""
        return 4 * cfg.n_heads * cfg.head_dim * context

    @staticmethod
    def depth_flops(cfg, n_sources: int, n_source_layers: int) -> int:
        """Depth-Attention's arithmetic per token at a position with n_sources sources."""
        return depth_mix_flops(n_sources, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.kernel, self.window = cfg.kernel, cfg.attn_window
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)  # per head, before RoPE (Qwen3)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def project(self, x, ctx, value_hook):
        b, t, _ = x.shape
        h, h_kv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_norm(self.q_proj(x).view(b, t, h, d))
        k = self.k_norm(self.k_proj(x).view(b, t, h_kv, d))
        v = self.v_proj(x).view(b, t, h_kv, d).transpose(1, 2)  # (B, Hkv, T, D)
        if value_hook is not None:
            v = value_hook(v)
        offset = ctx.store.offset
        q = ctx.rope(q.transpose(1, 2), offset)  # (B, H, T, D)
        k = ctx.rope(k.transpose(1, 2), offset)  # (B, Hkv, T, D)
        return q, k, v

    def mix(self, q, k_src, v_src, pos, ctx):
        if pos.score_scale != 1.0:  # scaling q_bar scales every score q_bar . k_j
            q = q * pos.score_scale
        return depth_mix(q, k_src, v_src)

    def read(self, q, k_all, v_all, ctx, pos):
        b, _, t, _ = q.shape
        out, weights = attend(q, k_all, v_all, kernel=self.kernel, q_offset=ctx.store.offset,
                              need_weights=ctx.recorder.want_attn, window=self.window)
        if weights is not None:
            ctx.recorder.attn_weights[pos.index] = weights
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
