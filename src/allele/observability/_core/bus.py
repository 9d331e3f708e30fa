"""
The bus: the hot path from ``obs.metric(...)`` to a bounded lane.

``emit`` stamps context (run, step, time), validates cheaply, samples, and appends a
tuple to a deque. No locks on the common path (``deque.append`` and ``popleft`` are
atomic), no I/O, no logging. Decisions are taken at configure time: a disabled bus gets
no-op methods instead of an ``if`` on every call.

Two lanes: the *data* lane carries metrics (sampled, dropped first under overload); the
*control* lane carries run lifecycle, params, tags and artifacts (never sampled).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .accounting import KINDS, AtomicCounter
from .context import CURRENT_RUN
from .names import MAX_PARAM_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH, sanitize_key
from .runs import Run, SeriesState

if TYPE_CHECKING:
    from ..config import SamplingRule, Settings

__all__ = ("Bus",)

_time_ns = time.time_ns
#: name cache entries: (MLflow key, sampling rule or None)
_NameEntry = tuple[str, "SamplingRule | None"]
#: the name cache stops growing here (unique-per-event names are validated each time)
_NAME_CACHE_LIMIT = 100_000


class _Nanoseconds(int):
    """A timestamp already in ns since the epoch (``obs.metrics`` stamps once for all)."""

    __slots__ = ()


def _as_float(name: str, value: Any) -> float:
    cls = value.__class__
    if cls is int or cls is bool:
        return float(value)
    if isinstance(value, (str, bytes)) or value is None or isinstance(value, complex):
        raise TypeError(
            f"metric {name!r}: value must be a real number, got {cls.__name__}: {value!r}"
        )
    try:
        return float(value)  # numpy scalars, Decimal, Fraction, 0-d arrays
    except (TypeError, ValueError):
        raise TypeError(
            f"metric {name!r}: value must be a real number, got {cls.__name__}: {value!r}"
        ) from None


def _as_step(name: str, step: Any) -> int:
    if isinstance(step, bool) or not hasattr(step, "__index__"):
        if isinstance(step, float) and step.is_integer():
            return int(step)
        raise TypeError(f"metric {name!r}: step must be an int, got {type(step).__name__}")
    return int(step.__index__())


def _as_timestamp_ms(timestamp: Any) -> int:
    if isinstance(timestamp, datetime):
        return int(timestamp.timestamp() * 1000)
    if isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool):
        if not math.isfinite(timestamp) or timestamp < 0:
            raise ValueError(f"timestamp must be a finite number >= 0, got {timestamp!r}")
        return int(timestamp * 1000)
    raise TypeError(
        f"timestamp must be seconds since the epoch (float) or a datetime, got {timestamp!r}"
    )


def _as_text(field: str, key: str, value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        raise ValueError(
            f"{field} {key!r}: value is {len(text)} characters; MLflow allows at most {limit}"
        )
    return text


class Bus:
    """
    Lanes, the emit path and producer-side accounting. Subclassed by ``Observability``.
    """

    _settings: Settings

    def _init_bus(self, settings: Settings) -> None:
        self._settings = settings
        self._data_cap = settings.queue_size
        self._ctrl_cap = max(1000, settings.queue_size // 10)
        self._batch = settings.metrics_batch_size
        #: (run key, metric key, value, time in ns, step): only atomic values, so queued
        #: events are untracked by the cyclic GC (a Run in the tuple would keep every one
        #: of them tracked and make each full collection walk the whole backlog)
        self._data: deque[tuple[str, str, float, int, int]] = deque()
        #: run key to Run, for the exporter (runs are never removed: they are small)
        self._runs: dict[str, Run] = {}
        self._ctrl: deque[tuple[Any, ...]] = deque()
        self._names: dict[str, _NameEntry] = {}
        self._rules = tuple(settings.sampling.items())
        #: names the bus had to sanitise, reported once each by the exporter
        self.sanitized: dict[str, str] = {}
        #: producer-side counters: control kinds emitted, drops and samples per kind
        self._emitted = {k: AtomicCounter() for k in KINDS}
        self._dropped = {k: AtomicCounter() for k in KINDS}
        self._sampled_out = AtomicCounter()
        #: alerts folded into an earlier identical record (kind alert, sampled_out)
        self._folded = AtomicCounter()
        self._drop_reasons: dict[str, AtomicCounter] = {
            r: AtomicCounter() for r in ("queue_full", "no_run", "closed")
        }
        #: set by the exporter while it waits; producers wake it only then
        self._exporter_sleeping = False
        self._wake: Callable[[], None] = _nop
        #: the process's current top-level run, for threads that have no run in context
        self._default_run: Run | None = None
        self._pid = os.getpid()

    # -- hot path -----------------------------------------------------------------------
    def metric(
        self, name: str, value: float, step: int | None = None, *, timestamp: Any = None
    ) -> None:
        """
        Record one metric value. Never blocks (with overflow=drop), never does I/O.

        Args:
            name: metric key; invalid characters are sanitised (see ``docs/usage.md``).
            value: a real number (int, float, bool, numpy scalar); NaN is kept.
            step: the step (generation); None uses the run's current step.
            timestamp: seconds since the epoch or a datetime; None means now.

        Raises:
            TypeError: ``value`` is not a real number or ``step`` not an int (names the
                metric).
        """
        run = CURRENT_RUN.get()
        if run is None:
            run = self._fallback_run("metric")
            if run is None:
                return
        entry = self._names.get(name)
        if entry is None:
            entry = self._register_name(name)
        if value.__class__ is not float:
            value = _as_float(name, value)
        if step is None:
            step = run.step
        else:
            if step.__class__ is not int:
                step = _as_step(name, step)
            run.step = step
        if timestamp is None:
            ts = _time_ns()  # ns: the exporter divides, off the hot path
        elif timestamp.__class__ is _Nanoseconds:
            ts = timestamp
        else:
            ts = _as_timestamp_ms(timestamp) * 1_000_000
        if entry[1] is not None and not self._keep(run, entry, value, ts, step):
            return
        lane = self._data
        if len(lane) < self._data_cap:
            lane.append((run.key, entry[0], value, ts, step))
            if self._exporter_sleeping and len(lane) >= self._batch:
                self._exporter_sleeping = False  # one wake-up per sleep, not one per event
                self._wake()
        else:
            self._overflow(run, (run.key, entry[0], value, ts, step))

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        """Record several metrics at the same step and time."""
        if not isinstance(values, Mapping):
            raise TypeError(f"metrics expects a mapping of name to value, got {values!r}")
        ts = _Nanoseconds(_time_ns())  # one timestamp for all, validated once
        metric = self.metric
        for name, value in values.items():
            metric(name, value, step, timestamp=ts)

    def step(self, step: int) -> None:
        """Set the current step of the current run (stamped on alerts and step-less metrics)."""
        run = CURRENT_RUN.get() or self._fallback_run(None)
        if run is not None:
            run.step = _as_step("step", step) if step.__class__ is not int else step

    # -- control lane -------------------------------------------------------------------
    def param(self, name: str, value: Any) -> None:
        """
        Record a run parameter (stored as text). Re-logging a name with another value
        in the same run raises ValueError: MLflow params are immutable.
        """
        run = CURRENT_RUN.get() or self._fallback_run("param")
        if run is None:
            return
        key = sanitize_key(name, "param name")
        text = _as_text("param", key, value, MAX_PARAM_VALUE_LENGTH)
        old = run.params.get(key)
        if old is not None:
            if old == text:
                return
            raise ValueError(
                f"param {key!r} is already {old!r} in run {run.name!r}; "
                f"MLflow params are immutable (got {text!r})"
            )
        run.params[key] = text
        self._control("param", ("param", run, key, text))

    def params(self, values: Mapping[str, Any]) -> None:
        """Record several parameters."""
        for name, value in values.items():
            self.param(name, value)

    def tag(self, key: str, value: Any) -> None:
        """Set a run tag (tags overwrite)."""
        run = CURRENT_RUN.get() or self._fallback_run("tag")
        if run is None:
            return
        key = sanitize_key(key, "tag key")
        self._control("tag", ("tag", run, key, _as_text("tag", key, value, MAX_TAG_VALUE_LENGTH)))

    def artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """
        Upload a file or directory into the current run's artifacts, in the background.

        The file is read when the exporter uploads it: keep it in place until ``flush()``.

        Raises:
            FileNotFoundError: ``path`` does not exist.
        """
        local = os.fspath(path)
        if not os.path.exists(local):
            raise FileNotFoundError(f"artifact path {local!r} does not exist")
        run = CURRENT_RUN.get() or self._fallback_run("artifact")
        if run is None:
            return
        self._control("artifact", ("artifact", run, os.path.abspath(local), artifact_path))

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
            ValueError: an empty name, a bad parent id, fitness or generation.
        """
        from ..genomes.types import prepare_genome

        run = CURRENT_RUN.get() or self._fallback_run("genome")
        if generation is None and run is not None:
            generation = run.step
        canon, _ = prepare_genome(genome, name, fitness, generation, parents, evaluations)
        if run is None:
            return canon.genome_id
        payload = {
            "genome_id": canon.genome_id,
            "text": canon.text,
            "name": name,
            "fitness": None if fitness is None else float(fitness),
            "generation": generation,
            "parents": list(parents),
            "tags": dict(tags or {}),
            "evaluations": None if evaluations is None else [float(e) for e in evaluations],
        }
        self._control("genome", ("genome", run, payload))
        return canon.genome_id

    # -- helpers --------------------------------------------------------------------------
    def _control(self, kind: str, event: tuple[Any, ...]) -> None:
        self._emitted[kind].inc()
        if len(self._ctrl) < self._ctrl_cap:
            self._ctrl.append(event)
            if self._exporter_sleeping:
                self._exporter_sleeping = False
                self._wake()
        else:
            self._dropped[kind].inc()
            self._drop_reasons["queue_full"].inc()
            if isinstance(event[1], Run):
                event[1].dropped.inc()

    def _register_name(self, name: str) -> _NameEntry:
        key = sanitize_key(name, "metric name")
        if key != name:
            self.sanitized[name] = key
        rule = None
        if self._rules:
            from fnmatch import fnmatchcase

            rule = next((r for glob, r in self._rules if fnmatchcase(key, glob)), None)
        entry = (key, rule)
        if len(self._names) < _NAME_CACHE_LIMIT:
            self._names[name] = entry
        return entry

    def _keep(self, run: Run, entry: _NameEntry, value: float, ts: int, step: int) -> bool:
        """Sampling decision for a metric with a rule; first, last and extremes always kept."""
        rule = entry[1]
        assert rule is not None
        series = run.series.get(entry[0])
        if series is None:
            series = run.series.setdefault(entry[0], SeriesState())
        with series.lock:
            if series.held is not None:
                series.held = None
                self._sampled_out.inc()
                run.sampled_out.inc()
            seen = series.seen
            series.seen = seen + 1
            keep = seen == 0 or math.isnan(value)  # first point, NaN
            if value > series.maximum:
                series.maximum = value
                keep = True
            if value < series.minimum:
                series.minimum = value
                keep = True
            if rule.max_per_second:
                window = ts // 1_000_000_000  # one-second windows of the emit timestamps
                if window != series.window:
                    series.window = window
                    series.kept_in_window = 0
            if not keep:
                keep = seen % rule.every == 0 and (
                    not rule.max_per_second or series.kept_in_window < rule.max_per_second
                )
            if keep:
                series.kept_in_window += 1
            if not keep:
                series.held = (run.key, entry[0], value, ts, step)
        return keep

    def _release_held(self, run: Run) -> None:
        """Deliver the last skipped point of each sampled series (the series' last point)."""
        for series in run.series.values():
            with series.lock:
                held, series.held = series.held, None
            if held is not None:
                if len(self._data) < self._data_cap:
                    self._data.append(held)
                else:
                    self._overflow(run, held)

    def _held_count(self, runs: list[Run]) -> int:
        return sum(1 for r in runs for s in list(r.series.values()) if s.held is not None)

    def _overflow(self, run: Run, event: tuple[str, str, float, int, int]) -> None:
        if self._settings.overflow == "block" and self._block_until_space():
            self._data.append(event)
            return
        self._dropped["metric"].inc()
        self._drop_reasons["queue_full"].inc()
        run.dropped.inc()

    def _block_until_space(self) -> bool:
        deadline = time.monotonic() + self._settings.block_timeout
        while time.monotonic() < deadline:
            self._wake()
            time.sleep(0.001)
            if len(self._data) < self._data_cap:
                return True
        return False

    def _fallback_run(self, kind: str | None) -> Run | None:
        raise NotImplementedError  # provided by Observability


def _nop(*_args: Any, **_kwargs: Any) -> None:
    """Do nothing: the emit methods of a disabled or closed bus."""
