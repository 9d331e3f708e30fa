"""
Detectors: small state machines that watch metric streams and say which alerts to raise.

Each detector is fed every metric point with :meth:`Detector.observe` and returns the
:class:`Finding` objects to raise as alerts (usually none). They are pure: no I/O, no
clock, no dependency beyond the standard library, O(1) work per point. State is kept per
``(run_key, metric)``; :meth:`Detector.reset` forgets a run's state when it ends.
Detectors are not thread-safe: feed each from one thread or behind one lock.

Metric selectors are :func:`fnmatch.fnmatchcase` globs. Every detector except
:class:`NonFinite` ignores NaN and +-inf points. The alert name is stable per detector:
``<metric>.<kind>`` for a plain metric name, ``metric.<kind>`` for a glob (the concrete
metric is always in the attributes), or the ``alert_name`` given.

``ALLELE_MLFLOW_DETECTORS`` holds a JSON array parsed by :func:`parse_detectors`::

    [{"type": "stagnation", "metric": "fitness.best", "window": 20},
     {"type": "non_finite"}]
"""

from __future__ import annotations

import json
import math
from collections import deque
from fnmatch import fnmatchcase
from typing import Any, ClassVar, NamedTuple

__all__ = (
    "DETECTOR_TYPES",
    "Detector",
    "Finding",
    "NonFinite",
    "Regression",
    "Stagnation",
    "Threshold",
    "ZScore",
    "parse_detectors",
)

_SEVERITIES = ("info", "warning", "error", "critical")
_DIRECTIONS = {"max": "max", "maximize": "max", "min": "min", "minimize": "min"}


class Finding(NamedTuple):
    """
    An alert a detector asks to raise.
    """

    #: the alert name (stable per detector)
    name: str
    #: "info", "warning", "error" or "critical"
    severity: str
    #: a human-readable sentence
    message: str
    #: JSON-ready details: always ``metric``, ``step``, ``value`` and ``detector``
    attributes: dict[str, Any]


def _number(value: Any, field: str, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{field} must be >= {minimum:g}, got {value!r}")
    return float(value)


def _integer(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
    return value


def _json_value(value: float) -> float | str:
    """A metric value as JSON allows it: non-finite values become "nan", "inf", "-inf"."""
    return value if math.isfinite(value) else str(value)


class Detector:
    """
    Base of the built-in detectors: selector matching, naming and per-series state.

    Args:
        metric: a metric name or glob.
        severity: the severity of the alerts raised.
        name: the detector's name (default ``<kind>(<metric>)``).
        alert_name: the alert name (default: see the module docstring).
    """

    #: the ``type`` in ``ALLELE_MLFLOW_DETECTORS`` and the alert-name suffix
    kind: ClassVar[str] = ""
    #: the last part of the default alert name
    suffix: ClassVar[str] = ""
    #: the detector's own keyword arguments (besides severity, name and alert_name)
    fields: ClassVar[tuple[str, ...]] = ("metric",)

    def __init__(
        self,
        metric: str,
        *,
        severity: str = "warning",
        name: str | None = None,
        alert_name: str | None = None,
    ) -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must be a non-empty str (name or glob), got {metric!r}")
        if severity not in _SEVERITIES:
            raise ValueError(f"severity must be one of {_SEVERITIES}, got {severity!r}")
        for field, text in (("name", name), ("alert_name", alert_name)):
            if text is not None and (not isinstance(text, str) or not text):
                raise ValueError(f"{field} must be a non-empty str, got {text!r}")
        self.metric = metric
        self.severity = severity
        self.name = name or f"{self.kind}({metric})"
        is_glob = any(c in metric for c in "*?[")
        self.alert_name = alert_name or f"{'metric' if is_glob else metric}.{self.suffix}"
        self._matches: dict[str, bool] = {}
        self._state: dict[tuple[str, str], Any] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, alert_name={self.alert_name!r})"

    def observe(self, run_key: str, name: str, value: float, step: int) -> list[Finding]:
        """
        Feed one metric point; return the alerts to raise (most often an empty list).
        """
        matched = self._matches.get(name)
        if matched is None:
            matched = self._matches[name] = fnmatchcase(name, self.metric)
        if not matched:
            return []
        value = float(value)
        if not math.isfinite(value) and self.kind != "non_finite":
            return []
        key = (run_key, name)
        state = self._state.get(key)
        if state is None:
            state = self._state[key] = self._new_state()
        return self._check(state, name, value, step)

    def reset(self, run_key: str | None = None) -> None:
        """Forget the state of one run (or of every run)."""
        if run_key is None:
            self._state.clear()
        else:
            for key in [k for k in self._state if k[0] == run_key]:
                del self._state[key]

    def _finding(self, metric: str, value: float, step: int, message: str, **extra: Any) -> Finding:
        attributes = {
            "metric": metric,
            "step": step,
            "value": _json_value(value),
            "detector": self.name,
            **extra,
        }
        return Finding(self.alert_name, self.severity, message, attributes)

    def _new_state(self) -> Any:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def _check(self, state: Any, metric: str, value: float, step: int) -> list[Finding]:
        raise NotImplementedError  # pragma: no cover


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


#: ``type`` in ``ALLELE_MLFLOW_DETECTORS`` -> detector class
DETECTOR_TYPES: dict[str, type[Detector]] = {
    cls.kind: cls for cls in (NonFinite, Threshold, Stagnation, Regression, ZScore)
}


def parse_detectors(text: str) -> list[Detector]:
    """
    Build detectors from ``ALLELE_MLFLOW_DETECTORS``: a JSON array of objects with a
    ``type`` (one of :data:`DETECTOR_TYPES`) and the detector's keyword arguments. An
    empty string gives no detectors.

    Raises:
        ValueError: naming the entry (by index and type) and the bad field.
    """
    if not text.strip():
        return []
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"detectors: invalid JSON: {exc}") from None
    if not isinstance(entries, list):
        # ValueError throughout: a bad setting is a bad value, whatever its JSON type.
        raise ValueError(f"detectors: expected a JSON array, got {type(entries).__name__}")  # noqa: TRY004
    detectors: list[Detector] = []
    for index, entry in enumerate(entries):
        where = f"detectors[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {entry!r}")  # noqa: TRY004
        options = dict(entry)
        kind = options.pop("type", None)
        if kind not in DETECTOR_TYPES:
            raise ValueError(
                f"{where}: 'type' must be one of {sorted(DETECTOR_TYPES)}, got {kind!r}"
            )
        cls = DETECTOR_TYPES[kind]
        where = f"{where} ({kind})"
        if cls is NonFinite and "metric" in options:
            options.setdefault("metrics", options.pop("metric"))
        allowed = (*cls.fields, "severity", "name", "alert_name")
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; expected some of {allowed}")
        if cls is not NonFinite and "metric" not in options:
            raise ValueError(f"{where}: missing field 'metric'")
        try:
            detectors.append(cls(**options))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return detectors
