"""Checkpoints: weights in safetensors, trainer state in a file that loads without running
pickled code, written atomically so that a crash never corrupts the last good checkpoint.

Layout of a run directory:
    config.yaml            the resolved config (plus git commit and seed in meta.json)
    ckpt/step_00000200/    model.safetensors + state.pt (optimizer, RNG, step)
    ckpt/latest            the name of the newest complete checkpoint
    metrics.jsonl          held-out metrics and depth-weight diagnostics at each evaluation
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from looped.errors import LoopedError

CKPT_DIR = "ckpt"
LATEST = "latest"
METRICS_FILE = "metrics.jsonl"  # one JSON line per evaluation during training


class CheckpointError(LoopedError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module,
                    state: dict[str, Any], keep: int = 3) -> Path:
    """Write ckpt/step_XXXXXXXX atomically (temp dir, fsync, rename), point `latest` at it,
    then prune all but the `keep` most recently written checkpoints."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    # prune by recency, not by step: a run rewound with resume_from writes lower steps, and the
    # checkpoint just written (the one `latest` names) must survive
    others = [p for p in root.glob("step_*") if p.is_dir() and p != final]
    for old in sorted(others, key=lambda p: p.stat().st_mtime_ns, reverse=True)[keep - 1:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: Path) -> Path:
    """A run dir, its ckpt/ dir, or one checkpoint dir -> that checkpoint's dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / "model.safetensors").is_file():
        return path
    root = path / CKPT_DIR if (path / CKPT_DIR).is_dir() else path
    latest = root / LATEST
    if latest.is_file():
        ckpt = root / latest.read_text().strip()
        if (ckpt / "model.safetensors").is_file():
            return ckpt
    steps = sorted(p for p in root.glob("step_*") if (p / "model.safetensors").is_file())
    if not steps:
        raise CheckpointError(f"no checkpoint found in {path}")
    return steps[-1]


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint dir belongs to (holding config.yaml)."""
    for parent in [ckpt, *ckpt.parents]:
        if (parent / "config.yaml").is_file():
            return parent
    raise CheckpointError(f"no config.yaml next to checkpoint {ckpt}")


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load model.safetensors into model, naming mismatched keys and shapes if any."""
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {ckpt / 'model.safetensors'} (truncated or "
                              f"corrupted?): {str(e).splitlines()[0]}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch {k}: checkpoint {tuple(weights[k].shape)} vs model "
                         f"{tuple(own[k].shape)}" + (f" (+{len(wrong) - 1} more)"
                                                      if len(wrong) > 1 else ""))
        raise CheckpointError(f"checkpoint {ckpt} does not fit this architecture: "
                              + "; ".join(parts))
    model.load_state_dict(weights)


def load_state(ckpt: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read {ckpt / 'state.pt'} (truncated or corrupted?): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def save_run_config(run_dir: Path, cfg) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(run_dir) / ".config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(cfg))
    os.replace(tmp, Path(run_dir) / "config.yaml")
