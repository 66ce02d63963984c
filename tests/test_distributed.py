"""Data-parallel training through the real CLI: `torchrun --nproc_per_node=2 train.py ...` under
DDP and FSDP2 (gloo, CPU) trains exactly as `python train.py ...` on one process does."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from looped.training.distributed import DistEnv, shard_batch
from looped.data.tasks import Batch

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# A tiny model with a prelude and a coda (so FSDP shards blocks, the core and the root), R drawn
# per step, no warmup and a large lr so that four steps move the weights visibly, and a clip
# below the gradient norms so that clipping (on the global gradient) acts at every step. The
# task (a plugin) scores a different number of tokens in every row, so the ranks' losses must
# be weighted by their answer tokens to equal the 1-process loss.
TINY = ["recipe=roots_staircase", "imports=[tests/plugins/ragged_task.py]", "task.name=ragged",
        "loop=3", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
        "model.head_dim=16", "model.ffn_dim=64", "model.n_prelude=1", "model.n_coda=1",
        "train.batch_size=8", "train.steps=4", "train.log_every=1", "train.eval_every=2",
        "train.loop_sampling.sampler=uniform", "train.lr=1e-2", "train.warmup_steps=0",
        "train.grad_clip=0.5", "eval.n_samples=16", "eval.loops=[1,2]", "threads=1"]
TIMEOUT = 120
REL = 1e-5

pytestmark = pytest.mark.slow


def launch(cmd, *args, env=None):
    proc = subprocess.run([*cmd, "train.py", *TINY, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT, env=env)
    return proc


def train(cmd, *args):
    proc = launch(cmd, *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def printed_losses(stdout: str) -> dict[int, float]:
    rows = [line.split() for line in stdout.splitlines() if line.startswith("step ")]
    steps = [int(r[1]) for r in rows]
    assert len(steps) == len(set(steps)), "a step was printed twice (by more than one rank?)"
    return {int(r[1]): float(r[3]) for r in rows}


def close(a: float, b: float, rel: float = REL) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def grad_norms(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return [e.value for e in acc.Scalars("train/grad_norm")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    one = train([sys.executable], f"out_dir={out}", "name=one")
    return out, printed_losses(one.stdout)


def check_same_training(out: Path, name: str, stdout: str, one: dict[int, float]) -> None:
    losses = printed_losses(stdout)
    assert sorted(losses) == [1, 2, 3, 4]
    for step in losses:  # printed by rank 0 only, the all-reduced global loss
        assert close(losses[step], one[step]), (step, losses[step], one[step])
    history = {h["step"]: h["loss"] for h in
               torch.load(out / name / "ckpt" / "step_00000004" / "state.pt")["history"]}
    ref = {h["step"]: h["loss"] for h in
           torch.load(out / "one" / "ckpt" / "step_00000004" / "state.pt")["history"]}
    assert all(close(history[s], ref[s]) for s in ref), (history, ref)
    # the gradient itself (Adam hides a scale error in the loss; the grad norm does not)
    for a, b in zip(grad_norms(out / name), grad_norms(out / "one"), strict=True):
        assert close(a, b, 1e-4), (a, b)
    w, ref_w = (load_file(out / n / "ckpt" / "step_00000004" / "model.safetensors")
                for n in (name, "one"))
    assert w.keys() == ref_w.keys()
    assert all(w[k].shape == ref_w[k].shape for k in w)
    # rounding differences in tiny gradients, normalised by Adam: ~2e-6 (DDP), ~4e-5 (FSDP);
    # a wrong gradient moves weights by ~lr = 1e-2 here
    assert max((w[k] - ref_w[k]).abs().max().item() for k in w) < 5e-4
    assert len(list((out / name / "tb").iterdir())) == 1, "only rank 0 writes TensorBoard"


def test_ddp_matches_one_process(runs):
    out, one = runs
    proc = train(TORCHRUN, f"out_dir={out}", "name=ddp")
    assert "data parallel: ddp on 2 processes, 4 of the 8 rows" in proc.stdout
    assert proc.stdout.count("held-out accuracy by loop count") == 1
    check_same_training(out, "ddp", proc.stdout, one)


def test_fsdp_matches_one_process_and_checkpoints_resume_anywhere(runs):
    out, one = runs
    proc = train(TORCHRUN, f"out_dir={out}", "name=fsdp", "train.parallel=fsdp")
    assert "data parallel: fsdp on 2 processes" in proc.stdout
    check_same_training(out, "fsdp", proc.stdout, one)
    # the FSDP checkpoint holds the full optimizer state in the 1-process format ...
    opt = torch.load(out / "fsdp" / "ckpt" / "step_00000004" / "state.pt")["optimizer"]
    ref = torch.load(out / "one" / "ckpt" / "step_00000004" / "state.pt")["optimizer"]
    assert opt["param_groups"] == ref["param_groups"]
    assert opt["state"].keys() == ref["state"].keys()
    for i, s in ref["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):  # equal up to rounding, relative to their scale
            diff = (opt["state"][i][key] - s[key]).abs().max()
            assert diff <= 1e-3 * s[key].abs().max(), (i, key, diff)
        assert opt["state"][i]["step"] == s["step"]
    # ... and FSDP resumes a 1-process checkpoint exactly (weights and optimizer, sharded)
    resumed = train(TORCHRUN, f"out_dir={out}", "name=fsdp_resumed", "train.parallel=fsdp",
                    f"resume_from={out / 'one' / 'ckpt' / 'step_00000002'}")
    losses = printed_losses(resumed.stdout)
    assert sorted(losses) == [3, 4]
    assert all(close(losses[s], one[s]) for s in losses), (losses, one)


def test_batch_not_divisible_by_world_size_fails_with_one_line(tmp_path):
    proc = launch(TORCHRUN, f"out_dir={tmp_path}", "name=bad", "train.batch_size=7")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.batch_size=7" in errors[0], proc.stderr
    assert "divisible by the world size 2" in errors[0]
    # torchrun itself exits 1 and prints its own ChildFailedError report (a traceback of the
    # launcher, in site-packages); the workers exit 2 and print no traceback
    assert proc.returncode != 0
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), proc.stderr
    # no frame of this project's code (a .venv inside the clone holds torchrun's own frames)
    own_frame = re.compile(rf'File "{re.escape(str(ROOT))}/(looped/|train\.py)')
    assert not own_frame.search(proc.stderr) and "[rank" not in proc.stderr, proc.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_exits_2_without_traceback(rank, tmp_path):
    """One worker as torchrun starts it: the check comes before any process group, so it exits
    with code 2 and one error line (ranks other than 0 after a grace period in which torchrun
    would stop them once rank 0 has reported the same error), and no traceback."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
    proc = launch([sys.executable], f"out_dir={tmp_path}", "train.batch_size=7", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.batch_size=7"), proc.stderr


def test_shard_batch_partitions_rows():
    b = Batch(torch.arange(24).view(6, 4), torch.arange(24).view(6, 4) + 100,
              torch.arange(48).view(2, 6, 4))
    parts = [shard_batch(b, DistEnv(3, r, r)) for r in range(3)]
    assert torch.equal(torch.cat([p.inputs for p in parts]), b.inputs)
    assert torch.equal(torch.cat([p.targets for p in parts]), b.targets)
    assert torch.equal(torch.cat([p.hop_targets for p in parts], dim=1), b.hop_targets)
    assert shard_batch(b, DistEnv()) is b


def full_checkpoint(run: Path, step: int):
    ckpt = run / "ckpt" / f"step_{step:08d}"
    return load_file(ckpt / "model.safetensors"), torch.load(ckpt / "state.pt")["optimizer"]


def test_sharded_checkpoints_of_two_ranks_resume_on_one_as_on_two(runs):
    """FSDP on 2 ranks writes sharded, asynchronous checkpoints (each rank its own shards);
    resuming step 2 on 1 process and on 2 ranks gives the same training and the same weights
    and optimizer state at step 4, which also equal the 1-process run's."""
    out, one = runs
    sharded = ["train.parallel=fsdp", "train.checkpoint_format=sharded",
               "train.async_checkpoint=true"]
    proc = train(TORCHRUN, f"out_dir={out}", "name=sharded", *sharded)
    losses = printed_losses(proc.stdout)
    assert all(close(losses[s], one[s]) for s in one), (losses, one)
    step2 = out / "sharded" / "ckpt" / "step_00000002"
    assert sorted(p.name for p in (step2 / "dcp").glob("*.distcp")) == ["__0_0.distcp",
                                                                       "__1_0.distcp"]
    assert not (step2 / "model.safetensors").exists()  # nothing was gathered
    resumed = {}
    for name, cmd, extra in (("on_one", [sys.executable], []),
                             ("on_two", TORCHRUN, ["train.parallel=fsdp"])):
        proc = train(cmd, f"out_dir={out}", f"name={name}", f"resume_from={step2}", *extra)
        resumed[name] = printed_losses(proc.stdout)
        assert sorted(resumed[name]) == [3, 4]
        assert all(close(resumed[name][s], one[s]) for s in (3, 4)), (resumed[name], one)
    (w1, o1), (w2, o2) = (full_checkpoint(out / n, 4) for n in ("on_one", "on_two"))
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 5e-4  # see check_same_training
    assert o1["param_groups"] == o2["param_groups"] and o1["state"].keys() == o2["state"].keys()
    for i, s in o1["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert (o2["state"][i][key] - s[key]).abs().max() <= 1e-3 * s[key].abs().max()
        assert o2["state"][i]["step"] == s["step"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_localhost_train_as_one_process(runs):
    """Two torchrun "nodes" of 2 ranks each meet over 127.0.0.1 (static rendezvous, as on a
    cluster without a rendezvous service) and train with HSDP: sharded within a node,
    replicated across the two. The run equals the 1-process run."""
    out, one = runs
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
         "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
         "train.py", *TINY, f"out_dir={out}", "name=two_nodes", "train.parallel=hsdp"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)]
    results = [p.communicate(timeout=2 * TIMEOUT) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert "data parallel: hsdp on 4 processes" in results[0][0]
    assert not printed_losses(results[1][0]), "only global rank 0 prints"
    check_same_training(out, "two_nodes", results[0][0], one)


def test_ddp_with_parameters_that_get_no_gradient(tmp_path):
    """An unrolled model under truncated backprop: its early copies get no gradient, which DDP
    refuses unless it looks for unused parameters."""
    args = ["recipe=roots_staircase", "model.share_weights=false", "train.grad_loops=1", "train.loop_sampling.sampler=fixed",
            "eval.loops=[3]"]
    one = train([sys.executable], f"out_dir={tmp_path}", "name=one", *args)
    two = train(TORCHRUN, f"out_dir={tmp_path}", "name=ddp", *args)
    check_same_training(tmp_path, "ddp", two.stdout, printed_losses(one.stdout))


def test_the_main_jobs_grid_is_scored_on_every_fsdp_rank(tmp_path):
    """The main job's difficulty grid after training under FSDP: its forwards are collectives,
    so every rank scores it (rank 0 alone would wait forever); rank 0 prints it once."""
    proc = subprocess.run([*TORCHRUN, "train.py", "loop=2", "train.steps=2", "train.batch_size=8",
                           "train.parallel=fsdp", "eval.loops=[1,2]", "eval.n_samples=8",
                           "eval.grid.levels=[8,12]", "eval.grid.n_samples=8", "threads=1",
                           f"out_dir={tmp_path}", "name=grid"],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("held-out whole answers solved by length") == 1
    assert (tmp_path / "grid" / "eval" / "difficulty_grid.md").is_file()
