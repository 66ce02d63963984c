"""Checkpoints: weights in safetensors, trainer state in a file that loads without running
pickled code, written atomically so that a crash never corrupts the last good checkpoint.

Layout of a run directory:
    config.yaml            the resolved config (plus git commit and seed in meta.json)
    ckpt/step_00000200/    model.safetensors + state.pt (optimizer, RNG, step), or, for
                           train.checkpoint_format=sharded, dcp/ + state.pt (see
                           looped.training.sharded_checkpoint)
    ckpt/latest            the name of the newest complete checkpoint
    metrics.jsonl          held-out metrics and depth-weight diagnostics at each evaluation
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from looped.errors import LoopedError
from looped.model.depth import resolve_policy

CKPT_DIR = "ckpt"
DCP_DIR = "dcp"  # a sharded checkpoint's torch.distributed.checkpoint files
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
    return publish_checkpoint(tmp, name, keep)


def publish_checkpoint(tmp: Path, name: str, keep: int) -> Path:
    """Rename a fully written checkpoint directory to ckpt/NAME, point `latest` at it, and
    prune all but the `keep` most recently written checkpoints."""
    root = tmp.parent
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


def is_checkpoint(path: Path) -> bool:
    """A full checkpoint (model.safetensors) or a sharded one (DCP's metadata)."""
    return (path / "model.safetensors").is_file() or (path / DCP_DIR / ".metadata").is_file()


def resolve_checkpoint(path: Path) -> Path:
    """A run dir, its ckpt/ dir, or one checkpoint dir -> that checkpoint's dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if is_checkpoint(path):
        return path
    root = path / CKPT_DIR if (path / CKPT_DIR).is_dir() else path
    latest = root / LATEST
    if latest.is_file():
        ckpt = root / latest.read_text().strip()
        if is_checkpoint(ckpt):
            return ckpt
    steps = sorted(p for p in root.glob("step_*") if is_checkpoint(p))
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
    """Load a checkpoint's weights into model, naming mismatched keys and shapes if any."""
    if not (ckpt / "model.safetensors").is_file() and (ckpt / DCP_DIR / ".metadata").is_file():
        load_sharded(ckpt, model)
        return
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
    """The resolved config, with the Depth-Attention source policy by name (not `null`, whose
    meaning is a default that may change), so that the run loads as it was trained."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    cfg = cfg.copy()
    da = cfg.model.depth_attention
    if da.enabled and da.sources is None:
        da.sources = resolve_policy(da, looped=cfg.loop > 1)
    tmp = Path(run_dir) / ".config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(cfg))
    os.replace(tmp, Path(run_dir) / "config.yaml")


# -- sharded checkpoints (writing: looped.training.sharded_checkpoint) -------------------------


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def state_dicts(model: nn.Module, opt: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
    """This rank's view of the state, keyed by parameter name (DTensor shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)

    out = {"model": get_model_state_dict(model)}
    if opt is not None:
        out["optim"] = get_optimizer_state_dict(model, opt)
    return out


def load_sharded(ckpt: Path, model: nn.Module, opt: Optional[torch.optim.Optimizer] = None
                 ) -> None:
    """Load a sharded checkpoint into model (and opt), resharding to this run's ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)

    sd = state_dicts(model, opt)
    try:
        dcp.load(sd, checkpoint_id=str(Path(ckpt) / DCP_DIR))
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model (or is damaged): "
                              f"{first_line(e)}") from None
    set_model_state_dict(model, sd["model"])
    if opt is not None:
        set_optimizer_state_dict(model, opt, sd["optim"])
