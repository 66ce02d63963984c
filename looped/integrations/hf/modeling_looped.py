"""A looped (recurrent-depth) Transformer with Depth-Attention, for `transformers`.

This file is copied into every model directory that `looped export` writes, and needs torch and
`transformers` only: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
It is the inference path of looped's LoopedLM, written out so that it can leave the codebase;
looped's tests pin its logits and generations to the original's.

The model: embed -> prelude -> core x loops -> coda -> norm -> head. Every layer application is
one depth position p. At p each token's query (the mean over its KV head's query group) scores
the keys that the same token produced at the source positions of p, plus its own key; the
softmax weights mix those positions' (mixed) values with its own value, and ordinary causal
attention over the sequence reads the mixed value. The cache keeps (key, mixed value) per depth
position: the size of a vanilla KV cache of as many layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_looped import LoopedConfig

# ---------------------------------------------------------------------------------------------
# Depth positions and Depth-Attention sources


def n_positions(cfg: LoopedConfig, loops: int) -> int:
    return cfg.n_prelude + cfg.n_layers * loops + cfg.n_coda


# policies of looped models: (reads the prelude, is iteration rr read at iteration r). Core
# layer l at iteration r reads layer l at those iterations; the prelude reads the earlier
# prelude, the coda the prelude, the core's last iteration and the earlier coda layers.
LOOPED_POLICIES = {
    "same_layer": (True, lambda rr, r, k, s: rr < r),
    "anchor": (True, lambda rr, r, k, s: rr == 0 < r),
    "window": (False, lambda rr, r, k, s: r - k <= rr < r),
    "anchor_window": (True, lambda rr, r, k, s: rr == 0 < r or r - k <= rr < r),
    "loop_strided": (True, lambda rr, r, k, s: rr < r and rr % s == 0),
}


def looped_sources(cfg: LoopedConfig, loops: int, p: int) -> tuple[int, ...]:
    pre, core = cfg.n_prelude, cfg.n_layers
    prelude = tuple(range(min(p, pre)))
    if p < pre:
        return prelude
    if p >= pre + core * loops:
        start = pre + core * (loops - 1) if core else pre
        return prelude + tuple(range(start, p))
    with_prelude, reads = LOOPED_POLICIES[cfg.depth_sources]
    layer, it = (p - pre) % core, (p - pre) // core
    stride = cfg.depth_stride or max(1, loops // 2)
    same = tuple(pre + r * core + layer for r in range(it)
                 if reads(r, it, cfg.depth_window, stride))
    return (prelude if with_prelude else ()) + same


def depth_sources(cfg: LoopedConfig, loops: int) -> list[tuple[int, ...]]:
    """Per depth position, the earlier positions its Depth-Attention reads."""
    pre, core, coda = cfg.n_prelude, cfg.n_layers, cfg.n_coda
    out = []
    for p in range(n_positions(cfg, loops)):
        if cfg.depth_sources == "none":
            src = ()
        elif cfg.depth_sources == "dense":
            src = tuple(range(p))
        elif cfg.depth_sources == "strided":
            stride = cfg.depth_stride or max(1, (pre + core + coda) // 2)
            picked = {j for j in range(p) if j % stride == 0}
            picked.update(range(max(0, p - cfg.depth_window), p))
            src = tuple(sorted(picked))
        elif cfg.depth_sources in LOOPED_POLICIES:
            src = looped_sources(cfg, loops, p)
        else:
            raise ValueError(f"unknown depth_sources '{cfg.depth_sources}'")
        out.append(src)
    return out


class LoopedCache:
    """The per-depth-position KV cache of generation.

    Contract: one slot per depth position (prelude + core x loops + coda), each holding every
    token's key and Depth-Attention-mixed value, (B, Hkv, T, D). Every token runs all `loops`
    iterations here (no adaptive exit), so it writes every slot; a cache serves only the loop
    count it was made for, because the coda sits at other positions under another count.
    """

    slots_per = "depth position"
    exit = "none: every token writes every slot"

    def __init__(self, n_slots: int, loops: int):
        self.loops = loops
        self.keys: list[Optional[torch.Tensor]] = [None] * n_slots
        self.values: list[Optional[torch.Tensor]] = [None] * n_slots

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[2]

    def append(self, p: int, k: torch.Tensor, v: torch.Tensor):
        """Add the chunk's (k, mixed v) at slot p; every token's (K, V) there so far."""
        if self.keys[p] is not None:
            k, v = torch.cat([self.keys[p], k], 2), torch.cat([self.values[p], v], 2)
        self.keys[p], self.values[p] = k, v
        return k, v

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep rows beam_idx (beam search)."""
        for p, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                idx = beam_idx.to(k.device)
                self.keys[p], self.values[p] = k.index_select(0, idx), v.index_select(0, idx)


# ---------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary(head_dim: int, theta: float, positions: torch.Tensor):
    """cos, sin (B, 1, T, D) for positions (B, T), rotate-half convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64,
                                             device=positions.device) / head_dim))
    angles = positions.double()[..., None] * inv_freq
    angles = torch.cat([angles, angles], -1)[:, None]
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


@dataclass
class PassState:
    """What every layer of one forward pass shares."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: Optional[torch.Tensor]  # (B, 1, T, Tk) bool, or None for plain causal attention
    past: int  # tokens already in the cache
    sources: list[tuple[int, ...]]
    cache: Optional[LoopedCache]
    chunk_k: dict  # depth position -> this chunk's keys (B, Hkv, T, D)
    chunk_v: dict  # depth position -> this chunk's mixed values


class LoopedAttention(nn.Module):
    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.h, self.h_kv, self.d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, st: PassState, p: int) -> torch.Tensor:
        b, t, _ = x.shape
        h, h_kv, d = self.h, self.h_kv, self.d
        q = rotate(self.q_norm(self.q_proj(x).view(b, t, h, d)).transpose(1, 2), st.cos, st.sin)
        k = rotate(self.k_norm(self.k_proj(x).view(b, t, h_kv, d)).transpose(1, 2), st.cos,
                   st.sin)
        v = self.v_proj(x).view(b, t, h_kv, d).transpose(1, 2)  # (B, Hkv, T, D)
        if st.sources[p]:
            v = self.depth_mix(q, [st.chunk_k[j] for j in st.sources[p]] + [k],
                               [st.chunk_v[j] for j in st.sources[p]] + [v])
        st.chunk_k[p], st.chunk_v[p] = k, v
        k_all, v_all = (k, v) if st.cache is None else st.cache.append(p, k, v)
        gqa = h != h_kv
        if st.mask is not None:
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=st.mask,
                                                 enable_gqa=gqa)
        elif t == 1:
            out = F.scaled_dot_product_attention(q, k_all, v_all, enable_gqa=gqa)
        elif st.past == 0:
            out = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k_all, v_all, enable_gqa=gqa,
                                                 attn_mask=causal(t, st.past, x.device))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * d))

    def depth_mix(self, q, keys, values):
        """Softmax over the sources (fp32) of q_bar . k_j / sqrt(D); the weighted sum of values."""
        b, h, t, d = q.shape
        group = h // self.h_kv
        q_bar = q.view(b, self.h_kv, group, t, d).sum(2).mul_(1.0 / (group * math.sqrt(d)))
        scores = torch.stack([torch.linalg.vecdot(k, q_bar) for k in keys])  # (S+1, B, Hkv, T)
        alpha = scores.float().softmax(0).to(scores.dtype).unsqueeze(-1)
        out = values[0] * alpha[0]
        for v, a in zip(values[1:], alpha[1:]):
            out = torch.addcmul(out, v, a)
        return out


def causal(t: int, past: int, device) -> torch.Tensor:
    """(T, past + T) bool: query i (at past + i) reads keys j <= past + i."""
    rows = torch.arange(t, device=device)[:, None] + past
    return torch.arange(past + t, device=device)[None] <= rows


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.gate = nn.Linear(d_model, ffn_dim, bias=False)
        self.up = nn.Linear(d_model, ffn_dim, bias=False)
        self.down = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LoopedBlock(nn.Module):
    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = LoopedAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x, st: PassState, p: int):
        x = x + self.attn(self.attn_norm(x), st, p)
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class LoopedCausalLMOutput(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    cache: Optional[LoopedCache] = None  # ModelOutput also answers to past_key_values


class LoopedForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LoopedConfig
    base_model_prefix = "looped"
    main_input_name = "input_ids"
    _no_split_modules = ["LoopedBlock"]

    def __init__(self, config: LoopedConfig):
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.max_seq_len, c.d_model) if c.pos_embedding else None
        self.prelude = nn.ModuleList(LoopedBlock(c) for _ in range(c.n_prelude))
        if c.share_weights:
            self.core = nn.ModuleList(LoopedBlock(c) for _ in range(c.n_layers))
        else:  # the unrolled baseline: one untied copy of the core per iteration
            self.core = nn.ModuleList(nn.ModuleList(LoopedBlock(c) for _ in range(c.n_layers))
                                      for _ in range(c.loops))
        self.coda = nn.ModuleList(LoopedBlock(c) for _ in range(c.n_coda))
        self.adapter = (nn.Linear(2 * c.d_model, c.d_model, bias=False)
                        if c.injection == "concat" else None)
        self.exit_gate = nn.Linear(c.d_model, 1) if c.exit_gate else None  # kept, not used
        self.state_norm = RMSNorm(c.d_model, c.norm_eps) if c.state_norm else None
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size,
                                                               bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own per-depth-position cache (LoopedCache)

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def new_cache(self, loops: Optional[int] = None) -> LoopedCache:
        loops = self._check_loops(loops)
        return LoopedCache(n_positions(self.config, loops), loops)

    def _check_loops(self, loops: Optional[int]) -> int:
        loops = self.config.loops if loops is None else int(loops)
        if loops < 1:
            raise ValueError(f"loops must be >= 1, got {loops}")
        if not self.config.share_weights and loops != self.config.loops:
            raise ValueError(f"an unrolled model has exactly {self.config.loops} copies of its "
                             f"core; cannot run loops={loops}")
        return loops

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None,
                cache: Optional[LoopedCache] = None, use_cache: Optional[bool] = None,
                labels: Optional[torch.LongTensor] = None, loops: Optional[int] = None,
                past_key_values: Optional[LoopedCache] = None, **kwargs) -> LoopedCausalLMOutput:
        """Logits for input_ids (B, T). attention_mask (B, past + T), 1 for real tokens, lets
        a left-padded batch read only its own tokens; position_ids (B, T) default to the count
        of real tokens before each one. loops: iterations of the core (default config.loops)."""
        cache = cache if cache is not None else past_key_values
        loops = self._check_loops(loops if loops is not None else
                                  (cache.loops if cache is not None else None))
        if cache is None and use_cache:
            cache = self.new_cache(loops)
        if cache is not None and cache.loops != loops:
            raise ValueError(f"the cache was made for {cache.loops} loops, not {loops}")
        b, t = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if past + t > self.config.max_seq_len:
            raise ValueError(f"{past + t} tokens exceed max_seq_len={self.config.max_seq_len}")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, t, input_ids.device)
        cos, sin = rotary(self.config.head_dim, self.config.rope_theta, position_ids)
        st = PassState(cos, sin, padding_mask(attention_mask, past, t), past,
                       depth_sources(self.config, loops), cache, {}, {})

        x = self.embed(input_ids)  # (B, T, d)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        p = 0
        for block in self.prelude:
            x, p = block(x, st, p), p + 1
        e = x
        s = self._initial_state(e)
        for r in range(loops):
            x = self._inject(s, e)
            for block in (self.core if self.config.share_weights else self.core[r]):
                x, p = block(x, st, p), p + 1
            s = x if self.state_norm is None else self.state_norm(x)
        for block in self.coda:
            s, p = block(s, st, p), p + 1
        logits = self._head(s)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return LoopedCausalLMOutput(loss, logits, cache)

    def _initial_state(self, e):
        if self.config.init_state == "embed":
            return e
        if self.config.init_state == "noise":
            return torch.randn_like(e) * self.config.init_std
        return torch.zeros_like(e)

    def _inject(self, s, e):
        if self.config.injection == "add":
            return s + e
        if self.config.injection == "concat":
            return self.adapter(torch.cat([s, e], dim=-1))
        return s

    def _head(self, x):
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, cache=None,
                                      past_key_values=None, use_cache=True, loops=None,
                                      **kwargs):
        """The new tokens only once the cache holds the rest; positions from the mask, so that
        a left-padded row counts only its own tokens."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = self.new_cache(loops)
        past = cache.get_seq_length() if use_cache else 0
        ids = input_ids[:, past:]
        position_ids = positions_from_mask(attention_mask, past, ids.shape[1], ids.device)
        return {"input_ids": ids, "attention_mask": attention_mask,
                "position_ids": position_ids, "cache": cache if use_cache else None,
                "use_cache": use_cache, "loops": loops}


def positions_from_mask(attention_mask, past: int, t: int, device) -> torch.Tensor:
    """(B, T) positions of the chunk's tokens: the number of real tokens before each."""
    if attention_mask is None:
        return torch.arange(past, past + t, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, past:past + t]


def padding_mask(attention_mask, past: int, t: int) -> Optional[torch.Tensor]:
    """(B, 1, T, past + T) bool, or None when no key is padding. A padding query reads itself
    (so that its softmax has a term); no real token reads a padding key."""
    if attention_mask is None or bool(attention_mask[:, :past + t].all()):
        return None
    keys = attention_mask[:, :past + t].bool()  # (B, Tk)
    m = causal(t, past, keys.device)[None] & keys[:, None, :]
    m[:, torch.arange(t), past + torch.arange(t)] = True
    return m[:, None]
