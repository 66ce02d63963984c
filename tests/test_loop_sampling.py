"""Loop samplers: R per training step, a pure function of (seed, step), within its range."""

from __future__ import annotations

import math

import pytest
import torch

from looped.errors import ConfigError
from looped.training.loop_sampling import LOOP_SAMPLERS, sample_loops

from conftest import tiny_cfg


def loops_cfg(loop: int = 4, **kw):
    """cfg.train.loop_sampling of a validated tiny config (and the config's loop)."""
    cfg = tiny_cfg(loop=loop, extra=tuple(f"train.loop_sampling.{k}={v}" for k, v in kw.items()))
    return cfg.train.loop_sampling, cfg.loop


def draws(cfg, loop, seed, steps):
    return [sample_loops(cfg, loop, seed, s) for s in steps]


def test_registered_samplers():
    assert {"fixed", "uniform", "poisson_lognormal"} <= set(LOOP_SAMPLERS)


def test_fixed_returns_loop():
    cfg, loop = loops_cfg(loop=5, sampler="fixed")
    assert draws(cfg, loop, 3, range(20)) == [5] * 20
    assert sample_loops(cfg, 7, 0, 123) == 7


@pytest.mark.parametrize("sampler", ["uniform", "poisson_lognormal"])
def test_same_seed_and_step_give_the_same_r(sampler):
    cfg, loop = loops_cfg(loop=6, sampler=sampler)
    steps = list(range(0, 200, 7))
    first = draws(cfg, loop, 11, steps)
    # interleave other draws and global RNG use: nothing but (seed, step) matters
    torch.manual_seed(123)
    torch.rand(10)
    draws(cfg, loop, 12, steps)
    assert draws(cfg, loop, 11, steps) == first
    assert draws(cfg, loop, 11, reversed(steps)) == first[::-1]
    assert len(set(first)) > 1
    # another seed gives another sequence
    assert draws(cfg, loop, 12, steps) != first


@pytest.mark.parametrize("min_loops", [1, 3])
def test_uniform_varies_within_min_loops_and_loop(min_loops):
    cfg, loop = loops_cfg(loop=6, sampler="uniform", min_loops=min_loops)
    got = draws(cfg, loop, 0, range(50))
    assert len(set(got)) > 1
    assert all(min_loops <= r <= 6 for r in got)
    # over more steps every value in the range shows up
    assert set(draws(cfg, loop, 1, range(400))) == set(range(min_loops, 7))


@pytest.mark.parametrize("kw,low,high", [
    (dict(), 1, 8),  # cap 0: clipped at 2 * loop
    (dict(cap=5, min_loops=2), 2, 5),
    (dict(mean=12.0), 1, 8),  # a large mean piles up at the clip
])
def test_poisson_lognormal_stays_in_range(kw, low, high):
    cfg, loop = loops_cfg(loop=4, sampler="poisson_lognormal", **kw)
    got = draws(cfg, loop, 5, range(300))
    assert all(low <= r <= high for r in got), (min(got), max(got))
    assert len(set(got)) > 2
    assert max(got) == high  # the clip is reached (heavy tail), so the bound is really tested


@pytest.mark.parametrize("loop,mean", [(4, 0.0), (4, 2.5), (8, 0.0)])
def test_poisson_lognormal_mean_is_one_plus_mean(loop, mean):
    """E[R] = 1 + m (m = mean, or loop - 1 when mean is 0), with the clip out of the way."""
    cfg, _ = loops_cfg(loop=loop, sampler="poisson_lognormal", mean=mean, cap=1000)
    m = mean if mean > 0 else loop - 1
    got = torch.tensor(draws(cfg, loop, 2, range(3000)), dtype=torch.float64)
    # sd of R: Var = m + m^2 (e^{sigma^2} - 1) for sigma 0.5 -> standard error ~ sd / sqrt(3000)
    sd = math.sqrt(m + m * m * (math.exp(0.25) - 1))
    assert abs(got.mean().item() - (1 + m)) <= 4 * sd / math.sqrt(3000) + 0.05
    assert got.min() >= 1


def test_sampler_config_is_validated():
    with pytest.raises(ConfigError, match="sampler"):
        loops_cfg(sampler="nope")
    with pytest.raises(ConfigError, match="min_loops"):
        loops_cfg(loop=4, sampler="uniform", min_loops=5)
    with pytest.raises(ConfigError, match="unrolled"):
        tiny_cfg(loop=3, share_weights="false", extra=("train.loop_sampling.sampler=uniform",))
