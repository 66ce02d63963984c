"""Plugins: a task written in the user's own file, outside the package, registered through
`imports=[...]` and trained and evaluated through the real CLI from another directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CLI_TINY_MODEL

ROOT = Path(__file__).resolve().parent.parent

USER_TASK = '''
from dataclasses import dataclass

import torch
from looped.data import IGNORE, Batch, Task, register_task


@register_task("first_token")
class FirstToken(Task):
    """Every position after the first predicts the first token; sequences of 4 * span."""

    @dataclass
    class Config:
        span: int = 2  # the task's own knob: sequence length / 4

    def __init__(self, span: int = Config.span, **_):
        self.vocab_size, self.seq_len = 16, 4 * span

    def sample(self, batch_size, generator):
        x = torch.randint(0, 16, (batch_size, self.seq_len), generator=generator)
        targets = torch.full_like(x, IGNORE)
        targets[:, 1:] = x[:, :1]
        return Batch(x, targets)
'''
ARGS = CLI_TINY_MODEL + ["task=first_token", "task.span=3", "train.steps=4", "train.batch_size=8",
                         "eval.n_samples=16", "train.eval_every=4"]


def cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_a_task_from_a_user_file_trains_and_evaluates_through_the_cli(tmp_path):
    (tmp_path / "my_tasks.py").write_text(USER_TASK)
    proc = cli(ROOT / "train.py", "imports=[my_tasks.py]", *ARGS, "out_dir=runs", "name=mine",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "task=first_token" in proc.stdout and "held-out accuracy by loop count" in proc.stdout
    run = tmp_path / "runs" / "mine"
    # the saved config names the plugin by absolute path, so any directory can load the run,
    # and holds the task's own knob
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["imports"] == [str(tmp_path / "my_tasks.py")]
    assert saved["task"] == {"name": "first_token", "span": 3, "eval": {"span": None}}
    ev = cli("-m", "looped", "eval", f"ckpt={run}", "loops=[1,2]", "n_samples=16",
             "threads=1", cwd=ROOT)
    assert ev.returncode == 0, ev.stderr[-2000:]
    sweep = json.loads((run / "eval" / "loop_sweep.json").read_text())
    assert set(sweep["mine"]["results"]) == {"1", "2"}


@pytest.mark.slow
def test_a_module_on_the_python_path_is_a_plugin_too(tmp_path):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text(USER_TASK)
    proc = cli(ROOT / "train.py", "imports=[userpkg.tasks]", *ARGS, f"out_dir={tmp_path}",
               "name=mod", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("imports,fragment", [
    ("imports=[no_such_module]", "no module named 'no_such_module' on the Python path"),
    ("imports=[missing_file.py]", "plugin file missing_file.py does not exist"),
    ("imports=[a", "bad value in 'imports=[a'"),
])
def test_bad_imports_are_one_line(tmp_path, imports, fragment):
    proc = cli(ROOT / "train.py", imports, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("override,fragment", [
    ("task.spam=3", "unknown config key 'task.spam' (task 'first_token' has knobs: span); "
                    "did you mean task.span"),
    ("task.span=x", "bad value in 'task.span=x'"),
    ("task=second_token", "unknown task preset 'second_token'"),
])
def test_a_plugin_task_knob_is_validated_against_its_own_dataclass(tmp_path, override, fragment):
    (tmp_path / "my_tasks.py").write_text(USER_TASK)
    proc = cli(ROOT / "train.py", "imports=[my_tasks.py]", "task=first_token", override,
               cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


USER_ATTENTION = '''
import torch

from looped.model.attention import ATTENTION_KINDS, Attention
from looped.model.recurrence import INJECTIONS, Injection


@ATTENTION_KINDS.register("gqa_doubled")
class DoubledAttention(Attention):
    """GQA whose output is doubled: one file, one registration."""

    def forward(self, x, ctx, pos, value_hook=None):
        return 2 * super().forward(x, ctx, pos, value_hook)


@INJECTIONS.register("half_add")
class HalfAdd(Injection):
    def __call__(self, state, e, adapter):
        return state + 0.5 * e
'''


def test_an_attention_kind_and_an_injection_from_a_user_file(tmp_path):
    """A new attention kind (and an injection) is one file with one registration each, chosen
    by name: the plugin kind's model equals GQA's with every output projection doubled, and the
    plugin injection's equals `add` with the prelude's output halved (no prelude: the
    embedding)."""
    import torch

    from looped import build_model, load_config

    plugin = tmp_path / "my_attention.py"
    plugin.write_text(USER_ATTENTION)
    tiny = ["loop=3", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
            "model.head_dim=16", "model.ffn_dim=64", "model.vocab_size=24"]
    ids = torch.randint(0, 24, (2, 7), generator=torch.Generator().manual_seed(5))

    mine = build_model(load_config([f"imports=[{plugin}]", "model.attention=gqa_doubled", *tiny]))
    ref = build_model(load_config(tiny))
    ref.load_state_dict(mine.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("attn.o_proj.weight"):
                p.mul_(2)
    torch.testing.assert_close(mine(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)

    # an untied head, so it does not read the embedding; the zero state, so the input is all
    # that enters (the defaults start from the embedding and inject nothing)
    untied = [*tiny, "model.tie_embeddings=false", "model.init_state=zeros",
              "model.pos_embedding=false"]
    half = build_model(load_config([f"imports=[{plugin}]", "model.injection=half_add", *untied]))
    add = build_model(load_config([*untied, "model.injection=add"]))
    add.load_state_dict(half.state_dict())
    with torch.no_grad():
        add.embed.weight.mul_(0.5)
    torch.testing.assert_close(half(ids).logits, add(ids).logits, rtol=1e-5, atol=1e-5)
