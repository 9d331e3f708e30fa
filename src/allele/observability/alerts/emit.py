"""
Alerts, phases and error capture: the emit side.

``obs.alert`` stamps an alert with its context (run, experiment, phase path, step,
OpenTelemetry trace and span ids, host, pid, time), folds identical alerts raised within
``ALERT_DEDUPE_WINDOW`` seconds into one record with an exact ``occurrences`` count
(critical alerts are never folded), and puts it on the control lane, which is never
sampled. An alert raised outside any run is correlated to every run active in the
process at that moment.

``obs.phase`` is an OpenTelemetry span; when it ends, a phase record (name, path, ids,
start and end time and step) goes to the run, so a time or a step maps to a phase.

Where both land in MLflow is described in ``docs/alerts.md`` (the storage contract the
queries in :mod:`allele.observability.queries` read).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from .._core.context import CURRENT_RUN

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from .._core.runs import Run
    from ..config import Settings

__all__ = ("CURRENT_PHASES", "SEVERITIES", "AlertRecord", "Alerting", "categorize")

SEVERITIES = ("info", "warning", "error", "critical")
#: the phase path (outermost first) of the current context
CURRENT_PHASES: ContextVar[tuple[str, ...]] = ContextVar("allele_phases", default=())


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

    def to_json(self, run_id_of: Any) -> dict[str, Any]:
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


def _span_ids() -> tuple[str | None, str | None]:
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


class Alerting:
    """Alert and phase methods of ``Observability`` (a mixin over the bus)."""

    settings: Settings
    _closed: bool

    def _init_alerting(self) -> None:
        self._alert_lock = threading.Lock()
        self._folds: dict[tuple[str, str, str, str], AlertRecord] = {}
        self._host = socket.gethostname()
        self._tracer: Any = None

    def alert(
        self,
        name: str,
        *,
        severity: str = "info",
        message: str = "",
        attributes: Mapping[str, Any] | None = None,
    ) -> str:
        """
        Raise an alert; returns its id (the id of the record it folded into, if any).

        Raises:
            ValueError: ``name`` is empty or ``severity`` is not one of
                info, warning, error, critical.
            TypeError: ``attributes`` is not a mapping with str keys.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"alert name must be a non-empty str, got {name!r}")
        if severity not in SEVERITIES:
            raise ValueError(f"alert severity must be one of {SEVERITIES}, got {severity!r}")
        attrs: dict[str, Any] = {}
        if attributes:
            if any(not isinstance(k, str) for k in attributes):
                keys = list(attributes)
                raise TypeError(f"alert {name!r}: attribute keys must be str, got {keys!r}")
            # a stored, immutable copy
            attrs = json.loads(json.dumps(dict(attributes), default=str))
        run = CURRENT_RUN.get()
        return self._raise_alert(
            name, severity, str(message), attrs, run, run.step if run else None,
            CURRENT_PHASES.get(),
        )  # fmt: skip

    def _raise_alert(
        self,
        name: str,
        severity: str,
        message: str,
        attrs: dict[str, Any],
        run: Run | None,
        step: int | None,
        phase_path: tuple[str, ...],
    ) -> str:
        """Fold or record a validated alert (also used by detectors, for a given run)."""
        now = time.time_ns()
        if run is not None:
            correlated = [(run, step if step is not None else run.step)]
        else:
            correlated = [(r, r.step) for r in self._open_runs()]
        attrs_text = json.dumps(attrs, sort_keys=True) if attrs else "{}"
        fold_key = (name, severity, attrs_text, run.key if run else "-")
        window_ns = int(self.settings.alert_dedupe_window * 1e9)
        with self._alert_lock:
            previous = self._folds.get(fold_key)
            if (
                previous is not None
                and severity != "critical"
                and now - previous.time * 1_000_000 <= window_ns
            ):
                previous.occurrences += 1
                previous.last_time = now // 1_000_000
                self._alert_folded(previous)
                return str(previous.alert_id)
        base = f"{name}\0{severity}\0{attrs_text}"
        fingerprint = hashlib.sha1(base.encode(), usedforsecurity=False).hexdigest()[:16]
        trace_id, span_id = _span_ids()
        record = AlertRecord(
            alert_id=f"a-{now:016x}-{random.getrandbits(32):08x}",
            name=name,
            severity=severity,
            message=message,
            attributes=attrs,
            fingerprint=fingerprint,
            time=now // 1_000_000,
            last_time=now // 1_000_000,
            occurrences=1,
            run=run,
            correlated=correlated,
            phase_path=phase_path,
            step=step,
            trace_id=trace_id,
            span_id=span_id,
            host=self._host,
            pid=os.getpid(),
        )
        if severity != "critical":
            with self._alert_lock:
                self._folds[fold_key] = record
        self._emit_alert(record)
        return str(record.alert_id)

    @contextmanager
    def phase(self, name: str) -> Iterator[Any]:
        """
        Mark a phase of the experiment: an OpenTelemetry span; phases nest. When it ends,
        a phase record (path, trace and span ids, start and end time and step) is kept.

        Yields:
            The OpenTelemetry span.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"phase name must be a non-empty str, got {name!r}")
        tracer = self._tracer or self._make_tracer()
        path = (*CURRENT_PHASES.get(), name)
        run = CURRENT_RUN.get() or self._default_phase_run()
        start = time.time_ns() // 1_000_000
        start_step = run.step if run is not None else None
        with tracer.start_as_current_span(
            f"phase {name}", attributes={"allele.phase": name}
        ) as span:
            token = CURRENT_PHASES.set(path)
            try:
                yield span
            finally:
                CURRENT_PHASES.reset(token)
                if run is not None and not self._closed:
                    ctx = span.get_span_context()
                    parent = getattr(span, "parent", None)
                    self._emit_phase(
                        run,
                        {
                            "name": name,
                            "path": list(path),
                            "trace_id": f"{ctx.trace_id:032x}",
                            "span_id": f"{ctx.span_id:016x}",
                            "parent_span_id": f"{parent.span_id:016x}" if parent else None,
                            "start_time": start,
                            "end_time": time.time_ns() // 1_000_000,
                            "start_step": start_step,
                            "end_step": run.step,
                        },
                    )

    def _make_tracer(self) -> Any:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()  # private: real ids without touching global state
        self._tracer = provider.get_tracer("allele.observability")
        return self._tracer

    # provided by Observability
    def _open_runs(self) -> list[Run]:
        raise NotImplementedError

    def _default_phase_run(self) -> Run | None:
        raise NotImplementedError

    def _emit_alert(self, record: AlertRecord) -> None:
        raise NotImplementedError

    def _alert_folded(self, record: AlertRecord) -> None:
        raise NotImplementedError

    def _emit_phase(self, run: Run, record: dict[str, Any]) -> None:
        raise NotImplementedError
