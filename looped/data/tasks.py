"""Built-in reasoning tasks, generated on the fly and scored by exact match on answer tokens.

A task yields (inputs, targets), both (B, T) long tensors; targets hold IGNORE everywhere but the
answer positions, so the loss and the accuracy only see answers. Tasks register by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

IGNORE = -100


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T), IGNORE off the answer positions
    # optional intermediate targets: hop_targets[r - 1] is the answer after r reasoning steps,
    # (H, B, T); steps beyond H use `targets`. Used by the per-iteration loss.
    hop_targets: Optional[torch.Tensor] = None

    def target_after(self, steps: int) -> torch.Tensor:
        """The target for a prediction made after `steps` (>= 1) loop iterations."""
        if self.hop_targets is None or steps > self.hop_targets.shape[0]:
            return self.targets
        return self.hop_targets[steps - 1]


class Task:
    vocab_size: int
    seq_len: int

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str):
    def wrap(cls):
        TASKS[name] = cls
        return cls
    return wrap


@register_task("roots")
class RootsTask(Task):
    """Root finding in a forest of parent pointers.

    Nodes 0..N-1 form n_chains chains of chain_len nodes under a random labelling; each node's
    parent is the previous node of its chain and each root points to itself. The input is
    `P[0] .. P[N-1] SEP q_1 .. q_n` and the target at query q_i's position is root(q_i).
    Following one pointer per step, a query at depth d needs d steps.
    """

    def __init__(self, n_chains: int = 4, chain_len: int = 6, n_queries: int = 8, **_):
        self.n_chains, self.chain_len, self.n_queries = n_chains, chain_len, n_queries
        self.n_nodes = n_chains * chain_len
        self.sep = self.n_nodes
        self.vocab_size = self.n_nodes + 1
        self.seq_len = self.n_nodes + 1 + n_queries

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        b, n, c, length = batch_size, self.n_nodes, self.n_chains, self.chain_len
        labels = torch.argsort(torch.rand(b, n, generator=generator), dim=1).view(b, c, length)
        parents = torch.empty(b, n, dtype=torch.long)
        parent_labels = torch.cat([labels[:, :, :1], labels[:, :, :-1]], dim=2)  # root -> itself
        parents.scatter_(1, labels.reshape(b, n), parent_labels.reshape(b, n))
        roots = torch.empty(b, n, dtype=torch.long)
        roots.scatter_(1, labels.reshape(b, n),
                       labels[:, :, :1].expand(b, c, length).reshape(b, n))
        # queries: non-root nodes (depth 1 .. chain_len - 1)
        depth_idx = torch.randint(1, length, (b, self.n_queries), generator=generator)
        chain_idx = torch.randint(0, c, (b, self.n_queries), generator=generator)
        queries = labels[torch.arange(b)[:, None], chain_idx, depth_idx]
        sep = torch.full((b, 1), self.sep, dtype=torch.long)
        inputs = torch.cat([parents, sep, queries], dim=1)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, n + 1:] = roots.gather(1, queries)
        hops = torch.full((length - 1, b, inputs.shape[1]), IGNORE, dtype=torch.long)
        node = queries
        for r in range(length - 1):  # hops[r]: the ancestor r + 1 steps up (a root stays put)
            node = parents.gather(1, node)
            hops[r, :, n + 1:] = node
        return Batch(inputs, targets, hops)


def build_task(cfg, split: str = "train") -> Task:
    """The task named by a TaskConfig; split="eval" applies the held-out difficulty knobs."""
    from looped.errors import ConfigError

    if cfg.name not in TASKS:
        raise ConfigError(f"unknown task '{cfg.name}'; choose one of: {', '.join(TASKS)}")
    knobs = {k: v for k, v in cfg.items() if k not in ("name", "eval")}
    if split == "eval":
        knobs.update({k: v for k, v in cfg.eval.items() if v is not None})
    return TASKS[cfg.name](**knobs)
