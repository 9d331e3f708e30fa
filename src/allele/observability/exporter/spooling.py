"""
The exporter's side of the disk spool: what goes in, and moving counts when it comes out.

Rule: while this exporter has anything of its own in the spool (or is backing off after a
failure), everything it would deliver goes to the spool instead, and the spool is replayed
in order. So a run's end never overtakes its data, and memory stays bounded while the
store is down. Once the spool holds nothing of ours, delivery is direct again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..alerts.store import PRIMARY, prepare_alerts
from ..backends.base import DeliveryError
from ..sinks.batching import Repeats, halves, split_batches
from ..spool.records import (
    AlertsRecord,
    ArtifactRecord,
    BatchRecord,
    EndRecord,
    GenomeRecord,
    PhasesRecord,
    Record,
    RunRecord,
    encode,
)
from ..spool.replay import Replayer, ReplayReport
from ..spool.retention import prune
from ..spool.runmap import RunMap
from ..spool.safety import stash_artifact
from ..spool.segments import Spool

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._core.accounting import Accounting
    from .._core.runs import Run
    from ..backends.base import Backend
    from ..config import Settings
    from ..sinks.deadletter import DeadLetters
    from .backlog import Backlog
    from .isolation import Isolation

__all__ = ("Spooler",)

logger = logging.getLogger("allele.observability")

#: records one replay step delivers before the loop looks at new events again
REPLAY_STEP = 200
#: ... or seconds (checked after each record)
REPLAY_SECONDS = 5.0
#: seconds between looks for segments left by other processes
FOREIGN_CHECK_INTERVAL = 5.0


class Spooler:
    """
    Writes an exporter's undeliverable backlog to the spool and replays it.

    Args:
        settings: the effective settings (spool dir, size bound, prefix).
        accounting: whose counts move as records are spooled and replayed.
        isolation: where a record that cannot be spooled (not JSON, too large) goes.
        child: this is a forked worker's exporter: it replays only what it spooled itself
            (its parent, alive, replays the rest and counts its own events there).
    """

    def __init__(
        self, settings: Settings, accounting: Accounting, isolation: Isolation, *, child: bool
    ) -> None:
        self._acct = accounting
        self._child = child
        self._isolation = isolation
        self._settings = settings
        self._dir = Path(settings.spool_dir)
        #: names this exporter's records, so it can tell its own from older processes'
        self.instance = uuid.uuid4().hex
        self.runs = RunMap(self._dir)
        self._spool: Spool | None = None
        self._own_runs: dict[str, Run] = {}
        self._started: set[str] = set()
        #: events of this exporter in the spool, not yet replayed
        self.own_pending = 0
        #: segments left by other processes are waiting
        self.foreign = False
        self._checked_at = 0.0
        #: server errors per record, across replays (poison records are isolated)
        self._repeats = Repeats()

    # -- start-up ------------------------------------------------------------------------
    def start(self) -> None:
        """Prune old local files; note whether older processes left segments to replay."""
        if self._child or not self._dir.exists():
            return
        try:
            removed = prune(self._dir, older_than_days=self._settings.artifact_retention_days)
            if removed:
                logger.info("allele-observability: pruned %d old spool files", len(removed))
            self.foreign = bool(Spool.inspect(self._dir, count_records=False))
        except OSError as exc:
            logger.warning("allele-observability: cannot read spool %s: %s", self._dir, exc)

    def check_foreign(self, *, every: float = FOREIGN_CHECK_INTERVAL) -> bool:
        """
        Look (at most every ``every`` seconds) for segments that other processes, such as
        terminated forked workers, left behind; return whether there are any.
        """
        now = time.monotonic()
        if self._child:
            return False
        if now - self._checked_at < every:
            return self.foreign
        self._checked_at = now
        if not self._dir.exists():
            return False
        try:
            replayable = [s for s in Spool.inspect(self._dir, count_records=False)
                          if s.state == "replayable"]  # fmt: skip
        except OSError:
            return self.foreign
        self.foreign = bool(replayable)
        return self.foreign

    @property
    def started_runs(self) -> frozenset[str]:
        """Keys of the runs whose start this exporter wrote to the spool."""
        return frozenset(self._started)

    def _get(self) -> Spool:
        if self._spool is None:
            self._spool = Spool(self._dir, max_bytes=self._settings.spool_max_bytes)
        return self._spool

    # -- in -------------------------------------------------------------------------------
    def spool_backlog(self, run: Run, b: Backlog) -> None:
        """Move everything ``b`` holds into the spool (the run start first, its end last)."""
        head = (self.instance, run.key, self._settings.experiment_prefix + run.experiment)
        run_id = run.created_id
        records: list[Record] = []
        if run_id is None and run.key not in self._started:
            parent = run.parent
            tags = {"mlflow.runName": run.name, "allele.run_key": run.key}
            records.append(
                RunRecord(
                    *head,
                    self._settings.artifact_location,
                    run.name,
                    run.start_time,
                    tags,
                    parent.key if parent else None,
                    parent.created_id if parent else None,
                )
            )
            self._started.add(run.key)
            if run.inherited:  # the parent's start, which this process now carries too
                self._acct.drained["run"] += 1
        max_metrics = self._settings.metrics_batch_size
        for bm, bp, bt in split_batches(b.metrics, b.params, b.tags, max_metrics=max_metrics):
            records.append(BatchRecord(*head, run_id, bm, bp, bt, system=False))
        for bm, _, _ in split_batches(b.system, [], [], max_metrics=max_metrics):
            records.append(BatchRecord(*head, run_id, bm, [], [], system=True))
        if b.alerts:
            try:
                b.alert_chunks.append(prepare_alerts(b.alerts, run.alert_counts))
            except Exception as exc:  # isolated to these alerts
                n = sum(1 for *_, role in b.alerts if role == PRIMARY)
                self._isolation.reject("preparing alerts", "alert", run, b.alerts, exc, n=n)
        records.extend(
            AlertsRecord(*head, run_id, c.records, c.metrics, c.tags, c.primary)
            for c in b.alert_chunks
        )
        if b.phases:
            records.append(PhasesRecord(*head, run_id, b.phases))
        records.extend(GenomeRecord(*head, run_id, g) for g in b.genomes)
        for local, apath in b.artifacts:  # replay uploads only the spool's own copies
            try:
                copy = stash_artifact(self._dir, local)
            except DeliveryError as err:  # the file is gone (or the disk full): its own fault
                self._isolation.dead_letter("artifact", run, [(local, apath)], err)
            else:
                records.append(ArtifactRecord(*head, run_id, copy, apath))
        b.metrics, b.system, b.params, b.tags, b.artifacts = [], [], [], [], []
        b.alerts, b.alert_chunks, b.phases, b.genomes = [], [], [], []
        self._own_runs[run.key] = run
        spool = self._get()
        for record in records:
            self._append(spool, run, record)
        if b.end is not None:
            status, end_time = b.end
            b.end = None
            # The tags describe the run with its end in the spool: count it there while
            # they are made (the caller holds the accounting lock), then append it.
            self._acct.count(run, "run", "spooled", 1)
            acct_tags = self._acct.run_tags(run, end_in_spool=True)
            self._acct.count(run, "run", "spooled", -1)
            self._append(spool, run, EndRecord(*head, run_id, status, end_time, acct_tags))

    def _append(self, spool: Spool, run: Run, record: Record) -> None:
        """
        Append one record and count its events spooled; a record the spool cannot hold
        (not JSON, larger than a record may be) is split, or dead-lettered with the
        reason; a full spool or a failing disk drops it (counted with the reason).
        """
        counts = record.counts()
        try:
            written = spool.append(encode(record))
        except (TypeError, ValueError) as exc:
            parts = _split(record)
            if parts:
                for part in parts:
                    self._append(spool, run, part)
                return
            for kind, n in counts.items():
                self._isolation.reject("spooling", kind, run, [record], exc, n=n)
            return
        except OSError as exc:
            self._isolation.report("writing the spool", exc)
            written, reason = False, "spool_error"
        else:
            reason = "spool_full"
        for kind, n in counts.items():
            self._acct.count(run, kind, "spooled" if written else "dropped", n)
            if written:
                self.own_pending += n
            else:
                self._acct.drop_reason(reason, n)

    # -- out ------------------------------------------------------------------------------
    def replay(
        self,
        backend: Backend,
        dead: DeadLetters,
        genome_sink: Callable[[str, dict[str, Any]], None],
        max_records: int | None = REPLAY_STEP,
        max_seconds: float | None = REPLAY_SECONDS,
    ) -> ReplayReport:
        """
        Replay up to ``max_records`` records or ``max_seconds`` (blocking: run it in a
        worker thread). Short steps let the loop spool what is emitted meanwhile, so the
        lane stays short while a large spool drains.
        """
        replayer = Replayer(
            self._get(),
            backend,
            self.runs,
            dead,
            on_run=self._on_run,
            on_delivered=self._on_delivered,
            end_tags=self._end_tags,
            genome_sink=genome_sink,
            repeats=self._repeats,
            own_only=self._child,
        )
        report = replayer.replay(max_records=max_records, max_seconds=max_seconds)
        if report.error is None and not report.partial:
            self.foreign = False
        return report

    def _own(self, record: Record) -> Run | None:
        return self._own_runs.get(record.key) if record.inst == self.instance else None

    def _on_run(self, key: str, run_id: str) -> None:
        run = self._own_runs.get(key)
        if run is not None and run.created_id is None:
            run.set_created(run_id)

    def _on_delivered(self, record: Record, lost: dict[str, int]) -> None:
        counts = record.counts()
        run = self._own(record)
        if run is None:
            self._acct.foreign_replayed(sum(counts.values()) - sum(lost.values()))
            return
        for kind, n in counts.items():
            dead = lost.get(kind, 0)
            self._acct.move(run, kind, "spooled", "delivered", n - dead)
            self._acct.move(run, kind, "spooled", "dead_lettered", dead)
            self.own_pending -= n
        if isinstance(record, EndRecord):  # the run is done here: release it
            self._own_runs.pop(record.key, None)
            self._started.discard(record.key)

    def _end_tags(self, record: EndRecord) -> list[tuple[str, str]] | None:
        """Fresh accounting tags for our own runs (the spooled ones are delivered by now)."""
        run = self._own(record)
        if run is None:
            return None
        # This end record itself is still counted as spooled: count it as delivered.
        return self._acct.run_tags(run, replaying=True)

    def close(self) -> None:
        """Close this process's segment so other processes may replay it."""
        if self._spool is not None:
            self._spool.flush(fsync=True)
            self._spool.close()


def _split(record: Record) -> list[Record]:
    """A batch record of several rows in two halves; nothing for any other record."""
    if not isinstance(record, BatchRecord):
        return []
    if len(record.metrics) + len(record.params) + len(record.tags) < 2:
        return []
    return [
        dataclasses.replace(record, metrics=m, params=p, tags=t)
        for m, p, t in halves(record.metrics, record.params, record.tags)
    ]
