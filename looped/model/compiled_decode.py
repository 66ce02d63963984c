"""Compiled decoding: a static-shape one-token step that torch.compile captures once.

The eager cache slices its buffers at Python-int positions, so every decode step would be a new
graph. Here the cache keeps the position as a 0-d tensor: writes go through index_copy_, and
sequence attention reads the whole preallocated buffer under a mask, so every step has the same
shapes and one compiled graph serves them all (on CUDA, `mode="reduce-overhead"` replays it as
a CUDA graph). The decoder keeps the Python-side count and checks capacity outside the graph.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from looped.errors import ConfigError, ShapeError
from looped.model.cache import KVCache
from looped.model.depth import DepthLayout


class StaticKVCache(KVCache):
    """A KVCache whose chunk position is a tensor (`pos`), for a step compiled once."""

    drops_rows = False  # a compiled step keeps every row: its shapes never change

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pos = torch.zeros((), dtype=torch.long, device=self.k.device)
        self._idx: Optional[torch.Tensor] = None  # (T,) the chunk's sequence positions

    def next_position(self) -> torch.Tensor:
        return self.pos

    def begin(self, n_tokens: int, layout: DepthLayout, batch_size: int) -> None:
        # only checks of values that are the same at every step: no Python int that moves
        if batch_size != self.batch_size or not self.policy.serves(self.layout, layout):
            raise ShapeError("a compiled decoder's cache serves only the batch size and loop "
                             "count it was made for")
        self.offset = self.pos
        self._idx = self.pos + torch.arange(n_tokens, device=self.k.device)
        self._open_chunk(n_tokens, layout)

    def commit(self) -> None:
        # the decoder advances length and pos outside the compiled graph
        self._raw_v = {}
        self._scratch_k = self._scratch_v = self._scratch_kv = None

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens
        self.pos.fill_(self.length)

    def reset(self) -> None:
        super().reset()
        self.pos.zero_()

    def _chunk(self, buf: torch.Tensor, dim: int) -> torch.Tensor:
        return buf.index_select(dim, self._idx)

    def _write_chunk(self, buf: torch.Tensor, dim: int, x: torch.Tensor) -> None:
        buf.index_copy_(dim, self._idx, x)

    def _up_to_chunk_end(self, buf: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole buffer: keys after the query's position are masked by the kernel."""
        return buf


class RowsAsReductions(TorchFunctionMode):
    """Inside a compiled decode step, a linear layer applied to a single row of activations
    is written as a product and a sum over the input features. Inductor fuses that into one
    streaming reduction over the weight, parallel over the output features, which reads the
    weights at close to the memory bandwidth; the BLAS matrix-vector call it would otherwise
    make reads small matrices on one thread here, at under half of it (see `looped bench
    decode`). Several rows, and other devices (not measured), keep the matrix product."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.numel() == x.shape[-1] and x.device.type == "cpu":  # one row, measured on CPU
                out = (x.unsqueeze(-2) * weight).sum(-1)
                return out if bias is None else out + bias
        return func(*args, **kwargs)


class CompiledDecoder:
    """Prefill (eager) and one-token decode steps (compiled once) of a LoopedLM through a
    StaticKVCache of max_len tokens. Reuse one decoder for many generations (`reset()`): each
    new decoder is a new graph to compile.

    mode: torch.compile's mode; None picks "reduce-overhead" (CUDA graphs) on CUDA and the
    default elsewhere. compile=False runs the same static step eagerly (the reference)."""

    def __init__(self, model, batch_size: int, max_len: int, *, loops: Optional[int] = None,
                 kv: str = "per_iteration", compile: bool = True, mode: Optional[str] = None):
        cfg = model.cfg
        if max_len > cfg.max_seq_len:
            raise ShapeError(f"max_len {max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
        if cfg.kernel == "xformers":
            raise ConfigError("compiled decode runs sequence attention with sdpa or eager; "
                              "use model.kernel=sdpa")
        self.model, self.loops = model, model._check_loops(loops)
        ref = model.embed.weight
        heads, k_dim, v_dim = model.attention_kind.cache_geometry(cfg)
        self.cache = StaticKVCache(model.layout(self.loops), batch_size, heads, max_len, k_dim,
                                   v_dim=v_dim, policy=kv, dtype=ref.dtype, device=ref.device)
        # the step's input lives in one buffer too: any strides or address of the caller's
        # tensor would otherwise be a new graph
        self.tokens = torch.zeros((batch_size, 1), dtype=torch.long, device=ref.device)
        on_cuda = ref.device.type == "cuda"
        self.clone_outputs = False
        if compile:
            mode = mode or ("reduce-overhead" if on_cuda else None)
            # CUDA graphs need the cache at one address: it is mutated in place at every step
            for buf in self.cache.buffers():
                torch._dynamo.mark_static_address(buf)
            torch._dynamo.mark_static_address(self.cache.pos)
            torch._dynamo.mark_static_address(self.tokens)
            self._step = torch.compile(self._compiled_step, fullgraph=True, dynamic=False,
                                       mode=mode)
            self.clone_outputs = mode == "reduce-overhead"  # a replay overwrites its outputs
        else:
            self._step = self._forward_step

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, loops=self.loops, cache=self.cache).logits

    def _forward_step(self) -> torch.Tensor:
        return self._forward(self.tokens)

    def _compiled_step(self) -> torch.Tensor:
        with RowsAsReductions():
            return self._forward(self.tokens)

    def _reserve(self, n_tokens: int) -> None:
        if self.cache.length + n_tokens > self.cache.max_len:
            raise ShapeError(f"the decoder holds {self.cache.max_len} tokens; "
                             f"{self.cache.length} are used and {n_tokens} more do not fit")

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of the prompt, run eagerly through the same cache."""
        self._reserve(input_ids.shape[1])
        logits = self._forward(input_ids)
        self.cache.advance(input_ids.shape[1])
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, V) of one new token per row, tokens (B, 1)."""
        self._reserve(1)
        if tokens.shape != self.tokens.shape:
            raise ShapeError(f"a decode step takes tokens of shape {tuple(self.tokens.shape)}, "
                             f"got {tuple(tokens.shape)}")
        self.tokens.copy_(tokens)
        try:
            logits = self._step()
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # every decoder compiles the same method, and dynamo caps its graphs per method
            warnings.warn("torch.compile's recompile limit is reached (too many decoder "
                          "shapes in this process); this decoder runs its step eagerly")
            self._step, self.clone_outputs = self._forward_step, False
            logits = self._step()
        self.cache.advance(1)
        return logits.clone() if self.clone_outputs else logits

    def reset(self) -> None:
        self.cache.reset()


MIN_BUCKET = 64  # the shortest decoder: shorter generations share it
KEPT_DECODERS = 8  # per model; beyond it the least recently used one is dropped
_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def decoder_for(model, batch_size: int, max_len: int, loops: int,
                kv: str = "per_iteration") -> CompiledDecoder:
    """The model's CompiledDecoder for these shapes, built once and kept (every new decoder is
    a new graph to compile). max_len is rounded up to a power of two (at least MIN_BUCKET, at
    most max_seq_len), so generations of similar lengths share one."""
    bucket = min(model.cfg.max_seq_len, max(MIN_BUCKET, 1 << (max_len - 1).bit_length()))
    ref = model.embed.weight
    key = (batch_size, bucket, loops, kv, ref.device, ref.dtype)
    kept = _DECODERS.setdefault(model, OrderedDict())
    if key in kept:
        kept.move_to_end(key)
        return kept[key]
    if len(kept) >= KEPT_DECODERS:
        kept.popitem(last=False)
    kept[key] = CompiledDecoder(model, batch_size, bucket, loops=loops, kv=kv)
    return kept[key]


def kept_decoders(model) -> int:
    return len(_DECODERS.get(model, ()))
