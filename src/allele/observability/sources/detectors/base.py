"""
The detector base class, its :class:`Finding` and the small validation helpers.

:class:`Detector` does selector matching, alert naming and per-``(run_key, metric)``
state; subclasses (see :mod:`.builtin`) only create and check that state.
"""

from __future__ import annotations

import functools
import logging
import math
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable

__all__ = ("Detector", "Finding", "release_runs", "run_isolated")

logger = logging.getLogger("allele.observability")


def run_isolated(detectors: list[Any], feed: Callable[[Any], object]) -> None:
    """
    Call ``feed(detector)`` for each detector; one that raises is removed from
    ``detectors`` with one warning (its traceback), and the others go on.
    """
    for detector in list(detectors):
        try:
            feed(detector)
        except Exception:
            detectors.remove(detector)
            logger.exception(
                "allele-observability: detector %r failed and is disabled; the other "
                "detectors and delivery go on",
                detector,
            )


_SEVERITIES = ("info", "warning", "error", "critical")


def release_runs(detectors: list[Any], keys: deque[str]) -> None:
    """Forget the per-series state of the runs in ``keys`` (which is emptied)."""
    for _ in range(len(keys)):
        key = keys.popleft()
        if detectors:
            run_isolated(detectors, functools.partial(_reset, key=key))


def _reset(detector: Any, key: str) -> None:
    reset = getattr(detector, "reset", None)
    if reset is not None:
        reset(key)


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
