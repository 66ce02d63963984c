"""`looped lm-eval`: lm-evaluation-harness through looped's own forward. On a GQA run its every
log-likelihood equals the exported model's under lm-eval's `hf` model (1e-5); MLA and
cross-layer runs, which export cannot take, score and equal looped's forward recomputed here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import CLI_TINY_MODEL
from looped import load_run
from looped.tools.train import main as train_main
from test_hf_lm_eval import QUICK, TEXT, _log_likelihood, _train_and_export, _write_task

pytestmark = pytest.mark.slow
enc = lambda s: list(s.encode("utf-8"))  # noqa: E731  (the byte tokenizer)


def _native(run, tasks_dir, names, batch_size=2, **kw):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from looped.lm_eval_model import LoopedEvalLM

    lm = LoopedEvalLM(str(run), batch_size=batch_size, device="cpu", **kw)
    return simple_evaluate(model=lm, tasks=names, log_samples=True,
                           task_manager=TaskManager(include_path=str(tasks_dir)))


def _by_doc(res, task):
    return {s["doc"]["text"]: s for s in res["samples"][task]}


def test_native_equals_the_hf_export_path_on_gqa(tmp_path_factory, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _, out = _train_and_export(tmp_path_factory, "gqa", [*CLI_TINY_MODEL, *TEXT])
    run = out.parent / "gqa"
    names = _write_task(tmp_path)
    hf = simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True",
                         tasks=names, task_manager=TaskManager(include_path=str(tmp_path)),
                         batch_size=2, device="cpu", log_samples=True)
    ours = _native(run, tmp_path, names, batch_size=3)
    for task in ("looped_ll", "looped_rolling"):
        theirs, mine = _by_doc(hf, task), _by_doc(ours, task)
        assert theirs.keys() == mine.keys()
        for doc in theirs:
            a, b = theirs[doc]["resps"][0][0], mine[doc]["resps"][0][0]
            a = a[0] if isinstance(a, (list, tuple)) else a
            b = b[0] if isinstance(b, (list, tuple)) else b
            # 1e-5, or 1e-6 relative for whole texts: hf sums fp32 log-probs, looped fp64 ones
            assert abs(a - b) <= max(1e-5, 1e-6 * abs(a)), (task, a, b)
    for doc, s in _by_doc(hf, "looped_gen").items():
        assert _by_doc(ours, "looped_gen")[doc]["filtered_resps"] == s["filtered_resps"]
    # batching changes nothing
    one = _native(run, tmp_path, ["looped_ll"], batch_size=1)
    for doc, s in _by_doc(one, "looped_ll").items():
        assert abs(s["resps"][0][0][0] - _by_doc(ours, "looped_ll")[doc]["resps"][0][0][0]) < 1e-5


@pytest.mark.parametrize("variant", [
    ["model.attention=mla", "model.mla.kv_rank=24", "model.mla.rope_dim=8",
     "model.mla.nope_dim=16", "model.mla.v_dim=12"],
    ["model.cross_layer.method=denseformer", "model.depth_attention.enabled=false"],
], ids=["mla", "denseformer"])
def test_native_scores_runs_export_cannot_take(variant, tmp_path):
    root = tmp_path / "runs"
    args = [*CLI_TINY_MODEL, *TEXT, *variant, *QUICK, f"out_dir={root}", "name=r", "threads=1"]
    assert train_main(args) == 0
    _, model = load_run(root / "r")
    names = _write_task(tmp_path)
    res = _native(root / "r", tmp_path, ["looped_ll"])
    for s in res["samples"]["looped_ll"]:
        with torch.no_grad():
            want = _log_likelihood(model, enc(s["doc"]["context"]), enc(s["doc"]["continuation"]))
        assert s["resps"][0][0][0] == pytest.approx(want, abs=1e-5)
    assert names


@pytest.mark.parametrize("args, message", [
    (["tasks=[x]"], "give a run"),
    (["run=/nonexistent", "tasks=[x]"], "no such run"),
    (["run=.", "tasks=[x]", "batch_size=0"], "batch_size must be >= 1"),
])
def test_cli_bad_input_is_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "looped", "lm-eval", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
