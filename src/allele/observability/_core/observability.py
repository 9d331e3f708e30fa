"""
``Observability``: the object users hold. The bus plus lifecycle, runs and phases.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from ..alerts.emit import Alerting, AlertRecord, categorize
from ..config import Settings, load_settings
from ..exporter.loop import Exporter
from .accounting import KINDS, KindStatistics, Statistics
from .bus import Bus, _nop
from .context import CURRENT_RUN, program_name
from .runs import Run

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from ..alerts.queries import Queries
    from ..backends.base import Backend
    from ..genomes import GenomeRegistry
    from ..sources.detectors import Detector

__all__ = ("Observability", "make_backend")

logger = logging.getLogger("allele.observability")

#: emit methods and the kind a call after close() is counted under
_EMITTERS = {
    "metric": "metric",
    "metrics": "metric",
    "param": "param",
    "params": "param",
    "tag": "tag",
    "artifact": "artifact",
    "alert": "alert",
    "genome": "genome",
    "step": None,
}


def make_backend(settings: Settings) -> Backend:
    """
    Choose how to reach the tracking store.

    http(s) URIs: the REST API spoken directly (~4 us of CPU per metric). Database URIs
    (sqlite, postgresql, mysql, mssql): ``MlflowClient`` in a worker process. Anything
    else (file stores, databricks): ``MlflowClient`` in a worker thread.
    """
    uri = settings.tracking_uri
    scheme = uri.split(":", 1)[0].lower() if "://" in uri else "file"
    if scheme in ("http", "https"):
        from ..backends.rest import RestBackend

        insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
        return RestBackend(
            uri,
            timeout=settings.export_timeout,
            token=settings.auth_token(),
            basic_auth=settings.basic_auth(),
            insecure_tls=insecure,
        )
    if settings.delivery_process and scheme.startswith(("sqlite", "postgresql", "mysql", "mssql")):
        from ..backends.process import ProcessBackend

        return ProcessBackend(uri, timeout=settings.export_timeout)
    from ..backends.client import ClientBackend

    return ClientBackend(uri)


class _RunScope:
    """The context manager returned by ``obs.run()``; yields the :class:`Run`."""

    def __init__(self, obs: Observability, run: Run) -> None:
        self._obs = obs
        self.run = run
        self._token: Any = None

    def __enter__(self) -> Run:
        obs, run = self._obs, self.run
        self._token = CURRENT_RUN.set(run)
        if run.parent is None:
            obs._default_run = run
        return run

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        obs, run = self._obs, self.run
        status = "FINISHED"
        if exc_type is not None and exc is not None:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
            obs._record_error(run, exc, tb, killed=status == "KILLED")
        obs._end_run(run, status)
        try:
            CURRENT_RUN.reset(self._token)
        except ValueError:  # exited in another context (generator, task): restore by hand
            CURRENT_RUN.set(run.parent)
        if obs._default_run is run:
            # The latest top-level run still open (in any thread) becomes the default.
            still_open = [r for r in obs._open_runs() if r.parent is None]
            obs._default_run = still_open[-1] if still_open else None

    async def __aenter__(self) -> Run:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class Observability(Alerting, Bus):
    """
    The in-process bus and its background exporter.

    Build it with :meth:`from_env` (or pass a :class:`Settings`), use it as a context
    manager, and emit from anywhere: many threads, async tasks, forked children.

    Args:
        settings: the settings; None reads ``ALLELE_MLFLOW_*`` from the environment.
        backend_factory: builds the delivery backend from the settings (default:
            :func:`make_backend`); tests pass ``testing.InMemoryBackend``.
        **overrides: settings fields to override (``tracking_uri=...``).
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
        self._init_bus(settings)
        self._init_alerting()
        #: detectors run by the exporter over every metric it drains
        self._detectors: list[Any] = []
        if settings.detectors.strip():
            from ..sources.detectors import parse_detectors

            self._detectors.extend(parse_detectors(settings.detectors))
        self._queries: Queries | None = None
        self._genomes: GenomeRegistry | None = None
        self.settings = settings
        self._backend_factory = backend_factory or make_backend
        self._exporter: Exporter | None = None
        self._start_lock = threading.Lock()
        self._auto_lock = threading.Lock()
        self._started = False
        self._closed = False
        self._auto: Run | None = None
        self._open: dict[str, Run] = {}
        self._warned_no_run = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._child = False
        self._closing = False
        if not settings.enabled:
            for name in _EMITTERS:
                setattr(self, name, _DISABLED.get(name, _nop))

    @classmethod
    def from_env(cls, **overrides: Any) -> Observability:
        """
        Build from ``ALLELE_MLFLOW_*`` variables; keyword arguments override them.

        Raises:
            ConfigError: a variable is invalid (the message names it).
        """
        return cls(**overrides)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> Observability:
        """Start the exporter thread (idempotent; called by ``with obs`` and ``obs.run``)."""
        if self._started or not self.settings.enabled or self._closed:
            return self
        with self._start_lock:
            if self._started:
                return self
            factory, settings = self._backend_factory, self.settings
            self._exporter = Exporter(self, settings, lambda: factory(settings))
            self._exporter.start_thread()
            self._started = True
            ref = weakref.ref(self)
            atexit.register(_atexit_close, ref)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=lambda: _after_fork(ref))
            import multiprocessing.util as mp_util

            mp_util.register_after_fork(self, _mp_after_fork)
        return self

    def flush(self, timeout: float | None = None) -> bool:
        """
        Deliver everything emitted so far; wait at most ``timeout`` seconds
        (None: ``SHUTDOWN_TIMEOUT``). Returns True when all of it was delivered.
        """
        exp = self._exporter
        if exp is None or not exp.alive:
            return not self._data and not self._ctrl
        if exp.loop_thread == threading.get_ident():
            raise RuntimeError(
                "flush() would block the event loop the exporter runs in; "
                "use `await obs.aflush()` inside `async with obs`"
            )
        ticket = exp.request_flush()
        wait = self.settings.shutdown_timeout if timeout is None else timeout
        return ticket.done.wait(wait) and ticket.ok

    def close(self, timeout: float | None = None) -> None:
        """
        End the automatic run, deliver what is pending within ``timeout`` seconds
        (None: ``SHUTDOWN_TIMEOUT``), and stop the exporter. Never hangs; idempotent.
        Events emitted afterwards are counted as dropped (reason ``closed``).
        """
        if self._closed:
            return
        deadline = time.monotonic() + (
            self.settings.shutdown_timeout if timeout is None else timeout
        )
        auto = self._auto
        if auto is not None and auto.status == "RUNNING" and not self._child:
            self._end_run(auto, "FINISHED")
        self._closed = True
        self._closing = True
        for name, kind in _EMITTERS.items():
            setattr(self, name, self._closed_emitter(kind))
        exp = self._exporter
        try:
            if exp is not None and exp.alive and not exp.stop(deadline):
                logger.warning(
                    "allele-observability: exporter did not stop within the shutdown timeout"
                )
        finally:
            self._closing = False

    async def aflush(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - mirrors flush()
        """Async twin of :meth:`flush`: waits without blocking the event loop."""
        exp = self._exporter
        if exp is None or not exp.alive:
            return not self._data and not self._ctrl
        ticket = exp.request_flush()
        wait = self.settings.shutdown_timeout if timeout is None else timeout
        with anyio.move_on_after(wait):
            while not ticket.done.is_set():  # noqa: ASYNC110 - set from the exporter's thread
                await anyio.sleep(0.005)
        return ticket.done.is_set() and ticket.ok

    async def __aenter__(self) -> Observability:  # noqa: PYI034 - returns self
        """
        Run the exporter as a task in the caller's event loop (asyncio or trio via anyio)
        instead of a thread. Use :meth:`aflush` and ``async with`` exit to close.
        """
        if self._started or not self.settings.enabled or self._closed:
            return self
        factory, settings = self._backend_factory, self.settings
        self._exporter = exp = Exporter(self, settings, lambda: factory(settings))
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        exp.mark_launched()
        self._task_group.start_soon(exp.run_loop)
        self._started = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - mirrors close()
        """Async twin of :meth:`close` for ``async with obs``; never hangs."""
        tg = self._task_group
        if tg is None:
            self.close(timeout)
            return
        if self._closed:
            return
        deadline = time.monotonic() + (
            self.settings.shutdown_timeout if timeout is None else timeout
        )
        auto = self._auto
        if auto is not None and auto.status == "RUNNING":
            self._end_run(auto, "FINISHED")
        self._closed = True
        for name, kind in _EMITTERS.items():
            setattr(self, name, self._closed_emitter(kind))
        exp = self._exporter
        assert exp is not None
        exp.begin_stop(deadline)
        with anyio.move_on_after(max(0.0, deadline - time.monotonic()) + 0.5):
            while exp.alive:  # noqa: ASYNC110 - a threading.Event underneath
                await anyio.sleep(0.005)
        if exp.alive:
            logger.warning("allele-observability: exporter did not stop within the deadline")
            tg.cancel_scope.cancel()
        self._task_group = None
        await tg.__aexit__(None, None, None)

    def __enter__(self) -> Observability:  # noqa: PYI034 - start() returns self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _closed_emitter(self, kind: str | None) -> Any:
        if kind is None:
            return _nop
        emitted, dropped, reason = (
            self._emitted[kind].inc,
            self._dropped[kind].inc,
            self._drop_reasons["closed"].inc,
        )

        def closed(*args: Any, **_kwargs: Any) -> Any:
            emitted()
            dropped()
            reason()
            if kind == "genome" and args:
                return _genome_id_only(args[0])
            return "" if kind == "alert" else None

        return closed

    # -- runs and phases --------------------------------------------------------------------
    def run(
        self,
        name: str,
        *,
        experiment: str | None = None,
        params: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None,
    ) -> _RunScope:
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
        from .bus import _as_text
        from .names import MAX_PARAM_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH, sanitize_key

        if not isinstance(name, str) or not name:
            raise ValueError(f"run name must be a non-empty str, got {name!r}")
        parent = CURRENT_RUN.get()
        exp = experiment or (parent.experiment if parent is not None else program_name())
        clean_params = {}
        for k, v in (params or {}).items():
            key = sanitize_key(k, "param name")
            clean_params[key] = _as_text("param", key, v, MAX_PARAM_VALUE_LENGTH)
        clean_tags = {}
        for k, v in (tags or {}).items():
            key = sanitize_key(k, "tag key")
            clean_tags[key] = _as_text("tag", key, v, MAX_TAG_VALUE_LENGTH)
        run = self._new_run(name, exp, clean_params, clean_tags, parent)
        return _RunScope(self, run)

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
            wait_timeout=self.settings.export_timeout,
        )
        if not self.settings.enabled:
            return run
        self._runs[run.key] = run
        self.start()
        self._open[run.key] = run
        all_tags = {
            "mlflow.source.name": program_name(),
            "mlflow.user": _user(),
            "allele.host": socket.gethostname(),
            "allele.pid": str(os.getpid()),
            **tags,
        }
        # The start event carries the run's params and tags: count them under their kinds.
        for _ in params:
            self._emitted["param"].inc()
        for _ in all_tags:
            self._emitted["tag"].inc()
        self._control("run", ("run_start", run, all_tags, dict(params)))
        return run

    def _end_run(self, run: Run, status: str) -> None:
        if run.status != "RUNNING":
            return
        self._release_held(run)
        run.status = status
        run.end_time = time.time_ns() // 1_000_000
        self._open.pop(run.key, None)
        if self.settings.enabled:
            self._control("run", ("run_end", run, status, run.end_time))

    def _record_error(
        self, run: Run, exc: BaseException, tb: TracebackType | None, *, killed: bool
    ) -> None:
        """Tag the run with the error and keep the traceback as an artifact."""
        if not self.settings.enabled:
            return
        kind = type(exc).__qualname__
        category = categorize(exc)
        self._control("tag", ("tag", run, "allele.error.type", kind))
        self._control("tag", ("tag", run, "allele.error.category", category))
        self._control("tag", ("tag", run, "allele.error.message", str(exc)[:1000]))
        self.alert(
            "run.killed" if killed else "run.failed",
            severity="warning" if killed else "error",
            message=f"{kind}: {exc}"[:2000],
            attributes={"category": category, "exception_type": kind},
        )
        if killed:
            return
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        try:
            directory = self.settings.spool_dir / "tracebacks" / run.key
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / "traceback.txt"
            path.write_text(text, encoding="utf-8")
            self._control("artifact", ("artifact", run, str(path), "error"))
        except OSError as err:
            logger.warning("allele-observability: cannot keep the traceback: %s", err)

    def add_detector(self, detector: Detector) -> None:
        """
        Watch metric streams with ``detector`` (see :mod:`allele.observability.detectors`);
        it runs in the exporter, off the hot path, and its findings are alerts of the run.
        """
        if not callable(getattr(detector, "observe", None)):
            raise TypeError(f"detector must have an observe() method, got {detector!r}")
        self._detectors.append(detector)

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
            from ..genomes import GenomeRegistry as _GenomeRegistry

            s = self.settings
            self._genomes = _GenomeRegistry(s.tracking_uri, s.model_registry_uri)
        return self._genomes

    def _default_phase_run(self) -> Run | None:
        run = self._default_run
        return run if run is not None and run.status == "RUNNING" else None

    def _emit_alert(self, record: AlertRecord) -> None:
        if not record.correlated and record.run is None:
            # Outside any run with no run active: the automatic run, if allowed.
            fallback = self._fallback_run("alert")
            if fallback is None:
                return
            record.correlated = [(fallback, fallback.step)]
        self._control("alert", ("alert", record.run, record))

    def _alert_folded(self, record: AlertRecord) -> None:  # noqa: ARG002 - the exporter re-ships it
        self._emitted["alert"].inc()
        self._folded.inc()

    def _emit_phase(self, run: Run, record: dict[str, Any]) -> None:
        self._control("phase", ("phase", run, record))

    def _open_runs(self) -> list[Run]:
        return [r for r in list(self._open.values()) if r.status == "RUNNING"]

    def _fallback_run(self, kind: str | None) -> Run | None:
        run = self._default_run
        if run is not None and run.status == "RUNNING":
            return run
        if self._closed or not self.settings.enabled:
            return None
        if self.settings.auto_experiment_tracking:
            auto = self._auto
            if auto is None:
                with self._auto_lock:  # one automatic run, whichever thread gets here first
                    if self._auto is None:
                        prog = program_name()
                        self._auto = self._new_run(prog, prog, {}, {}, None)
                    auto = self._auto
            return auto
        if kind is not None:
            self._emitted[kind].inc()
            self._dropped[kind].inc()
            self._drop_reasons["no_run"].inc()
            if not self._warned_no_run:
                self._warned_no_run = True
                logger.warning(
                    "allele-observability: events outside any run are dropped "
                    "(ALLELE_MLFLOW_AUTO_EXPERIMENT_TRACKING=false); counted in stats()"
                )
        return None

    # -- accounting ---------------------------------------------------------------------------
    def stats(self) -> Statistics:
        """
        A consistent snapshot: per kind, emitted = delivered + sampled_out + dropped +
        dead_lettered + spooled + pending.
        """
        exp = self._exporter
        held_runs = list(self._open.values())
        zero = dict.fromkeys(KINDS, 0)
        if exp is not None:
            with exp.lock:
                drained = dict(exp.drained)
                outcomes = {o: dict(v) for o, v in exp.outcomes.items()}
                failures = dict(exp.failures)
                drop_reasons_exp = dict(exp.drop_reasons)
                replayed = exp._spooler.replayed_foreign
                data_len = len(self._data)
            state = exp.state if exp.alive else "closed"
        else:
            drained = dict(zero)
            outcomes = {o: dict(zero) for o in ("delivered", "dropped", "dead_lettered", "spooled")}
            failures, drop_reasons_exp = {}, {}
            replayed = 0
            data_len = len(self._data)
            state = "disabled" if not self.settings.enabled else "idle"
        held = self._held_count(held_runs)
        sampled = self._sampled_out.value
        per_kind = {}
        for k in KINDS:
            delivered = outcomes["delivered"][k]
            dead = outcomes["dead_lettered"][k]
            spooled = outcomes["spooled"][k]
            dropped_hot = self._dropped[k].value
            dropped = dropped_hot + outcomes["dropped"][k]
            resolved = delivered + dead + spooled + outcomes["dropped"][k]
            if k == "metric":
                # Metrics are not counted on the hot path: every accepted one is in the lane,
                # drained, held by a sampler, sampled out or dropped (no_run, closed, full).
                pending = drained[k] - resolved + data_len + held
                emitted = drained[k] + data_len + held + sampled + dropped_hot
                per_kind[k] = KindStatistics(
                    emitted, delivered, sampled, dropped, dead, spooled, pending
                )
            elif k == "system":
                per_kind[k] = KindStatistics(
                    drained[k], delivered, 0, dropped, dead, spooled, drained[k] - resolved
                )
            else:
                emitted = self._emitted[k].value
                # Alerts folded into an earlier identical one count as sampled out; their
                # number is in that record's `occurrences`.
                folded = self._folded.value if k == "alert" else 0
                pending = emitted - dropped_hot - resolved - folded
                per_kind[k] = KindStatistics(
                    emitted, delivered, folded, dropped, dead, spooled, pending
                )
        reasons = {r: c.value for r, c in self._drop_reasons.items() if c.value}
        for r, n in drop_reasons_exp.items():
            reasons[r] = reasons.get(r, 0) + n
        return Statistics(
            **per_kind, state=state, drop_reasons=reasons, failures=failures, replayed=replayed
        )


def _nop_alert(*_args: Any, **_kwargs: Any) -> str:
    """``obs.alert`` of a disabled bus: no record, an empty id."""
    return ""


def _genome_id_only(genome: Any, *_args: Any, **_kwargs: Any) -> str:
    """``obs.genome`` of a disabled bus: nothing recorded, but the id is still the id."""
    from ..genomes.identity import genome_id

    return genome_id(genome)


#: the emit methods of a disabled bus that return something
_DISABLED: dict[str, Any] = {"alert": _nop_alert, "genome": _genome_id_only}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _atexit_close(ref: weakref.ReferenceType[Observability]) -> None:
    obs = ref()
    if obs is not None and not obs._closed:
        pending = obs.stats().total.pending
        if pending:
            sys.stderr.write(
                f"allele-observability: delivering {pending} pending events "
                f"(at most {obs.settings.shutdown_timeout:g} s)\n"
            )
        obs.close()


def _after_fork(ref: weakref.ReferenceType[Observability]) -> None:
    """In a forked child: fresh lanes and counters, a new exporter, same runs."""
    obs = ref()
    if obs is None or obs._closed or not obs._started:
        return
    _forget_half_imported_modules()
    from collections import deque

    from .accounting import AtomicCounter

    obs._data = deque()
    obs._ctrl = deque()
    obs._emitted = {k: AtomicCounter() for k in KINDS}
    obs._dropped = {k: AtomicCounter() for k in KINDS}
    obs._sampled_out = AtomicCounter()
    obs._folded = AtomicCounter()
    obs._drop_reasons = {r: AtomicCounter() for r in obs._drop_reasons}
    obs._exporter_sleeping = False
    obs._wake = _nop
    obs._start_lock = threading.Lock()
    obs._auto_lock = threading.Lock()
    obs._child = True
    obs._pid = os.getpid()
    settings = obs.settings.model_copy(update={"system_metrics_interval": 0.0})
    factory = obs._backend_factory
    obs._exporter = Exporter(obs, settings, lambda: factory(settings))
    obs._exporter.start_thread()
    _flush_on_sigterm(ref)


def _mp_after_fork(obs: Observability) -> None:
    """
    In a multiprocessing child (after its finalizer registry was cleared): close at exit.
    Workers leave through ``os._exit``, which skips atexit, but runs these finalizers.
    """
    import multiprocessing.util as mp_util

    mp_util.Finalize(None, _atexit_close, args=(weakref.ref(obs),), exitpriority=100)


def _forget_half_imported_modules() -> None:
    """
    A fork while another thread was importing (the exporter imports anyio's backend and
    MLflow lazily) leaves that module half-initialised in the child, where no thread will
    finish it. Drop such modules so the child's exporter imports them afresh.
    """
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if spec is not None and getattr(spec, "_initializing", False):
            del sys.modules[name]


#: seconds a forked child may spend delivering when it is terminated (the rest is spooled)
CHILD_TERM_TIMEOUT = 2.0


def _flush_on_sigterm(ref: weakref.ReferenceType[Observability]) -> None:
    """
    ``Pool.terminate()`` (and ``with Pool() as pool``) ends workers with SIGTERM, which
    skips every exit hook. In a forked child whose SIGTERM is still the default, deliver
    or spool what is pending (at most CHILD_TERM_TIMEOUT seconds), then die as before.
    """
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
    except ValueError:  # not the main thread
        return

    def on_term(signum: int, _frame: object) -> None:
        obs = ref()
        if obs is not None and obs._closing:
            return  # already delivering at exit (its own deadline); the process ends next
        if obs is not None and not obs._closed:
            obs.close(min(CHILD_TERM_TIMEOUT, obs.settings.shutdown_timeout))
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    with contextlib.suppress(ValueError):  # not the main thread of the child
        signal.signal(signal.SIGTERM, on_term)
