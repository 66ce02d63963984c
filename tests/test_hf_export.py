"""The transformers export (looped.integrations.hf): the exported model computes what looped's does.

Every exported directory is loaded back with AutoModelForCausalLM (trust_remote_code) and
compared with the LoopedLM it came from: logits to 1e-5, greedy generations token for token
(with and without the cache), left-padded batches row by row, and an export -> load -> save
round trip byte for byte. Models are tiny, with O(1) random weights (conftest.randomize_), so
every layer and every Depth-Attention mix moves the logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from safetensors.torch import load_file

from conftest import LOOPED_MODEL, make_model, max_diff, rand_ids, tiny_cfg
from looped.data import build_task
from looped.errors import ConfigError
from looped.integrations.hf.export import export_model

TOL = 1e-5

# name -> (overrides for conftest.make_model); plain and looped, with and without Depth-Attention
VARIANTS = {
    "plain": dict(enabled=False),
    "plain_da": dict(policy="strided", stride=2, window=1),
    "looped": dict(loop=3, enabled=False, **LOOPED_MODEL),
    "looped_da": dict(loop=3, policy="same_layer", **LOOPED_MODEL),
    # the other knobs the exported code implements, in one model
    "looped_da_dense_concat": dict(loop=2, policy="dense", injection="concat",
                                   init_state="embed", pos_embedding="true",
                                   tie_embeddings="false", exit_gate="true", **LOOPED_MODEL),
    "unrolled_da": dict(loop=2, policy="same_layer", share_weights="false", **LOOPED_MODEL),
}


def _export(tmp_path_factory, name: str, kw: dict):
    cfg = tiny_cfg(**kw)
    model = make_model(seed=len(name), **kw)
    out = tmp_path_factory.mktemp(name)
    export_model(cfg, model, build_task(cfg.task, split="eval"), out, check=False)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    return cfg, model, hf, out


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    return _export(tmp_path_factory, request.param, VARIANTS[request.param])


@torch.no_grad()
def test_logits_equal(exported):
    cfg, model, hf, _ = exported
    ids = rand_ids(batch=3, tokens=20, seed=7)
    assert max_diff(hf(ids).logits, model(ids).logits) <= TOL
    if cfg.model.share_weights:  # any loop count, also past the trained one
        for r in (1, cfg.loop + 2):
            assert max_diff(hf(ids, loops=r).logits, model(ids, loops=r).logits) <= TOL


@torch.no_grad()
def test_greedy_generate_equals_looped(exported):
    _, model, hf, _ = exported
    ids = rand_ids(batch=2, tokens=6, seed=3)
    ids[:, 2] = 0  # a real token, which must not be mistaken for padding
    want = model.generate(ids, 10, temperature=0)
    assert torch.equal(hf.generate(ids, max_new_tokens=10, do_sample=False), want)
    assert torch.equal(hf.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False),
                       want)
    # beam search reorders the cache's rows (LoopedCache.reorder_cache)
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(hf.generate(ids, **beams), hf.generate(ids, use_cache=False, **beams))


@torch.no_grad()
def test_left_padded_batch_gives_each_rows_result(exported):
    _, model, hf, _ = exported
    lengths = (11, 6, 2)
    width = max(lengths)
    rows = [rand_ids(batch=1, tokens=n, seed=20 + n)[0] for n in lengths]
    # padding holds random tokens, not zeros: the mask alone must keep them out
    ids = rand_ids(batch=len(rows), tokens=width, seed=99)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    logits = hf(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        assert max_diff(logits[i, width - len(row):], alone) <= TOL
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for i, row in enumerate(rows):
        want = model.generate(row[None], 8, temperature=0)[0, len(row):]
        assert torch.equal(out[i, width:], want)


@torch.no_grad()
def test_generate_at_another_loop_count():
    kw = VARIANTS["looped_da"]
    model = make_model(seed=5, **kw)
    cfg = tiny_cfg(**kw)
    from looped.integrations.hf.export import hf_config
    from looped.integrations.hf.modeling_looped import LoopedForCausalLM

    hf = LoopedForCausalLM(hf_config(cfg, model)).eval()
    hf.load_state_dict(model.state_dict())
    ids = rand_ids(batch=2, tokens=5, seed=4)
    want = model.generate(ids, 6, temperature=0, loops=5)
    assert torch.equal(hf.generate(ids, max_new_tokens=6, do_sample=False, loops=5), want)


BOUNDED = {  # the looped models' bounded source policies, with knobs off their defaults
    "anchor": dict(policy="anchor"),
    "window": dict(policy="window", extra=("model.depth_attention.window=2",)),
    "anchor_window": dict(policy="anchor_window", extra=("model.depth_attention.window=2",)),
    "loop_strided": dict(policy="loop_strided"),
    "loop_strided_s2": dict(policy="loop_strided", stride=2),
}


@torch.no_grad()
@pytest.mark.parametrize("name", list(BOUNDED))
def test_bounded_policies_export_and_run_beyond_the_trained_R(name):
    """The exported code's own source lists equal looped's, and its logits the model's, at an R
    above the trained one."""
    from looped.integrations.hf.export import hf_config
    from looped.integrations.hf.modeling_looped import LoopedForCausalLM, depth_sources

    kw = dict(loop=3, **BOUNDED[name], **LOOPED_MODEL)
    model, cfg = make_model(seed=6, **kw), tiny_cfg(**kw)
    hf = LoopedForCausalLM(hf_config(cfg, model)).eval()
    hf.load_state_dict(model.state_dict())
    for loops in (3, 7):
        assert depth_sources(hf.config, loops) == model.depth_sources(loops)
    ids = rand_ids(batch=2, tokens=6, seed=6)
    got = hf(ids, loops=7).logits
    assert (got - model(ids, loops=7).logits).abs().max() <= TOL


def test_cache_contract(exported):
    """One slot per depth position, each the size of a vanilla layer's (K, V): the same bytes
    per token as looped's exact cache; a cache serves only the loop count it was made for."""
    cfg, model, hf, _ = exported
    ids = rand_ids(batch=2, tokens=9, seed=1)
    out = hf(ids, use_cache=True)
    cache = out.cache
    layout = model.layout()
    assert len(cache) == layout.n_positions
    assert cache.slots_per == "depth position" and cache.exit.startswith("none")
    assert cache.get_seq_length() == 9
    per_token = sum(k.numel() + v.numel() for k, v in zip(cache.keys, cache.values)) * 4 / (2 * 9)
    ours = model.new_cache(1, 1).nbytes  # one row, one token
    assert per_token == ours
    if cfg.model.share_weights:
        with pytest.raises(ValueError, match="made for"):
            hf(ids[:, :1], cache=cache, loops=cfg.loop + 1)


def test_export_load_export_round_trips(exported, tmp_path):
    _, _, hf, out = exported
    hf.save_pretrained(tmp_path)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text()) == \
        json.loads((tmp_path / "config.json").read_text())
    for code in ("modeling_looped.py", "configuration_looped.py"):
        assert (out / code).read_bytes() == (tmp_path / code).read_bytes()
    again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    ids = rand_ids(batch=2, tokens=8, seed=2)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)


def test_exported_directory_is_self_contained(exported):
    """The modeling code imports torch, transformers and its own configuration only."""
    *_, out = exported
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoConfig": "configuration_looped.LoopedConfig",
                               "AutoModelForCausalLM": "modeling_looped.LoopedForCausalLM"}
    for code in ("modeling_looped.py", "configuration_looped.py"):
        text = (out / code).read_text()
        assert "looped." not in "".join(line for line in text.splitlines()
                                         if line.startswith(("import", "from")))


def test_table_tokenizer_round_trips(exported):
    *_, out = exported
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    # every id the model can emit has a name, also those the task never uses
    assert tok.vocab_size == json.loads((out / "config.json").read_text())["vocab_size"]
    ids = rand_ids(batch=1, tokens=10, seed=8, vocab=tok.vocab_size)[0].tolist()
    assert tok(tok.decode(ids))["input_ids"] == ids


@pytest.mark.parametrize("extra, fragment", [
    (dict(policy="dense", mix="raw"), "mix=raw"),
    (dict(enabled=False, extra=("model.cross_layer.method=denseformer",)), "cross_layer"),
    (dict(policy="strided", extra=("model.attention=mla",)), "attention=mla"),
    (dict(loop=2, policy="same_layer", extra=("model.depth_attention.log_scale=true",),
          **LOOPED_MODEL), "log_scale"),
])
def test_unsupported_models_are_refused(extra, fragment, tmp_path):
    cfg = tiny_cfg(**extra)
    model = make_model(**extra)
    with pytest.raises(ConfigError, match=fragment):
        export_model(cfg, model, build_task(cfg.task, split="eval"), tmp_path)


def test_byte_tokenizer_is_utf8_bytes(tmp_path):
    from looped.integrations.hf.tokenization_looped import LoopedByteTokenizer

    LoopedByteTokenizer().save_pretrained(tmp_path)
    tok = LoopedByteTokenizer.from_pretrained(tmp_path)
    text = "ROMEO: Ā é\n"
    assert tok(text)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text


@pytest.mark.slow
def test_bpe_text_model_exports_its_tokenizers_file(tmp_path):
    """A BPE run's tokenizer travels as tokenizer.json: transformers encodes text to the ids
    looped trained on, with no remote code."""
    kw = dict(vocab_size=300, extra=("task=text", "task.tokenizer=bpe", "task.bpe_vocab=300",
                                     "task.seq_len=16"))
    cfg, model = tiny_cfg(**kw), make_model(**kw)
    task = build_task(cfg.task, split="eval")
    info = export_model(cfg, model, task, tmp_path)
    assert info["tokenizer"] == "BPE (tokenizer.json)" and info["max_abs_logit_error"] <= TOL
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "KING RICHARD III:\nNow is the winter of our discontent"
    assert tok(text)["input_ids"] == task.encode(text).tolist()
    assert tok.decode(task.encode(text).tolist()) == text
