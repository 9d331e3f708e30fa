"""
Test helpers that ship with the library.

:class:`InMemoryBackend` records what the exporter would send to MLflow, and can be told
to fail, block or reject, so batching, retry and shutdown logic can be tested without a
store. Acceptance tests use a real MLflow store instead (see ``tests/``).

Example::

    from allele.observability import Observability
    from allele.observability.testing import InMemoryBackend

    backend = InMemoryBackend()
    obs = Observability(backend_factory=lambda settings: backend, system_metrics_interval=0)
    with obs, obs.run("r") as run:
        obs.metric("loss", 0.5, step=1)
    assert backend.metric_history(run.run_id, "loss") == [(0.5, 1)]
"""

from __future__ import annotations

import threading
import uuid
from typing import TYPE_CHECKING, Any

from .backends.base import DeliveryError, MetricRow, ParamRow, TagRow

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ("InMemoryBackend",)


class InMemoryBackend:
    """
    A backend that keeps everything in memory. Thread-safe.

    Attributes:
        runs: run id to a dict with ``experiment_id``, ``name``, ``tags``, ``params``,
            ``metrics`` (list of rows), ``status``, ``artifacts``.
        calls: the names of every call, in order.
        fail_with: when set, every call raises it (a :class:`DeliveryError`).
        before_call: when set, called with the method name before each call (to block
            or to fail selectively).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.experiments: dict[str, str] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.batches: list[tuple[int, int, int]] = []
        self.fail_with: DeliveryError | None = None
        self.before_call: Callable[[str], None] | None = None
        self.closed = False

    def _enter(self, name: str) -> None:
        if self.before_call is not None:
            self.before_call(name)
        if self.fail_with is not None:
            raise self.fail_with
        with self._lock:
            self.calls.append(name)

    def ensure_experiment(self, name: str, artifact_location: str | None) -> str:  # noqa: ARG002
        """Return (creating) the experiment id."""
        self._enter("ensure_experiment")
        with self._lock:
            return self.experiments.setdefault(name, str(len(self.experiments) + 1))

    def create_run(
        self, experiment_id: str, *, run_name: str, start_time: int, tags: dict[str, str]
    ) -> str:
        """Create a run."""
        self._enter("create_run")
        run_id = uuid.uuid4().hex
        with self._lock:
            self.runs[run_id] = {
                "experiment_id": experiment_id,
                "name": run_name,
                "start_time": start_time,
                "tags": dict(tags),
                "params": {},
                "metrics": [],
                "status": "RUNNING",
                "artifacts": [],
            }
        return run_id

    def find_run(self, experiment_id: str, run_key: str) -> str | None:
        """Return the run tagged ``allele.run_key = run_key`` in the experiment."""
        self._enter("find_run")
        with self._lock:
            for run_id, run in self.runs.items():
                if run["experiment_id"] == experiment_id and (
                    run["tags"].get("allele.run_key") == run_key
                ):
                    return run_id
        return None

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[MetricRow],
        params: Sequence[ParamRow],
        tags: Sequence[TagRow],
    ) -> None:
        """Record a batch, rejecting a param re-logged with another value like MLflow."""
        self._enter("log_batch")
        with self._lock:
            run = self.runs[run_id]
            for k, v in params:
                if run["params"].get(k, v) != v:
                    raise DeliveryError(
                        "rejected",
                        f"param {k!r} already logged with another value",
                        retryable=False,
                    )
            for k, v in params:
                run["params"][k] = v
            run["tags"].update(tags)
            run["metrics"].extend(metrics)
            self.batches.append((len(metrics), len(params), len(tags)))

    def end_run(self, run_id: str, status: str, end_time: int) -> None:
        """Set the terminal status."""
        self._enter("end_run")
        with self._lock:
            self.runs[run_id]["status"] = status
            self.runs[run_id]["end_time"] = end_time

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None) -> None:
        """Record an artifact upload."""
        self._enter("log_artifact")
        with self._lock:
            self.runs[run_id]["artifacts"].append((local_path, artifact_path))

    def close(self) -> None:
        """Mark closed."""
        self.closed = True

    # -- inspection ------------------------------------------------------------------------
    def metric_history(self, run_id: str, key: str) -> list[tuple[float, int]]:
        """Return ``(value, step)`` of every point of ``key``, in delivery order."""
        with self._lock:
            return [(v, s) for k, v, _t, s in self.runs[run_id]["metrics"] if k == key]
