"""
Accounting: every event is counted exactly once in one of the outcome columns.

For every kind, at any moment::

    emitted = delivered + sampled_out + dropped + dead_lettered + spooled + pending

One :class:`Accounting` object is shared by the bus and the exporter, and owned by
neither: the facade makes it and hands it to both. Producers count with
:class:`AtomicCounter` (``itertools.count`` advances atomically under the GIL, so no lock
and no lost updates); the exporter counts outcomes under :attr:`Accounting.lock`, which
``statistics()`` takes too, so a snapshot is consistent.

Nothing is derived as a remainder: ``pending`` is *measured* (the events in the lanes,
held by samplers, and in the exporter's backlogs, counted where they are), so the identity
is a check that fails when an event is lost without being counted. The exporter moves
events between places and outcome columns under :attr:`Accounting.lock` (re-entrant), so
a snapshot never sees one in two places or in none.
"""

from __future__ import annotations

import itertools
import threading
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable

    from .runs import Run

__all__ = (
    "KINDS",
    "OUTCOMES",
    "UNDRAINED",
    "Accounting",
    "AtomicCounter",
    "KindStatistics",
    "Statistics",
)

#: every kind of event the bus carries
KINDS = ("metric", "param", "tag", "run", "artifact", "alert", "phase", "genome", "system")
#: what the exporter resolves an event to
OUTCOMES = ("delivered", "dropped", "dead_lettered", "spooled")
#: prefix of :meth:`Accounting.statistics`' measured counts of events not drained yet, per
#: kind (in a lane, or a metric held by a sampler); they are in the kind's count as well
UNDRAINED = "undrained:"
#: reasons the bus drops an event for, on the producer's side
PRODUCER_DROP_REASONS = ("queue_full", "no_run", "closed")


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
    #: times the exporter's loop failed and was restarted (supervision), since the start
    restarts: int = 0

    @property
    def total(self) -> KindStatistics:
        """All kinds added up."""
        kinds = (getattr(self, k) for k in KINDS)
        return KindStatistics(*(sum(col) for col in zip(*kinds, strict=False)))

    def is_balanced(self) -> bool:
        """Whether the accounting identity holds for every kind."""
        return all(getattr(self, k).is_balanced() for k in KINDS)


class Accounting:
    """
    The counters of one bus and its exporter.

    Producer side (any thread, lock-free): :attr:`dropped` per kind, :attr:`sampled_out`,
    :attr:`folded` alerts and :attr:`drop_reasons`. Accepted events are not counted on the
    producer's side at all: an accepted event is in a lane, drained (counted under the lock,
    with the drain), held by a sampler, sampled out, folded or dropped, so ``emitted`` is
    the sum of those, each measured, and a snapshot from any thread is consistent (a count
    taken before the event reached its lane would show it nowhere for a moment).

    Exporter side (under :attr:`lock`): events drained per kind, their outcomes, failed
    attempts by reason, drops by reason, and events replayed from other processes' spools.
    """

    def __init__(self) -> None:
        #: re-entrant: the exporter moves events and counts them in one critical section
        self.lock = threading.RLock()
        self.dropped = {k: AtomicCounter() for k in KINDS}
        self.sampled_out = AtomicCounter()
        #: alerts folded into an earlier identical record (kind alert, column sampled_out)
        self.folded = AtomicCounter()
        self.drop_reasons = {r: AtomicCounter() for r in PRODUCER_DROP_REASONS}
        self.drained = dict.fromkeys(KINDS, 0)
        self.outcomes = {o: dict.fromkeys(KINDS, 0) for o in OUTCOMES}
        self.failures: dict[str, int] = {}
        self.lost: dict[str, int] = {}
        self.replayed = 0
        self.restarts = 0

    # -- producer side ------------------------------------------------------------------
    def drop(self, kind: str, reason: str) -> None:
        """Count one event the bus could not accept (emitted and dropped at once)."""
        self.dropped[kind].inc()
        self.drop_reasons[reason].inc()

    # -- exporter side ------------------------------------------------------------------
    def count(self, run: Run | None, kind: str, outcome: str, n: int) -> None:
        """Resolve ``n`` events of ``kind`` of ``run`` (None: unknown) to ``outcome``."""
        if n:
            with self.lock:
                self.outcomes[outcome][kind] += n
                if run is not None:
                    _add(run.acct, outcome, n)

    def move(self, run: Run, kind: str, src: str, dst: str, n: int) -> None:
        """Move ``n`` events of ``kind`` from one outcome to another (spooled -> delivered)."""
        if n:
            with self.lock:
                self.outcomes[src][kind] -= n
                self.outcomes[dst][kind] += n
                _add(run.acct, src, -n)
                _add(run.acct, dst, n)

    def drop_reason(self, reason: str, n: int) -> None:
        """Say why ``n`` events resolved to ``dropped`` by the exporter were lost."""
        if n:
            with self.lock:
                self.lost[reason] = self.lost.get(reason, 0) + n

    def failure(self, reason: str) -> None:
        """Count one failed export attempt."""
        with self.lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1

    def restarted(self) -> None:
        """Count one restart of the exporter's loop after a failure."""
        with self.lock:
            self.restarts += 1

    def foreign_replayed(self, n: int) -> None:
        """Count events of other processes' spools that this process delivered."""
        with self.lock:
            self.replayed += n

    @staticmethod
    def received(run: Run, n: int) -> None:
        """Note ``n`` events of ``run`` taken up by the exporter (for the run's own tags)."""
        _add(run.acct, "emitted", n)

    @staticmethod
    def run_tags(
        run: Run, *, end_in_spool: bool = False, replaying: bool = False
    ) -> list[tuple[str, str]]:
        """
        The run's own accounting, written when its end is delivered. The end itself is
        pending (direct delivery), counted as spooled (``end_in_spool``), or being
        replayed from the spool (``replaying``).
        """
        acct = run.acct
        dropped = acct.get("dropped", 0) + run.dropped.value
        sampled = run.sampled_out.value
        emitted = acct.get("emitted", 0) + run.dropped.value + sampled
        delivered = acct.get("delivered", 0)
        dead = acct.get("dead_lettered", 0)
        spooled = acct.get("spooled", 0)
        if replaying:  # the end moves from the spool to delivered with these tags
            spooled -= 1
            delivered += 1
        elif not end_in_spool:  # the end is delivered with these tags
            delivered += 1
        complete = dropped == 0 and dead == 0 and spooled == 0
        return [
            ("allele.telemetry.emitted", str(emitted)),
            ("allele.telemetry.delivered", str(delivered)),
            ("allele.telemetry.sampled_out", str(sampled)),
            ("allele.telemetry.dropped", str(dropped)),
            ("allele.telemetry.dead_lettered", str(dead)),
            ("allele.telemetry.spooled", str(spooled)),
            ("allele.telemetry.complete", "true" if complete else "false"),
        ]

    # -- the snapshot -------------------------------------------------------------------
    def statistics(self, pending: Callable[[], dict[str, int]], state: str) -> Statistics:
        """
        A consistent snapshot. ``pending`` measures, per kind, the events still in the
        lanes, held by samplers or in the exporter's backlogs; it is called under the lock
        the exporter moves events under. ``state`` is the exporter's.
        """
        with self.lock:
            drained = dict(self.drained)
            outcomes = {o: dict(v) for o, v in self.outcomes.items()}
            failures = dict(self.failures)
            lost = dict(self.lost)
            replayed, restarts = self.replayed, self.restarts
            where = pending()
        sampled = self.sampled_out.value
        per_kind = {}
        for k in KINDS:
            delivered = outcomes["delivered"][k]
            dead = outcomes["dead_lettered"][k]
            spooled = outcomes["spooled"][k]
            dropped_hot = self.dropped[k].value
            dropped = dropped_hot + outcomes["dropped"][k]
            waiting = where.get(k, 0)
            if k == "metric":
                # Metrics are not counted on the hot path: an accepted one was drained, or
                # is still in the lane or held by a sampler (both in ``waiting``).
                emitted = drained[k] + where.get(UNDRAINED + k, 0) + sampled + dropped_hot
                per_kind[k] = KindStatistics(
                    emitted, delivered, sampled, dropped, dead, spooled, waiting
                )
            elif k == "system":
                per_kind[k] = KindStatistics(
                    drained[k], delivered, 0, dropped, dead, spooled, waiting
                )
            else:
                # Alerts folded into an earlier identical one count as sampled out; their
                # number is in that record's `occurrences`.
                folded = self.folded.value if k == "alert" else 0
                emitted = drained[k] + where.get(UNDRAINED + k, 0) + folded + dropped_hot
                per_kind[k] = KindStatistics(
                    emitted, delivered, folded, dropped, dead, spooled, waiting
                )
        reasons = {r: c.value for r, c in self.drop_reasons.items() if c.value}
        for r, n in lost.items():
            reasons[r] = reasons.get(r, 0) + n
        return Statistics(
            **per_kind,
            state=state,
            drop_reasons=reasons,
            failures=failures,
            replayed=replayed,
            restarts=restarts,
        )


def _add(acct: dict[str, int], key: str, n: int) -> None:
    acct[key] = acct.get(key, 0) + n
