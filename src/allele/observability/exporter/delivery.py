"""
Direct delivery of per-run backlogs to the store.

Every new run is created first, so run ids are known at once, not after the bulk data of
the runs before them. Then each run's backlog goes out in order: ``log_batch`` requests
within MLflow's limits (params and tags first), alerts and phases, genomes, artifacts,
and last the run's end with its accounting tags.

Failures are classified by the backend: a retryable one propagates (the loop backs off
and spools); a rejection is isolated by splitting the batch in halves, and the offending
rows are dead-lettered with the store's reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from ..alerts.store import ALERTS_DIR, PHASES_DIR, AlertChunk, prepare_alerts, write_chunk
from ..backends.base import DeliveryError
from ..sinks.batching import halves, split_batches

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from .._core.accounting import Accounting
    from .._core.runs import Run
    from ..backends.base import Backend, MetricRow, ParamRow, TagRow
    from ..config import Settings
    from ..sinks.deadletter import DeadLetters
    from ..sinks.registry import GenomeSink
    from .backlog import Backlog, Router
    from .calls import StoreCalls

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
    """

    def __init__(
        self,
        settings: Settings,
        accounting: Accounting,
        router: Router,
        call: StoreCalls,
        dead: DeadLetters,
        genome_sink: GenomeSink,
    ) -> None:
        self._settings = settings
        self._acct = accounting
        self._router = router
        self._call = call
        self._dead = dead
        self._genome_sink = genome_sink
        self._experiments: dict[str, str] = {}
        #: set by the loop once built (on the loop, since a backend may start a worker)
        self.backend: Backend | None = None

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
        run.set_created(run_id)

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
        self._acct.count(run, "run", "delivered", 1)
        return run_id

    async def _deliver_run(self, run: Run, b: Backlog) -> None:
        backend = self._backend()
        run_id = run.created_id
        if run_id is None:
            return  # not created yet (its start is still in the lane, or creation failed)
        while b.params or b.tags or b.metrics or b.system:
            metrics = b.metrics[:1000] if b.metrics else b.system[:1000]
            is_system = not b.metrics
            batch = next(
                split_batches(
                    metrics, b.params, b.tags, max_metrics=self._settings.metrics_batch_size
                )
            )
            bm, bp, bt = batch
            await self._log_batch(run, run_id, bm, bp, bt, is_system)
            if is_system:
                del b.system[: len(bm)]
            else:
                del b.metrics[: len(bm)]
            del b.params[: len(bp)]
            del b.tags[: len(bt)]
        await self._deliver_annotations(run, run_id, b)
        while b.genomes:
            genome = b.genomes[0]
            send = self._call(self._genome_sink, run_id, genome)
            await self._settle(run, "genome", 1, [genome], send)
            b.genomes.pop(0)
        while b.artifacts:
            local, apath = b.artifacts[0]
            send = self._call(backend.log_artifact, run_id, local, apath)
            await self._settle(run, "artifact", 1, [(local, apath)], send)
            b.artifacts.pop(0)
        if b.end is not None:
            status, end_time = b.end
            tags = self._acct.run_tags(run)
            await self._call(backend.log_batch, run_id, [], [], tags)
            await self._call(backend.end_run, run_id, status, end_time)
            self._acct.count(run, "run", "delivered", 1)
            self._router.finished(run)

    async def _log_batch(
        self,
        run: Run,
        run_id: str,
        metrics: list[MetricRow],
        params: list[ParamRow],
        tags: list[TagRow],
        is_system: bool,
    ) -> None:
        mkind = "system" if is_system else "metric"
        try:
            await self._call(self._backend().log_batch, run_id, metrics, params, tags)
        except DeliveryError as err:
            if err.retryable:
                raise
            n = len(metrics) + len(params) + len(tags)
            if n == 1:
                kind = mkind if metrics else ("param" if params else "tag")
                self._dead.write(kind, run, metrics or params or tags, err)
                self._acct.count(run, kind, "dead_lettered", 1)
                logger.warning("allele-observability: %s rejected by MLflow: %s", kind, err.message)
                return
            # Isolate the offending rows: split in halves and retry each.
            for part in halves(metrics, params, tags):
                await self._log_batch(run, run_id, *part, is_system)
            return
        self._acct.count(run, mkind, "delivered", len(metrics))
        self._acct.count(run, "param", "delivered", len(params))
        self._acct.count(run, "tag", "delivered", len(tags))

    async def _deliver_annotations(self, run: Run, run_id: str, b: Backlog) -> None:
        backend = self._backend()
        if b.alerts:
            counts = run.alert_counts
            b.alert_chunks.append(prepare_alerts(b.alerts, counts))
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
            self._acct.count(run, kind, "dead_lettered", n)
        else:
            self._acct.count(run, kind, "delivered", n)

    def _dead_letter_run(self, run: Run, b: Backlog, err: DeliveryError) -> None:
        logger.error(
            "allele-observability: MLflow refused to create run %r: %s", run.name, err.message
        )
        for kind, rows in b.rows():
            if rows:
                self._dead.write(kind, run, rows, err)
                self._acct.count(run, kind, "dead_lettered", len(rows))
        self._acct.count(run, "run", "dead_lettered", 1 + (b.end is not None))
        del self._router.backlogs[run]


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
