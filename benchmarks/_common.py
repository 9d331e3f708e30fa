"""Shared helpers: figures, statistics, machine info, the results table."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence


@dataclass
class Figure:
    """One row of the table: a measured value, its anchor or target, and the verdict."""

    section: str
    name: str
    value: float | None
    unit: str
    anchor: str = ""
    passed: bool | None = None  # None: informational, no target
    note: str = ""


@dataclass
class Section:
    """What one benchmark section returns: table rows plus every raw number."""

    name: str
    figures: list[Figure] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(
        self,
        name: str,
        value: float | None,
        unit: str,
        anchor: str = "",
        passed: bool | None = None,
        note: str = "",
    ) -> Figure:
        fig = Figure(self.name, name, value, unit, anchor, passed, note)
        self.figures.append(fig)
        return fig

    def error(self, name: str, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        text = " ".join(text.split())[:300]
        self.errors.append(f"{name}: {text}")
        self.add(name, None, "", "ERROR", passed=False, note=text)

    def to_json(self) -> dict[str, Any]:
        return {
            "figures": [asdict(f) for f in self.figures],
            "raw": self.raw,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
        }


# -- statistics ---------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not xs:
        return math.nan
    ordered = sorted(xs)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(xs: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(xs),
        "median": median(xs),
        "p99": percentile(xs, 99),
        "min": min(xs) if xs else math.nan,
        "max": max(xs) if xs else math.nan,
        "mean": statistics.fmean(xs) if xs else math.nan,
    }


def rounded(xs: Sequence[float], digits: int = 1) -> list[float]:
    return [round(x, digits) for x in xs]


# -- environment --------------------------------------------------------------------------
def json_safe(obj: Any) -> Any:
    """``obj`` for ``json.dumps``: NaN and inf (not JSON) become null, keys strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def quiet_logs() -> None:
    """MLflow and alembic log INFO lines on store creation; keep the table readable."""
    logging.basicConfig(level=logging.WARNING)
    for name in ("mlflow", "alembic", "sqlalchemy", "urllib3", "allele.observability"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_ENABLE_ASYNC_LOGGING", None)
    for key in list(os.environ):
        if key.startswith("ALLELE_MLFLOW_"):
            del os.environ[key]


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "not installed"


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "mlflow": _version("mlflow"),
        "allele-observability": _version("allele-observability"),
        "opentelemetry-sdk": _version("opentelemetry-sdk"),
        "sqlalchemy": _version("sqlalchemy"),
        "switch_interval_s": sys.getswitchinterval(),
        "gc_thresholds": gc.get_threshold(),
    }
    with contextlib.suppress(Exception):
        import psutil

        info["memory_total_mb"] = psutil.virtual_memory().total // 2**20
        info["cpu_affinity"] = len(psutil.Process().cpu_affinity() or [])
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"allele-bench-{prefix}-") as d:
        yield Path(d)


def sqlite_uri(directory: Path, name: str = "mlflow.db") -> str:
    return f"sqlite:///{(directory / name).resolve()}"


class CpuClock:
    """Wall time, this process's CPU, the calling thread's CPU and children's CPU."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.start = self._read()

    def _children_cpu(self) -> float:
        total = 0.0
        with contextlib.suppress(Exception):
            for child in self._proc.children(recursive=True):
                with contextlib.suppress(Exception):
                    t = child.cpu_times()
                    total += t.user + t.system
        return total

    def _read(self) -> tuple[float, float, float, float]:
        return (time.perf_counter(), time.process_time(), time.thread_time(), self._children_cpu())

    def lap(self) -> dict[str, float]:
        now = self._read()
        wall, proc, thread, children = (b - a for a, b in zip(self.start, now, strict=True))
        return {"wall": wall, "process_cpu": proc, "thread_cpu": thread, "children_cpu": children}


def close_and_wait(obs: Any, timeout: float, wait: float = 120.0) -> dict[str, Any]:
    """
    ``obs.close(timeout)``, then wait until the exporter thread has really stopped.

    Returns when close() returned, when the exporter stopped, and the final metric stats.
    """
    t0 = time.perf_counter()
    obs.close(timeout=timeout)
    returned = time.perf_counter() - t0
    deadline = time.monotonic() + wait
    while obs.stats().state != "closed" and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped = time.perf_counter() - t0
    stats = obs.stats()
    return {
        "close_timeout_s": timeout,
        "close_returned_s": returned,
        "exporter_stopped_s": stopped,
        "state": stats.state,
        "metric": stats.metric._asdict(),
        "drop_reasons": dict(stats.drop_reasons),
    }


class LoadMeter:
    """
    How busy the machine was while a section ran: all CPUs (from /proc/stat), this
    process tree, and the rest (other users' tests, servers, ...), in cores.
    """

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self.start = self._read()

    def _read(self) -> tuple[float, float, float]:
        t = self._psutil.cpu_times()
        idle = ("idle", "iowait", "steal", "guest", "guest_nice")  # guest is inside user
        busy = sum(t) - sum(getattr(t, f, 0.0) for f in idle)
        c = self._me.cpu_times()
        own = c.user + c.system + c.children_user + c.children_system
        with contextlib.suppress(Exception):
            for child in self._me.children(recursive=True):
                with contextlib.suppress(Exception):
                    ct = child.cpu_times()
                    own += ct.user + ct.system
        return time.perf_counter(), busy, own

    def read(self, lost_own_cpu: float = 0.0) -> dict[str, float]:
        """
        ``lost_own_cpu``: CPU seconds of processes we started but could not reap (an
        orphaned grandchild such as the mlflow server's worker), counted as ours.
        """
        now = self._read()
        wall = now[0] - self.start[0]
        busy = (now[1] - self.start[1]) / wall
        own = (now[2] - self.start[2] + lost_own_cpu) / wall
        out = {"busy_cores": busy, "own_cores": own, "other_cores": max(0.0, busy - own)}
        with contextlib.suppress(OSError):
            out["loadavg_1m"] = os.getloadavg()[0]
        return out


def settle(max_wait: float, quiet_cores: float = 0.25) -> float:
    """
    Wait (at most ``max_wait`` s) until other processes use less than ``quiet_cores``
    over a quarter of a second. Returns the seconds waited.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        meter = LoadMeter()
        time.sleep(0.25)
        if meter.read()["other_cores"] < quiet_cores:
            break
    return time.perf_counter() - t0


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# -- output -------------------------------------------------------------------------------
_DIGITS = ((1000, ",.0f"), (100, ".0f"), (10, ".1f"), (1, ".2f"))


def fmt_value(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "%":
        return f"{value:+.2f}"
    if unit in ("events", "reps"):
        return f"{value:,.0f}"
    spec = (
        ",.0f"
        if unit.endswith("/s")
        else next((f for limit, f in _DIGITS if abs(value) >= limit), ".3f")
    )
    return format(value, spec)


def table(figures: Sequence[Figure]) -> str:
    header = ("section", "figure", "value", "unit", "anchor / target", "result")
    rows = [header]
    for f in figures:
        verdict = "" if f.passed is None else ("PASS" if f.passed else "FAIL")
        if f.anchor == "ERROR":
            verdict = "ERROR"
        rows.append((f.section, f.name, fmt_value(f.value, f.unit), f.unit, f.anchor[:60], verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, r in enumerate(rows):
        cells = [
            r[i].rjust(widths[i]) if i == 2 else r[i].ljust(widths[i]) for i in range(len(header))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  {f.section}/{f.name}: {f.note}" for f in figures if f.note]
    if notes:
        lines.extend(["", "notes:", *notes])
    return "\n".join(lines)


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
