"""
Alerts: the emit side.

``obs.alert`` stamps an alert with its context (run, experiment, phase path, step,
OpenTelemetry trace and span ids, host, pid, time), folds identical alerts raised within
``ALERT_DEDUPE_WINDOW`` seconds into one record with an exact ``occurrences`` count
(critical alerts are never folded), and hands it to the bus's control lane, which is never
sampled. An alert raised outside any run is correlated to every run active in the
process at that moment.

Where alerts land in MLflow is described in ``docs/alerts.md`` (the storage contract of
:mod:`.store`, which the queries in :mod:`.queries` read).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from .._core.context import CURRENT_PHASES, CURRENT_RUN
from .record import AlertRecord, check_alert

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from .._core.accounting import Accounting
    from .._core.runs import Run

__all__ = ("FOLD_PRUNE_AT", "Alerter")

#: records in the fold table before it is first pruned (then: twice what survived)
FOLD_PRUNE_AT = 1024


def _span_ids() -> tuple[str | None, str | None]:
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


class Alerter:
    """
    Validates, stamps and folds alerts.

    Args:
        dedupe_window: seconds within which identical alerts fold into one record.
        open_runs: the runs active now (an alert outside any run hits all of them).
        fallback: the run of an alert raised with no run active at all (the automatic
            run), or None after counting it as dropped.
        control: puts an event on the bus's control lane.
        accounting: counts alerts folded into an earlier record.
    """

    def __init__(
        self,
        dedupe_window: float,
        open_runs: Callable[[], list[Run]],
        fallback: Callable[[str], Run | None],
        control: Callable[[tuple[Any, ...]], None],
        accounting: Accounting,
    ) -> None:
        self._window_ns = int(dedupe_window * 1e9)
        self._open_runs = open_runs
        self._fallback = fallback
        self._control = control
        self._folds: dict[tuple[str, str, str, str], AlertRecord] = {}
        #: the fold table is pruned of records past the window when it grows beyond this
        self._prune_at = FOLD_PRUNE_AT
        self._host = socket.gethostname()
        self.reset(accounting)

    def reset(self, accounting: Accounting) -> None:
        """New counters and a fresh lock (a forked child: the parent's may have been held)."""
        self._acct = accounting
        self._lock = threading.Lock()

    def _prune(self, now: int) -> None:
        """Forget records that can no longer fold (past the window); hold the lock."""
        horizon_ms = (now - self._window_ns) // 1_000_000
        self._folds = {k: r for k, r in self._folds.items() if r.time >= horizon_ms}
        self._prune_at = max(FOLD_PRUNE_AT, 2 * len(self._folds))

    def alert(
        self,
        name: str,
        *,
        severity: str = "info",
        message: str = "",
        attributes: Mapping[str, Any] | None = None,
    ) -> str:
        """Raise an alert; returns its id (see ``Observability.alert``)."""
        name, severity, text, attrs = check_alert(name, severity, message, attributes)
        run = CURRENT_RUN.get()
        return self.raise_alert(
            name, severity, text, attrs, run, run.step if run else None, CURRENT_PHASES.get()
        )

    def raise_alert(
        self,
        name: str,
        severity: str,
        message: str,
        attrs: dict[str, Any],
        run: Run | None,
        step: int | None,
        phase_path: tuple[str, ...],
    ) -> str:
        """
        Fold or record an alert checked by :func:`~.record.check_alert` (also used by
        detectors, for a given run).
        """
        now = time.time_ns()
        if run is not None:
            correlated = [(run, step if step is not None else run.step)]
        else:
            correlated = [(r, r.step) for r in self._open_runs()]
        attrs_text = json.dumps(attrs, sort_keys=True) if attrs else "{}"
        fold_key = (name, severity, attrs_text, run.key if run else "-")
        with self._lock:
            previous = self._folds.get(fold_key)
            if (
                previous is not None
                and severity != "critical"
                and now - previous.time * 1_000_000 <= self._window_ns
            ):
                previous.occurrences += 1
                previous.last_time = now // 1_000_000
                self._acct.folded.inc()  # emitted and sampled out at once
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
        if severity != "critical" and self._window_ns > 0:
            with self._lock:
                self._folds[fold_key] = record
                if len(self._folds) > self._prune_at:
                    self._prune(now)
        if not correlated and run is None:
            # Outside any run with no run active: the automatic run, if allowed.
            fallback = self._fallback("alert")
            if fallback is None:
                return str(record.alert_id)
            record.correlated = [(fallback, fallback.step)]
        self._control(("alert", run, record))
        return str(record.alert_id)

    def detect(
        self,
        detectors: Iterable[Any],
        items: list[tuple[str, str, float, int, int]],
        run_of: Callable[[str], Run],
    ) -> None:
        """Feed drained metrics to the detectors; their findings become alerts of the run."""
        for detector in list(detectors):
            observe = detector.observe
            for run_key, key, value, _ts, step in items:
                for f in observe(run_key, key, value, step):
                    run = run_of(run_key)
                    # a detector's finding passes the checks of obs.alert: a bad one raises
                    # here, in the detector's round, never later in the store
                    name, severity, text, attrs = check_alert(
                        f.name, f.severity, f.message, f.attributes
                    )
                    self.raise_alert(name, severity, text, attrs, run, step, ())
