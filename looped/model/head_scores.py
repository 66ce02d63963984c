"""Cross-entropy and argmax through the LM head without the full (B, T, vocab) logits.

At a 50k vocabulary and 2k context one batch of 64 rows has 26 GB of fp32 logits, and the
per-iteration loss would keep R of them. Here the head (final norm + tied or own projection)
runs on `chunk` answer tokens at a time. Under autograd each chunk is checkpointed, so backward
keeps only the hidden states (which the loop keeps anyway) and recomputes one chunk's logits at
a time; the gradients are those of the full computation.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from looped.data.base import IGNORE

# answer tokens per head call: 8192 x 50k fp32 logits is 1.6 GB, small next to a GPU's memory,
# large enough that the projection stays one efficient matmul
DEFAULT_CHUNK = 8192

Head = Callable[[torch.Tensor], torch.Tensor]  # (N, d) -> (N, vocab)


def _ce(head: Head, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(x).float(), targets, reduction="none")


def _answer_chunks(hidden: torch.Tensor, targets: torch.Tensor, chunk: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(flat indices, hidden states, targets) of up to `chunk` answer tokens at a time."""
    flat_t = targets.reshape(-1)
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    answer = (flat_t != IGNORE).nonzero().squeeze(1)  # (N,)
    for lo in range(0, answer.numel(), chunk):
        idx = answer[lo:lo + chunk]
        yield idx, flat_h.index_select(0, idx), flat_t.index_select(0, idx)


def head_ce(head: Head, hidden: torch.Tensor, targets: torch.Tensor,
            chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Cross-entropy per token (B, T) of head(hidden) against targets, 0 where the target is
    IGNORE. hidden (B, T, d)."""
    out = hidden.new_zeros(targets.numel(), dtype=torch.float32)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    indices, pieces = [], []
    for idx, x, t in _answer_chunks(hidden, targets, chunk):
        indices.append(idx)
        pieces.append(checkpoint(_ce, head, x, t, use_reentrant=False) if grad
                      else _ce(head, x, t))
    if pieces:
        out = out.index_put((torch.cat(indices),), torch.cat(pieces))
    return out.view(targets.shape)


@torch.no_grad()
def head_scores(head: Head, hidden: torch.Tensor, targets: torch.Tensor,
                chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, right) per token, both (B, T), for evaluation: right is whether the
    argmax equals the target; both are 0 / False where the target is IGNORE."""
    ce = torch.zeros(targets.numel(), dtype=torch.float32, device=hidden.device)
    right = torch.zeros(targets.numel(), dtype=torch.bool, device=hidden.device)
    for idx, x, t in _answer_chunks(hidden, targets, chunk):
        logits = head(x).float()
        ce[idx] = F.cross_entropy(logits, t, reduction="none")
        right[idx] = logits.argmax(-1) == t
    return ce.view(targets.shape), right.view(targets.shape)
