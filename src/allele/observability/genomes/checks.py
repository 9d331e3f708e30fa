"""
Input checks of a genome event, at the call: everything the registry, MLflow or the spool
would refuse later is refused here, with a message naming the field.

- the name is a valid registered model name (MLflow's rules; the registry's searches
  quote it, so it may not hold both quote kinds);
- ``fitness`` and ``evaluations`` are real numbers (NaN and infinities are kept, see
  :func:`prepare_genome`), ``generation`` a signed 64-bit integer, ``parents`` genome ids;
- tags are text keyed by valid tag keys, within MLflow's model-version tag limits, and
  none of the tags the registry writes itself;
- the whole event fits one spool record (:data:`MAX_GENOME_EVENT_BYTES`).
"""

from __future__ import annotations

import json
import math
import numbers
import posixpath
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._core.names import as_int64, check_utf8, sanitize_key
from .identity import CanonicalGenome, canonical_json, canonicalize

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = (
    "MAX_GENOME_EVENT_BYTES",
    "RESERVED_TAGS",
    "check_genome_name",
    "genome_event",
    "genome_tags",
    "prepare_genome",
)

#: longest MLflow model-version tag value
_MAX_TAG_VALUE = 100_000
#: longest registered model name (MLflow's SQL column is VARCHAR(256))
_MAX_MODEL_NAME = 256
#: the largest genome event, as ASCII JSON: one spool record (``spool.frames``, 16 MiB - 1)
#: less room for the record's other fields
MAX_GENOME_EVENT_BYTES = (1 << 24) - 1 - 65536
#: version tags the registry writes itself; user tags may not override them
RESERVED_TAGS = frozenset(
    {"genome_id", "fitness", "generation", "parents", "run_id", "direction", "evaluations"}
)
_ascii_json = json.JSONEncoder(allow_nan=True, separators=(",", ":")).encode


def prepare_genome(
    genome: Any,
    name: str,
    fitness: float | None,
    generation: int | None,
    parents: Iterable[str],
    evaluations: Sequence[float] | None,
) -> tuple[CanonicalGenome, dict[str, Any]]:
    """
    Canonicalise and validate a genome and its metadata at the call, before any I/O.

    ``fitness`` and ``evaluations`` may be NaN or infinite: they are kept (written as
    ``"NaN"``, ``"Infinity"`` in the metadata file); a NaN fitness never becomes champion.

    Returns:
        The canonical genome and the JSON-ready content of ``genomes/<id>.meta.json``.

    Raises:
        TypeError: the genome has no canonical form, or a field has the wrong type.
        ValueError: a name MLflow refuses as a registered model name, a bad parent id, a
            generation outside the signed 64-bit range, a number too large for a float.
    """
    canon, meta, _ = _prepare(genome, name, fitness, generation, parents, evaluations)
    return canon, meta


def _prepare(
    genome: Any, name: str, fitness: Any, generation: Any, parents: Any, evaluations: Any
) -> tuple[CanonicalGenome, dict[str, Any], tuple[float | None, list[float]]]:
    """:func:`prepare_genome`, also returning fitness and evaluations as floats."""
    check_genome_name(name)
    canon = canonicalize(genome)
    fit, gen, plist, evals = _check_fields(fitness, generation, parents, evaluations)
    meta = {
        "genome_id": canon.genome_id,
        "name": name,
        "generation": gen,
        "fitness": None if fit is None else _finite_json(fit),
        "parents": plist,
        "evaluations": [_finite_json(e) for e in evals],
    }
    return canon, meta, (fit, evals)


def check_genome_name(name: object) -> str:
    """
    Check a genome name as MLflow checks a registered model name (and as the registry's
    searches quote it). Returns it unchanged.

    Raises:
        TypeError: not a str.
        ValueError: empty or blank, longer than 256 characters, holding ``/`` or ``:``,
            not stable under path normalisation, holding both quote kinds or a lone
            surrogate.
    """
    if not isinstance(name, str):
        raise TypeError(f"genome name must be a str, got {type(name).__name__}: {name!r}")
    if not name.strip():
        raise ValueError(f"genome name must be a non-empty str, got {name!r}")
    if len(name) > _MAX_MODEL_NAME:
        raise ValueError(
            f"genome name is {len(name)} characters; MLflow allows at most {_MAX_MODEL_NAME}"
        )
    if "/" in name or ":" in name:
        raise ValueError(f"genome name {name!r}: MLflow model names cannot contain '/' or ':'")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(".."):
        raise ValueError(f"genome name {name!r} is not a normalised path (MLflow refuses it)")
    if "'" in name and '"' in name:
        raise ValueError(f"genome name {name!r} cannot hold both ' and \" (MLflow filters)")
    check_utf8("genome name", name)
    return name


def _check_fields(
    fitness: Any, generation: Any, parents: Any, evaluations: Any
) -> tuple[float | None, int | None, list[str], list[float]]:
    """fitness, generation, parents and evaluations checked and normalised."""
    fit = None if fitness is None else _real("fitness must be a number or None", fitness)
    gen = None if generation is None else as_int64("generation", generation)
    plist: list[str] = []
    if isinstance(parents, str):
        parents = (parents,)
    try:
        items = list(parents)
    except TypeError:
        raise TypeError(
            f"parents must be a genome id or an iterable of them, got {type(parents).__name__}"
        ) from None
    for p in items:
        if not isinstance(p, str) or not p or "," in p or "'" in p:
            raise ValueError(f"parent ids must be non-empty str without ',' or \"'\": {p!r}")
        if p not in plist:
            plist.append(check_utf8("parent id", p))
    if len(",".join(plist)) > _MAX_TAG_VALUE:
        raise ValueError(f"too many parents ({len(plist)}) for one MLflow tag")
    if isinstance(evaluations, (str, bytes)):
        raise TypeError(f"evaluations must be numbers, got {type(evaluations).__name__}")
    try:
        raw = [] if evaluations is None else list(evaluations)
    except TypeError:
        raise TypeError(
            f"evaluations must be an iterable of numbers, got {type(evaluations).__name__}"
        ) from None
    evals = [_real("evaluations must be numbers", e) for e in raw]
    return fit, gen, plist, evals


def _real(rule: str, value: Any) -> float:
    """A real number as a float (NaN and infinities kept); else ``rule`` is the error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{rule}, got {type(value).__name__}: {value!r}")
    try:
        return float(value)
    except OverflowError:
        field = rule.split(" ", 1)[0]
        raise ValueError(f"{field}: {value!r} is too large for a 64-bit float") from None


def genome_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """
    User tags of a genome's model version, checked at the call: keys are sanitised as run
    tag keys are (``sanitize_key``), values become text (``str``) of at most 100,000
    characters (MLflow's limit for model version tags).

    Raises:
        TypeError: ``tags`` is not a mapping, or a key is not a str.
        ValueError: a key the registry writes itself, an empty key, a value too long or
            holding a lone surrogate.
    """
    if not tags:
        return {}
    if not isinstance(tags, Mapping):
        raise TypeError(f"genome tags must be a mapping of str to str, got {type(tags).__name__}")
    out: dict[str, str] = {}
    for k, v in tags.items():
        key = sanitize_key(k, "genome tag key")
        text = v if isinstance(v, str) else str(v)
        if len(text) > _MAX_TAG_VALUE:
            raise ValueError(
                f"genome tag {key!r}: value is {len(text)} characters; "
                f"MLflow allows at most {_MAX_TAG_VALUE}"
            )
        out[key] = check_utf8(f"genome tag {key!r}: value", text)
    if clash := RESERVED_TAGS & set(out):
        raise ValueError(f"genome tags {sorted(clash)} are reserved for the genome registry")
    return out


def genome_event(
    genome: Any,
    name: str,
    fitness: Any,
    generation: Any,
    parents: Any,
    tags: Mapping[str, Any] | None,
    evaluations: Any,
) -> dict[str, Any]:
    """
    The payload of an ``obs.genome`` event: every field checked and normalised at the
    call (plain str, int, float and lists only), so the exporter, the spool and a replay
    can never fail on it.

    Raises:
        TypeError, ValueError: as :func:`prepare_genome` and :func:`genome_tags`; and
            ValueError when the event is larger than one spool record can hold
            (:data:`MAX_GENOME_EVENT_BYTES` as ASCII JSON).
    """
    canon, meta, (fit, evals) = _prepare(genome, name, fitness, generation, parents, evaluations)
    plist: list[str] = meta["parents"]
    payload = {
        "genome_id": canon.genome_id,
        "text": canon.text,
        "name": name,
        "fitness": fit,
        "generation": meta["generation"],
        "parents": plist,
        "tags": genome_tags(tags),
        "evaluations": evals,
    }
    # A char is at most 12 bytes of ASCII JSON (an escaped surrogate pair), a float 24.
    chars = len(canon.text) + len(name) + sum(len(p) + 3 for p in plist)
    chars += sum(len(k) + len(v) + 6 for k, v in payload["tags"].items())
    if 12 * chars + 25 * len(evals) + 1000 > MAX_GENOME_EVENT_BYTES:
        size = len(_ascii_json(payload))
        if size > MAX_GENOME_EVENT_BYTES:
            raise ValueError(
                f"genome {canon.genome_id} ({name!r}) is {size} bytes as JSON; one event "
                f"holds at most {MAX_GENOME_EVENT_BYTES} (the spool's record limit)"
            )
    return payload


def _finite_json(value: Any) -> Any:
    """Make meta values strict JSON: non-finite floats become strings (as in genomes)."""
    if isinstance(value, float) and not math.isfinite(value):
        return canonical_json(value).strip('"')
    return value
