"""Spearman and Pearson correlations with two-sided p-values, in numpy alone.

scipy is not a dependency of bergson_ray, but ``summary.csv`` carries the same
``spearman_p``/``pearson_p`` columns bergson fills from ``scipy.stats``. Both p-values are the
two-sided Student-t test of ``r`` with ``n - 2`` degrees of freedom (what scipy computes for
``spearmanr``, and equal to its exact beta form for ``pearsonr``); the t tail is a regularized
incomplete beta function, evaluated by its continued fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Correlation:
    statistic: float
    pvalue: float


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties getting their average rank (scipy's ``method='average'``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` for ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_test_pvalue(r: float, n: int) -> float:
    """Two-sided p-value of correlation ``r`` over ``n`` pairs (t with n - 2 dof)."""
    if not math.isfinite(r) or n < 2:
        return float("nan")
    df = n - 2
    if df == 0:
        return 1.0
    if abs(r) >= 1.0:
        return 0.0
    t2 = r * r * df / (1.0 - r * r)
    return betainc(df / 2.0, 0.5, df / (df + t2))


def pearson(x: np.ndarray, y: np.ndarray) -> Correlation:
    """Pearson's r (NaN when either side is constant, as scipy warns and returns)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} vs {len(y)} values")
    if len(x) < 2:
        return Correlation(float("nan"), float("nan"))
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0.0:
        return Correlation(float("nan"), float("nan"))
    r = max(-1.0, min(1.0, float(dx @ dy) / denom))
    return Correlation(r, t_test_pvalue(r, len(x)))


def spearman(x: np.ndarray, y: np.ndarray) -> Correlation:
    """Spearman's rho: Pearson's r of the (tie-averaged) ranks."""
    return pearson(rankdata(x), rankdata(y))
