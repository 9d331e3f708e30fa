"""
One alert as it is stored, the checks an alert passes at the call, and the category of an
error that ended a run.

Every check the store side could fail on runs at the call (:func:`check_alert`): the
name's tag key (``allele.alerts.name.<key>``) is computed here exactly as
:func:`~.store.prepare_alerts` uses it, so a name it could not store is refused at the call.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._core.names import check_utf8, sanitize_key

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._core.runs import Run

__all__ = (
    "MAX_ALERT_BYTES",
    "NAME_KEY_LENGTH",
    "SEVERITIES",
    "AlertRecord",
    "alert_key",
    "categorize",
    "check_alert",
)

SEVERITIES = ("info", "warning", "error", "critical")
#: the longest alert-name part of the tag ``allele.alerts.name.<key>``
NAME_KEY_LENGTH = 200
#: the largest name, message and attributes of one alert, together, as ASCII JSON (an
#: alert is a small record; many go into one stored chunk and one spool record)
MAX_ALERT_BYTES = 64 * 1024


def alert_key(name: str) -> str:
    """
    The key of an alert name in the tag ``allele.alerts.name.<key>``: the name sanitised
    as an MLflow key, cut to ``NAME_KEY_LENGTH`` characters and sanitised again (a cut can
    leave a trailing ``/`` or a ``.`` segment). Deterministic, so the store side gets the
    key the call checked.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: ``name`` is empty, has no character a key can hold (``"/"``) or holds
            a lone surrogate.
    """
    key = sanitize_key(name, "alert name")
    check_utf8("alert name", name)  # the fingerprint hashes its UTF-8
    if len(key) > NAME_KEY_LENGTH:
        key = sanitize_key(key[:NAME_KEY_LENGTH], "alert name")
    return key


def check_alert(
    name: object, severity: object, message: object, attributes: object
) -> tuple[str, str, str, dict[str, Any]]:
    """
    Check an alert (``obs.alert`` or a detector's finding) at the call and return
    ``(name, severity, message, attributes)`` as stored: the message as text, the
    attributes as a fresh copy of plain JSON data (values JSON cannot hold become ``str``).

    Raises:
        TypeError: the name is not a str, the attributes not a mapping with str keys or
            not JSON-serialisable (nested keys of other types, a reference cycle).
        ValueError: an empty name or one with no valid character, an unknown severity, or
            name, message and attributes together larger than ``MAX_ALERT_BYTES`` as JSON.
    """
    if not isinstance(name, str):
        raise TypeError(f"alert name must be a str, got {type(name).__name__}: {name!r}")
    alert_key(name)
    if severity not in SEVERITIES:
        raise ValueError(f"alert {name!r}: severity must be one of {SEVERITIES}, got {severity!r}")
    text = str(message)
    attrs: dict[str, Any] = {}
    if attributes:
        if not isinstance(attributes, Mapping):
            raise TypeError(
                f"alert {name!r}: attributes must be a mapping, got {type(attributes).__name__}"
            )
        if any(not isinstance(k, str) for k in attributes):
            keys = list(attributes)
            raise TypeError(f"alert {name!r}: attribute keys must be str, got {keys!r}")
        try:  # a stored, immutable copy
            attrs = json.loads(json.dumps(dict(attributes), default=str))
        except (TypeError, ValueError, RecursionError) as exc:
            raise TypeError(
                f"alert {name!r}: attributes must be JSON-serialisable: {exc}"
            ) from None
    size = len(json.dumps(name)) + len(json.dumps(text)) + len(json.dumps(attrs))
    if size > MAX_ALERT_BYTES:
        raise ValueError(
            f"alert {name!r}: name, message and attributes are {size} bytes as JSON; "
            f"an alert holds at most {MAX_ALERT_BYTES} (put bulk data in an artifact)"
        )
    return name, str(severity), text, attrs


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
