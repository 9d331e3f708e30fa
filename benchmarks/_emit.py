"""
Section ``emit`` (DESIGN promise 1): what one call costs the experiment's thread.

Every contender is timed the same way: a tight ``for i in range(1000)`` loop around one
call, bracketed by ``time.perf_counter_ns`` (and ``time.thread_time_ns``); one sample is
the loop's time divided by 1000. Samples of the cheap contenders are taken in interleaved
blocks (empty loop, deque, OTel, obs, disabled, then again) so drift and background
activity hit all of them alike; the ``obs.metric`` exporter keeps delivering to sqlite in
the background throughout.
The MLflow anchors cost 1000x more, so they run last, with fewer calls per sample.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from typing import Any

from _common import Section, close_and_wait, progress, rounded, sqlite_uri, summary, temp_dir

perf_counter_ns = time.perf_counter_ns
thread_time_ns = time.thread_time_ns
CALLS = 1000  # calls per sample for the cheap contenders
# Every loop returns (wall ns, this thread's CPU ns). The CPU clock brackets the wall
# clock (one thread_time_ns call, ~0.6 us, i.e. < 1 ns per call, is inside it); CPU time
# is blind to preemption by other processes and to waits for the GIL.


def _loop_empty(n: int) -> tuple[int, int]:
    c0 = thread_time_ns()
    t0 = perf_counter_ns()
    for _i in range(n):
        pass
    t1 = perf_counter_ns()
    return t1 - t0, thread_time_ns() - c0


def _deque_loop(run: Any) -> Any:
    key, v, ts = "fitness", 0.5, time.time_ns() // 1_000_000

    def loop(n: int) -> tuple[int, int]:
        lane: deque[tuple[Any, str, float, int, int]] = deque()
        c0 = thread_time_ns()
        t0 = perf_counter_ns()
        for i in range(n):
            lane.append((run, key, v, ts, i))
        t1 = perf_counter_ns()
        return t1 - t0, thread_time_ns() - c0  # the lane is freed after the clocks stop

    return loop


class _KeptLoop:
    """
    The floor again, but the tuples stay alive (as events do in the lane and the
    exporter's backlog until delivered): fresh memory and cyclic-GC scans every call.
    """

    def __init__(self, run: Any) -> None:
        self.run = run
        self.lane: deque[tuple[Any, str, float, int, int]] = deque()

    def __call__(self, n: int) -> tuple[int, int]:
        run, lane = self.run, self.lane
        key, v, ts = "fitness", 0.5, 0
        c0 = thread_time_ns()
        t0 = perf_counter_ns()
        for i in range(n):
            lane.append((run, key, v, ts, i))
        t1 = perf_counter_ns()
        return t1 - t0, thread_time_ns() - c0


def _otel_loop(with_reader: bool) -> tuple[Any, Any]:
    """
    ``Counter.add`` on a private MeterProvider (the global one is left alone). Without a
    reader the SDK skips aggregation: the cheapest OTel can be, so the strictest anchor.
    """
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    readers = [InMemoryMetricReader()] if with_reader else []
    provider = MeterProvider(metric_readers=readers)
    counter = provider.get_meter("allele.bench").create_counter("fitness")
    attrs = {"k": "v"}

    def loop(n: int) -> tuple[int, int]:
        c0 = thread_time_ns()
        t0 = perf_counter_ns()
        for _i in range(n):
            counter.add(1.0, attrs)
        t1 = perf_counter_ns()
        return t1 - t0, thread_time_ns() - c0

    return loop, provider


def _obs_loop(obs: Any) -> Any:
    key, v = "fitness", 0.5
    step = [0]

    def loop(n: int) -> tuple[int, int]:
        base = step[0]
        c0 = thread_time_ns()
        t0 = perf_counter_ns()
        for i in range(base, base + n):
            obs.metric(key, v, step=i)
        t1 = perf_counter_ns()
        cpu = thread_time_ns() - c0
        step[0] = base + n
        return t1 - t0, cpu

    return loop


def _sample(loop: Any, calls: int, samples: int, wall: list[float], cpu: list[float]) -> None:
    for _ in range(samples):
        w, c = loop(calls)
        wall.append(w / calls)
        cpu.append(c / calls)


def _mlflow_anchors(sec: Section, quick: bool) -> dict[str, Any]:
    import mlflow

    n_async = 500 if quick else 2000
    n_sync = 100 if quick else 300
    per = 10  # calls per sample: these calls cost 0.1-10 ms
    out: dict[str, Any] = {}
    with temp_dir("emit-mlflow") as d:
        mlflow.set_tracking_uri(sqlite_uri(d))
        mlflow.set_experiment("bench-emit-mlflow")
        with mlflow.start_run(run_name="anchors"):
            # warm-up: store migrations, the async queue's threads, first-insert paths
            mlflow.log_metric("warm", 0.0, step=0)
            for i in range(20):
                mlflow.log_metric("warm", 1.0, step=i, synchronous=False)
            mlflow.flush_async_logging()

            key, v = "fitness", 0.5
            samples: list[float] = []
            t_start = time.perf_counter()
            for base in range(0, n_async, per):
                t0 = perf_counter_ns()
                for i in range(base, base + per):
                    mlflow.log_metric(key, v, step=i, synchronous=False)
                samples.append((perf_counter_ns() - t0) / per)
            t_emitted = time.perf_counter()
            mlflow.flush_async_logging()
            t_done = time.perf_counter()
            out["async"] = {
                "calls": n_async,
                "per_call_ns": summary(samples),
                "samples_ns": rounded(samples, 0),
                "emit_seconds": t_emitted - t_start,
                "flush_wait_seconds": t_done - t_emitted,
                "drain_metrics_per_s": n_async / (t_done - t_start),
            }
            progress(f"emit: mlflow async {summary(samples)['median'] / 1000:.0f} us/call")

            samples = []
            for base in range(0, n_sync, per):
                t0 = perf_counter_ns()
                for i in range(base, base + per):
                    mlflow.log_metric("fitness.sync", v, step=i)
                samples.append((perf_counter_ns() - t0) / per)
            out["sync"] = {
                "calls": n_sync,
                "per_call_ns": summary(samples),
                "samples_ns": rounded(samples, 0),
            }
            progress(f"emit: mlflow sync {summary(samples)['median'] / 1000:.0f} us/call")
    sec.raw["mlflow"] = out
    return out


def run(quick: bool) -> Section:
    from allele.observability import Observability

    sec = Section("emit")
    rounds, block = (4, 25) if quick else (10, 40)
    total_obs_calls = rounds * block * CALLS
    sec.raw["config"] = {
        "calls_per_sample": CALLS,
        "rounds": rounds,
        "samples_per_block": block,
        "samples_per_contender": rounds * block,
        "p99": "99th percentile of per-sample means (1000 calls each), not of single calls",
        "gc": "enabled, as in a real experiment",
    }
    names = ("empty_loop", "deque", "deque_kept", "otel", "otel_reader", "obs", "obs_disabled")
    samples: dict[str, list[float]] = {k: [] for k in names}
    cpu_samples: dict[str, list[float]] = {k: [] for k in names}

    with temp_dir("emit") as d:
        obs = Observability.from_env(
            tracking_uri=sqlite_uri(d),
            system_metrics_interval=0,
            spool_dir=str(d / "spool"),
            flush_interval=1.0,
            queue_size=total_obs_calls * 2,
        )
        off = Observability.from_env(enabled=False, spool_dir=str(d / "spool-off"))
        otel, provider = _otel_loop(with_reader=False)
        otel_reader, provider_reader = _otel_loop(with_reader=True)
        t0 = time.perf_counter()
        obs.start()
        with obs.run("emit", experiment="bench-emit") as run:
            obs.metric("warm", 0.0, step=0)
            warm_ok = obs.flush(120)  # the delivery worker is up and the run exists
            sec.raw["obs_start_seconds"] = time.perf_counter() - t0
            sec.raw["obs_warm_flush_ok"] = warm_ok
            loops = {
                "empty_loop": _loop_empty,
                "deque": _deque_loop(run),
                "deque_kept": _KeptLoop(run),
                "otel": otel,
                "otel_reader": otel_reader,
                "obs": _obs_loop(obs),
                "obs_disabled": _obs_loop(off),
            }
            for loop in loops.values():  # one warm-up sample each
                loop(CALLS)
            gc.collect()
            for r in range(rounds):
                for name in names:
                    _sample(loops[name], CALLS, block, samples[name], cpu_samples[name])
                if r == 0 or r == rounds - 1:
                    progress(f"emit: round {r + 1}/{rounds}")
            stats_after = obs.stats().metric
            loops["deque_kept"].lane.clear()
        closing = close_and_wait(obs, timeout=5.0)
        off.close()
        provider.shutdown()
        provider_reader.shutdown()

    sec.raw["obs_stats_after_emit"] = stats_after._asdict()
    sec.raw["obs_close"] = closing
    sec.raw["samples_ns"] = {k: rounded(v) for k, v in samples.items()}
    sec.raw["per_call_ns"] = {k: summary(v) for k, v in samples.items()}
    sec.raw["cpu_samples_ns"] = {k: rounded(v) for k, v in cpu_samples.items()}
    sec.raw["per_call_cpu_ns"] = {k: summary(v) for k, v in cpu_samples.items()}
    c = sec.raw["per_call_cpu_ns"]
    s = sec.raw["per_call_ns"]

    try:
        m = _mlflow_anchors(sec, quick)
    except Exception as exc:
        sec.error("mlflow anchors", exc)
        m = None

    loop_ns = s["empty_loop"]["median"]
    sec.add("empty loop iteration", loop_ns, "ns", "included in every figure below")
    labels = {
        "deque": "deque.append(tuple) floor",
        "deque_kept": "deque.append, tuples kept alive",
        "otel": "OTel Counter.add (no reader)",
        "otel_reader": "OTel Counter.add (InMemoryMetricReader)",
        "obs": "obs.metric",
        "obs_disabled": "obs.metric enabled=False",
    }
    for k, label in labels.items():
        anchor = "DESIGN: about 1 us" if k == "obs" else ""
        sec.add(f"{label} median", s[k]["median"], "ns", anchor)
        sec.add(f"{label} p99", s[k]["p99"], "ns")
        if k in ("deque", "deque_kept", "obs"):
            sec.add(f"{label} thread CPU median", c[k]["median"], "ns", "blind to preemption")
    if m is not None:
        sec.add("mlflow.log_metric async median", m["async"]["per_call_ns"]["median"], "ns")
        sec.add("mlflow.log_metric async p99", m["async"]["per_call_ns"]["p99"], "ns")
        sec.add(
            "mlflow async drain rate",
            m["async"]["drain_metrics_per_s"],
            "metrics/s",
            f"{m['async']['calls']} calls, emit + flush_async_logging",
        )
        sec.add("mlflow.log_metric sync median", m["sync"]["per_call_ns"]["median"], "ns")
        sec.add("mlflow.log_metric sync p99", m["sync"]["per_call_ns"]["p99"], "ns")

    obs_med = s["obs"]["median"]
    r_deque = obs_med / s["deque"]["median"]
    r_otel = obs_med / s["otel"]["median"]
    sec.add("ratio obs / deque", r_deque, "x", "<= 12", r_deque <= 12)
    sec.add("ratio obs / otel (no reader)", r_otel, "x", "< 1 (aim 0.25)", r_otel < 1)
    cpu_ratio = c["obs"]["median"] / c["deque"]["median"]
    sec.add("ratio obs / deque, thread CPU", cpu_ratio, "x", "info")
    kept = obs_med / s["deque_kept"]["median"]
    sec.add("ratio obs / deque with tuples kept alive", kept, "x", "info")
    net = (obs_med - loop_ns) / max(1e-9, s["deque"]["median"] - loop_ns)
    sec.add("ratio obs / deque, loop subtracted", net, "x", "info")
    if m is not None:
        r_async = m["async"]["per_call_ns"]["median"] / obs_med
        sec.add("ratio mlflow async / obs", r_async, "x", ">= 100", r_async >= 100)
        r_sync = m["sync"]["per_call_ns"]["median"] / obs_med
        sec.add("ratio mlflow sync / obs", r_sync, "x", "info")
    dropped = stats_after.dropped
    sec.add(
        "obs metrics dropped during emit",
        dropped,
        "events",
        f"== 0 of {stats_after.emitted:,} emitted",
        dropped == 0,
    )
    sec.add(
        "obs delivered to sqlite while emitting",
        stats_after.delivered,
        "events",
        "background exporter kept running",
    )
    sec.add(
        "obs close(timeout=5) returned after",
        closing["close_returned_s"],
        "s",
        f"{stats_after.emitted - stats_after.delivered:,} metrics still pending",
    )
    sec.add(
        "obs exporter thread stopped after",
        closing["exporter_stopped_s"],
        "s",
        "DESIGN 6: close bounded (timeout + 0.5 s)",
        closing["exporter_stopped_s"] <= 5.5,
    )
    return sec
