"""
The alert flood (issue 4): what 1000 alerts cost on the hot path.

Three floods, each 1000 calls inside a run with the exporter delivering to sqlite in the
background: identical warnings (they fold into one record), critical alerts (never
folded: 1000 records), and distinct warnings (1000 records). Per-call cost is the median
over repeated floods, next to one ``obs.metric`` call, measured the same way.
"""

from __future__ import annotations

import time
from statistics import median
from typing import Any

from _common import Section, close_and_wait, progress, sqlite_uri, temp_dir

FLOOD = 1000


def _flood_ns(fn: Any, reps: int) -> float:
    samples = []
    for rep in range(reps):
        t0 = time.perf_counter_ns()
        for i in range(FLOOD):
            fn(i, rep)
        samples.append((time.perf_counter_ns() - t0) / FLOOD)
    return median(samples)


def run(quick: bool) -> Section:
    from allele.observability import Observability

    sec = Section("alerts")
    reps = 5 if quick else 20
    with temp_dir("alerts") as d:
        obs = Observability.from_env(
            tracking_uri=sqlite_uri(d),
            system_metrics_interval=0,
            spool_dir=str(d / "spool"),
            queue_size=1_000_000,
        )
        obs.start()
        with obs.run("flood", experiment="bench-alerts"):
            obs.flush(180)
            metric = _flood_ns(lambda i, _r: obs.metric("x", 1.0, step=i), reps)
            folded = _flood_ns(lambda _i, _r: obs.alert("slow", severity="warning"), reps)
            critical = _flood_ns(lambda _i, _r: obs.alert("oom", severity="critical"), reps)
            distinct = _flood_ns(
                lambda i, r: obs.alert("eval", severity="warning", attributes={"i": i, "r": r}),
                reps,
            )
            delivered = obs.flush(120)
        stats = obs.stats()
        close_and_wait(obs, timeout=30.0)
    progress(f"alerts: folded {folded:.0f} ns, critical {critical:.0f} ns, metric {metric:.0f}")
    sec.add("obs.metric (same run, for scale)", metric, "ns", f"median of {reps} x {FLOOD}")
    sec.add("obs.alert, identical warnings (fold)", folded, "ns", "per call, 1000-alert flood")
    sec.add("obs.alert, critical (never folded)", critical, "ns", "per call, 1000-alert flood")
    sec.add("obs.alert, distinct warnings", distinct, "ns", "per call, 1000-alert flood")
    sec.add("1000-alert flood, folded", folded * FLOOD / 1e6, "ms", "wall time of the flood")
    sec.add(
        "alert records delivered",
        stats.alert.delivered,
        "records",
        f"of {stats.alert.emitted} calls ({stats.alert.sampled_out} folded)",
        delivered and stats.alert.dropped == 0 and stats.is_balanced(),
    )
    sec.raw.update({"stats": stats.alert._asdict(), "flush_ok": delivered})
    return sec
