"""Attention kernels: sdpa and eager agree (with and without a cache), eager returns weights,
xformers runs on CUDA only and otherwise fails with one actionable line."""

from __future__ import annotations

import math

import pytest
import torch

from looped import build_model
from looped.errors import KernelUnavailableError, LoopedError
from looped.model.kernels import KERNELS, attend, check_kernel, xformers_available

from conftest import HEADS, decode_logits, make_model, max_diff, rand_ids, tiny_cfg


def naive_attention(q, k, v, q_offset):
    """Per query head and query token; query i sits at absolute position q_offset + i."""
    b, h, tq, d = q.shape
    n_rep = h // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hh in range(h):
            g = hh // n_rep
            for i in range(tq):
                last = q_offset + i
                s = (k[bi, g, :last + 1] @ q[bi, hh, i]) / math.sqrt(d)
                out[bi, hh, i] = s.softmax(0) @ v[bi, g, :last + 1]
    return out


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("n_kv", [1, 2, 4])
@pytest.mark.parametrize("tq,tk", [(6, 6), (3, 7), (1, 5)], ids=["full", "chunk", "decode"])
def test_attend_matches_naive(kernel, n_kv, tq, tk):
    g = torch.Generator().manual_seed(tq * 10 + tk + n_kv)
    q = torch.randn(2, 4, tq, 8, generator=g)
    k = torch.randn(2, n_kv, tk, 8, generator=g)
    v = torch.randn(2, n_kv, tk, 8, generator=g)
    offset = tk - tq
    out, w = attend(q, k, v, kernel=kernel, q_offset=offset)
    assert w is None
    assert out.shape == q.shape
    assert max_diff(out, naive_attention(q, k, v, offset)) <= 1e-5


def test_kernel_registry():
    assert {"sdpa", "eager", "xformers"} <= set(KERNELS)


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("policy", ["dense", "strided"])
def test_sdpa_and_eager_agree_full_forward(heads, policy):
    sdpa = make_model(seed=41, policy=policy, kernel="sdpa", **HEADS[heads])
    eager = build_model(tiny_cfg(policy=policy, kernel="eager", **HEADS[heads])).eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = rand_ids(2, 12, seed=41)
    with torch.no_grad():
        a = sdpa(ids, return_depth_weights=True)
        b = eager(ids, return_depth_weights=True)
    assert max_diff(a.logits, b.logits) <= 1e-5
    for p in a.depth_weights:
        assert max_diff(a.depth_weights[p].weights, b.depth_weights[p].weights) <= 1e-5


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("mix", ["mixed", "raw"])
def test_sdpa_and_eager_agree_cached_decode(heads, mix):
    sdpa = make_model(seed=42, policy="dense", mix=mix, kernel="sdpa", **HEADS[heads])
    eager = build_model(tiny_cfg(policy="dense", mix=mix, kernel="eager",
                                 **HEADS[heads])).eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = rand_ids(2, 12, seed=42)
    with torch.no_grad():
        a = decode_logits(sdpa, ids, chunks=(3, 4))
        b = decode_logits(eager, ids, chunks=(3, 4))
        full = eager(ids).logits
    assert max_diff(a, b) <= 1e-5
    assert max_diff(b, full) <= 1e-5


def test_eager_returns_attention_weights():
    model = make_model(seed=43, policy="dense", kernel="eager")
    ids = rand_ids(2, 9, seed=43)
    with torch.no_grad():
        out = model(ids, return_attn_weights=True)
    assert sorted(out.attn_weights) == [0, 1, 2, 3]
    upper = torch.triu(torch.ones(9, 9, dtype=torch.bool), diagonal=1)
    for p, w in out.attn_weights.items():
        assert w.shape == (2, 4, 9, 9)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 9), atol=1e-6, rtol=0)
        assert (w >= 0).all()
        assert torch.all(w[..., upper] == 0)
        assert torch.all(w[..., ~upper] > 0)  # softmax: every visible key gets some weight
    assert out.depth_weights is None


def test_eager_attention_weights_during_decode():
    model = make_model(seed=44, policy="dense", kernel="eager")
    ids = rand_ids(1, 6, seed=44)
    cache = model.new_cache(1, 6)
    with torch.no_grad():
        model(ids[:, :3], cache=cache)
        chunk = model(ids[:, 3:5], cache=cache, return_attn_weights=True).attn_weights
        full = model(ids, return_attn_weights=True).attn_weights
    for p, w in chunk.items():
        assert w.shape == (1, 4, 2, 5)
        assert w[0, :, 0, 4].eq(0).all()  # token 3 cannot see token 4
        assert max_diff(w, full[p][:, :, 3:5, :5]) <= 1e-5


def test_sdpa_cannot_return_attention_weights():
    model = make_model(seed=45, kernel="sdpa")
    with pytest.raises(ValueError, match="eager"):
        model(rand_ids(1, 4, seed=45), return_attn_weights=True)


# ---------------------------------------------------------------------------------------------
# xformers


@pytest.mark.skipif(not (xformers_available() and torch.cuda.is_available()),
                    reason="needs the xformers package and a CUDA device")
@pytest.mark.parametrize("heads", list(HEADS))
def test_xformers_matches_sdpa_on_cuda(heads):
    sdpa = make_model(seed=46, policy="dense", kernel="sdpa", **HEADS[heads]).cuda()
    xf = build_model(tiny_cfg(policy="dense", kernel="xformers", **HEADS[heads])).cuda().eval()
    xf.load_state_dict(sdpa.state_dict())
    ids = rand_ids(2, 12, seed=46).cuda()
    with torch.no_grad():
        a, b = sdpa(ids).logits, xf(ids).logits
        cached = decode_logits(xf, ids, chunks=(3, 4))
    assert max_diff(a, b) <= 1e-4
    assert max_diff(cached, a) <= 1e-4


def test_xformers_on_cpu_raises_one_line_error():
    model = build_model(tiny_cfg(kernel="xformers")).eval()  # the config itself is valid
    with pytest.raises(KernelUnavailableError) as exc:
        model(rand_ids(1, 4, seed=47))
    msg = str(exc.value)
    assert isinstance(exc.value, LoopedError)
    assert "\n" not in msg.strip() and msg.strip()
    assert "sdpa" in msg and "xformers" in msg
    with pytest.raises(KernelUnavailableError) as exc2:
        check_kernel("xformers", "cpu")
    assert "\n" not in str(exc2.value) and "sdpa" in str(exc2.value)
    check_kernel("sdpa", "cpu")
    check_kernel("eager", "cpu")
