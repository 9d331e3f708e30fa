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
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from ..backends.base import DeliveryError
from ..sinks.deadletter import DeadLetters
from ..sinks.registry import GenomeSink
from .backlog import KIND_OF, Router
from .backoff import Health
from .calls import StoreCalls, threadsafe_caller
from .delivery import Delivery
from .spooling import Spooler

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._core.accounting import Accounting
    from .._core.runs import Run, RunRegistry
    from ..backends.base import Backend
    from ..config import Settings
    from .source import EventSource, MetricEvent

__all__ = ("Exporter", "FlushTicket")

logger = logging.getLogger("allele.observability")

#: share of the shutdown time kept for spooling what could not be delivered
SPOOL_RESERVE = 0.2


class FlushTicket:
    """A request to deliver everything emitted before it; resolved by the exporter."""

    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


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
    ) -> None:
        self._source = source
        self._runs = runs
        self._acct = accounting
        self._settings = settings
        self._backend_factory = backend_factory
        self._observe = observe
        self._router = Router(settings.alert_dedupe_window)
        self._call = StoreCalls(settings.export_timeout)
        self._health = Health()
        self._dead = DeadLetters(settings.spool_dir)
        #: registers genome events (the model registry, or the run only)
        self._genome_sink = GenomeSink(settings)
        self._delivery = Delivery(
            settings, accounting, self._router, self._call, self._dead, self._genome_sink
        )
        self._spooler = Spooler(settings, accounting)
        self._tickets: deque[FlushTicket] = deque()
        self._owned_tickets: list[FlushTicket] = []
        self._stop = False
        self._wake_event: anyio.Event | None = None
        self._launched = False
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
        self._launched = True
        thread.start()

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
        self._wake_event = anyio.Event()

        def wake() -> None:
            ev = self._wake_event
            if ev is not None:
                ev.set()

        self._source.connect(threadsafe_caller(wake))
        self._tighten = threadsafe_caller(self._call.tighten)
        try:
            self._delivery.backend = self._backend_factory()
            await anyio.to_thread.run_sync(self._spooler.start)
            async with anyio.create_task_group() as tg:
                if self._settings.system_metrics_interval > 0:
                    tg.start_soon(self._system_loop)
                await self._main()
                tg.cancel_scope.cancel()
        finally:
            self._source.connect(None)
            self._spooler.close()
            self._genome_sink.close()
            backend, self._delivery.backend = self._delivery.backend, None
            if backend is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(backend.close)
            self._finished.set()

    async def _main(self) -> None:
        source, health, spooler = self._source, self._health, self._spooler
        interval = self._settings.flush_interval
        while True:
            if not self._stop and not self._work_ready():
                self._wake_event = anyio.Event()
                source.set_sleeping(True)
                if not self._work_ready():  # re-check: a producer may have missed the flag
                    wait = interval
                    if self._router.pending() or spooler.own_pending:
                        wait = min(wait, max(0.0, health.retry_at - time.monotonic()))
                    with anyio.move_on_after(wait):
                        await self._wake_event.wait()
                source.set_sleeping(False)
            await self._round()
            if self._stop:
                if not source.is_empty():
                    continue  # emitted during the round: one more
                if not self._router.pending() and not spooler.own_pending:
                    # Last, what terminated forked workers left in the spool, if time allows.
                    if spooler.check_foreign(every=0) and health.state == "healthy":
                        await self._replay()
                    break
                now, deadline = time.monotonic(), self._call.deadline
                if health.retry_at > now or (deadline is not None and now >= deadline):
                    # The store is failing or time is up: what is left stays in the spool,
                    # for the next start or `allele-obs spool replay`.
                    self._spool_all(final=True)
                    break

    def _work_ready(self) -> bool:
        return self._source.has_work() or bool(self._tickets)

    async def _system_loop(self) -> None:
        from ..sources.system import SystemSampler

        sampler = SystemSampler()
        interval = self._settings.system_metrics_interval
        while True:
            await anyio.sleep(interval)
            runs = self._runs.open_runs()
            if not runs:
                continue
            values = sampler.sample()
            ts = time.time_ns() // 1_000_000
            with self._acct.lock:
                for run in runs:
                    rows = [(k, v, ts, run.step) for k, v in values.items()]
                    self._router.backlog(run).system.extend(rows)
                    self._acct.drained["system"] += len(rows)
                    self._acct.received(run, len(rows))

    # -- one round ----------------------------------------------------------------------------
    async def _round(self) -> None:
        tickets = self._tickets
        for _ in range(len(tickets)):
            self._owned_tickets.append(tickets.popleft())
        acct = self._acct
        with acct.lock:
            events, items = self._source.drain()
            drained = acct.drained
            drained["metric"] += len(items)
            for ev in events:
                drained[KIND_OF[ev[0]]] += 1
        self._router.route(events, items, self._runs.get)
        if self._observe is not None:
            self._observe(items)
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

    def _failed(self, err: DeliveryError) -> None:
        self._acct.failure(err.reason)
        self._health.failed(err)

    def _spool_all(self, *, final: bool = False) -> None:
        """Move every backlog whose run has started into the spool."""
        spooler, router = self._spooler, self._router
        for run, b in list(router.backlogs.items()):
            if run.created_id is None and not b.started:
                if not final:
                    continue  # its start is still in the lane: next round
                self._drop_backlog(run, b.counts(), "no_run_start")
            else:
                spooler.spool_backlog(run, b, router.alert_counts.setdefault(run.key, {}))
            del router.backlogs[run]
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
        report = await self._call(replay, backend, self._dead, self._genome_sink, bounded=False)
        if report.error is not None:
            self._failed(report.error)
            return
        self._health.succeeded()
        if self._spooler.own_pending and self._health.state != "recovering":
            self._health.recovering()
