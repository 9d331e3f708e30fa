"""
Section ``overhead`` (DESIGN promise 3): a real GA workload, tracked vs untracked.

The project's GA (``allele.observability.demo._ga``) runs each problem three ways:
untracked (no callback at all), tracked (``obs.metrics`` of six per-generation summaries
into a real exporter delivering to sqlite, default flush interval) and tracked with
``enabled=False``. Repetitions are interleaved and the order rotates every repetition
(UTD, TDU, DUT, ...); within a repetition every variant uses the same seed, so they do the
same work. Only ``ga.run()`` (inside ``with obs.run(...)`` for the tracked variants) is
timed; ``Observability`` start-up, the flush after each run and ``close()`` are not, and
are reported separately.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from _common import CpuClock, Section, close_and_wait, median, progress, sqlite_uri, temp_dir

VARIANTS = ("untracked", "tracked", "disabled")


def _problems() -> list[tuple[str, Any]]:
    from allele.observability.demo._ga import OneMax, Rastrigin

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
    problem: Any, cfg: Any, variant: str, obs: Any, off: Any, name: str
) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) of one GA run."""
    from allele.observability.demo._ga import GeneticAlgorithm

    ga = GeneticAlgorithm(problem, cfg)
    gc.collect()
    if variant == "untracked":
        c0, t0 = time.process_time(), time.perf_counter()
        ga.run()
        return time.perf_counter() - t0, time.process_time() - c0
    target = obs if variant == "tracked" else off
    cb = _callback(target)
    c0, t0 = time.process_time(), time.perf_counter()
    with target.run(name, experiment="bench-overhead", params={"seed": cfg.seed}):
        ga.run(cb)
    return time.perf_counter() - t0, time.process_time() - c0


def run(quick: bool) -> Section:
    from allele.observability import Observability
    from allele.observability.demo._ga import GAConfig, GeneticAlgorithm

    sec = Section("overhead")
    gens, reps = (100, 3) if quick else (400, 7)
    per_gen = 6
    sec.raw["config"] = {
        "population_size": 200,
        "generations": gens,
        "reps": reps,
        "metrics_per_generation": per_gen,
        "order": "rotated per repetition: UTD, TDU, DUT, ...",
    }
    with temp_dir("overhead") as d:
        t0 = time.perf_counter()
        obs = Observability.from_env(
            tracking_uri=sqlite_uri(d), system_metrics_interval=0, spool_dir=str(d / "spool")
        )
        obs.start()
        with obs.run("warm-up", experiment="bench-overhead"):
            obs.metric("warm", 0.0, step=0)
        warm_ok = obs.flush(180)
        sec.raw["obs_start_s"] = time.perf_counter() - t0
        sec.raw["obs_warm_ok"] = warm_ok
        off = Observability.from_env(enabled=False, spool_dir=str(d / "spool-off"))
        results: dict[str, Any] = {}
        cpu_results: dict[str, Any] = {}
        flush_s: list[float] = []
        exporter_cpu_s = 0.0
        delivered0 = obs.stats().metric.delivered
        for pname, problem in _problems():
            walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
            cpus: dict[str, list[float]] = {v: [] for v in VARIANTS}
            GeneticAlgorithm(problem, GAConfig(population_size=200, generations=gens)).run()
            for rep in range(reps):
                cfg = GAConfig(population_size=200, generations=gens, seed=rep)
                order = VARIANTS[rep % 3 :] + VARIANTS[: rep % 3]
                for variant in order:
                    clock = CpuClock()
                    wall, cpu = _one(problem, cfg, variant, obs, off, f"{pname}-{variant}-{rep}")
                    walls[variant].append(wall)
                    cpus[variant].append(cpu)
                    if variant == "tracked":
                        tf = time.perf_counter()
                        ok = obs.flush(60)
                        flush_s.append(time.perf_counter() - tf)
                        lap = clock.lap()
                        exporter_cpu_s += lap["process_cpu"] - lap["thread_cpu"]
                        if not ok:
                            sec.error(f"{pname} flush", "flush after a tracked run failed")
            results[pname] = walls
            cpu_results[pname] = cpus
            m = {v: median(walls[v]) for v in VARIANTS}
            progress(
                f"overhead {pname}: untracked {m['untracked']:.3f} s, "
                f"tracked {100 * (m['tracked'] / m['untracked'] - 1):+.2f} %, "
                f"disabled {100 * (m['disabled'] / m['untracked'] - 1):+.2f} %"
            )
        stats = obs.stats()
        delivered = stats.metric.delivered - delivered0
        closing = close_and_wait(obs, timeout=10.0)
        off.close()

    sec.raw["walls_s"] = results
    sec.raw["process_cpu_s"] = cpu_results
    sec.raw["flush_after_run_s"] = flush_s
    sec.raw["exporter_cpu_s"] = exporter_cpu_s
    sec.raw["metrics_delivered"] = delivered
    sec.raw["stats"] = stats.metric._asdict()
    sec.raw["close"] = closing
    for pname, walls in results.items():
        base = median(walls["untracked"])
        spread = (max(walls["untracked"]) - min(walls["untracked"])) / base * 100
        sec.add(f"{pname} untracked", base, "s", f"median of {reps}, {gens} generations")
        sec.add(f"{pname} untracked spread", spread, "%", "(max - min) / median: noise")
        for variant in ("tracked", "disabled"):
            slow = (median(walls[variant]) / base - 1) * 100
            sec.add(f"{pname} {variant} slowdown", slow, "%", "< 1", slow < 1)
        paired = median(
            [(t / u - 1) * 100 for t, u in zip(walls["tracked"], walls["untracked"], strict=True)]
        )
        sec.add(f"{pname} tracked slowdown, paired", paired, "%", "median of per-rep ratios")
        cpus = cpu_results[pname]
        cpu_slow = (median(cpus["tracked"]) / median(cpus["untracked"]) - 1) * 100
        sec.add(
            f"{pname} tracked extra CPU",
            cpu_slow,
            "%",
            "process_time, all threads: load-robust",
        )
    expected = len(results) * reps * gens * per_gen
    if delivered:
        cpu = exporter_cpu_s / delivered * 1e6
        sec.add("exporter CPU in this process", cpu, "us/metric", "<= 10", cpu <= 10)
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
