"""
The emit methods of an ``Observability`` that is disabled or closed.

Decided once, not per call: a disabled instance gets no-ops (``alert`` returns ``""``,
``genome`` still returns the genome's id); a closed one counts every call as an event
dropped with reason ``closed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .bus import nop

if TYPE_CHECKING:
    from .accounting import Accounting

__all__ = ("EMITTERS", "closed_emitters", "disabled_emitters")

#: the emit methods, and the kind a call after close() is counted under
EMITTERS: dict[str, str | None] = {
    "metric": "metric",
    "metrics": "metric",
    "param": "param",
    "params": "param",
    "tag": "tag",
    "artifact": "artifact",
    "alert": "alert",
    "genome": "genome",
    "step": None,
}


def _nop_alert(*_args: Any, **_kwargs: Any) -> str:
    """``obs.alert`` of a disabled bus: no record, an empty id."""
    return ""


def genome_id_only(genome: Any, *_args: Any, **_kwargs: Any) -> str:
    """``obs.genome`` of a disabled bus: nothing recorded, but the id is still the id."""
    from ..genomes.identity import genome_id

    return genome_id(genome)


def disabled_emitters() -> dict[str, Any]:
    """The emit methods of a disabled instance, by name."""
    special = {"alert": _nop_alert, "genome": genome_id_only}
    return {name: special.get(name, nop) for name in EMITTERS}


def closed_emitters(accounting: Accounting) -> dict[str, Any]:
    """The emit methods of a closed instance, by name: each call is a dropped event."""
    return {name: _closed(kind, accounting) for name, kind in EMITTERS.items()}


def _closed(kind: str | None, accounting: Accounting) -> Any:
    if kind is None:
        return nop
    drop = accounting.drop

    def closed(*args: Any, **_kwargs: Any) -> Any:
        drop(kind, "closed")
        if kind == "genome" and args:
            return genome_id_only(args[0])
        return "" if kind == "alert" else None

    return closed
