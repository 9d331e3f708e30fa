"""
Accounting: every event is counted exactly once in one of the outcome columns.

For every kind, at any moment::

    emitted = delivered + sampled_out + dropped + dead_lettered + spooled + pending

Producers count with :class:`AtomicCounter` (``itertools.count`` advances atomically
under the GIL, so no lock and no lost updates); the exporter keeps its own tallies under
one lock that ``stats()`` shares, so a snapshot is consistent.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

__all__ = (
    "KINDS",
    "AtomicCounter",
    "KindStatistics",
    "Statistics",
)

#: every kind of event the bus carries
KINDS = ("metric", "param", "tag", "run", "artifact", "alert", "phase", "genome", "system")


class AtomicCounter:
    """
    A lock-free counter for many producer threads: ``inc()`` is one C call.
    """

    __slots__ = ("_count", "inc")

    def __init__(self) -> None:
        self._count = itertools.count()
        #: add one
        self.inc = self._count.__next__

    @property
    def value(self) -> int:
        """The number of ``inc()`` calls so far."""
        return int(repr(self._count)[6:-1])


class KindStatistics(NamedTuple):
    """
    The outcome of every event of one kind.
    """

    #: accepted by the bus (calls that raised are not events)
    emitted: int = 0
    #: acknowledged by the destination store
    delivered: int = 0
    #: skipped by a sampling rule
    sampled_out: int = 0
    #: lost: lane full, exporter backlog full, or no run to log into (see drop_reasons)
    dropped: int = 0
    #: rejected by the store for good, kept in the dead-letter file with the reason
    dead_lettered: int = 0
    #: written to the disk spool for a later replay
    spooled: int = 0
    #: in a lane, held by a sampler, or in flight
    pending: int = 0

    def is_balanced(self) -> bool:
        """Whether the accounting identity holds."""
        return self.emitted == (
            self.delivered
            + self.sampled_out
            + self.dropped
            + self.dead_lettered
            + self.spooled
            + self.pending
        )


class Statistics(NamedTuple):
    """
    A consistent snapshot of the bus and the exporter, returned by ``obs.stats()``.
    """

    metric: KindStatistics
    param: KindStatistics
    tag: KindStatistics
    run: KindStatistics
    artifact: KindStatistics
    alert: KindStatistics
    phase: KindStatistics
    genome: KindStatistics
    system: KindStatistics
    #: delivery state: "healthy", "degraded", "offline", "recovering", "disabled", "closed"
    state: str
    #: dropped events by reason ("queue_full", "backlog_full", "no_run", ...)
    drop_reasons: dict[str, int]
    #: failed export attempts by reason ("network_error", "timeout", ...)
    failures: dict[str, int]
    #: events from earlier processes' spools that this one replayed (not in the columns)
    replayed: int = 0

    @property
    def total(self) -> KindStatistics:
        """All kinds added up."""
        kinds = (getattr(self, k) for k in KINDS)
        return KindStatistics(*(sum(col) for col in zip(*kinds, strict=False)))

    def is_balanced(self) -> bool:
        """Whether the accounting identity holds for every kind."""
        return all(getattr(self, k).is_balanced() for k in KINDS)
