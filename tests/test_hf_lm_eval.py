"""Trained runs through `looped export`, and the exported text model through lm-evaluation-harness.

Two runs train for a few steps: the roots staircase (`python train.py recipe=roots_staircase
loop=8`, the main job until it became prefix sums, whose 2-token attention window the exported
model does not implement) and a byte-level text model. Both export through the `looped export` command, load with
transformers and decode as looped does. lm-eval then scores the text model offline on a task
written here (a JSONL file and three YAMLs: rolling log-likelihood, log-likelihood and
generate_until), and every number it reports is recomputed from looped's own model.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (CLI_TINY_MODEL, continuation_log_likelihood, max_diff, rand_ids,
                      write_offline_tasks)
from looped import load_run
from looped.tools.export import main as export_main
from looped.tools.train import main as train_main

QUICK = ["train.steps=4", "train.batch_size=8", "train.eval_every=4", "eval.n_samples=8",
         "train.log_every=2"]
TEXT = ["task=text", "model.vocab_size=256", "task.seq_len=64", "model.max_seq_len=160",
        "train.objective.loss=final", "train.loop_sampling.sampler=fixed",
        "model.depth_attention.enabled=true"]
DOCS = ["ROMEO:\nBut soft, what light through yonder window breaks?",
        "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?",
        "HAMLET:\nTo be, or not to be, that is the question."]


def _train_and_export(tmp_path_factory, name: str, args: list[str]):
    root = tmp_path_factory.mktemp(name)
    assert train_main([*args, *QUICK, f"out_dir={root}", f"name={name}", "threads=1"]) == 0
    out = root / "hf"
    assert export_main([f"run={root / name}", f"out={out}"]) == 0
    return load_run(root / name)[1], out


@pytest.fixture(scope="module")
def roots_staircase(tmp_path_factory):
    return _train_and_export(tmp_path_factory, "main", ["recipe=roots_staircase", "loop=8"])


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return _train_and_export(tmp_path_factory, "text", [*CLI_TINY_MODEL, *TEXT])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["roots_staircase", "text_model"])
def test_trained_runs_export_and_decode_as_looped(which, request):
    model, out = request.getfixturevalue(which)  # trains: outside no_grad
    with torch.no_grad():
        _decodes_as_looped(model, out)


def _decodes_as_looped(model, out):
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = rand_ids(batch=2, tokens=16, seed=11, vocab=model.cfg.vocab_size)
    ids[:, 3] = 0  # a real token, which must not be mistaken for padding
    assert max_diff(hf(ids).logits, model(ids).logits) <= 1e-5
    want = model.generate(ids, 12, temperature=0)
    assert torch.equal(hf.generate(ids, max_new_tokens=12, do_sample=False), want)
    assert torch.equal(hf.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False),
                       want)


def _write_task(tmp_path):
    # contexts end before a space: lm-eval moves a context's trailing space to the continuation
    rows = [{"text": d, "context": d[:d.rindex(" ", 0, len(d) // 2)],
             "continuation": d[d.rindex(" ", 0, len(d) // 2):]} for d in DOCS]
    tasks = {
        "looped_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                           "doc_to_target": "{{text}}",
                           "metric_list": [{"metric": "bits_per_byte"}]},
        "looped_ll": {"output_type": "loglikelihood", "doc_to_text": "{{context}}",
                      "doc_to_target": "{{continuation}}", "target_delimiter": "",
                      "metric_list": [{"metric": "perplexity"}]},
        "looped_gen": {"output_type": "generate_until", "doc_to_text": "{{context}}",
                       "doc_to_target": "{{continuation}}", "target_delimiter": "",
                       "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12,
                                             "do_sample": False},
                       "metric_list": [{"metric": "exact_match"}]},
    }
    return write_offline_tasks(tmp_path, rows, tasks)


@pytest.mark.slow
@torch.no_grad()
def test_lm_eval_scores_the_exported_text_model(text_model, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, out = text_model
    names = _write_task(tmp_path)
    res = simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True",
                          tasks=names, task_manager=TaskManager(include_path=str(tmp_path)),
                          batch_size=2, device="cpu", log_samples=True)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    enc = lambda s: list(s.encode("utf-8"))  # noqa: E731
    assert tok(DOCS[0])["input_ids"] == enc(DOCS[0])

    # rolling: every byte scored, the first after the prefix token (bos, the NUL byte); lm-eval's
    # bits per byte = -sum(ll) / sum(bytes) / ln 2 is looped's own bits per byte on that text
    ll = sum(continuation_log_likelihood(model, [tok.bos_token_id], enc(d)) for d in DOCS)
    ours = -ll / sum(len(enc(d)) for d in DOCS) / math.log(2)
    theirs = res["results"]["looped_rolling"]["bits_per_byte,none"]
    assert theirs == pytest.approx(ours, rel=1e-5)

    for s in res["samples"]["looped_ll"]:
        want = continuation_log_likelihood(model, enc(s["doc"]["context"]),
                                           enc(s["doc"]["continuation"]))
        assert s["resps"][0][0][0] == pytest.approx(want, abs=1e-4)

    for s in res["samples"]["looped_gen"]:
        ctx = torch.tensor([enc(s["doc"]["context"])])
        new = model.generate(ctx, 12, temperature=0)[0, ctx.shape[1]:].tolist()
        text = bytes(new).decode("utf-8", errors="replace").split("\n")[0]
        assert s["filtered_resps"][0] == text
