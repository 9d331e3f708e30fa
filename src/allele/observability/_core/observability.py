"""
``Observability``: the object users hold. It composes the parts and exposes the API.

- :class:`~.bus.Bus`: the emit path and the lanes (``metric``, ``param``, ``tag``, ...).
- :class:`~..alerts.emit.Alerter` and :class:`~..alerts.phases.Phases`: ``alert``, ``phase``.
- :class:`~.runs.RunRegistry`: the process's runs; :class:`~.accounting.Accounting`: counts.
- :class:`~..exporter.loop.Exporter`: the background delivery, started on first use.

The emit methods of the bus are bound onto the instance at construction (no extra call on
the hot path); the methods of the class document them and are what type checkers see.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from ..alerts.emit import Alerter
from ..alerts.phases import Phases
from ..backends.factory import make_backend
from ..config import Settings, load_settings
from ..exporter.loop import Exporter
from ..sources.detectors import detectors_from_setting
from ..sources.detectors.base import release_runs, run_isolated
from .accounting import Accounting
from .bus import Bus
from .emitters import closed_emitters, disabled_emitters
from .lifecycle import (
    CHILD_EXIT_TIMEOUT,
    CHILD_TERM_TIMEOUT,
    flush_on_sigterm,
    forget_half_imported_modules,
    register_process_hooks,
)
from .runs import RunRegistry
from .runtime import ExporterRuntime
from .sampling import held_count
from .tracking import RunTracker

if TYPE_CHECKING:
    import contextlib
    import os
    from collections.abc import Callable, Mapping
    from types import TracebackType

    from ..alerts.queries import Queries
    from ..backends.base import Backend
    from ..exporter.source import MetricEvent
    from ..genomes import GenomeRegistry
    from ..sources.detectors import Detector
    from .accounting import Statistics
    from .runs import RunScope

__all__ = ("Observability",)


class Observability:
    """
    The in-process bus and its background exporter.

    Build it with :meth:`from_env` (or pass a :class:`Settings`), use it as a context
    manager, and emit from anywhere: many threads, async tasks, forked children.

    Args:
        settings: the settings; None reads ``ALLELE_MLFLOW_*`` from the environment.
        backend_factory: builds the delivery backend from the settings (default:
            :func:`~allele.observability.backends.factory.make_backend`); tests pass
            ``testing.InMemoryBackend``.
        **overrides: settings fields to override (``tracking_uri=...``).

    Raises:
        ConfigError: a setting is invalid (the message names the variable).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        backend_factory: Callable[[Settings], Backend] | None = None,
        **overrides: Any,
    ) -> None:
        if settings is None:
            settings = load_settings(**overrides)
        elif overrides:
            settings = load_settings(**{**settings.model_dump(), **overrides})
        self.settings = settings
        #: detectors run by the exporter over every metric it drains
        self._detectors: list[Any] = detectors_from_setting(settings.detectors)
        self._acct = Accounting()
        self._runs = RunRegistry()
        self._tracker = RunTracker(
            settings,
            self._runs,
            self._acct,
            start=self.start,
            alert=self._alert,
            closed=self._is_closed,
        )
        self._bus = Bus(settings, self._acct, self._tracker.fallback)
        self._tracker.attach(self._bus)
        self._alerter = Alerter(
            settings.alert_dedupe_window,
            self._runs.open_runs,
            self._tracker.fallback,
            self._bus.control,
            self._acct,
        )
        self._phases = Phases(
            self._runs.running_default,
            self._bus.control,
            self._is_closed,
            enabled=settings.enabled,
        )
        self._backend_factory = backend_factory or make_backend
        self._runtime = ExporterRuntime(settings, self._make_exporter, self._bus.is_empty)
        self._queries: Queries | None = None
        self._genomes: GenomeRegistry | None = None
        self._closed = self._child = False
        self.phase = self._phases.phase  # type: ignore[method-assign]
        if settings.enabled:
            for name in ("metric", "metrics", "step", "param", "params", "tag", "artifact"):
                setattr(self, name, getattr(self._bus, name))
            self.genome = self._bus.genome  # type: ignore[method-assign]
            self.alert = self._alerter.alert  # type: ignore[method-assign]
        else:
            for name, method in disabled_emitters().items():
                setattr(self, name, method)

    def _alert(self, *args: Any, **kwargs: Any) -> str:
        """``self.alert`` as it is now (it is swapped when the instance closes)."""
        return self.alert(*args, **kwargs)

    @classmethod
    def from_env(cls, **overrides: Any) -> Observability:
        """
        Build from ``ALLELE_MLFLOW_*`` variables; keyword arguments override them.
        Raises ``ConfigError`` naming the variable if one is invalid.
        """
        return cls(**overrides)

    # -- the emit API (bound to the bus at construction; see the module docs) -------------
    def metric(
        self, name: str, value: float, step: int | None = None, *, timestamp: Any = None
    ) -> None:
        """
        Record one metric value. Never blocks (with overflow=drop), never does I/O.

        Args:
            name: metric key (a str); invalid characters are sanitised (``docs/usage.md``).
            value: a real number (int, float, bool, numpy scalar); NaN and +-inf are kept.
            step: the step (generation), a signed 64-bit int; None: the run's current step.
            timestamp: seconds since the epoch (``time.time()``) or a datetime; None: now.

        Raises:
            TypeError: the name is not a str, the value not a real number, the step not an
                int (the message names the metric).
            ValueError: a step outside int64, a timestamp in ms/us/ns (above 1e11 s).
        """
        self._bus.metric(name, value, step, timestamp=timestamp)

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        """Record several metrics at the same step and time."""
        self._bus.metrics(values, step)

    def step(self, step: int) -> None:
        """Set the current step of the current run (stamped on alerts and step-less metrics)."""
        self._bus.step(step)

    def param(self, name: str, value: Any) -> None:
        """
        Record a run parameter (stored as text). Re-logging a name with another value
        in the same run raises ValueError: MLflow params are immutable.
        """
        self._bus.param(name, value)

    def params(self, values: Mapping[str, Any]) -> None:
        """Record several parameters."""
        self._bus.params(values)

    def tag(self, key: str, value: Any) -> None:
        """Set a run tag (tags overwrite)."""
        self._bus.tag(key, value)

    def artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """
        Upload a file or directory into the current run's artifacts, in the background.

        The file is read when the exporter uploads it: keep it in place until ``flush()``.

        Raises:
            FileNotFoundError: ``path`` does not exist.
        """
        self._bus.artifact(path, artifact_path)

    def genome(
        self,
        genome: Any,
        *,
        name: str,
        fitness: float | None = None,
        generation: int | None = None,
        parents: Any = (),
        tags: Mapping[str, str] | None = None,
        evaluations: Any = None,
    ) -> str:
        """
        Record a genome; returns its id (a content hash: the same genome twice, in any
        process, is one id). With the registry on it becomes a version of the registered
        model ``name`` (see ``docs/genomes.md``); otherwise it is logged to the run.

        Raises:
            TypeError: the genome has no canonical form (the message gives the path).
            ValueError: a name MLflow refuses as a model name, a bad parent id, fitness
                or generation, reserved tags, an event larger than a spool record.
        """
        return self._bus.genome(
            genome, name=name, fitness=fitness, generation=generation, parents=parents,
            tags=tags, evaluations=evaluations,
        )  # fmt: skip

    def alert(
        self,
        name: str,
        *,
        severity: str = "info",
        message: str = "",
        attributes: Mapping[str, Any] | None = None,
    ) -> str:
        """
        Raise an alert; returns its id (the id of the record it folded into, if any).
        Stamped with run, phase, step, trace/span ids, host and pid; identical alerts
        within ``ALERT_DEDUPE_WINDOW`` fold (criticals never); outside any run it hits
        every active run.

        Raises:
            ValueError: ``name`` has no valid character, ``severity`` is not one of info,
                warning, error, critical, or the alert is over 64 KiB as JSON.
            TypeError: a non-str name, ``attributes`` not a JSON-serialisable mapping.
        """
        return self._alerter.alert(name, severity=severity, message=message, attributes=attributes)

    def phase(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """
        Mark a phase of the experiment: an OpenTelemetry span; phases nest. When it ends,
        a phase record (path, trace and span ids, start and end time and step) is kept.
        Yields the span.
        """
        return self._phases.phase(name)

    def add_detector(self, detector: Detector) -> None:
        """
        Watch metric streams with ``detector`` (see :mod:`allele.observability.detectors`);
        it runs in the exporter, off the hot path, and its findings are alerts of the run.
        """
        if not callable(getattr(detector, "observe", None)):
            raise TypeError(f"detector must have an observe() method, got {detector!r}")
        self._detectors.append(detector)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> Observability:
        """Start the exporter thread (idempotent; called by ``with obs`` and ``obs.run``)."""
        if not self._closed and self.settings.enabled and self._runtime.start():
            register_process_hooks(self, self._close_at_exit, self._after_fork)
        return self

    def flush(self, timeout: float | None = None) -> bool:
        """
        Deliver everything emitted so far; wait at most ``timeout`` seconds
        (None: ``SHUTDOWN_TIMEOUT``). Returns True when all of it was delivered.
        """
        return self._runtime.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        """
        End the automatic run, deliver what is pending within ``timeout`` seconds
        (None: ``SHUTDOWN_TIMEOUT``), and stop the exporter. Never hangs; idempotent.
        Events emitted afterwards are counted as dropped (reason ``closed``).
        """
        if not self._closed:
            self._runtime.stop(self._begin_close(timeout))

    async def aflush(self, timeout: float | None = None) -> bool:
        """Async twin of :meth:`flush`: waits without blocking the event loop."""
        return await self._runtime.aflush(timeout)

    async def aclose(self, timeout: float | None = None) -> None:
        """Async twin of :meth:`close` for ``async with obs``; never hangs."""
        if not self._runtime.in_event_loop:
            self.close(timeout)
        elif not self._closed:
            await self._runtime.astop(self._begin_close(timeout))

    async def __aenter__(self) -> Observability:  # noqa: PYI034 - returns self
        """
        Run the exporter as a task in the caller's event loop (asyncio or trio via anyio)
        instead of a thread. Use :meth:`aflush` and ``async with`` exit to close.
        """
        if not self._runtime.started and self.settings.enabled and not self._closed:
            await self._runtime.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __enter__(self) -> Observability:  # noqa: PYI034 - start() returns self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _begin_close(self, timeout: float | None) -> float:
        """End the automatic run and swap in the closed emitters; return the deadline."""
        deadline = time.monotonic() + (
            self.settings.shutdown_timeout if timeout is None else timeout
        )
        auto = self._tracker.auto
        if auto is not None and auto.status == "RUNNING" and not self._child:
            self._tracker.end(auto, "FINISHED")
        self._closed = True
        for name, method in closed_emitters(self._acct).items():
            setattr(self, name, method)
        return deadline

    def _make_exporter(self, settings: Settings) -> Exporter:
        factory = self._backend_factory
        return Exporter(
            self._bus,
            self._runs,
            self._acct,
            settings,
            lambda: factory(settings),
            observe=self._after_drain,
            child=self._child,
        )

    def _is_closed(self) -> bool:
        return self._closed

    def _close_at_exit(self) -> None:
        if self._closed:
            return
        self._runtime.closing = True  # a SIGTERM now leaves this delivery alone
        timeout = self.settings.shutdown_timeout  # a forked worker's parent replays its spool
        timeout = min(CHILD_EXIT_TIMEOUT, timeout) if self._child else timeout
        try:
            pending = self.stats().total.pending
            if pending:
                sys.stderr.write(
                    f"allele-observability: delivering {pending} pending events "
                    f"(at most {timeout:g} s)\n"
                )
        finally:
            self.close(timeout)

    def _after_fork(self) -> None:
        """In a forked child: fresh lanes, counters, locks and exporter; the same runs."""
        if self._closed or not self._runtime.started:
            return
        forget_half_imported_modules()
        self._acct = Accounting()
        self._bus.reset(self._acct)
        self._tracker.reset(self._acct)
        self._alerter.reset(self._acct)
        self._child = True
        settings = self.settings.model_copy(update={"system_metrics_interval": 0.0})
        self._runtime.restart_in_child(settings)
        flush_on_sigterm(self._terminate)

    def _terminate(self) -> bool:
        """SIGTERM in a forked child: deliver or spool briefly; False if already closing."""
        if self._runtime.closing:
            return False
        self.close(min(CHILD_TERM_TIMEOUT, self.settings.shutdown_timeout))
        return True

    # -- runs -------------------------------------------------------------------------------
    def run(
        self,
        name: str,
        *,
        experiment: str | None = None,
        params: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None,
    ) -> RunScope:
        """
        Open a run for the ``with`` block; nested inside another run it becomes its child.

        Args:
            name: the run name.
            experiment: the experiment name, without ``EXPERIMENT_PREFIX`` (default: the
                parent's experiment, else the program's name).
            params: parameters logged with the run.
            tags: tags set on the run.

        An exception escaping the block ends the run FAILED (its traceback becomes the
        artifact ``error/traceback.txt``); KeyboardInterrupt ends it KILLED.
        """
        return self._tracker.open(name, experiment, params, tags)

    # -- what the parts hand back --------------------------------------------------------
    def _after_drain(self, items: list[MetricEvent]) -> None:
        """
        Each export round, in the exporter: detectors (one that raises is removed, with a
        warning), ended runs' detector state released, sanitised names reported.
        """
        if self._detectors and items:
            detect, run_of = self._alerter.detect, self._runs.get
            run_isolated(self._detectors, lambda d: detect((d,), items, run_of))
        release_runs(self._detectors, self._runs.just_ended)
        self._bus.report_sanitized()

    # -- reading back -----------------------------------------------------------------------
    def stats(self) -> Statistics:
        """A consistent snapshot; per kind, emitted = the sum of the outcome columns."""
        self._runtime.check()
        state = self._runtime.state() if self.settings.enabled else "disabled"
        runs, bus, exporter = self._runs.open_runs(), self._bus, self._runtime.exporter

        def waiting() -> dict[str, int]:  # under the lock the exporter moves events under
            counts = bus.waiting(held_count(runs))
            return counts if exporter is None else exporter.waiting(counts)

        return self._acct.statistics(waiting, state)

    @property
    def queries(self) -> Queries:
        """Alert and run queries on this instance's tracking store (they read MLflow only)."""
        if self._queries is None:
            from ..alerts.queries import Queries as _Queries

            self._queries = _Queries(
                self.settings.tracking_uri, experiment_prefix=self.settings.experiment_prefix
            )
        return self._queries

    @property
    def genomes(self) -> GenomeRegistry:
        """Genome versions, champion, lineage and comparison on this instance's stores."""
        if self._genomes is None:
            from ..genomes.registry import GenomeRegistry as _GenomeRegistry

            s = self.settings
            self._genomes = _GenomeRegistry(s.tracking_uri, s.model_registry_uri)
        return self._genomes
