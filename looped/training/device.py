"""Which device a job runs on, and the precision it computes in there."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from looped.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str, local_rank: Optional[int] = None) -> torch.device:
    """auto: CUDA when available (one GPU per local rank), else CPU."""
    if name not in DEVICES:
        raise ConfigError(f"unknown device '{name}'; choose one of: {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank or 0)


def autocast(device: torch.device):
    """bf16 autocast on GPU (weights and reductions stay fp32); CPU computes in fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
