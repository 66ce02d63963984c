"""Adaptive exit: per-token criteria that stop a token's loop iterations early, at inference.

A criterion is a small class: `init()` before the first iteration, then `check(it)` after every
iteration with an `IterationView`, returning a (B, T) bool of tokens that may stop now. The model
freezes an exited token's state, and its later depth positions reuse its last key and mixed value,
so later tokens and Depth-Attention see a consistent cache. Criteria are chosen by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from looped.errors import ConfigError
from looped.registry import Registry


@dataclass
class IterationView:
    """What a criterion may look at after iteration r (0-based) of the core."""

    r: int
    state: torch.Tensor  # (B, T, d) after iteration r
    prev_state: torch.Tensor  # (B, T, d) before iteration r
    head: Callable[[torch.Tensor], torch.Tensor]  # state -> logits, the model's norm + LM head
    gate: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # state -> halting logit (B, T)
    _cache: dict = field(default_factory=dict)

    def log_probs(self) -> torch.Tensor:
        """Next-token log-probabilities read from this iteration's state (B, T, V)."""
        if "lp" not in self._cache:
            self._cache["lp"] = F.log_softmax(self.head(self.state).float(), dim=-1)
        return self._cache["lp"]


@dataclass
class ExitConfig:
    """Adaptive exit at inference (the `exit` node)."""

    # none | kl | entropy | latent | gate | max_loops (knobs: each criterion's Config)
    criterion: str = "none"
    # decoding a batch of at least this many rows, a row whose tokens all exited leaves the
    # later iterations; a smaller batch is bound by reading the weights, so dropping rows saves
    # nothing there (see `looped bench decode`); 0: never
    drop_rows_from: int = 16

    def check(self, cfg) -> None:
        if self.drop_rows_from < 0:
            raise ConfigError(f"exit.drop_rows_from must be >= 0 (0: never), got "
                              f"{self.drop_rows_from}")


class ExitCriterion:
    # decoding a batch of at least this many rows, rows whose tokens all exited are dropped
    # from the later iterations (exit.drop_rows_from; 0: never)
    drop_rows_from: int = ExitConfig.drop_rows_from

    def init(self) -> None:
        pass

    def check(self, it: IterationView) -> torch.Tensor:
        raise NotImplementedError


def check_threshold(threshold: float, at_most: Optional[float] = None) -> None:
    """exit.threshold > 0 (a criterion compared below 0 never exits), and <= at_most if given."""
    if not 0 < threshold < float("inf") or (at_most is not None and threshold > at_most):
        bound = f"in (0, {at_most}]" if at_most is not None else "> 0 and finite"
        raise ConfigError(f"exit.threshold must be {bound}, got {threshold}")


EXIT_CRITERIA = Registry("exit criterion", path="exit", selector="criterion", base=ExitConfig)
register_exit = EXIT_CRITERIA.register
register_exit("none")(None)  # every token runs all iterations


@register_exit("kl")
class KLExit(ExitCriterion):
    """Stop when KL(p_r || p_{r-1}) between successive iterations' next-token distributions
    falls below the threshold."""

    @dataclass
    class Config:
        threshold: float = 1e-3  # exit when the KL falls below this

        def check(self, cfg) -> None:
            check_threshold(self.threshold)

    def __init__(self, threshold: float = Config.threshold):
        self.threshold = threshold

    def init(self) -> None:
        self.prev: Optional[torch.Tensor] = None

    def check(self, it: IterationView) -> torch.Tensor:
        lp = it.log_probs()
        prev, self.prev = self.prev, lp
        if prev is None:
            return torch.zeros(lp.shape[:2], dtype=torch.bool, device=lp.device)
        kl = (lp.exp() * (lp - prev)).sum(-1)
        return kl < self.threshold


@register_exit("entropy")
class EntropyExit(ExitCriterion):
    """Stop when the entropy (nats) of the next-token distribution falls below the threshold."""

    @dataclass
    class Config:
        threshold: float = 0.1  # exit when the entropy (nats) falls below this

        def check(self, cfg) -> None:
            check_threshold(self.threshold)

    def __init__(self, threshold: float = Config.threshold):
        self.threshold = threshold

    def check(self, it: IterationView) -> torch.Tensor:
        lp = it.log_probs()
        return -(lp.exp() * lp).sum(-1) < self.threshold


@register_exit("latent")
class LatentExit(ExitCriterion):
    """Stop when the relative change of the state ||s_r - s_{r-1}|| / ||s_r|| falls below the
    threshold."""

    @dataclass
    class Config:
        threshold: float = 1e-2  # exit when the relative change falls below this

        def check(self, cfg) -> None:
            check_threshold(self.threshold)

    def __init__(self, threshold: float = Config.threshold):
        self.threshold = threshold

    def check(self, it: IterationView) -> torch.Tensor:
        return relative_change(it.state, it.prev_state) < self.threshold


@register_exit("gate")
class GateExit(ExitCriterion):
    """A learned exit gate (model.exit_gate=true): stop once the cumulative halting probability
    1 - prod_{j<=r} (1 - lambda_j) reaches the threshold."""

    @dataclass
    class Config:
        threshold: float = 0.5  # exit when the halting probability reaches this

        def check(self, cfg) -> None:
            check_threshold(self.threshold, at_most=1.0)  # a probability; above 1: never
            if not cfg.model.exit_gate:
                raise ConfigError("exit.criterion=gate needs a model trained with "
                                  "model.exit_gate=true")

    def __init__(self, threshold: float = Config.threshold):
        self.threshold = threshold

    def init(self) -> None:
        self.survive: Optional[torch.Tensor] = None

    def check(self, it: IterationView) -> torch.Tensor:
        if it.gate is None:
            raise ValueError("exit criterion 'gate' needs a model built with model.exit_gate=true")
        lam = torch.sigmoid(it.gate(it.state).float())
        self.survive = (1 - lam) if self.survive is None else self.survive * (1 - lam)
        return 1 - self.survive >= self.threshold


@register_exit("max_loops")
class MaxLoopsExit(ExitCriterion):
    """Stop every token after `after` iterations."""

    @dataclass
    class Config:
        after: int = 1  # iterations every token runs

        def check(self, cfg) -> None:
            if self.after < 1:
                raise ConfigError(f"exit.after must be >= 1, got {self.after}")

    def __init__(self, after: int = Config.after):
        self.after = after

    def check(self, it: IterationView) -> torch.Tensor:
        done = it.r + 1 >= self.after
        return torch.full(it.state.shape[:2], done, dtype=torch.bool, device=it.state.device)


class RowBudget(ExitCriterion):
    """Not chosen by name: each row stops after its own loop count (B,), as a task asks for
    harder rows to run longer (train.loop_sampling.sampler=task). Composes with a criterion: a token
    stops at whichever comes first."""

    drop_rows_from = 0  # the training and scoring forwards run no cache

    def __init__(self, loops: torch.Tensor, inner: Optional[ExitCriterion] = None):
        self.loops, self.inner = loops, inner

    def init(self) -> None:
        if self.inner is not None:
            self.inner.init()

    def check(self, it: IterationView) -> torch.Tensor:
        stop = (it.r + 1 >= self.loops)[:, None].expand(it.state.shape[:2])
        return stop if self.inner is None else stop | self.inner.check(it)


def relative_change(state: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """||s_r - s_{r-1}|| / ||s_r|| per token (B, T)."""
    return (state - prev).float().norm(dim=-1) / state.float().norm(dim=-1).clamp_min(1e-12)


def build_exit(cfg) -> Optional[ExitCriterion]:
    """The criterion an exit config names, built with its knobs; None for 'none'."""
    criterion_cls = EXIT_CRITERIA.lookup(cfg.criterion)
    if criterion_cls is None:
        return None
    knobs = criterion_cls.Config.__dataclass_fields__ if hasattr(criterion_cls, "Config") else {}
    criterion = criterion_cls(**{k: getattr(cfg, k) for k in knobs})
    criterion.drop_rows_from = cfg.drop_rows_from
    return criterion


# ---------------------------------------------------------------------------------------------
# Training the gate: the entropy-regularised expected loss of Ouro / LoopLM.


def halting_distribution(gate_logits: torch.Tensor) -> torch.Tensor:
    """p_r = lambda_r prod_{j<r} (1 - lambda_j), the remainder on the last iteration.

    gate_logits: (R, B, T) -> p: (R, B, T), summing to 1 over R."""
    lam = torch.sigmoid(gate_logits.float())
    lam = torch.cat([lam[:-1], torch.ones_like(lam[-1:])])  # the last iteration takes the rest
    survive = torch.cumprod(torch.cat([torch.ones_like(lam[:1]), 1 - lam[:-1]]), dim=0)
    return lam * survive


def gate_loss(gate_logits: torch.Tensor, per_iter_loss: torch.Tensor, beta: float,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_r p_r L_r - beta H(p), averaged over tokens (where mask is true).

    gate_logits, per_iter_loss: (R, B, T); mask: (B, T) bool or None."""
    p = halting_distribution(gate_logits)
    expected = (p * per_iter_loss.float()).sum(0)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(0)
    per_token = expected - beta * entropy
    if mask is None:
        return per_token.mean()
    return per_token[mask].mean()
