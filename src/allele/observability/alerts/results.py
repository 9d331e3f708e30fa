"""
Results of the alert queries: alerts, phases, runs and an alert's context, as read back.

The frozen dataclasses :class:`Alert`, :class:`Phase`, :class:`RunRef` and
:class:`AlertContext` are what :class:`~.queries.Queries` returns;
:class:`AlertNotFoundError` (a ``LookupError``) is raised when an alert id is unknown.
The private helpers here are pure: they check filter arguments, quote MLflow filter
values and merge two records of one alert.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from typing import TYPE_CHECKING, Any

from .record import SEVERITIES

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = (
    "PHASE_FIELDS",
    "SEVERITIES",
    "Alert",
    "AlertContext",
    "AlertNotFoundError",
    "Phase",
    "RunRef",
    "merge_alerts",
    "parse_severities",
    "quote_filter_value",
    "to_ms",
)


class AlertNotFoundError(LookupError):
    """
    Raised when no run in the queried experiments holds the alert id.
    """


@dataclasses.dataclass(frozen=True)
class Alert:
    """
    One alert as stored (see the storage spec), merged over every run holding it.

    ``time`` and ``last_time`` are epoch milliseconds; ``run_ids`` are the runs, among
    those read, whose artifacts hold it (only the given run in a run-scoped query).
    """

    alert_id: str
    name: str
    severity: str
    message: str
    attributes: dict[str, Any]
    fingerprint: str
    time: int
    last_time: int
    occurrences: int
    run_id: str | None
    experiment: str | None
    phase: str | None
    phase_path: tuple[str, ...]
    step: int | None
    trace_id: str | None
    span_id: str | None
    host: str
    pid: int
    scope: str
    correlated_run_ids: tuple[str, ...]
    run_ids: tuple[str, ...]

    @classmethod
    def from_record(cls, rec: Mapping[str, Any], run_ids: tuple[str, ...]) -> Alert:
        """Build from one JSONL record; raise KeyError/TypeError/ValueError if malformed."""
        time = int(rec["time"])
        step = rec.get("step")
        return cls(
            alert_id=str(rec["alert_id"]),
            name=str(rec["name"]),
            severity=str(rec["severity"]),
            message=str(rec.get("message") or ""),
            attributes=dict(rec.get("attributes") or {}),
            fingerprint=str(rec.get("fingerprint") or ""),
            time=time,
            last_time=int(rec.get("last_time") or time),
            occurrences=int(rec.get("occurrences") or 1),
            run_id=rec.get("run_id"),
            experiment=rec.get("experiment"),
            phase=rec.get("phase"),
            phase_path=tuple(rec.get("phase_path") or ()),
            step=None if step is None else int(step),
            trace_id=rec.get("trace_id"),
            span_id=rec.get("span_id"),
            host=str(rec.get("host") or ""),
            pid=int(rec.get("pid") or 0),
            scope=str(rec.get("scope") or "run"),
            correlated_run_ids=tuple(rec.get("correlated_run_ids") or ()),
            run_ids=run_ids,
        )


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase (an OpenTelemetry span) of a run; times in epoch ms, ``end_time`` None if open."""

    name: str
    path: tuple[str, ...]
    trace_id: str | None
    span_id: str | None
    parent_span_id: str | None
    start_time: int
    end_time: int | None
    start_step: int | None
    end_step: int | None
    run_id: str | None


PHASE_FIELDS = tuple(f.name for f in dataclasses.fields(Phase))


@dataclasses.dataclass(frozen=True)
class RunRef:
    """A run as the queries report it; times in epoch ms, ``end_time`` None while running."""

    run_id: str
    run_name: str
    experiment_id: str
    experiment: str | None
    status: str
    start_time: int | None
    end_time: int | None
    host: str | None
    pid: int | None


@dataclasses.dataclass(frozen=True)
class AlertContext:
    """
    An alert with its runs, its phase and ``metrics[run_id][metric] = [(step, value)]``
    for the steps within ``window`` of ``steps[run_id]`` (the alert's step in its own
    run; elsewhere the run's step at the alert's time, from metric timestamps).
    """

    alert: Alert
    runs: tuple[RunRef, ...]
    phase: Phase | None
    steps: dict[str, int | None]
    metrics: dict[str, dict[str, list[tuple[int, float]]]]
    window: int


def to_ms(value: Any, field: str) -> float | None:
    """A time given as seconds, a datetime or None, in ms since the epoch (``field`` names it)."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp() * 1000.0  # a naive datetime is local time
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value) * 1000.0
    raise TypeError(f"{field} must be a datetime or epoch seconds, got {value!r}")


def parse_severities(severity: str | Iterable[str] | None) -> frozenset[str] | None:
    """The severities to keep (None: all); an unknown one is a ValueError."""
    if severity is None:
        return None
    wanted = frozenset([severity] if isinstance(severity, str) else severity)
    if not wanted or not wanted <= set(SEVERITIES):
        raise ValueError(f"severity must be among {SEVERITIES}, got {sorted(wanted)}")
    return wanted


def quote_filter_value(value: str) -> str:
    """``value`` quoted for an MLflow search filter."""
    if "'" in value:
        raise ValueError(f"{value!r} cannot be used in an MLflow filter")
    return f"'{value}'"


def merge_alerts(a: Alert, b: Alert) -> Alert:
    """Two records of one alert: the one with more occurrences (else ``b``), all run ids."""
    best = a if (a.occurrences, a.last_time) > (b.occurrences, b.last_time) else b
    return dataclasses.replace(best, run_ids=tuple(sorted({*a.run_ids, *b.run_ids})))
