"""
Opening and ending runs: ``obs.run()``, errors that end a run, and the run of an event
emitted outside any run (the default run, else the automatic run named after the program).
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from ..alerts.record import categorize
from .context import CURRENT_RUN, program_name
from .files import open_private, private_dir
from .names import (
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    as_text,
    check_run_names,
    sanitize_key,
)
from .runs import Run, RunScope

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from ..config import Settings
    from .accounting import Accounting
    from .bus import Bus
    from .runs import RunRegistry

__all__ = ("RunTracker",)

logger = logging.getLogger("allele.observability")


class RunTracker:
    """
    Opens and ends the runs of one ``Observability``.

    Args:
        settings: the effective settings.
        registry: the process's runs.
        accounting: the counters (events of a start, drops for want of a run).
        start: starts the exporter (a run is the first thing that needs it).
        alert: raises an alert (the error alert of a failed run).
        closed: whether the ``Observability`` is closed.
    """

    def __init__(
        self,
        settings: Settings,
        registry: RunRegistry,
        accounting: Accounting,
        *,
        start: Callable[[], object],
        alert: Callable[..., str],
        closed: Callable[[], bool],
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._start = start
        self._alert = alert
        self._closed = closed
        self._bus: Bus | None = None
        self._warned_no_run = False
        #: the automatic run, once an event outside any run made one
        self.auto: Run | None = None
        self.reset(accounting)

    def attach(self, bus: Bus) -> None:
        """The bus the run events go to (it needs :meth:`fallback`, so it comes second)."""
        self._bus = bus

    def reset(self, accounting: Accounting) -> None:
        """New counters and new locks, the runs' too (a forked child)."""
        self._acct = accounting
        self._auto_lock = threading.Lock()
        self._registry.after_fork()

    def _control(self, event: tuple[Any, ...]) -> None:
        assert self._bus is not None
        self._bus.control(event)

    def open(
        self,
        name: str,
        experiment: str | None,
        params: dict[str, Any] | None,
        tags: dict[str, Any] | None,
    ) -> RunScope:
        """A run for a ``with`` block (see ``Observability.run``)."""
        parent = CURRENT_RUN.get()
        exp = experiment or (parent.experiment if parent is not None else program_name())
        check_run_names(name, exp, self._settings.experiment_prefix)
        clean_params = {}
        for k, v in (params or {}).items():
            key = sanitize_key(k, "param name")
            clean_params[key] = as_text("param", key, v, MAX_PARAM_VALUE_LENGTH)
        clean_tags = {}
        for k, v in (tags or {}).items():
            key = sanitize_key(k, "tag key")
            clean_tags[key] = as_text("tag", key, v, MAX_TAG_VALUE_LENGTH)
        run = self._new_run(name, exp, clean_params, clean_tags, parent)
        return RunScope(run, self._registry, self._exited)

    def _new_run(
        self,
        name: str,
        experiment: str,
        params: dict[str, str],
        tags: dict[str, str],
        parent: Run | None,
    ) -> Run:
        run = Run(
            name,
            experiment,
            params=params,
            tags=tags,
            parent=parent,
            start_time=time.time_ns() // 1_000_000,
            wait_timeout=self._settings.export_timeout,
        )
        if not self._settings.enabled:
            return run
        self._registry.opened(run)
        self._start()
        all_tags = {
            "mlflow.source.name": program_name(),
            "mlflow.user": _user(),
            "allele.host": socket.gethostname(),
            "allele.pid": str(os.getpid()),
            **tags,
        }
        # The start event carries the run's params and tags (counted under their kinds).
        self._control(("run_start", run, all_tags, dict(params)))
        return run

    def _exited(self, run: Run, exc: BaseException | None, tb: TracebackType | None) -> None:
        status = "FINISHED"
        if exc is not None:
            killed = isinstance(exc, KeyboardInterrupt)
            status = "KILLED" if killed else "FAILED"
            self._record_error(run, exc, tb, killed=killed)
        self.end(run, status)

    def end(self, run: Run, status: str) -> None:
        """End ``run`` with ``status`` (its held sampled points are released first)."""
        if run.status != "RUNNING":
            return
        assert self._bus is not None
        self._bus.release_held(run)
        run.status = status
        run.end_time = time.time_ns() // 1_000_000
        self._registry.ended(run)
        if self._settings.enabled:
            self._control(("run_end", run, status, run.end_time))

    def _record_error(
        self, run: Run, exc: BaseException, tb: TracebackType | None, *, killed: bool
    ) -> None:
        """Tag the run with the error and keep the traceback as an artifact."""
        if not self._settings.enabled:
            return
        kind = type(exc).__qualname__
        category = categorize(exc)
        self._control(("tag", run, "allele.error.type", kind))
        self._control(("tag", run, "allele.error.category", category))
        self._control(("tag", run, "allele.error.message", str(exc)[:1000]))
        self._alert(
            "run.killed" if killed else "run.failed",
            severity="warning" if killed else "error",
            message=f"{kind}: {exc}"[:2000],
            attributes={"category": category, "exception_type": kind},
        )
        if killed:
            return
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        try:
            directory = private_dir(self._settings.spool_dir / "tracebacks" / run.key)
            path = directory / "traceback.txt"
            fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            self._control(("artifact", run, str(path), "error"))
        except OSError as err:
            logger.warning("allele-observability: cannot keep the traceback: %s", err)

    def fallback(self, kind: str | None) -> Run | None:
        """
        The run for an event outside any run: the default run, else the automatic run;
        None (the event of ``kind`` counted as dropped) when neither is allowed.
        """
        run = self._registry.default
        if run is not None and run.status == "RUNNING":
            return run
        if self._closed() or not self._settings.enabled:
            return None
        if self._settings.auto_experiment_tracking:
            auto = self.auto
            if auto is None:
                with self._auto_lock:  # one automatic run, whichever thread gets here first
                    if self.auto is None:
                        prog = program_name()
                        self.auto = self._new_run(prog, prog, {}, {}, None)
                    auto = self.auto
            return auto
        if kind is not None:
            self._acct.drop(kind, "no_run")
            if not self._warned_no_run:
                self._warned_no_run = True
                logger.warning(
                    "allele-observability: events outside any run are dropped "
                    "(ALLELE_MLFLOW_AUTO_EXPERIMENT_TRACKING=false); counted in stats()"
                )
        return None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
