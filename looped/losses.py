"""Training losses: on the final iteration, or after every iteration (intermediate targets),
plus the exit gate's entropy-regularised expected loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from looped.data.base import IGNORE, Batch
from looped.model.exit import gate_loss
from looped.model.lm import LMOutput, LoopedLM


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per token (B, T); 0 where the target is IGNORE."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE, reduction="none").view(targets.shape)


def iteration_logits(model: LoopedLM, out: LMOutput) -> list[torch.Tensor]:
    """Logits after each iteration: the norm + head read the state directly ("logit lens");
    the last iteration uses the model's real output, which includes the coda."""
    return [model.head(s) for s in out.states[:-1]] + [out.logits]


def compute_loss(model: LoopedLM, batch: Batch, out: LMOutput, kind: str,
                 gate_beta: float) -> torch.Tensor:
    """The training loss for one batch given the forward output (run with return_states)."""
    mask = batch.targets != IGNORE
    n = mask.sum().clamp_min(1)
    if kind == "final":
        loss = token_ce(out.logits, batch.targets).sum() / n
        per_iter = None
    else:
        logits = iteration_logits(model, out)
        per_iter = torch.stack([token_ce(lg, batch.target_after(r + 1))
                                for r, lg in enumerate(logits)])  # (R, B, T)
        loss = per_iter.sum(dim=(1, 2)).mean() / n
    if out.gate_logits is not None:
        if per_iter is None:  # the gate weighs the loss each iteration would have given
            logits = iteration_logits(model, out)
            per_iter = torch.stack([token_ce(lg, batch.targets) for lg in logits])
        # the gate learns when to stop; it must not push the LM's losses around
        loss = loss + gate_loss(out.gate_logits, per_iter.detach(), gate_beta, mask)
    return loss
