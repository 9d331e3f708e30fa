"""
Direct delivery of per-run backlogs to the store.

Every new run is created first, so run ids are known at once, not after the bulk data of
the runs before them. Then each run's backlog goes out in order: ``log_batch`` requests
within MLflow's limits (params and tags first), alerts and phases, genomes, artifacts,
and last the run's end with its accounting tags.

Failures are classified by the backend (the table is in :mod:`..backends.base`): a
retryable one propagates (the loop backs off and spools), with every row not yet delivered
put back in the backlog; a per-row rejection is isolated by splitting the batch in halves,
and the offending rows are dead-lettered with the store's reason; any other refusal for
good (the run is gone, a local file is missing) dead-letters that request or item whole.
A batch that fails with a ``server_error`` ``REPEAT_LIMIT`` times while the store answers
an empty probe request for its run is isolated like a rejection: a poison row that the
store cannot take (an SQLite overflow comes back as ``INTERNAL_ERROR``) is dead-lettered,
the rest delivered. Before each such row is dead-lettered, the probe is repeated, so a
store that breaks down meanwhile is never mistaken for a poison row.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from ..alerts.store import (
    ALERTS_DIR,
    PHASES_DIR,
    PRIMARY,
    AlertChunk,
    prepare_alerts,
    write_chunk,
)
from ..backends.base import DeliveryError
from ..sinks.batching import Batch, Repeats, batch_identity, halves, split_batches

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .._core.accounting import Accounting
    from .._core.runs import Run
    from ..backends.base import Backend
    from ..config import Settings
    from ..sinks.deadletter import DeadLetters
    from ..sinks.registry import GenomeSink
    from .backlog import Backlog, Router
    from .calls import StoreCalls
    from .isolation import Isolation

__all__ = ("Delivery",)

logger = logging.getLogger("allele.observability")


class Delivery:
    """
    Delivers the router's backlogs through a backend.

    Args:
        settings: the effective settings (prefix, artifact location, batch size, spool dir).
        accounting: where outcomes are counted.
        router: the backlogs.
        call: runs blocking backend calls with deadlines.
        dead: where rejected events go.
        genome_sink: registers genome events.
        isolation: where an item that fails in an unexpected way goes (dead-lettered).
    """

    def __init__(
        self,
        settings: Settings,
        accounting: Accounting,
        router: Router,
        call: StoreCalls,
        dead: DeadLetters,
        genome_sink: GenomeSink,
        isolation: Isolation,
    ) -> None:
        self._isolation = isolation
        self._settings = settings
        self._acct = accounting
        self._router = router
        self._call = call
        self._dead = dead
        self._genome_sink = genome_sink
        self._experiments: dict[str, str] = {}
        #: server errors per batch (or item), across attempts
        self._repeats = Repeats()
        #: set by the loop once built (on the loop, since a backend may start a worker)
        self.backend: Backend | None = None
        #: the batch being delivered (parts not settled yet) and its metrics' kind
        self.in_flight: list[Batch] = []
        self.in_flight_kind = "metric"

    def waiting(self, counts: dict[str, int]) -> None:
        """Add the events of the batch in flight to ``counts`` (under the accounting lock)."""
        kind = self.in_flight_kind
        for pm, pp, pt in list(self.in_flight):
            counts[kind] = counts.get(kind, 0) + len(pm)
            counts["param"] = counts.get("param", 0) + len(pp)
            counts["tag"] = counts.get("tag", 0) + len(pt)

    def _backend(self) -> Backend:
        assert self.backend is not None
        return self.backend

    async def deliver_all(self) -> None:
        """Deliver every backlog; a retryable DeliveryError propagates."""
        backlogs = self._router.backlogs
        for run in list(backlogs):
            b = backlogs.get(run)
            if b is not None and run.created_id is None:
                await self._ensure_created(run, b)
        for run in list(backlogs):
            b = backlogs.get(run)
            if b is None:
                continue
            await self._deliver_run(run, b)
            if run in backlogs and b.empty() and b.end is None and run.created_id is not None:
                del backlogs[run]

    async def _ensure_created(self, run: Run, b: Backlog) -> None:
        if not b.started:
            return  # its run_start is still in the lane
        if run.parent is not None and run.parent.created_id is None:
            return  # the parent is created first (it precedes its children in the backlog)
        try:
            if run.inherited:  # the parent process creates it: look it up, never create
                found = await self._call(self._backend().find_run, await self._exp(run), run.key)
                if found is None:
                    return  # not created yet: looked up again next round
                run_id = str(found)
            else:
                run_id = await self._create_run(run)
        except DeliveryError as err:
            if err.retryable:
                raise
            self._dead_letter_run(run, b, err)
            return
        with self._acct.lock:  # the start leaves the backlog as it is counted
            run.set_created(run_id)
            if not run.inherited:  # the parent process counts an inherited run's start
                self._acct.count(run, "run", "delivered", 1)

    async def _exp(self, run: Run) -> str:
        """The id of ``run``'s experiment, made if needed."""
        exp_name = self._settings.experiment_prefix + run.experiment
        exp_id = self._experiments.get(exp_name)
        if exp_id is None:
            exp_id = await self._call(
                self._backend().ensure_experiment, exp_name, self._settings.artifact_location
            )
            self._experiments[exp_name] = exp_id
        return exp_id

    async def _create_run(self, run: Run) -> str:
        backend = self._backend()
        exp_id = await self._exp(run)
        tags = {"mlflow.runName": run.name, "allele.run_key": run.key}
        parent_id = run.parent.created_id if run.parent is not None else None
        if parent_id is not None:
            tags["mlflow.parentRunId"] = parent_id
        run_id: str = await self._call(
            lambda: backend.create_run(
                exp_id, run_name=run.name, start_time=run.start_time, tags=tags
            ),
        )
        return run_id

    async def _deliver_run(self, run: Run, b: Backlog) -> None:
        backend = self._backend()
        run_id = run.created_id
        if run_id is None:
            return  # not created yet (its start is still in the lane, or creation failed)
        while b.params or b.tags or b.metrics or b.system:
            is_system = not b.metrics
            source = b.system if is_system else b.metrics
            batch = next(
                split_batches(
                    source[:1000], b.params, b.tags, max_metrics=self._settings.metrics_batch_size
                )
            )
            bm, bp, bt = batch
            stack = [batch]
            with self._acct.lock:  # from the backlog to the in-flight stack, in one step
                self.in_flight, self.in_flight_kind = stack, "system" if is_system else "metric"
                del source[: len(bm)]
                del b.params[: len(bp)]
                del b.tags[: len(bt)]
            try:
                await self._send_batch(run, run_id, stack, is_system)
            except BaseException:  # a failure, a cancellation or a bug: nothing is lost
                with self._acct.lock:  # not delivered: back to the front of the backlog
                    for pm, pp, pt in stack:
                        source[:0] = pm
                        b.params[:0] = pp
                        b.tags[:0] = pt
                    stack.clear()
                raise
        await self._deliver_annotations(run, run_id, b)
        while b.genomes:
            genome = b.genomes[0]
            send = self._call(self._genome_sink, run_id, genome)
            await self._settle(run, "genome", 1, [genome], send, done=b.genomes.pop)
        while b.artifacts:
            local, apath = b.artifacts[0]
            send = self._call(backend.log_artifact, run_id, local, apath)
            await self._settle(run, "artifact", 1, [(local, apath)], send, done=b.artifacts.pop)
        if b.end is not None:
            status, end_time = b.end
            tags = self._acct.run_tags(run)
            await self._call(backend.log_batch, run_id, [], [], tags)
            await self._call(backend.end_run, run_id, status, end_time)
            with self._acct.lock:
                self._acct.count(run, "run", "delivered", 1)
                self._router.finished(run)

    async def _send_batch(self, run: Run, run_id: str, stack: list[Batch], is_system: bool) -> None:
        """
        Deliver the batch in ``stack``, isolating the rows the store refuses. On a
        retryable failure, ``stack`` holds the parts not delivered and the error propagates.
        """
        mkind = "system" if is_system else "metric"
        first, identity, isolating = stack[0], "", False
        backend = self._backend()
        lock = self._acct.lock
        while stack:
            part = stack[-1]  # popped once it is settled (delivered, split or dead)
            pm, pp, pt = part
            try:
                await self._call(backend.log_batch, run_id, pm, pp, pt)
            except DeliveryError as err:
                if part is first and err.repeatable:
                    identity = batch_identity(run.key, mkind, pm[:1], pp[:1], pt[:1], len(pm))
                    isolating = self._repeats.exhausted(identity) and await self._probe(run_id)
                    if isolating:
                        logger.warning(
                            "allele-observability: a batch of %s failed %d times with %s "
                            "while the store answers; isolating the rows it cannot take",
                            run.name, self._repeats.limit, err.message,
                        )  # fmt: skip
                if err.retryable and not (isolating and err.repeatable):
                    raise
                if len(pm) + len(pp) + len(pt) > 1 and (err.per_row or err.retryable):
                    with lock:
                        stack.pop()
                        stack.extend(reversed(halves(pm, pp, pt)))
                    continue
                if err.retryable:
                    if not await self._probe(run_id):  # the store broke down meanwhile
                        raise
                    err = _isolated(err, self._repeats.limit)
                with lock:
                    stack.pop()
                    self._dead_batch(run, part, mkind, err)
                continue
            with lock:
                stack.pop()
                self._acct.count(run, mkind, "delivered", len(pm))
                self._acct.count(run, "param", "delivered", len(pp))
                self._acct.count(run, "tag", "delivered", len(pt))
        if identity:
            self._repeats.forget(identity)

    async def _probe(self, run_id: str) -> bool:
        """Whether the store answers an empty request for the run (it is not down)."""
        try:
            await self._call(self._backend().log_batch, run_id, [], [], [])
        except DeliveryError:
            return False
        return True

    def _dead_batch(self, run: Run, part: Batch, mkind: str, err: DeliveryError) -> None:
        for kind, rows in ((mkind, part[0]), ("param", part[1]), ("tag", part[2])):
            if rows:
                self._dead.write(kind, run, rows, err)
                self._acct.count(run, kind, "dead_lettered", len(rows))
                logger.warning(
                    "allele-observability: %d %s event(s) dead-lettered (%s): %s",
                    len(rows), kind, err.reason, err.message,
                )  # fmt: skip

    async def _deliver_annotations(self, run: Run, run_id: str, b: Backlog) -> None:
        backend = self._backend()
        if b.alerts:
            with self._acct.lock:  # the alerts become a chunk in one step
                try:
                    b.alert_chunks.append(prepare_alerts(b.alerts, run.alert_counts))
                except Exception as exc:  # supervision: these alerts, not the round
                    n = sum(1 for *_, role in b.alerts if role == PRIMARY)
                    self._isolation.reject("preparing alerts", "alert", run, b.alerts, exc, n=n)
                b.alerts = []
        directory = self._settings.spool_dir

        async def send_alerts(chunk: AlertChunk) -> None:
            path = write_chunk(directory, run.key, "alerts", chunk.records)
            await self._call(backend.log_artifact, run_id, path, ALERTS_DIR)
            for bm, bp, bt in split_batches(chunk.metrics, [], chunk.tags):
                await self._call(backend.log_batch, run_id, bm, bp, bt)
            _unlink(path)

        async def send_phases(phases: list[dict[str, Any]]) -> None:
            path = write_chunk(directory, run.key, "phases", phases)
            await self._call(backend.log_artifact, run_id, path, PHASES_DIR)
            _unlink(path)

        while b.alert_chunks:
            chunk = b.alert_chunks[0]
            send = send_alerts(chunk)
            await self._settle(run, "alert", chunk.primary, chunk.records, send, b.alert_chunks.pop)
        if b.phases:
            phases, done = b.phases, _clear(b.phases)
            await self._settle(run, "phase", len(phases), phases, send_phases(phases), done)

    async def _settle(
        self,
        run: Run,
        kind: str,
        n: int,
        rows: list[Any],
        send: Awaitable[None],
        done: Callable[[int], object],
    ) -> None:
        """
        Deliver one item and count its ``n`` events: a rejection for good dead-letters
        ``rows`` with the store's reason; a retryable failure propagates (to the spool).
        ``done(0)`` takes the item out of the backlog as it is counted. An unexpected
        error (a bug, a local file) is the item's: it is dead-lettered, the rest goes on.
        """
        lock = self._acct.lock
        try:
            await send
        except Exception as exc:
            if not isinstance(exc, DeliveryError):
                with lock:
                    self._isolation.reject(f"delivering {kind}", kind, run, rows, exc, n=n)
                    done(0)
                return
            err = exc
            if err.retryable:
                identity = batch_identity(run.key, kind, rows[:1], n)
                run_id = run.created_id
                if not (
                    err.repeatable
                    and run_id is not None
                    and self._repeats.exhausted(identity)
                    and await self._probe(run_id)
                ):
                    raise
                self._repeats.forget(identity)
                err = _isolated(err, self._repeats.limit)
            with lock:
                self._isolation.dead_letter(kind, run, rows, err, n=n)
                done(0)
        else:
            with lock:
                self._acct.count(run, kind, "delivered", n)
                done(0)

    def _dead_letter_run(self, run: Run, b: Backlog, err: DeliveryError) -> None:
        """The store refused the run itself: everything it holds is dead-lettered."""
        logger.error(
            "allele-observability: MLflow refused to create run %r: %s", run.name, err.message
        )
        alerts: list[Any] = [a for a, _, role in b.alerts if role == PRIMARY]
        alerts += [r for c in b.alert_chunks for r in c.records]
        everything = [*b.rows(), ("alert", alerts), ("phase", b.phases), ("genome", b.genomes)]
        with self._acct.lock:
            for kind, n in b.counts().items():  # the end, if drained, is in "run"
                self._acct.count(run, kind, "dead_lettered", n)
            self._acct.count(run, "run", "dead_lettered", 1)  # its start
            self._router.backlogs.pop(run, None)
        for kind, rows in everything:
            if rows:
                self._dead.write(kind, run, rows, err)


def _isolated(err: DeliveryError, attempts: int) -> DeliveryError:
    """The error a poison row is dead-lettered with: same reason, and why it was given up."""
    msg = f"{err.message} (failed {attempts} times while the store answered: isolated)"
    return DeliveryError(err.reason, msg, retryable=False)


def _clear(items: list[Any]) -> Callable[[int], None]:
    """``done`` for a list settled as a whole."""

    def clear(_index: int) -> None:
        items.clear()

    return clear


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
