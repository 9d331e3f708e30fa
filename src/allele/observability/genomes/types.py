"""
Value types of the genome registry, alias validation and input checks.

These are plain frozen dataclasses with ``as_dict()`` for JSON output; they hold no
connection to MLflow. :func:`prepare_genome` (from :mod:`.checks`) does every check that
can fail on bad input (so it raises at the call site, before anything is queued or sent).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .checks import prepare_genome

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .identity import DiffEntry

__all__ = (
    "ComponentVersion",
    "GenomeComparison",
    "GenomeNotFoundError",
    "GenomeRef",
    "GenomeVersion",
    "content_sha256",
    "error_code",
    "genome_version_tags",
    "prepare_genome",
    "quote_filter",
    "upsert",
    "validate_alias",
    "version_from_mlflow",
)

_ALIAS_RE = re.compile(r"^[\w\-]+$")
_VERSION_ALIAS_RE = re.compile(r"^[vV]\d+$")


class GenomeNotFoundError(LookupError):
    """Raised when a genome id, version number or model name is not in the registry."""


def validate_alias(alias: str) -> str:
    r"""
    Check an alias as MLflow does: ``^[\\w\\-]+$``, at most 255 characters, not ``latest``
    (any case) and not ``v<N>``. Returns it unchanged.

    Raises:
        ValueError: naming the alias and the rule it breaks.
    """
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias) or len(alias) > 255:
        raise ValueError(f"invalid alias {alias!r}: use 1-255 letters, digits, '_' or '-'")
    if alias.lower() == "latest" or _VERSION_ALIAS_RE.match(alias):
        raise ValueError(f"invalid alias {alias!r}: 'latest' and 'v<N>' are reserved by MLflow")
    return alias


@dataclass(frozen=True)
class GenomeRef:
    """A parent that was never registered: only its id is known."""

    genome_id: str

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"genome_id": self.genome_id, "registered": False}


@dataclass(frozen=True)
class GenomeVersion:
    """One genome as a version of a registered model."""

    name: str
    version: int
    genome_id: str
    fitness: float | None
    generation: int | None
    parents: tuple[str, ...]
    run_id: str | None
    aliases: tuple[str, ...]
    source: str
    #: how many repeated fitness evaluations were logged with it
    evaluations: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (NaN fitness becomes ``None``)."""
        fitness = None if self.fitness is None or math.isnan(self.fitness) else self.fitness
        return {
            "name": self.name,
            "version": self.version,
            "genome_id": self.genome_id,
            "fitness": fitness,
            "generation": self.generation,
            "parents": list(self.parents),
            "run_id": self.run_id,
            "aliases": list(self.aliases),
            "source": self.source,
            "evaluations": self.evaluations,
            "registered": True,
        }


@dataclass(frozen=True)
class ComponentVersion:
    """A model file or directory registered as a version."""

    name: str
    version: int
    content_sha256: str
    run_id: str
    source: str


@dataclass(frozen=True)
class GenomeComparison:
    """Two versions side by side; deltas and ``welch`` read "b relative to a"."""

    name: str
    a: GenomeVersion
    b: GenomeVersion
    #: ``b.fitness - a.fitness`` (None if either is unknown)
    fitness_delta: float | None
    #: the first differences of the canonical genomes, depth first
    differences: tuple[DiffEntry, ...]
    #: how many differences there are in all
    difference_count: int
    #: ``(t, dof, p_value)`` of Welch's test of b's evaluations against a's, or None
    welch: tuple[float, float, float] | None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        welch = None
        if self.welch is not None:
            welch = dict(zip(("t", "dof", "p_value"), map(_finite, self.welch), strict=True))
        return {
            "name": self.name,
            "a": self.a.as_dict(),
            "b": self.b.as_dict(),
            "fitness_delta": self.fitness_delta,
            "differences": [d.as_dict() for d in self.differences],
            "difference_count": self.difference_count,
            "welch": welch,
        }


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else repr(x)


def content_sha256(path: Path) -> str:
    r"""SHA-256 of a file, or of a directory's manifest (sorted ``relpath\\0sha256\\n`` lines)."""

    def file_hash(p: Path) -> str:
        h = hashlib.sha256()
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    if path.is_file():
        return file_hash(path)
    manifest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        manifest.update(f"{p.relative_to(path).as_posix()}\0{file_hash(p)}\n".encode())
    return manifest.hexdigest()


def version_from_mlflow(mv: Any, aliases: tuple[str, ...]) -> GenomeVersion:
    """Build a :class:`GenomeVersion` from an MLflow ``ModelVersion`` and its aliases."""
    tags = dict(mv.tags or {})
    fitness, generation = tags.get("fitness"), tags.get("generation")
    return GenomeVersion(
        name=mv.name,
        version=int(mv.version),
        genome_id=tags.get("genome_id", ""),
        fitness=None if fitness is None else float(fitness),
        generation=None if generation is None else int(generation),
        parents=tuple(p for p in tags.get("parents", "").split(",") if p),
        run_id=mv.run_id or tags.get("run_id") or None,
        aliases=aliases,
        source=mv.source,
        evaluations=int(tags.get("evaluations", "0")),
    )


def quote_filter(value: str) -> str:
    """Quote a value for an MLflow search filter."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} cannot be used in an MLflow filter (both quote kinds)")


def error_code(exc: BaseException) -> str | None:
    """The ``error_code`` of an ``MlflowException`` (or None for other errors)."""
    code = getattr(exc, "error_code", None)
    return code if isinstance(code, str) else None


def upsert(write: Callable[..., Any], *args: str) -> None:
    """
    Call an MLflow write that MLflow's SQL store implements as select-then-insert
    (``session.merge``: run tags, aliases). Two writers of the same key at once make one
    of them fail on the unique constraint; the retry then updates the row.
    """
    for attempt in range(3):
        try:
            write(*args)
        except Exception as exc:
            text = str(exc).lower()
            if attempt == 2 or not ("unique constraint" in text or "duplicate key" in text):
                raise
        else:
            return


def genome_version_tags(
    meta: dict[str, Any], run_id: str, direction: str, extra: dict[str, str]
) -> dict[str, str]:
    """The tags of a genome's model version, from :func:`prepare_genome`'s metadata."""
    version_tags = {
        "genome_id": meta["genome_id"],
        "run_id": run_id,
        "direction": direction,
        "evaluations": str(len(meta["evaluations"])),
        **extra,
    }
    if meta["fitness"] is not None:
        version_tags["fitness"] = repr(float(meta["fitness"]))
    if meta["generation"] is not None:
        version_tags["generation"] = str(meta["generation"])
    if meta["parents"]:
        version_tags["parents"] = ",".join(meta["parents"])
    return version_tags
