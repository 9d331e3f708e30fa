"""
Genomes: identity, the model registry, lineage and comparison (public facade).

Every distinct genome gets a content-hash id (``g-...``, see :func:`genome_id`);
:class:`GenomeRegistry` registers genomes as model versions, keeps the ``champion`` alias,
traces lineage and compares versions with Welch's t-test. See ``docs/genomes.md``.
"""

from __future__ import annotations

from .identity import MISSING as MISSING
from .identity import CanonicalGenome as CanonicalGenome
from .identity import DiffEntry as DiffEntry
from .identity import canonical_json as canonical_json
from .identity import canonicalize as canonicalize
from .identity import genome_id as genome_id
from .registry import GenomeRegistry as GenomeRegistry
from .stats import welch_t_test as welch_t_test
from .types import ComponentVersion as ComponentVersion
from .types import GenomeComparison as GenomeComparison
from .types import GenomeNotFoundError as GenomeNotFoundError
from .types import GenomeRef as GenomeRef
from .types import GenomeVersion as GenomeVersion
from .types import validate_alias as validate_alias

__all__ = (
    "MISSING",
    "CanonicalGenome",
    "ComponentVersion",
    "DiffEntry",
    "GenomeComparison",
    "GenomeNotFoundError",
    "GenomeRef",
    "GenomeRegistry",
    "GenomeVersion",
    "canonical_json",
    "canonicalize",
    "genome_id",
    "validate_alias",
    "welch_t_test",
)
