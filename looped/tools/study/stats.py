"""Statistics over seeds: mean, sample standard deviation, range, and Student-t intervals.

Written out in the standard library so that the study runner needs no scipy: the t quantile is
found by bisection on the t CDF, which is a regularised incomplete beta function evaluated by
its continued fraction (Numerical Recipes, section 6.4).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

_EPS = 1e-15
_MAX_TERMS = 300


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, _MAX_TERMS):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df >= 1 degrees of freedom (0 < p < 1)."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass
class Spread:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); nan for one value
    min: float
    max: float
    ci_low: float  # 95% Student-t interval of the mean; nan for one value
    ci_high: float


def spread(values: list[float], level: float = 0.95) -> Spread:
    """Mean, sample std, range and the Student-t interval of the mean of `values`."""
    n = len(values)
    if n == 0:
        raise ValueError("spread of no values")
    mean = statistics.fmean(values)
    if n == 1:
        return Spread(1, mean, math.nan, values[0], values[0], math.nan, math.nan)
    std = statistics.stdev(values)
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Spread(n, mean, std, min(values), max(values), mean - half, mean + half)


def paired_values(values: dict[int, float], reference: dict[int, float]) -> list[float]:
    """value - reference for each seed both have, in seed order."""
    return [values[s] - reference[s] for s in sorted(set(values) & set(reference))]


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> Spread:
    """Spread of value - reference over the seeds both have (a paired comparison: each seed's
    runs share their data order and initial draw)."""
    diffs = paired_values(values, reference)
    if not diffs:
        raise ValueError("no seed in common")
    return spread(diffs)
