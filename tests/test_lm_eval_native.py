"""`looped lm-eval`: lm-evaluation-harness through looped's own forward (looped.integrations.lm_eval_model).

- On a byte-level GQA run, every log-likelihood (per request and rolling, with contexts and
  texts longer than model.max_seq_len) equals the HF-export path's, `looped export` scored by
  lm-eval's `hf` model, to 1e-5; greedy generations are the same text.
- Batch sizes 1 and 4 give the same numbers, also with adaptive exit and a `last` KV cache,
  which score as looped's cached decode recomputed here.
- An MLA run and a DenseFormer run, which export cannot take, score end to end through the
  `looped lm-eval` command on an offline task, equal to looped's forward recomputed here.
- Bad input is a one-line error and a non-zero exit code.
"""

from __future__ import annotations

import functools
import json
import math
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import CLI_TINY_MODEL, continuation_log_likelihood, write_offline_tasks
from looped import load_run
from looped.errors import cli_main
from looped.tools.export import main as export_main
from looped.tools.lm_eval import main as lm_eval_main
from looped.tools.train import main as train_main

MAX_LEN = 32  # model.max_seq_len: the strings below run past it
QUICK = ["train.steps=2", "train.batch_size=4", "train.eval_every=2", "eval.n_samples=4",
         "train.log_every=1", "threads=1"]
TEXT = ["task=text", "model.vocab_size=256", "task.seq_len=24", f"model.max_seq_len={MAX_LEN}",
        "train.objective.loss=final", "train.loop_sampling.sampler=fixed",
        "model.depth_attention.enabled=true"]
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789 .,;:!?'\nééλ→"
enc = lambda s: list(s.encode("utf-8"))  # noqa: E731  (the byte tokenizer)


def _text(rng: random.Random, n: int, alphabet: str = ALPHABET) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _requests():
    """(loglikelihood, loglikelihood_rolling, generate_until) Instances on random-ish strings:
    empty and trailing-space contexts, contexts and texts shorter than, as long as and longer
    than max_seq_len (in bytes; the non-ASCII characters take two or three)."""
    from lm_eval.api.instance import Instance

    rng = random.Random(0)
    pairs = [("", _text(rng, 5)), (_text(rng, 7) + " ", _text(rng, 3))]
    pairs += [(_text(rng, n), _text(rng, m)) for n, m in ((3, 1), (12, 9), (30, 4), (70, 6),
                                                            (20, 20))]
    texts = [_text(rng, n) for n in (1, 9, 31, 32, 33, 64, 90)]
    gen = [(_text(rng, n), {"until": [stop], "max_gen_toks": 6, "do_sample": False})
           for n, stop in ((4, "\n"), (10, "a"), (10, "e"), (50, "\n"))]
    make = lambda kind, args: [Instance(kind, {}, a, i) for i, a in enumerate(args)]  # noqa: E731
    return (make("loglikelihood", pairs), make("loglikelihood_rolling", [(t,) for t in texts]),
            make("generate_until", gen))


def _train(root, name: str, extra: list[str] = ()):
    assert train_main([*CLI_TINY_MODEL, *TEXT, *extra, *QUICK, f"out_dir={root}",
                       f"name={name}"]) == 0
    return root / name


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """A trained byte-level GQA run and its export."""
    root = tmp_path_factory.mktemp("gqa")
    run = _train(root, "gqa")
    assert export_main([f"run={run}", f"out={root / 'hf'}"]) == 0
    return run, root / "hf"


def _native(run, **kw):
    from looped.integrations.lm_eval_model import LoopedEvalLM

    return LoopedEvalLM(str(run), device="cpu", **kw)


def _scores(lm, ll, rolling) -> list[float]:
    return [v for v, _ in lm.loglikelihood(ll)] + lm.loglikelihood_rolling(rolling)


@pytest.mark.slow
def test_native_equals_the_hf_export_path_on_gqa(gqa):
    from lm_eval.models.huggingface import HFLM

    run, out = gqa
    ll, rolling, gen = _requests()
    # fp64 log-softmax and sums on the hf side too: both then differ by the fp32 forward only
    hf = HFLM(pretrained=str(out), trust_remote_code=True, batch_size=3, device="cpu",
              softmax_dtype="float64")
    ours = _native(run, batch_size=3)
    assert hf.max_length == ours.max_length == MAX_LEN
    theirs, mine = _scores(hf, ll, rolling), _scores(ours, ll, rolling)
    assert min(abs(v) for v in mine) > 1  # untrained bytes: a few nats each, not zeros
    assert max(abs(a - b) for a, b in zip(theirs, mine)) <= 1e-5, (theirs, mine)
    assert [g for _, g in hf.loglikelihood(ll)] == [g for _, g in ours.loglikelihood(ll)]
    assert hf.generate_until(gen) == ours.generate_until(gen)


@pytest.mark.slow
def test_batching_changes_nothing(gqa):
    run, _ = gqa
    ll, rolling, gen = _requests()
    one, four = _native(run, batch_size=1), _native(run, batch_size=4)
    a, b = _scores(one, ll, rolling), _scores(four, ll, rolling)
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5
    assert one.generate_until(gen) == four.generate_until(gen)


@pytest.mark.slow
def test_registered_with_lm_eval(gqa):
    from lm_eval.api.registry import get_model

    from looped.integrations.lm_eval_model import LoopedEvalLM

    run, _ = gqa  # the strings lm_eval --model_args and simple_evaluate pass
    lm = get_model("looped").create_from_arg_string(
        f"run={run},loops=3", {"batch_size": "auto", "max_batch_size": None, "device": "cpu"})
    assert isinstance(lm, LoopedEvalLM) and lm.loops == 3 and lm.batch_size >= 1


@pytest.mark.slow
@torch.no_grad()
def test_exit_and_last_cache_score_as_looped_decodes(gqa):
    from looped.model.exit import build_exit

    run, _ = gqa
    ll, _, _ = _requests()
    ll = ll[2:]  # non-empty contexts that fit: the prefix and truncation are pinned above
    # latent: a relative state change, far from its threshold in fp32 noise (a KL near 1e-4 is
    # not: batch shapes then flip exits); some tokens exit early, some run all 4 iterations
    kw = dict(loops=4, exit="latent", threshold=0.1, kv="last")
    got = [[v for v, _ in _native(run, batch_size=b, **kw).loglikelihood(ll)] for b in (1, 4)]
    cfg, model = load_run(run, ["exit.criterion=latent", "exit.threshold=0.1"])
    for r, a, b in zip(ll, *got):
        context, continuation = enc(r.args[0]), enc(r.args[1])
        ids = torch.tensor([(context + continuation)[-(MAX_LEN + 1):]])
        out = model.cached_forward(ids[:, :-1], kv="last", loops=4, exit=build_exit(cfg.exit))
        lp = F.log_softmax(out.logits[0].double(), -1)[-len(continuation):]
        want = float(lp.gather(1, ids[0, -len(continuation):, None]).sum())
        assert abs(a - want) <= 1e-5 and abs(b - want) <= 1e-5, (a, b, want)


def _write_task(tmp_path, rows: list[dict]) -> None:
    """An offline lm-eval task pair over a JSONL file: per-request and rolling log-likelihood."""
    write_offline_tasks(tmp_path, rows, {
        "native_ll": {"output_type": "loglikelihood", "doc_to_text": "{{context}}",
                      "doc_to_target": "{{continuation}}", "target_delimiter": "",
                      "metric_list": [{"metric": "perplexity"}]},
        "native_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                           "doc_to_target": "{{text}}",
                           "metric_list": [{"metric": "bits_per_byte"}]},
    })


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    ["model.attention=mla", "model.mla.kv_rank=24", "model.mla.rope_dim=8",
     "model.mla.nope_dim=16", "model.mla.v_dim=12"],
    ["model.cross_layer.method=denseformer", "model.depth_attention.enabled=false"],
], ids=["mla", "denseformer"])
def test_the_command_scores_runs_export_cannot_take(variant, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    # index only the task directory, not lm-eval's ~15k built-in tasks (seconds per call)
    monkeypatch.setattr("lm_eval.tasks.TaskManager",
                        functools.partial(TaskManager, include_defaults=False))
    run = _train(tmp_path / "runs", "r", variant)
    rng = random.Random(1)
    ascii = ALPHABET[:-4]  # one byte a character: each text fits one window (windows: above)
    rows = [{"text": _text(rng, n, ascii), "context": _text(rng, n, ascii),
             "continuation": _text(rng, 4, ascii)} for n in (5, 11, 17, 23)]
    _write_task(tmp_path, rows)
    out = tmp_path / "scores.json"
    assert lm_eval_main([f"run={run}", "tasks=native_ll,native_rolling", "device=cpu",
                         "batch_size=3", f"include_path={tmp_path}", f"out={out}"]) == 0
    results = json.loads(out.read_text())["results"]
    _, model = load_run(run)
    with torch.no_grad():
        ll = [continuation_log_likelihood(model, enc(r["context"]), enc(r["continuation"]))
              for r in rows]
        rolled = [continuation_log_likelihood(model, [0], enc(r["text"])) for r in rows]
    perplexity = math.exp(-sum(ll) / len(ll))
    bits_per_byte = -sum(rolled) / sum(len(enc(r["text"])) for r in rows) / math.log(2)
    assert results["native_ll"]["perplexity,none"] == pytest.approx(perplexity, rel=1e-6)
    assert results["native_rolling"]["bits_per_byte,none"] == pytest.approx(bits_per_byte,
                                                                            rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["tasks=x"], "give a run and tasks"),
    (["run={run}"], "give a run and tasks"),
    (["run={tmp}/nope", "tasks=x"], "does not exist"),
    (["run={tmp}", "tasks=x"], "no checkpoint found"),  # a directory, not a run
    (["run={run}", "tasks=x", "batch_size=-1"], "batch_size must be >= 0"),
    (["run={run}", "tasks=x", "loops=0"], "loops must be >= 1"),
    (["run={run}", "tasks=x", "limit=many"], "limit"),
    (["run={run}", "tasks=x", "device=tpu"], "unknown device"),
    (["run={run}", "tasks=x", "kv=all"], "cache policy"),
    (["run={run}", "tasks=no_such_task"], "unknown lm-eval task(s): no_such_task"),
])
def test_bad_input_is_one_line(args, message, gqa, tmp_path, capsys, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr("lm_eval.tasks.TaskManager",  # an empty index: no task is known
                        functools.partial(TaskManager, include_defaults=False))
    run, _ = gqa
    with pytest.raises(SystemExit) as e:
        cli_main(lm_eval_main, [a.format(run=run, tmp=tmp_path) for a in args])
    assert e.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_the_subcommand_is_wired():
    proc = subprocess.run([sys.executable, "-m", "looped", "lm-eval", "tasks=x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: give a run and tasks: looped lm-eval run=runs/NAME tasks=TASK[,TASK]"]
