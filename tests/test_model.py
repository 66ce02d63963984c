"""The model as a whole: public API, shapes, causality, loops, shape errors, torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import looped
from looped import LMOutput, build_model, load_config
from looped.errors import LoopedError, ShapeError

from conftest import LOOPED_MODEL, VOCAB, make_model, max_diff, rand_ids, randomize_, tiny_cfg


def test_public_api_forward_shapes():
    cfg = load_config(["loop=1", "model.n_layers=4", "model.depth_attention.sources=dense",
                       "model.vocab_size=50", "model.d_model=32", "model.head_dim=8",
                       "model.ffn_dim=64", "model.max_seq_len=16"])
    model = build_model(cfg)
    assert isinstance(model, looped.LoopedLM)
    out = model(rand_ids(3, 7, seed=1))
    assert isinstance(out, LMOutput)
    assert out.logits.shape == (3, 7, 50)
    assert out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    assert out.layout.n_positions == 4


def test_tied_head_uses_embedding():
    model = make_model(seed=2)
    assert model.lm_head is None
    untied = make_model(seed=2, tie_embeddings="false")
    assert untied.lm_head is not None
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(model) == VOCAB * 32
    x = torch.randn(1, 3, 32)
    assert max_diff(model.head(x), model.norm(x) @ model.embed.weight.T) <= 1e-6


@pytest.mark.parametrize("kw", [dict(policy="dense"), dict(policy="strided", window=1),
                                dict(loop=3, policy="same_layer", **LOOPED_MODEL)],
                         ids=["dense", "strided_w1", "looped"])
def test_causal_future_tokens_do_not_change_past_logits(kw):
    model = make_model(seed=3, **kw)
    a = rand_ids(2, 10, seed=3)
    b = a.clone()
    b[:, 6:] = rand_ids(2, 4, seed=4)
    assert not torch.equal(a[:, 6:], b[:, 6:])
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    assert max_diff(la[:, :6], lb[:, :6]) <= 1e-6
    assert max_diff(la[:, 6:], lb[:, 6:]) > 1e-4


def test_batch_rows_are_independent():
    model = make_model(seed=5, policy="dense")
    ids = rand_ids(3, 8, seed=5)
    with torch.no_grad():
        together = model(ids).logits
        alone = torch.cat([model(ids[i:i + 1]).logits for i in range(3)])
    assert max_diff(together, alone) <= 1e-5


def test_loops_override_changes_depth():
    model = make_model(seed=6, loop=3, policy="dense", **LOOPED_MODEL)
    ids = rand_ids(2, 6, seed=6)
    with torch.no_grad():
        out2 = model(ids, loops=2, return_depth_weights=True)
        out3 = model(ids, return_depth_weights=True)
    assert out2.layout.n_positions == 1 + 2 * 2 + 1
    assert sorted(out2.depth_weights) == list(range(6))
    assert sorted(out3.depth_weights) == list(range(8))
    assert max_diff(out2.logits, out3.logits) > 1e-4
    with pytest.raises(ShapeError):
        model(ids, loops=0)


def test_unrolled_baseline_has_untied_core():
    tied = build_model(tiny_cfg(loop=3, **LOOPED_MODEL))
    untied = build_model(tiny_cfg(loop=3, share_weights="false", **LOOPED_MODEL))
    core_params = lambda m: sum(p.numel() for p in m.core.parameters())  # noqa: E731
    assert core_params(untied) == 3 * core_params(tied)
    with pytest.raises(ShapeError, match="loops"):
        untied(rand_ids(1, 4, seed=7), loops=2)


def test_unrolled_with_copied_weights_equals_looped():
    """An unrolled model whose three core copies hold the same weights is the looped model."""
    looped_m = make_model(seed=8, loop=3, policy="same_layer", **LOOPED_MODEL)
    unrolled = build_model(tiny_cfg(loop=3, policy="same_layer", share_weights="false",
                                    **LOOPED_MODEL)).eval()
    sd = {}
    for k, v in looped_m.state_dict().items():
        if k.startswith("core."):
            _, layer, rest = k.split(".", 2)
            for r in range(3):
                sd[f"core.{r}.{layer}.{rest}"] = v
        else:
            sd[k] = v
    unrolled.load_state_dict(sd)
    ids = rand_ids(2, 7, seed=8)
    with torch.no_grad():
        assert max_diff(unrolled(ids).logits, looped_m(ids).logits) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Shape errors


def test_sequence_longer_than_max_seq_len_raises():
    model = make_model(seed=9)  # max_seq_len 32
    model(rand_ids(1, 32, seed=9))  # exactly the limit is fine
    with pytest.raises(ShapeError, match="max_seq_len"):
        model(rand_ids(1, 33, seed=9))


def test_cache_decode_past_max_seq_len_raises():
    model = make_model(seed=10)
    cache = model.new_cache(1, 40)  # a cache bigger than the model's context
    with torch.no_grad():
        model(rand_ids(1, 32, seed=10), cache=cache)
        with pytest.raises(ShapeError, match="max_seq_len"):
            model(rand_ids(1, 1, seed=11), cache=cache)


def test_bad_input_rank_raises():
    model = make_model(seed=12)
    with pytest.raises(ShapeError):
        model(torch.randint(0, VOCAB, (6,)))


def test_generate_past_max_seq_len_raises():
    model = make_model(seed=13)
    with pytest.raises(ShapeError):
        model.generate(rand_ids(1, 30, seed=13), 3, temperature=0)


def test_shape_error_is_a_looped_error():
    assert issubclass(ShapeError, LoopedError)


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_looped_gradient_reaches_every_parameter():
    torch.manual_seed(15)
    model = randomize_(build_model(tiny_cfg(loop=3, policy="same_layer", injection="concat",
                                            init_state="embed", **LOOPED_MODEL)), seed=15)
    assert model.adapter is not None
    ids, targets = rand_ids(2, 8, seed=15), rand_ids(2, 8, seed=16)
    logits = model(ids).logits
    F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_forward_traces_as_one_graph():
    """torch.compile must see the whole forward pass: no graph break (checked with the cheap
    `eager` backend). Reading the OmegaConf config inside forward breaks the graph."""
    torch._dynamo.reset()
    model = make_model(seed=14, policy="dense", n_layers=2)
    ids = rand_ids(2, 8, seed=14)
    try:
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            got = compiled(ids).logits
            assert max_diff(got, model(ids).logits) <= 1e-5
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    model = make_model(seed=14, policy="dense", n_layers=2)
    ids = rand_ids(2, 8, seed=14)
    compiled = torch.compile(model)
    with torch.no_grad():
        expected = model(ids).logits
        got = compiled(ids).logits
    assert got.shape == expected.shape
    assert max_diff(got, expected) <= 1e-4
    torch._dynamo.reset()
