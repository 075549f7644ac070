"""Student's t distribution, for intervals from a few measurements (3 seeds, 8 rounds): the standard
library and nothing else (the environment has no SciPy, and the serving side may lack NumPy's extras).

    ppf(0.975, 4)            # 2.776: the two-sided 95 % quantile with 4 degrees of freedom
    two_sided_p(2.776, 4)    # 0.050
    cdf(1.0, 2.5)            # degrees of freedom need not be whole (Welch-Satterthwaite gives fractions)

The CDF comes from the regularized incomplete beta function, P(|T| > t) = I_x(df/2, 1/2) with
x = df / (df + t^2), evaluated by its continued fraction (modified Lentz, as in Numerical Recipes
6.4); the quantile inverts the CDF by bisection, which cannot fail to converge. Infinite degrees of
freedom give the normal distribution. tests/test_study_science.py checks it against printed t tables.
"""
from __future__ import annotations

import math
from statistics import NormalDist

_EPS = 1e-15
_TINY = 1e-300


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom (df > 0; math.inf: the normal)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(df):
        return 2.0 * NormalDist().cdf(-abs(t))
    if math.isinf(t):
        return 0.0
    return min(1.0, betainc(df / 2.0, 0.5, df / (df + t * t)))


def cdf(t: float, df: float) -> float:
    """P(T <= t)."""
    tail = two_sided_p(t, df) / 2.0
    return 1.0 - tail if t > 0 else tail


def ppf(q: float, df: float) -> float:
    """The quantile: the t with P(T <= t) = q, for 0 < q < 1."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if math.isinf(df):
        return NormalDist().inv_cdf(q)
    if q < 0.5:
        return -ppf(1.0 - q, df)
    if q == 0.5:
        return 0.0
    tail = 2.0 * (1.0 - q)            # the two-sided p-value that the quantile leaves
    lo, hi = 0.0, 1.0
    while two_sided_p(hi, df) > tail:  # bracket it
        lo, hi = hi, 2.0 * hi
    for _ in range(200):               # bisection to the last few bits of a float
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if two_sided_p(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
