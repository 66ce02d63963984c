"""The language model: embed -> prelude -> core x R -> coda -> norm -> head.

With n_prelude = n_coda = 0 and loop = 1 it is a plain Qwen3-style decoder of n_layers layers.
Every layer application is one depth position (see looped.model.depth); Depth-Attention at a
position reads the same token's keys and mixed values at earlier positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from looped.errors import ShapeError
from looped.model.attention import DepthStep
from looped.model.block import Block
from looped.model.cache import ActivationStore, KVCache
from looped.model.depth import DepthLayout, DepthWeights, resolve_policy, sources_for_layout
from looped.model.norm import RMSNorm
from looped.model.rope import RotaryEmbedding


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T, vocab)
    layout: DepthLayout
    # depth position -> weights (B, T, Hkv, S + 1) and the source positions, if requested
    depth_weights: Optional[dict[int, DepthWeights]] = None
    # depth position -> sequence-attention weights (B, H, Tq, Tk), if requested (eager kernel)
    attn_weights: Optional[dict[int, torch.Tensor]] = None
    extras: dict = field(default_factory=dict)


class LoopedLM(nn.Module):
    def __init__(self, cfg, loop: int = 1):
        super().__init__()
        self.cfg, self.loop = cfg, loop
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        if cfg.share_weights:
            self.core = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        else:  # the unrolled baseline: one untied copy of the core per iteration
            self.core = nn.ModuleList(
                nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)) for _ in range(loop))
        self.coda = nn.ModuleList(Block(cfg) for _ in range(cfg.n_coda))
        self.adapter = (nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
                        if cfg.injection == "concat" else None)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size,
                                                                 bias=False)
        # unrolled baselines (share_weights=false) get the looped default too, for a fair match
        self.policy = resolve_policy(cfg.depth_attention, looped=loop > 1)
        self._sources: dict[int, list[tuple[int, ...]]] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        # residual-branch outputs shrink with the number of layer applications (GPT-2 style)
        out_std = std / (2 * self.layout().n_positions) ** 0.5
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            is_out = name.endswith("o_proj.weight") or name.endswith("down.weight")
            nn.init.normal_(p, 0.0, out_std if is_out else std)

    # -- depth positions -------------------------------------------------------------------

    def layout(self, loops: Optional[int] = None) -> DepthLayout:
        c = self.cfg
        return DepthLayout(c.n_prelude, c.n_layers, self.loop if loops is None else loops,
                           c.n_coda)

    def depth_sources(self, loops: int) -> list[tuple[int, ...]]:
        """Per depth position, the earlier positions its Depth-Attention reads."""
        if loops not in self._sources:
            self._sources[loops] = sources_for_layout(self.policy, self.layout(loops),
                                                      self.cfg.depth_attention)
        return self._sources[loops]

    def _check_loops(self, loops: Optional[int]) -> int:
        loops = self.loop if loops is None else loops
        if loops < 1:
            raise ShapeError(f"loops must be >= 1, got {loops}")
        if not self.cfg.share_weights and loops != self.loop:
            raise ShapeError(f"an unrolled model (share_weights=false) has exactly {self.loop} "
                             f"copies of its core; cannot run loops={loops}")
        return loops

    def core_block(self, iteration: int, layer: int) -> Block:
        return self.core[layer] if self.cfg.share_weights else self.core[iteration][layer]

    # -- forward -----------------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: Optional[int] = None,
                  loops: Optional[int] = None) -> KVCache:
        c = self.cfg
        ref = self.embed.weight
        return KVCache(self.layout(self._check_loops(loops)).n_positions, batch_size,
                       c.n_kv_heads, max_len or c.max_seq_len, c.head_dim, dtype=ref.dtype,
                       device=ref.device)

    def _inject(self, state: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.cfg.injection == "add":
            return state + e
        if self.cfg.injection == "concat":
            return self.adapter(torch.cat([state, e], dim=-1))
        return state

    def _initial_state(self, e: torch.Tensor) -> torch.Tensor:
        if self.cfg.init_state == "embed":
            return e
        if self.cfg.init_state == "noise":
            return torch.randn_like(e) * self.cfg.init_std
        return torch.zeros_like(e)

    def forward(self, input_ids: torch.Tensor, *, loops: Optional[int] = None,
                cache: Optional[KVCache] = None, return_depth_weights: bool = False,
                return_attn_weights: bool = False) -> LMOutput:
        if input_ids.dim() != 2:
            raise ShapeError(f"input_ids must be (batch, tokens), got shape "
                             f"{tuple(input_ids.shape)}")
        b, t = input_ids.shape
        loops = self._check_loops(loops)
        layout = self.layout(loops)
        sources = self.depth_sources(loops)
        start = cache.length if cache is not None else 0
        if start + t > self.cfg.max_seq_len:
            raise ShapeError(f"sequence of {start + t} tokens exceeds model.max_seq_len="
                             f"{self.cfg.max_seq_len}")
        if cache is not None:
            cache.begin(t, layout.n_positions, b)
        store = cache if cache is not None else ActivationStore()
        raw = self.cfg.depth_attention.mix == "raw"
        depth_w: dict[int, DepthWeights] = {}
        attn_w: dict[int, torch.Tensor] = {}

        def run(block: Block, x: torch.Tensor, p: int) -> torch.Tensor:
            step = DepthStep(p, sources[p], store, raw, return_depth_weights, return_attn_weights)
            x = block(x, self.rope, step)
            if step.depth_weights is not None:
                depth_w[p] = step.depth_weights
            if step.attn_weights is not None:
                attn_w[p] = step.attn_weights
            return x

        x = self.embed(input_ids)  # (B, T, d)
        p = 0
        for block in self.prelude:
            x, p = run(block, x, p), p + 1
        e = x
        state = self._initial_state(e)
        for r in range(loops):
            x = self._inject(state, e)
            for layer in range(self.cfg.n_layers):
                x, p = run(self.core_block(r, layer), x, p), p + 1
            state = x
        x = state
        for block in self.coda:
            x, p = run(block, x, p), p + 1
        if cache is not None:
            cache.commit()
        logits = self.head(x)
        return LMOutput(logits, layout, depth_w if return_depth_weights else None,
                        attn_w if return_attn_weights else None)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)

    # -- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, use_cache: bool = True,
                 loops: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to input_ids (B, T). temperature=0 is greedy."""
        b, t = input_ids.shape
        if t + max_new_tokens > self.cfg.max_seq_len:
            raise ShapeError(f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"model.max_seq_len={self.cfg.max_seq_len}")
        cache = self.new_cache(b, t + max_new_tokens, loops) if use_cache else None
        tokens = input_ids
        logits = self(tokens, loops=loops, cache=cache).logits[:, -1]
        for i in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, generator)  # (B, 1)
            tokens = torch.cat([tokens, nxt], dim=1)
            if i == max_new_tokens - 1:
                break
            if cache is not None:
                logits = self(nxt, loops=loops, cache=cache).logits[:, -1]
            else:
                logits = self(tokens, loops=loops).logits[:, -1]
        return tokens


def sample(logits: torch.Tensor, temperature: float, top_k: Optional[int],
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of logits (B, V): greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
