"""
The exporter: an anyio loop that drains the lanes and delivers batches per run.

One *round*: take the flush tickets, drain the control lane, then drain the data lane
up to its length at that moment (so a run's end is never delivered before its metrics),
sort everything into per-run backlogs, and deliver each backlog in ``log_batch`` requests
within MLflow's limits. Blocking store calls run in worker threads under a
``CapacityLimiter``; each call gives up after ``EXPORT_TIMEOUT``.

Failures are classified by the backend: retryable ones keep the backlog and back off
(exponential, full jitter); rejected ones are isolated by splitting the batch, and the
offending rows are dead-lettered with the store's reason.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from .._core.accounting import KINDS
from ..alerts.store import (
    ALERTS_DIR,
    COPY,
    PHASES_DIR,
    PRIMARY,
    UPDATE,
    AlertChunk,
    prepare_alerts,
    write_chunk,
)
from ..backends.base import Backend, DeliveryError, MetricRow, ParamRow, TagRow
from ..sinks.batching import split_batches
from ..sinks.deadletter import DeadLetters
from ..sinks.registry import GenomeSink
from .spooling import Spooler

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .._core.runs import Run
    from ..alerts.emit import AlertRecord
    from ..config import Settings

__all__ = ("Exporter", "FlushTicket")

logger = logging.getLogger("allele.observability")

_KIND_OF = {
    "run_start": "run",
    "run_end": "run",
    "param": "param",
    "tag": "tag",
    "artifact": "artifact",
    "alert": "alert",
    "phase": "phase",
    "genome": "genome",
}
#: share of the shutdown time kept for spooling what could not be delivered
SPOOL_RESERVE = 0.2
#: seconds a store call may overrun its timeout before the loop abandons it
_BACKSTOP_GRACE = 1.0
_BACKOFF_BASE = 0.25
_BACKOFF_CAP = 30.0
#: consecutive failed attempts before the state is "offline"
_OFFLINE_AFTER = 3


class FlushTicket:
    """A request to deliver everything emitted before it; resolved by the exporter."""

    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


class _Backlog:
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

    def __init__(self) -> None:
        self.started = False
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


class Exporter:
    """
    Drains a bus and delivers to a backend. Owned by ``Observability``.

    Args:
        bus: the Observability instance whose lanes to drain.
        settings: the effective settings.
        backend_factory: builds the backend (called on the exporter's loop).
    """

    def __init__(
        self, bus: Any, settings: Settings, backend_factory: Callable[[], Backend]
    ) -> None:
        self._bus = bus
        self._settings = settings
        self._backend_factory = backend_factory
        self._backend: Backend | None = None
        self.lock = threading.Lock()
        self.drained = dict.fromkeys(KINDS, 0)
        self.outcomes: dict[str, dict[str, int]] = {
            o: dict.fromkeys(KINDS, 0) for o in ("delivered", "dropped", "dead_lettered", "spooled")
        }
        self.failures: dict[str, int] = {}
        self.drop_reasons: dict[str, int] = {}
        self.state = "healthy"
        self._backlogs: dict[Run, _Backlog] = {}
        self._experiments: dict[str, str] = {}
        self._tickets: deque[FlushTicket] = deque()
        self._owned_tickets: list[FlushTicket] = []
        self._dead = DeadLetters(settings.spool_dir)
        self._stop = False
        self._deadline: float | None = None
        self._consecutive_failures = 0
        self._retry_at = 0.0
        self._wake_event: anyio.Event | None = None
        self._thread: threading.Thread | None = None
        self._launched = False
        self._finished = threading.Event()
        #: the thread running the loop (flush() must not block it)
        self.loop_thread: int | None = None
        self._call_scope: anyio.CancelScope | None = None
        self._tighten: Callable[[], None] = _nop
        self._warned_names = 0
        self._system: Any = None
        self._spooler = Spooler(self, settings)
        #: registers genome events (the model registry, or the run only)
        self.genome_sink = GenomeSink(settings)
        #: keys of the runs whose start event this exporter has drained
        self._seen_start: set[str] = set()
        #: alert counts per run key (total, per severity, per name) for the run's tags
        self.alert_counts: dict[str, dict[str, int]] = {}
        #: alerts that may still fold: alert id to (record, occurrences already stored)
        self._live_alerts: dict[str, tuple[AlertRecord, int]] = {}

    # -- lifecycle (any thread) -------------------------------------------------------------
    def start_thread(self) -> None:
        """Run the loop in a daemon thread."""
        self._thread = threading.Thread(
            target=self._thread_main, name="allele-exporter", daemon=True
        )
        self._launched = True
        self._thread.start()

    def _thread_main(self) -> None:
        try:
            anyio.run(self.run_loop, backend="asyncio")
        except BaseException:
            logger.exception("allele-observability exporter crashed; events stay counted")
        finally:
            self._finished.set()

    def request_flush(self) -> FlushTicket:
        """Queue a flush ticket and wake the loop."""
        ticket = FlushTicket()
        self._tickets.append(ticket)
        self._bus._wake()
        return ticket

    def begin_stop(self, deadline: float) -> None:
        """
        Ask the loop to deliver what it can before ``deadline`` and exit. Delivery stops a
        little earlier (``SPOOL_RESERVE`` of the time left, at most 1 s), so that what is
        left can still be written to the spool before the deadline.
        """
        remaining = max(0.0, deadline - time.monotonic())
        self._deadline = deadline - min(1.0, SPOOL_RESERVE * remaining)
        self._stop = True
        self._bus._wake()
        self._tighten()

    def stop(self, deadline: float) -> bool:
        """Ask the loop to deliver what it can before ``deadline`` and exit; wait for it."""
        self.begin_stop(deadline)
        remaining = max(0.0, deadline - time.monotonic())
        return self._finished.wait(remaining + 0.5)

    @property
    def alive(self) -> bool:
        """Whether the loop is running."""
        return self._launched and not self._finished.is_set()

    def mark_launched(self) -> None:
        """The loop was started as a task in the caller's event loop."""
        self._launched = True

    # -- the loop ---------------------------------------------------------------------------
    async def run_loop(self) -> None:
        """The exporter's main coroutine (runs in our thread or in the caller's loop)."""
        self.loop_thread = threading.get_ident()
        limiter = anyio.CapacityLimiter(1)
        self._wake_event = anyio.Event()

        def wake() -> None:
            ev = self._wake_event
            if ev is not None:
                ev.set()

        def tighten() -> None:
            # Runs on the loop: cut the store call in flight down to the stop deadline.
            scope, deadline = self._call_scope, self._deadline
            if scope is not None and deadline is not None:
                remaining = deadline - time.monotonic()
                scope.deadline = min(scope.deadline, anyio.current_time() + remaining)

        self._bus._wake = _threadsafe_caller(wake)
        self._tighten = _threadsafe_caller(tighten)
        try:
            self._backend = self._backend_factory()
            await anyio.to_thread.run_sync(self._spooler.start)
            async with anyio.create_task_group() as tg:
                if self._settings.system_metrics_interval > 0:
                    from ..sources.system import SystemSampler

                    self._system = SystemSampler()
                    tg.start_soon(self._system_loop)
                await self._main(limiter)
                tg.cancel_scope.cancel()
        finally:
            self._bus._wake = _nop
            self._spooler.close()
            backend, self._backend = self._backend, None
            if backend is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(backend.close)
            self._finished.set()

    async def _main(self, limiter: anyio.CapacityLimiter) -> None:
        bus = self._bus
        interval = self._settings.flush_interval
        while True:
            if not self._stop and not self._work_ready():
                self._wake_event = anyio.Event()
                bus._exporter_sleeping = True
                if not self._work_ready():  # re-check: a producer may have missed the flag
                    wait = interval
                    if self._pending_backlog() or self._spooler.own_pending:
                        wait = min(wait, max(0.0, self._retry_at - time.monotonic()))
                    with anyio.move_on_after(wait):
                        await self._wake_event.wait()
                bus._exporter_sleeping = False
            await self._round(limiter)
            if self._stop:
                if bus._ctrl or bus._data:
                    continue  # emitted during the round: one more
                if not self._pending_backlog() and not self._spooler.own_pending:
                    # Last, what terminated forked workers left in the spool, if time allows.
                    if self._spooler.check_foreign(every=0) and self.state == "healthy":
                        await self._replay(limiter)
                    break
                now = time.monotonic()
                if self._retry_at > now or (self._deadline is not None and now >= self._deadline):
                    # The store is failing or time is up: what is left stays in the spool,
                    # for the next start or `allele-obs spool replay`.
                    self._spool_all(final=True)
                    break

    def _work_ready(self) -> bool:
        bus = self._bus
        return bool(bus._ctrl) or len(bus._data) >= bus._batch or bool(self._tickets)

    def _pending_backlog(self) -> bool:
        return any(not b.empty() or b.end is not None for b in self._backlogs.values())

    async def _system_loop(self) -> None:
        interval = self._settings.system_metrics_interval
        while True:
            await anyio.sleep(interval)
            runs = self._bus._open_runs()
            if not runs:
                continue
            values = self._system.sample()
            ts = time.time_ns() // 1_000_000
            with self.lock:
                for run in runs:
                    rows = [(k, v, ts, run.step) for k, v in values.items()]
                    self._backlog(run).system.extend(rows)
                    self.drained["system"] += len(rows)
                    _add(run.acct, "emitted", len(rows))

    # -- one round ----------------------------------------------------------------------------
    def _backlog(self, run: Run) -> _Backlog:
        b = self._backlogs.get(run)
        if b is None:
            b = self._backlogs[run] = _Backlog()
            b.started = run.key in self._seen_start
        return b

    async def _round(self, limiter: anyio.CapacityLimiter) -> None:
        bus = self._bus
        tickets = self._tickets
        for _ in range(len(tickets)):
            self._owned_tickets.append(tickets.popleft())
        with self.lock:
            ctrl = bus._ctrl
            events = [ctrl.popleft() for _ in range(len(ctrl))]
            data = bus._data
            items = [data.popleft() for _ in range(len(data))]
            drained = self.drained
            drained["metric"] += len(items)
            for ev in events:
                drained[_KIND_OF[ev[0]]] += 1
        for ev in events:
            kind, run = ev[0], ev[1]
            if kind == "alert":
                self._route_alert(ev[2])
                continue
            b = self._backlog(run)
            _add(run.acct, "emitted", 1)
            if kind == "run_start":
                b.started = True
                self._seen_start.add(run.key)
                _add(run.acct, "emitted", len(ev[3]) + len(ev[2]))
                b.params.extend(ev[3].items())
                b.tags.extend(ev[2].items())
            elif kind == "param":
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
        self._ship_alert_updates()
        runs = bus._runs
        last_key: str | None = None
        current: Run | None = None
        rows: list[MetricRow] = []
        n = 0
        for run_key, key, value, ts, step in items:
            if run_key is not last_key:
                if current is not None:
                    _add(current.acct, "emitted", n)
                current = runs[run_key]
                rows = self._backlog(current).metrics
                last_key, n = run_key, 0
            rows.append((key, value, ts // 1_000_000, step))
            n += 1
        if current is not None:
            _add(current.acct, "emitted", n)
        if self._bus._detectors and items:
            self._detect(items)
        if len(bus.sanitized) != self._warned_names:
            self._warn_sanitized()
        now = time.monotonic()
        spooler = self._spooler
        if spooler.own_pending or now < self._retry_at:
            self._spool_all()
            if now >= self._retry_at:
                await self._replay(limiter)
        else:
            await self._deliver_all(limiter)
            if spooler.check_foreign() and not spooler.own_pending and now >= self._retry_at:
                await self._replay(limiter)
        if not self._pending_backlog() and not spooler.own_pending:
            for t in self._owned_tickets:
                t.ok = True
                t.done.set()
            self._owned_tickets.clear()

    def _detect(self, items: list[tuple[str, str, float, int, int]]) -> None:
        """Run the detectors over drained metrics; findings become alerts of their run."""
        raise_alert = self._bus._raise_alert
        runs = self._bus._runs
        for detector in list(self._bus._detectors):
            observe = detector.observe
            for run_key, key, value, _ts, step in items:
                for f in observe(run_key, key, value, step):
                    run = runs[run_key]
                    raise_alert(f.name, f.severity, f.message, f.attributes, run, step, ())

    def _route_alert(self, record: AlertRecord) -> None:
        """An alert goes to every run it hits; the first one holds the event."""
        role = PRIMARY
        for target, step in record.correlated:
            self._backlog(target).alerts.append((record, step, role))
            role = COPY
        _add(record.correlated[0][0].acct, "emitted", 1)
        self._live_alerts[record.alert_id] = (record, record.occurrences)

    def _ship_alert_updates(self) -> None:
        """Store again the alerts whose occurrence count grew; forget those that can't."""
        if not self._live_alerts:
            return
        horizon = time.time_ns() // 1_000_000 - int(self._settings.alert_dedupe_window * 1000)
        for alert_id, (record, stored) in list(self._live_alerts.items()):
            if record.occurrences != stored:
                for target, step in record.correlated:
                    self._backlog(target).alerts.append((record, step, UPDATE))
                self._live_alerts[alert_id] = (record, record.occurrences)
            elif record.time < horizon - 1000:
                del self._live_alerts[alert_id]

    async def _deliver_annotations(
        self, run: Run, run_id: str, b: _Backlog, limiter: anyio.CapacityLimiter
    ) -> None:
        backend = self._backend
        assert backend is not None
        if b.alerts:
            counts = self.alert_counts.setdefault(run.key, {})
            b.alert_chunks.append(prepare_alerts(b.alerts, counts))
            b.alerts = []
        directory = self._settings.spool_dir

        async def send_alerts(chunk: AlertChunk) -> None:
            path = write_chunk(directory, run.key, "alerts", chunk.records)
            await self._call(limiter, backend.log_artifact, run_id, path, ALERTS_DIR)
            for bm, bp, bt in split_batches(chunk.metrics, [], chunk.tags):
                await self._call(limiter, backend.log_batch, run_id, bm, bp, bt)
            _unlink(path)

        async def send_phases(phases: list[dict[str, Any]]) -> None:
            path = write_chunk(directory, run.key, "phases", phases)
            await self._call(limiter, backend.log_artifact, run_id, path, PHASES_DIR)
            _unlink(path)

        while b.alert_chunks:
            chunk = b.alert_chunks[0]
            await self._settle(run, "alert", chunk.primary, chunk.records, send_alerts(chunk))
            b.alert_chunks.pop(0)
        if b.phases:
            await self._settle(run, "phase", len(b.phases), b.phases, send_phases(b.phases))
            b.phases = []

    async def _settle(
        self, run: Run, kind: str, n: int, rows: list[Any], send: Awaitable[None]
    ) -> None:
        """
        Deliver one item and count its ``n`` events: a rejection for good dead-letters
        ``rows`` with the store's reason; a retryable failure propagates (to the spool).
        """
        try:
            await send
        except DeliveryError as err:
            if err.retryable:
                raise
            self._dead.write(kind, run, rows, err)
            self._count(run, kind, "dead_lettered", n)
        else:
            self._count(run, kind, "delivered", n)

    async def _deliver_all(self, limiter: anyio.CapacityLimiter) -> None:
        # Create every new run first, so run ids are known at once, not after the bulk
        # data of the runs before them.
        for run in list(self._backlogs):
            b = self._backlogs.get(run)
            if b is None or run._run_id is not None:
                continue
            try:
                await self._ensure_created(run, b, limiter)
            except DeliveryError as err:
                self._failed(err)
                self._spool_all()
                return
        for run in list(self._backlogs):
            b = self._backlogs.get(run)
            if b is None:
                continue
            try:
                await self._deliver_run(run, b, limiter)
            except DeliveryError as err:
                self._failed(err)
                self._spool_all()
                return
            if run in self._backlogs and b.empty() and b.end is None and run._run_id is not None:
                del self._backlogs[run]
        self._succeeded()

    async def _call(
        self,
        limiter: anyio.CapacityLimiter,
        fn: Any,
        *args: Any,
        bounded: bool = True,
    ) -> Any:
        """
        Run one blocking store call in a worker thread, abandoning it after the export
        timeout (the backends enforce it themselves; this is the backstop; ``bounded=False``
        for a replay step, whose every call is bounded) or at the stop deadline.
        """
        timeout = self._settings.export_timeout + _BACKSTOP_GRACE if bounded else math.inf
        if self._deadline is not None:
            timeout = max(0.01, min(timeout, self._deadline - time.monotonic()))
        scope = self._call_scope = anyio.move_on_after(timeout)
        try:
            with scope:
                return await anyio.to_thread.run_sync(
                    fn, *args, limiter=limiter, abandon_on_cancel=True
                )
        finally:
            self._call_scope = None
        name = getattr(fn, "__name__", "store call")
        raise DeliveryError("timeout", f"{name} exceeded {timeout:g} s", retryable=True)

    async def _deliver_run(self, run: Run, b: _Backlog, limiter: anyio.CapacityLimiter) -> None:
        backend = self._backend
        assert backend is not None
        if run._run_id is None:
            return  # not created yet (its start is still in the lane, or creation failed)
        run_id = run._run_id
        while b.params or b.tags or b.metrics or b.system:
            metrics = b.metrics[:1000] if b.metrics else b.system[:1000]
            is_system = not b.metrics
            batch = next(
                split_batches(
                    metrics, b.params, b.tags, max_metrics=self._settings.metrics_batch_size
                )
            )
            bm, bp, bt = batch
            await self._log_batch(run, run_id, bm, bp, bt, is_system, limiter)
            if is_system:
                del b.system[: len(bm)]
            else:
                del b.metrics[: len(bm)]
            del b.params[: len(bp)]
            del b.tags[: len(bt)]
        await self._deliver_annotations(run, run_id, b, limiter)
        while b.genomes:
            genome = b.genomes[0]
            send = self._call(limiter, self.genome_sink, run_id, genome)
            await self._settle(run, "genome", 1, [genome], send)
            b.genomes.pop(0)
        while b.artifacts:
            local, apath = b.artifacts[0]
            send = self._call(limiter, backend.log_artifact, run_id, local, apath)
            await self._settle(run, "artifact", 1, [(local, apath)], send)
            b.artifacts.pop(0)
        if b.end is not None:
            status, end_time = b.end
            tags = self._accounting_tags(run)
            await self._call(limiter, backend.log_batch, run_id, [], [], tags)
            await self._call(limiter, backend.end_run, run_id, status, end_time)
            self._count(run, "run", "delivered", 1)
            del self._backlogs[run]

    async def _ensure_created(self, run: Run, b: _Backlog, limiter: anyio.CapacityLimiter) -> None:
        if not b.started:
            return  # its run_start is still in the lane
        if run.parent is not None and run.parent._run_id is None:
            return  # the parent is created first (it precedes its children in the backlog)
        try:
            run_id = await self._create_run(run, limiter)
        except DeliveryError as err:
            if err.retryable:
                raise
            self._dead_letter_run(run, b, err)
            return
        run._set_run_id(run_id)

    async def _create_run(self, run: Run, limiter: anyio.CapacityLimiter) -> str:
        backend = self._backend
        assert backend is not None
        exp_name = self._settings.experiment_prefix + run.experiment
        exp_id = self._experiments.get(exp_name)
        if exp_id is None:
            exp_id = await self._call(
                limiter, backend.ensure_experiment, exp_name, self._settings.artifact_location
            )
            self._experiments[exp_name] = exp_id
        tags = {"mlflow.runName": run.name, "allele.run_key": run.key}
        if run.parent is not None and run.parent._run_id is not None:
            tags["mlflow.parentRunId"] = run.parent._run_id
        run_id: str = await self._call(
            limiter,
            lambda: backend.create_run(
                exp_id, run_name=run.name, start_time=run.start_time, tags=tags
            ),
        )
        self._count(run, "run", "delivered", 1)
        return run_id

    async def _log_batch(
        self,
        run: Run,
        run_id: str,
        metrics: list[MetricRow],
        params: list[ParamRow],
        tags: list[TagRow],
        is_system: bool,
        limiter: anyio.CapacityLimiter,
    ) -> None:
        backend = self._backend
        assert backend is not None
        mkind = "system" if is_system else "metric"
        try:
            await self._call(limiter, backend.log_batch, run_id, metrics, params, tags)
        except DeliveryError as err:
            if err.retryable:
                raise
            n = len(metrics) + len(params) + len(tags)
            if n == 1:
                kind = mkind if metrics else ("param" if params else "tag")
                self._dead.write(kind, run, metrics or params or tags, err)
                self._count(run, kind, "dead_lettered", 1)
                logger.warning("allele-observability: %s rejected by MLflow: %s", kind, err.message)
                return
            # Isolate the offending rows: split in halves and retry each.
            for part in _halves(metrics, params, tags):
                await self._log_batch(run, run_id, *part, is_system, limiter)
            return
        self._count(run, mkind, "delivered", len(metrics))
        self._count(run, "param", "delivered", len(params))
        self._count(run, "tag", "delivered", len(tags))

    # -- accounting and state --------------------------------------------------------------
    def _count(self, run: Run, kind: str, outcome: str, n: int) -> None:
        if n:
            with self.lock:
                self.outcomes[outcome][kind] += n
                _add(run.acct, outcome, n)

    def _move(self, run: Run, kind: str, src: str, dst: str, n: int) -> None:
        """Move ``n`` events of ``kind`` from one outcome to another (spooled -> delivered)."""
        if n:
            with self.lock:
                self.outcomes[src][kind] -= n
                self.outcomes[dst][kind] += n
                _add(run.acct, src, -n)
                _add(run.acct, dst, n)

    def _drop_reason(self, reason: str, n: int) -> None:
        if n:
            with self.lock:
                self.drop_reasons[reason] = self.drop_reasons.get(reason, 0) + n

    def _accounting_tags(
        self, run: Run, *, end_in_spool: bool = False, replaying: bool = False
    ) -> list[TagRow]:
        """
        The run's own accounting, written when its end is delivered. The end itself is
        pending (direct delivery), counted as spooled (``end_in_spool``), or being
        replayed from the spool (``replaying``).
        """
        acct = run.acct
        dropped = acct.get("dropped", 0) + run.dropped.value
        sampled = run.sampled_out.value
        emitted = acct.get("emitted", 0) + run.dropped.value + sampled
        delivered = acct.get("delivered", 0)
        dead = acct.get("dead_lettered", 0)
        spooled = acct.get("spooled", 0)
        if replaying:  # the end moves from the spool to delivered with these tags
            spooled -= 1
            delivered += 1
        elif not end_in_spool:  # the end is delivered with these tags
            delivered += 1
        complete = dropped == 0 and dead == 0 and spooled == 0
        return [
            ("allele.telemetry.emitted", str(emitted)),
            ("allele.telemetry.delivered", str(delivered)),
            ("allele.telemetry.sampled_out", str(sampled)),
            ("allele.telemetry.dropped", str(dropped)),
            ("allele.telemetry.dead_lettered", str(dead)),
            ("allele.telemetry.spooled", str(spooled)),
            ("allele.telemetry.complete", "true" if complete else "false"),
        ]

    def _dead_letter_run(self, run: Run, b: _Backlog, err: DeliveryError) -> None:
        logger.error(
            "allele-observability: MLflow refused to create run %r: %s", run.name, err.message
        )
        for kind, rows in (
            ("metric", b.metrics),
            ("system", b.system),
            ("param", b.params),
            ("tag", b.tags),
            ("artifact", b.artifacts),
        ):
            if rows:
                self._dead.write(kind, run, rows, err)
                self._count(run, kind, "dead_lettered", len(rows))
        self._count(run, "run", "dead_lettered", 1 + (b.end is not None))
        del self._backlogs[run]

    def _failed(self, err: DeliveryError) -> None:
        with self.lock:
            self.failures[err.reason] = self.failures.get(err.reason, 0) + 1
        self._consecutive_failures += 1
        delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(self._consecutive_failures, 10))
        if err.retry_after:
            delay = max(delay, err.retry_after)
        self._retry_at = time.monotonic() + random.uniform(0, delay)  # noqa: S311
        new = "offline" if self._consecutive_failures >= _OFFLINE_AFTER else "degraded"
        if new != self.state:
            logger.warning(
                "allele-observability: delivery %s (%s); events are kept and retried", new, err
            )
            self.state = new

    def _succeeded(self) -> None:
        if self._consecutive_failures:
            self._consecutive_failures = 0
            self._retry_at = 0.0
            if self.state != "healthy":
                logger.warning("allele-observability: delivery healthy again")
            self.state = "healthy"

    def _spool_all(self, *, final: bool = False) -> None:
        """Move every backlog whose run has started into the spool."""
        spooled = 0
        for run, b in list(self._backlogs.items()):
            if run._run_id is None and not b.started:
                if not final:
                    continue  # its start is still in the lane: next round
                self._drop_backlog(run, b, "no_run_start")
            else:
                before = self._spooler.own_pending
                self._spooler.spool_backlog(run, b)
                spooled += self._spooler.own_pending - before
            del self._backlogs[run]
        if final and self._spooler.own_pending:
            logger.warning(
                "allele-observability: %d events are in the spool %s; they are replayed at "
                "the next start or by `allele-obs spool replay`",
                self._spooler.own_pending,
                self._settings.spool_dir,
            )

    def _drop_backlog(self, run: Run, b: _Backlog, reason: str) -> None:
        total = 0
        for kind, rows in (
            ("metric", b.metrics),
            ("system", b.system),
            ("param", b.params),
            ("tag", b.tags),
            ("artifact", b.artifacts),
        ):
            self._count(run, kind, "dropped", len(rows))
            total += len(rows)
        primary = sum(1 for _, _, role in b.alerts if role == PRIMARY)
        primary += sum(c.primary for c in b.alert_chunks)
        self._count(run, "alert", "dropped", primary)
        self._count(run, "phase", "dropped", len(b.phases))
        self._count(run, "genome", "dropped", len(b.genomes))
        total += primary + len(b.phases) + len(b.genomes)
        if b.end is not None:
            self._count(run, "run", "dropped", 1)
            total += 1
        self._drop_reason(reason, total)

    async def _replay(self, limiter: anyio.CapacityLimiter) -> None:
        backend = self._backend
        assert backend is not None
        report = await self._call(limiter, self._spooler.replay, backend, bounded=False)
        if report.error is not None:
            self._failed(report.error)
            return
        self._succeeded()
        if self._spooler.own_pending and self.state != "recovering":
            self.state = "recovering"

    def _warn_sanitized(self) -> None:
        names = list(self._bus.sanitized.items())
        for raw, key in names[self._warned_names :]:
            logger.warning("allele-observability: metric name %r sanitised to %r", raw, key)
        self._warned_names = len(names)


def _halves(
    metrics: list[MetricRow], params: list[ParamRow], tags: list[TagRow]
) -> list[tuple[list[MetricRow], list[ParamRow], list[TagRow]]]:
    rows: list[tuple[str, Any]] = (
        [("m", r) for r in metrics] + [("p", r) for r in params] + [("t", r) for r in tags]
    )
    mid = len(rows) // 2
    return [
        (
            [r for c, r in part if c == "m"],
            [r for c, r in part if c == "p"],
            [r for c, r in part if c == "t"],
        )
        for part in (rows[:mid], rows[mid:])
    ]


def _add(acct: dict[str, int], key: str, n: int) -> None:
    acct[key] = acct.get(key, 0) + n


def _nop() -> None:
    pass


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _threadsafe_caller(fn: Callable[[], None]) -> Callable[[], None]:
    """Return a function that runs ``fn`` on the current event loop from any thread."""
    try:
        import asyncio

        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio
        import trio

        token = trio.lowlevel.current_trio_token()

        def call_trio() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(fn)

        return call_trio

    def call_asyncio() -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(fn)

    return call_asyncio
