"""
One alert as it is stored, and the category of an error that ended a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._core.runs import Run

__all__ = ("SEVERITIES", "AlertRecord", "categorize")

SEVERITIES = ("info", "warning", "error", "critical")


class AlertRecord:
    """
    One alert as it will be stored; ``occurrences`` grows while identical alerts fold in.
    """

    __slots__ = (
        "alert_id",
        "attributes",
        "correlated",
        "fingerprint",
        "host",
        "last_time",
        "message",
        "name",
        "occurrences",
        "phase_path",
        "pid",
        "run",
        "severity",
        "span_id",
        "step",
        "time",
        "trace_id",
    )

    alert_id: str
    attributes: dict[str, Any]
    correlated: list[tuple[Run, int]]
    fingerprint: str
    host: str
    last_time: int
    message: str
    name: str
    occurrences: int
    phase_path: tuple[str, ...]
    pid: int
    run: Run | None
    severity: str
    span_id: str | None
    step: int | None
    time: int
    trace_id: str | None

    def __init__(self, **fields: Any) -> None:
        for key, value in fields.items():
            setattr(self, key, value)

    def to_json(self, run_id_of: Callable[[Run], str | None]) -> dict[str, Any]:
        """The stored form; ``run_id_of(run)`` resolves a run to its MLflow id (or None)."""
        run = self.run
        return {
            "alert_id": self.alert_id,
            "name": self.name,
            "severity": self.severity,
            "message": self.message,
            "attributes": self.attributes,
            "fingerprint": self.fingerprint,
            "time": self.time,
            "last_time": self.last_time,
            "occurrences": self.occurrences,
            "run_id": run_id_of(run) if run is not None else None,
            "run_key": run.key if run is not None else None,
            "experiment": run.experiment if run is not None else None,
            "phase": self.phase_path[-1] if self.phase_path else None,
            "phase_path": list(self.phase_path),
            "step": self.step,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "host": self.host,
            "pid": self.pid,
            "scope": "run" if run is not None else "process",
            "correlated_run_ids": [run_id_of(r) for r, _ in self.correlated],
            "correlated_run_keys": [r.key for r, _ in self.correlated],
        }


def categorize(exc: BaseException) -> str:  # noqa: PLR0911 - one line per category
    """The category of an exception that ended a run (for the error alert)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, MemoryError):
        return "resource"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ArithmeticError):
        return "numeric"
    if isinstance(exc, (ValueError, TypeError, KeyError, IndexError)):
        return "input"
    if isinstance(exc, ImportError):
        return "environment"
    if isinstance(exc, OSError):
        return "io"
    return "runtime"
