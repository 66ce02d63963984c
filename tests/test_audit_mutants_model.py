"""Tests written against mutants that survived the suite (an audit's plausible one-line bugs):
the transformers export of a non-default rope_theta and of the default Depth-Attention source
policy and stride; MLA's frozen-token rule when tokens exit at different iterations; the
compiled-decoder cache key and its length buckets above 64; the exit.drop_rows_from boundary.

Each test names the bug it catches in its docstring.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import (LOOPED_MODEL, _ref_rms, _ref_rope, _ref_softmax, decode_run, make_model,
                      max_diff, model_sources, rand_ids, tiny_cfg)
from looped.model.depth import default_stride
from looped.model.depth_pass import DepthPass
from looped.model.exit import ExitCriterion

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# 1. Export: rope_theta, and the default source policy / stride


def _export_and_load(tmp_path, kw, seed):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from looped.data import build_task
    from looped.integrations.hf.export import export_model

    cfg = tiny_cfg(**kw)
    model = make_model(seed=seed, **kw)
    export_model(cfg, model, build_task(cfg.task, split="eval"), tmp_path, check=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    return cfg, model, hf, json.loads((tmp_path / "config.json").read_text())


@torch.no_grad()
def _assert_logits_equal(cfg, model, hf, seed):
    ids = rand_ids(batch=2, tokens=20, seed=seed)
    assert max_diff(hf(ids).logits, model(ids).logits) <= TOL
    if cfg.loop > 1:  # other loop counts: the strided default must not depend on R
        for r in (1, cfg.loop + 1):
            assert max_diff(hf(ids, loops=r).logits, model(ids, loops=r).logits) <= TOL


def test_export_keeps_a_non_default_rope_theta(tmp_path):
    """Bug caught: a non-default `rope_theta` dropped from the exported config (the exported
    model would rotate with the default 10000)."""
    kw = dict(loop=2, policy="same_layer", rope_theta=500.0, **LOOPED_MODEL)
    cfg, model, hf, config = _export_and_load(tmp_path, kw, seed=11)
    assert model.cfg.rope_theta == 500.0
    assert config["rope_theta"] == 500.0 and hf.config.rope_theta == 500.0
    _assert_logits_equal(cfg, model, hf, seed=11)
    # guard: at 20 tokens, theta 500 and 10000 give clearly different logits
    other = make_model(seed=11, **dict(kw, rope_theta=10000.0))
    ids = rand_ids(batch=2, tokens=20, seed=11)
    with torch.no_grad():
        assert max_diff(other(ids).logits, model(ids).logits) > 1e-2


# name -> (make_model kwargs, the policy the model resolves to)
DEFAULT_POLICY_MODELS = {
    # a plain decoder with depth_attention.sources unset: `strided` at the default stride
    "plain-unset": (dict(loop=1), "strided"),
    # `strided` named, its stride left at the default
    "plain-strided-default": (dict(loop=1, policy="strided"), "strided"),
    # a looped model with sources unset: `anchor`
    "looped-unset": (dict(loop=3, **LOOPED_MODEL), "anchor"),
    # a looped model with `strided` at the default stride (distinct layers // 2 = 2; the
    # 8 depth positions // 2 would be 4)
    "looped-strided-default": (dict(loop=3, policy="strided", **LOOPED_MODEL), "strided"),
}


@pytest.mark.parametrize("name", list(DEFAULT_POLICY_MODELS))
def test_export_of_the_default_source_policy_and_stride(name, tmp_path):
    """Bug caught: the export records the wrong source policy or default stride when they are
    left at their defaults (sources unset: strided for a plain model, anchor for a looped
    one; strided's default stride is distinct layers // 2, independent of the loop count),
    e.g. the exported code's default stride counting depth positions, or the export writing a
    stride / policy of its own instead of leaving the default."""
    kw, policy = DEFAULT_POLICY_MODELS[name]
    cfg, model, hf, config = _export_and_load(tmp_path, kw, seed=12)
    assert model.policy == policy and config["depth_sources"] == policy
    assert getattr(cfg.model.depth_attention, "stride", None) is None  # the default in use
    # the exported model reads exactly the sources the original does, at every loop count
    from looped.integrations.hf.modeling_looped import depth_sources

    for r in {cfg.loop, 1, cfg.loop + 1}:
        assert depth_sources(hf.config, r) == model.depth_sources(r), r
    if policy == "strided":
        assert default_stride(model.layout()) == 2
        # guard: the default stride picks other sources than stride 1 (every position)
        assert model.depth_sources(cfg.loop) != [tuple(range(p)) for p in
                                                range(model.layout().n_positions)]
    _assert_logits_equal(cfg, model, hf, seed=12)


# ---------------------------------------------------------------------------------------------
# 2. MLA: the frozen-token rule with tokens exiting at different iterations

MLA = ("model.attention=mla", "model.mla.kv_rank=12", "model.mla.nope_dim=6",
       "model.mla.rope_dim=4", "model.mla.v_dim=5")
MLA_LOOPS = 3


class StopAtToken(ExitCriterion):
    """Token (b, t) of the sequence stops after after[b, t] iterations. Tracks the chunk's
    sequence offset across the forward passes of one decode (a fresh criterion per run)."""

    def __init__(self, after: torch.Tensor, drop_rows_from: int = 0):
        self.after, self.drop_rows_from = after, drop_rows_from
        self.start, self.width = 0, 0

    def init(self):
        self.start, self.width = self.start + self.width, 0

    def check(self, it):
        self.width = it.state.shape[1]
        return it.r + 1 >= self.after[:, self.start:self.start + self.width]


def _mla_model(seed):
    return make_model(seed=seed, loop=MLA_LOOPS, policy="same_layer", extra=MLA, **LOOPED_MODEL)


def _blocks(model, loops):
    out = [(b, False) for b in model.prelude]
    for r in range(loops):
        out += [(b, layer == 0) for layer, b in enumerate(model.core_blocks(r))]
    return out + [(b, False) for b in model.coda]


@torch.no_grad()
def naive_mla_exit(model, ids, after):
    """float64 logits of a looped MLA model (injection add, init_state zeros, absorbed depth
    keys, full-rank queries) where token (b, t) runs after[b, t] iterations, from the
    frozen-token rule: at every later core position an exited token's entries (mixed latent
    and RoPE key) are those of the same layer one iteration back, and its state stays."""
    c = model.cfg
    m, h, eps, n_pre, n = c.mla, c.n_heads, c.norm_eps, c.n_prelude, c.n_layers
    qk = m.nope_dim + m.rope_dim
    sources = model_sources(model, model.loop)
    b, t = ids.shape
    W = (lambda lin: lin.weight.double())
    e = F.embedding(ids, model.embed.weight.double())
    lat_store, kr_store = {}, {}
    x, state = e, torch.zeros_like(e)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for p, (blk, starts) in enumerate(_blocks(model, model.loop)):
        r = (p - n_pre) // n if n_pre <= p < n_pre + n * model.loop else None
        if starts:
            x = state + e
        a = blk.attn
        hid = _ref_rms(x, blk.attn_norm.weight.double(), eps)
        q = (hid @ W(a.q_proj).T).view(b, t, h, qk)
        q_nope = q[..., :m.nope_dim]
        q_rope = torch.stack([_ref_rope(q[:, i, :, m.nope_dim:], i, c.rope_theta)
                              for i in range(t)], 1)  # (B, T, H, d_rope)
        lat = _ref_rms(hid @ W(a.kv_down).T, a.kv_norm.weight.double(), eps)  # (B, T, d_c)
        kr = hid @ W(a.k_rope).T
        kr = torch.stack([_ref_rope(kr[:, i], i, c.rope_theta) for i in range(t)], 1)
        w_uk = W(a.k_up).view(h, m.nope_dim, m.kv_rank)
        w_uv = W(a.v_up).view(h, m.v_dim, m.kv_rank)
        mixed = lat
        if sources[p]:
            q_lat = torch.einsum("bthn,hnc->btc", q_nope, w_uk) / h
            qr_bar = q_rope.mean(2)
            cands = [(lat_store[j], kr_store[j]) for j in sources[p]] + [(lat, kr)]
            scores = torch.stack([(q_lat * cj).sum(-1) + (qr_bar * kj).sum(-1)
                                  for cj, kj in cands], -1) / math.sqrt(qk)
            alpha = _ref_softmax(scores, -1)  # (B, T, S + 1)
            mixed = sum(alpha[..., i, None] * cj for i, (cj, _) in enumerate(cands))
        if r is not None and r >= 1:
            frozen = (after <= r)[..., None]  # exited after `after` iterations
            mixed = torch.where(frozen, lat_store[p - n], mixed)
            kr = torch.where(frozen, kr_store[p - n], kr)
        lat_store[p], kr_store[p] = mixed, kr
        keys = torch.cat([torch.einsum("buc,hnc->bhun", mixed, w_uk),
                          kr[:, None].expand(b, h, t, m.rope_dim)], -1)  # (B, H, T, qk)
        vals = torch.einsum("buc,hvc->bhuv", mixed, w_uv)
        qs = torch.cat([q_nope, q_rope], -1).transpose(1, 2)  # (B, H, T, qk)
        s = (qs @ keys.transpose(-1, -2)) / math.sqrt(qk)
        att = _ref_softmax(s.masked_fill(~causal, -math.inf), -1)
        out = (att @ vals).transpose(1, 2).reshape(b, t, h * m.v_dim)
        x = x + out @ W(a.o_proj).T
        hm = _ref_rms(x, blk.mlp_norm.weight.double(), eps)
        gate = hm @ W(blk.mlp.gate).T
        x = x + (F.silu(gate) * (hm @ W(blk.mlp.up).T)) @ W(blk.mlp.down).T
        if r is not None and (p - n_pre) % n == n - 1:  # the iteration's end
            state = torch.where((after <= r)[..., None], state, x)
            x = state
        if p == n_pre - 1:
            e = x
    return _ref_rms(x, model.norm.weight.double(), eps) @ model.embed.weight.double().T


def _stop_pattern(b, t, seed):
    """Per token, 1..MLA_LOOPS iterations, every count present in every row."""
    g = torch.Generator().manual_seed(seed)
    after = torch.randint(1, MLA_LOOPS + 1, (b, t), generator=g)
    after[:, :MLA_LOOPS] = torch.arange(1, MLA_LOOPS + 1)[torch.randperm(MLA_LOOPS,
                                                                         generator=g)]
    return after


@torch.no_grad()
def test_mla_frozen_tokens_under_a_per_token_exit():
    """Bug caught: MLA's frozen-token handling (mla.py `pos.frozen`) not freezing the RoPE key
    (`_, c, raw_c = Attention._keep_frozen(...)`), or not freezing at all: an exited token must
    keep its latent and RoPE key at every later iteration's position, which later tokens'
    sequence attention and Depth-Attention read. Tokens exit at iterations 1, 2 and 3 within
    one sequence; full forward and cached decodes are checked against a float64 reference."""
    model = _mla_model(seed=21)
    b, t = 2, 9
    ids = rand_ids(batch=b, tokens=t, seed=21)
    after = _stop_pattern(b, t, seed=21)
    # the reference itself: with no token exiting early it is the model without exit
    no_exit = torch.full((b, t), MLA_LOOPS)
    assert max_diff(naive_mla_exit(model, ids, no_exit), model(ids).logits) <= TOL
    ref = naive_mla_exit(model, ids, after)
    full = model(ids, exit=StopAtToken(after))
    assert torch.equal(full.iterations, after)
    assert max_diff(full.logits, ref) <= TOL
    # guard: exits change the logits, also of the tokens that run every iteration
    assert max_diff(ref, model(ids).logits) > 1e-2
    later = (after == MLA_LOOPS)
    assert max_diff(ref[later], model(ids).logits[later]) > 1e-3

    for chunks, drop in (((4,), 0), ((4,), 1), ((t,), 0)):
        logits, iters, cache = decode_run(model, ids, chunks, exit=StopAtToken(after, drop))
        assert torch.equal(iters, after)
        assert max_diff(logits, ref) <= TOL
    # the rule itself, in the cache: later iterations repeat the exit iteration's entries
    n_pre, n = model.cfg.n_prelude, model.cfg.n_layers
    frozen = 0
    for bi in range(b):
        for ti in range(t):
            it = int(after[bi, ti])
            for layer in range(n):
                src = n_pre + (it - 1) * n + layer
                for r in range(it, MLA_LOOPS):
                    dst = n_pre + r * n + layer
                    assert torch.equal(cache.k[dst, bi, :, ti], cache.k[src, bi, :, ti])
                    assert torch.equal(cache.v[dst, bi, :, ti], cache.v[src, bi, :, ti])
                    frozen += 1
    assert frozen > 0
    # under the `last` policy one prefill reads only the chunk itself: the same logits
    logits, iters, _ = decode_run(model, ids, (t,), exit=StopAtToken(after), kv="last")
    assert torch.equal(iters, after) and max_diff(logits, ref) <= TOL


# ---------------------------------------------------------------------------------------------
# 3. Compiled decode: the decoder key, and the length buckets


def test_compiled_decoder_is_kept_per_cache_policy():
    """Bug caught: the decoder reuse key ignoring `kv`: a decoder made for kv=per_iteration
    reused for kv=last (a cache of another layout and policy)."""
    model = make_model(seed=31, loop=3, policy="same_layer", **LOOPED_MODEL)
    exact = model.compiled_decoder(1, 10, kv="per_iteration")
    last = model.compiled_decoder(1, 10, kv="last")
    assert last is not exact
    assert exact.cache.policy.name == "per_iteration" and last.cache.policy.name == "last"
    assert exact.cache.n_slots == 1 + 2 * 3 + 1 and last.cache.n_slots == 1 + 2 + 1
    assert model.compiled_decoder(1, 10, kv="last") is last
    assert model.compiled_decoder(1, 10, kv="per_iteration") is exact
    # the loop count is part of the key too
    other = model.compiled_decoder(1, 10, loops=2, kv="last")
    assert other is not last and other.loops == 2


def test_compiled_decoder_buckets_above_64():
    """Bug caught: the compiled decoder's length bucket mis-rounded or capped above 64: it must
    be the next power of two >= max_len (at least 64), capped only by max_seq_len."""
    model = make_model(seed=32, loop=1, policy="strided", stride=2, max_seq_len=512)
    want = {1: 64, 10: 64, 63: 64, 64: 64, 65: 128, 100: 128, 127: 128, 128: 128, 129: 256,
            200: 256, 255: 256, 256: 256, 257: 512, 300: 512, 512: 512}
    got = {n: model.compiled_decoder(1, n).cache.max_len for n in want}
    assert got == want
    # a max_seq_len that is not a power of two caps the bucket at itself
    short = make_model(seed=33, loop=1, policy="strided", stride=2, max_seq_len=100)
    assert {n: short.compiled_decoder(1, n).cache.max_len for n in (10, 64, 65, 99, 100)} == \
        {10: 64, 64: 64, 65: 100, 99: 100, 100: 100}


# ---------------------------------------------------------------------------------------------
# 4. Batched exit: the drop_rows_from boundary

EXIT_R = 4


class StopAfterRow(ExitCriterion):
    """Row b stops after after[b] iterations."""

    def __init__(self, after, drop_rows_from):
        self.after, self.drop_rows_from = torch.tensor(after), drop_rows_from

    def check(self, it):
        b, t = it.state.shape[:2]
        return (it.r + 1 >= self.after[:b])[:, None].expand(b, t)


@pytest.fixture
def subset_calls(monkeypatch):
    """Per core iteration run: the number of rows it computed, and whether on a subset."""
    calls = []
    original = DepthPass.iteration

    def spy(self, x, frozen=None, rows=None):
        calls.append((int(x.shape[0]), rows is not None))
        return original(self, x, frozen, rows)

    monkeypatch.setattr(DepthPass, "iteration", spy)
    return calls


@torch.no_grad()
def test_rows_drop_exactly_from_drop_rows_from(subset_calls):
    """Bug caught: the drop_rows_from boundary off by one (`0 < drop_rows_from < batch`
    instead of `<=`): a batch of exactly drop_rows_from rows must drop finished rows, one row
    fewer must not; the results are the same either way."""
    model = make_model(seed=41, loop=EXIT_R, policy="same_layer", **LOOPED_MODEL)
    after = [1, 3, 2, 4]
    ids = rand_ids(batch=4, tokens=7, seed=41)
    runs = {}
    for batch, drop in ((4, 4), (4, 5), (3, 4), (3, 3)):
        subset_calls.clear()
        crit = StopAfterRow(after[:batch], drop)
        logits, iters, _ = decode_run(model, ids[:batch], (3,), exit=crit)
        runs[batch, drop] = (logits, iters)
        dropped = any(subset for _, subset in subset_calls)
        assert dropped == (batch >= drop), (batch, drop)
        assert torch.equal(iters, torch.tensor(after[:batch])[:, None].expand(batch, 7))
    for batch in (4, 3):  # dropping rows or not: the same results
        (l_drop, i_drop), (l_keep, i_keep) = runs[batch, batch], runs[batch, batch + 1]
        assert torch.equal(i_drop, i_keep) and max_diff(l_drop, l_keep) <= TOL
    # guard: exits matter, and the first three rows agree between the batches of 4 and 3
    assert max_diff(runs[4, 4][0][:3], runs[3, 3][0]) <= TOL
    assert max_diff(runs[4, 4][0], decode_run(model, ids, (3,))[0]) > 1e-3
