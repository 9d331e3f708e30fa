"""
The delivery contract between the exporter and an MLflow tracking store.

A backend turns the exporter's batches into MLflow calls. Every method blocks; the
exporter calls them from worker threads with its own deadlines, so a backend must give
up by itself within ``timeout`` seconds (a bounded socket timeout, no library retries).

Exception tree::

    DeliveryError            an attempt failed; ``retryable`` says whether to try again
      (reason "network_error" | "timeout" | "server_error" | "rate_limited" |
       "rejected" | "unavailable")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..config import redact

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = (
    "REASONS",
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

#: the closed set of failure reasons, used in counters and logs
REASONS = ("network_error", "timeout", "server_error", "rate_limited", "rejected", "unavailable")


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
