"""Means with Student-t confidence intervals over seeds, paired differences and ratios (pure math).

Used by :mod:`megatron_pr2.compare` to say whether two routing methods differ at 95%: a
difference is *distinguishable* when its interval excludes 0 (a ratio's excludes 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence


def _t_density(x: float, df: int) -> float:
    log_norm = (math.lgamma((df + 1) / 2) - math.lgamma(df / 2)
                - 0.5 * math.log(df * math.pi))
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf_above_zero(x: float, df: int, steps: int = 600) -> float:
    """``P(0 <= T <= x)`` by Simpson's rule (the density is smooth)."""
    h = x / steps
    total = _t_density(0.0, df) + _t_density(x, df)
    for i in range(1, steps):
        total += (4 if i % 2 else 2) * _t_density(i * h, df)
    return total * h / 3


@functools.cache
def t_critical(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t critical value: ``P(|T_df| <= t) = level``."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 samples (df >= 1), got df={df}")
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    target = level / 2
    low, high = 0.0, 1.0
    while _t_cdf_above_zero(high, df) < target:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf_above_zero(mid, df) < target else (low, mid)
    return (low + high) / 2


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean over ``n`` samples and the half-width of its confidence interval (nan if n < 2)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes(self, value: float) -> bool:
        """The interval lies entirely on one side of ``value`` (False when undefined)."""
        return not math.isnan(self.half_width) and (self.low > value or self.high < value)

    def text(self, digits: int = 4) -> str:
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and t-interval half-width ``t * s / sqrt(n)`` of ``values``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_ci needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, float("nan"), n)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Interval(mean, t_critical(n - 1, level) * math.sqrt(var / n), n)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """Interval of ``mean(a_i - b_i)`` over paired samples (same seeds)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return mean_ci([x - y for x, y in zip(a, b)], level)


def ratio_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95):
    """Geometric-mean ratio ``a/b`` over paired samples with its interval ``(ratio, low, high)``.

    The interval is the t-interval of ``log(a_i / b_i)`` mapped back by ``exp``; None when a
    value is not positive.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if any(x <= 0 for x in a) or any(y <= 0 for y in b):
        return None
    log_ratio = mean_ci([math.log(x / y) for x, y in zip(a, b)], level)
    if math.isnan(log_ratio.half_width):
        return math.exp(log_ratio.mean), float("nan"), float("nan")
    return math.exp(log_ratio.mean), math.exp(log_ratio.low), math.exp(log_ratio.high)


def verdict(difference: Interval, higher_is_better: bool) -> str:
    """``better`` / ``worse`` / ``not distinguishable at 95%`` for a paired difference."""
    if not difference.excludes(0.0):
        return "not distinguishable at 95%"
    return "better" if (difference.mean > 0) == higher_is_better else "worse"
