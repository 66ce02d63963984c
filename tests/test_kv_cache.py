"""The depth-indexed KV cache: size, prefill + decode equivalence, generation, capacity errors."""

from __future__ import annotations

import pytest
import torch

from looped import KVCache
from looped.model.depth import DepthLayout
from looped.errors import ShapeError

from conftest import (HEADS, LOOPED_MODEL, VARIANTS, decode_logits, make_model, max_diff,
                      rand_ids)

DECODE_CASES = [pytest.param("vanilla", heads, "mixed", id=f"vanilla-{heads}")
                for heads in HEADS]
DECODE_CASES += [
    pytest.param(variant, heads, mix, id=f"{variant}-{heads}-{mix}")
    for variant in ("none", "dense", "strided", "strided_w1")
    for heads in HEADS
    for mix in ("mixed", "raw")
]


@pytest.mark.parametrize("variant", ["dense", "strided_w1"])
@pytest.mark.parametrize("heads", list(HEADS))
def test_cache_size_equals_vanilla(variant, heads):
    vanilla = make_model(seed=0, enabled=False, **HEADS[heads])
    da = make_model(seed=0, **VARIANTS[variant], **HEADS[heads])
    c_v, c_d = vanilla.new_cache(3, 20), da.new_cache(3, 20)
    assert c_d.nbytes == c_v.nbytes
    # K and V for 4 positions x batch 3 x Hkv x 20 tokens x head_dim 8, fp32
    n_kv = HEADS[heads]["n_kv_heads"]
    assert c_d.nbytes == 2 * 4 * 3 * n_kv * 20 * 8 * 4
    assert c_d.k.shape == c_v.k.shape == c_d.v.shape == (4, 3, n_kv, 20, 8)


def test_cache_size_equals_vanilla_looped():
    vanilla = make_model(seed=0, loop=3, enabled=False, **LOOPED_MODEL)
    da = make_model(seed=0, loop=3, policy="dense", **LOOPED_MODEL)
    expected = 2 * 8 * 2 * 2 * 16 * 8 * 4  # K and V, 8 positions, batch 2, Hkv 2, 16 x 8 fp32
    assert da.new_cache(2, 16).nbytes == vanilla.new_cache(2, 16).nbytes == expected
    # a cache for more loops holds more depth positions: 1 + 2 * 5 + 1
    assert da.new_cache(2, 16, loops=5).k.shape[0] == 12


def _bytes_held(cache) -> int:
    """Bytes of the distinct storages behind the floating-point tensors reachable from the
    cache's attributes (directly or in a dict); views of one buffer count once."""
    storages = {}
    for value in vars(cache).values():
        items = value.values() if isinstance(value, dict) else [value]
        for t in items:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("mix", ["mixed", "raw"])
def test_cache_holds_nothing_but_k_and_v_between_calls(mix):
    """The cache is exactly a vanilla KV cache: after a forward pass returns, it keeps no
    other activations (mix=raw needs the chunk's raw values only while the chunk runs)."""
    model = make_model(seed=0, policy="dense", mix=mix)
    ids = rand_ids(2, 10, seed=0)
    cache = model.new_cache(2, 10)
    before = cache.nbytes
    with torch.no_grad():
        model(ids[:, :8], cache=cache)  # prefill
        held_after_prefill = _bytes_held(cache)
        model(ids[:, 8:9], cache=cache)  # one decode step
    assert cache.nbytes == before
    assert held_after_prefill == before
    assert _bytes_held(cache) == before


@pytest.mark.parametrize("variant,heads,mix", DECODE_CASES)
def test_prefill_then_decode_matches_full_forward(variant, heads, mix):
    model = make_model(seed=21, mix=mix, **VARIANTS[variant], **HEADS[heads])
    ids = rand_ids(2, 12, seed=21)
    with torch.no_grad():
        full = model(ids).logits
        cached = decode_logits(model, ids, chunks=(5,), cache_len=16)
    assert cached.shape == full.shape
    assert max_diff(cached, full) <= 1e-5


@pytest.mark.parametrize("variant,mix", [("dense", "mixed"), ("dense", "raw"),
                                         ("strided_w1", "mixed"), ("vanilla", "mixed")])
def test_multi_chunk_prefill_matches_full_forward(variant, mix):
    model = make_model(seed=22, mix=mix, **VARIANTS[variant])
    ids = rand_ids(2, 14, seed=22)
    with torch.no_grad():
        full = model(ids).logits
        cached = decode_logits(model, ids, chunks=(3, 6))  # two chunks, then 5 single tokens
    assert max_diff(cached, full) <= 1e-5


def test_decode_from_first_token():
    """No prefill at all: every token goes through the cache alone."""
    model = make_model(seed=23, policy="dense")
    ids = rand_ids(2, 8, seed=23)
    with torch.no_grad():
        assert max_diff(decode_logits(model, ids, chunks=()), model(ids).logits) <= 1e-5


@pytest.mark.parametrize("policy", ["same_layer", "dense"])
@pytest.mark.parametrize("mix", ["mixed", "raw"])
@pytest.mark.parametrize("injection,init_state", [("add", "zeros"), ("none", "embed"),
                                                  ("concat", "embed")])
def test_looped_prefill_then_decode_matches_full_forward(policy, mix, injection, init_state):
    model = make_model(seed=24, loop=3, policy=policy, mix=mix, injection=injection,
                       init_state=init_state, **LOOPED_MODEL)
    ids = rand_ids(2, 11, seed=24)
    with torch.no_grad():
        full = model(ids).logits
        cached = decode_logits(model, ids, chunks=(4,))
        multi = decode_logits(model, ids, chunks=(2, 5))
    assert max_diff(cached, full) <= 1e-5
    assert max_diff(multi, full) <= 1e-5


def test_looped_decode_with_more_loops_than_trained():
    model = make_model(seed=25, loop=3, policy="same_layer", **LOOPED_MODEL)
    ids = rand_ids(2, 9, seed=25)
    with torch.no_grad():
        full = model(ids, loops=5).logits
        cached = decode_logits(model, ids, chunks=(4,), loops=5)
        assert max_diff(full, model(ids).logits) > 1e-4  # the loop count matters at all
    assert max_diff(cached, full) <= 1e-5


def test_decode_depends_on_cached_prefix():
    """Guard: the cache is really read. The last token's logits change with the prefix."""
    model = make_model(seed=26, policy="dense")
    a, b = rand_ids(1, 8, seed=26), rand_ids(1, 8, seed=27)
    b[:, -1] = a[:, -1]
    with torch.no_grad():
        la = decode_logits(model, a, chunks=(7,))[:, -1]
        lb = decode_logits(model, b, chunks=(7,))[:, -1]
    assert max_diff(la, lb) > 1e-4


# ---------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("kw", [
    dict(enabled=False),
    dict(policy="dense", mix="raw"),
    dict(policy="strided", stride=2, window=1),
    dict(loop=3, policy="same_layer", **LOOPED_MODEL),
], ids=["vanilla", "dense-raw", "strided_w1", "looped-same_layer"])
def test_greedy_generate_same_with_and_without_cache(kw):
    model = make_model(seed=31, **kw)
    prompt = rand_ids(2, 5, seed=31)
    with_cache = model.generate(prompt, 8, temperature=0, use_cache=True)
    without = model.generate(prompt, 8, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 13)
    assert torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)
    # greedy really follows the full forward's argmax
    with torch.no_grad():
        logits = model(with_cache[:, :-1]).logits
    assert torch.equal(logits[:, 4:].argmax(-1), with_cache[:, 5:])


def test_sampled_generate_is_reproducible_with_a_generator():
    model = make_model(seed=32, policy="dense")
    prompt = rand_ids(2, 4, seed=32)
    out = [model.generate(prompt, 6, temperature=1.0, top_k=5, use_cache=c,
                          generator=torch.Generator().manual_seed(5)) for c in (True, False)]
    assert torch.equal(out[0], out[1])


# ---------------------------------------------------------------------------------------------
# Capacity and shape errors


def test_decode_past_cache_capacity_raises():
    model = make_model(seed=33, policy="dense")
    ids = rand_ids(1, 7, seed=33)
    cache = model.new_cache(1, 6)
    with torch.no_grad():
        model(ids[:, :6], cache=cache)
        with pytest.raises(ShapeError, match="6"):
            model(ids[:, 6:7], cache=cache)
    assert cache.length == 6  # the failed call did not advance the cache


def test_prefill_longer_than_cache_raises():
    model = make_model(seed=33)
    cache = model.new_cache(1, 4)
    with pytest.raises(ShapeError):
        model(rand_ids(1, 5, seed=33), cache=cache)
    assert cache.length == 0


def test_cache_batch_mismatch_raises():
    model = make_model(seed=34)
    cache = model.new_cache(2, 8)
    with pytest.raises(ShapeError, match="batch"):
        model(rand_ids(3, 4, seed=34), cache=cache)


def test_cache_with_too_few_loops_raises():
    model = make_model(seed=35, loop=3, **LOOPED_MODEL)
    cache = model.new_cache(1, 8, loops=2)
    with pytest.raises(ShapeError, match="loops"):
        model(rand_ids(1, 4, seed=35), cache=cache, loops=3)


def test_cache_reset_allows_reuse():
    model = make_model(seed=36, policy="dense")
    ids = rand_ids(1, 6, seed=36)
    cache = model.new_cache(1, 6)
    with torch.no_grad():
        first = model(ids, cache=cache).logits
        cache.reset()
        assert cache.length == 0
        again = model(ids, cache=cache).logits
    assert torch.equal(first, again)


def test_kvcache_direct_capacity_check():
    two = DepthLayout(2, 0, 1, 0)
    cache = KVCache(2, batch_size=1, n_kv_heads=1, max_len=3, head_dim=4)
    cache.begin(3, two, 1)
    cache.commit()
    with pytest.raises(ShapeError):
        cache.begin(1, two, 1)
    with pytest.raises(ShapeError):  # more depth positions than it holds
        KVCache(2, 1, 1, 8, 4).begin(1, DepthLayout(3, 0, 1, 0), 1)


# ---------------------------------------------------------------------------------------------
# Learned absolute positions (on in the main job): decode steps must add the right position


@pytest.mark.parametrize("kw", [
    dict(policy="dense"),
    dict(loop=3, policy="same_layer", injection="none", init_state="embed", **LOOPED_MODEL),
], ids=["plain-dense", "looped-same_layer"])
def test_decode_and_generate_with_learned_positions(kw):
    model = make_model(seed=41, pos_embedding="true", **kw)
    ids = rand_ids(2, 11, seed=41)
    with torch.no_grad():
        full = model(ids).logits
        pos = model.pos_embed.weight.clone()
        model.pos_embed.weight.zero_()
        no_pos = model(ids).logits
        model.pos_embed.weight.copy_(pos)
    assert max_diff(full, no_pos) > 1e-3  # the positions matter to the outputs
    assert max_diff(decode_logits(model, ids, chunks=(4,)), full) <= 1e-5
    assert max_diff(decode_logits(model, ids, chunks=(2, 5)), full) <= 1e-5
    prompt = ids[:, :5]
    with_cache = model.generate(prompt, 6, temperature=0, use_cache=True)
    assert torch.equal(with_cache, model.generate(prompt, 6, temperature=0, use_cache=False))
    with torch.no_grad():
        logits = model(with_cache[:, :-1]).logits
    assert torch.equal(logits[:, 4:].argmax(-1), with_cache[:, 5:])


def test_every_store_speaks_the_depth_store_protocol():
    """ActivationStore, KVCache, its RowView and the compiled decoder's StaticKVCache all
    implement looped.model.cache.DepthStore (the methods an attention layer calls)."""
    from looped.model.cache import ActivationStore, DepthStore, KVCache
    from looped.model.compiled_decode import StaticKVCache

    cache = KVCache(2, 3, 1, 8, 4)
    stores = [ActivationStore(), cache, cache.rows(torch.tensor([0, 2])),
              StaticKVCache(2, 3, 1, 8, 4)]
    assert all(isinstance(s, DepthStore) for s in stores)


def test_put_after_depth_sources_keeps_the_key_it_stored():
    """The handshake: depth_sources writes position p's key and value; the put that follows
    with key_stored=True writes the mixed value only, and without it the key too."""
    from looped.model.cache import KVCache
    from looped.model.depth import DepthLayout

    g = torch.Generator().manual_seed(7)
    cache = KVCache(DepthLayout(0, 2, 1, 0), 2, 1, 5, 4)
    cache.begin(3, DepthLayout(0, 2, 1, 0), 2)
    k0, v0, k1, v1, mixed, other = (torch.randn(2, 1, 3, 4, generator=g) for _ in range(6))
    cache.put(0, k0, v0)
    cache.depth_sources(1, (0,), k1, v1, raw=False)
    cache.put(1, other, mixed, key_stored=True)  # a different tensor: not written
    k, v, _ = cache.entries(1)
    assert torch.equal(k, k1) and torch.equal(v, mixed)
    cache.put(1, other, mixed)
    assert torch.equal(cache.entries(1)[0], other)
