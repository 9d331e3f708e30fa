"""
The exporter's side of the disk spool: what goes in, and moving counts when it comes out.

Rule: while this exporter has anything of its own in the spool (or is backing off after a
failure), everything it would deliver goes to the spool instead, and the spool is replayed
in order. So a run's end never overtakes its data, and memory stays bounded while the
store is down. Once the spool holds nothing of ours, delivery is direct again.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..alerts.store import prepare_alerts
from ..sinks.batching import split_batches
from ..spool.replay import Replayer, ReplayReport, RunMap, record_counts
from ..spool.retention import prune
from ..spool.segments import Spool

if TYPE_CHECKING:
    from .._core.runs import Run
    from ..backends.base import Backend
    from ..config import Settings
    from .loop import Exporter, _Backlog

__all__ = ("Spooler",)

logger = logging.getLogger("allele.observability")

#: records one replay step delivers before the loop looks at new events again
REPLAY_STEP = 200
#: seconds between looks for segments left by other processes
FOREIGN_CHECK_INTERVAL = 5.0


class Spooler:
    """
    Writes an exporter's undeliverable backlog to the spool and replays it.

    Args:
        exporter: the owner, whose counters move as records are spooled and replayed.
        settings: the effective settings (spool dir, size bound, prefix).
    """

    def __init__(self, exporter: Exporter, settings: Settings) -> None:
        self._exp = exporter
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
        #: events from other processes' spools delivered by this one
        self.replayed_foreign = 0
        self._checked_at = 0.0

    # -- start-up ------------------------------------------------------------------------
    def start(self) -> None:
        """Prune old local files; note whether older processes left segments to replay."""
        if not self._dir.exists():
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

    def _get(self) -> Spool:
        if self._spool is None:
            self._spool = Spool(self._dir, max_bytes=self._settings.spool_max_bytes)
        return self._spool

    # -- in -------------------------------------------------------------------------------
    def spool_backlog(self, run: Run, b: _Backlog) -> None:
        """Move everything ``b`` holds into the spool (the run start first, its end last)."""
        exp = self._exp
        name = self._settings.experiment_prefix + run.experiment
        inst, key = self.instance, run.key
        run_id = run._run_id
        records: list[list[Any]] = []
        if run_id is None and key not in self._started:
            parent = run.parent
            tags = {"mlflow.runName": run.name, "allele.run_key": key}
            records.append([
                "run", inst, key, name, self._settings.artifact_location, run.name,
                run.start_time, tags, parent.key if parent else None,
                parent._run_id if parent else None,
            ])  # fmt: skip
            self._started.add(key)
        max_metrics = self._settings.metrics_batch_size
        for bm, bp, bt in split_batches(b.metrics, b.params, b.tags, max_metrics=max_metrics):
            records.append(["batch", inst, key, name, run_id, bm, bp, bt, False])
        for bm, _, _ in split_batches(b.system, [], [], max_metrics=max_metrics):
            records.append(["batch", inst, key, name, run_id, bm, [], [], True])
        if b.alerts:
            counts = exp.alert_counts.setdefault(key, {})
            b.alert_chunks.append(prepare_alerts(b.alerts, counts))
        records.extend(
            ["alerts", inst, key, name, run_id, c.records, c.metrics, c.tags, c.primary]
            for c in b.alert_chunks
        )
        if b.phases:
            records.append(["phases", inst, key, name, run_id, b.phases])
        records.extend(["genome", inst, key, name, run_id, g] for g in b.genomes)
        records.extend(["artifact", inst, key, name, run_id, p, a] for p, a in b.artifacts)
        b.metrics, b.system, b.params, b.tags, b.artifacts = [], [], [], [], []
        b.alerts, b.alert_chunks, b.phases, b.genomes = [], [], [], []
        self._own_runs[key] = run
        spool = self._get()
        for record in records:
            self._append(spool, run, record)
        if b.end is not None:
            status, end_time = b.end
            b.end = None
            record = ["end", inst, key, name, run_id, status, end_time, []]
            exp._count(run, "run", "spooled", 1)  # counted before the tags describe it
            self.own_pending += 1
            record[7] = exp._accounting_tags(run, end_in_spool=True)
            if not spool.append(record):
                exp._move(run, "run", "spooled", "dropped", 1)
                self.own_pending -= 1
                exp._drop_reason("spool_full", 1)

    def _append(self, spool: Spool, run: Run, record: list[Any]) -> None:
        counts = record_counts(record)
        if spool.append(record):
            for kind, n in counts.items():
                self._exp._count(run, kind, "spooled", n)
                self.own_pending += n
        else:
            for kind, n in counts.items():
                self._exp._count(run, kind, "dropped", n)
                self._exp._drop_reason("spool_full", n)

    # -- out ------------------------------------------------------------------------------
    def replay(self, backend: Backend, max_records: int | None = REPLAY_STEP) -> ReplayReport:
        """Replay up to ``max_records`` records (blocking: run it in a worker thread)."""
        replayer = Replayer(
            self._get(),
            backend,
            self.runs,
            self._exp._dead,
            on_run=self._on_run,
            on_delivered=self._on_delivered,
            end_tags=self._end_tags,
            genome_sink=self._exp.genome_sink,
        )
        report = replayer.replay(max_records=max_records)
        if report.error is None and (max_records is None or report.records < max_records):
            self.foreign = False
        return report

    def _on_run(self, key: str, run_id: str) -> None:
        run = self._own_runs.get(key)
        if run is not None and run._run_id is None:
            run._set_run_id(run_id)

    def _on_delivered(self, record: list[Any], lost: dict[str, int]) -> None:
        counts = record_counts(record)
        run = self._own_runs.get(record[2]) if record[1] == self.instance else None
        if run is None:
            self.replayed_foreign += sum(counts.values()) - sum(lost.values())
            return
        for kind, n in counts.items():
            dead = lost.get(kind, 0)
            self._exp._move(run, kind, "spooled", "delivered", n - dead)
            self._exp._move(run, kind, "spooled", "dead_lettered", dead)
            self.own_pending -= n

    def _end_tags(self, record: list[Any]) -> list[tuple[str, str]] | None:
        """Fresh accounting tags for our own runs (the spooled ones are delivered by now)."""
        run = self._own_runs.get(record[2]) if record[1] == self.instance else None
        if run is None:
            return None
        # This end record itself is still counted as spooled: count it as delivered.
        return self._exp._accounting_tags(run, replaying=True)

    def close(self) -> None:
        """Close this process's segment so other processes may replay it."""
        if self._spool is not None:
            self._spool.flush(fsync=True)
            self._spool.close()
