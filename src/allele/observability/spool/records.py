"""
Spool records: one versioned record type per kind.

The exporter turns what it cannot deliver into self-contained records, so that any
process with the same spool directory can replay them, even one that never saw the run.
Each record names the exporter instance that wrote it (``inst``), the run's local key
(``key``) and its experiment (with the prefix); ``run_id`` is the MLflow run id when it was
known at spool time.

On disk a record is a JSON object ``{"v": 1, "kind": ..., <fields>}``. Records of the first
release (``v`` 0) are positional JSON arrays ``[kind, inst, key, ...]``; :func:`decode`
reads both, so old segments still replay.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = (
    "VERSION",
    "AlertsRecord",
    "ArtifactRecord",
    "BatchRecord",
    "EndRecord",
    "GenomeRecord",
    "PhasesRecord",
    "Record",
    "RecordError",
    "RunRecord",
    "decode",
    "encode",
)

#: the version this release writes
VERSION = 1


class RecordError(ValueError):
    """A spool entry that is not a record this release can read."""


@dataclass(frozen=True, slots=True)
class RunRecord:
    """Create the run (unless it exists: the run-key map, then a search by its key tag)."""

    kind: ClassVar[str] = "run"
    inst: str
    key: str
    experiment: str
    artifact_location: str | None
    name: str
    start_time: int
    tags: dict[str, str]
    parent_key: str | None
    parent_run_id: str | None
    v: int = VERSION

    def counts(self) -> dict[str, int]:
        """The events this record stands for, per kind."""
        return {"run": 1}


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """
    One ``log_batch`` within MLflow's limits; metric rows keep the timestamp taken at
    emit, so a replayed metric is identical to the original and the store ignores a
    duplicate. ``system`` batches hold system samples (kind "system").
    """

    kind: ClassVar[str] = "batch"
    inst: str
    key: str
    experiment: str
    run_id: str | None
    metrics: list[Any]
    params: list[Any]
    tags: list[Any]
    system: bool
    v: int = VERSION

    def counts(self) -> dict[str, int]:
        """The events this record stands for, per kind."""
        return {
            "system" if self.system else "metric": len(self.metrics),
            "param": len(self.params),
            "tag": len(self.tags),
        }


@dataclass(frozen=True, slots=True)
class AlertsRecord:
    """A chunk of alert records with their count metrics and tags; ``primary`` events."""

    kind: ClassVar[str] = "alerts"
    inst: str
    key: str
    experiment: str
    run_id: str | None
    alerts: list[dict[str, Any]]
    metrics: list[Any]
    tags: list[Any]
    primary: int
    v: int = VERSION

    def counts(self) -> dict[str, int]:
        """The events this record stands for, per kind."""
        return {"alert": self.primary}


@dataclass(frozen=True, slots=True)
class PhasesRecord:
    """Phase records of one run."""

    kind: ClassVar[str] = "phases"
    inst: str
    key: str
    experiment: str
    run_id: str | None
    phases: list[dict[str, Any]]
    v: int = VERSION

    def counts(self) -> dict[str, int]:
        """The events this record stands for, per kind."""
        return {"phase": len(self.phases)}


@dataclass(frozen=True, slots=True)
class GenomeRecord:
    """One genome to register (or log) into the run."""

    kind: ClassVar[str] = "genome"
    inst: str
    key: str
    experiment: str
    run_id: str | None
    genome: dict[str, Any]
    v: int = VERSION

    def counts(self) -> dict[str, int]:
        """The events this record stands for, per kind."""
        return {"genome": 1}


@dataclass(frozen=True, slots=True)
class ArtifactRecord:
    """A local file or directory to upload into the run's artifacts."""

    kind: ClassVar[str] = "artifact"
    inst: str
    key: str
    experiment: str
    run_id: str | None
    path: str
    artifact_path: str | None
    v: int = VERSION

    def counts(self) -> dict[str, int]:
        """The events this record stands for, per kind."""
        return {"artifact": 1}


@dataclass(frozen=True, slots=True)
class EndRecord:
    """End the run with its status and its accounting tags as they were at spool time."""

    kind: ClassVar[str] = "end"
    inst: str
    key: str
    experiment: str
    run_id: str | None
    status: str
    end_time: int
    tags: list[Any]
    v: int = VERSION

    def counts(self) -> dict[str, int]:
        """The events this record stands for, per kind."""
        return {"run": 1}


Record = (
    RunRecord
    | BatchRecord
    | AlertsRecord
    | PhasesRecord
    | GenomeRecord
    | ArtifactRecord
    | EndRecord
)
_TYPES: dict[str, type[Record]] = {
    t.kind: t
    for t in (
        RunRecord,
        BatchRecord,
        AlertsRecord,
        PhasesRecord,
        GenomeRecord,
        ArtifactRecord,
        EndRecord,
    )
}
_FIELDS = {kind: tuple(f.name for f in dataclasses.fields(t)) for kind, t in _TYPES.items()}


def encode(record: Record) -> dict[str, Any]:
    """The JSON form of ``record`` (a fresh dict; rows are shared, not copied)."""
    out: dict[str, Any] = {"kind": record.kind}
    for name in _FIELDS[record.kind]:
        out[name] = getattr(record, name)
    return out


def decode(raw: object) -> Record:
    """
    Read a record as written by this release (a versioned object) or the first one (a
    positional array).

    Raises:
        RecordError: not a record, an unknown kind, or a version newer than this release.
    """
    if isinstance(raw, list):
        return _decode_v0(raw)
    if not isinstance(raw, dict):
        raise RecordError(f"not a spool record: {str(raw)[:200]}")
    kind, version = raw.get("kind"), raw.get("v")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RecordError(f"unknown spool record kind {kind!r}")
    if not isinstance(version, int) or not 0 <= version <= VERSION:
        raise RecordError(f"spool record version {version!r} is not readable by this release")
    try:
        return cls(**{name: raw[name] for name in _FIELDS[cls.kind]})
    except (KeyError, TypeError) as exc:
        raise RecordError(f"malformed {kind!r} spool record: missing {exc}") from None


def _decode_v0(raw: list[Any]) -> Record:
    """The first release's positional records: ``[kind, inst, key, experiment, ...]``."""
    kind = raw[0] if raw else None
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RecordError(f"unknown spool record kind {kind!r}")
    fields = _FIELDS[cls.kind][:-1]  # every field but "v", in the order v0 wrote them
    if len(raw) != len(fields) + 1:
        raise RecordError(f"malformed {kind!r} spool record of {len(raw)} items")
    return cls(**dict(zip(fields, raw[1:], strict=True)), v=0)
