"""Key/value stores indexed by depth position. One store serves both kinds of attention:

- sequence attention at position p reads the keys and (mixed) values of all tokens so far at p;
- Depth-Attention at position p reads the entries of the *same* tokens at earlier positions.

Every store speaks the DepthStore protocol below. `ActivationStore` holds one forward pass's
tensors (training, no cache). `KVCache` is the inference cache: preallocated (K, mixed V) per storage slot, exactly the size of a vanilla
KV cache, because the mixed value lives in the ordinary V slot and nothing else is kept. Its
cache policy says which depth positions share a slot (looped.model.cache_policy).
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch

from looped.errors import ShapeError
from looped.model.cache_policy import CachePolicy, cache_policy
from looped.model.depth import DepthLayout


@runtime_checkable
class DepthStore(Protocol):
    """What an attention layer at depth position p asks of the store, in this order:

        k_src, v_src = store.depth_sources(p, sources, k, v, raw)   # only if p has sources
        store.put(p, k, v_mixed, raw_v, key_stored=...)
        k_all, v_all = store.history(p)

    The handshake: depth_sources may store p's own key and value already (a KVCache does, so
    that one gather reads the sources and p together). The put that follows says
    key_stored=True when its key is the one depth_sources was given (no exited token replaced
    it), and the store then writes only the mixed value. entries(p) reads back what put wrote
    for this chunk (exited tokens keep them), copy_position(src, dst, rows) copies them to a
    later position, and rows(index) is a view of some rows of the batch (drops_rows says
    whether the store has one)."""

    offset: int  # tokens before this chunk
    drops_rows: bool

    def depth_sources(self, p: int, sources: tuple[int, ...], k: torch.Tensor, v: torch.Tensor,
                      raw: bool): ...

    def put(self, p: int, k: torch.Tensor, v: torch.Tensor,
            raw_v: Optional[torch.Tensor] = None, *, key_stored: bool = False) -> None: ...

    def history(self, p: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def entries(self, p: int): ...

    def copy_position(self, src: int, dst: int, rows: Optional[torch.Tensor] = None) -> None: ...


class ActivationStore:
    """The depth buffer of a single cache-free forward pass over a whole sequence."""

    offset = 0  # tokens before this chunk: none, the chunk is the whole sequence
    drops_rows = False  # every row runs every iteration (see KVCache.rows)

    def __init__(self, keep: Optional[frozenset[int]] = None):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.raw_v: dict[int, torch.Tensor] = {}
        # the positions later ones read (Depth-Attention's sources); None: all. The others are
        # dropped once the next position is written, so a model without Depth-Attention does
        # not hold every position's K/V until the forward ends (or, checkpointed, until backward)
        self.keep = keep
        self._transient: Optional[int] = None  # the last position written that is not kept

    def depth_sources(self, p: int, sources: tuple[int, ...], k: torch.Tensor, v: torch.Tensor,
                      raw: bool) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.raw_v if raw else self.v
        # lists, not a stack: no copies of these (large) activations
        return [self.k[j] for j in sources] + [k], [values[j] for j in sources] + [v]

    def put(self, p: int, k: torch.Tensor, v: torch.Tensor,
            raw_v: Optional[torch.Tensor] = None, *, key_stored: bool = False) -> None:
        if self.keep is not None:
            if self._transient is not None and self._transient != p:
                del self.k[self._transient], self.v[self._transient]
                self.raw_v.pop(self._transient, None)
            self._transient = None if p in self.keep else p
        self.k[p], self.v[p] = k, v  # references: storing the key again costs nothing
        if raw_v is not None:
            self.raw_v[p] = raw_v

    def history(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[p], self.v[p]

    def entries(self, p: int):
        """This chunk's (k, mixed v, raw v or None) at position p."""
        return self.k[p], self.v[p], self.raw_v.get(p)

    def copy_position(self, src: int, dst: int, rows: None = None) -> None:
        self.k[dst], self.v[dst] = self.k[src], self.v[src]
        if src in self.raw_v:
            self.raw_v[dst] = self.raw_v[src]


class KVCache:
    """Preallocated (K, mixed V) of shape (S, B, Hkv, max_len, D) for S storage slots.

    A cache policy (looped.model.cache_policy) maps each depth position to a slot: one slot per
    position (`per_iteration`, exact) or one per distinct layer (`last`, independent of R).
    A forward pass over a chunk of T new tokens calls `begin(T, layout, B)`, writes each
    position's entries for those tokens, and `commit()`s. Depth-Attention for the chunk reads
    the chunk's own entries at earlier positions: from the slots when every position has its
    own, else from a scratch buffer that lives for that forward pass only. Either way decoding
    needs no state between calls beyond the slots.
    """

    drops_rows = True  # an iteration may run on a subset of the rows (see rows())

    def __init__(self, layout: DepthLayout | int, batch_size: int, n_kv_heads: int,
                 max_len: int, head_dim: int, *, v_dim: Optional[int] = None,
                 policy: str | CachePolicy = "per_iteration",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if isinstance(layout, int):  # a plain stack of that many layers
            layout = DepthLayout(layout, 0, 1, 0)
        self.layout = layout  # the layout the cache was made for
        self.policy = cache_policy(policy) if isinstance(policy, str) else policy
        n_slots = self.policy.n_slots(layout)
        v_dim = head_dim if v_dim is None else v_dim
        shape = (n_slots, batch_size, n_kv_heads, max_len)
        if v_dim == head_dim:
            # K and V share one buffer so that Depth-Attention gathers both in one indexing op
            self.kv: Optional[torch.Tensor] = torch.zeros(
                (n_slots, 2) + shape[1:] + (head_dim,), dtype=dtype, device=device)
            self.k, self.v = self.kv[:, 0], self.kv[:, 1]  # views: (S, B, Hkv, max_len, D)
        else:  # entries of two widths (MLA: the RoPE key and the latent): two buffers
            self.kv = None
            self.k = torch.zeros(shape + (head_dim,), dtype=dtype, device=device)
            self.v = torch.zeros(shape + (v_dim,), dtype=dtype, device=device)
        self.length = 0  # tokens committed
        self.offset = 0  # first token of the chunk being written
        self._end = 0
        self._slot: list[int] = []  # this forward pass's slot per depth position
        # when slots are shared, the chunk's entries per depth position for this forward pass:
        # (P, B, Hkv, T, D) each (views of one (P, 2, ...) buffer when K and V have one width)
        self._scratch_k: Optional[torch.Tensor] = None
        self._scratch_v: Optional[torch.Tensor] = None
        self._scratch_kv: Optional[torch.Tensor] = None
        self._raw_v: dict[int, torch.Tensor] = {}  # only for mix=raw: this chunk's raw values
        self._index: dict[tuple[int, ...], torch.Tensor] = {}

    def buffers(self) -> list[torch.Tensor]:
        """The tensors that hold the cache (what a compiled step marks as static)."""
        return [self.kv] if self.kv is not None else [self.k, self.v]

    @property
    def n_slots(self) -> int:
        return self.k.shape[0]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes kept between forward passes (the scratch of one pass is not counted)."""
        return sum(b.nbytes for b in self.buffers())

    def begin(self, n_tokens: int, layout: DepthLayout, batch_size: int) -> None:
        if batch_size != self.batch_size:
            raise ShapeError(f"cache holds batch size {self.batch_size}, got {batch_size}")
        if not self.policy.serves(self.layout, layout):
            # another loop count would put the coda at other positions than earlier tokens
            raise ShapeError(f"a {self.policy.name} cache made for {self.layout.loops} loop(s) "
                             f"cannot serve {layout.loops}; make the cache with the same loops "
                             f"(model.new_cache(..., loops=R))")
        if self.length + n_tokens > self.max_len:
            raise ShapeError(f"cache holds {self.max_len} tokens; {self.length} are used and "
                             f"{n_tokens} more do not fit")
        self.offset, self._end = self.length, self.length + n_tokens
        self._open_chunk(n_tokens, layout)

    def _open_chunk(self, n_tokens: int, layout: DepthLayout) -> None:
        """The state of one forward pass over a chunk of n_tokens: each position's slot, and
        when slots are shared a scratch copy of the chunk's entries for Depth-Attention."""
        self._raw_v = {}
        self._slot = self.policy.slots(layout)
        self._scratch_k = self._scratch_v = self._scratch_kv = None
        if len(set(self._slot)) < len(self._slot):  # slots are shared: keep the chunk aside
            _, b, h, _, dk = self.k.shape
            dv, p = self.v.shape[-1], len(self._slot)
            if self.kv is not None:
                self._scratch_kv = self.kv.new_empty((p, 2, b, h, n_tokens, dk))
                self._scratch_k, self._scratch_v = self._scratch_kv[:, 0], self._scratch_kv[:, 1]
            else:
                self._scratch_k = self.k.new_empty((p, b, h, n_tokens, dk))
                self._scratch_v = self.v.new_empty((p, b, h, n_tokens, dv))

    # How the chunk's tokens are addressed in a buffer with a token dim: a view at Python-int
    # positions here; a compiled decoder's cache (StaticKVCache) indexes them with a tensor.

    def _chunk(self, buf: torch.Tensor, dim: int) -> torch.Tensor:
        return buf.narrow(dim, self.offset, self._end - self.offset)

    def _write_chunk(self, buf: torch.Tensor, dim: int, x: torch.Tensor) -> None:
        self._chunk(buf, dim).copy_(x)

    def _up_to_chunk_end(self, buf: torch.Tensor, dim: int) -> torch.Tensor:
        return buf.narrow(dim, 0, self._end)

    def next_position(self) -> int:
        """The sequence position of the next token written."""
        return self.length

    def commit(self) -> None:
        self.length = self._end
        self._raw_v = {}  # raw values and the scratch live only for their own forward pass
        self._scratch_k = self._scratch_v = self._scratch_kv = None

    def reset(self) -> None:
        self.length = self.offset = self._end = 0

    def _positions(self, positions: tuple[int, ...]) -> torch.Tensor:
        idx = self._index.get(positions)
        if idx is None:
            idx = torch.tensor(positions, dtype=torch.long, device=self.k.device)
            self._index[positions] = idx
        return idx

    def chunk_sources(self, positions: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's K and V at depth positions, each (len, B, Hkv, T, D): one gather when
        K and V share a buffer."""
        if self._scratch_k is None:
            idx = self._positions(tuple(self._slot[j] for j in positions))
            if self.kv is not None:
                both = self._chunk(self.kv, 4)[idx]
                return both[:, 0], both[:, 1]
            return self._chunk(self.k, 3)[idx], self._chunk(self.v, 3)[idx]
        idx = self._positions(positions)
        if self._scratch_kv is not None:
            both = self._scratch_kv[idx]
            return both[:, 0], both[:, 1]
        return self._scratch_k[idx], self._scratch_v[idx]

    def depth_sources(self, p: int, sources: tuple[int, ...], k: torch.Tensor, v: torch.Tensor,
                      raw: bool, rows: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """rows: k and v hold only these rows of the batch (see RowView)."""
        # Write this position's raw entries first, so one gather reads sources and self together
        # (the put that follows then passes key_stored). Decoding one token is bound by per-op
        # overhead, hence the fewest ops here.
        self.put(p, k, v, rows=rows)
        k_stack, v_stack = self.chunk_sources(sources + (p,))  # (S + 1, B, Hkv, T, D)
        if rows is not None:
            k_stack, v_stack = k_stack.index_select(1, rows), v_stack.index_select(1, rows)
        if raw:
            own = [self._raw_v[j] if rows is None else self._raw_v[j].index_select(0, rows)
                   for j in sources]
            v_stack = torch.stack(own + [v])
        return k_stack, v_stack

    def put(self, p: int, k: torch.Tensor, v: torch.Tensor,
            raw_v: Optional[torch.Tensor] = None, *, key_stored: bool = False,
            rows: Optional[torch.Tensor] = None) -> None:
        """The chunk's entries at p; rows: k, v and raw_v hold only these rows of the batch."""
        s = self._slot[p]
        if rows is not None:
            self._put_rows(p, s, rows, None if key_stored else k, v, raw_v)
            return
        if not key_stored:
            self._write_chunk(self.k[s], 2, k)
            if self._scratch_k is not None:
                self._scratch_k[p] = k
        self._write_chunk(self.v[s], 2, v)
        if self._scratch_v is not None:
            self._scratch_v[p] = v
        if raw_v is not None:
            self._raw_v[p] = raw_v

    def _put_rows(self, p: int, s: int, rows: torch.Tensor, k: Optional[torch.Tensor],
                  v: torch.Tensor, raw_v: Optional[torch.Tensor]) -> None:
        if k is not None:
            self._chunk(self.k[s], 2).index_copy_(0, rows, k)
            if self._scratch_k is not None:
                self._scratch_k[p].index_copy_(0, rows, k)
        self._chunk(self.v[s], 2).index_copy_(0, rows, v)
        if self._scratch_v is not None:
            self._scratch_v[p].index_copy_(0, rows, v)
        if raw_v is not None:
            full = self._raw_v.get(p)
            if full is None:
                full = self._raw_v[p] = raw_v.new_zeros((self.batch_size,) + raw_v.shape[1:])
            full.index_copy_(0, rows, raw_v)

    def history(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's (K, mixed V) at p that sequence attention may read."""
        s = self._slot[p]
        return self._up_to_chunk_end(self.k[s], 2), self._up_to_chunk_end(self.v[s], 2)

    def entries(self, p: int):
        """This chunk's (k, mixed v, raw v or None) at position p."""
        if self._scratch_k is not None:
            return self._scratch_k[p], self._scratch_v[p], self._raw_v.get(p)
        s = self._slot[p]
        return self._chunk(self.k[s], 2), self._chunk(self.v[s], 2), self._raw_v.get(p)

    def copy_position(self, src: int, dst: int, rows: Optional[torch.Tensor] = None) -> None:
        """The chunk's entries at src become its entries at dst: for every row, or only for
        `rows` (a 1-D index) when the other rows still compute dst themselves."""
        if rows is not None and not self.drops_rows:
            raise ValueError(f"a {type(self).__name__} keeps every row")
        k, v, raw = self.entries(src)
        if rows is None:
            if self._scratch_k is not None:
                self._scratch_k[dst], self._scratch_v[dst] = k, v
            if self._slot[dst] != self._slot[src]:
                self._write_chunk(self.k[self._slot[dst]], 2, k)
                self._write_chunk(self.v[self._slot[dst]], 2, v)
            if raw is not None:
                self._raw_v[dst] = raw
            return
        if self._scratch_k is not None:
            self._scratch_k[dst].index_copy_(0, rows, k.index_select(0, rows))
            self._scratch_v[dst].index_copy_(0, rows, v.index_select(0, rows))
        if self._slot[dst] != self._slot[src]:
            self._chunk(self.k[self._slot[dst]], 2).index_copy_(0, rows, k.index_select(0, rows))
            self._chunk(self.v[self._slot[dst]], 2).index_copy_(0, rows, v.index_select(0, rows))
        if raw is not None:
            self._raw_v.setdefault(dst, torch.zeros_like(raw)).index_copy_(
                0, rows, raw.index_select(0, rows))

    def rows(self, rows: torch.Tensor) -> "RowView":
        return RowView(self, rows)


class RowView:
    """Rows `rows` (a 1-D index) of a KVCache, for the layers of an iteration that runs only the
    rows still computing: a row whose tokens all exited drops out of the later iterations (its
    entries there are copied from its exit iteration afterwards, see KVCache.copy_position).
    Reads gather the rows; writes go into the cache in place, through its public methods."""

    drops_rows = False  # a view of rows is not narrowed again

    def __init__(self, cache: KVCache, rows: torch.Tensor):
        self.cache, self.index = cache, rows
        self.offset = cache.offset

    def _rows(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return x.index_select(dim, self.index)

    def depth_sources(self, p, sources, k, v, raw):
        return self.cache.depth_sources(p, sources, k, v, raw, rows=self.index)

    def put(self, p, k, v, raw_v=None, *, key_stored=False) -> None:
        self.cache.put(p, k, v, raw_v, key_stored=key_stored, rows=self.index)

    def copy_position(self, src, dst, rows=None) -> None:
        self.cache.copy_position(src, dst, self.index if rows is None else self.index[rows])

    def history(self, p):
        k, v = self.cache.history(p)
        return self._rows(k), self._rows(v)

    def entries(self, p):
        k, v, raw = self.cache.entries(p)
        return self._rows(k), self._rows(v), None if raw is None else self._rows(raw)
