"""How many loop iterations a training step runs, drawn per step.

Each sampler is a function (cfg, generator) -> R. The generator is seeded from (seed, step) only,
so a resumed run and every rank of a distributed run draw the same R at the same step.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from looped.errors import ConfigError
from looped.model.cross_layer import CROSS_LAYER_METHODS
from looped.registry import Registry


@dataclass
class LoopSamplingConfig:
    """How many iterations each training step runs (the `train.loop_sampling` node)."""

    # fixed (= loop) | uniform | poisson_lognormal | task (per-row counts the task gives; knobs:
    # each sampler's below)
    sampler: str = "fixed"

    def check(self, cfg) -> None:
        if not (self.sampler == "fixed" or cfg.model.share_weights):
            raise ConfigError("an unrolled model (model.share_weights=false) runs exactly `loop` "
                              "iterations; use train.loop_sampling.sampler=fixed")
        cross = cfg.model.cross_layer  # checked before this node: a known method
        if CROSS_LAYER_METHODS[cross.method].has_position_params(cross):
            top, held = max_sampled_loops(self, cfg.loop), cross.param_loops or cfg.loop
            if top > held:
                raise ConfigError(f"train.loop_sampling.sampler={self.sampler} draws up to {top} "
                                  f"iterations, but cross_layer.method={cross.method} has "
                                  f"parameters for {held}; set model.cross_layer.param_loops="
                                  f"{top}")


LoopSampler = Callable[[LoopSamplingConfig, int, torch.Generator], int]
LOOP_SAMPLERS = Registry("loop sampler", path="train.loop_sampling", selector="sampler",
                         base=LoopSamplingConfig)  # name -> LoopSampler
register_loop_sampler = LOOP_SAMPLERS.register


@register_loop_sampler("fixed")
def _fixed(cfg, loop: int, gen: torch.Generator) -> int:
    return loop


def _check_min_loops(min_loops: int, loop: int) -> None:
    if not 1 <= min_loops <= loop:
        raise ConfigError(f"train.loop_sampling.min_loops must be in [1, loop={loop}], got "
                          f"{min_loops}")


@dataclass
class UniformKnobs:
    min_loops: int = 1  # R ~ U{min_loops..loop}

    def check(self, cfg) -> None:
        _check_min_loops(self.min_loops, cfg.loop)


@dataclass
class PoissonLogNormalKnobs:
    min_loops: int = 1  # draws below are clipped up to it
    mean: float = 0.0  # E[R] - 1; 0 means loop - 1
    sigma: float = 0.5  # log-normal spread
    cap: int = 0  # draws above are clipped down to it; 0 means 2 * loop

    def check(self, cfg) -> None:
        _check_min_loops(self.min_loops, cfg.loop)
        for name in ("mean", "sigma"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ConfigError(f"train.loop_sampling.{name} must be >= 0 and finite, "
                                  f"got {getattr(self, name)}")
        if self.cap and self.cap < self.min_loops:
            raise ConfigError(f"train.loop_sampling.cap must be 0 or >= min_loops="
                              f"{self.min_loops}, got {self.cap}")


@register_loop_sampler("uniform", config=UniformKnobs)
def _uniform(cfg, loop: int, gen: torch.Generator) -> int:
    """R ~ Uniform{min_loops, ..., loop}."""
    return int(torch.randint(cfg.min_loops, loop + 1, (1,), generator=gen).item())


@register_loop_sampler("poisson_lognormal", config=PoissonLogNormalKnobs)
def _poisson_lognormal(cfg, loop: int, gen: torch.Generator) -> int:
    """Huginn's heavy-tailed draw: tau ~ N(log(m) - sigma^2 / 2, sigma), R = 1 + Poisson(e^tau),
    so E[R] = 1 + m with m = `mean` (or loop - 1 when mean is 0); clipped to
    [min_loops, cap] (cap 0: 2 * loop)."""
    m = cfg.mean if cfg.mean > 0 else max(loop - 1, 1e-3)
    mu = math.log(m) - cfg.sigma ** 2 / 2
    tau = mu + cfg.sigma * torch.randn((1,), generator=gen, dtype=torch.float64)
    r = 1 + int(torch.poisson(tau.exp(), generator=gen).item())
    return max(cfg.min_loops, min(cfg.cap or 2 * loop, r))


@register_loop_sampler("task")
def _per_row(cfg, loop: int, gen: torch.Generator) -> int:
    """Each row runs the loop count its task asks for (Batch.loops, e.g. proportional to its
    input's length; rows that finish early freeze). The step's R reported is `loop`; the
    trainer runs the batch's largest row count."""
    return loop


def max_sampled_loops(cfg, loop: int) -> int:
    """The largest loop count the sampler can draw."""
    return (cfg.cap or 2 * loop) if cfg.sampler == "poisson_lognormal" else loop


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator for (seed, step). The pair is hashed because torch's CPU generator keeps only
    32 bits of its seed, so packing seed and step side by side would drop the seed."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def sample_loops(cfg, loop: int, seed: int, step: int) -> int:
    """The loop count for training step `step`; identical for identical (seed, step)."""
    return LOOP_SAMPLERS[cfg.sampler](cfg, loop, step_generator(seed, step))
