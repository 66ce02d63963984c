"""The `looped` command: every subcommand's help, one-line errors, and `looped generate`, whose
printed tokens must equal the model's own generate() on the same run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLI_TINY_MODEL, cli_in_process

from looped.tools.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parent.parent


def looped(*args, cwd=ROOT, timeout=300):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "looped", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _help(*argv) -> str:
    """A subcommand's help, printed by the `looped` entry point in this process (each
    subprocess would pay torch's import again)."""
    from looped.tools.cli import main

    proc = cli_in_process(main, argv)
    assert proc.returncode == 0 and proc.stderr == "", argv
    return proc.stdout


def test_help_lists_every_subcommand_and_each_lists_its_keys():
    top = looped("--help")  # the real entry point, once
    assert top.returncode == 0
    for name in SUBCOMMANDS:
        assert f"  {name} " in top.stdout
    keys = {"train": "model.d_model=", "eval": "n_samples=1024", "study": "seeds=[0,1,2]",
            "flops": "context", "generate": "temperature=0.8", "export": "check=True"}
    for name, fragment in keys.items():
        assert fragment in _help(name, "--help"), name
    for bench, fragment in (("depth", "looped_batch=16"), ("loop", "tolerance=0.005"),
                             ("decode", "recompute_tokens=512"), ("cache", "policies=")):
        assert fragment in _help("bench", bench, "--help")
    # `python -m looped.study` is `looped study`
    alias = subprocess.run([sys.executable, "-m", "looped.study", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert alias.returncode == 0 and alias.stdout == _help("study", "--help")
    # `python train.py --help` is `looped train --help`
    script = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert script.stdout == _help("train", "--help")


@pytest.mark.parametrize("args,fragment", [
    (["nope"], "unknown subcommand 'nope'; choose one of: train, eval, study"),
    (["bench"], "name the benchmark first, got none; choose one of: depth, loop"),
    (["bench", "depth", "steps=0"], "steps must be >= 1"),
    (["bench", "depth", "--steps", "5"], "argument '--steps' is not of the form key=value"),
    (["bench", "loop"], "give the checkpoint: looped bench loop ckpt="),
    (["bench", "cache", "ckpt=[x]", "policies=[]"], "policies must name at least one"),
    (["bench", "cache", "ckpt=[x]", "policies=[lastest]"], "unknown cache policy 'lastest'"),
    (["bench", "loop", "ckpt=x", "batches=[0]"], "every batch must be >= 1"),
    (["bench", "decode", "recompute_tokens=-1"], "recompute_tokens must be >= 0"),
    (["generate", "run=x", "use_cache=false", "kv=last"], "use_cache=false has none"),
    (["eval", "ckpt=x", "kv=lastest"], "unknown cache policy 'lastest'"),
    (["generate"], "give the run to sample from"),
    (["export", "run=x"], "give the run and the output directory"),
    (["export", "run=/no/such/run", "out=/tmp/x"], "/no/such/run"),
    (["export", "run=/no/such/run", "out=README.md"], "out=README.md is a file"),
    (["export", "run=/no/such/run", "out=looped"], "is not an exported model"),
    (["generate", "run=/no/such/run"], "/no/such/run"),
    (["generate", "run=x", "temperature=-1"], "temperature must be >= 0"),
])
def test_bad_input_is_one_line(args, fragment, monkeypatch):
    from looped.tools.cli import main

    monkeypatch.chdir(ROOT)  # relative paths as from the repository root
    proc = cli_in_process(main, args)  # `looped --help` above goes through the script
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _train(tmp_path, *args) -> Path:
    from looped.tools.train import main

    proc = cli_in_process(main, [*CLI_TINY_MODEL, "train.steps=3", "train.batch_size=4",
                                 "train.eval_every=3", "eval.n_samples=8", f"out_dir={tmp_path}",
                                 "name=run", *args])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp_path / "run"


def looped_here(*args):
    """`looped ARGS` in this process (`looped --help` above goes through the script)."""
    from looped.tools.cli import main

    return cli_in_process(main, args)


def _reference(run: Path, prompt: torch.Tensor, n: int, **kw) -> torch.Tensor:
    from looped import load_run

    _, model = load_run(run)
    with torch.no_grad():
        return model.generate(prompt, n, temperature=0, **kw)[0, prompt.shape[1]:]


@pytest.mark.slow
def test_generate_prints_the_models_greedy_text(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"ROMEO: line {i} of a play, said twice.\n" for i in range(300)))
    run = _train(tmp_path, "task=text", f"task.corpus={corpus}", "task.seq_len=32",
                 "model.vocab_size=256", "model.max_seq_len=64", "train.objective.loss=final",
                 "train.loop_sampling.sampler=fixed")
    proc = looped_here("generate", f"run={run}", "prompt=ROMEO: line",
                       "max_new_tokens=12", "temperature=0", "loops=3")
    assert proc.returncode == 0, proc.stderr
    from looped.data.text import ByteTokenizer

    tok = ByteTokenizer()
    prompt = tok.encode("ROMEO: line").long()[None]
    expected = tok.decode(_reference(run, prompt, 12, loops=3))
    assert proc.stdout == "ROMEO: line" + expected + "\n"
    # sampling: the same seed gives the same text, several samples are numbered
    sampled = [looped_here("generate", f"run={run}", "prompt=ROMEO:", "max_new_tokens=8",
                           "samples=2", "seed=3") for _ in range(2)]
    assert sampled[0].returncode == 0 and sampled[0].stdout == sampled[1].stdout
    assert sampled[0].stdout.count("--- sample ") == 2


@pytest.mark.slow
def test_generate_on_a_token_task_continues_a_held_out_row(tmp_path):
    run = _train(tmp_path, "task=addition", "task.digits=2", "model.vocab_size=12",
                 "model.max_seq_len=16")
    proc = looped_here("generate", f"run={run}", "max_new_tokens=3", "temperature=0",
                       "exit.criterion=max_loops", "exit.after=1")
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines())
    prompt = torch.tensor([[int(t) for t in lines["prompt"].split()]])
    got = [int(t) for t in lines["generated"].split()]
    assert len(lines["held out"].split()) == 3  # 2 + 2 digits: the first answer follows '='
    from looped.model.exit import MaxLoopsExit

    assert got == _reference(run, prompt, 3, exit=MaxLoopsExit(after=1)).tolist()
    assert "mean iterations per token: 1.00" in proc.stderr
    bad = looped_here("generate", f"run={run}", "prompt=1 2 x")
    assert bad.returncode == 2 and "space-separated token ids (0..11)" in bad.stderr
    wide = looped_here("generate", f"run={run}", "prompt=1 2 40")
    assert wide.returncode == 2 and "token ids must be in 0..11" in wide.stderr
