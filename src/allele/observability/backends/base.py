"""
The delivery contract between the exporter and an MLflow tracking store.

A backend turns the exporter's batches into MLflow calls. Every method blocks; the
exporter calls them from worker threads with its own deadlines, so a backend must give
up by itself within ``timeout`` seconds (a bounded socket timeout, no library retries).

Exception tree::

    DeliveryError            an attempt failed; ``retryable`` says whether to try again
      (reason: one of :data:`REASONS`)

What each reason means, and what delivery and replay do with it:

================  =========  ===============================================================
reason            retryable  meaning; what happens to the events
================  =========  ===============================================================
network_error     yes        refused, reset, DNS, TLS, proxy: kept (spooled), retried
timeout           yes        no answer in time: kept, retried
server_error      yes        5xx / INTERNAL_ERROR: kept, retried; a batch that fails so
                             :data:`REPEAT_LIMIT` times while the store otherwise answers
                             is isolated like a rejection (its poison rows dead-lettered)
rate_limited      yes        429: kept, retried no sooner than ``Retry-After``
unavailable       yes        MLflow not importable, worker died, not an MLflow endpoint:
                             kept, retried
unauthorized      yes        401/403, UNAUTHENTICATED, PERMISSION_DENIED: not the events'
                             fault; kept, retried with backoff, logged once, never split
rejected          no         a row is invalid (INVALID_PARAMETER_VALUE, 400): the batch is
                             split in halves until the bad rows are alone; those are
                             dead-lettered, the rest delivered
not_found         no         the run (or experiment) is gone (RESOURCE_DOES_NOT_EXIST): the
                             whole request is dead-lettered, without splitting
unsupported       no         the server does not offer the feature (FEATURE_DISABLED): the
                             item is dead-lettered, without splitting
local_file        no         the local file of an artifact is missing or unreadable: that
                             artifact is dead-lettered; the store is healthy
================  =========  ===============================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..config import redact

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = (
    "REASONS",
    "REPEAT_LIMIT",
    "RETRYABLE_REASONS",
    "Backend",
    "DeliveryError",
    "MetricRow",
    "ParamRow",
    "TagRow",
)

#: (key, value, timestamp in ms, step)
MetricRow = tuple[str, float, int, int]
#: (key, value)
ParamRow = tuple[str, str]
#: (key, value)
TagRow = tuple[str, str]

#: the closed set of failure reasons, used in counters, logs and dead letters
REASONS = (
    "network_error",
    "timeout",
    "server_error",
    "rate_limited",
    "unavailable",
    "unauthorized",
    "rejected",
    "not_found",
    "unsupported",
    "local_file",
)
#: the reasons whose events are kept and retried (the others are dead-lettered)
RETRYABLE_REASONS = frozenset(
    {"network_error", "timeout", "server_error", "rate_limited", "unavailable", "unauthorized"}
)
#: failed attempts with ``server_error`` after which one batch (or item) is isolated
REPEAT_LIMIT = 3


class DeliveryError(Exception):
    """
    Raised by a backend when one attempt failed.

    Args:
        reason: one of :data:`REASONS`.
        message: what the store said (safe to log: credentials are redacted here).
        retryable: False when sending the same request again cannot succeed
            (MLflow rejected it: bad name, param re-logged with another value, ...).
        retry_after: seconds the server asked us to wait (HTTP 429 ``Retry-After``).
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
    ) -> None:
        message = redact(message)  # a driver or a URL in the message may quote a password
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after

    @property
    def per_row(self) -> bool:
        """Whether the store refused some rows of the request: split it to find them."""
        return not self.retryable and self.reason == "rejected"

    @property
    def repeatable(self) -> bool:
        """Whether the failure may be caused by the request's content if it repeats."""
        return self.retryable and self.reason == "server_error"

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments need help to cross the worker-process pipe.
        return (_rebuild_error, (self.reason, self.message, self.retryable, self.retry_after))


def _rebuild_error(
    reason: str, message: str, retryable: bool, retry_after: float | None
) -> DeliveryError:
    return DeliveryError(reason, message, retryable=retryable, retry_after=retry_after)


class Backend(Protocol):
    """
    What the exporter needs from an MLflow tracking store. All calls block.
    """

    def ensure_experiment(self, name: str, artifact_location: str | None) -> str:
        """Return the id of experiment ``name``, creating it if needed."""
        ...

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        start_time: int,
        tags: dict[str, str],
    ) -> str:
        """Create a RUNNING run and return its id (tags include ``mlflow.parentRunId``)."""
        ...

    def find_run(self, experiment_id: str, run_key: str) -> str | None:
        """Return the id of the run tagged ``allele.run_key = run_key``, if any."""
        ...

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[MetricRow],
        params: Sequence[ParamRow],
        tags: Sequence[TagRow],
    ) -> None:
        """Log one batch within MLflow's limits (the exporter has already split it)."""
        ...

    def end_run(self, run_id: str, status: str, end_time: int) -> None:
        """Set the run's terminal status (FINISHED, FAILED, KILLED) and end time."""
        ...

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None) -> None:
        """Upload a file or directory into the run's artifacts."""
        ...

    def close(self) -> None:
        """Release connections and worker processes. Idempotent."""
        ...
