"""Compiled decode: the static-shape step (a tensor position, a masked preallocated cache)
equals the eager cached decode under every cache policy, torch.compile captures it once, and
later steps and longer generations reuse that graph."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from looped.errors import ConfigError, ShapeError
from looped.model.compiled_decode import KEPT_DECODERS, CompiledDecoder, kept_decoders
from looped.model.exit import MaxLoopsExit

from conftest import LOOPED_MODEL, make_model, max_diff, rand_ids

pytestmark = pytest.mark.usefixtures("single_thread")

MODELS = {
    "plain-strided": dict(loop=1, policy="strided", stride=2),
    "plain-vanilla": dict(loop=1, enabled=False),
    "looped-same_layer": dict(loop=3, policy="same_layer", **LOOPED_MODEL),
    "looped-dense-raw": dict(loop=3, policy="dense", mix="raw", injection="none",
                             init_state="embed", **LOOPED_MODEL),
    "looped-learned-positions": dict(loop=2, policy="same_layer", pos_embedding="true",
                                     **LOOPED_MODEL),
    # MLA: a cache of two widths (the RoPE key, the latent), in two buffers
    "plain-mla-strided": dict(loop=1, policy="strided", stride=2,
                              extra=("model.attention=mla", "model.mla.kv_rank=12",
                                     "model.mla.rope_dim=4", "model.mla.depth_keys=own")),
    "looped-mla": dict(loop=3, policy="same_layer", extra=("model.attention=mla",),
                       **LOOPED_MODEL),
}
# what torch.compile compiles: a prelude, a one-layer core looped twice and a coda, half the
# graph of looped-same_layer (compile time grows with the graph: the suite pays it cold)
COMPILED = {"looped-same_layer": dict(loop=2, policy="same_layer", n_layers=1, n_prelude=1,
                                      n_coda=1),
            "plain-strided": MODELS["plain-strided"]}


def decode_static(decoder: CompiledDecoder, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    outs = [decoder.prefill(ids[:, :prefill])]
    for t in range(prefill, ids.shape[1]):
        outs.append(decoder.step(ids[:, t:t + 1]))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("kv", ["per_iteration", "last"])
@pytest.mark.parametrize("name", list(MODELS))
def test_static_step_equals_eager_cached_decode(name, kv):
    """The static step run eagerly (compile=False): the same logits as the eager cache, with
    a cache longer than the sequence, so stale keys past the position must be masked."""
    model = make_model(seed=90, **MODELS[name])
    ids = rand_ids(2, 10, seed=90)
    with torch.no_grad():
        ref = model.cached_forward(ids, kv=kv, prefill=3).logits
    decoder = CompiledDecoder(model, 2, 16, kv=kv, compile=False)
    for buf in decoder.cache.buffers():  # garbage past the position must not leak in
        buf.normal_()
    assert max_diff(decode_static(decoder, ids, 3), ref) <= 1e-5
    # a reset decoder decodes another sequence exactly: old entries are masked, not cleared
    decoder.reset()
    other = rand_ids(2, 10, seed=91)
    with torch.no_grad():
        ref2 = model.cached_forward(other, kv=kv, prefill=5).logits
    assert max_diff(decode_static(decoder, other, 5), ref2) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name,kv,batch", [("looped-same_layer", "last", 1),
                                           ("plain-strided", "per_iteration", 2)])
def test_compiled_decode_matches_eager_and_never_recompiles(name, kv, batch):
    """Batch 1 runs its linear layers as fused reductions (RowsAsReductions), batch 2 as
    matrix products: both equal the eager decode."""
    torch._dynamo.reset()
    model = make_model(seed=92, **COMPILED[name])
    prompt = rand_ids(batch, 4, seed=92)
    with torch.no_grad():
        eager_short = model.generate(prompt, 3, temperature=0, kv=kv, return_iterations=True)
        eager_long = model.generate(prompt, 20, temperature=0, kv=kv)
        ids = eager_long[:, :-1]
        ref = model.cached_forward(ids, kv=kv, prefill=4).logits
    # the first generation compiles the step once
    short = model.generate(prompt, 3, temperature=0, kv=kv, compile=True,
                           return_iterations=True)
    assert torch.equal(short[0], eager_short[0]) and torch.equal(short[1], eager_short[1])
    # every later step, and a longer generation on the same decoder, reuses that graph: any
    # recompilation raises here
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True), \
            torch.compiler.set_stance("fail_on_recompile"):
        long = model.generate(prompt, 20, temperature=0, kv=kv, compile=True)
        decoder = model.compiled_decoder(batch, 24, kv=kv)
        decoder.reset()
        logits = decode_static(decoder, ids, 4)
    assert torch.equal(long, eager_long)
    assert max_diff(logits, ref) <= 1e-5
    assert kept_decoders(model) == 1


def test_compiled_decode_errors_are_one_line():
    model = make_model(seed=93, **MODELS["looped-same_layer"])
    prompt = rand_ids(1, 4, seed=93)
    with pytest.raises(ConfigError, match="without adaptive exit"):
        model.generate(prompt, 2, compile=True, exit=MaxLoopsExit(after=1))
    with pytest.raises(ConfigError, match="without adaptive exit"):
        model.generate(prompt, 2, compile=True, use_cache=False)
    with pytest.raises(ShapeError, match="exceeds model.max_seq_len"):
        CompiledDecoder(model, 1, 64, compile=False)
    decoder = CompiledDecoder(model, 1, 5, compile=False)
    decoder.prefill(prompt)
    decoder.step(prompt[:, :1])
    with pytest.raises(ShapeError, match="holds 5 tokens; 5 are used"):
        decoder.step(prompt[:, :1])


def test_decoders_are_kept_per_shape_bucket():
    model = make_model(seed=94, **MODELS["plain-strided"])
    a = model.compiled_decoder(1, 10)
    assert model.compiled_decoder(1, 20) is a  # both round up to the 32-token context
    assert a.cache.max_len == model.cfg.max_seq_len == 32
    assert model.compiled_decoder(2, 10) is not a
    for b in range(3, 3 + KEPT_DECODERS):  # the least recently used are dropped
        model.compiled_decoder(b, 10)
    assert kept_decoders(model) == KEPT_DECODERS
    assert model.compiled_decoder(1, 10) is not a


@pytest.mark.slow
def test_a_decoder_past_the_recompile_limit_decodes_eagerly():
    """Every decoder compiles the same method; past dynamo's limit a new one warns and runs its
    step eagerly, with the same logits, instead of failing."""
    torch._dynamo.reset()
    model = make_model(seed=95, **MODELS["plain-strided"])
    ids = rand_ids(2, 8, seed=95)
    with torch.no_grad():
        ref = model.cached_forward(ids, prefill=4).logits
    # batch 2 first: the graph test_compiled_decode_matches_eager_and_never_recompiles compiled
    # (inductor's cache serves it); another batch size is another graph
    first, second = model.compiled_decoder(2, 8), model.compiled_decoder(1, 8)
    decode_static(first, ids, 4)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        with pytest.warns(UserWarning, match="recompile limit"):
            logits = decode_static(second, ids[:1], 4)
    assert max_diff(logits, ref[:1]) <= 1e-5
