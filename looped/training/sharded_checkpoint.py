"""Sharded checkpoints through `torch.distributed.checkpoint` (DCP), optionally written in the
background (`train.checkpoint_format=sharded`, `train.async_checkpoint=true`).

Each rank writes its own shards of the weights and of the optimizer state: nothing is gathered
onto rank 0, and no rank holds the full state. Loading reshards, so a checkpoint written by N
ranks (DDP or FSDP) resumes on any number of ranks, one included, and `looped eval`, `export` and
`generate` read it in a single process.

Layout: ckpt/step_XXXXXXXX/ holds dcp/ (DCP's .metadata and one .distcp file per rank, keys
"model" and "optim", by parameter name) and state.pt (step, RNG, history; no optimizer). The
directory is written as ckpt/.step_XXXXXXXX.partial and renamed, and `latest` moved, only when
every rank's shards are down, so a kill at any point (also during an asynchronous save) leaves
the previous checkpoint named by `latest` and whole.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from looped.training.checkpoint import (CKPT_DIR, DCP_DIR, CheckpointError, first_line,
                                        publish_checkpoint, state_dicts)

PARTIAL = ".partial"


@dataclass
class PendingSave:
    """An asynchronous save in flight: `wait()` blocks until every rank's shards are written,
    then publishes the checkpoint (rank 0) and returns its directory."""

    future: Any
    publish: Callable[[], Optional[Path]]

    def wait(self) -> Optional[Path]:
        try:
            self.future.result()
        except Exception as e:
            raise CheckpointError(f"asynchronous checkpoint failed: {first_line(e)}") from None
        return self.publish()


def partial_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f".step_{step:08d}{PARTIAL}"


def save_sharded(run_dir: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                 state: dict[str, Any], keep: int, is_main: bool, async_save: bool = False,
                 process_group=None):
    """Every rank calls this. Returns the checkpoint directory (rank 0; None elsewhere), or a
    PendingSave when async_save."""
    import torch.distributed.checkpoint as dcp

    partial = partial_dir(run_dir, step)
    if is_main:
        root = partial.parent
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".step_*{PARTIAL}"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir()
    if dist.is_initialized():
        dist.barrier()  # the directory exists before any rank writes into it
    sd = state_dicts(model, opt)

    def publish() -> Optional[Path]:
        if not is_main:
            return None
        torch.save(state, partial / "state.pt")
        with open(partial / "state.pt", "rb") as f:
            os.fsync(f.fileno())
        return publish_checkpoint(partial, f"step_{step:08d}", keep)

    try:
        if async_save:
            future = dcp.async_save(sd, checkpoint_id=str(partial / DCP_DIR),
                                    process_group=process_group)
            return PendingSave(future, publish)
        dcp.save(sd, checkpoint_id=str(partial / DCP_DIR))
    except Exception as e:
        raise CheckpointError(f"cannot write the sharded checkpoint {partial}: "
                              f"{first_line(e)}") from None
    return publish()
