"""
Genome identity: a canonical JSON form and a content hash over it.

A genome's identity is ``"g-"`` plus the first 24 hex digits (96 bits) of the SHA-256 of
its canonical JSON text. The same genome gives the same identity in any process, on any
machine and in any Python >= 3.10. The canonical form follows these rules:

- **Mappings** (any :class:`collections.abc.Mapping`) are written with their keys sorted.
  Keys must be ``str``; any other key raises :class:`TypeError` naming its type.
- **Lists and tuples** are the same thing: ``(1, 2)`` and ``[1, 2]`` are one genome.
- **Numbers** compare by value: an integral float is written as an int, so ``1``, ``1.0``
  and ``-0.0 == 0`` are one genome. Other floats are written with ``repr`` (the shortest
  text that round-trips). NaN and the infinities become the strings ``"NaN"``,
  ``"Infinity"`` and ``"-Infinity"`` (so they equal those strings). ``complex`` is
  unsupported.
- **Booleans** stay distinct from numbers: ``True`` is not ``1``. ``None`` is ``null``.
- **bytes** and ``bytearray`` become ``{"__bytes__": "<base64>"}``.
- **numpy** (only imported when a value's type comes from numpy): an array becomes
  ``{"__ndarray__": "<kind+itemsize, e.g. f8>", "shape": [...], "data": [flattened]}``.
  The dtype is part of the identity, its byte order is not; structured dtypes are
  unsupported. A numpy scalar is the equal Python number (or bool).
- **Sets and frozensets** whose elements are all ``str``, or all numbers (not bool),
  are written as sorted lists (so ``{2, 1}`` equals ``[1, 2]``); any other set raises
  :class:`TypeError` because it has no canonical order.
- **Dataclass instances** are converted with :func:`dataclasses.asdict` (identity is
  their content, not their class); objects with a ``to_genome()`` method are replaced by
  what it returns.
- Anything else raises :class:`TypeError` naming the type and where it sits, for example
  ``genome['layers'][2]: unsupported type set``. So do reference cycles.

The module also computes the structural difference of two canonical genomes
(:func:`diff_genomes`), used by ``GenomeRegistry.compare``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = (
    "MISSING",
    "CanonicalGenome",
    "DiffEntry",
    "canonical_json",
    "canonicalize",
    "diff_genomes",
    "genome_id",
)

#: JSON separators of the canonical text (no whitespace)
_SEPARATORS = (",", ":")
#: hex digits of the SHA-256 kept in a genome id
_ID_HEX = 24


class CanonicalGenome(NamedTuple):
    """
    A genome reduced to its canonical JSON text, with the identity derived from it.

    Computing this at the call site freezes the genome (later mutations don't matter) and
    raises :class:`TypeError` early; ``GenomeRegistry.register`` accepts it as a genome.
    """

    #: ``"g-"`` + 24 hex digits of the SHA-256 of ``text``
    genome_id: str
    #: the canonical JSON text (UTF-8, sorted keys, no whitespace)
    text: str


def canonicalize(genome: Any) -> CanonicalGenome:
    """
    Reduce a genome to its canonical JSON text and identity.

    Raises:
        TypeError: a value or mapping key that has no canonical form, with its path.
    """
    if isinstance(genome, CanonicalGenome):
        return genome
    text = json.dumps(
        _canon(genome, "genome", set()),
        sort_keys=True,
        separators=_SEPARATORS,
        ensure_ascii=False,
        allow_nan=False,
    )
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return CanonicalGenome("g-" + digest[:_ID_HEX], text)


def canonical_json(genome: Any) -> str:
    """Return the canonical JSON text of a genome (see the module docstring for the rules)."""
    return canonicalize(genome).text


def genome_id(genome: Any) -> str:
    """Return the identity of a genome: ``"g-"`` + 24 hex digits of its canonical hash."""
    return canonicalize(genome).genome_id


def _number(value: float) -> Any:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value.is_integer():
        return int(value)
    return value


def _canon(obj: Any, path: str, stack: set[int]) -> Any:
    """Return the canonical JSON value of ``obj``, which sits at ``path`` in the genome."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _number(obj)
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
    if type(obj).__module__.split(".", 1)[0] == "numpy":
        return _canon_numpy(obj, path, stack)
    if id(obj) in stack:
        raise TypeError(f"{path}: reference cycle in genome")
    stack.add(id(obj))
    try:
        return _canon_container(obj, path, stack)
    finally:
        stack.discard(id(obj))


def _canon_container(obj: Any, path: str, stack: set[int]) -> Any:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{path}: mapping key {key!r} has type {type(key).__name__}; keys must be str"
                )
            out[key] = _canon(value, f"{path}[{key!r}]", stack)
        return out
    if isinstance(obj, (list, tuple)):
        return [_canon(v, f"{path}[{i}]", stack) for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return _canon_set(obj, path, stack)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _canon(dataclasses.asdict(obj), path, stack)
    to_genome = getattr(obj, "to_genome", None)
    if callable(to_genome):
        return _canon(to_genome(), path, stack)
    raise TypeError(f"{path}: unsupported type {type(obj).__name__}")


def _canon_set(obj: set[Any] | frozenset[Any], path: str, stack: set[int]) -> list[Any]:
    items = [_canon(v, f"{path}{{{i}}}", stack) for i, v in enumerate(obj)]
    if all(isinstance(v, str) for v in items):
        return sorted(items)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        return sorted(items)
    raise TypeError(
        f"{path}: unsupported type {type(obj).__name__} "
        "(only sets of str or of numbers have a canonical order)"
    )


def _canon_numpy(obj: Any, path: str, stack: set[int]) -> Any:
    import numpy as np

    if isinstance(obj, np.ndarray):
        if obj.dtype.names is not None:
            raise TypeError(f"{path}: unsupported type ndarray with structured dtype")
        data = obj.reshape(-1).tolist()
        return {
            "__ndarray__": obj.dtype.str.lstrip("<>=|"),
            "shape": list(obj.shape),
            "data": [_canon(v, f"{path}.flat[{i}]", stack) for i, v in enumerate(data)],
        }
    if isinstance(obj, np.generic):
        return _canon(obj.item(), path, stack)
    raise TypeError(f"{path}: unsupported type {type(obj).__name__}")


# -- structural difference ------------------------------------------------------------------
class _Missing:
    """The side of a difference where a key or list element does not exist."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


#: stands for "absent" in a :class:`DiffEntry` (a key or element present on one side only)
MISSING: Any = _Missing()


class DiffEntry(NamedTuple):
    """One place where two canonical genomes differ."""

    #: where, written like ``genome['layers'][2]``
    path: str
    #: the value in the first genome, or :data:`MISSING`
    a: Any
    #: the value in the second genome, or :data:`MISSING`
    b: Any

    def as_dict(self) -> dict[str, Any]:
        """Return ``{"path", "a", "b"}`` for JSON, leaving out a missing side."""
        out: dict[str, Any] = {"path": self.path}
        if self.a is not MISSING:
            out["a"] = self.a
        if self.b is not MISSING:
            out["b"] = self.b
        return out


def diff_genomes(a: Any, b: Any, *, limit: int = 50) -> tuple[list[DiffEntry], int]:
    """
    Compare two genomes structurally after canonicalising them.

    Returns:
        At most ``limit`` differences (depth first, keys in sorted order) and the total count.
    """
    ca = json.loads(canonical_json(a))
    cb = json.loads(canonical_json(b))
    found: list[DiffEntry] = []
    total = _diff(ca, cb, "genome", found, limit)
    return found, total


def _diff(a: Any, b: Any, path: str, found: list[DiffEntry], limit: int) -> int:
    if isinstance(a, dict) and isinstance(b, dict):
        count = 0
        for key in sorted(set(a) | set(b)):
            count += _diff(
                a.get(key, MISSING), b.get(key, MISSING), f"{path}[{key!r}]", found, limit
            )
        return count
    if isinstance(a, list) and isinstance(b, list):
        count = 0
        for i in range(max(len(a), len(b))):
            va = a[i] if i < len(a) else MISSING
            vb = b[i] if i < len(b) else MISSING
            count += _diff(va, vb, f"{path}[{i}]", found, limit)
        return count
    if type(a) is type(b) and a == b:
        return 0
    if len(found) < limit:
        found.append(DiffEntry(path, a, b))
    return 1
