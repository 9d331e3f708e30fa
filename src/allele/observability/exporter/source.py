"""
What the exporter sees of the bus: two lanes to drain and a way to be woken.

The bus (``_core.bus.Bus``) implements :class:`EventSource`; the exporter depends on this
Protocol only, never on the bus or the facade.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ("ControlEvent", "EventSource", "MetricEvent")

#: (run key, metric key, value, time in ns, step): only atomic values, so queued events
#: are untracked by the cyclic GC (a Run in the tuple would keep every one of them tracked
#: and make each full collection walk the whole backlog)
MetricEvent = tuple[str, str, float, int, int]
#: (kind, run or None, payload...): the shapes are listed in :mod:`.backlog`
ControlEvent = tuple[Any, ...]


class EventSource(Protocol):
    """
    The lanes of a bus, as the exporter drains them.
    """

    def drain(self) -> tuple[list[ControlEvent], list[MetricEvent]]:
        """Take everything in the lanes: control events first, then the metrics."""
        ...

    def has_work(self) -> bool:
        """Whether a control event or a full batch of metrics is waiting."""
        ...

    def is_empty(self) -> bool:
        """Whether both lanes are empty."""
        ...

    def connect(self, wake: Callable[[], None] | None) -> None:
        """Give producers a way to wake the exporter (None: the exporter has stopped)."""
        ...

    def set_sleeping(self, sleeping: bool) -> None:
        """The exporter is about to wait (True; producers may wake it) or is awake."""
        ...

    def wake(self) -> None:
        """Wake the exporter now."""
        ...
