"""
Run handles and the per-run state the bus and the exporter share.

A :class:`Run` exists before MLflow knows about it: ``obs.run()`` never waits for the
store. The exporter creates the MLflow run in the background and fills in
:attr:`Run.run_id`; reading that property waits a bounded time for it (see its doc).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

from .accounting import AtomicCounter

__all__ = ("Run", "SeriesState")


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


class Run:
    """
    One MLflow run as the experiment sees it; returned by ``obs.run()``.

    Attributes:
        key: a local id (uuid4 hex), known at once and stable across processes.
        name: the run name.
        experiment: the experiment name, without the configured prefix.
        parent: the enclosing run, or None.
        status: "RUNNING", then "FINISHED", "FAILED" or "KILLED".
    """

    __slots__ = (
        "_created",
        "_run_id",
        "_timeout",
        "acct",
        "dropped",
        "end_time",
        "experiment",
        "key",
        "name",
        "params",
        "parent",
        "sampled_out",
        "series",
        "start_time",
        "status",
        "step",
        "tags",
    )

    def __init__(
        self,
        name: str,
        experiment: str,
        *,
        params: dict[str, str],
        tags: dict[str, str],
        parent: Run | None,
        start_time: int,
        wait_timeout: float,
    ) -> None:
        self.key = uuid.uuid4().hex
        self.name = name
        self.experiment = experiment
        self.params = params
        self.tags = tags
        self.parent = parent
        self.start_time = start_time
        self.end_time: int | None = None
        self.status = "RUNNING"
        #: the step alerts and step-less metrics are stamped with
        self.step = 0
        #: sampling state per metric key (sampled metrics only)
        self.series: dict[str, SeriesState] = {}
        #: events of this run dropped on the hot path (lane full)
        self.dropped = AtomicCounter()
        #: events of this run skipped by sampling
        self.sampled_out = AtomicCounter()
        #: exporter-side tallies per outcome, for the run's own accounting tags
        self.acct: dict[str, int] = {}
        self._created = threading.Event()
        self._run_id: str | None = None
        self._timeout = wait_timeout

    @property
    def run_id(self) -> str | None:
        """
        The MLflow run id.

        The exporter creates the run in the background, normally within milliseconds.
        Reading this property waits up to ``EXPORT_TIMEOUT`` seconds for it and returns
        None if the store has not answered by then (server down, MLflow missing); the
        run's events are kept and delivered once it exists.
        """
        if self._run_id is None:
            self._created.wait(self._timeout)
        return self._run_id

    def wait_created(self, timeout: float | None = None) -> str | None:
        """Wait up to ``timeout`` seconds for the MLflow run id; None if not yet known."""
        self._created.wait(timeout)
        return self._run_id

    def _set_run_id(self, run_id: str) -> None:
        self._run_id = run_id
        self._created.set()

    def __repr__(self) -> str:
        return (
            f"Run(name={self.name!r}, experiment={self.experiment!r}, "
            f"run_id={self._run_id!r}, status={self.status!r})"
        )
