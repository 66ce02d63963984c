"""Multi-head latent attention (DeepSeek-V2), with Depth-Attention on its latent.

Per token, MLA caches no keys or values: it caches a latent c = RMSNorm(W_DKV x) of width d_c
and one RoPE key k_r = RoPE(W_KR x) of width d_rope, shared by all heads. Each head h reads
keys [W_UK_h c ; k_r] and values W_UV_h c, with queries [q_h,nope ; RoPE(q_h,rope)] from a
full-rank projection or through a low-rank latent.

Depth-Attention here mixes the latent, because the latent is all that the cache keeps beside the
RoPE key. At depth position p, for each token:

    score_j = ( mean_h q_h,nope . W_UK_h c~_j  +  mean_h q_h,rope . k_r,j ) / sqrt(d_nope + d_rope)
    alpha   = softmax over j in sources(p) + [p]             (one weight per token: c is shared)
    c~_p    = sum_{j < p} alpha_j c~_j + alpha_p c_p

and layer p's keys and values are up-projected from c~_p, which the cache keeps in c's place:
no parameter and no cached byte is added. Consequences, and the choices made:

- Under GQA only the value is mixed and the key stays raw. Under MLA the NoPE keys come from
  the same latent, so they are mixed too. Mixing only the value path needs the raw latent (for
  the keys) and the mixed one (for the values): a second latent in the cache. That is the
  ablation `model.mla.depth_mix=values`: the cache's K slot holds [k_r ; c] (raw), its V slot
  c~, the scores read the raw latents, and the cache grows from d_c + d_rope to 2 d_c + d_rope.
- The RoPE key is not mixed. It is cached raw and takes part in the depth scores; RoPE
  rotates the query and every source's key by the same angle (all sit at the same token), so the
  rotation cancels there as it does under GQA.
- W_UK in the score (`model.mla.depth_keys`): `absorbed` (the default) uses layer p's own
  W_UK_h for every source, so the whole score is one latent-space query q_lat =
  mean_h W_UK_h^T q_h,nope dotted with each cached latent. `own` uses each source layer's
  W_UK, so source j's key is the one its own attention read. The two are the same when the
  source is the same layer at an earlier iteration, which is every core source of a looped
  model under `same_layer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from looped.errors import ConfigError
from looped.model.attention import (ATTENTION_KINDS, DepthAttentionLayer, DepthContext,
                                    DepthPosition)
from looped.model.depth import SOFTMAX_FLOPS, _softmax, weighted_sum
from looped.model.kernels import attend
from looped.model.norm import RMSNorm


DEPTH_KEYS = ("absorbed", "own")
DEPTH_MIXES = ("latent", "values")


@dataclass
class MLAConfig:
    """The `model.mla` node: multi-head latent attention's knobs (model.attention=mla).
    model.n_heads is its head count; model.head_dim and n_kv_heads are not used by it."""

    kv_rank: int = 32  # d_c: the latent each token caches per depth position (with its RoPE key)
    q_rank: int = 0  # low-rank queries through a latent of this width; 0: a full-rank projection
    nope_dim: int = 16  # per head: the query/key part without RoPE, keys up-projected from c
    rope_dim: int = 8  # the decoupled RoPE key (one per token, all heads) and each query's part
    v_dim: int = 16  # per head: the value width, up-projected from the latent
    # how Depth-Attention scores source j's latent: `absorbed` through this layer's key
    # up-projection (one latent-space query; equals `own` when j is the same layer, as in a
    # looped core); `own` through layer j's (j's keys as its own attention read them)
    depth_keys: str = "absorbed"
    # what Depth-Attention mixes: `latent` (the design: the cache keeps only the mixed latent and
    # the RoPE key); `values` (an ablation: keys stay on the raw latent, which the cache then
    # also keeps, d_c more per token and position)
    depth_mix: str = "latent"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@ATTENTION_KINDS.register("mla")
class MLAttention(DepthAttentionLayer):
    @staticmethod
    def check_config(m) -> None:
        """The model node's checks that only MLA needs (m: the resolved `model` node)."""
        a = m.mla
        for name in ("kv_rank", "nope_dim", "rope_dim", "v_dim"):
            _require(a[name] >= 1, f"model.mla.{name} must be >= 1, got {a[name]}")
        _require(a.q_rank >= 0, f"model.mla.q_rank must be >= 0, got {a.q_rank}")
        _require(a.rope_dim % 2 == 0,
                 f"model.mla.rope_dim must be even for RoPE, got {a.rope_dim}")
        _require(a.depth_keys in DEPTH_KEYS, f"unknown model.mla.depth_keys '{a.depth_keys}'; "
                 f"choose one of: {', '.join(DEPTH_KEYS)}")
        _require(a.depth_mix in DEPTH_MIXES, f"unknown model.mla.depth_mix '{a.depth_mix}'; "
                 f"choose one of: {', '.join(DEPTH_MIXES)}")
        _require(m.cross_layer.method == "none", f"model.attention=mla runs on the plain "
                 f"residual stream; model.cross_layer.method={m.cross_layer.method} is not "
                 f"supported with it")
        _require(m.kernel != "xformers", "model.attention=mla needs model.kernel=sdpa or eager "
                 "(its values are narrower than its queries and keys)")

    @staticmethod
    def cache_geometry(cfg) -> tuple[int, int, int]:
        """One 'head' per token: the RoPE key in the K slot, the (mixed) latent in the V slot;
        under depth_mix=values the K slot also holds the raw latent."""
        m = cfg.mla
        raw_latent = m.kv_rank if m.depth_mix == "values" else 0
        return 1, m.rope_dim + raw_latent, m.kv_rank

    @staticmethod
    def rope_dim(cfg) -> int:
        return cfg.mla.rope_dim

    @staticmethod
    def attention_flops(cfg, context: int) -> int:
        m = cfg.mla
        return 2 * cfg.n_heads * (m.nope_dim + m.rope_dim + m.v_dim) * context

    @staticmethod
    def depth_flops(cfg, n_sources: int, n_source_layers: int,
                    absorbed_attention: bool = False) -> int:
        """Per token at a position with n_sources sources, of which n_source_layers are other
        layers whose W_UK `own` applies (`absorbed` applies only this layer's).
        absorbed_attention: the sequence attention itself runs in latent space (DeepSeek's
        absorbed decoding), so it already has this layer's W_UK_h^T q_h for every head."""
        if n_sources == 0:
            return 0
        m, h, n = cfg.mla, cfg.n_heads, n_sources + 1
        projections = (0 if absorbed_attention else 1) + \
            (n_source_layers if m.depth_keys == "own" else 0)
        return (projections * 2 * h * m.nope_dim * m.kv_rank  # W_UK_h^T q_h, all heads
                + (h * m.kv_rank if absorbed_attention else 0)  # their mean
                + h * m.rope_dim  # the heads' mean RoPE query
                + 2 * n * (m.kv_rank + m.rope_dim)  # scores
                + SOFTMAX_FLOPS * n
                + 2 * n * m.kv_rank)  # the weighted sum of latents

    def __init__(self, cfg):
        super().__init__()
        m = cfg.mla
        self.h, self.d_nope, self.d_rope, self.d_v, self.d_c = (cfg.n_heads, m.nope_dim,
                                                                m.rope_dim, m.v_dim, m.kv_rank)
        self.kernel, self.depth_keys, self.window = cfg.kernel, m.depth_keys, cfg.attn_window
        self.values_only = m.depth_mix == "values"  # the ablation: keys from the raw latent
        qk = m.nope_dim + m.rope_dim
        if m.q_rank:
            self.q_down = nn.Linear(cfg.d_model, m.q_rank, bias=False)
            self.q_norm = RMSNorm(m.q_rank, cfg.norm_eps)
            self.q_up = nn.Linear(m.q_rank, cfg.n_heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * qk, bias=False)
        self.kv_down = nn.Linear(cfg.d_model, m.kv_rank, bias=False)
        self.kv_norm = RMSNorm(m.kv_rank, cfg.norm_eps)
        self.k_up = nn.Linear(m.kv_rank, cfg.n_heads * m.nope_dim, bias=False)
        self.v_up = nn.Linear(m.kv_rank, cfg.n_heads * m.v_dim, bias=False)
        self.k_rope = nn.Linear(cfg.d_model, m.rope_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * m.v_dim, cfg.d_model, bias=False)
        self.scale = 1.0 / math.sqrt(qk)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_up(self.q_norm(self.q_down(x)))

    def project(self, x, ctx, value_hook):
        """((q_nope, q_rope), the cached key (B, 1, T, d_rope [+ d_c]), the latent (B, 1, T,
        d_c)): the latent takes the V slot, the one thing Depth-Attention mixes."""
        b, t, _ = x.shape
        offset = ctx.store.offset
        q = self.queries(x).view(b, t, self.h, self.d_nope + self.d_rope).transpose(1, 2)
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], -1)  # (B, H, T, *)
        q_rope = ctx.rope(q_rope, offset)
        c = self.kv_norm(self.kv_down(x)).unsqueeze(1)  # (B, 1, T, d_c): the latent
        k_r = ctx.rope(self.k_rope(x).unsqueeze(1), offset)  # (B, 1, T, d_rope)
        if self.values_only:  # the K slot keeps the raw latent beside the RoPE key
            k_r = torch.cat([k_r, c], -1)
        return (q_nope, q_rope), k_r, c

    def mix(self, q, k_src, v_src, pos, ctx):
        return self.depth_mix(*q, k_src, v_src, pos, ctx)

    def read(self, q, k_all, c_all, ctx, pos):
        (q_nope, q_rope), h = q, self.h
        b, _, t, _ = q_nope.shape
        tk = c_all.shape[2]
        k_all, key_latents = self._split_keys(k_all, c_all)
        k = torch.cat([self.k_up(key_latents[:, 0]).view(b, tk, h, self.d_nope).transpose(1, 2),
                       k_all.expand(b, h, tk, self.d_rope)], -1)  # (B, H, Tk, d_nope + d_rope)
        v = self.v_up(c_all[:, 0]).view(b, tk, h, self.d_v).transpose(1, 2)  # (B, H, Tk, d_v)
        out, weights = attend(torch.cat([q_nope, q_rope], -1), k, v, kernel=self.kernel,
                              q_offset=ctx.store.offset, need_weights=ctx.recorder.want_attn,
                              window=self.window)
        if weights is not None:
            ctx.recorder.attn_weights[pos.index] = weights
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * self.d_v))

    def _split_keys(self, k_entry, latents):
        """(RoPE keys, the latents keys are read from): the mixed latents, or under
        depth_mix=values the raw ones the K slot holds."""
        if not self.values_only:
            return k_entry, latents
        return k_entry[..., :self.d_rope], k_entry[..., self.d_rope:]

    def latent_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """mean_h W_UK_h^T q_h,nope with this layer's W_UK: (B, H, T, d_nope) -> (B, 1, T, d_c)."""
        b, h, t, _ = q_nope.shape
        flat = q_nope.transpose(1, 2).reshape(b, t, h * self.d_nope)
        return (flat @ self.k_up.weight).unsqueeze(1) / h

    def depth_mix(self, q_nope, q_rope, k_src, c_src, pos: DepthPosition, ctx: DepthContext):
        """The mixed latent (B, 1, T, d_c) and alpha (B, 1, T, S + 1). k_src, c_src: the
        sources' RoPE keys and latents, this position's own last, as a list of S + 1 tensors
        or stacked on a first dim."""
        q_rope_bar = q_rope.mean(1, keepdim=True)  # (B, 1, T, d_rope)
        positions = pos.sources + (pos.index,)
        lat: dict[int, torch.Tensor] = {}  # one latent query per W_UK used
        scores = []
        for i, j in enumerate(positions):
            layer = self
            if self.depth_keys == "own" and j != pos.index:
                layer = ctx.attention_at(j)
            if id(layer) not in lat:
                lat[id(layer)] = layer.latent_query(q_nope)
            rope_key, key_latent = self._split_keys(k_src[i], c_src[i])
            scores.append(torch.linalg.vecdot(key_latent, lat[id(layer)])
                          + torch.linalg.vecdot(rope_key, q_rope_bar))
        alpha = _softmax(torch.stack(scores) * self.scale, 0)  # (S + 1, B, 1, T)
        return weighted_sum(c_src, alpha.unsqueeze(-1)), alpha.permute(1, 2, 3, 0)
