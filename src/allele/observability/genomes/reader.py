"""
The read side of the genome registry: versions, champion, lineage, comparison.

:class:`GenomeReader` holds the MLflow client and every query; the writing
:class:`~allele.observability.genomes.GenomeRegistry` extends it. Nothing here writes.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..config import redact
from .identity import diff_genomes
from .stats import welch_t_test
from .types import (
    GenomeComparison,
    GenomeNotFoundError,
    GenomeRef,
    GenomeVersion,
    error_code,
    quote_filter,
    validate_alias,
    version_from_mlflow,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ("GenomeReader",)

_DIRECTIONS = {
    "maximize": "maximize",
    "maximise": "maximize",
    "max": "maximize",
    "minimize": "minimize",
    "minimise": "minimize",
    "min": "minimize",
}
#: model versions per search page
_PAGE = 1000


class GenomeReader:
    """
    Query genome versions in an MLflow model registry (see ``GenomeRegistry``).

    Args:
        tracking_uri: where the runs (and the genome artifacts) live.
        registry_uri: the model registry, when it differs from ``tracking_uri``.
        direction: ``"maximize"`` (default) or ``"minimize"`` fitness for the champion.
        champion_alias: the alias that follows the best fitness.
    """

    def __init__(
        self,
        tracking_uri: str,
        registry_uri: str | None = None,
        *,
        direction: Literal["maximize", "minimize", "maximise", "minimise"] = "maximize",
        champion_alias: str = "champion",
    ) -> None:
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.direction = _DIRECTIONS[direction]
        self.champion_alias = validate_alias(champion_alias)
        self._lock = threading.Lock()
        self._client: Any = None
        self._models: set[str] = set()
        self._champion_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tracking_uri={redact(self.tracking_uri)!r}, "
            f"registry_uri={redact(self.registry_uri)!r}, direction={self.direction!r})"
        )

    @property
    def client(self) -> Any:
        """The ``mlflow.MlflowClient`` on both URIs (imported and built on first use)."""
        with self._lock:
            if self._client is None:
                from mlflow import MlflowClient

                self._client = MlflowClient(
                    tracking_uri=self.tracking_uri, registry_uri=self.registry_uri
                )
            return self._client

    def versions(self, name: str) -> list[GenomeVersion]:
        """Every genome version of ``name``, by version number (empty if no such model)."""
        found: list[Any] = []
        token = None
        while True:
            page = self.client.search_model_versions(
                f"name = {quote_filter(name)}", max_results=_PAGE, page_token=token
            )
            found.extend(mv for mv in page if (mv.tags or {}).get("genome_id"))
            token = page.token
            if not token:
                break
        return self._versions_with_aliases(name, found)

    def get(self, name: str, genome_id_or_version: str | int) -> GenomeVersion:
        """
        One version of ``name`` by genome id (``g-...``) or version number.

        Raises:
            GenomeNotFoundError: no such version, or the version is not a genome.
        """
        key = genome_id_or_version
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            try:
                mv = self.client.get_model_version(name, str(int(key)))
            except Exception as exc:
                if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                    raise GenomeNotFoundError(f"model {name!r} has no version {key}") from None
                raise
            if not (mv.tags or {}).get("genome_id"):
                raise GenomeNotFoundError(f"version {key} of model {name!r} is not a genome")
            return version_from_mlflow(mv, tuple(mv.aliases or ()))
        if not isinstance(key, str) or not key.startswith("g-"):
            raise ValueError(f"expected a genome id 'g-...' or a version number, got {key!r}")
        found = self._find(name, f"tag.genome_id = {quote_filter(key)}")
        if not found:
            raise GenomeNotFoundError(f"genome {key} is not registered in model {name!r}")
        return self.get(name, int(found[0].version))

    def champion(self, name: str) -> GenomeVersion | None:
        """The version the champion alias points at, or None (also when no such model)."""
        try:
            mv = self.client.get_model_version_by_alias(name, self.champion_alias)
        except Exception as exc:
            code = error_code(exc)
            # MLflow reports a missing alias as INVALID_PARAMETER_VALUE "... not found."
            if code == "RESOURCE_DOES_NOT_EXIST" or (
                code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc)
            ):
                return None
            raise
        return version_from_mlflow(mv, tuple(mv.aliases or ()))

    def lineage(
        self, genome_id: str, name: str | None = None, *, limit: int | None = None
    ) -> list[GenomeVersion | GenomeRef]:
        """
        The ancestors of a genome, nearest first (breadth first over the ``parents`` tags).

        Each ancestor appears once; a parent that was never registered appears as a
        :class:`GenomeRef`. Without ``name``, a genome registered under several models is
        taken from its earliest registration. ``limit`` caps the number of ancestors.

        Raises:
            GenomeNotFoundError: the genome itself is not registered.
        """
        alias_cache: dict[str, dict[str, int]] = {}
        start = self._lookup(genome_id, name, alias_cache)
        if start is None:
            where = f" in model {name!r}" if name else ""
            raise GenomeNotFoundError(f"genome {genome_id} is not registered{where}")
        out: list[GenomeVersion | GenomeRef] = []
        seen = {genome_id}
        queue = deque(start.parents)
        while queue and (limit is None or len(out) < limit):
            gid = queue.popleft()
            if gid in seen:
                continue
            seen.add(gid)
            found = self._lookup(gid, name, alias_cache)
            out.append(found if found is not None else GenomeRef(gid))
            if found is not None:
                queue.extend(found.parents)
        return out

    def load(self, version: GenomeVersion) -> Any:
        """Download a version's genome and return its canonical form parsed from JSON."""
        return self._download_json(version, f"genomes/{version.genome_id}.json")

    def compare(self, name: str, a: str | int, b: str | int) -> GenomeComparison:
        """
        Compare two versions of ``name`` (genome ids or version numbers).

        Welch's test runs when both have at least two finite logged evaluations
        (NaN and infinite evaluations are left out of it).
        """
        va, vb = self.get(name, a), self.get(name, b)
        diffs, count = diff_genomes(self.load(va), self.load(vb))
        delta = None
        if va.fitness is not None and vb.fitness is not None:
            delta = vb.fitness - va.fitness
        welch = None
        if va.evaluations >= 2 and vb.evaluations >= 2:
            ea, eb = self._evaluations(va), self._evaluations(vb)
            if len(ea) >= 2 and len(eb) >= 2:
                welch = welch_t_test(eb, ea)
        return GenomeComparison(name, va, vb, delta, tuple(diffs), count, welch)

    def _find(self, name: str, tag_filter: str) -> list[Any]:
        """Versions of ``name`` matching ``tag_filter``, lowest version first."""
        found = self.client.search_model_versions(f"name = {quote_filter(name)} and {tag_filter}")
        return sorted(found, key=lambda mv: int(mv.version))

    def _aliases(self, name: str) -> dict[str, int]:
        try:
            model = self.client.get_registered_model(name)
        except Exception as exc:
            if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {str(k): int(v) for k, v in (model.aliases or {}).items()}

    def _versions_with_aliases(self, name: str, mvs: Iterable[Any]) -> list[GenomeVersion]:
        by_version: dict[int, list[str]] = {}
        for alias, number in sorted(self._aliases(name).items()):
            by_version.setdefault(number, []).append(alias)
        out = [version_from_mlflow(mv, tuple(by_version.get(int(mv.version), ()))) for mv in mvs]
        return sorted(out, key=lambda v: v.version)

    def _lookup(
        self, gid: str, name: str | None, alias_cache: dict[str, dict[str, int]]
    ) -> GenomeVersion | None:
        query = f"tag.genome_id = {quote_filter(gid)}"
        if name is not None:
            query = f"name = {quote_filter(name)} and {query}"
        found = list(self.client.search_model_versions(query))
        if not found:
            return None
        mv = min(found, key=lambda m: (m.creation_timestamp or 0, m.name, int(m.version)))
        if mv.name not in alias_cache:
            alias_cache[mv.name] = self._aliases(mv.name)
        number = int(mv.version)
        aliases = tuple(sorted(a for a, v in alias_cache[mv.name].items() if v == number))
        return version_from_mlflow(mv, aliases)

    def _better(self, new: GenomeVersion, old: GenomeVersion) -> bool:
        if old.fitness is None or math.isnan(old.fitness):
            return True
        assert new.fitness is not None
        if new.fitness == old.fitness:
            return new.version < old.version
        return (new.fitness > old.fitness) == (self.direction == "maximize")

    def _evaluations(self, version: GenomeVersion) -> list[float]:
        meta = self._download_json(version, f"genomes/{version.genome_id}.meta.json")
        values = (float(v) for v in meta.get("evaluations", ()))
        return [v for v in values if math.isfinite(v)]

    def _download_json(self, version: GenomeVersion, path: str) -> Any:
        if not version.run_id:
            raise GenomeNotFoundError(f"version {version.version} of {version.name!r} has no run")
        with tempfile.TemporaryDirectory(prefix="allele-genome-") as tmp:
            local = self.client.download_artifacts(version.run_id, path, tmp)
            return json.loads(Path(local).read_text(encoding="utf-8"))
