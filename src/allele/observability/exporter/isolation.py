"""
Supervision's bookkeeping: an unexpected error becomes a counted outcome, never a dead
exporter.

An error is isolated to what caused it: an event that cannot be routed, prepared or
spooled is dead-lettered with the reason (kind ``internal_error``: the store never saw
it); a component that fails (a detector, the system sampler) is reported and, if it keeps
failing, disabled; a whole round that fails backs off and is tried again. Each distinct
failure is logged once with its traceback, then counted quietly.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..backends.base import DeliveryError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._core.accounting import Accounting
    from .._core.runs import Run
    from ..sinks.deadletter import DeadLetters

__all__ = ("INTERNAL_ERROR", "Isolation")

logger = logging.getLogger("allele.observability")

#: the failure reason of an error inside the exporter (not the store's answer)
INTERNAL_ERROR = "internal_error"
#: distinct failures logged with a traceback; later ones are counted only
_LOG_LIMIT = 100


class Isolation:
    """
    Dead-letters events the exporter cannot handle and logs each kind of failure once.

    Args:
        accounting: where the dead-lettered events and failures are counted.
        dead: the dead-letter file.
    """

    def __init__(self, accounting: Accounting, dead: DeadLetters) -> None:
        self._acct = accounting
        self._dead = dead
        self._logged: set[tuple[str, str]] = set()

    def report(self, where: str, exc: BaseException) -> None:
        """Count a failure in ``where``; log it with its traceback the first time."""
        self._acct.failure(INTERNAL_ERROR)
        key = (where, type(exc).__name__)
        if key in self._logged or len(self._logged) >= _LOG_LIMIT:
            logger.debug("allele-observability: %s failed again: %r", where, exc)
            return
        self._logged.add(key)
        logger.error(
            "allele-observability: %s failed (%s: %s); the exporter goes on, and the "
            "events concerned are dead-lettered or retried",
            where,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )

    def reject(
        self,
        where: str,
        kind: str,
        run: Run | None,
        rows: Sequence[Any],
        exc: BaseException,
        *,
        n: int | None = None,
    ) -> None:
        """
        Dead-letter ``rows``, ``n`` events of ``kind`` (default ``len(rows)``), that made
        ``where`` fail.
        """
        n = len(rows) if n is None else n
        if not n:
            return
        self.report(where, exc)
        err = error_of(where, exc)
        self._dead.append(
            {
                "time": time.time(),
                "kind": kind,
                "run_key": run.key if run is not None else None,
                "run_name": run.name if run is not None else None,
                "run_id": run.created_id if run is not None else None,
                "reason": err.reason,
                "message": err.message,
                "events": n,
                "rows": [list(r) if isinstance(r, tuple) else r for r in rows],
            }
        )
        self._acct.count(run, kind, "dead_lettered", n)

    def dead_letter(
        self,
        kind: str,
        run: Run,
        rows: Sequence[Any],
        err: DeliveryError,
        *,
        n: int | None = None,
    ) -> None:
        """
        Dead-letter ``rows``, ``n`` events of ``kind`` (default ``len(rows)``), for a reason
        of their own (the store refused them, their file is gone): not a failure of ours.
        """
        self._dead.write(kind, run, rows, err)
        self._acct.count(run, kind, "dead_lettered", len(rows) if n is None else n)
        logger.warning(
            "allele-observability: %s dead-lettered (%s): %s", kind, err.reason, err.message
        )


def error_of(where: str, exc: BaseException) -> DeliveryError:
    """The not-retryable :class:`DeliveryError` that stands for ``exc`` in a dead letter."""
    if isinstance(exc, DeliveryError):
        return exc
    message = f"{where}: {type(exc).__name__}: {exc}"
    return DeliveryError(INTERNAL_ERROR, message[:1000], retryable=False)
