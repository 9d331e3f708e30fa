"""
Sampling of metric series: which points of a sampled metric reach the lane.

A metric whose name matches a ``SAMPLING`` glob keeps every Nth point and at most K points
per one-second window of emit time. The first point, NaN and every new extreme (best or
worst so far) are always kept; the latest skipped point is held and delivered when the run
ends, so a series' last point always lands. Only sampled metrics pay for this.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import SamplingRule
    from .accounting import AtomicCounter
    from .runs import Run

__all__ = ("SeriesState", "keep", "take_held")


class SeriesState:
    """
    Sampling state of one metric series in one run (touched only for sampled metrics).
    """

    __slots__ = ("held", "kept_in_window", "lock", "maximum", "minimum", "seen", "window")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen = 0
        self.maximum = float("-inf")
        self.minimum = float("inf")
        #: the one-second window (emit time // 1000 ms) and the points kept in it
        self.window = -1
        self.kept_in_window = 0
        #: the latest skipped point, delivered at run end if nothing came after it
        self.held: tuple[Any, ...] | None = None


def keep(
    run: Run,
    key: str,
    rule: SamplingRule,
    value: float,
    ts: int,
    step: int,
    sampled_out: AtomicCounter,
) -> bool:
    """Whether to keep a point of a sampled series; a skipped point is held (see module)."""
    series = run.series.get(key)
    if series is None:
        series = run.series.setdefault(key, SeriesState())
    with series.lock:
        if series.held is not None:
            series.held = None
            sampled_out.inc()
            run.sampled_out.inc()
        seen = series.seen
        series.seen = seen + 1
        kept = seen == 0 or math.isnan(value)  # first point, NaN
        if value > series.maximum:
            series.maximum = value
            kept = True
        if value < series.minimum:
            series.minimum = value
            kept = True
        if rule.max_per_second:
            window = ts // 1_000_000_000  # one-second windows of the emit timestamps
            if window != series.window:
                series.window = window
                series.kept_in_window = 0
        if not kept:
            kept = seen % rule.every == 0 and (
                not rule.max_per_second or series.kept_in_window < rule.max_per_second
            )
        if kept:
            series.kept_in_window += 1
        else:
            series.held = (run.key, key, value, ts, step)
    return kept


def take_held(run: Run) -> list[tuple[str, str, float, int, int]]:
    """Take the held (last skipped) point of each sampled series of ``run``."""
    taken = []
    for series in run.series.values():
        with series.lock:
            held, series.held = series.held, None
        if held is not None:
            taken.append(held)
    return taken


def held_count(runs: list[Run]) -> int:
    """The points held back by sampling in ``runs``."""
    return sum(1 for r in runs for s in list(r.series.values()) if s.held is not None)
