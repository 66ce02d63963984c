"""Training objectives, chosen by name (`train.objective.loss`), each with its knobs beside it:

    final          cross-entropy of the last iteration's answer
    per_iteration  a loss after every iteration, against the task's intermediate targets where
                   it has them (hop_targets), else the final answer
    progressive    Bansal et al. 2022: run n ~ U{0..m-1} iterations without gradient, then
                   k ~ U{1..m-n} with it, and score that answer; mixed with the final loss at m
                   as (1 - alpha) L_m + alpha L_prog

m is the step's sampled loop count. With model.exit_gate, every objective adds the gate's
entropy-regularised expected loss, on per-iteration losses detached from the LM's (the gate learns
when to stop; it must not push the LM around). Plugins register more with `register_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from looped.data.base import IGNORE, Batch
from looped.errors import ConfigError
from looped.model.exit import gate_loss
from looped.model.head_scores import head_ce
from looped.model.lm import LMOutput, LoopedLM
from looped.registry import Registry

@dataclass
class ObjectiveConfig:
    """The training loss (the `train.objective` node)."""

    # final | per_iteration | progressive (knobs: each loss's Config)
    loss: str = "final"


LOSSES = Registry("loss", path="train.objective", selector="loss", base=ObjectiveConfig)
register_loss = LOSSES.register

# (loops, grad_loops) -> the forward output with return_states; grad_loops None: the run's own
Forward = Callable[[int, Optional[int]], LMOutput]


@dataclass
class Step:
    """What an objective sees of one training step."""

    model: LoopedLM  # the unwrapped model: its head reads intermediate states
    forward: Forward  # runs the (possibly wrapped) training model on the batch's inputs
    batch: Batch
    loops: int  # m: the step's sampled loop count (the largest row's, for per-row loop counts)
    generator: torch.Generator  # seeded by (seed, step): draws are identical on resume
    gate_beta: float = 0.0


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per token (B, T); 0 where the target is IGNORE."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE, reduction="none").view(targets.shape)


def output_ce(model: LoopedLM, out: LMOutput, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per token (B, T) of a forward's answer: from its logits, or, run with
    logits=False, through the head in checkpointed chunks (no full logits kept)."""
    if out.logits is not None:
        return token_ce(out.logits, targets)
    return head_ce(model.head, out.hidden, targets)


def iteration_ce(model: LoopedLM, out: LMOutput, targets: Callable[[int], torch.Tensor]
                 ) -> torch.Tensor:
    """Cross-entropy per token after each iteration r = 1..R against targets(r), (R, B, T).
    The norm + head read intermediate states directly ("logit lens"), in checkpointed chunks so
    that no iteration's full logits are kept; the last iteration uses the model's real output,
    which includes the coda."""
    n = len(out.states)
    per_iter = [head_ce(model.head, s, targets(r + 1)) for r, s in enumerate(out.states[:-1])]
    return torch.stack(per_iter + [output_ce(model, out, targets(n))])


def _answer_tokens(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    mask = batch.targets != IGNORE
    return mask, mask.sum().clamp_min(1)


def final_loss(batch: Batch, out: LMOutput, model: Optional[LoopedLM] = None) -> torch.Tensor:
    _, n = _answer_tokens(batch)
    return output_ce(model, out, batch.targets).sum() / n


def with_gate(model: LoopedLM, batch: Batch, out: LMOutput, loss: torch.Tensor, beta: float,
              per_iter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """loss, plus the exit gate's loss where the model has a gate. per_iter (R, B, T): the
    per-iteration losses if the objective computed them, else the final answer's."""
    if out.gate_logits is None:
        return loss
    if per_iter is None:  # the gate weighs the loss each iteration would have given
        per_iter = iteration_ce(model, out, lambda r: batch.targets)
    mask, _ = _answer_tokens(batch)
    return loss + gate_loss(out.gate_logits, per_iter.detach(), beta, mask)


def compute_loss(model: LoopedLM, batch: Batch, out: LMOutput, kind: str,
                 gate_beta: float) -> torch.Tensor:
    """The final or per-iteration loss of one forward output (run with return_states)."""
    if kind == "final":
        return with_gate(model, batch, out, final_loss(batch, out, model), gate_beta)
    if kind != "per_iteration":
        raise ConfigError(f"compute_loss scores one forward: final or per_iteration, got {kind}")
    _, n = _answer_tokens(batch)
    per_iter = iteration_ce(model, out, batch.target_after)  # (R, B, T)
    loss = per_iter.sum(dim=(1, 2)).mean() / n
    return with_gate(model, batch, out, loss, gate_beta, per_iter)


@register_loss("final")
class FinalLoss:
    """Cross-entropy of the answer after the last iteration."""

    def __call__(self, step: Step) -> torch.Tensor:
        return compute_loss(step.model, step.batch, step.forward(step.loops, None), "final",
                            step.gate_beta)


@register_loss("per_iteration")
class PerIterationLoss:
    """The mean over iterations r of the loss against the r-step target (intermediate targets:
    not a final-answer-only objective)."""

    def __call__(self, step: Step) -> torch.Tensor:
        return compute_loss(step.model, step.batch, step.forward(step.loops, None),
                            "per_iteration", step.gate_beta)


@register_loss("progressive")
class ProgressiveLoss:
    """Bansal et al.'s progressive loss: from the state after n iterations run without gradient
    (so it cannot learn to depend on the iteration count), k more with gradient must give the
    answer. alpha = 0 is the final loss; alpha = 1 drops L_m (and its forward)."""

    @dataclass
    class Config:
        alpha: float = 0.5  # weight of the progressive term; (1 - alpha) on the final loss at m

        def check(self, cfg) -> None:
            if not 0 <= self.alpha <= 1:
                raise ConfigError(f"train.objective.alpha must be in [0, 1], got {self.alpha}")
            if not cfg.model.share_weights:
                raise ConfigError("train.objective.loss=progressive runs fewer iterations than "
                                  "loop; an unrolled model (share_weights=false) runs exactly "
                                  "loop: use train.objective.loss=final")
            if cfg.train.loop_sampling.sampler == "task":
                raise ConfigError("train.objective.loss=progressive draws its own loop counts; "
                                  "it cannot follow per-row loop counts "
                                  "(train.loop_sampling.sampler=task)")

    def __init__(self, alpha: float = Config.alpha):
        self.alpha = alpha

    @staticmethod
    def draw(m: int, generator: torch.Generator) -> tuple[int, int]:
        """(n, k): n ~ U{0..m-1} iterations without gradient, then k ~ U{1..m-n} with it."""
        n = int(torch.randint(0, m, (1,), generator=generator))
        k = int(torch.randint(1, m - n + 1, (1,), generator=generator))
        return n, k

    def __call__(self, step: Step) -> torch.Tensor:
        n, k = self.draw(step.loops, step.generator)
        out = step.forward(n + k, k)
        loss = self.alpha * final_loss(step.batch, out, step.model)
        if self.alpha < 1:
            out = step.forward(step.loops, None)  # the gate learns from the full run
            loss = loss + (1 - self.alpha) * final_loss(step.batch, out, step.model)
        return with_gate(step.model, step.batch, out, loss, step.gate_beta)


def build_objective(cfg):
    """The objective a train.objective node names, built with its knobs."""
    cls = LOSSES.lookup(cfg.loss)
    knobs = LOSSES.configs[cfg.loss].__dataclass_fields__
    return cls(**{k: getattr(cfg, k) for k in knobs})
