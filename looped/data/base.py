"""What every task shares: the Batch it yields, the Task interface and the task registry.

A task yields (inputs, targets), both (B, T) long tensors; targets hold IGNORE everywhere but the
answer positions, so the loss and the accuracy only see answers. Tasks register by name (also
from the user's own modules, see looped.plugins); `looped.data.build_task` builds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from looped.errors import ConfigError
from looped.registry import Registry

IGNORE = -100


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T), IGNORE off the answer positions
    # optional intermediate targets: hop_targets[r - 1] is the answer after r reasoning steps,
    # (H, B, T); steps beyond H use `targets`. Used by the per-iteration loss.
    hop_targets: Optional[torch.Tensor] = None
    # optional loop counts per row (B,), where the task asks for more iterations on harder rows
    # (train.loop_sampling.sampler=task trains with them); None: the step's sampled R for every row
    loops: Optional[torch.Tensor] = None

    def target_after(self, steps: int) -> torch.Tensor:
        """The target for a prediction made after `steps` (>= 1) loop iterations."""
        if self.hop_targets is None or steps > self.hop_targets.shape[0]:
            return self.targets
        return self.hop_targets[steps - 1]

    def rows(self, lo: int, hi: int) -> "Batch":
        """Rows lo..hi-1 (the batch is dim 0 of inputs and targets, dim 1 of hop_targets)."""
        hop = None if self.hop_targets is None else self.hop_targets[:, lo:hi]
        loops = None if self.loops is None else self.loops[lo:hi]
        return Batch(self.inputs[lo:hi], self.targets[lo:hi], hop, loops)

    def to(self, device: torch.device | str) -> "Batch":
        hop = None if self.hop_targets is None else self.hop_targets.to(device)
        loops = None if self.loops is None else self.loops.to(device)
        return Batch(self.inputs.to(device), self.targets.to(device), hop, loops)


class Task:
    vocab_size: int
    seq_len: int

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError


@dataclass
class TaskConfig:
    """The `task` node's shared field. The chosen task's schema adds its knobs, then `eval`: the
    held-out split's difficulty, any of the task's knobs again, None keeping the training value,
    so evaluation can go beyond the trained difficulty (task.eval.hops=8 after task.hops=4)."""

    # a registered task: roots, chain, phop, addition, prefix_sums, text, or a plugin's (knobs:
    # each task's Config, in looped/data)
    name: str = "roots"


TASKS = Registry("task", path="task", selector="name", base=TaskConfig)
register_task = TASKS.register


def knob_error(task: str, message: str) -> ConfigError:
    return ConfigError(f"task '{task}': {message}")
