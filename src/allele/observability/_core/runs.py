"""
Run handles and the registry of this process's runs.

A :class:`Run` exists before MLflow knows about it: ``obs.run()`` never waits for the
store. The exporter creates the MLflow run in the background and fills in
:attr:`Run.run_id`; reading that property waits a bounded time for it (see its doc).
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from typing import TYPE_CHECKING

from .accounting import AtomicCounter
from .context import CURRENT_RUN

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextvars import Token
    from types import TracebackType

    from .sampling import SeriesState

__all__ = ("ENDED_KEPT", "Run", "RunRegistry", "RunScope")

#: ended runs a registry keeps for late events (older ones are forgotten)
ENDED_KEPT = 10_000


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
        "__weakref__",
        "_created",
        "_run_id",
        "_timeout",
        "acct",
        "alert_counts",
        "dropped",
        "end_time",
        "experiment",
        "inherited",
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
        #: alerts of this run so far (total, per severity, per name), for its count tags
        self.alert_counts: dict[str, int] = {}
        self._created = threading.Event()
        self._run_id: str | None = None
        self._timeout = wait_timeout
        #: in a forked child: the run was not created yet when the process forked, so the
        #: parent creates it and this process only looks it up (by ``allele.run_key``)
        self.inherited = False

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

    @property
    def created_id(self) -> str | None:
        """The MLflow run id if the run exists already; never waits."""
        return self._run_id

    def wait_created(self, timeout: float | None = None) -> str | None:
        """Wait up to ``timeout`` seconds for the MLflow run id; None if not yet known."""
        self._created.wait(timeout)
        return self._run_id

    def after_fork(self) -> None:
        """
        In a forked child: new locks (another thread may have held them at the fork) with
        the same state; a run not created yet is the parent's to create.
        """
        self._created = threading.Event()
        if self._run_id is not None:
            self._created.set()
        else:
            self.inherited = True
        for series in list(self.series.values()):
            series.lock = threading.Lock()

    def set_created(self, run_id: str) -> None:
        """Record the MLflow run id (called by the exporter once the store created it)."""
        self._run_id = run_id
        self._created.set()

    def __repr__(self) -> str:
        return (
            f"Run(name={self.name!r}, experiment={self.experiment!r}, "
            f"run_id={self._run_id!r}, status={self.status!r})"
        )


class RunRegistry:
    """
    Every run of this process: by key (for the exporter), the open ones (for host-wide
    alerts and system metrics), and the default run (for threads with no run in context).

    Ended runs are kept for events that name them late (emitted after the end), the
    latest :data:`ENDED_KEPT` of those whose end the exporter has taken up: a process that
    runs many trials keeps bounded memory. An event naming a run forgotten since is
    dead-lettered, counted.
    """

    def __init__(self) -> None:
        self._by_key: dict[str, Run] = {}
        self._open: dict[str, Run] = {}
        self._ended: deque[str] = deque()
        #: keys of runs ended since the exporter last looked (to release their state)
        self.just_ended: deque[str] = deque()
        #: the process's current top-level run, for threads that have no run in context
        self.default: Run | None = None

    def get(self, key: str) -> Run:
        """The run with local key ``key``."""
        return self._by_key[key]

    def opened(self, run: Run) -> None:
        """Register a new, running run."""
        self._by_key[run.key] = run
        self._open[run.key] = run

    def ended(self, run: Run) -> None:
        """The run has ended: no longer open."""
        if self._open.pop(run.key, None) is not None:
            self.just_ended.append(run.key)

    def after_fork(self) -> None:
        """In a forked child: every known run gets new locks (see ``Run.after_fork``)."""
        for run in list(self._by_key.values()):
            run.after_fork()

    def release(self, run: Run) -> list[str]:
        """
        The exporter has taken up ``run``'s end (so every event emitted before it): keep
        the run for late events among the latest :data:`ENDED_KEPT`; return the keys of
        the runs forgotten now.
        """
        self._ended.append(run.key)
        forgotten = []
        while len(self._ended) > ENDED_KEPT:
            old = self._ended.popleft()
            if old not in self._open:
                self._by_key.pop(old, None)
                forgotten.append(old)
        return forgotten

    def open_runs(self) -> list[Run]:
        """The runs still running, in the order they were opened."""
        return [r for r in list(self._open.values()) if r.status == "RUNNING"]

    def running_default(self) -> Run | None:
        """The default run if it is still running."""
        run = self.default
        return run if run is not None and run.status == "RUNNING" else None

    def entered(self, run: Run) -> None:
        """A ``with obs.run()`` block was entered: a top-level run becomes the default."""
        if run.parent is None:
            self.default = run

    def exited(self, run: Run) -> None:
        """A run's block was left: the latest top-level run still open becomes the default."""
        if self.default is run:
            still_open = [r for r in self.open_runs() if r.parent is None]
            self.default = still_open[-1] if still_open else None


class RunScope:
    """
    The context manager returned by ``obs.run()``: makes the run current in this thread
    or task and yields it; on exit, ``end`` ends it with the block's exception, if any.
    """

    def __init__(
        self,
        run: Run,
        registry: RunRegistry,
        end: Callable[[Run, BaseException | None, TracebackType | None], None],
    ) -> None:
        self.run = run
        self._registry = registry
        self._end = end
        self._token: Token[Run | None] | None = None

    def __enter__(self) -> Run:
        self._token = CURRENT_RUN.set(self.run)
        self._registry.entered(self.run)
        return self.run

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        run = self.run
        self._end(run, exc if exc_type is not None else None, tb)
        try:
            if self._token is not None:
                CURRENT_RUN.reset(self._token)
        except ValueError:  # exited in another context (generator, task): restore by hand
            CURRENT_RUN.set(run.parent)
        self._registry.exited(run)

    async def __aenter__(self) -> Run:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
