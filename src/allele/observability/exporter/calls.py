"""
Blocking store calls from the exporter's event loop: one worker thread at a time, each
call bounded by the export timeout and, while stopping, by the stop deadline.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ..backends.base import DeliveryError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ("FlushTicket", "StoreCalls", "threadsafe_caller")

#: seconds a store call may overrun its timeout before the loop abandons it
BACKSTOP_GRACE = 1.0


class StoreCalls:
    """
    Runs blocking backend calls in a worker thread under a ``CapacityLimiter(1)``.

    Args:
        export_timeout: ``EXPORT_TIMEOUT``; the backends enforce it themselves, this is
            the backstop.
    """

    def __init__(self, export_timeout: float) -> None:
        self._timeout = export_timeout
        self._limiter: anyio.CapacityLimiter | None = None
        self._scope: anyio.CancelScope | None = None
        #: the stop deadline (``time.monotonic()``), once a stop was requested
        self.deadline: float | None = None

    async def __call__(
        self,
        fn: Callable[..., Any],
        *args: Any,
        bounded: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 - a bound for the worker thread
    ) -> Any:
        """
        Run ``fn(*args)`` in a worker thread, abandoning it after the export timeout
        (``bounded=False`` for a replay step, whose every call is bounded; ``timeout`` for
        another bound) or at the stop deadline; raise a retryable
        ``DeliveryError("timeout")`` then.
        """
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        if timeout is None:
            timeout = self._timeout + BACKSTOP_GRACE if bounded else math.inf
        if self.deadline is not None:
            timeout = max(0.01, min(timeout, self.deadline - time.monotonic()))
        scope = self._scope = anyio.move_on_after(timeout)
        try:
            with scope:
                return await anyio.to_thread.run_sync(
                    fn, *args, limiter=self._limiter, abandon_on_cancel=True
                )
        finally:
            self._scope = None
        name = getattr(fn, "__name__", "store call")
        raise DeliveryError("timeout", f"{name} exceeded {timeout:g} s", retryable=True)

    def reset(self) -> None:
        """Forget the worker-thread limiter: the next call may run on another event loop."""
        self._limiter = None
        self._scope = None

    def tighten(self) -> None:
        """Cut the call in flight down to the stop deadline (run it on the loop)."""
        scope, deadline = self._scope, self.deadline
        if scope is not None and deadline is not None:
            remaining = deadline - time.monotonic()
            scope.deadline = min(scope.deadline, anyio.current_time() + remaining)


def threadsafe_caller(fn: Callable[[], None]) -> Callable[[], None]:
    """Return a function that runs ``fn`` on the current event loop from any thread."""
    try:
        import asyncio

        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio
        import trio

        token = trio.lowlevel.current_trio_token()

        def call_trio() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(fn)

        return call_trio

    def call_asyncio() -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(fn)

    return call_asyncio


class FlushTicket:
    """A request to deliver everything emitted before it; resolved by the exporter."""

    __slots__ = ("deadline", "done", "ok")

    def __init__(self, deadline: float | None = None) -> None:
        self.done = threading.Event()
        self.ok = False
        #: ``time.monotonic()`` the caller waits until: retries are spaced to fit in it
        self.deadline = deadline
