"""Multi-head latent attention (model.attention=mla) with Depth-Attention on the latent.

The reference here is written from looped/model/mla.py's description, token by token in float64:
per depth position p and token t, the latent c = RMSNorm(W_DKV h) and RoPE key k_r; the depth
scores (mean over heads of q_h,nope . W_UK_h c~_j, plus the mean RoPE query . k_r,j, over
sqrt(d_nope + d_rope)), with W_UK of this layer (`absorbed`) or of layer j (`own`); the mixed
latent; then per head causal attention over keys [W_UK_h c~_u ; k_r,u] and values W_UV_h c~_u.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import (LOOPED_MODEL, _ref_rms, _ref_rope, _ref_softmax, decode_logits,
                      decode_run, make_model, max_diff, rand_ids, tiny_cfg)
from looped import load_config
from looped.errors import ConfigError

TOL = 1e-5
MLA = ("model.attention=mla", "model.mla.kv_rank=12", "model.mla.nope_dim=6",
       "model.mla.rope_dim=4", "model.mla.v_dim=5")

# name -> overrides for conftest.make_model
VARIANTS = {
    "plain_none": dict(policy="none"),
    "plain_strided": dict(policy="strided", stride=2, window=1),
    "plain_dense_own": dict(policy="dense", extra=("model.mla.depth_keys=own",)),
    "plain_q_rank": dict(policy="strided", stride=2, extra=("model.mla.q_rank=10",)),
    "looped_same_layer": dict(loop=3, policy="same_layer", **LOOPED_MODEL),
    "looped_dense_own": dict(loop=2, policy="dense", extra=("model.mla.depth_keys=own",),
                             **LOOPED_MODEL),
    "unrolled_own": dict(loop=2, policy="same_layer", share_weights="false",
                         extra=("model.mla.depth_keys=own", "train.loop_sampling.sampler=fixed"),
                         **LOOPED_MODEL),
    # the ablation: only the value path mixed, the raw latent cached for the keys
    "plain_values": dict(policy="dense", extra=("model.mla.depth_mix=values",)),
    "looped_values_own": dict(loop=2, policy="same_layer",
                              extra=("model.mla.depth_mix=values", "model.mla.depth_keys=own"),
                              **LOOPED_MODEL),
}


def mla(**kw):
    kw = dict(kw)
    kw["extra"] = MLA + tuple(kw.get("extra", ()))
    return kw


def _blocks(model, loops):
    """The blocks in depth order, and before which positions the loop injects e."""
    out = [(b, False) for b in model.prelude]
    for r in range(loops):
        out += [(b, layer == 0) for layer, b in enumerate(model.core_blocks(r))]
    return out + [(b, False) for b in model.coda]


def _w(linear):
    return linear.weight.double()


@torch.no_grad()
def naive_mla(model, ids, loops=None):
    """float64 logits of an MLA model (injection add, init_state zeros), token by token."""
    c = model.cfg
    m, h, eps = c.mla, c.n_heads, c.norm_eps
    loops = loops or model.loop
    sources = model.depth_sources(loops)
    b, t = ids.shape
    qk = m.nope_dim + m.rope_dim
    e = F.embedding(ids, model.embed.weight.double())
    # depth position -> mixed latents (B, T, d_c), raw latents, RoPE keys (B, T, d_rope)
    latents, raw_latents, rope_keys, attn_of = {}, {}, {}, {}
    values_only = m.depth_mix == "values"  # keys read the raw latents
    x = e
    state = torch.zeros_like(e)
    for p, (blk, starts_iteration) in enumerate(_blocks(model, loops)):
        if starts_iteration:
            x = state + e
        a = blk.attn
        attn_of[p] = a
        hid = _ref_rms(x, blk.attn_norm.weight.double(), eps)
        if hasattr(a, "q_proj"):
            q = hid @ _w(a.q_proj).T
        else:
            q = _ref_rms(hid @ _w(a.q_down).T, a.q_norm.weight.double(), eps) @ _w(a.q_up).T
        q = q.view(b, t, h, qk)
        lat = _ref_rms(hid @ _w(a.kv_down).T, a.kv_norm.weight.double(), eps)  # (B, T, d_c)
        kr = hid @ _w(a.k_rope).T
        mixed = torch.empty_like(lat)
        q_nope = q[..., :m.nope_dim]
        q_rope = torch.stack([_ref_rope(q[:, i, :, m.nope_dim:], i, c.rope_theta)
                              for i in range(t)], 1)  # (B, T, H, d_rope)
        kr = torch.stack([_ref_rope(kr[:, i], i, c.rope_theta) for i in range(t)], 1)
        for i in range(t):
            srcs = sources[p]
            if not srcs:
                mixed[:, i] = lat[:, i]
                continue
            scores, vals = [], []
            for j in srcs + (p,):
                layer = a if (m.depth_keys == "absorbed" or j == p) else attn_of[j]
                w_uk = _w(layer.k_up).view(h, m.nope_dim, m.kv_rank)
                c_j = lat[:, i] if j == p else latents[j][:, i]
                key_j = lat[:, i] if j == p else (raw_latents if values_only else latents)[j][:, i]
                k_j = kr[:, i] if j == p else rope_keys[j][:, i]
                s = sum((q_nope[:, i, hh] * (key_j @ w_uk[hh].T)).sum(-1) for hh in range(h)) / h
                s = s + (q_rope[:, i].mean(1) * k_j).sum(-1)
                scores.append(s / math.sqrt(qk))
                vals.append(c_j)
            alpha = _ref_softmax(torch.stack(scores, -1), -1)  # (B, S + 1)
            mixed[:, i] = sum(alpha[:, n, None] * v for n, v in enumerate(vals))
        latents[p], raw_latents[p], rope_keys[p] = mixed, lat, kr
        key_latents = lat if values_only else mixed
        w_uk = _w(a.k_up).view(h, m.nope_dim, m.kv_rank)
        w_uv = _w(a.v_up).view(h, m.v_dim, m.kv_rank)
        out = torch.zeros(b, t, h, m.v_dim, dtype=torch.float64)
        for i in range(t):
            for hh in range(h):
                keys = torch.cat([key_latents[:, :i + 1] @ w_uk[hh].T, kr[:, :i + 1]], -1)
                vals = mixed[:, :i + 1] @ w_uv[hh].T
                qh = torch.cat([q_nope[:, i, hh], q_rope[:, i, hh]], -1)
                att = _ref_softmax((keys @ qh[:, :, None]).squeeze(-1) / math.sqrt(qk), -1)
                out[:, i, hh] = (att[:, :, None] * vals).sum(1)
        x = x + out.reshape(b, t, -1) @ _w(a.o_proj).T
        hid = _ref_rms(x, blk.mlp_norm.weight.double(), eps)
        x = x + (F.silu(hid @ _w(blk.mlp.gate).T) * (hid @ _w(blk.mlp.up).T)) @ _w(blk.mlp.down).T
        core_end = c.n_prelude + c.n_layers * loops
        if c.n_prelude <= p < core_end and (p - c.n_prelude) % c.n_layers == c.n_layers - 1:
            state = x
        if p == c.n_prelude - 1:
            e = x
    x = _ref_rms(x, model.norm.weight.double(), eps)
    return x @ model.embed.weight.double().T


@pytest.mark.parametrize("name", list(VARIANTS))
def test_equals_naive_reference(name):
    model = make_model(seed=3, **mla(**VARIANTS[name]))
    ids = rand_ids(batch=2, tokens=7, seed=5)
    with torch.no_grad():
        assert max_diff(model(ids).logits, naive_mla(model, ids)) <= TOL


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decode_equals_full_forward(name):
    model = make_model(seed=4, **mla(**VARIANTS[name]))
    ids = rand_ids(batch=2, tokens=10, seed=6)
    with torch.no_grad():
        full = model(ids).logits
        assert max_diff(decode_logits(model, ids, (4,)), full) <= TOL
        assert max_diff(decode_logits(model, ids, (3, 2)), full) <= TOL


def test_policy_none_equals_vanilla_mla():
    kw = mla(**LOOPED_MODEL, loop=2)
    vanilla = make_model(seed=2, enabled=False, **kw)
    none = make_model(seed=2, policy="none", **kw)
    none.load_state_dict(vanilla.state_dict())
    ids = rand_ids(batch=2, tokens=9, seed=1)
    with torch.no_grad():
        assert torch.equal(none(ids).logits, vanilla(ids).logits)


def test_own_equals_absorbed_when_every_source_is_the_same_layer():
    """A looped core under same_layer reads only itself at earlier iterations."""
    kw = dict(loop=3, policy="same_layer", n_layers=2)
    absorbed = make_model(seed=9, **mla(**kw))
    own = make_model(seed=9, **mla(**kw, extra=("model.mla.depth_keys=own",)))
    own.load_state_dict(absorbed.state_dict())
    ids = rand_ids(batch=2, tokens=8, seed=2)
    with torch.no_grad():
        assert max_diff(own(ids).logits, absorbed(ids).logits) <= 1e-6


@pytest.mark.parametrize("name", ["plain_strided", "looped_same_layer"])
def test_parameters_and_cache_bytes_equal_vanilla_mla(name):
    kw = mla(**VARIANTS[name])
    da = make_model(**kw)
    off = dict(kw, enabled=False)
    off.pop("policy"), off.pop("stride", None), off.pop("window", None)
    vanilla = make_model(**off)
    assert sum(p.numel() for p in da.parameters()) == sum(p.numel() for p in vanilla.parameters())
    m, positions = da.cfg.mla, da.layout().n_positions
    for model in (da, vanilla):
        # per token: the latent and the RoPE key at every depth position, float32
        assert model.new_cache(3, 5).nbytes == 3 * 5 * positions * (m.kv_rank + m.rope_dim) * 4
    values = make_model(**dict(kw, extra=kw["extra"] + ("model.mla.depth_mix=values",)))
    assert values.new_cache(3, 5).nbytes == 3 * 5 * positions * (2 * m.kv_rank + m.rope_dim) * 4


def test_parameter_count_is_deepseek_v2s():
    cfg = tiny_cfg(**mla(extra=("model.mla.q_rank=10",)))
    model = make_model(**mla(extra=("model.mla.q_rank=10",)))
    c, m = cfg.model, cfg.model.mla
    d, h, qk = c.d_model, c.n_heads, m.nope_dim + m.rope_dim
    attn = (d * m.q_rank + m.q_rank + m.q_rank * h * qk  # low-rank queries and their norm
            + d * m.kv_rank + m.kv_rank  # W_DKV and the latent's norm
            + m.kv_rank * h * (m.nope_dim + m.v_dim)  # W_UK, W_UV
            + d * m.rope_dim + h * m.v_dim * d)  # W_KR, W_O
    assert sum(p.numel() for p in model.core[0].attn.parameters()) == attn


def test_depth_weights_are_one_distribution_per_token():
    model = make_model(**mla(**VARIANTS["looped_same_layer"]))
    out = model(rand_ids(batch=2, tokens=6), return_depth_weights=True)
    for p, dw in out.depth_weights.items():
        assert dw.weights.shape[:3] == (2, 6, 1)
        assert torch.allclose(dw.weights.sum(-1), torch.ones(2, 6, 1))


def test_exit_and_last_cache_decode_as_gqa_does():
    """Adaptive exit (frozen tokens keep their latent) and the `last` policy run through the
    same cache code: a single prefill equals the full forward under both."""
    from looped.model.exit import build_exit

    model = make_model(**mla(**VARIANTS["looped_same_layer"]))
    cfg = load_config(["exit.criterion=kl", "exit.threshold=0.5"])
    ids = rand_ids(batch=2, tokens=8, seed=3)
    with torch.no_grad():
        full = model(ids, exit=build_exit(cfg.exit))
        for kv in ("per_iteration", "last"):
            logits, iters, _ = decode_run(model, ids, (8,), exit=build_exit(cfg.exit), kv=kv)
            assert max_diff(logits, full.logits) <= TOL and torch.equal(iters, full.iterations)
        logits, iters, _ = decode_run(model, ids, (3,), exit=build_exit(cfg.exit))
        assert max_diff(logits, full.logits) <= TOL and torch.equal(iters, full.iterations)


@pytest.mark.parametrize("extra, fragment", [
    (("model.attention=mla", "model.mla.rope_dim=3"), "rope_dim must be even"),
    (("model.attention=mla", "model.mla.depth_keys=mine"), "depth_keys 'mine'"),
    (("model.attention=mla", "model.mla.depth_mix=keys"), "depth_mix 'keys'"),
    (("model.attention=mla", "model.cross_layer.method=denseformer"), "cross_layer"),
    (("model.attention=mlaa",), "unknown attention kind 'mlaa'"),
])
def test_bad_mla_configs_are_one_line_errors(extra, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(list(extra))
