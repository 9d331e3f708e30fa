"""
Per-run backlogs: drained events sorted by the run they belong to, in delivery order.

Control events have these shapes (``run`` is a ``Run``)::

    ("run_start", run, tags, params)      ("run_end", run, status, end_time)
    ("param", run, key, value)            ("tag", run, key, value)
    ("artifact", run, local_path, artifact_path)
    ("alert", run or None, AlertRecord)   ("phase", run, record)
    ("genome", run, payload)

An alert goes to every run it correlates to: the first holds the event (``PRIMARY``), the
others get a ``COPY``; when more identical alerts fold into a stored record, an ``UPDATE``
stores it again with its new occurrence count.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .._core.accounting import Accounting
from ..alerts.store import COPY, PRIMARY, UPDATE, AlertChunk

if TYPE_CHECKING:
    from collections.abc import Callable, Container

    from .._core.runs import Run
    from ..alerts.record import AlertRecord
    from ..backends.base import MetricRow, ParamRow, TagRow
    from .source import ControlEvent, MetricEvent

__all__ = ("KIND_OF", "Backlog", "Router")

#: the accounting kind of each control event
KIND_OF = {
    "run_start": "run",
    "run_end": "run",
    "param": "param",
    "tag": "tag",
    "artifact": "artifact",
    "alert": "alert",
    "phase": "phase",
    "genome": "genome",
}


class Backlog:
    """What one run still owes the store, in delivery order."""

    __slots__ = (
        "alert_chunks",
        "alerts",
        "artifacts",
        "end",
        "genomes",
        "metrics",
        "params",
        "phases",
        "started",
        "system",
        "tags",
    )

    def __init__(self, started: bool) -> None:
        #: the run's start event has been drained (it may be created)
        self.started = started
        self.metrics: list[MetricRow] = []
        #: system samples (counted under kind "system")
        self.system: list[MetricRow] = []
        self.params: list[ParamRow] = []
        self.tags: list[TagRow] = []
        self.artifacts: list[tuple[str, str | None]] = []
        #: (alert, step, role) entries not yet prepared, then chunks ready to store
        self.alerts: list[tuple[AlertRecord, int, str]] = []
        self.alert_chunks: list[AlertChunk] = []
        self.phases: list[dict[str, Any]] = []
        self.genomes: list[dict[str, Any]] = []
        self.end: tuple[str, int] | None = None

    def empty(self) -> bool:
        """Whether nothing but (possibly) the run's end is left."""
        return not (
            self.metrics
            or self.system
            or self.params
            or self.tags
            or self.artifacts
            or self.alerts
            or self.alert_chunks
            or self.phases
            or self.genomes
        )

    def rows(self) -> list[tuple[str, list[Any]]]:
        """The row-shaped contents per kind (metrics, system samples, params, tags, artifacts)."""
        return [
            ("metric", self.metrics),
            ("system", self.system),
            ("param", self.params),
            ("tag", self.tags),
            ("artifact", self.artifacts),
        ]

    def counts(self) -> dict[str, int]:
        """The events held, per kind (alert copies and updates are not events)."""
        counts = {kind: len(rows) for kind, rows in self.rows()}
        primary = sum(1 for _, _, role in self.alerts if role == PRIMARY)
        counts["alert"] = primary + sum(c.primary for c in self.alert_chunks)
        counts["phase"] = len(self.phases)
        counts["genome"] = len(self.genomes)
        counts["run"] = int(self.end is not None)
        return counts


class Router:
    """
    Sorts drained events into per-run backlogs.

    Args:
        dedupe_window: ``ALERT_DEDUPE_WINDOW``: how long a stored alert may still fold.
        on_finished: told when a run's end has left; returns the keys of the runs that
            are forgotten now (see ``RunRegistry.release``).
    """

    def __init__(
        self,
        dedupe_window: float,
        on_finished: Callable[[Run], list[str]] | None = None,
    ) -> None:
        self._window_ms = int(dedupe_window * 1000)
        self._on_finished = on_finished
        #: the backlog of every run that owes the store something
        self.backlogs: dict[Run, Backlog] = {}
        #: keys of the runs whose start event has been drained
        self._seen_start: set[str] = set()
        #: alerts that may still fold: alert id to (record, occurrences already stored)
        self._live_alerts: dict[str, tuple[AlertRecord, int]] = {}

    def backlog(self, run: Run) -> Backlog:
        """The backlog of ``run``, made if needed."""
        b = self.backlogs.get(run)
        if b is None:
            # A run inherited from the parent process started there: it may be looked up.
            b = self.backlogs[run] = Backlog(run.key in self._seen_start or run.inherited)
        return b

    def waiting(self, counts: dict[str, int], start_spooled: Container[str]) -> None:
        """
        Add the events held in the backlogs to ``counts`` (per kind). A run's start is
        held until the run is created, unless it went to the spool (``start_spooled``).
        """
        for run, b in list(self.backlogs.items()):  # one C call: atomic under the GIL
            for kind, n in b.counts().items():
                counts[kind] = counts.get(kind, 0) + n
            if (
                b.started
                and run.created_id is None
                and not run.inherited  # its start is the parent process's
                and run.key not in start_spooled
            ):
                counts["run"] = counts.get("run", 0) + 1

    def finished(self, run: Run) -> None:
        """``run``'s end has left (delivered or spooled): release what is kept for it."""
        self.backlogs.pop(run, None)
        if self._on_finished is not None:
            for key in self._on_finished(run):  # the runs forgotten since
                self._seen_start.discard(key)

    def pending(self) -> bool:
        """Whether any run still owes the store something."""
        return any(not b.empty() or b.end is not None for b in self.backlogs.values())

    def route_event(self, ev: ControlEvent) -> None:
        """Sort one control event into its run's backlog."""
        kind, run = ev[0], ev[1]
        if kind == "alert":
            self._route_alert(ev[2])
            return
        b = self.backlog(run)
        if kind == "run_start":
            params, tags = ev[3].items(), ev[2].items()
            b.started = True
            self._seen_start.add(run.key)
            b.params.extend(params)
            b.tags.extend(tags)
            Accounting.received(run, 1 + len(params) + len(tags))
            return
        if kind == "param":
            b.params.append((ev[2], ev[3]))
        elif kind == "tag":
            b.tags.append((ev[2], ev[3]))
        elif kind == "artifact":
            b.artifacts.append((ev[2], ev[3]))
        elif kind == "run_end":
            b.end = (ev[2], ev[3])
        elif kind == "phase":
            b.phases.append(ev[2])
        elif kind == "genome":
            b.genomes.append(ev[2])
        else:
            raise ValueError(f"unknown control event {kind!r}")
        Accounting.received(run, 1)

    def route_metrics(
        self,
        items: list[MetricEvent],
        run_of: Callable[[str], Run],
        reject: Callable[[MetricEvent, Exception], None],
    ) -> None:
        """Sort metrics into their runs' backlogs; one that cannot be goes to ``reject``."""
        received = Accounting.received
        last_key: str | None = None
        current: Run | None = None
        rows: list[MetricRow] = []
        n = 0
        for item in items:
            run_key, key, value, ts, step = item
            try:
                if run_key is not last_key:
                    if current is not None:
                        received(current, n)
                    current, n, last_key = None, 0, None
                    current = run_of(run_key)
                    rows = self.backlog(current).metrics
                    last_key = run_key
                rows.append((key, value, ts // 1_000_000, step))
            except Exception as exc:  # isolated to this event
                reject(item, exc)
                continue
            n += 1
        if current is not None:
            received(current, n)

    def _route_alert(self, record: AlertRecord) -> None:
        """An alert goes to every run it hits; the first one holds the event."""
        role = PRIMARY
        for target, step in record.correlated:
            self.backlog(target).alerts.append((record, step, role))
            role = COPY
        Accounting.received(record.correlated[0][0], 1)
        if self._window_ms > 0 and record.severity != "critical":  # it may still fold
            self._live_alerts[record.alert_id] = (record, record.occurrences)

    def ship_alert_updates(self) -> None:
        """Store again the alerts whose occurrence count grew; forget those that can't."""
        if not self._live_alerts:
            return
        horizon = time.time_ns() // 1_000_000 - self._window_ms
        for alert_id, (record, stored) in list(self._live_alerts.items()):
            if record.occurrences != stored:
                for target, step in record.correlated:
                    self.backlog(target).alerts.append((record, step, UPDATE))
                self._live_alerts[alert_id] = (record, record.occurrences)
            elif record.time < horizon - 1000:
                del self._live_alerts[alert_id]
