"""
The exporter: an anyio loop that drains the bus and delivers batches per run.

One *round*: take the flush tickets, drain the control lane, then the data lane up to its
length at that moment (so a run's end is never delivered before its metrics), sort
everything into per-run backlogs (:mod:`.backlog`), and deliver them (:mod:`.delivery`),
or, while the store is failing or the spool holds our events, spool them
(:mod:`.spooling`) and replay in order. Blocking store calls run in a worker thread with
deadlines (:mod:`.calls`); failures back off (:mod:`.backoff`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from .._core.runs import Run
from ..backends.base import DeliveryError
from ..sinks.deadletter import DeadLetters
from ..sinks.registry import GenomeSink
from .backlog import KIND_OF, Router
from .backoff import Health
from .calls import FlushTicket, StoreCalls, threadsafe_caller
from .delivery import Delivery
from .isolation import INTERNAL_ERROR, Isolation
from .spooling import Spooler
from .system import sample_system

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._core.accounting import Accounting
    from .._core.runs import RunRegistry
    from ..backends.base import Backend
    from ..config import Settings
    from .source import EventSource, MetricEvent

__all__ = ("Exporter", "FlushTicket")

logger = logging.getLogger("allele.observability")

#: share of the shutdown time kept for spooling what could not be delivered
SPOOL_RESERVE = 0.2
#: seconds between looks while stopping with nothing to retry yet (a run being created)
STOP_POLL = 0.1
#: seconds a backend may take to start (a worker process importing MLflow, a migration)
STARTUP_TIMEOUT = 120.0
#: seconds before the loop is started again after a failure: base, doubled, capped
RESTART_BASE = 0.05
RESTART_CAP = 5.0


class Exporter:
    """
    Drains an event source and delivers to a backend. Owned by ``Observability``.

    Args:
        source: the bus's lanes.
        runs: the process's runs (metric events name their run by key).
        accounting: the counters shared with the bus.
        settings: the effective settings.
        backend_factory: builds the backend (called on the exporter's loop).
        observe: called with each round's drained metrics (detectors, warnings).
        child: this exporter runs in a forked worker (see ``Spooler``).
    """

    def __init__(
        self,
        source: EventSource,
        runs: RunRegistry,
        accounting: Accounting,
        settings: Settings,
        backend_factory: Callable[[], Backend],
        *,
        observe: Callable[[list[MetricEvent]], None] | None = None,
        child: bool = False,
    ) -> None:
        self._source = source
        self._runs = runs
        self._acct = accounting
        self._settings = settings
        self._backend_factory = backend_factory
        self._observe = observe
        self._router = Router(settings.alert_dedupe_window, runs.release)
        self._call = StoreCalls(settings.export_timeout)
        self._health = Health()
        self._dead = DeadLetters(settings.spool_dir)
        self._isolation = Isolation(accounting, self._dead)
        #: registers genome events (the model registry, or the run only)
        self._genome_sink = GenomeSink(settings)
        parts = (self._router, self._call, self._dead, self._genome_sink, self._isolation)
        self._delivery = Delivery(settings, accounting, *parts)
        self._spooler = Spooler(settings, accounting, self._isolation, child=child)
        self._tickets: deque[FlushTicket] = deque()
        self._owned_tickets: list[FlushTicket] = []
        self._stop = False
        self._wake_event: anyio.Event | None = None
        self._launched = False
        self._threaded = False
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        #: the thread running the loop (flush() must not block it)
        self.loop_thread: int | None = None
        #: cuts the store call in flight to the stop deadline (thread-safe once the loop runs)
        self._tighten: Callable[[], None] = self._call.tighten

    # -- lifecycle (any thread) -------------------------------------------------------------
    @property
    def state(self) -> str:
        """Delivery state: healthy, degraded, offline or recovering."""
        return self._health.state

    def start_thread(self) -> None:
        """Run the loop in a daemon thread."""
        thread = threading.Thread(target=self._thread_main, name="allele-exporter", daemon=True)
        self._launched = self._threaded = True
        self._thread = thread
        thread.start()

    def revive(self) -> bool:
        """
        Start the loop's thread again if it ended although no stop was asked for (its
        backlogs are kept); True if it did. Counted as a restart.
        """
        if self._stop or not self._threaded or not self._finished.is_set():
            return False
        old = self._thread
        if old is not None:
            old.join(1.0)  # it is unwinding: let it finish before its successor starts
        self._acct.restarted()
        logger.warning("allele-observability: the exporter thread had ended; restarting it")
        self._finished.clear()
        self.start_thread()
        return True

    def _thread_main(self) -> None:
        try:
            anyio.run(self.run_loop, backend="asyncio")
        except BaseException:
            logger.exception("allele-observability exporter crashed; events stay counted")
        finally:
            self._finished.set()

    def request_flush(self, deadline: float | None = None) -> FlushTicket:
        """Queue a flush ticket (the caller waits until ``deadline``) and wake the loop."""
        ticket = FlushTicket(deadline)
        self._tickets.append(ticket)
        self._source.wake()
        return ticket

    def begin_stop(self, deadline: float) -> None:
        """
        Ask the loop to deliver what it can before ``deadline`` and exit. Delivery stops a
        little earlier (``SPOOL_RESERVE`` of the time left, at most 1 s), so that what is
        left can still be written to the spool before the deadline.
        """
        remaining = max(0.0, deadline - time.monotonic())
        self._call.deadline = deadline - min(1.0, SPOOL_RESERVE * remaining)
        self._stop = True
        self._source.wake()
        self._tighten()

    def stop(self, deadline: float) -> bool:
        """Ask the loop to deliver what it can before ``deadline`` and exit; wait for it."""
        self.begin_stop(deadline)
        remaining = max(0.0, deadline - time.monotonic())
        return self._finished.wait(remaining + 0.5)

    def waiting(self, counts: dict[str, int]) -> dict[str, int]:
        """
        ``counts`` plus the events in the backlogs (per kind); call it under the
        accounting lock, which the loop moves events under.
        """
        self._router.waiting(counts, self._spooler.started_runs)
        self._delivery.waiting(counts)
        return counts

    @property
    def alive(self) -> bool:
        """Whether the loop is running."""
        return self._launched and not self._finished.is_set()

    def mark_launched(self) -> None:
        """The loop was started as a task in the caller's event loop."""
        self._launched = True

    # -- the loop ---------------------------------------------------------------------------
    async def run_loop(self) -> None:
        """
        The exporter's main coroutine (runs in our thread or in the caller's loop). It is
        supervised: if a step fails in a way no narrower guard caught, the failure is
        counted, the backend is rebuilt and the loop starts again, keeping every backlog.
        """
        self.loop_thread = threading.get_ident()
        self._wake_event = anyio.Event()
        self._call.reset()  # a revived loop runs on a new event loop

        def wake() -> None:
            ev = self._wake_event
            if ev is not None:
                ev.set()

        self._source.connect(threadsafe_caller(wake))
        self._tighten = threadsafe_caller(self._call.tighten)
        failures = 0
        try:
            while True:
                try:
                    await self._run_once()
                except Exception as exc:  # supervision: never die
                    failures += 1
                    self._acct.restarted()
                    self._isolation.report("the exporter loop", exc)
                    if self._stop:
                        self._guarded("spooling at stop", self._spool_all, final=True)
                        return
                    await anyio.sleep(min(RESTART_CAP, RESTART_BASE * 2 ** min(failures, 8)))
                else:
                    return
        finally:
            self._source.connect(None)
            self._finished.set()

    async def _run_once(self) -> None:
        """Build the backend, run the loop until stopped, release the backend."""
        try:
            built = self._delivery.backend = self._backend_factory()
            await anyio.to_thread.run_sync(self._spooler.start)
            start = getattr(built, "start", None)
            if start is not None:  # a worker process: started with its own deadline
                try:
                    await self._call(start, timeout=STARTUP_TIMEOUT)
                except DeliveryError as err:
                    self._failed(err)
            async with anyio.create_task_group() as tg:
                if self._settings.system_metrics_interval > 0:
                    tg.start_soon(
                        sample_system,
                        self._settings.system_metrics_interval,
                        self._runs,
                        self._router,
                        self._acct,
                        self._isolation,
                    )
                await self._main()
                tg.cancel_scope.cancel()
        finally:
            self._spooler.close()
            self._genome_sink.close()
            backend, self._delivery.backend = self._delivery.backend, None
            if backend is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(backend.close)

    def _guarded(self, where: str, fn: Callable[..., object], *args: Any, **kw: Any) -> None:
        """Run ``fn``; a failure is reported (counted, logged once) instead of raised."""
        try:
            fn(*args, **kw)
        except Exception as exc:  # supervision
            self._isolation.report(where, exc)

    async def _main(self) -> None:
        source, health, spooler = self._source, self._health, self._spooler
        interval = self._settings.flush_interval
        while True:
            if not self._stop and not self._work_ready():
                self._wake_event = anyio.Event()
                source.set_sleeping(True)
                if not self._work_ready():  # re-check: a producer may have missed the flag
                    # A retry is due at `retry_at`; a replay goes on at once. What waits for
                    # something else (a run the parent process creates) waits a round.
                    wait, now = interval, time.monotonic()
                    if health.retry_at > now and (self._router.pending() or spooler.own_pending):
                        wait = min(wait, health.retry_at - now)
                    elif spooler.own_pending and health.retry_at <= now:
                        wait = 0.0
                    with anyio.move_on_after(wait):
                        await self._wake_event.wait()
                source.set_sleeping(False)
            try:
                await self._round()
            except Exception as exc:  # supervision: the round is retried
                self._isolation.report("an export round", exc)
                self._failed(DeliveryError(INTERNAL_ERROR, repr(exc), retryable=True))
            if self._stop and await self._stop_step():
                break

    async def _stop_step(self) -> bool:
        """
        While stopping, after a round: whether the loop is done. Until the deadline, a
        failing store is tried again (the backoff fits in the time left); at the deadline
        what is left goes to the spool.
        """
        source, health, spooler = self._source, self._health, self._spooler
        if not source.is_empty():
            return False  # emitted during the round: one more
        if not self._router.pending() and not spooler.own_pending:
            # Last, what terminated forked workers left in the spool, if time allows.
            if spooler.check_foreign(every=0) and health.state == "healthy":
                await self._replay()
            return True
        now, deadline = time.monotonic(), self._call.deadline
        if deadline is None or now >= deadline:
            # Time is up: what is left stays in the spool, for the next start or
            # `allele-obs spool replay`.
            self._spool_all(final=True)
            return True
        if spooler.own_pending and health.retry_at <= now:
            return False  # the replay goes on
        # A retry is due at `retry_at`; a run the parent process creates is looked up
        # again shortly (not in a busy loop).
        await anyio.sleep(min(max(health.retry_at, now + STOP_POLL), deadline) - now)
        return False

    def _work_ready(self) -> bool:
        return self._source.has_work() or bool(self._tickets)

    def _time_left(self) -> float | None:
        """Seconds until the earliest deadline someone waits for (stop or flush), if any."""
        deadlines = [t.deadline for t in self._owned_tickets if t.deadline is not None]
        if self._stop and self._call.deadline is not None:
            deadlines.append(self._call.deadline)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    # -- one round ----------------------------------------------------------------------------
    async def _round(self) -> None:
        tickets = self._tickets
        for _ in range(len(tickets)):
            self._owned_tickets.append(tickets.popleft())
        items = self._take()
        if self._observe is not None:
            self._guarded("detectors", self._observe, items)
        now = time.monotonic()
        spooler, health = self._spooler, self._health
        if spooler.own_pending or now < health.retry_at:
            self._spool_all()
            if now >= health.retry_at:
                await self._replay()
        else:
            try:
                await self._delivery.deliver_all()
            except DeliveryError as err:
                self._failed(err)
                self._spool_all()
            else:
                health.succeeded()
                if spooler.check_foreign() and not spooler.own_pending:
                    await self._replay()
        if not self._router.pending() and not spooler.own_pending:
            for t in self._owned_tickets:
                t.ok = True
                t.done.set()
            self._owned_tickets.clear()

    def _take(self) -> list[MetricEvent]:
        """
        Drain the lanes into the backlogs, in one critical section with the counts (a
        snapshot never sees an event in neither). An event that cannot be sorted is
        dead-lettered; the others go on.
        """
        acct, router, isolation = self._acct, self._router, self._isolation
        with acct.lock:
            events, items = self._source.drain()
            drained = acct.drained
            drained["metric"] += len(items)
            for ev in events:
                kind = KIND_OF[ev[0]]
                drained[kind] += 1
                if ev[0] == "run_start":  # with the run's first tags and params
                    drained["tag"] += len(ev[2])
                    drained["param"] += len(ev[3])
                try:
                    router.route_event(ev)
                except Exception as exc:  # isolated to this event
                    run = ev[1] if isinstance(ev[1], Run) else None
                    isolation.reject("sorting an event", kind, run, [ev[2:]], exc)
            self._guarded("folding alerts", router.ship_alert_updates)

            def reject(item: MetricEvent, exc: Exception) -> None:
                isolation.reject("sorting a metric", "metric", None, [item], exc)

            router.route_metrics(items, self._runs.get, reject)
        return items

    def _failed(self, err: DeliveryError) -> None:
        self._acct.failure(err.reason)
        self._health.failed(err, self._time_left())

    def _spool_all(self, *, final: bool = False) -> None:
        """Move every backlog whose run has started into the spool."""
        spooler, router = self._spooler, self._router
        for run, b in list(router.backlogs.items()):
            with self._acct.lock:  # moved and counted in one step (see _take)
                if run.created_id is None and not b.started:
                    if not final:
                        continue  # its start is still in the lane: next round
                    self._drop_backlog(run, b.counts(), "no_run_start")
                else:
                    ends = b.end is not None
                    try:
                        spooler.spool_backlog(run, b)
                    except Exception as exc:  # what is left is dead-lettered
                        for kind, n in b.counts().items():
                            self._isolation.reject("spooling", kind, run, [], exc, n=n)
                    if ends:
                        router.finished(run)
                router.backlogs.pop(run, None)
        if final and spooler.own_pending:
            logger.warning(
                "allele-observability: %d events are in the spool %s; they are replayed at "
                "the next start or by `allele-obs spool replay`",
                spooler.own_pending,
                self._settings.spool_dir,
            )

    def _drop_backlog(self, run: Run, counts: dict[str, int], reason: str) -> None:
        for kind, n in counts.items():
            self._acct.count(run, kind, "dropped", n)
        self._acct.drop_reason(reason, sum(counts.values()))

    async def _replay(self) -> None:
        backend = self._delivery.backend
        assert backend is not None
        replay = self._spooler.replay
        try:
            report = await self._call(replay, backend, self._dead, self._genome_sink, bounded=False)
        except DeliveryError as err:  # cut at the stop deadline
            self._failed(err)
            return
        if report.error is not None:
            self._failed(report.error)
            return
        self._health.succeeded(spool_empty=not self._spooler.own_pending)
