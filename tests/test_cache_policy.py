"""Cache policies (infer kv=per_iteration|last): each policy's cached decode equals a naive
reference of that policy written from its description (conftest.naive_cached), and the cache's
bytes scale as documented."""

from __future__ import annotations

import pytest
import torch

from looped.errors import ConfigError, ShapeError
from looped.model.cache_policy import CACHE_POLICIES, CachePolicy, cache_policy
from looped.model.depth import DepthLayout

from conftest import (LOOPED_MODEL, RefExit, decode_run, make_model, max_diff, naive_cached,
                      rand_ids)

pytestmark = pytest.mark.usefixtures("single_thread")

POLICIES = ["per_iteration", "last"]
MODELS = {  # looped models of 1 prelude + 2 core + 1 coda layers at R=3, random O(1) weights
    "same_layer": dict(policy="same_layer"),
    "dense-raw": dict(policy="dense", mix="raw", injection="none", init_state="embed"),
    "vanilla": dict(enabled=False),
    "unrolled": dict(policy="same_layer", share_weights="false"),
}


def looped(name: str, seed: int, loop: int = 3):
    return make_model(seed=seed, loop=loop, **MODELS[name], **LOOPED_MODEL)


@pytest.mark.parametrize("kv", POLICIES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("chunks", [(4,), (), (2, 3)], ids=["prefill4", "decode", "2+3"])
def test_cached_decode_matches_naive_reference_of_its_policy(kv, name, chunks):
    model = looped(name, seed=80)
    ids = rand_ids(2, 9, seed=80)
    with torch.no_grad():
        logits, iters, cache = decode_run(model, ids, chunks, kv=kv)
    ref, ref_iters = naive_cached(model, ids, chunks, kv=kv)
    assert max_diff(logits, ref) <= 1e-5
    assert torch.equal(iters, ref_iters)
    assert cache.policy.name == kv


@pytest.mark.parametrize("name", ["same_layer", "vanilla"])
def test_last_is_an_approximation_after_the_prefill(name):
    """The two references really differ (so the test above tells the policies apart), and a
    single prefill under `last` is still the exact full forward."""
    model = looped(name, seed=81)
    ids = rand_ids(2, 9, seed=81)
    exact, _ = naive_cached(model, ids, (4,), kv="per_iteration")
    approx, _ = naive_cached(model, ids, (4,), kv="last")
    assert max_diff(exact[:, :4], approx[:, :4]) <= 1e-12
    assert max_diff(exact[:, 4:], approx[:, 4:]) > 1e-3
    with torch.no_grad():
        full = model(ids).logits
        prefill = model(ids, cache=model.new_cache(2, 9, kv="last")).logits
    assert max_diff(full, prefill) <= 1e-5


@pytest.mark.parametrize("name,threshold", [("entropy", None), ("max_loops", 2)])
def test_last_under_exit_matches_reference(name, threshold):
    """Exited tokens' frozen entries are what later tokens read from the single slot."""
    from looped.model.exit import EXIT_CRITERIA, MaxLoopsExit

    model = make_model(seed=82, loop=4, policy="same_layer", **LOOPED_MODEL)
    ids = rand_ids(2, 9, seed=82)
    if name == "entropy":  # the median entropy after the first iteration splits the tokens
        with torch.no_grad():
            s = model(ids, return_states=True).states[0]
            lp = torch.log_softmax(model.head(s), -1)
        threshold = float((-(lp.exp() * lp).sum(-1)).median())
        crit = EXIT_CRITERIA["entropy"](threshold=threshold)
    else:
        crit = MaxLoopsExit(after=threshold)
    with torch.no_grad():
        logits, iters, _ = decode_run(model, ids, (3,), exit=crit, kv="last")
    ref, ref_iters = naive_cached(model, ids, (3,), kv="last", exit=RefExit(name, threshold))
    assert torch.equal(iters, ref_iters)
    assert (iters < 4).any()
    assert max_diff(logits, ref) <= 1e-5


def per_layer_bytes(model, batch: int, max_len: int) -> int:
    c = model.cfg
    return 2 * batch * c.n_kv_heads * max_len * c.head_dim * 4  # K and V, fp32


@pytest.mark.parametrize("loops", [1, 4, 8, 16, 32])
def test_cache_bytes_scale_as_documented(loops):
    """per_iteration: (prelude + core x R + coda) layers' worth; last: (prelude + core + coda),
    whatever R. At R = 1 both equal a plain decoder's cache of the same depth."""
    model = make_model(seed=83, loop=2, policy="same_layer", max_seq_len=64, **LOOPED_MODEL)
    unit = per_layer_bytes(model, 3, 64)
    per_it = model.new_cache(3, 64, loops=loops, kv="per_iteration")
    last = model.new_cache(3, 64, loops=loops, kv="last")
    assert per_it.nbytes == (1 + 2 * loops + 1) * unit
    assert last.nbytes == (1 + 2 + 1) * unit
    if loops == 1:
        plain = make_model(seed=83, n_layers=4, max_seq_len=64)
        assert per_it.nbytes == last.nbytes == plain.new_cache(3, 64).nbytes
    # the one per-token figure (benchmarks and studies read it) is what the cache keeps
    assert model.cache_bytes_per_token(loops, "per_iteration") * 3 * 64 == per_it.nbytes
    assert model.cache_bytes_per_token(loops, "last") * 3 * 64 == last.nbytes


def test_last_cache_serves_any_loop_count():
    """One `last` cache serves forwards at different R (its slots are per layer); a
    per_iteration cache is bound to its R, with a one-line error."""
    model = looped("same_layer", seed=84)
    ids = rand_ids(1, 6, seed=84)
    cache = model.new_cache(1, 6, loops=3, kv="last")
    with torch.no_grad():
        model(ids[:, :3], loops=2, cache=cache)
        model(ids[:, 3:4], loops=8, cache=cache)
        model(ids[:, 4:], loops=3, cache=cache)
    assert cache.length == 6
    with pytest.raises(ShapeError, match="per_iteration cache made for 3 loop"):
        model(ids[:, :1], loops=4, cache=model.new_cache(1, 6, loops=3))


def test_generate_with_last_policy_is_greedy_continuation_of_its_reference():
    model = looped("same_layer", seed=85)
    prompt = rand_ids(2, 4, seed=85)
    with torch.no_grad():
        tokens = model.generate(prompt, 5, temperature=0, kv="last")
    # feeding the generated tokens back through the reference reproduces each argmax
    ref, _ = naive_cached(model, tokens[:, :-1], (4,), kv="last")
    assert torch.equal(ref[:, 3:].argmax(-1), tokens[:, 4:])


def test_unknown_policy_is_one_line():
    model = looped("same_layer", seed=86)
    with pytest.raises(ConfigError, match="unknown cache policy 'lastest'; choose one of: "
                                          "per_iteration, last"):
        model.new_cache(1, 4, kv="lastest")


def test_a_third_policy_is_one_small_class():
    """A policy that keeps the first iteration apart and shares one slot among the rest."""

    @CACHE_POLICIES.register("first_and_last")
    class FirstAndLast(CachePolicy):
        name = "first_and_last"

        def slots(self, layout: DepthLayout) -> list[int]:
            pre, core = layout.n_prelude, layout.n_core
            out = list(range(pre))
            for r in range(layout.loops):
                out.extend(pre + (core if r else 0) + i for i in range(core))
            return out + [pre + 2 * core + i for i in range(layout.n_coda)]

    try:
        model = looped("same_layer", seed=87)
        ids = rand_ids(2, 7, seed=87)
        cache = model.new_cache(2, 7, loops=3, kv="first_and_last")
        assert cache.n_slots == 1 + 2 * 2 + 1
        with torch.no_grad():
            logits, _, _ = decode_run(model, ids, (3,), kv="first_and_last")
        # at R = 2 it keeps every iteration apart: the exact cache
        with torch.no_grad():
            two, _, _ = decode_run(model, ids, (3,), loops=2, kv="first_and_last")
            exact, _, _ = decode_run(model, ids, (3,), loops=2)
        assert max_diff(two, exact) <= 1e-6
        assert torch.isfinite(logits).all()
        assert cache_policy("first_and_last").n_slots(DepthLayout(1, 2, 5, 1)) == 6
    finally:
        del CACHE_POLICIES["first_and_last"]
        CACHE_POLICIES.configs.pop("first_and_last", None)
