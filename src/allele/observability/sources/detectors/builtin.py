"""
The built-in detectors: non-finite values, thresholds, stagnation, regressions and spikes.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from .base import Detector, Finding, _integer, _number

__all__ = ("NonFinite", "Regression", "Stagnation", "Threshold", "ZScore")

_DIRECTIONS = {"max": "max", "maximize": "max", "min": "min", "minimize": "min"}


class NonFinite(Detector):
    """
    NaN or +-inf in a metric: ``metric.non_finite`` (error), once per non-finite episode.

    It fires when a series turns non-finite and again only after a finite point.
    """

    kind = "non_finite"
    suffix = "non_finite"
    fields = ("metrics",)

    def __init__(
        self,
        metrics: str = "*",
        *,
        severity: str = "error",
        name: str | None = None,
        alert_name: str | None = None,
    ) -> None:
        super().__init__(
            metrics, severity=severity, name=name, alert_name=alert_name or "metric.non_finite"
        )

    def _new_state(self) -> list[bool]:
        return [False]  # inside a non-finite episode

    def _check(self, state: list[bool], metric: str, value: float, step: int) -> list[Finding]:
        if math.isfinite(value):
            state[0] = False
            return []
        if state[0]:
            return []
        state[0] = True
        return [self._finding(metric, value, step, f"{metric} is {value} at step {step}")]


class Threshold(Detector):
    """
    A metric above ``above`` or below ``below``; fires once per excursion out of bounds
    (crossing straight from above to below is a new excursion).
    """

    kind = "threshold"
    suffix = "threshold"
    fields = ("metric", "above", "below")

    def __init__(
        self,
        metric: str,
        *,
        above: float | None = None,
        below: float | None = None,
        severity: str = "warning",
        name: str | None = None,
        alert_name: str | None = None,
    ) -> None:
        super().__init__(metric, severity=severity, name=name, alert_name=alert_name)
        if above is None and below is None:
            raise ValueError("threshold needs 'above' or 'below' (or both)")
        self.above = None if above is None else _number(above, "above")
        self.below = None if below is None else _number(below, "below")

    def _new_state(self) -> list[str | None]:
        return [None]  # the side of the current excursion

    def _check(
        self, state: list[str | None], metric: str, value: float, step: int
    ) -> list[Finding]:
        if self.above is not None and value > self.above:
            bound, relation = self.above, "above"
        elif self.below is not None and value < self.below:
            bound, relation = self.below, "below"
        else:
            state[0] = None
            return []
        if state[0] == relation:
            return []
        state[0] = relation
        message = f"{metric} = {value:g} is {relation} {bound:g} at step {step}"
        return [self._finding(metric, value, step, message, **{relation: bound})]


class Stagnation(Detector):
    """
    The best value of a metric has not improved by more than ``min_delta`` for ``window``
    steps. Fires once per stagnation episode, and again only after an improvement.
    """

    kind = "stagnation"
    suffix = "stagnation"
    fields = ("metric", "window", "direction", "min_delta")

    def __init__(
        self,
        metric: str,
        *,
        window: int = 20,
        direction: str = "max",
        min_delta: float = 0.0,
        severity: str = "warning",
        name: str | None = None,
        alert_name: str | None = None,
    ) -> None:
        super().__init__(metric, severity=severity, name=name, alert_name=alert_name)
        self.window = _integer(window, "window", 1)
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be 'max' or 'min', got {direction!r}")
        self.direction = _DIRECTIONS[direction]
        self.min_delta = _number(min_delta, "min_delta", minimum=0.0)

    def _new_state(self) -> list[Any]:
        return [None, 0, False]  # best value, its step, fired in this episode

    def _check(self, state: list[Any], metric: str, value: float, step: int) -> list[Finding]:
        best, best_step, fired = state
        sign = 1.0 if self.direction == "max" else -1.0
        if best is None or sign * (value - best) > self.min_delta:
            state[:] = [value, step, False]
            return []
        if fired or step - best_step < self.window:
            return []
        state[2] = True
        message = (
            f"{metric} has not improved on {best:g} (step {best_step}) for {step - best_step} steps"
        )
        return [
            self._finding(
                metric, value, step, message, best=best, best_step=best_step, window=self.window
            )
        ]


class Regression(Detector):
    """
    A sudden drop: the metric got worse than the previous point by more than ``drop``,
    relative to ``|previous|`` (absolute when the previous value is 0). Fires at each such
    step; ``direction="min"`` treats a rise as the drop.
    """

    kind = "regression"
    suffix = "regression"
    fields = ("metric", "drop", "direction")

    def __init__(
        self,
        metric: str,
        *,
        drop: float = 0.1,
        direction: str = "max",
        severity: str = "warning",
        name: str | None = None,
        alert_name: str | None = None,
    ) -> None:
        super().__init__(metric, severity=severity, name=name, alert_name=alert_name)
        self.drop = _number(drop, "drop", minimum=0.0)
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be 'max' or 'min', got {direction!r}")
        self.direction = _DIRECTIONS[direction]

    def _new_state(self) -> list[Any]:
        return [None, 0]  # previous value, its step

    def _check(self, state: list[Any], metric: str, value: float, step: int) -> list[Finding]:
        previous, previous_step = state
        state[:] = [value, step]
        if previous is None:
            return []
        worse = previous - value if self.direction == "max" else value - previous
        relative = worse / (abs(previous) or 1.0)
        if relative <= self.drop:
            return []
        message = (
            f"{metric} went from {previous:g} (step {previous_step}) to {value:g} "
            f"at step {step}: {relative:.1%} worse"
        )
        return [
            self._finding(
                metric,
                value,
                step,
                message,
                previous=previous,
                previous_step=previous_step,
                drop=relative,
            )
        ]


class _Window:
    """The last ``size`` values with running sums shifted by ``shift`` (numerically safe)."""

    __slots__ = ("added", "shift", "sum", "sumsq", "values")

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.shift = 0.0
        self.sum = 0.0
        self.sumsq = 0.0
        self.added = 0

    def push(self, value: float) -> None:
        values = self.values
        if len(values) == values.maxlen:
            old = values[0] - self.shift
            self.sum -= old
            self.sumsq -= old * old
        values.append(value)
        d = value - self.shift
        self.sum += d
        self.sumsq += d * d
        self.added += 1
        if self.added >= len(values) and len(values) == values.maxlen:
            # Recompute around the current mean once per window: amortised O(1), no drift.
            self.added = 0
            self.shift = math.fsum(values) / len(values)
            self.sum = math.fsum(v - self.shift for v in values)
            self.sumsq = math.fsum((v - self.shift) ** 2 for v in values)

    def mean_std(self) -> tuple[float, float]:
        n = len(self.values)
        mean = self.sum / n
        return self.shift + mean, math.sqrt(max(self.sumsq / n - mean * mean, 0.0))


class ZScore(Detector):
    """
    A spike: ``|value - mean| / std`` of the previous ``window`` points exceeds
    ``threshold``. Needs a full window first; a window with no spread never fires.
    """

    kind = "zscore"
    suffix = "spike"
    fields = ("metric", "window", "threshold")

    def __init__(
        self,
        metric: str,
        *,
        window: int = 30,
        threshold: float = 4.0,
        severity: str = "warning",
        name: str | None = None,
        alert_name: str | None = None,
    ) -> None:
        super().__init__(metric, severity=severity, name=name, alert_name=alert_name)
        self.window = _integer(window, "window", 2)
        self.threshold = _number(threshold, "threshold", minimum=0.0)

    def _new_state(self) -> _Window:
        return _Window(self.window)

    def _check(self, state: _Window, metric: str, value: float, step: int) -> list[Finding]:
        found: list[Finding] = []
        if len(state.values) == self.window:
            mean, std = state.mean_std()
            if std > 1e-12 * max(1.0, abs(mean)):
                z = (value - mean) / std
                if abs(z) > self.threshold:
                    message = f"{metric} = {value:g} at step {step} is {z:+.1f} sigma from {mean:g}"
                    found.append(
                        self._finding(metric, value, step, message, z=z, mean=mean, std=std)
                    )
        state.push(value)
        return found
