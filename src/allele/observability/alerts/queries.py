"""
Queries: alerts, the runs they hit, and the metrics around them, read back from MLflow.

Everything here reads MLflow only (any tracking URI, from any machine, after the
experiment has ended). Storage, per run an alert hits (its run, or every run active in
the process for a process-wide alert):

- artifacts ``allele/alerts/alerts-<seq>-<time_ms>.jsonl``, one alert record per line; a
  later chunk may repeat an ``alert_id`` with more ``occurrences`` (the most wins);
- artifacts ``allele/phases/phases-<seq>-<time_ms>.jsonl``, one phase record per line;
- tags ``allele.alerts.total`` and ``allele.alerts.<severity>`` (counts), which
  :meth:`Queries.alerts` uses to find the runs worth reading.

Exceptions: :class:`AlertNotFoundError` (a ``LookupError``) when an alert id is unknown;
``ValueError``/``TypeError`` for bad arguments; MLflow's own exceptions pass through.

The result types are defined in :mod:`.results` (and re-exported here); the MLflow reads
(runs, chunk files, alert records) in :mod:`.reading`.
"""

from __future__ import annotations

import logging
import math
import re
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from ..config import redact
from .reading import MlflowReader
from .results import (
    PHASE_FIELDS,
    SEVERITIES,
    Alert,
    AlertContext,
    AlertNotFoundError,
    Phase,
    RunRef,
    merge_alerts,
    parse_severities,
    quote_filter_value,
    to_ms,
)

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterable, Sequence

__all__ = (
    "SEVERITIES",
    "Alert",
    "AlertContext",
    "AlertNotFoundError",
    "Phase",
    "Queries",
    "RunRef",
)

logger = logging.getLogger(__name__)

_HAS_ALERTS = "tags.`allele.alerts.total` != ''"
_ALERT_ID = re.compile(r"^a-([0-9a-f]{16})-[0-9a-f]{8}$")
#: runs are searched within this much (ms) of an alert's time before a full scan
_SLACK_MS = 3_600_000


class Queries(MlflowReader):
    """
    Read-only questions about alerts, runs and phases, answered from MLflow.

    Args:
        tracking_uri: the MLflow tracking URI.
        experiment_prefix: only experiments whose name starts with it are searched.
        max_workers: runs whose artifacts are read in parallel.

    Thread-safe. Chunk files of ended runs are cached by (run, path, size): chunks are
    only ever added, so a new listing always sees new data.
    """

    @classmethod
    def from_env(cls, **overrides: Any) -> Queries:
        """Build from ``ALLELE_MLFLOW_TRACKING_URI`` and ``_EXPERIMENT_PREFIX`` (or overrides)."""
        from ..config import load_settings

        settings = load_settings(**overrides)
        return cls(settings.tracking_uri, experiment_prefix=settings.experiment_prefix)

    def __repr__(self) -> str:
        uri = redact(self.tracking_uri)
        return f"Queries({uri!r}, experiment_prefix={self.experiment_prefix!r})"

    # -- public queries -------------------------------------------------------------------------
    def alerts(
        self,
        run_id: str | None = None,
        *,
        phase: str | None = None,
        severity: str | Iterable[str] | None = None,
        name: str | None = None,
        since: dt.datetime | float | None = None,
        until: dt.datetime | float | None = None,
    ) -> list[Alert]:
        """
        Return the alerts matching every filter given, sorted by time.

        Args:
            run_id: only this run's alerts (default: every run of the prefixed experiments).
            phase: a phase name anywhere in the alert's phase path, or the path ``a/b``.
            severity: one severity or an iterable of them.
            name: an alert name or an :func:`fnmatch.fnmatchcase` glob.
            since: datetime or epoch seconds; drops alerts last seen before it.
            until: datetime or epoch seconds; drops alerts first seen after it.
        """
        wanted = parse_severities(severity)
        lo, hi = to_ms(since, "since"), to_ms(until, "until")
        if run_id is not None:
            runs = [self.client.get_run(run_id)]
        else:
            where = _HAS_ALERTS
            if wanted is not None and len(wanted) == 1:
                where += f" and tags.`allele.alerts.{min(wanted)}` != ''"
            runs = self._search(self._experiments(), where)

        def keep(a: Alert) -> bool:
            path = (*a.phase_path, a.phase, "/".join(a.phase_path))
            return (
                (wanted is None or a.severity in wanted)
                and (name is None or fnmatchcase(a.name, name))
                and (phase is None or phase in path)
                and (lo is None or a.last_time >= lo)
                and (hi is None or a.time <= hi)
            )

        found = filter(keep, self._read_alerts(runs).values())
        return sorted(found, key=lambda a: (a.time, a.alert_id))

    def alert(self, alert_id: str) -> Alert:
        """Return one alert merged over every run holding it; raise AlertNotFoundError."""
        return self._find(alert_id)[0]

    def runs_for_alert(self, alert_id: str) -> list[RunRef]:
        """Return the runs holding the alert, by start time (empty if the id is unknown)."""
        try:
            return self._refs(self._find(alert_id)[1].values())
        except AlertNotFoundError:
            return []

    def runs_active_at(
        self, timestamp: dt.datetime | float, *, host: str | None = None
    ) -> list[RunRef]:
        """
        Return the runs of the prefixed experiments active at ``timestamp`` (datetime or
        epoch seconds), by start time: started at or before it and ended at or after it
        or still RUNNING; only runs tagged ``allele.host`` = ``host`` when it is given.
        """
        ms = to_ms(timestamp, "timestamp")
        assert ms is not None
        where = f"attributes.start_time <= {math.floor(ms)}"
        if host is not None:
            where += f" and tags.`allele.host` = {quote_filter_value(host)}"
        exps = self._experiments()
        ended = self._search(exps, f"{where} and attributes.end_time >= {math.ceil(ms)}")
        running = self._search(exps, f"{where} and attributes.status = 'RUNNING'")
        return self._refs({r.info.run_id: r for r in [*ended, *running]}.values(), exps)

    def alert_context(
        self, alert_id: str, metrics: Sequence[str] | None = None, window: int = 5
    ) -> AlertContext:
        """
        Return the alert, its runs, its phase and the metrics around it in each run.

        Args:
            alert_id: the alert.
            metrics: metric names or globs (default: each run's metrics except
                ``allele.alerts.*`` and ``system/*``).
            window: steps on each side of the alert's step.

        Raises:
            AlertNotFoundError: no run in the prefixed experiments holds the alert.
        """
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be an integer >= 0, got {window!r}")
        alert, runs = self._find(alert_id)
        rows = self._map(lambda r: self._around(alert, r, metrics, window), list(runs.values()))
        return AlertContext(
            alert=alert,
            runs=tuple(self._refs(runs.values())),
            phase=self._phase_of(alert),
            steps={rid: step for rid, step, _ in rows},
            metrics={rid: values for rid, _, values in rows},
            window=window,
        )

    def phases(self, run_id: str) -> list[Phase]:
        """Return a run's phases by start time (per span id, the record that has ended)."""
        merged: dict[Any, Phase] = {}
        for rec in self._records(self.client.get_run(run_id), "allele/phases"):
            name, start = rec.get("name"), rec.get("start_time")
            if not isinstance(name, str) or not isinstance(start, int):
                logger.warning("skipping a malformed phase record in run %s: %r", run_id, rec)
                continue
            fixed = {
                "path": tuple(rec.get("path") or (name,)),
                "run_id": rec.get("run_id") or run_id,
            }
            p = Phase(**{f: rec.get(f) for f in PHASE_FIELDS} | fixed)
            key = p.span_id or (p.path, p.start_time)
            if key not in merged or p.end_time is not None or merged[key].end_time is None:
                merged[key] = p
        return sorted(merged.values(), key=lambda p: (p.start_time, len(p.path)))

    # -- helpers ----------------------------------------------------------------------------
    def _find(self, alert_id: str) -> tuple[Alert, dict[str, Any]]:
        """The alert and its runs: first among runs active near its time, then everywhere."""
        exps = self._experiments()
        searched: dict[str, Any] = {}
        alert = None
        if m := _ALERT_ID.match(alert_id):
            t = int(m.group(1), 16) // 1_000_000
            near = f"{_HAS_ALERTS} and attributes.start_time <= {t + _SLACK_MS}"
            for where in (
                f"attributes.end_time >= {t - _SLACK_MS}",
                "attributes.status = 'RUNNING'",
            ):
                searched.update(
                    (r.info.run_id, r) for r in self._search(exps, f"{near} and {where}")
                )
            alert = self._read_alerts(list(searched.values())).get(alert_id)
        if alert is None:
            rest = [r for r in self._search(exps, _HAS_ALERTS) if r.info.run_id not in searched]
            searched.update((r.info.run_id, r) for r in rest)
            alert = self._read_alerts(rest).get(alert_id)
        if alert is None:
            raise AlertNotFoundError(f"no run holds alert {alert_id!r}")
        # Runs the alert names but that were not searched (outside the slack or the prefix).
        missing = {alert.run_id, *alert.correlated_run_ids} - {None, *searched}
        more = [r for r in map(self._get_run, sorted(filter(None, missing))) if r is not None]
        if more and (again := self._read_alerts(more).get(alert_id)) is not None:
            alert = merge_alerts(alert, again)
            searched.update((r.info.run_id, r) for r in more)
        return alert, {rid: searched[rid] for rid in alert.run_ids}

    def _around(
        self, alert: Alert, run: Any, patterns: Sequence[str] | None, window: int
    ) -> tuple[str, int | None, dict[str, list[tuple[int, float]]]]:
        """(run id, the step at the alert, metric -> [(step, value)] within the window)."""
        keys = sorted(run.data.metrics)
        if patterns is None:
            keys = [k for k in keys if not k.startswith(("allele.alerts.", "system/"))]
        else:
            keys = [k for k in keys if any(fnmatchcase(k, p) for p in patterns)]
        history = {k: self.client.get_metric_history(run.info.run_id, k) for k in keys}
        center = alert.step if run.info.run_id == alert.run_id else None
        if center is None:  # the run's latest step at the alert's time (else its first)
            points = sorted((m.timestamp, m.step) for ms in history.values() for m in ms)
            before = [p for p in points if p[0] <= alert.time]
            center = (before[-1] if before else points[0])[1] if points else None
        values = {
            k: [
                (m.step, m.value)
                for m in sorted(ms, key=lambda m: (m.step, m.timestamp))
                if center is not None and abs(m.step - center) <= window
            ]
            for k, ms in history.items()
        }
        return run.info.run_id, center, values

    def _phase_of(self, alert: Alert) -> Phase | None:
        """The phase record active when the alert was raised (by span id, else by time)."""
        if alert.phase is None:
            return None
        run_ids = [alert.run_id] if alert.run_id in alert.run_ids else alert.run_ids
        phases = [p for rid in run_ids if rid for p in self.phases(rid)]
        for p in phases:
            if alert.span_id and p.span_id == alert.span_id:
                return p
        active = [
            p
            for p in phases
            if p.name == alert.phase
            and p.start_time <= alert.time
            and (p.end_time is None or alert.time <= p.end_time)
        ]
        return max(active, key=lambda p: (len(p.path), p.start_time), default=None)
