"""
Section ``throughput`` (DESIGN promises 2 and 3): metrics/s and this process's CPU.

Anchor: raw ``MlflowClient.log_batch(run_id, metrics=[1000 Metric], synchronous=True)``
into a fresh store, Metric entities built before the clock starts (the anchor's best case).
Contender: the exporter. N metrics are emitted into one run as fast as the loop goes,
then ``obs.flush()``; the rate is N / (flush completed - first emit). The store is fresh
too, and the exporter is warm (its delivery worker and run exist) before the clock starts,
as the anchor's client and run do; the cold start is reported separately.

CPU of this process: ``time.process_time()`` across emit + flush, split with
``time.thread_time()`` of the main thread into the emit loop's own CPU (main thread) and
the exporter's (every other thread of this process). The delivery worker process (sqlite)
and the server (HTTP) are reported as information.

The same pair is then measured against a real ``mlflow server`` on 127.0.0.1.
"""

from __future__ import annotations

import gc
import time
import uuid
from typing import Any

from _common import (
    CpuClock,
    Section,
    close_and_wait,
    median,
    progress,
    sqlite_uri,
    temp_dir,
)
from _server import BenchServer

KEYS = tuple(f"bench.m{k}" for k in range(10))  # 10 series, steps i // 10
BATCH = 1000


def _per_metric_us(seconds: float, n: int) -> float:
    return seconds / n * 1e6


def raw_log_batch(uri: str, n: int, server: BenchServer | None = None) -> dict[str, Any]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    t0 = time.perf_counter()
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(f"bench-raw-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(exp_id, run_name="raw-log-batch").info.run_id
    ts0 = time.time_ns() // 1_000_000
    client.log_batch(run_id, metrics=[Metric("warm", 0.0, ts0, 0)], synchronous=True)
    setup = time.perf_counter() - t0
    k = len(KEYS)
    batches = [
        [Metric(KEYS[i % k], 0.5, ts0 + i // BATCH, i // k) for i in range(b, min(n, b + BATCH))]
        for b in range(0, n, BATCH)
    ]
    gc.collect()
    server_cpu0 = server.cpu_seconds() if server else float("nan")
    clock = CpuClock()
    for batch in batches:
        client.log_batch(run_id, metrics=batch, synchronous=True)
    lap = clock.lap()
    server_cpu = (server.cpu_seconds() - server_cpu0) if server else float("nan")
    stored = len(client.get_metric_history(run_id, KEYS[0]))
    client.set_terminated(run_id)
    return {
        "metrics": n,
        "batch": BATCH,
        "setup_s": setup,
        **lap,
        "metrics_per_s": n / lap["wall"],
        "process_cpu_us_per_metric": _per_metric_us(lap["process_cpu"], n),
        "server_cpu_us_per_metric": _per_metric_us(server_cpu, n),
        "stored_first_series": stored,
        "expected_first_series": len(range(0, n, k)),
    }


def exporter(uri: str, n: int, spool: str, server: BenchServer | None = None) -> dict[str, Any]:
    from allele.observability import Observability

    obs = Observability.from_env(
        tracking_uri=uri,
        system_metrics_interval=0,
        spool_dir=spool,
        flush_interval=1.0,
        queue_size=max(2 * n, 100_000),
    )
    out: dict[str, Any] = {"metrics": n}
    t0 = time.perf_counter()
    obs.start()
    try:
        with obs.run("exporter", experiment=f"bench-exporter-{uuid.uuid4().hex[:8]}") as run:
            obs.metric("warm", 0.0, step=0)
            out["warm_flush_ok"] = obs.flush(180)
            out["cold_start_s"] = time.perf_counter() - t0  # worker, store, experiment, run
            k = len(KEYS)
            keys = KEYS
            gc.collect()
            server_cpu0 = server.cpu_seconds() if server else float("nan")
            clock = CpuClock()
            for i in range(n):
                obs.metric(keys[i % k], 0.5, step=i // k)
            emit = clock.lap()
            out["flush_ok"] = obs.flush(600)
            lap = clock.lap()
            server_cpu = (server.cpu_seconds() - server_cpu0) if server else float("nan")
            stats = obs.stats()
            run_id = run.run_id
    finally:
        closing = close_and_wait(obs, timeout=30.0)
    exporter_cpu = lap["process_cpu"] - lap["thread_cpu"]
    out.update(
        {
            "emit": emit,
            **lap,
            "metrics_per_s": n / lap["wall"],
            "emit_loop_ns_per_metric": emit["wall"] / n * 1e9,
            "process_cpu_us_per_metric": _per_metric_us(lap["process_cpu"], n),
            "emit_cpu_us_per_metric": _per_metric_us(lap["thread_cpu"], n),
            "delivery_cpu_us_per_metric": _per_metric_us(exporter_cpu, n),
            "worker_cpu_us_per_metric": _per_metric_us(lap["children_cpu"], n),
            "server_cpu_us_per_metric": _per_metric_us(server_cpu, n),
            "stats": stats.metric._asdict(),
            "failures": dict(stats.failures),
            "run_id": run_id,
            "close": closing,
        }
    )
    return out


def _pair(
    sec: Section, store: str, make_uri: Any, n: int, reps: int, server: BenchServer | None
) -> None:
    raws: list[dict[str, Any]] = []
    exps: list[dict[str, Any]] = []
    for rep in range(reps):
        with temp_dir(f"tp-{store}-raw") as d:
            try:
                raws.append(raw_log_batch(make_uri(d), n, server))
                progress(f"throughput {store}: raw log_batch {raws[-1]['metrics_per_s']:,.0f}/s")
            except Exception as exc:
                sec.error(f"{store} raw log_batch (rep {rep + 1})", exc)
        with temp_dir(f"tp-{store}-exp") as d:
            try:
                exps.append(exporter(make_uri(d), n, str(d / "spool"), server))
                e = exps[-1]
                progress(
                    f"throughput {store}: exporter {e['metrics_per_s']:,.0f}/s, "
                    f"delivery CPU {e['delivery_cpu_us_per_metric']:.1f} us/metric"
                )
            except Exception as exc:
                sec.error(f"{store} exporter (rep {rep + 1})", exc)
    sec.raw[store] = {"raw_log_batch": raws, "exporter": exps}
    ok_exps = [e for e in exps if e["flush_ok"] and e["stats"]["delivered"] >= n]
    if len(ok_exps) < len(exps):
        sec.error(
            f"{store} exporter",
            f"{len(exps) - len(ok_exps)} of {len(exps)} runs did not deliver everything: "
            f"{[(e['flush_ok'], e['stats'], e['failures']) for e in exps]}",
        )
    if raws:
        raw_rate = median([r["metrics_per_s"] for r in raws])
        sec.add(f"{store}: raw log_batch", raw_rate, "metrics/s", f"{n:,} metrics, batches of 1000")
        raw_cpu = median([r["process_cpu_us_per_metric"] for r in raws])
        sec.add(f"{store}: raw log_batch CPU in caller", raw_cpu, "us/metric", "anchor")
    if not ok_exps:
        return
    m = {k: median([e[k] for e in ok_exps]) for k in ok_exps[0] if isinstance(ok_exps[0][k], float)}
    sec.add(f"{store}: exporter", m["metrics_per_s"], "metrics/s", "first emit -> flush done")
    if raws:
        ratio = m["metrics_per_s"] / raw_rate
        sec.add(f"{store}: exporter / raw log_batch", ratio, "x", ">= 0.8", ratio >= 0.8)
    d_cpu = m["delivery_cpu_us_per_metric"]
    sec.add(
        f"{store}: exporter CPU in this process",
        d_cpu,
        "us/metric",
        "<= 10 (total - emit loop)",
        d_cpu <= 10,
    )
    sec.add(f"{store}: emit loop CPU", m["emit_cpu_us_per_metric"], "us/metric", "main thread")
    sec.add(f"{store}: total CPU of this process", m["process_cpu_us_per_metric"], "us/metric")
    if store == "sqlite":
        sec.add(f"{store}: delivery worker process CPU", m["worker_cpu_us_per_metric"], "us/metric")
    else:
        sec.add(f"{store}: server CPU, exporter", m["server_cpu_us_per_metric"], "us/metric")
        if raws:
            s_raw = median([r["server_cpu_us_per_metric"] for r in raws])
            sec.add(f"{store}: server CPU, raw log_batch", s_raw, "us/metric")
    sec.add(f"{store}: exporter cold start", m["cold_start_s"], "s", "start -> run exists")


def run(quick: bool) -> Section:
    sec = Section("throughput")
    n, reps = (20_000, 1) if quick else (100_000, 3)
    sec.raw["config"] = {"metrics": n, "reps": reps, "series": len(KEYS), "batch": BATCH}
    _pair(sec, "sqlite", sqlite_uri, n, reps, None)
    with temp_dir("tp-server") as d:
        server = BenchServer(d)
        try:
            server.start()
        except Exception as exc:
            sec.error("http: mlflow server start", exc)
            return sec
        try:
            progress(f"throughput: mlflow server up in {server.startup_seconds:.1f} s")
            sec.raw["server_startup_s"] = server.startup_seconds
            _pair(sec, "http", lambda _d: server.url, n, reps, server)
        finally:
            server.stop()
            # Its worker is killed, not reaped by us: count its CPU as ours, not others'.
            sec.raw["unreaped_cpu_s"] = server.cpu_at_stop
    return sec
