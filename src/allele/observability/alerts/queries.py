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
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import re
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

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

SEVERITIES = ("info", "warning", "error", "critical")
_HAS_ALERTS = "tags.`allele.alerts.total` != ''"
_CACHE_SIZE = 4096
_CHUNK = re.compile(r"^(?:alerts|phases)-(\d+)-(\d+)\.jsonl$")
_ALERT_ID = re.compile(r"^a-([0-9a-f]{16})-[0-9a-f]{8}$")
#: runs are searched within this much (ms) of an alert's time before a full scan
_SLACK_MS = 3_600_000
_R = TypeVar("_R")


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


_PHASE_FIELDS = tuple(f.name for f in dataclasses.fields(Phase))


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


def _to_ms(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp() * 1000.0  # a naive datetime is local time
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value) * 1000.0
    raise TypeError(f"{field} must be a datetime or epoch seconds, got {value!r}")


def _severities(severity: str | Iterable[str] | None) -> frozenset[str] | None:
    if severity is None:
        return None
    wanted = frozenset([severity] if isinstance(severity, str) else severity)
    if not wanted or not wanted <= set(SEVERITIES):
        raise ValueError(f"severity must be among {SEVERITIES}, got {sorted(wanted)}")
    return wanted


def _quote(value: str) -> str:
    if "'" in value:
        raise ValueError(f"{value!r} cannot be used in an MLflow filter")
    return f"'{value}'"


def _chunk_key(path: str) -> tuple[int, int, str] | None:
    m = _CHUNK.match(path.rsplit("/", 1)[-1])
    return (int(m.group(1)), int(m.group(2)), path) if m else None


def _merge(a: Alert, b: Alert) -> Alert:
    """Two records of one alert: the one with more occurrences (else ``b``), all run ids."""
    best = a if (a.occurrences, a.last_time) > (b.occurrences, b.last_time) else b
    return dataclasses.replace(best, run_ids=tuple(sorted({*a.run_ids, *b.run_ids})))


class Queries:
    """
    Read-only questions about alerts, runs and phases, answered from MLflow.

    Args:
        tracking_uri: the MLflow tracking URI.
        experiment_prefix: only experiments whose name starts with it are searched.
        max_workers: runs whose artifacts are read in parallel.

    Thread-safe. Chunk files of ended runs are cached by (run, path, size): chunks are
    only ever added, so a new listing always sees new data.
    """

    def __init__(
        self, tracking_uri: str, *, experiment_prefix: str = "", max_workers: int = 8
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_prefix = experiment_prefix
        self.max_workers = max(1, max_workers)
        self._lock = threading.Lock()
        self._client: Any = None
        self._cache: OrderedDict[tuple[str, str, int], tuple[dict[str, Any], ...]] = OrderedDict()

    @classmethod
    def from_env(cls, **overrides: Any) -> Queries:
        """Build from ``ALLELE_MLFLOW_TRACKING_URI`` and ``_EXPERIMENT_PREFIX`` (or overrides)."""
        from ..config import load_settings

        settings = load_settings(**overrides)
        return cls(settings.tracking_uri, experiment_prefix=settings.experiment_prefix)

    def __repr__(self) -> str:
        return f"Queries({self.tracking_uri!r}, experiment_prefix={self.experiment_prefix!r})"

    @property
    def client(self) -> Any:
        """The ``mlflow.MlflowClient`` (imported and built on first use)."""
        with self._lock:
            if self._client is None:
                from mlflow import MlflowClient

                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            return self._client

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
        wanted = _severities(severity)
        lo, hi = _to_ms(since, "since"), _to_ms(until, "until")
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
        ms = _to_ms(timestamp, "timestamp")
        assert ms is not None
        where = f"attributes.start_time <= {math.floor(ms)}"
        if host is not None:
            where += f" and tags.`allele.host` = {_quote(host)}"
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
            p = Phase(**{f: rec.get(f) for f in _PHASE_FIELDS} | fixed)
            key = p.span_id or (p.path, p.start_time)
            if key not in merged or p.end_time is not None or merged[key].end_time is None:
                merged[key] = p
        return sorted(merged.values(), key=lambda p: (p.start_time, len(p.path)))

    # -- helpers ----------------------------------------------------------------------------
    def _experiments(self) -> dict[str, str]:
        """Experiment id -> name, for the active experiments with the prefix."""
        out: dict[str, str] = {}
        token = None
        while True:
            page = self.client.search_experiments(max_results=1000, page_token=token)
            out.update(
                (e.experiment_id, e.name) for e in page if e.name.startswith(self.experiment_prefix)
            )
            if not (token := page.token):
                return out

    def _search(self, experiments: Mapping[str, str], where: str) -> list[Any]:
        ids, runs = list(experiments), []
        for i in range(0, len(ids), 100):
            token = None
            while True:
                page = self.client.search_runs(ids[i : i + 100], where, page_token=token)
                runs.extend(page)
                if not (token := page.token):
                    break
        return runs

    def _map(self, fn: Callable[[Any], _R], items: list[Any]) -> list[_R]:
        if len(items) <= 1 or self.max_workers == 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(min(len(items), self.max_workers)) as pool:
            return list(pool.map(fn, items))

    def _records(self, run: Any, directory: str) -> list[dict[str, Any]]:
        """Every JSON object in a run's chunk files under ``directory``, in chunk order."""
        run_id, ended = run.info.run_id, run.info.status != "RUNNING"
        files = [f for f in self.client.list_artifacts(run_id, directory) if _chunk_key(f.path)]
        out: list[dict[str, Any]] = []
        for f in sorted(files, key=lambda f: _chunk_key(f.path) or ()):
            key = (run_id, f.path, -1 if f.file_size is None else f.file_size)
            cacheable = ended and key[2] >= 0
            with self._lock:
                records = self._cache.get(key) if cacheable else None
            if records is None:
                records = self._download(run_id, f.path)
            if cacheable:
                with self._lock:
                    self._cache[key] = records
                    self._cache.move_to_end(key)
                    while len(self._cache) > _CACHE_SIZE:
                        self._cache.popitem(last=False)
            out.extend(records)
        return out

    def _download(self, run_id: str, path: str) -> tuple[dict[str, Any], ...]:
        with tempfile.TemporaryDirectory(prefix="allele-queries-") as tmp:
            text = Path(self.client.download_artifacts(run_id, path, tmp)).read_text("utf-8")
        out = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                out.append(rec)
            else:
                logger.warning(
                    "skipping line %d of %s in run %s: not a JSON object", number, path, run_id
                )
        return tuple(out)

    def _read_alerts(self, runs: Sequence[Any]) -> dict[str, Alert]:
        """Alert id -> the alert merged over the chunks of ``runs`` (most occurrences wins)."""

        def read(run: Any) -> list[Alert]:
            alerts = []
            for rec in self._records(run, "allele/alerts"):
                try:
                    alerts.append(Alert.from_record(rec, (run.info.run_id,)))
                except (KeyError, TypeError, ValueError) as exc:
                    logger.warning("skipping a malformed alert in run %s: %r", run.info.run_id, exc)
            return alerts

        merged: dict[str, Alert] = {}
        for alert in (a for alerts in self._map(read, list(runs)) for a in alerts):
            old = merged.get(alert.alert_id)
            merged[alert.alert_id] = alert if old is None else _merge(old, alert)
        return merged

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
            alert = _merge(alert, again)
            searched.update((r.info.run_id, r) for r in more)
        return alert, {rid: searched[rid] for rid in alert.run_ids}

    def _get_run(self, run_id: str) -> Any:
        try:
            return self.client.get_run(run_id)
        except Exception as exc:
            if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None

    def _refs(self, runs: Iterable[Any], exps: Mapping[str, str] | None = None) -> list[RunRef]:
        names = dict(exps if exps is not None else self._experiments())
        refs = []
        for run in runs:
            info, tags = run.info, run.data.tags
            if info.experiment_id not in names:
                names[info.experiment_id] = self.client.get_experiment(info.experiment_id).name
            pid = tags.get("allele.pid", "")
            refs.append(
                RunRef(
                    run_id=info.run_id,
                    run_name=info.run_name or "",
                    experiment_id=info.experiment_id,
                    experiment=names[info.experiment_id],
                    status=info.status,
                    start_time=info.start_time,
                    end_time=info.end_time,
                    host=tags.get("allele.host"),
                    pid=int(pid) if pid.isdigit() else None,
                )
            )
        return sorted(refs, key=lambda r: (r.start_time or 0, r.run_id))

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
