"""The looped models' bounded source policies (looped.model.loop_sources): their source sets
against a listing written from their descriptions and against hand-written tables, a source
count that does not grow with R, zero added parameters and cache bytes, and the full forward
and cached decode (both cache policies, with and without adaptive exit) equal to the float64
reference at an R above the trained one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from looped import load_config
from looped.errors import ConfigError
from looped.model.depth import DepthLayout, sources_for_layout

from conftest import (LOOPED_MODEL, RefExit, decode_run, make_model, max_diff, model_sources,
                      naive_cached, naive_looped, overrides, policy_sources, rand_ids)
from test_exit import make_exit, pick_threshold

pytestmark = pytest.mark.usefixtures("single_thread")

TRAINED_R, TEST_R = 3, 6
BOUNDED = {  # name -> make_model keywords (the policy and its knobs)
    "anchor": dict(policy="anchor"),
    "window": dict(policy="window", extra=("model.depth_attention.window=2",)),
    "anchor_window": dict(policy="anchor_window", extra=("model.depth_attention.window=1",)),
    "loop_strided": dict(policy="loop_strided"),
    "loop_strided_s2": dict(policy="loop_strided", stride=2),
}
POLICY_KNOBS = {  # (policy, knobs) pairs the listing is checked at
    "anchor": [{}], "same_layer": [{}],
    "window": [dict(window=1), dict(window=2), dict(window=5)],
    "anchor_window": [dict(window=1), dict(window=3)],
    "loop_strided": [dict(stride=None), dict(stride=2), dict(stride=3)],
}
LAYOUTS = [(1, 2, 5, 1), (0, 1, 12, 0), (2, 3, 4, 2), (0, 2, 7, 1), (1, 1, 1, 1), (0, 1, 9, 2)]


def knob_cfg(window: int = 1, stride=None):
    return SimpleNamespace(window=window, stride=stride)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "x".join(map(str, x)))
@pytest.mark.parametrize("policy", list(POLICY_KNOBS))
def test_sources_match_the_listing_from_the_descriptions(policy, layout):
    for knobs in POLICY_KNOBS[policy]:
        got = sources_for_layout(policy, DepthLayout(*layout), knob_cfg(**knobs))
        assert got == policy_sources(policy, *layout, **knobs), knobs


# layout: 1 prelude (position 0), core layers 0/1 for iterations 0..3 (positions 1..8), 1 coda (9)
TABLES = {
    ("anchor", 1): [(), (0,), (0,), (0, 1), (0, 2), (0, 1), (0, 2), (0, 1), (0, 2), (0, 7, 8)],
    ("window", 2): [(), (), (), (1,), (2,), (1, 3), (2, 4), (3, 5), (4, 6), (0, 7, 8)],
    ("anchor_window", 1): [(), (0,), (0,), (0, 1), (0, 2), (0, 1, 3), (0, 2, 4), (0, 1, 5),
                           (0, 2, 6), (0, 7, 8)],
    # R = 4: stride 2, so iterations 0 and 2 are the sources
    ("loop_strided", 1): [(), (0,), (0,), (0, 1), (0, 2), (0, 1), (0, 2), (0, 1, 5), (0, 2, 6),
                          (0, 7, 8)],
}


@pytest.mark.parametrize("policy,window", list(TABLES))
def test_sources_match_hand_written_tables(policy, window):
    assert sources_for_layout(policy, DepthLayout(1, 2, 4, 1), knob_cfg(window)) == \
        TABLES[(policy, window)]
    assert policy_sources(policy, 1, 2, 4, 1, window=window) == TABLES[(policy, window)]


def most_sources(policy: str, loops: int, **knobs) -> int:
    return max(map(len, sources_for_layout(policy, DepthLayout(1, 2, loops, 1),
                                           knob_cfg(**knobs))))


@pytest.mark.parametrize("policy,knobs", [("anchor", {}), ("window", dict(window=2)),
                                          ("anchor_window", dict(window=1)),
                                          ("loop_strided", {})])
def test_bounded_policies_read_no_more_sources_at_16x_the_trained_R(policy, knobs):
    assert most_sources(policy, 192, **knobs) == most_sources(policy, 12, **knobs)
    assert most_sources("same_layer", 192) > most_sources("same_layer", 12)  # what they avoid


def test_loop_strided_with_a_fixed_stride_grows_with_R():
    """The documented trade-off: a fixed stride keeps the sources' iterations, not their count."""
    assert most_sources("loop_strided", 192, stride=6) > most_sources("loop_strided", 12, stride=6)


@pytest.mark.parametrize("name", list(BOUNDED))
def test_no_added_parameters_and_the_same_cache_bytes(name):
    model = make_model(seed=1, loop=TRAINED_R, **BOUNDED[name], **LOOPED_MODEL)
    vanilla = make_model(seed=1, loop=TRAINED_R, enabled=False, **LOOPED_MODEL)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in vanilla.state_dict().items()}
    for kv in ("per_iteration", "last"):
        for loops in (TRAINED_R, TEST_R):
            assert model.new_cache(2, 16, loops, kv).nbytes == \
                vanilla.new_cache(2, 16, loops, kv).nbytes
            assert model.cache_bytes_per_token(loops, kv) == \
                vanilla.cache_bytes_per_token(loops, kv)


def bounded_model(name: str, seed: int, **kw):
    return make_model(seed=seed, loop=TRAINED_R, **BOUNDED[name], **LOOPED_MODEL, **kw)


@pytest.mark.parametrize("name", list(BOUNDED))
def test_full_forward_matches_reference_above_the_trained_R(name):
    model = bounded_model(name, seed=2)
    ids = rand_ids(2, 8, seed=2)
    sources = model_sources(model, TEST_R)
    assert sources == model.depth_sources(TEST_R)
    with torch.no_grad():
        out = model(ids, loops=TEST_R, return_depth_weights=True)
    ref = naive_looped(model, ids, sources=sources, loops=TEST_R)
    assert max_diff(out.logits, ref["logits"]) <= 1e-5
    for p, (weights, _) in ref["alphas"].items():
        assert max_diff(out.depth_weights[p].weights, weights) <= 1e-5


@pytest.mark.parametrize("kv", ["per_iteration", "last"])
@pytest.mark.parametrize("name", list(BOUNDED))
def test_cached_decode_matches_reference_above_the_trained_R(name, kv):
    model = bounded_model(name, seed=3)
    ids = rand_ids(2, 8, seed=3)
    with torch.no_grad():
        logits, iters, _ = decode_run(model, ids, (3,), loops=TEST_R, kv=kv)
        full = model(ids, loops=TEST_R).logits
    ref, _ = naive_cached(model, ids, (3,), kv=kv, loops=TEST_R)
    assert max_diff(logits, ref) <= 1e-5
    assert (iters == TEST_R).all()
    if kv == "per_iteration":  # the exact cache is the full forward
        assert max_diff(logits, full) <= 1e-5


@pytest.mark.parametrize("kv", ["per_iteration", "last"])
@pytest.mark.parametrize("name", list(BOUNDED))
def test_cached_decode_under_exit_matches_reference(name, kv):
    """Tokens exit at different iterations and freeze; their later positions carry the exit
    iteration's key and mixed value, which later tokens read."""
    model = bounded_model(name, seed=4, exit_gate="true")
    ids = rand_ids(1, 9, seed=4)
    th = pick_threshold(model, ids, "entropy", loops=TEST_R)
    with torch.no_grad():
        logits, iters, _ = decode_run(model, ids, (3,), loops=TEST_R, kv=kv,
                                      exit=make_exit("entropy", th))
    ref, ref_iters = naive_cached(model, ids, (3,), kv=kv, loops=TEST_R,
                                  exit=RefExit("entropy", th))
    assert torch.equal(iters, ref_iters)
    assert len(iters.unique()) > 1  # some tokens froze early
    assert max_diff(logits, ref) <= 1e-5


def test_window_knob_is_checked_with_one_line():
    args = overrides(loop=4, policy="window", extra=("model.depth_attention.window=0",))
    with pytest.raises(ConfigError, match="window must be >= 1 iteration, got 0"):
        load_config(args)
    with pytest.raises(ConfigError, match="policy 'anchor' has knobs: none"):
        load_config(overrides(loop=4, policy="anchor", extra=("model.depth_attention.window=1",)))


def test_runs_record_their_policy_and_old_runs_keep_the_default_of_their_time(tmp_path,
                                                                              monkeypatch):
    """config.yaml names the policy a run used; a run saved with `sources: null` (before runs
    recorded it) loads with the default of that time, even after the default changes."""
    from omegaconf import OmegaConf

    from looped import build_model
    from looped.config import load_run_config
    from looped.model import depth
    from looped.training.checkpoint import save_run_config

    # (loop, the default now, the default before runs recorded their policy)
    defaults = ((4, "anchor", "same_layer"), (1, "strided", "strided"))
    for loop, now, _ in defaults:
        cfg = load_config(overrides(loop=loop, n_layers=2))
        assert cfg.model.depth_attention.sources is None  # unset: the default for the model
        save_run_config(tmp_path / f"new{loop}", cfg)
        saved = OmegaConf.load(tmp_path / f"new{loop}" / "config.yaml")
        assert saved.model.depth_attention.sources == now
        (tmp_path / f"old{loop}").mkdir()
        (tmp_path / f"old{loop}" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    # the default changes again: every saved run keeps the policy it trained with
    monkeypatch.setattr(depth, "default_policy", lambda looped: "window" if looped else "dense")
    assert build_model(load_config(overrides(loop=4, n_layers=2))).policy == "window"
    for loop, now, legacy in defaults:
        for kind, policy in (("new", now), ("old", legacy)):
            run_cfg = load_run_config(tmp_path / f"{kind}{loop}")
            assert run_cfg.model.depth_attention.sources == policy
            assert build_model(run_cfg).policy == policy
    vanilla = load_config(overrides(loop=4, n_layers=2, enabled=False))
    save_run_config(tmp_path / "vanilla", vanilla)
    assert build_model(load_run_config(tmp_path / "vanilla")).policy == "none"


LOG_SCALE = ("model.depth_attention.log_scale=true",)


def test_log_scale_changes_nothing_where_training_saw_the_source_count():
    ids = rand_ids(2, 8, seed=7)
    plain = make_model(seed=7, loop=TRAINED_R, policy="same_layer", **LOOPED_MODEL)
    scaled = make_model(seed=7, loop=TRAINED_R, policy="same_layer", extra=LOG_SCALE,
                        **LOOPED_MODEL)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, scaled(ids).logits)
        for name in ("anchor", "anchor_window", "loop_strided"):  # counts never pass training's
            kw = dict(loop=TRAINED_R, **BOUNDED[name], **LOOPED_MODEL)
            a, b = make_model(seed=8, **kw), make_model(seed=8, **kw)
            b.cfg.depth_attention.log_scale = True  # the same weights, scaled
            b._plans.clear()
            assert torch.equal(a(ids, loops=TEST_R).logits, b(ids, loops=TEST_R).logits), name


def test_log_scale_sharpens_the_first_softmax_larger_than_training_saw():
    """At the first position whose softmax has n > n_max values (its inputs still equal the
    unscaled run's), the weights are softmax(c * scores) with c = log(n) / log(n_max)."""
    import math

    ids = rand_ids(2, 8, seed=9)
    plain = make_model(seed=9, loop=TRAINED_R, policy="same_layer", **LOOPED_MODEL)
    scaled = make_model(seed=9, loop=TRAINED_R, policy="same_layer", extra=LOG_SCALE,
                        **LOOPED_MODEL)
    n_max = max(len(s) + 1 for s in plain.depth_sources(TRAINED_R))
    sources = plain.depth_sources(TEST_R)
    p = next(i for i, s in enumerate(sources) if len(s) + 1 > n_max)
    c = math.log(len(sources[p]) + 1) / math.log(n_max)
    with torch.no_grad():
        w = plain(ids, loops=TEST_R, return_depth_weights=True).depth_weights[p].weights
        got = scaled(ids, loops=TEST_R, return_depth_weights=True).depth_weights[p].weights
        full = scaled(ids, loops=TEST_R).logits
        decoded, _, _ = decode_run(scaled, ids, (3,), loops=TEST_R)
    want = torch.softmax(c * w.double().log(), dim=-1)
    assert c > 1.05 and max_diff(got, want) <= 1e-5 and max_diff(got, w) > 1e-3
    assert max_diff(decoded, full) <= 1e-5  # the exact cache serves the scaled model too


def test_log_scale_is_gqa_only_with_one_line():
    with pytest.raises(ConfigError, match="log_scale is implemented for GQA"):
        load_config(overrides(loop=4, policy="same_layer",
                              extra=(*LOG_SCALE, "model.attention=mla")))
