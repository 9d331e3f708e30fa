"""
Delivery health: exponential backoff with full jitter, and the state users see.

States: ``healthy``; ``degraded`` after a failed attempt; ``offline`` after
:data:`OFFLINE_AFTER` in a row; ``recovering`` while the spool is replayed after a
success. Each transition is logged once.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..backends.base import DeliveryError

__all__ = ("Health",)

logger = logging.getLogger("allele.observability")

BACKOFF_BASE = 0.25
BACKOFF_CAP = 10.0
#: while a caller waits with a deadline: the delay is at most this share of the time left
DEADLINE_SHARE = 0.25
#: ... and at least this many seconds
MIN_DELAY = 0.05
#: consecutive failed attempts before the state is "offline"
OFFLINE_AFTER = 3


class Health:
    """The exporter's delivery state and when to try again."""

    def __init__(self) -> None:
        self.state = "healthy"
        #: ``time.monotonic()`` before which no new attempt is made
        self.retry_at = 0.0
        self._failures = 0

    def failed(self, err: DeliveryError, time_left: float | None = None) -> None:
        """
        An attempt failed: back off (honouring ``Retry-After``) and update the state.
        While someone waits with a deadline (``time_left`` seconds: a flush or close),
        the delay is capped so that several more attempts fit before it.
        """
        self._failures += 1
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(self._failures, 10))
        if err.retry_after:
            delay = max(delay, err.retry_after)
        if time_left is not None:
            delay = min(delay, max(MIN_DELAY, time_left * DEADLINE_SHARE))
        self.retry_at = time.monotonic() + random.uniform(0, delay)  # noqa: S311
        new = "offline" if self._failures >= OFFLINE_AFTER else "degraded"
        if new != self.state:
            logger.warning(
                "allele-observability: delivery %s (%s); events are kept and retried", new, err
            )
            self.state = new

    def succeeded(self, *, spool_empty: bool = True) -> None:
        """
        An attempt succeeded: no more backoff; healthy again unless the spool still holds
        our events (``recovering`` until it is replayed).
        """
        self._failures = 0
        self.retry_at = 0.0
        new = "healthy" if spool_empty else "recovering"
        if new != self.state:
            if new == "healthy":
                logger.warning("allele-observability: delivery healthy again")
            self.state = new
