"""Looped (recurrent-depth) models: one loop is the plain decoder, tied equals unrolled with
copied weights, the same_layer Depth-Attention policy against the float64 reference, cached
decoding at fixed R, extrapolation to more loops, and truncated backprop (grad_loops).

The reference (`naive_looped` in conftest) reuses only the model's parameters and recomputes
everything token by token in float64; its source lists come from `policy_sources`, written from
the policy descriptions, never from looped.model.depth.
"""

from __future__ import annotations

import pytest
import torch

from looped import build_model
from looped.errors import ShapeError

from conftest import (FIXED_LOOPS, LOOPED_MODEL, decode_logits, decode_run, make_model, max_diff,
                      model_sources, naive_looped, policy_sources, rand_ids, tiny_cfg, to_float64,
                      tol_for, unrolled_copy)

pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------
# 1. One loop of a looped model is the plain single-pass decoder


@pytest.mark.parametrize("da", [dict(policy="same_layer"), dict(policy="dense"),
                                dict(enabled=False)], ids=["same_layer", "dense", "vanilla"])
@pytest.mark.parametrize("injection,init_state", [("add", "zeros"), ("none", "embed")])
def test_one_loop_equals_plain_decoder(da, injection, init_state):
    kw = dict(n_layers=3, injection=injection, init_state=init_state, **da)
    looped_m = make_model(seed=40, loop=4, **kw)
    plain = build_model(tiny_cfg(loop=1, **kw)).eval()
    assert list(plain.state_dict()) == list(looped_m.state_dict())
    plain.load_state_dict(looped_m.state_dict())
    ids = rand_ids(2, 9, seed=40)
    with torch.no_grad():
        one = looped_m(ids, loops=1)
        ref_plain = plain(ids)
        four = looped_m(ids)
    assert one.layout.n_positions == ref_plain.layout.n_positions == 3
    assert torch.equal(one.iterations, torch.ones(2, 9, dtype=torch.long))
    assert torch.equal(one.logits, ref_plain.logits)  # the very same operations
    # the independent reference: one pass of three layers, no loop at all
    policy = "none" if not da.get("enabled", True) else da["policy"]
    ref = naive_looped(plain, ids, sources=policy_sources(policy, 0, 3, 1, 0))
    assert max_diff(one.logits, ref["logits"]) <= 1e-5
    # guard: the loop count matters for this model, so the comparison above could fail
    assert max_diff(four.logits, one.logits) > 1e-3


# ---------------------------------------------------------------------------------------------
# 2. Tied weights == unrolled copies holding the same weights


UNROLL_CASES = [pytest.param(inj, init, pol, dtype, id=f"{inj}-{pol}-{str(dtype)[6:]}")
                for inj, init, dtype in (("concat", "zeros", torch.float64),
                                         ("concat", "embed", torch.float64),
                                         ("add", "zeros", torch.float32))
                for pol in ("same_layer", "dense")]


@pytest.mark.parametrize("injection,init_state,policy,dtype", UNROLL_CASES)
def test_tied_equals_unrolled_with_copied_weights(injection, init_state, policy, dtype):
    kw = dict(loop=3, policy=policy, injection=injection, init_state=init_state, **LOOPED_MODEL)
    tied = make_model(seed=41, **kw)
    unrolled = unrolled_copy(tied, **kw)
    assert any(k.startswith("core.2.1.") for k in unrolled.state_dict())
    assert not any(k.startswith("core.2.") for k in tied.state_dict())
    if dtype == torch.float64:
        tied, unrolled = to_float64(tied), to_float64(unrolled)
    ids = rand_ids(2, 8, seed=41)
    with torch.no_grad():
        a, b = tied(ids), unrolled(ids)
        assert max_diff(a.logits, b.logits) <= (1e-5 if dtype == torch.float32 else 1e-12)
        # the unrolled model decodes through its cache like the tied one
        assert max_diff(decode_logits(unrolled, ids, chunks=(3,)), a.logits) <= tol_for(dtype)
        # guard: the copies are really used, iteration by iteration
        unrolled.core[1][0].mlp.up.weight.mul_(1.5)
        assert max_diff(unrolled(ids).logits, a.logits) > 1e-3


@pytest.mark.parametrize("injection,dtype", [("add", torch.float32),
                                             ("concat", torch.float64)])
def test_unrolled_with_distinct_copies_matches_reference(injection, dtype):
    kw = dict(loop=3, policy="same_layer", injection=injection, share_weights="false",
              extra=FIXED_LOOPS, **LOOPED_MODEL)
    model = make_model(seed=42, **kw)
    if dtype == torch.float64:
        model = to_float64(model)
    c = model.core
    assert max_diff(c[0][0].attn.q_proj.weight, c[2][0].attn.q_proj.weight) > 0.1
    ids = rand_ids(2, 7, seed=42)
    with torch.no_grad():
        out = model(ids)
    ref = naive_looped(model, ids, sources=model_sources(model))
    assert max_diff(out.logits, ref["logits"]) <= tol_for(dtype)


# ---------------------------------------------------------------------------------------------
# 3 (fixed R). Prefill + token-by-token decode == the full forward


@pytest.mark.parametrize("kw,dtype", [
    (dict(loop=4, policy="same_layer", injection="add", init_state="zeros"), torch.float32),
    (dict(loop=4, policy="dense", mix="raw", injection="add", init_state="embed"),
     torch.float32),
    (dict(loop=3, policy="same_layer", injection="add", init_state="zeros",
          share_weights="false", extra=FIXED_LOOPS), torch.float32),
    (dict(loop=4, policy="same_layer", injection="concat", init_state="zeros"), torch.float64),
], ids=["same_layer-add", "dense-raw-add", "unrolled", "same_layer-concat-f64"])
@pytest.mark.parametrize("batch,chunks", [(2, (4,)), (1, (2, 3))])
def test_looped_cached_decode_matches_full_forward(kw, dtype, batch, chunks):
    model = make_model(seed=43, **kw, **LOOPED_MODEL)
    if dtype == torch.float64:
        model = to_float64(model)
    ids = rand_ids(batch, 10, seed=43)
    with torch.no_grad():
        full = model(ids)
        logits, iters, cache = decode_run(model, ids, chunks)
    assert cache.k.shape[0] == 1 + 2 * kw["loop"] + 1
    assert torch.equal(full.iterations, torch.full((batch, 10), kw["loop"]))
    assert torch.equal(iters, full.iterations)
    assert max_diff(logits, full.logits) <= tol_for(dtype)


# ---------------------------------------------------------------------------------------------
# 9. same_layer Depth-Attention in a looped model against the naive reference

# loop=3, 1 prelude, 2 core layers, 1 coda: position -> sources (its own position not included)
SAME_LAYER_TABLE = [(), (0,), (0,), (0, 1), (0, 2), (0, 1, 3), (0, 2, 4), (0, 5, 6)]


def test_policy_sources_helper_matches_the_written_table():
    assert policy_sources("same_layer", 1, 2, 3, 1) == SAME_LAYER_TABLE
    # two coda layers: the second also reads the first
    assert policy_sources("same_layer", 1, 2, 2, 2)[-2:] == [(0, 3, 4), (0, 3, 4, 5)]


@pytest.mark.parametrize("injection,init_state,mix,pos,dtype", [
    ("add", "zeros", "mixed", "false", torch.float32),
    ("add", "zeros", "mixed", "true", torch.float32),
    ("none", "embed", "raw", "false", torch.float32),
    ("add", "embed", "raw", "true", torch.float32),
    ("concat", "embed", "mixed", "false", torch.float64),
    ("concat", "zeros", "raw", "true", torch.float64),
])
def test_same_layer_looped_matches_reference(injection, init_state, mix, pos, dtype):
    model = make_model(seed=44, loop=3, policy="same_layer", mix=mix, injection=injection,
                       init_state=init_state, pos_embedding=pos, **LOOPED_MODEL)
    assert (model.pos_embed is not None) == (pos == "true")
    if dtype == torch.float64:
        model = to_float64(model)
    ids = rand_ids(2, 7, seed=44)
    with torch.no_grad():
        out = model(ids, return_depth_weights=True, return_states=True)
    ref = naive_looped(model, ids, sources=SAME_LAYER_TABLE)
    tol = tol_for(dtype)
    assert max_diff(out.logits, ref["logits"]) <= tol
    assert len(out.states) == 3
    for s, rs in zip(out.states, ref["states"]):
        assert max_diff(s, rs) <= tol * 10  # states are O(10), logits O(1)
    assert sorted(out.depth_weights) == list(range(8))
    for p, (alpha, own) in ref["alphas"].items():
        dw = out.depth_weights[p]
        assert tuple(dw.sources) == SAME_LAYER_TABLE[p] + (p,) == own
        assert dw.weights.shape == alpha.shape
        assert max_diff(dw.weights, alpha) <= tol
    # guard: the later core positions really mix (not one-hot on themselves)
    assert out.depth_weights[5].weights[..., -1].max() < 0.99


@pytest.mark.parametrize("loops", [1, 5])
def test_same_layer_sources_follow_the_loop_count(loops):
    model = make_model(seed=45, loop=3, policy="same_layer", **LOOPED_MODEL)
    with torch.no_grad():
        out = model(rand_ids(1, 3, seed=45), loops=loops, return_depth_weights=True)
    expected = policy_sources("same_layer", 1, 2, loops, 1)
    n = 2 + 2 * loops
    assert out.layout.n_positions == n
    assert [tuple(out.depth_weights[p].sources) for p in range(n)] == \
        [s + (p,) for p, s in enumerate(expected)]


# ---------------------------------------------------------------------------------------------
# 10. Extrapolation: a shared core runs more loops than trained; an unrolled one cannot


@pytest.mark.parametrize("injection,dtype", [("add", torch.float32),
                                             ("concat", torch.float64)])
def test_shared_core_extrapolates_to_more_loops_with_cache(injection, dtype):
    model = make_model(seed=46, loop=2, policy="same_layer", injection=injection,
                       **LOOPED_MODEL)
    if dtype == torch.float64:
        model = to_float64(model)
    ids = rand_ids(2, 8, seed=46)
    with torch.no_grad():
        six = model(ids, loops=6)
        two = model(ids)
        logits, iters, cache = decode_run(model, ids, (3,), loops=6)
    assert six.layout.n_positions == 1 + 2 * 6 + 1 == cache.n_slots
    assert torch.equal(six.iterations, torch.full((2, 8), 6))
    assert torch.equal(iters, six.iterations)
    assert max_diff(logits, six.logits) <= tol_for(dtype)
    ref = naive_looped(model, ids, loops=6, sources=policy_sources("same_layer", 1, 2, 6, 1))
    assert max_diff(six.logits, ref["logits"]) <= tol_for(dtype)
    assert max_diff(six.logits, two.logits) > 1e-3
    # a cache made for the configured loop count holds too few depth positions
    with pytest.raises(ShapeError, match="loops"):
        model(ids, loops=6, cache=model.new_cache(2, 8))


def test_unrolled_model_refuses_other_loop_counts():
    model = make_model(seed=47, loop=3, share_weights="false", extra=FIXED_LOOPS,
                       **LOOPED_MODEL)
    ids = rand_ids(1, 4, seed=47)
    with torch.no_grad():
        assert model(ids, loops=3).logits.shape == (1, 4, 50)
        for loops in (1, 2, 4, 6):
            with pytest.raises(ShapeError, match="unrolled"):
                model(ids, loops=loops)
    with pytest.raises(ShapeError):
        model.new_cache(1, 4, loops=4)
    with pytest.raises(ShapeError):
        model.generate(ids, 2, temperature=0, loops=2)


# ---------------------------------------------------------------------------------------------
# 7. Truncated backprop: grad_loops=k


GRAD_KW = [dict(policy="same_layer", injection="add", init_state="zeros"),
           dict(policy="dense", injection="concat", init_state="embed")]


def _loss_and_grads(model, ids, weights, **fwd):
    out = model(ids, return_states=True, **fwd)
    loss = (out.logits * weights).sum()
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    names = [n for n, _ in model.named_parameters()]
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("kw", GRAD_KW, ids=["same_layer-add", "dense-concat"])
def test_grad_loops_detaches_the_first_iterations(kw):
    model = make_model(seed=48, loop=4, **kw, **LOOPED_MODEL).train()
    ids = rand_ids(2, 6, seed=48)
    weights = torch.randn(2, 6, 50, generator=torch.Generator().manual_seed(48))
    out, _ = _loss_and_grads(model, ids, weights, grad_loops=1)
    assert len(out.states) == 4
    for r, s in enumerate(out.states):
        if r < 3:
            assert not s.requires_grad and s.grad_fn is None, r
        else:
            assert s.requires_grad and s.grad_fn is not None, r
    out2, _ = _loss_and_grads(model, ids, weights, grad_loops=3)
    assert [s.requires_grad for s in out2.states] == [False, True, True, True]
    # grad_loops does not change the forward values
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out.logits)


@pytest.mark.parametrize("kw", GRAD_KW, ids=["same_layer-add", "dense-concat"])
def test_grad_loops_all_equals_full_backprop(kw):
    model = make_model(seed=49, loop=3, **kw, **LOOPED_MODEL).train()
    ids = rand_ids(2, 6, seed=49)
    weights = torch.randn(2, 6, 50, generator=torch.Generator().manual_seed(49))
    _, full = _loss_and_grads(model, ids, weights)
    for k in (3, 7):
        _, trunc = _loss_and_grads(model, ids, weights, grad_loops=k)
        for name, g in full.items():
            assert torch.equal(g, trunc[name]), (k, name)


@pytest.mark.parametrize("kw", GRAD_KW, ids=["same_layer-add", "dense-concat"])
@pytest.mark.parametrize("k", [1, 2])
def test_grad_loops_matches_hand_built_truncation(kw, k):
    """Gradients of grad_loops=k equal those of the reference whose first R - k iterations run
    under torch.no_grad (float64 copy of the model, so the match is tight)."""
    model = to_float64(make_model(seed=50, loop=3, **kw, **LOOPED_MODEL)).train()
    ids = rand_ids(1, 5, seed=50)
    weights = torch.randn(1, 5, 50, generator=torch.Generator().manual_seed(50),
                          dtype=torch.float64)
    _, got = _loss_and_grads(model, ids, weights, grad_loops=k)
    _, full = _loss_and_grads(model, ids, weights)
    ref = naive_looped(model, ids, sources=model_sources(model), no_grad_loops=3 - k, grad=True)
    names = [n for n, _ in model.named_parameters()]
    want = dict(zip(names, torch.autograd.grad((ref["logits"] * weights).sum(),
                                               list(model.parameters()), allow_unused=True)))
    for name in names:
        g, w = got[name], want[name]
        assert (g is None) == (w is None), name
        if g is None:
            continue
        scale = max(w.abs().max().item(), 1e-3)
        assert max_diff(g, w) <= 1e-8 * scale, name
    # guard: truncation changes the core's gradient, and the prelude still gets one
    core = [n for n in names if n.startswith("core.") and n.endswith("q_proj.weight")]
    assert any(max_diff(got[n], full[n]) > 1e-4 for n in core)
    assert got["prelude.0.mlp.up.weight"].abs().max() > 0
