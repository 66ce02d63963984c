"""Checkpoints: round trip, clear errors for bad files, exact resume, and the evaluate CLI."""

import csv
from pathlib import Path

import pytest
from conftest import CLI_TINY_MODEL, assert_same_checkpoint, cli_in_process
import torch

from looped import build_model, load_config
from looped.training.checkpoint import (CheckpointError, load_state, load_weights,
                                        resolve_checkpoint, save_checkpoint)

ROOT = Path(__file__).resolve().parent.parent
TINY = CLI_TINY_MODEL + ["train.batch_size=16", "eval.n_samples=32", "eval.loops=[1,2]"]


def tiny_model(*extra):
    torch.manual_seed(0)
    return build_model(load_config(TINY + list(extra)))


def test_round_trip_restores_weights_and_state(tmp_path):
    model = tiny_model()
    state = {"step": 7, "torch_rng": torch.get_rng_state(), "history": [{"loss": 1.5}]}
    ckpt = save_checkpoint(tmp_path, 7, model, state)
    assert resolve_checkpoint(tmp_path) == ckpt
    other = tiny_model("seed=1")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    load_weights(other, ckpt)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    loaded = load_state(ckpt)
    assert loaded["step"] == 7 and torch.equal(loaded["torch_rng"], state["torch_rng"])


def test_keeps_only_the_newest_checkpoints(tmp_path):
    model = tiny_model()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep=2)
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("step_*"))
    assert names == ["step_00000003", "step_00000004"]
    assert resolve_checkpoint(tmp_path).name == "step_00000004"


def test_pruning_keeps_the_checkpoint_just_written_after_a_rewind(tmp_path):
    """A run rewound with resume_from writes lower steps than it has: pruning goes by when a
    checkpoint was written, so the new one (named by `latest`) survives."""
    model = tiny_model()
    for step in (8, 10, 6):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep=2)
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("step_*"))
    assert names == ["step_00000006", "step_00000010"]
    assert resolve_checkpoint(tmp_path).name == "step_00000006"
    save_checkpoint(tmp_path, 7, model, {"step": 7}, keep=1)
    assert [p.name for p in (tmp_path / "ckpt").glob("step_*")] == ["step_00000007"]


def test_corrupted_weights_give_one_line_error(tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, tiny_model(), {"step": 1})
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny_model(), ckpt)
    assert "truncated or corrupted" in str(err.value) and "\n" not in str(err.value)


def test_corrupted_state_gives_one_line_error(tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, tiny_model(), {"step": 1})
    (ckpt / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        load_state(ckpt)
    assert "\n" not in str(err.value)


def test_other_architecture_names_the_mismatch(tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, tiny_model(), {"step": 1})
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny_model("model.ffn_dim=96"), ckpt)
    msg = str(err.value)
    assert "shape mismatch core.0.mlp.down.weight" in msg
    assert "checkpoint (32, 64) vs model (32, 96)" in msg and "\n" not in msg
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny_model("model.n_coda=1"), ckpt)
    assert "missing coda.0" in str(err.value)


def test_state_file_loads_without_pickled_code(tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, tiny_model(), {"step": 1})

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"step": Evil()}, ckpt / "state.pt")
    with pytest.raises(CheckpointError):
        load_state(ckpt)  # weights_only=True refuses arbitrary classes


def _train(*args):
    """train.py's main in this process; the printed loss of each step."""
    from looped.tools.train import main

    proc = cli_in_process(main, [*TINY, *args])
    assert proc.returncode == 0, proc.stderr
    return {int(line.split()[1]): float(line.split()[3]) for line in proc.stdout.splitlines()
            if line.startswith("step ")}


def test_resume_continues_exactly(tmp_path):
    common = ["train.steps=6", "train.eval_every=3", "train.log_every=1",
              "train.loop_sampling.sampler=uniform", f"out_dir={tmp_path}"]
    full = _train(*common, "name=full")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    resumed = _train(*common, "name=resumed",
                     f"resume_from={tmp_path / 'full' / 'ckpt' / 'step_00000003'}")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == full[step], (step, resumed[step], full[step])
    assert_same_checkpoint(tmp_path / "full" / "ckpt" / "step_00000006",
                           tmp_path / "resumed" / "ckpt" / "step_00000006")


def test_evaluate_writes_csv_json_and_png(tmp_path):
    _train("train.steps=2", "train.eval_every=2", f"out_dir={tmp_path}", "name=run")
    out = tmp_path / "sweep"
    from looped.tools.cli import main

    proc = cli_in_process(main, ["eval", f"ckpt={tmp_path / 'run'}", "loops=[1,3]",
                                 "n_samples=16", f"out={out}", "threads=1"])
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out / "loop_sweep.csv")))
    assert [int(r["loops"]) for r in rows] == [1, 3]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    assert all(float(r["loss"]) > 0.0 for r in rows)
    assert (out / "loop_sweep.json").is_file()
    assert (out / "loop_sweep.png").read_bytes()[:4] == b"\x89PNG"
