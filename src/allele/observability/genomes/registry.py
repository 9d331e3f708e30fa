"""
Genome versions in the MLflow model registry: identity, promotion, lineage, comparison.

Every distinct genome (see :mod:`._genome_identity` for the canonical form and its
``g-...`` identity) is stored once per run as the artifact ``genomes/<genome_id>.json``
with a sibling ``genomes/<genome_id>.meta.json`` (fitness, generation, parents and the
repeated fitness evaluations, if any). :meth:`GenomeRegistry.register` also makes it a
version of the registered model ``name``, whose source is ``runs:/<run_id>/genomes/
<genome_id>.json`` and whose tags carry ``genome_id``, ``fitness``, ``generation``,
``parents`` (comma-separated ids), ``run_id``, ``direction`` and ``evaluations`` (count).
The alias ``champion`` follows the best fitness; aliases replace the deprecated stages.

Registering is idempotent: a genome already registered under ``name`` returns its
existing version. Two processes racing on the same genome may both create a version;
each then keeps the lowest-numbered one and the later creator deletes its own, so one
version remains (its number may skip one).

All methods block on MLflow; call them from a worker thread (``anyio.to_thread``) when
inside an event loop. :class:`mlflow.exceptions.MlflowException` (or a network error)
means "retry later"; :class:`TypeError` and :class:`ValueError` mean the input is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .reader import GenomeReader
from .types import (
    ComponentVersion,
    GenomeVersion,
    content_sha256,
    error_code,
    genome_version_tags,
    prepare_genome,
    quote_filter,
    upsert,
    validate_alias,
    version_from_mlflow,
)

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable, Mapping, Sequence

    from .identity import CanonicalGenome

__all__ = ("GenomeRegistry",)

#: version tags the registry writes itself; user tags may not override them
_RESERVED_TAGS = frozenset(
    {"genome_id", "fitness", "generation", "parents", "run_id", "direction", "evaluations"}
)


class GenomeRegistry(GenomeReader):
    """
    Register, promote, trace and compare genomes in an MLflow model registry.

    Args:
        tracking_uri: where the runs (and the genome artifacts) live.
        registry_uri: the model registry, when it differs from ``tracking_uri``.
        direction: ``"maximize"`` (default) or ``"minimize"`` fitness for the champion.
        champion_alias: the alias that follows the best fitness.

    Thread-safe; one MLflow client is created on first use. The champion alias is exact
    for registrations from one process (they are serialised); MLflow has no
    compare-and-set, so when several processes register into one model at the same moment
    a stale write can leave an earlier champion in place until a better genome arrives or
    :meth:`refresh_champion` runs.
    """

    @classmethod
    def from_env(cls, **overrides: Any) -> GenomeRegistry:
        """
        Build from ``ALLELE_MLFLOW_TRACKING_URI`` and ``ALLELE_MLFLOW_MODEL_REGISTRY_URI``.

        ``direction`` and ``champion_alias`` are taken from ``overrides``; the other
        keywords override settings fields.
        """
        from ..config import load_settings

        direction = overrides.pop("direction", "maximize")
        alias = overrides.pop("champion_alias", "champion")
        settings = load_settings(**overrides)
        return cls(
            settings.tracking_uri,
            settings.model_registry_uri,
            direction=direction,
            champion_alias=alias,
        )

    # -- writing ----------------------------------------------------------------------------
    def log(
        self,
        run_id: str,
        genome: Any,
        *,
        name: str,
        fitness: float | None = None,
        generation: int | None = None,
        parents: Iterable[str] = (),
        evaluations: Sequence[float] | None = None,
    ) -> str:
        """
        Log a genome to a run only (the registry disabled); return its genome id.

        Writes ``genomes/<id>.json`` and ``genomes/<id>.meta.json`` and the run tag
        ``allele.genome.<id>`` = ``name``. Logging the same genome again overwrites both.
        """
        canon, meta = prepare_genome(genome, name, fitness, generation, parents, evaluations)
        self._log_files(run_id, canon, meta)
        upsert(self.client.set_tag, run_id, f"allele.genome.{canon.genome_id}", name)
        return canon.genome_id

    def register(
        self,
        run_id: str,
        genome: Any,
        *,
        name: str,
        fitness: float | None = None,
        generation: int | None = None,
        parents: Iterable[str] = (),
        tags: Mapping[str, str] | None = None,
        evaluations: Sequence[float] | None = None,
    ) -> GenomeVersion:
        """
        Make a genome a version of the registered model ``name`` (idempotent).

        Logs it to the run as :meth:`log` does, creates the model if needed and the
        version, moves the champion alias if the fitness beats the current champion's
        (ties keep the earlier version; None and NaN never win), and sets the run tag
        ``allele.genome.<id>`` = ``<name>/<version>``. A genome already registered returns
        its version unchanged; if it came from another run, this run only gets the tag.

        Raises:
            TypeError: the genome has no canonical form.
            ValueError: a bad parent id, fitness, generation or reserved tag.
        """
        canon, meta = prepare_genome(genome, name, fitness, generation, parents, evaluations)
        extra = {str(k): str(v) for k, v in (tags or {}).items()}
        if clash := _RESERVED_TAGS & set(extra):
            raise ValueError(f"tags {sorted(clash)} are reserved for the genome registry")
        gid = canon.genome_id
        found = self._find(name, f"tag.genome_id = {quote_filter(gid)}")
        if found:
            existing = self.get(name, int(found[0].version))
            if existing.run_id != run_id:  # another run met this genome: note it there too
                tag = f"{name}/{existing.version}"
                upsert(self.client.set_tag, run_id, f"allele.genome.{gid}", tag)
            return existing
        self._log_files(run_id, canon, meta)
        self._ensure_model(name, "genome")
        version_tags = genome_version_tags(meta, run_id, self.direction, extra)
        source = f"runs:/{run_id}/genomes/{gid}.json"
        mv = self.client.create_model_version(name, source, run_id=run_id, tags=version_tags)
        number = self._deduplicate(name, f"tag.genome_id = {quote_filter(gid)}", int(mv.version))
        upsert(self.client.set_tag, run_id, f"allele.genome.{gid}", f"{name}/{number}")
        if number != int(mv.version):
            return self.get(name, number)
        version = version_from_mlflow(mv, ())
        if self._update_champion(version):
            version = dataclasses.replace(version, aliases=(self.champion_alias,))
        return version

    def promote(self, name: str, genome_id_or_version: str | int, alias: str) -> GenomeVersion:
        """
        Point ``alias`` at a version (by genome id or number); return it with its aliases.

        Raises:
            ValueError: an alias MLflow would refuse, naming it.
            GenomeNotFoundError: no such version.
        """
        validate_alias(alias)
        version = self.get(name, genome_id_or_version)
        upsert(self.client.set_registered_model_alias, name, alias, str(version.version))
        return self.get(name, version.version)

    def register_component(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        run_id: str,
        tags: Mapping[str, str] | None = None,
    ) -> ComponentVersion:
        """
        Register a model file or directory used by the experiment as a version (idempotent).

        It is logged to the run under ``components/<sha256[:12]>/<basename>`` (content
        addressed, so two different files of the same name never overwrite each other),
        and the version's source points there; its tag ``content_sha256`` makes it
        idempotent.
        """
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"component {str(p)!r} does not exist")
        digest = content_sha256(p)
        found = self._find(name, f"tag.content_sha256 = {quote_filter(digest)}")
        if not found:
            artifact_dir = f"components/{digest[:12]}"
            if p.is_file():
                self.client.log_artifact(run_id, str(p), artifact_dir)
            else:
                self.client.log_artifacts(run_id, str(p), f"{artifact_dir}/{p.name}")
            self._ensure_model(name, "component")
            vtags = {str(k): str(v) for k, v in (tags or {}).items()}
            vtags |= {
                "content_sha256": digest,
                "run_id": run_id,
                "component": p.name,
                "kind": "file" if p.is_file() else "directory",
            }
            source = f"runs:/{run_id}/{artifact_dir}/{p.name}"
            mv = self.client.create_model_version(name, source, run_id=run_id, tags=vtags)
            tag_filter = f"tag.content_sha256 = {quote_filter(digest)}"
            if self._deduplicate(name, tag_filter, int(mv.version)) != int(mv.version):
                found = self._find(name, tag_filter)
        mv = found[0] if found else mv
        return ComponentVersion(name, int(mv.version), digest, mv.run_id or "", mv.source)

    def refresh_champion(self, name: str) -> GenomeVersion | None:
        """
        Recompute the champion from every version of ``name`` and fix the alias if needed.

        Reads all versions (one paged search), so call it at the end of a run rather than
        per genome. Returns the champion, or None if no version has a finite fitness.
        """
        best: GenomeVersion | None = None
        for version in self.versions(name):
            if version.fitness is None or math.isnan(version.fitness):
                continue
            if best is None or self._better(version, best):
                best = version
        if best is not None and self.champion_alias not in best.aliases:
            upsert(
                self.client.set_registered_model_alias,
                name,
                self.champion_alias,
                str(best.version),
            )
            best = dataclasses.replace(best, aliases=(*best.aliases, self.champion_alias))
        return best

    # -- internals --------------------------------------------------------------------------
    def _log_files(self, run_id: str, canon: CanonicalGenome, meta: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="allele-genome-") as tmp:
            gid = canon.genome_id
            Path(tmp, f"{gid}.json").write_text(canon.text, encoding="utf-8")
            meta_text = json.dumps(meta, sort_keys=True, allow_nan=False)
            Path(tmp, f"{gid}.meta.json").write_text(meta_text, encoding="utf-8")
            self.client.log_artifacts(run_id, tmp, "genomes")

    def _ensure_model(self, name: str, kind: str) -> None:
        if name in self._models:
            return
        try:
            self.client.create_registered_model(
                name,
                tags={"allele.kind": kind},
                description=f"{kind.capitalize()} versions registered by allele-observability.",
            )
        except Exception as exc:
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
        with self._lock:
            self._models.add(name)

    def _deduplicate(self, name: str, tag_filter: str, mine: int) -> int:
        """Keep the lowest version of a racing duplicate; delete ours if it is not that one."""
        numbers = [int(mv.version) for mv in self._find(name, tag_filter)]
        keep = min(numbers, default=mine)
        if keep < mine:
            self.client.delete_model_version(name, str(mine))
        return keep

    def _update_champion(self, version: GenomeVersion) -> bool:
        """Move the champion alias to ``version`` if it is better; True if it holds it."""
        if version.fitness is None or math.isnan(version.fitness):
            return False
        with self._champion_lock:  # serialises this process; other processes: see class doc
            for _ in range(5):  # re-read after each write
                current = self.champion(version.name)
                if current is not None and not self._better(version, current):
                    return current.version == version.version
                upsert(
                    self.client.set_registered_model_alias,
                    version.name,
                    self.champion_alias,
                    str(version.version),
                )
        return True
