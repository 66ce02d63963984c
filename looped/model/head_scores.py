"""Cross-entropy and argmax through the LM head without the full (B, T, vocab) logits.

At a 50k vocabulary and 2k context one batch of 64 rows has 26 GB of fp32 logits, and the
per-iteration loss would keep R of them. Here the head (final norm + tied or own projection)
runs on `chunk` answer tokens at a time. Under autograd each chunk is checkpointed, so backward
keeps only the hidden states (which the loop keeps anyway) and recomputes one chunk's logits at
a time; the gradients are those of the full computation.
"""

from __future__ import annotations

from typing import Callable

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


def head_ce(head: Head, hidden: torch.Tensor, targets: torch.Tensor,
             chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Cross-entropy per token (B, T) of head(hidden) against targets, 0 where the target is
    IGNORE. hidden (B, T, d)."""
    flat_t = targets.reshape(-1)
    answer = (flat_t != IGNORE).nonzero().squeeze(1)  # (N,)
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    out = hidden.new_zeros(flat_t.shape, dtype=torch.float32)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    pieces = []
    for lo in range(0, answer.numel(), chunk):
        idx = answer[lo:lo + chunk]
        x, t = flat_h.index_select(0, idx), flat_t.index_select(0, idx)
        pieces.append(checkpoint(_ce, head, x, t, use_reentrant=False) if grad
                      else _ce(head, x, t))
    if pieces:
        out = out.index_put((answer,), torch.cat(pieces))
    return out.view(targets.shape)


@torch.no_grad()
def head_scores(head: Head, hidden: torch.Tensor, targets: torch.Tensor,
                 chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, right) per token, both (B, T), for evaluation: right is whether the
    argmax equals the target; both are 0 / False where the target is IGNORE."""
    flat_t = targets.reshape(-1)
    answer = (flat_t != IGNORE).nonzero().squeeze(1)
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    ce = torch.zeros(flat_t.shape, dtype=torch.float32, device=hidden.device)
    right = torch.zeros(flat_t.shape, dtype=torch.bool, device=hidden.device)
    for lo in range(0, answer.numel(), chunk):
        idx = answer[lo:lo + chunk]
        logits, t = head(flat_h.index_select(0, idx)).float(), flat_t.index_select(0, idx)
        ce[idx] = F.cross_entropy(logits, t, reduction="none")
        right[idx] = logits.argmax(-1) == t
    return ce.view(targets.shape), right.view(targets.shape)
