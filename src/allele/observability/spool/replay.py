"""
Replay of spool records into a tracking store.

Records (see :mod:`.records`) are replayed in order, segment by segment, oldest first. A
run record creates the run unless it exists (the run-key map, then a search by the tag
``allele.run_key``), so a replay never creates a second run. A record the store refuses
for good is dead-lettered with the reason: whole, or after isolating the bad rows of a
batch when the store refused rows (``DeliveryError.per_row``, found by splitting the batch
in halves); an artifact whose local file is gone is the record's problem, not the store's.
A retryable failure stops the replay and leaves the rest, with a resume offset, for the
next attempt. A record that fails with a ``server_error`` ``REPEAT_LIMIT`` times (counted
across replays by :class:`~..sinks.batching.Repeats`, keyed by its content) while the
store answers an empty request for its run is isolated like a rejection, so one poison
row never blocks the replay forever.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..alerts.store import ALERTS_DIR, PHASES_DIR, write_chunk
from ..backends.base import DeliveryError
from ..sinks.batching import Repeats, batch_identity, halves, split_batches
from .records import (
    AlertsRecord,
    ArtifactRecord,
    BatchRecord,
    EndRecord,
    GenomeRecord,
    PhasesRecord,
    Record,
    RecordError,
    RunRecord,
    decode,
    encode,
)
from .safety import check_artifact, discard_artifact

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..backends.base import Backend
    from ..sinks.deadletter import DeadLetters
    from .runmap import RunMap
    from .segments import Spool

__all__ = ("ReplayReport", "Replayer")

logger = logging.getLogger("allele.observability")


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
    #: stopped at ``max_records`` or ``max_seconds`` with records left
    partial: bool = False


class Replayer:
    """
    Replays spool segments through a backend. Blocking; thread-safe per instance.

    Args:
        spool: the spool to claim segments from.
        backend: where to deliver.
        run_map: run key to run id.
        dead: where rejected records go.
        on_run: called with (key, run_id) when a run is created or found.
        genome_sink: registers genome records (``sinks.registry.GenomeSink``).
        repeats: server errors per record, kept across replays (pass the same one to
            every replayer of a spool); a fresh one if not given.
        end_tags: returns fresh accounting tags for a run's end record, or None to use
            the record's own (adjusted: what was spooled is now delivered).
        on_delivered: called with (record, dead) for each record replayed, where ``dead``
            counts the events of it that were dead-lettered, per kind (empty: all
            delivered), so the exporter can move its own counts.
        own_only: replay only the segments this process wrote (see ``Spool.claim``).
    """

    def __init__(
        self,
        spool: Spool,
        backend: Backend,
        run_map: RunMap,
        dead: DeadLetters,
        *,
        on_run: Callable[[str, str], None] | None = None,
        on_delivered: Callable[[Record, dict[str, int]], None] | None = None,
        end_tags: Callable[[EndRecord], list[tuple[str, str]] | None] | None = None,
        genome_sink: Callable[[str, dict[str, Any]], None] | None = None,
        repeats: Repeats | None = None,
        own_only: bool = False,
    ) -> None:
        self._spool = spool
        self._own_only = own_only
        self._backend = backend
        self._runs = run_map
        self._dead = dead
        self._on_run = on_run
        self._on_delivered = on_delivered
        self._end_tags = end_tags
        self._genome_sink = genome_sink
        self._experiments: dict[str, str] = {}
        self._lost: dict[str, int] = {}
        self._repeats = repeats if repeats is not None else Repeats()

    def replay(
        self,
        *,
        max_records: int | None = None,
        max_seconds: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ReplayReport:
        """
        Replay claimable segments oldest first until done, ``max_records``, ``max_seconds``
        (checked after each record), or an error.
        """
        until = None if max_seconds is None else time.monotonic() + max_seconds
        limit = max_records if max_records is not None else -1
        records = dead = segments = 0
        partial = False
        events: dict[str, int] = {}
        for claim in self._spool.claim(own_only=self._own_only):
            with claim:
                try:
                    for offset, raw in claim.records():  # noqa: B007 - used on failure
                        record = self._decode(raw)
                        if record is None:
                            dead += 1
                            continue
                        lost = self._replay_one(record)
                        if lost:
                            dead += 1
                        else:
                            records += 1
                        for k, n in record.counts().items():
                            events[k] = events.get(k, 0) + n - lost.get(k, 0)
                        if self._on_delivered is not None:
                            self._on_delivered(record, lost)
                        if progress is not None:
                            progress(1)
                        if records + dead == limit or (until and time.monotonic() >= until):
                            partial = True
                            break
                except DeliveryError as err:
                    claim.release(offset)  # the record that failed is replayed next time
                    return ReplayReport(records, events, dead, segments, err)
                if partial:
                    claim.release(claim.position)  # resume right after what was delivered
                    break
                claim.done()
                segments += 1
        return ReplayReport(records, events, dead, segments, None, partial)

    def _decode(self, raw: object) -> Record | None:
        """The record, or None after dead-lettering an entry this release cannot read."""
        try:
            return decode(raw)
        except RecordError as exc:
            self._dead.append(
                {
                    "time": time.time(),
                    "kind": "unreadable",
                    "reason": "rejected",
                    "message": str(exc),
                    "rows": [raw],
                }
            )
            return None

    # -- one record ------------------------------------------------------------------------
    def _experiment(self, name: str, artifact_location: str | None) -> str:
        exp_id = self._experiments.get(name)
        if exp_id is None:
            exp_id = self._experiments[name] = self._backend.ensure_experiment(
                name, artifact_location
            )
        return exp_id

    def _run_id(self, record: Record) -> str:
        known = getattr(record, "run_id", None)
        if known:
            return str(known)
        found = self._runs.get(record.key)
        if found is None:
            found = self._backend.find_run(self._experiment(record.experiment, None), record.key)
            if found is None:
                raise DeliveryError(
                    "rejected",
                    f"run {record.key} was never created (its start record is lost)",
                    retryable=False,
                )
            self._remember(record.key, found)
        return found

    def _remember(self, key: str, run_id: str) -> None:
        self._runs.put(key, run_id)
        if self._on_run is not None:
            self._on_run(key, run_id)

    def _replay_one(self, record: Record) -> dict[str, int]:
        """Deliver one record; return the events of it that were dead-lettered, per kind."""
        self._lost = {}
        try:
            if isinstance(record, RunRecord):
                self._replay_run(record)
            elif isinstance(record, BatchRecord):
                self._log_isolating(record, self._run_id(record))
            elif isinstance(record, ArtifactRecord):
                check_artifact(self._spool.directory, record.path)  # only the spool's copies
                self._backend.log_artifact(self._run_id(record), record.path, record.artifact_path)
                discard_artifact(self._spool.directory, record.path)
            elif isinstance(record, (AlertsRecord, PhasesRecord)):
                self._replay_annotations(record)
            elif isinstance(record, GenomeRecord):
                if self._genome_sink is None:
                    msg = "no genome registry configured for this replay"
                    raise DeliveryError("unavailable", msg, retryable=True)  # noqa: TRY301
                self._genome_sink(self._run_id(record), record.genome)
            else:
                rid = self._run_id(record)
                fresh = self._end_tags(record) if self._end_tags is not None else None
                tags = fresh if fresh is not None else _replayed_tags(record.tags)
                self._backend.log_batch(rid, [], [], tags)
                self._backend.end_run(rid, record.status, record.end_time)
        except DeliveryError as err:
            if err.retryable:
                if isinstance(record, (RunRecord, BatchRecord)) or not self._poison(record, err):
                    raise
                err = _isolated(err, self._repeats.limit)
            self._dead_letter(record, err)
            return record.counts()
        return self._lost

    def _poison(self, record: Record, err: DeliveryError) -> bool:
        """Whether ``record`` failed ``REPEAT_LIMIT`` times while the store is up."""
        if not err.repeatable:
            return False
        identity = batch_identity(encode(record))
        if not self._repeats.exhausted(identity) or not self._probe(record):
            return False
        self._repeats.forget(identity)
        return True

    def _probe(self, record: Record) -> bool:
        """Whether the store answers an empty request for the record's run."""
        try:
            self._backend.log_batch(self._run_id(record), [], [], [])
        except DeliveryError:
            return False
        return True

    def _dead_letter(self, record: Record, err: DeliveryError) -> None:
        """Keep a rejected record in the dead-letter file with the store's reason."""
        fields = encode(record)
        for name in ("kind", "inst", "key", "experiment", "run_id", "v"):
            fields.pop(name, None)
        self._dead.append(
            {
                "time": time.time(),
                "kind": record.kind,
                "run_key": record.key,
                "experiment": record.experiment,
                "run_id": getattr(record, "run_id", None),
                "reason": err.reason,
                "message": err.message,
                "rows": list(fields.values()),
            }
        )

    def _replay_annotations(self, record: AlertsRecord | PhasesRecord) -> None:
        rid = self._run_id(record)
        runs = self._runs
        is_alerts = isinstance(record, AlertsRecord)
        items = record.alerts if isinstance(record, AlertsRecord) else record.phases
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
            path = write_chunk(Path(tmp), record.key, record.kind, items)
            self._backend.log_artifact(rid, path, ALERTS_DIR if is_alerts else PHASES_DIR)
        if isinstance(record, AlertsRecord):
            metrics = [tuple(m) for m in record.metrics]
            tags = [tuple(t) for t in record.tags]
            for bm, bp, bt in split_batches(metrics, [], tags):
                self._backend.log_batch(rid, bm, bp, bt)

    def _replay_run(self, record: RunRecord) -> None:
        key = record.key
        if self._runs.get(key) is not None:
            self._remember(key, self._runs.get(key) or "")
            return
        exp_id = self._experiment(record.experiment, record.artifact_location)
        found = self._backend.find_run(exp_id, key)
        if found is None:
            tags = dict(record.tags)
            parent = record.parent_run_id or (
                self._runs.get(record.parent_key) if record.parent_key else None
            )
            if parent:
                tags["mlflow.parentRunId"] = parent
            found = self._backend.create_run(
                exp_id, run_name=record.name, start_time=record.start_time, tags=tags
            )
        self._remember(key, found)

    def _log_isolating(self, record: BatchRecord, run_id: str) -> None:
        rows: tuple[list[Any], list[Any], list[Any]] = (
            [tuple(m) for m in record.metrics],
            [tuple(p) for p in record.params],
            [tuple(t) for t in record.tags],
        )
        stack = [rows]
        identity, isolating = "", False
        while stack:
            part = stack.pop()
            try:
                self._backend.log_batch(run_id, *part)
            except DeliveryError as err:
                if part is rows and err.repeatable:
                    identity = batch_identity(encode(record))
                    isolating = self._repeats.exhausted(identity) and self._probe(record)
                if err.retryable and not (isolating and err.repeatable):
                    raise
                if part is rows and not err.per_row and not err.retryable:
                    raise  # the whole record is refused: dead-lettered whole by the caller
                if sum(map(len, part)) > 1 and (err.per_row or err.retryable):
                    stack.extend(reversed(halves(*part)))
                    continue
                if err.retryable:
                    if not self._probe(record):  # the store broke down meanwhile
                        raise
                    err = _isolated(err, self._repeats.limit)
                rejected = dataclasses.replace(
                    record, metrics=part[0], params=part[1], tags=part[2]
                )
                self._dead_letter(rejected, err)
                for k, n in rejected.counts().items():
                    self._lost[k] = self._lost.get(k, 0) + n
        if identity:
            self._repeats.forget(identity)


def _isolated(err: DeliveryError, attempts: int) -> DeliveryError:
    """The error a poison record is dead-lettered with: same reason, and why."""
    msg = f"{err.message} (failed {attempts} times while the store answered: isolated)"
    return DeliveryError(err.reason, msg, retryable=False)


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
