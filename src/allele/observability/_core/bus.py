"""
The bus: the hot path from ``obs.metric(...)`` to a bounded lane.

``emit`` stamps context (run, step, time), validates cheaply, samples, and appends a
tuple to a deque. No locks on the common path (``deque.append`` and ``popleft`` are
atomic), no I/O, no logging. Decisions are taken at configure time: a disabled bus gets
no-op methods instead of an ``if`` on every call.

Two lanes: the *data* lane carries metrics (sampled, dropped first under overload); the
*control* lane carries run lifecycle, params, tags, artifacts, alerts, phases and genomes
(never sampled). The exporter sees the bus only through the methods listed in
:class:`allele.observability.exporter.source.EventSource`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .accounting import UNDRAINED
from .context import CURRENT_RUN
from .names import (
    INT64_MAX,
    INT64_MIN,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    as_int64,
    as_text,
    check_artifact_path,
    sanitize_key,
    timestamp_ms,
)
from .sampling import keep, take_held

if TYPE_CHECKING:
    from ..config import SamplingRule, Settings
    from ..exporter.source import ControlEvent, MetricEvent
    from .accounting import Accounting
    from .runs import Run

__all__ = ("Bus", "nop")

logger = logging.getLogger("allele.observability")

_time_ns = time.time_ns
#: name cache entries: (MLflow key, sampling rule or None)
_NameEntry = tuple[str, "SamplingRule | None"]
#: the name cache stops growing here (unique-per-event names are validated each time)
_NAME_CACHE_LIMIT = 100_000


def nop(*_args: Any, **_kwargs: Any) -> None:
    """Do nothing: the emit methods of a disabled or closed bus."""


class _Nanoseconds(int):
    """A timestamp already in ns since the epoch (``obs.metrics`` stamps once for all)."""

    __slots__ = ()


class Bus:
    """
    Lanes, the emit path and producer-side accounting.

    Args:
        settings: the effective settings (lane sizes, sampling, overflow).
        accounting: the counters shared with the exporter.
        fallback: the run for an event emitted outside any run (the default or automatic
            run), or None after counting the event (given by kind) as dropped.
    """

    def __init__(
        self,
        settings: Settings,
        accounting: Accounting,
        fallback: Callable[[str | None], Run | None],
    ) -> None:
        self._settings = settings
        self._fallback = fallback
        self._data_cap = settings.queue_size
        self._ctrl_cap = max(1000, settings.queue_size // 10)
        self._batch = settings.metrics_batch_size
        self._names: dict[str, _NameEntry] = {}
        self._rules = tuple(settings.sampling.items())
        #: names the bus had to sanitise (raw name to MLflow key)
        self.sanitized: dict[str, str] = {}
        self._reported = 0
        self.reset(accounting)

    def reset(self, accounting: Accounting) -> None:
        """Start with empty lanes and new counters (a forked child's fresh bus)."""
        self._acct = accounting
        self._data: deque[MetricEvent] = deque()
        self._ctrl: deque[ControlEvent] = deque()
        #: set by the exporter while it waits; producers wake it only then
        self._exporter_sleeping = False
        self._wake: Callable[[], None] = nop

    # -- hot path -----------------------------------------------------------------------
    def metric(
        self, name: str, value: float, step: int | None = None, *, timestamp: Any = None
    ) -> None:
        """Record one metric value (see ``Observability.metric``)."""
        run = CURRENT_RUN.get()
        if run is None:
            run = self._fallback("metric")
            if run is None:
                return
        try:
            entry = self._names.get(name)
        except TypeError:  # unhashable, so not a str: _register_name says so
            entry = None
        if entry is None:
            entry = self._register_name(name)
        if value.__class__ is not float:
            value = _as_float(name, value)
        if step is None:
            step = run.step
        else:
            # one chained comparison of constants: an int step in MLflow's int64 range
            if step.__class__ is not int or not -0x8000000000000000 <= step <= 0x7FFFFFFFFFFFFFFF:
                step = as_int64(f"metric {name!r}: step", step)
            run.step = step
        if timestamp is None:
            ts = _time_ns()  # ns: the exporter divides, off the hot path
        elif timestamp.__class__ is _Nanoseconds:
            ts = timestamp
        else:
            ts = timestamp_ms(timestamp) * 1_000_000
        rule = entry[1]
        if rule is not None and not keep(
            run, entry[0], rule, value, ts, step, self._acct.sampled_out
        ):
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
        """Set the current step of the current run."""
        run = CURRENT_RUN.get() or self._fallback(None)
        if run is not None:
            run.step = (
                step
                if step.__class__ is int and INT64_MIN <= step <= INT64_MAX
                else (as_int64("step", step))
            )

    # -- control lane -------------------------------------------------------------------
    def param(self, name: str, value: Any) -> None:
        """Record a run parameter (see ``Observability.param``)."""
        key = sanitize_key(name, "param name")
        text = as_text("param", key, value, MAX_PARAM_VALUE_LENGTH)
        run = CURRENT_RUN.get() or self._fallback("param")
        if run is None:
            return
        old = run.params.get(key)
        if old is not None:
            if old == text:
                return
            raise ValueError(
                f"param {key!r} is already {old!r} in run {run.name!r}; "
                f"MLflow params are immutable (got {text!r})"
            )
        run.params[key] = text
        self.control(("param", run, key, text))

    def params(self, values: Mapping[str, Any]) -> None:
        """Record several parameters."""
        for name, value in values.items():
            self.param(name, value)

    def tag(self, key: str, value: Any) -> None:
        """Set a run tag (tags overwrite)."""
        key = sanitize_key(key, "tag key")
        text = as_text("tag", key, value, MAX_TAG_VALUE_LENGTH)
        run = CURRENT_RUN.get() or self._fallback("tag")
        if run is not None:
            self.control(("tag", run, key, text))

    def artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file or directory into the current run's artifacts, in the background."""
        local = os.fspath(path)
        if not os.path.exists(local):
            raise FileNotFoundError(f"artifact path {local!r} does not exist")
        artifact_path = check_artifact_path(artifact_path)
        run = CURRENT_RUN.get() or self._fallback("artifact")
        if run is None:
            return
        self.control(("artifact", run, os.path.abspath(local), artifact_path))

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
        """Record a genome; returns its id (see ``Observability.genome``)."""
        from ..genomes.checks import genome_event

        # every field checked and normalised first: the exporter and the spool never fail
        payload = genome_event(genome, name, fitness, generation, parents, tags, evaluations)
        run = CURRENT_RUN.get() or self._fallback("genome")
        if run is not None:
            if generation is None:
                payload["generation"] = run.step
            self.control(("genome", run, payload))
        return str(payload["genome_id"])

    def control(self, event: ControlEvent) -> None:
        """Put an event on the control lane (dropped and counted, per kind, if full)."""
        if len(self._ctrl) < self._ctrl_cap:
            self._ctrl.append(event)
            if self._exporter_sleeping:
                self._exporter_sleeping = False
                self._wake()
        else:
            acct = self._acct
            for counted, n in _event_counts(event):
                for _ in range(n):
                    acct.dropped[counted].inc()
                    acct.drop_reasons["queue_full"].inc()
            run = event[1]
            if run is not None:
                run.dropped.inc()

    def release_held(self, run: Run) -> None:
        """Deliver the last skipped point of each sampled series (the series' last point)."""
        for held in take_held(run):
            if len(self._data) < self._data_cap:
                self._data.append(held)
            else:
                self._overflow(run, held)

    # -- the exporter's side (exporter.source.EventSource) -------------------------------
    def drain(self) -> tuple[list[ControlEvent], list[MetricEvent]]:
        """Take everything in the lanes: control events first, then the metrics."""
        ctrl, data = self._ctrl, self._data
        events = [ctrl.popleft() for _ in range(len(ctrl))]
        return events, [data.popleft() for _ in range(len(data))]

    def has_work(self) -> bool:
        """Whether a control event or a full batch of metrics is waiting."""
        return bool(self._ctrl) or len(self._data) >= self._batch

    def is_empty(self) -> bool:
        """Whether both lanes are empty."""
        return not self._ctrl and not self._data

    def lane_length(self) -> int:
        """Metrics waiting in the data lane."""
        return len(self._data)

    def waiting(self, held: int) -> dict[str, int]:
        """
        The events waiting in the lanes per kind, measured (plus ``held``, the metrics
        samplers hold back); each count is repeated under ``UNDRAINED + kind``.
        """
        counts = {"metric": len(self._data) + held}
        for event in tuple(self._ctrl):  # one C call: atomic under the GIL
            for kind, n in _event_counts(event):
                counts[kind] = counts.get(kind, 0) + n
        for kind, n in list(counts.items()):
            counts[UNDRAINED + kind] = n
        return counts

    def connect(self, wake: Callable[[], None] | None) -> None:
        """Give producers a way to wake the exporter (None: the exporter has stopped)."""
        self._wake = wake or nop

    def set_sleeping(self, sleeping: bool) -> None:
        """The exporter is about to wait (True) or has woken up (False)."""
        self._exporter_sleeping = sleeping

    def wake(self) -> None:
        """Wake the exporter now."""
        self._wake()

    def report_sanitized(self) -> None:
        """Log each name sanitised since the last call once (off the hot path)."""
        if len(self.sanitized) != self._reported:
            names = list(self.sanitized.items())
            for raw, key in names[self._reported :]:
                logger.warning("allele-observability: metric name %r sanitised to %r", raw, key)
            self._reported = len(names)

    # -- helpers --------------------------------------------------------------------------
    def _register_name(self, name: str) -> _NameEntry:
        key = sanitize_key(name, "metric name")
        if key != name and len(self.sanitized) < _NAME_CACHE_LIMIT:
            self.sanitized[name] = key
        rule = None
        if self._rules:
            from fnmatch import fnmatchcase

            rule = next((r for glob, r in self._rules if fnmatchcase(key, glob)), None)
        entry = (key, rule)
        if len(self._names) < _NAME_CACHE_LIMIT:
            self._names[name] = entry
        return entry

    def _overflow(self, run: Run, event: MetricEvent) -> None:
        if self._settings.overflow == "block" and self._block_until_space():
            self._data.append(event)
            return
        self._acct.dropped["metric"].inc()
        self._acct.drop_reasons["queue_full"].inc()
        run.dropped.inc()

    def _block_until_space(self) -> bool:
        deadline = time.monotonic() + self._settings.block_timeout
        while time.monotonic() < deadline:
            self._wake()
            time.sleep(0.001)
            if len(self._data) < self._data_cap:
                return True
        return False


def _as_float(name: str, value: Any) -> float:
    cls = value.__class__
    if isinstance(value, (str, bytes)) or value is None or isinstance(value, complex):
        raise TypeError(
            f"metric {name!r}: value must be a real number, got {cls.__name__}: {value!r}"
        )
    try:
        return float(value)  # int, bool, numpy scalars, Decimal, Fraction, 0-d arrays
    except OverflowError:
        text = repr(value)
        text = text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
        raise ValueError(f"metric {name!r}: value {text} is too large for a 64-bit float") from None
    except (TypeError, ValueError):
        raise TypeError(
            f"metric {name!r}: value must be a real number, got {cls.__name__}: {value!r}"
        ) from None


def _event_counts(event: ControlEvent) -> list[tuple[str, int]]:
    """
    The events, per kind, one control event stands for (a run's start carries its first
    tags and params).
    """
    name = event[0]
    if name == "run_start":
        return [("run", 1), ("tag", len(event[2])), ("param", len(event[3]))]
    return [("run" if name == "run_end" else name, 1)]
