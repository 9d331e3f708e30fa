"""
Section ``overhead`` (DESIGN promise 3): a real GA workload, tracked vs untracked.

The project's GA (``allele.observability.demo.ga``) runs each problem three ways:
untracked (no callback at all), tracked (``obs.metrics`` of six per-generation summaries
into a real exporter delivering to sqlite, default flush interval) and tracked with
``enabled=False``. Repetitions are interleaved and the order rotates every repetition
(UTD, TDU, DUT, ...); every run uses the same seed, so every run does the same work.
Only ``ga.run()`` (inside ``with obs.run(...)`` for the tracked variants) is timed;
``Observability`` start-up, the flush after each run and ``close()`` are not, and are
reported separately. The exporter's CPU in this process (every thread but the main one)
is measured from the start of each tracked run to the end of its flush.

This machine may be shared: before each repetition the benchmark waits (a few seconds at
most) for other processes to leave a core free, measures how much CPU they used during
every run, and reports the slowdown over all repetitions and over the quiet ones (other
processes left a whole core for the GA and a quarter of one for the delivery worker
during all three runs of the repetition).
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from _common import (
    CpuClock,
    LoadMeter,
    Section,
    close_and_wait,
    median,
    progress,
    settle,
    sqlite_uri,
    temp_dir,
)
from _server import free_port

VARIANTS = ("untracked", "tracked", "disabled", "server-down")
#: a repetition is "quiet" when other processes used less than this during all its runs:
#: they left a whole core for the GA plus a quarter of one for the delivery worker
QUIET_CORES = max(0.25, (os.cpu_count() or 2) - 1.25)
#: every run does the same work: the spread between repetitions is noise only
SEED = 7


def _problems() -> list[tuple[str, Any]]:
    from allele.observability.demo.ga import OneMax, Rastrigin

    return [("onemax-256", OneMax(256)), ("rastrigin-20", Rastrigin(20))]


def _callback(obs: Any) -> Any:
    def on_generation(s: Any) -> None:
        obs.metrics(
            {
                "fitness.best": s.best,
                "fitness.mean": s.mean,
                "fitness.worst": s.worst,
                "fitness.std": s.std,
                "diversity": s.diversity,
                "evaluations": s.evaluations,
            },
            step=s.generation,
        )

    return on_generation


def _one(
    problem: Any, cfg: Any, variant: str, obs: Any, off: Any, down: Any, name: str
) -> tuple[float, float, float]:
    """Wall seconds, this process's CPU (all threads) and the main thread's CPU of a run."""
    from allele.observability.demo.ga import GeneticAlgorithm

    ga = GeneticAlgorithm(problem, cfg)
    gc.collect()
    if variant == "untracked":
        m0, c0, t0 = time.thread_time(), time.process_time(), time.perf_counter()
        ga.run()
        t1, c1, m1 = time.perf_counter(), time.process_time(), time.thread_time()
        return t1 - t0, c1 - c0, m1 - m0
    target = {"tracked": obs, "disabled": off, "server-down": down}[variant]
    cb = _callback(target)
    m0, c0, t0 = time.thread_time(), time.process_time(), time.perf_counter()
    with target.run(name, experiment="bench-overhead", params={"seed": cfg.seed}):
        ga.run(cb)
    t1, c1, m1 = time.perf_counter(), time.process_time(), time.thread_time()
    return t1 - t0, c1 - c0, m1 - m0


def _slowdowns(
    sec: Section, pname: str, rows: list[dict[str, Any]], label: str, verdict: bool
) -> None:
    walls = {v: [r["wall"] for r in rows if r["variant"] == v] for v in VARIANTS}
    base = median(walls["untracked"])
    for variant in ("tracked", "disabled"):
        slow = (median(walls[variant]) / base - 1) * 100
        sec.add(
            f"{pname} {variant} slowdown{label}", slow, "%", "< 1", slow < 1 if verdict else None
        )
    slow = (median(walls["server-down"]) / base - 1) * 100
    sec.add(f"{pname} server-down slowdown{label}", slow, "%", "info: everything spooled")
    by_rep = {(r["rep"], r["variant"]): r["wall"] for r in rows}
    reps = sorted({r["rep"] for r in rows})
    paired = median([(by_rep[k, "tracked"] / by_rep[k, "untracked"] - 1) * 100 for k in reps])
    sec.add(f"{pname} tracked slowdown{label}, paired", paired, "%", "median of per-rep ratios")
    fastest = min(walls["untracked"])
    for variant in ("tracked", "disabled"):
        slow = (min(walls[variant]) / fastest - 1) * 100
        sec.add(f"{pname} {variant} slowdown{label}, fastest", slow, "%", "fastest run vs fastest")


class _FakeStats:
    """What the callback reads from a GenerationStats, for the emit-cost calibration."""

    best, mean, worst, std, diversity, evaluations, generation = 1.0, 0.5, 0.1, 0.2, 0.3, 1, 0


def _emit_cost_us(obs: Any, calls: int) -> float:
    """Median main-thread CPU of one generation's ``obs.metrics`` call, in us."""
    cb = _callback(obs)
    stats = _FakeStats()
    samples = []
    with obs.run("emit-calibration", experiment="bench-overhead"):
        for _ in range(calls // 100):
            c0 = time.thread_time_ns()
            for _i in range(100):
                cb(stats)
            samples.append((time.thread_time_ns() - c0) / 100 / 1000)
    return median(samples)


def _measure(
    quick: bool, obs: Any, off: Any, down: Any, gens: int, reps: int
) -> tuple[list[dict[str, Any]], list[float], float]:
    from allele.observability.demo.ga import GAConfig, GeneticAlgorithm

    rows: list[dict[str, Any]] = []
    flush_s: list[float] = []
    exporter_cpu_s = 0.0
    for pname, problem in _problems():
        GeneticAlgorithm(problem, GAConfig(population_size=200, generations=gens)).run()
        for rep in range(reps):
            waited = settle(1.0 if quick else 3.0, QUIET_CORES)
            cfg = GAConfig(population_size=200, generations=gens, seed=SEED)
            order = VARIANTS[rep % 4 :] + VARIANTS[: rep % 4]
            for variant in order:
                clock = CpuClock()
                meter = LoadMeter()
                name = f"{pname}-{variant}-{rep}"
                wall, cpu, main_cpu = _one(problem, cfg, variant, obs, off, down, name)
                others = meter.read()["other_cores"]
                rows.append(
                    {
                        "problem": pname,
                        "rep": rep,
                        "variant": variant,
                        "wall": wall,
                        "process_cpu": cpu,
                        "main_thread_cpu": main_cpu,
                        "other_cores": others,
                        "settle_wait": waited,
                    }
                )
                if variant == "tracked":
                    tf = time.perf_counter()
                    if not obs.flush(60):
                        sec_error = f"{pname} rep {rep}: flush after a tracked run failed"
                        rows[-1]["error"] = sec_error
                    flush_s.append(time.perf_counter() - tf)
                    lap = clock.lap()
                    exporter_cpu_s += lap["process_cpu"] - lap["thread_cpu"]
        mine = [r for r in rows if r["problem"] == pname]
        m = {v: median([r["wall"] for r in mine if r["variant"] == v]) for v in VARIANTS}
        progress(
            f"overhead {pname}: untracked {m['untracked']:.3f} s, "
            f"tracked {100 * (m['tracked'] / m['untracked'] - 1):+.2f} %, "
            f"disabled {100 * (m['disabled'] / m['untracked'] - 1):+.2f} %"
        )
    return rows, flush_s, exporter_cpu_s


def run(quick: bool) -> Section:
    from allele.observability import Observability

    sec = Section("overhead")
    gens, reps = (100, 3) if quick else (400, 9)
    per_gen = 6
    sec.raw["config"] = {
        "population_size": 200,
        "generations": gens,
        "reps": reps,
        "metrics_per_generation": per_gen,
        "order": "rotated per repetition: UTD, TDU, DUT, ...",
        "seed": SEED,
        "quiet_cores": QUIET_CORES,
    }
    with temp_dir("overhead") as d:
        t0 = time.perf_counter()
        obs = Observability.from_env(
            tracking_uri=sqlite_uri(d), system_metrics_interval=0, spool_dir=str(d / "spool")
        )
        obs.start()
        with obs.run("warm-up", experiment="bench-overhead"):
            obs.metric("warm", 0.0, step=0)
        sec.raw["obs_warm_ok"] = obs.flush(180)
        sec.raw["obs_start_s"] = time.perf_counter() - t0
        off = Observability.from_env(enabled=False, spool_dir=str(d / "spool-off"))
        # A tracking server that is down: nothing listens on the port (connection refused).
        down = Observability.from_env(
            tracking_uri=f"http://127.0.0.1:{free_port()}",
            system_metrics_interval=0,
            export_timeout=1,
            spool_dir=str(d / "spool-down"),
        )
        down.start()
        delivered0 = obs.stats().metric.delivered
        rows, flush_s, exporter_cpu_s = _measure(quick, obs, off, down, gens, reps)
        down_stats = down.stats()
        down.close(timeout=5)
        stats = obs.stats()
        delivered = stats.metric.delivered - delivered0
        emit_us = _emit_cost_us(obs, 2000)
        closing = close_and_wait(obs, timeout=10.0)
        off.close()

    sec.raw.update(
        {
            "runs": rows,
            "flush_after_run_s": flush_s,
            "exporter_cpu_s": exporter_cpu_s,
            "metrics_delivered": delivered,
            "emit_cpu_us_per_generation": emit_us,
            "stats": stats.metric._asdict(),
            "close": closing,
            "server_down_stats": down_stats.metric._asdict(),
        }
    )
    sec.add(
        "server down: metrics spooled",
        down_stats.metric.spooled,
        "events",
        f"of {down_stats.metric.emitted} emitted; none dropped",
        down_stats.metric.dropped == 0,
    )
    for err in {r["error"] for r in rows if "error" in r}:
        sec.error("flush", err)
    for pname, _ in _problems():
        mine = [r for r in rows if r["problem"] == pname]
        base = [r["wall"] for r in mine if r["variant"] == "untracked"]
        spread = (max(base) - min(base)) / median(base) * 100
        sec.add(f"{pname} untracked", median(base), "s", f"median of {reps}, {gens} generations")
        sec.add(f"{pname} untracked spread", spread, "%", "(max - min) / median: same work")
        _slowdowns(sec, pname, mine, "", verdict=True)
        noisy = {r["rep"] for r in mine if r["other_cores"] >= QUIET_CORES}
        quiet = [r for r in mine if r["rep"] not in noisy]
        n_quiet = len({r["rep"] for r in quiet})
        sec.add(
            f"{pname} quiet repetitions",
            n_quiet,
            "reps",
            f"of {reps}: others < {QUIET_CORES} cores in all 3 runs",
        )
        if 3 <= n_quiet < reps:
            _slowdowns(sec, pname, quiet, ", quiet reps", verdict=True)
        for key, label in (("process_cpu", "all threads"), ("main_thread_cpu", "main thread")):
            cpu = {v: median([r[key] for r in mine if r["variant"] == v]) for v in VARIANTS}
            sec.add(
                f"{pname} tracked extra CPU, {label}",
                (cpu["tracked"] / cpu["untracked"] - 1) * 100,
                "%",
                "medians of CPU time during the timed run",
            )
    expected = len(_problems()) * reps * gens * per_gen
    cpu_us = exporter_cpu_s / delivered * 1e6 if delivered else float("nan")
    sec.add("exporter CPU in this process", cpu_us, "us/metric", "<= 10", cpu_us <= 10)
    sec.add("obs.metrics(6 summaries) per generation", emit_us, "us", "main-thread CPU")
    for pname, _ in _problems():
        gen_s = (
            median(
                [r["wall"] for r in rows if r["problem"] == pname and r["variant"] == "untracked"]
            )
            / gens
        )
        model = (emit_us + per_gen * cpu_us) / (gen_s * 1e6) * 100
        sec.add(
            f"{pname} modelled slowdown",
            model,
            "%",
            "(emit + 6 x exporter CPU) / generation time",
        )
    sec.add(
        "GA metrics delivered",
        delivered,
        "events",
        f"== {expected:,} emitted",
        delivered == expected,
    )
    sec.add("flush after a tracked run", median(flush_s), "s", "median, not timed")
    sec.add("close()", closing["close_returned_s"], "s", "not timed")
    return sec
