"""
Spool records and their replay into a tracking store.

The exporter turns what it cannot deliver into self-contained records, so that any
process with the same spool directory can replay them, even one that never saw the run:

``["run", inst, key, experiment, artifact_location, name, start_time, tags, parent_key,
parent_run_id]``
    create the run (unless it exists: the run-key map, then a search by the tag
    ``allele.run_key``, so a replay never creates a second run).
``["batch", inst, key, experiment, run_id, metrics, params, tags, is_system]``
    one ``log_batch`` within MLflow's limits; rows keep the timestamp taken at emit, so
    a replayed metric is identical to the original and the SQL store ignores a duplicate.
``["artifact", inst, key, experiment, run_id, local_path, artifact_path]``
``["end", inst, key, experiment, run_id, status, end_time, accounting_tags]``

``inst`` names the exporter that wrote the record; when that exporter replays its own
records it moves them from ``spooled`` to ``delivered`` in ``stats()``. Records are
replayed in order, segment by segment, oldest first. A record the store rejects is
dead-lettered (after isolating the bad rows of a batch); a retryable failure stops the
replay and leaves the rest, with a resume offset, for the next attempt.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..alerts.store import ALERTS_DIR, PHASES_DIR, write_chunk
from ..backends.base import DeliveryError
from ..sinks.batching import split_batches

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..backends.base import Backend
    from ..sinks.deadletter import DeadLetters
    from .segments import Spool

__all__ = ("ReplayReport", "Replayer", "RunMap", "record_counts")

logger = logging.getLogger("allele.observability")

RUN_MAP_FILE = "runs.jsonl"


def record_counts(record: list[Any]) -> dict[str, int]:
    """The events one record stands for, per kind."""
    kind = record[0]
    if kind == "batch":
        return {
            "system" if record[8] else "metric": len(record[5]),
            "param": len(record[6]),
            "tag": len(record[7]),
        }
    if kind in ("run", "end"):
        return {"run": 1}
    if kind == "alerts":
        return {"alert": record[8]}
    if kind == "phases":
        return {"phase": len(record[5])}
    if kind == "genome":
        return {"genome": 1}
    return {"artifact": 1}


class RunMap:
    """
    Run key to MLflow run id, shared by the processes of one spool directory.

    Kept in memory and appended to ``<spool>/runs.jsonl`` (mode 0600), so a replay by
    another process finds runs created by this one without searching the store.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / RUN_MAP_FILE
        self._lock = threading.Lock()
        self._map: dict[str, str] = {}
        self._loaded_size = -1

    def get(self, key: str) -> str | None:
        """Return the run id of ``key`` if known here or on disk."""
        found = self._map.get(key)
        if found is None:
            self._reload()
            found = self._map.get(key)
        return found

    def put(self, key: str, run_id: str) -> None:
        """Remember a run id (in memory and on disk)."""
        with self._lock:
            if self._map.get(key) == run_id:
                return
            self._map[key] = run_id
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with os.fdopen(fd, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"key": key, "run_id": run_id}) + "\n")
            except OSError as exc:
                logger.warning("allele-observability: cannot write %s: %s", self.path, exc)

    def _reload(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size == self._loaded_size:
            return
        with self._lock, self.path.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    item = json.loads(line)
                    self._map.setdefault(item["key"], item["run_id"])
                except (ValueError, KeyError, TypeError):
                    continue
            self._loaded_size = size


class ReplayReport(NamedTuple):
    """What one replay did."""

    #: records delivered
    records: int
    #: events delivered, per kind
    events: dict[str, int]
    #: records dead-lettered (rejected by the store)
    dead_lettered: int
    #: segments fully replayed
    segments: int
    #: the retryable error that stopped the replay, if any
    error: DeliveryError | None


class Replayer:
    """
    Replays spool segments through a backend. Blocking; thread-safe per instance.

    Args:
        spool: the spool to claim segments from.
        backend: where to deliver.
        run_map: run key to run id.
        dead: where rejected records go.
        on_run: called with (key, run_id) when a run is created or found.
        genome_sink: registers genome records (``exporter._genomes.GenomeSink``).
        end_tags: returns fresh accounting tags for a run's end record, or None to use
            the record's own (adjusted: what was spooled is now delivered).
        on_delivered: called with (record, dead) for each record replayed, where ``dead``
            counts the events of it that were dead-lettered, per kind (empty: all
            delivered), so the exporter can move its own counts.
    """

    def __init__(
        self,
        spool: Spool,
        backend: Backend,
        run_map: RunMap,
        dead: DeadLetters,
        *,
        on_run: Callable[[str, str], None] | None = None,
        on_delivered: Callable[[list[Any], dict[str, int]], None] | None = None,
        end_tags: Callable[[list[Any]], list[tuple[str, str]] | None] | None = None,
        genome_sink: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self._spool = spool
        self._backend = backend
        self._runs = run_map
        self._dead = dead
        self._on_run = on_run
        self._on_delivered = on_delivered
        self._end_tags = end_tags
        self._genome_sink = genome_sink
        self._experiments: dict[str, str] = {}
        self._lost: dict[str, int] = {}

    def replay(
        self,
        *,
        max_records: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ReplayReport:
        """Replay claimable segments oldest first until done, ``max_records``, or an error."""
        records = dead = segments = 0
        events: dict[str, int] = {}
        for claim in self._spool.claim():
            with claim:
                try:
                    for offset, record in claim.records():  # noqa: B007 - used on failure
                        if not isinstance(record, list) or not record:
                            continue
                        lost = self._replay_one(record)
                        if lost:
                            dead += 1
                        else:
                            records += 1
                        for k, n in record_counts(record).items():
                            events[k] = events.get(k, 0) + n - lost.get(k, 0)
                        if self._on_delivered is not None:
                            self._on_delivered(record, lost)
                        if progress is not None:
                            progress(1)
                        if max_records is not None and records + dead >= max_records:
                            break
                except DeliveryError as err:
                    claim.release(offset)  # the record that failed is replayed next time
                    return ReplayReport(records, events, dead, segments, err)
                if max_records is not None and records + dead >= max_records:
                    claim.release(claim.position)  # resume right after what was delivered
                    break
                claim.done()
                segments += 1
        return ReplayReport(records, events, dead, segments, None)

    # -- one record ------------------------------------------------------------------------
    def _experiment(self, name: str, artifact_location: str | None) -> str:
        exp_id = self._experiments.get(name)
        if exp_id is None:
            exp_id = self._experiments[name] = self._backend.ensure_experiment(
                name, artifact_location
            )
        return exp_id

    def _run_id(self, key: str, experiment: str, known: str | None) -> str:
        if known:
            return known
        found = self._runs.get(key)
        if found is None:
            found = self._backend.find_run(self._experiment(experiment, None), key)
            if found is None:
                raise DeliveryError(
                    "rejected",
                    f"run {key} was never created (its start record is lost)",
                    retryable=False,
                )
            self._remember(key, found)
        return found

    def _remember(self, key: str, run_id: str) -> None:
        self._runs.put(key, run_id)
        if self._on_run is not None:
            self._on_run(key, run_id)

    def _replay_one(self, record: list[Any]) -> dict[str, int]:
        """Deliver one record; return the events of it that were dead-lettered, per kind."""
        kind = record[0]
        self._lost = {}
        try:
            if kind == "run":
                self._replay_run(record)
            elif kind == "batch":
                _, _, key, exp, run_id, metrics, params, tags, _ = record
                rid = self._run_id(key, exp, run_id)
                self._log_isolating(record, rid, metrics, params, tags)
            elif kind == "artifact":
                _, _, key, exp, run_id, local, apath = record
                self._backend.log_artifact(self._run_id(key, exp, run_id), local, apath)
            elif kind in ("alerts", "phases"):
                self._replay_annotations(record)
            elif kind == "genome":
                if self._genome_sink is None:
                    msg = "no genome registry configured for this replay"
                    raise DeliveryError("unavailable", msg, retryable=True)  # noqa: TRY301
                self._genome_sink(self._run_id(record[2], record[3], record[4]), record[5])
            elif kind == "end":
                _, _, key, exp, run_id, status, end_time, acct = record
                rid = self._run_id(key, exp, run_id)
                fresh = self._end_tags(record) if self._end_tags is not None else None
                tags = fresh if fresh is not None else _replayed_tags(acct)
                self._backend.log_batch(rid, [], [], tags)
                self._backend.end_run(rid, status, end_time)
            else:
                msg = f"unknown record kind {kind!r}"
                raise DeliveryError("rejected", msg, retryable=False)  # noqa: TRY301
        except DeliveryError as err:
            if err.retryable:
                raise
            self._dead.write_record(record, err)
            return record_counts(record)
        return self._lost

    def _replay_annotations(self, record: list[Any]) -> None:
        key, exp, run_id, items = record[2], record[3], record[4], record[5]
        rid = self._run_id(key, exp, run_id)
        runs = self._runs
        is_alerts = record[0] == "alerts"
        for item in items:  # fill in the run ids that were not known when spooled
            if is_alerts:
                if item.get("run_id") is None and item.get("run_key"):
                    item["run_id"] = runs.get(item["run_key"])
                keys = item.get("correlated_run_keys") or []
                ids = item.get("correlated_run_ids") or [None] * len(keys)
                item["correlated_run_ids"] = [
                    i or runs.get(k) for i, k in zip(ids, keys, strict=False)
                ]
            elif item.get("run_id") is None:
                item["run_id"] = rid
        with tempfile.TemporaryDirectory(prefix="allele-replay-") as tmp:
            path = write_chunk(Path(tmp), key, record[0], items)
            self._backend.log_artifact(rid, path, ALERTS_DIR if is_alerts else PHASES_DIR)
        if is_alerts:
            for bm, bp, bt in split_batches([tuple(m) for m in record[6]], [],
                                            [tuple(t) for t in record[7]]):  # fmt: skip
                self._backend.log_batch(rid, bm, bp, bt)

    def _replay_run(self, record: list[Any]) -> None:
        _, _, key, exp, artifact_location, name, start_time, tags, parent_key, parent_id = record
        if self._runs.get(key) is not None:
            self._remember(key, self._runs.get(key) or "")
            return
        exp_id = self._experiment(exp, artifact_location)
        found = self._backend.find_run(exp_id, key)
        if found is None:
            tags = dict(tags)
            parent = parent_id or (self._runs.get(parent_key) if parent_key else None)
            if parent:
                tags["mlflow.parentRunId"] = parent
            found = self._backend.create_run(
                exp_id, run_name=name, start_time=start_time, tags=tags
            )
        self._remember(key, found)

    def _log_isolating(
        self, record: list[Any], run_id: str, metrics: Any, params: Any, tags: Any
    ) -> None:
        rows_m = [tuple(m) for m in metrics]
        rows_p = [tuple(p) for p in params]
        rows_t = [tuple(t) for t in tags]
        try:
            self._backend.log_batch(run_id, rows_m, rows_p, rows_t)
        except DeliveryError as err:
            if err.retryable or len(rows_m) + len(rows_p) + len(rows_t) <= 1:
                raise
            # Deliver the good rows; only the rejected ones become dead letters.
            for m in rows_m:
                self._single(record, run_id, [m], [], [])
            for p in rows_p:
                self._single(record, run_id, [], [p], [])
            for t in rows_t:
                self._single(record, run_id, [], [], [t])

    def _single(self, record: list[Any], run_id: str, m: Any, p: Any, t: Any) -> None:
        try:
            self._backend.log_batch(run_id, m, p, t)
        except DeliveryError as err:
            if err.retryable:
                raise
            rejected = [*record[:5], m, p, t, record[8]]
            self._dead.write_record(rejected, err)
            for k, n in record_counts(rejected).items():
                self._lost[k] = self._lost.get(k, 0) + n


def _replayed_tags(acct: list[Any]) -> list[tuple[str, str]]:
    """A spooled run's accounting tags, once its spooled events have been replayed."""
    tags = {str(k): str(v) for k, v in acct}
    prefix = "allele.telemetry."
    try:
        spooled = int(tags.get(prefix + "spooled", "0"))
        delivered = int(tags.get(prefix + "delivered", "0")) + spooled
        lost = int(tags.get(prefix + "dropped", "0")) + int(tags.get(prefix + "dead_lettered", "0"))
    except ValueError:
        return list(tags.items())
    tags[prefix + "delivered"] = str(delivered)
    tags[prefix + "spooled"] = "0"
    tags[prefix + "replayed"] = str(spooled)
    tags[prefix + "complete"] = "true" if lost == 0 else "false"
    return list(tags.items())
