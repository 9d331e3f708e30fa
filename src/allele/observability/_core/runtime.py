"""
The exporter's lifecycle: started on first use (a daemon thread, or a task in the
caller's event loop), flushed with a deadline, stopped without ever hanging, and started
afresh in a forked child.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import anyio
import anyio.abc

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..config import Settings
    from ..exporter.loop import Exporter

__all__ = ("ExporterRuntime",)

logger = logging.getLogger("allele.observability")


class ExporterRuntime:
    """
    Owns the exporter of one ``Observability``.

    Args:
        settings: the effective settings (``SHUTDOWN_TIMEOUT``).
        make_exporter: builds an exporter for the given settings.
        lanes_empty: whether the bus's lanes are empty (``flush`` without an exporter).
    """

    def __init__(
        self,
        settings: Settings,
        make_exporter: Callable[[Settings], Exporter],
        lanes_empty: Callable[[], bool],
    ) -> None:
        self._settings = settings
        self._make = make_exporter
        self._lanes_empty = lanes_empty
        self._lock = threading.Lock()
        self._task_group: anyio.abc.TaskGroup | None = None
        self.exporter: Exporter | None = None
        self.started = False
        #: close() is delivering (a SIGTERM in a forked child then leaves it alone)
        self.closing = False

    def start(self) -> bool:
        """Start the exporter thread; True if this call started it."""
        if self.started:
            return False
        with self._lock:
            if self.started:
                return False
            self.exporter = self._make(self._settings)
            self.exporter.start_thread()
            self.started = True
            return True

    def restart_in_child(self, settings: Settings) -> None:
        """In a forked child: a new lock and a new exporter thread (the parent's is gone)."""
        self._lock = threading.Lock()
        self.exporter = self._make(settings)
        self.exporter.start_thread()

    def state(self) -> str:
        """The exporter's delivery state, "closed" once it stopped, or "idle" before."""
        exp = self.exporter
        if exp is None:
            return "idle"
        return exp.state if exp.alive else "closed"

    def check(self) -> None:
        """Restart the exporter's thread if it ended while not asked to stop (supervision)."""
        exp = self.exporter
        if exp is not None and not self.closing:
            exp.revive()

    def flush(self, timeout: float | None) -> bool:
        """Deliver everything emitted so far, waiting at most ``timeout`` seconds."""
        self.check()
        exp = self.exporter
        if exp is None or not exp.alive:
            return self._lanes_empty()
        if exp.loop_thread == threading.get_ident():
            raise RuntimeError(
                "flush() would block the event loop the exporter runs in; "
                "use `await obs.aflush()` inside `async with obs`"
            )
        wait = self._settings.shutdown_timeout if timeout is None else timeout
        ticket = exp.request_flush(time.monotonic() + wait)
        return ticket.done.wait(wait) and ticket.ok

    async def aflush(self, timeout: float | None) -> bool:  # noqa: ASYNC109 - mirrors flush()
        """Async twin of :meth:`flush`: waits without blocking the event loop."""
        exp = self.exporter
        if exp is None or not exp.alive:
            return self._lanes_empty()
        wait = self._settings.shutdown_timeout if timeout is None else timeout
        ticket = exp.request_flush(time.monotonic() + wait)
        with anyio.move_on_after(wait):
            while not ticket.done.is_set():  # noqa: ASYNC110 - set from the exporter's thread
                await anyio.sleep(0.005)
        return ticket.done.is_set() and ticket.ok

    def stop(self, deadline: float) -> None:
        """Deliver what it can before ``deadline`` (``time.monotonic()``), then stop."""
        exp = self.exporter
        self.closing = True
        try:
            if exp is not None and exp.alive and not exp.stop(deadline):
                logger.warning(
                    "allele-observability: exporter did not stop within the shutdown timeout"
                )
        finally:
            self.closing = False

    @property
    def in_event_loop(self) -> bool:
        """Whether the exporter runs as a task in the caller's event loop."""
        return self._task_group is not None

    async def astart(self) -> None:
        """Run the exporter as a task in the caller's event loop."""
        self.exporter = exp = self._make(self._settings)
        self._task_group = tg = anyio.create_task_group()
        await tg.__aenter__()
        exp.mark_launched()
        tg.start_soon(exp.run_loop)
        self.started = True

    async def astop(self, deadline: float) -> None:
        """Async twin of :meth:`stop`; cancels the task if it overruns the deadline."""
        tg, exp = self._task_group, self.exporter
        assert tg is not None
        assert exp is not None
        exp.begin_stop(deadline)
        with anyio.move_on_after(max(0.0, deadline - time.monotonic()) + 0.5):
            while exp.alive:  # noqa: ASYNC110 - a threading.Event underneath
                await anyio.sleep(0.005)
        if exp.alive:
            logger.warning("allele-observability: exporter did not stop within the deadline")
            tg.cancel_scope.cancel()
        self._task_group = None
        await tg.__aexit__(None, None, None)
