"""Depth-Attention: source policies, depth weights, and an independent naive reference model.

The reference (`naive_forward`) reuses only the model's parameters and recomputes everything
itself in float64 (RMSNorm, per-head QK-norm, rotate-half RoPE, depth mixing per token and KV
head, causal GQA attention per token and query head, SwiGLU, tied head). It never calls
looped.model.depth, and its source lists come from `expected_sources` / hand-written tables.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from looped import ConfigError, build_model
from looped.model import depth as depth_mod
from looped.model.depth import (SOURCE_POLICIES, DepthLayout, register_source_policy,
                                sources_for_layout)

from conftest import (HEADS, LOOPED_MODEL, VARIANTS, make_model, max_diff, naive_looped,
                      rand_ids, randomize_, tiny_cfg)

# ---------------------------------------------------------------------------------------------
# Independent reference


def expected_sources(policy: str, n_positions: int, stride: int = 0, window: int = 0):
    """Earlier positions each depth position reads, written out from the policy definitions."""
    out = []
    for p in range(n_positions):
        if policy == "none":
            src = set()
        elif policy == "dense":
            src = set(range(p))
        elif policy == "strided":
            src = {j for j in range(p) if j % stride == 0} | set(range(max(0, p - window), p))
        else:
            raise AssertionError(policy)
        out.append(tuple(sorted(src)))
    return out


# Looped layout (LOOPED_MODEL, loop=3): p0 prelude; core (l0, l1) at iterations 0, 1, 2 are
# positions (1, 2), (3, 4), (5, 6); p7 coda.
SAME_LAYER_LOOPED = [(), (0,), (0,), (0, 1), (0, 2), (0, 1, 3), (0, 2, 4), (0, 5, 6)]


def _w(module) -> torch.Tensor:
    return module.weight.detach().double()


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    half = d // 2
    inv_freq = theta ** (-(torch.arange(half, dtype=torch.float64) * 2.0 / d))
    ang = pos * inv_freq
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    rotated = torch.cat([-x[half:], x[:half]])
    return x * cos + rotated * sin


def _naive_block(blk, x, p, srcs, mix, store, cfg, alphas):
    b_sz, t_sz, _ = x.shape
    h_n, kv_n, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    grp = h_n // kv_n
    eps = cfg.norm_eps
    a = blk.attn
    h = _rms(x, _w(blk.attn_norm), eps)
    q = _rms((h @ _w(a.q_proj).T).view(b_sz, t_sz, h_n, d), _w(a.q_norm), eps)
    k = _rms((h @ _w(a.k_proj).T).view(b_sz, t_sz, kv_n, d), _w(a.k_norm), eps)
    v = (h @ _w(a.v_proj).T).view(b_sz, t_sz, kv_n, d)

    # Depth-Attention, one token and one KV head at a time (unrotated vectors).
    own = list(srcs) + [p]
    v_mix = torch.empty_like(v)
    alpha = torch.empty(b_sz, t_sz, kv_n, len(own), dtype=torch.float64)
    src_vals = store["v_mix"] if mix == "mixed" else store["v_raw"]
    for bi in range(b_sz):
        for ti in range(t_sz):
            for g in range(kv_n):
                q_bar = q[bi, ti, g * grp:(g + 1) * grp].mean(0)
                keys = [store["k"][j][bi, ti, g] for j in srcs] + [k[bi, ti, g]]
                vals = [src_vals[j][bi, ti, g] for j in srcs] + [v[bi, ti, g]]
                scores = torch.stack([q_bar @ kk for kk in keys]) / math.sqrt(d)
                wts = torch.exp(scores - scores.max())
                wts = wts / wts.sum()
                v_mix[bi, ti, g] = sum(wi * vi for wi, vi in zip(wts, vals))
                alpha[bi, ti, g] = wts
    store["k"][p], store["v_mix"][p], store["v_raw"][p] = k, v_mix, v
    alphas[p] = (alpha, tuple(own))

    # Causal sequence attention with RoPE, one query head and one token at a time.
    theta = cfg.rope_theta
    k_rot = [[[_rope(k[bi, s, g], s, theta) for g in range(kv_n)] for s in range(t_sz)]
             for bi in range(b_sz)]
    out = torch.zeros(b_sz, t_sz, h_n, d, dtype=torch.float64)
    for bi in range(b_sz):
        for hh in range(h_n):
            g = hh // grp
            for ti in range(t_sz):
                qr = _rope(q[bi, ti, hh], ti, theta)
                scores = torch.stack([qr @ k_rot[bi][s][g] for s in range(ti + 1)]) / math.sqrt(d)
                wts = torch.exp(scores - scores.max())
                wts = wts / wts.sum()
                out[bi, ti, hh] = sum(wts[s] * v_mix[bi, s, g] for s in range(ti + 1))
    x = x + out.reshape(b_sz, t_sz, h_n * d) @ _w(a.o_proj).T

    hm = _rms(x, _w(blk.mlp_norm), eps)
    gate, up = hm @ _w(blk.mlp.gate).T, hm @ _w(blk.mlp.up).T
    return x + (gate * torch.sigmoid(gate) * up) @ _w(blk.mlp.down).T


def naive_forward(model, ids, sources, mix, loop=1):
    """float64 logits and {position: (alpha (B, T, Hkv, S+1), sources+own)} of a tied,
    weight-shared model with injection add|none and init_state zeros|embed."""
    cfg = model.cfg
    store = {"k": {}, "v_mix": {}, "v_raw": {}}
    alphas = {}
    emb = _w(model.embed)
    x = emb[ids]
    p = 0
    for blk in model.prelude:
        x = _naive_block(blk, x, p, sources[p], mix, store, cfg, alphas)
        p += 1
    e = x
    state = {"zeros": torch.zeros_like(e), "embed": e}[cfg.init_state]
    for _ in range(loop):
        x = {"add": state + e, "none": state}[cfg.injection]
        for blk in model.core:
            x = _naive_block(blk, x, p, sources[p], mix, store, cfg, alphas)
            p += 1
        state = x
    x = state
    for blk in model.coda:
        x = _naive_block(blk, x, p, sources[p], mix, store, cfg, alphas)
        p += 1
    assert p == len(sources)
    return _rms(x, _w(model.norm), cfg.norm_eps) @ emb.T, alphas


REF_CASES = [
    pytest.param(variant, heads, mix, id=f"{variant}-{heads}-{mix}")
    for variant in ("dense", "strided_w1", "none")
    for heads in ("gqa", "mha")
    for mix in ("mixed", "raw")
]


@pytest.mark.parametrize("variant,heads,mix", REF_CASES)
def test_matches_naive_reference(variant, heads, mix):
    kw = dict(VARIANTS[variant], **HEADS[heads])
    model = make_model(seed=11, mix=mix, **kw)
    ids = rand_ids(2, 9, seed=11)
    srcs = expected_sources(kw["policy"], 4, kw.get("stride", 0), kw.get("window", 0))
    with torch.no_grad():
        out = model(ids, return_depth_weights=True)
    ref_logits, ref_alpha = naive_forward(model, ids, srcs, mix)
    assert max_diff(out.logits, ref_logits) <= 1e-5
    assert sorted(out.depth_weights) == list(range(4))
    for p, (alpha, own) in ref_alpha.items():
        dw = out.depth_weights[p]
        assert tuple(dw.sources) == own
        assert dw.weights.shape == alpha.shape
        assert max_diff(dw.weights, alpha) <= 1e-5


@pytest.mark.parametrize("policy,mix,injection,init_state", [
    ("same_layer", "mixed", "add", "zeros"),
    ("same_layer", "raw", "none", "embed"),
    ("dense", "raw", "add", "zeros"),
    ("dense", "mixed", "none", "embed"),
])
def test_looped_matches_naive_reference(policy, mix, injection, init_state):
    model = make_model(seed=12, loop=3, policy=policy, mix=mix, injection=injection,
                       init_state=init_state, **LOOPED_MODEL)
    ids = rand_ids(2, 7, seed=12)
    srcs = SAME_LAYER_LOOPED if policy == "same_layer" else expected_sources("dense", 8)
    with torch.no_grad():
        out = model(ids, return_depth_weights=True)
    ref_logits, ref_alpha = naive_forward(model, ids, srcs, mix, loop=3)
    assert max_diff(out.logits, ref_logits) <= 1e-5
    for p, (alpha, own) in ref_alpha.items():
        assert tuple(out.depth_weights[p].sources) == own
        assert max_diff(out.depth_weights[p].weights, alpha) <= 1e-5


def test_reference_detects_depth_mixing():
    """Guard on the reference itself: with dense sources it must disagree with no sources."""
    model = make_model(seed=13, policy="dense")
    ids = rand_ids(1, 6, seed=13)
    dense, _ = naive_forward(model, ids, expected_sources("dense", 4), "mixed")
    plain, _ = naive_forward(model, ids, expected_sources("none", 4), "mixed")
    assert max_diff(dense, plain) > 1e-3


# ---------------------------------------------------------------------------------------------
# Vanilla equivalence and parameters


def test_policy_none_is_exactly_vanilla():
    vanilla = make_model(seed=1, enabled=False)
    none = build_model(tiny_cfg(policy="none")).eval()
    none.load_state_dict(vanilla.state_dict())
    ids = rand_ids(2, 12, seed=1)
    with torch.no_grad():
        a, b = vanilla(ids).logits, none(ids).logits
    assert torch.equal(a, b)
    # and both are the vanilla math itself: the float64 reference with no depth sources at all
    # (a reference that shares no code with the model's depth path)
    ref = naive_looped(none, ids, sources=[()] * none.layout().n_positions)
    assert max_diff(b.double(), ref["logits"]) < 1e-5
    assert all(w.shape[-1] == 1 for w, _ in ref["alphas"].values())  # each position: itself only


@pytest.mark.parametrize("variant", ["dense", "strided", "strided_w1"])
def test_depth_attention_changes_outputs(variant):
    vanilla = make_model(seed=2, enabled=False)
    da = build_model(tiny_cfg(**VARIANTS[variant])).eval()
    da.load_state_dict(vanilla.state_dict())
    ids = rand_ids(2, 12, seed=2)
    with torch.no_grad():
        assert max_diff(vanilla(ids).logits, da(ids).logits) > 1e-4


def test_mix_raw_differs_from_mixed():
    # With dense sources, position 2 reads position 1, whose mixed value differs from its raw one.
    mixed = make_model(seed=3, policy="dense", mix="mixed")
    raw = build_model(tiny_cfg(policy="dense", mix="raw")).eval()
    raw.load_state_dict(mixed.state_dict())
    ids = rand_ids(2, 10, seed=3)
    with torch.no_grad():
        assert max_diff(mixed(ids).logits, raw(ids).logits) > 1e-4


@pytest.mark.parametrize("variant", ["dense", "strided_w1"])
@pytest.mark.parametrize("loop,extra", [(1, {}), (3, LOOPED_MODEL)], ids=["plain", "looped"])
def test_parameters_and_state_dict_equal_vanilla(variant, loop, extra):
    vanilla = build_model(tiny_cfg(loop=loop, enabled=False, **extra))
    da = build_model(tiny_cfg(loop=loop, **VARIANTS[variant], **extra))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(da) == count(vanilla)
    sd_v, sd_d = vanilla.state_dict(), da.state_dict()
    assert list(sd_d) == list(sd_v)
    assert {k: tuple(v.shape) for k, v in sd_d.items()} == \
        {k: tuple(v.shape) for k, v in sd_v.items()}


# ---------------------------------------------------------------------------------------------
# Depth weights


@pytest.mark.parametrize("variant", ["dense", "strided", "strided_w1", "none"])
@pytest.mark.parametrize("heads", ["gqa", "mha"])
def test_depth_weights_are_a_distribution(variant, heads):
    model = make_model(seed=4, **VARIANTS[variant], **HEADS[heads])
    ids = rand_ids(3, 10, seed=4)
    with torch.no_grad():
        out = model(ids, return_depth_weights=True)
    n_kv = HEADS[heads]["n_kv_heads"]
    assert sorted(out.depth_weights) == [0, 1, 2, 3]
    for p, dw in out.depth_weights.items():
        w = dw.weights
        assert w.shape == (3, 10, n_kv, len(dw.sources))
        assert dw.sources[-1] == p
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 10, n_kv), atol=1e-6, rtol=0)
    if variant == "dense":  # weights are not trivially one-hot on the own position
        assert out.depth_weights[3].weights[..., -1].max() < 0.999


def test_depth_weights_absent_unless_requested():
    model = make_model(seed=4, policy="dense")
    with torch.no_grad():
        out = model(rand_ids(1, 5, seed=4))
    assert out.depth_weights is None


STRIDED4 = {
    # 4 layers; position p -> its sources with itself last
    "dense": [(0,), (0, 1), (0, 1, 2), (0, 1, 2, 3)],
    "none": [(0,), (1,), (2,), (3,)],
    "strided": [(0,), (0, 1), (0, 2), (0, 2, 3)],  # stride 2, window 0
    "strided_w1": [(0,), (0, 1), (0, 1, 2), (0, 2, 3)],  # stride 2, window 1
}


@pytest.mark.parametrize("variant", list(STRIDED4))
def test_sources_match_policy(variant):
    model = make_model(seed=5, **VARIANTS[variant])
    with torch.no_grad():
        out = model(rand_ids(1, 4, seed=5), return_depth_weights=True)
    assert [tuple(out.depth_weights[p].sources) for p in range(4)] == STRIDED4[variant]


def test_strided_default_stride_and_window():
    # stride None -> n_layers // 2 = 3 on 6 layers; window 2
    model = make_model(seed=5, policy="strided", window=2, n_layers=6)
    got = [tuple(s) for s in model.depth_sources(1)]
    assert got == [(), (0,), (0, 1), (0, 1, 2), (0, 2, 3), (0, 3, 4)]
    assert got == expected_sources("strided", 6, stride=3, window=2)


def test_same_layer_sources_on_looped_model():
    model = make_model(seed=6, loop=3, policy="same_layer", **LOOPED_MODEL)
    with torch.no_grad():
        out = model(rand_ids(1, 4, seed=6), return_depth_weights=True)
    assert sorted(out.depth_weights) == list(range(8))
    got = [tuple(out.depth_weights[p].sources) for p in range(8)]
    assert got == [s + (p,) for p, s in enumerate(SAME_LAYER_LOOPED)]


def test_default_policy_strided_for_decoder_anchor_for_looped():
    assert build_model(tiny_cfg()).policy == "strided"
    assert build_model(tiny_cfg(loop=3, **LOOPED_MODEL)).policy == "anchor"
    assert build_model(tiny_cfg(enabled=False, policy="dense")).policy == "none"


def test_layout_positions():
    layout = DepthLayout(n_prelude=1, n_core=2, loops=3, n_coda=1)
    assert layout.n_positions == 8
    slots = [layout.slot(p) for p in range(8)]
    assert [(s.stage, s.layer, s.iteration) for s in slots] == [
        ("prelude", 0, 0), ("core", 0, 0), ("core", 1, 0), ("core", 0, 1), ("core", 1, 1),
        ("core", 0, 2), ("core", 1, 2), ("coda", 0, 0)]
    assert [layout.position(s) for s in slots] == list(range(8))
    with pytest.raises(IndexError):
        layout.slot(8)


# ---------------------------------------------------------------------------------------------
# Policy registry


def test_builtin_policies_registered():
    assert {"none", "dense", "strided", "same_layer"} <= set(SOURCE_POLICIES)
    assert depth_mod.SOURCE_POLICIES is SOURCE_POLICIES


@pytest.fixture
def temp_policy():
    """Names registered by a test, removed afterwards."""
    names = []
    yield names
    for n in names:
        SOURCE_POLICIES.pop(n, None)


def test_register_source_policy(temp_policy):
    name = "test_previous_only"
    assert name not in SOURCE_POLICIES
    temp_policy.append(name)

    @register_source_policy(name)
    def previous_only(p, layout, cfg):
        return (p - 1,) if p else ()

    assert SOURCE_POLICIES[name] is previous_only
    model = make_model(seed=7, policy=name)  # the config validator accepts the new name
    assert model.policy == name
    with torch.no_grad():
        out = model(rand_ids(1, 5, seed=7), return_depth_weights=True)
    assert [tuple(out.depth_weights[p].sources) for p in range(4)] == \
        [(0,), (0, 1), (1, 2), (2, 3)]
    # once removed again, the config validator rejects the name
    SOURCE_POLICIES.pop(name)
    with pytest.raises(ConfigError, match=name):
        tiny_cfg(policy=name)


def test_invalid_policy_output_is_rejected(temp_policy):
    temp_policy.append("test_bad")
    register_source_policy("test_bad")(lambda p, layout, cfg: (p,))  # reads itself: invalid
    with pytest.raises(ValueError, match="test_bad"):
        sources_for_layout("test_bad", DepthLayout(0, 3, 1, 0), tiny_cfg().model.depth_attention)


# ---------------------------------------------------------------------------------------------
# Gradients


def test_gradient_reaches_every_parameter():
    torch.manual_seed(8)
    model = randomize_(build_model(tiny_cfg(policy="dense")), seed=8).train()
    ids, targets = rand_ids(2, 10, seed=8), rand_ids(2, 10, seed=9)
    logits = model(ids).logits
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
    names = [n for n, _ in model.named_parameters()]
    assert len(names) > 10
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_keys_get_gradient_only_through_depth_attention_on_one_token():
    """With a single token, sequence attention puts weight 1 on it whatever the key is, so in a
    vanilla model no key projection gets gradient; with dense Depth-Attention every layer's key
    enters a depth softmax (its own, or as a source of later layers) and must get gradient."""
    ids = rand_ids(2, 1, seed=9)
    grads = {}
    for name, kw in (("vanilla", dict(enabled=False)), ("dense", dict(policy="dense"))):
        torch.manual_seed(9)
        model = randomize_(build_model(tiny_cfg(**kw)), seed=9)
        model(ids).logits.square().sum().backward()
        grads[name] = [blk.attn.k_proj.weight.grad.abs().max().item() for blk in model.core]
    # a softmax over one key has zero gradient; SDPA's backward leaves rounding (~1e-6 here,
    # exactly 0 on other CPUs), six orders below the dense model's key gradients
    assert all(g <= 1e-4 for g in grads["vanilla"]), grads["vanilla"]
    assert all(g > 1e-1 for g in grads["dense"]), grads["dense"]
