"""
Welch's t-test without scipy.

The two-sided p-value of Student's t with ``dof`` degrees of freedom is the regularized
incomplete beta function ``I_x(dof/2, 1/2)`` at ``x = dof / (dof + t**2)``; the function
is evaluated with the continued fraction of Numerical Recipes (Press et al., 3rd ed.,
section 6.4, ``betacf``), using the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)`` so that
the fraction always converges quickly. Accuracy is about 1e-12 relative (1e-9 when a
shape parameter is in the hundreds of thousands).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ("betainc", "student_t_cdf", "welch_t_test")

_EPS = 1e-15
_TINY = 1e-300
_MAX_ITER = 10_000


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_ITER + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b})")


def betainc(a: float, b: float, x: float) -> float:
    """
    Return the regularized incomplete beta function ``I_x(a, b)``.

    Args:
        a: first shape parameter, > 0.
        b: second shape parameter, > 0.
        x: the point, in [0, 1].

    Raises:
        ValueError: a parameter out of range.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a > 0 and b > 0, got a={a!r}, b={b!r}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got x={x!r}")
    if x in {0.0, 1.0}:
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, dof: float) -> float:
    """
    Return ``P(T <= t)`` for Student's t distribution with ``dof`` (> 0, may be fractional).
    """
    if not dof > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {dof!r}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t > 0 else tail


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mean = math.fsum(xs) / n
    return mean, math.fsum((x - mean) ** 2 for x in xs) / (n - 1)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """
    Welch's unequal-variances t-test of ``mean(a) == mean(b)``.

    Returns:
        ``(t, dof, p_value)`` with a two-sided p-value; ``t > 0`` when ``a``'s mean is larger.
        When both samples have zero variance, ``t`` is 0 (equal means, p = 1) or +-inf
        (p = 0) and ``dof`` is ``len(a) + len(b) - 2``.

    Raises:
        ValueError: fewer than two values in a sample, or a non-finite value.
    """
    xs = [float(v) for v in a]
    ys = [float(v) for v in b]
    if len(xs) < 2 or len(ys) < 2:
        raise ValueError(
            f"welch_t_test needs at least 2 values per sample, got {len(xs)} and {len(ys)}"
        )
    if not all(math.isfinite(v) for v in (*xs, *ys)):
        raise ValueError("welch_t_test needs finite values")
    ma, va = _mean_var(xs)
    mb, vb = _mean_var(ys)
    sa, sb = va / len(xs), vb / len(ys)
    se2 = sa + sb
    if se2 == 0.0:
        dof = float(len(xs) + len(ys) - 2)
        if ma == mb:
            return 0.0, dof, 1.0
        return math.copysign(math.inf, ma - mb), dof, 0.0
    t = (ma - mb) / math.sqrt(se2)
    dof = se2 * se2 / (sa * sa / (len(xs) - 1) + sb * sb / (len(ys) - 1))
    p = betainc(dof / 2.0, 0.5, dof / (dof + t * t))
    return t, dof, min(1.0, p)
