"""
Phases: ``obs.phase(name)`` is an OpenTelemetry span; when it ends, a phase record (name,
path, trace and span ids, start and end time and step) goes to the run, so a time or a
step maps to a phase and an alert's phase path can be read back (``docs/alerts.md``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .._core.context import CURRENT_PHASES, CURRENT_RUN

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from contextlib import AbstractContextManager

    from .._core.runs import Run

__all__ = ("MAX_PHASE_NAME", "Phases", "check_phase_name")

#: the longest phase name (a phase record holds its whole path of names)
MAX_PHASE_NAME = 1000


def check_phase_name(name: object) -> str:
    """
    Check a phase name at the call; return it.

    Raises:
        TypeError: not a str.
        ValueError: empty, or longer than ``MAX_PHASE_NAME`` characters.
    """
    if not isinstance(name, str):
        raise TypeError(f"phase name must be a str, got {type(name).__name__}: {name!r}")
    if not name:
        raise ValueError("phase name must not be empty")
    if len(name) > MAX_PHASE_NAME:
        raise ValueError(
            f"phase name is {len(name)} characters; at most {MAX_PHASE_NAME} are allowed"
        )
    return name


class Phases:
    """
    Opens phase spans and emits a record per ended phase.

    Args:
        default_run: the run of a phase opened where no run is in context (or None).
        control: puts an event on the bus's control lane.
        closed: whether the bus is closed (records of phases ending after close are
            not emitted).
        enabled: whether tracking is on (off: spans only, no records).
    """

    def __init__(
        self,
        default_run: Callable[[], Run | None],
        control: Callable[[tuple[Any, ...]], None],
        closed: Callable[[], bool],
        *,
        enabled: bool = True,
    ) -> None:
        self._default_run = default_run
        self._control = control
        self._closed = closed
        self._enabled = enabled
        self._tracer: Any = None

    def phase(self, name: str) -> AbstractContextManager[Any]:
        """A phase of the experiment (see ``Observability.phase``); the name is checked now."""
        return self._phase(check_phase_name(name))

    @contextmanager
    def _phase(self, name: str) -> Iterator[Any]:
        tracer = self._tracer or self._make_tracer()
        path = (*CURRENT_PHASES.get(), name)
        run = CURRENT_RUN.get() or self._default_run()
        start = time.time_ns() // 1_000_000
        start_step = run.step if run is not None else None
        with tracer.start_as_current_span(
            f"phase {name}", attributes={"allele.phase": name}
        ) as span:
            token = CURRENT_PHASES.set(path)
            try:
                yield span
            finally:
                CURRENT_PHASES.reset(token)
                if run is not None and self._enabled and not self._closed():
                    ctx = span.get_span_context()
                    parent = getattr(span, "parent", None)
                    record = {
                        "name": name,
                        "path": list(path),
                        "trace_id": f"{ctx.trace_id:032x}",
                        "span_id": f"{ctx.span_id:016x}",
                        "parent_span_id": f"{parent.span_id:016x}" if parent else None,
                        "start_time": start,
                        "end_time": time.time_ns() // 1_000_000,
                        "start_step": start_step,
                        "end_step": run.step,
                    }
                    self._control(("phase", run, record))

    def _make_tracer(self) -> Any:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()  # private: real ids without touching global state
        self._tracer = provider.get_tracer("allele.observability")
        return self._tracer
