"""
Run the benchmarks: print a table, write JSON.

    .venv/bin/python benchmarks/run.py [--quick] [--only emit throughput overhead] [--json PATH]

Every figure is measured next to its anchors in the same run; see docs/performance.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    LoadMeter,
    Section,
    json_safe,
    machine_info,
    progress,
    quiet_logs,
    settle,
    table,
)

SECTIONS = ("emit", "alerts", "throughput", "overhead")
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


def _run_section(name: str, quick: bool) -> Section:
    if name == "emit":
        import _emit

        return _emit.run(quick)
    if name == "alerts":
        import _alerts

        return _alerts.run(quick)
    if name == "throughput":
        import _throughput

        return _throughput.run(quick)
    import _overhead

    return _overhead.run(quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (< 2 minutes)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="NAME", help="sections")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="output JSON path")
    args = parser.parse_args(argv)

    quiet_logs()
    started = time.perf_counter()
    info = machine_info()
    progress(f"{info['platform']}, {info['cpu_count']} CPUs, Python {info['python']}")
    sections: list[Section] = []
    for name in args.only or SECTIONS:
        progress(f"section {name} ({'quick' if args.quick else 'full'})")
        waited = settle(5.0 if args.quick else 20.0)
        if waited > 0.5:
            progress(f"waited {waited:.0f} s for other processes to leave a core free")
        t0 = time.perf_counter()
        load = LoadMeter()
        try:
            sec = _run_section(name, args.quick)
        except Exception as exc:
            traceback.print_exc()
            sec = Section(name)
            sec.error("section", exc)
        sec.seconds = time.perf_counter() - t0
        sec.raw["machine_load"] = used = load.read(sec.raw.get("unreaped_cpu_s", 0.0))
        used["settle_wait_s"] = waited
        sec.add(
            "other processes' CPU during section",
            used["other_cores"],
            "cores",
            f"of {info['cpu_count']}; this benchmark: {used['own_cores']:.2f}",
        )
        progress(
            f"section {name}: {sec.seconds:.0f} s, others used {used['other_cores']:.2f} cores"
        )
        sections.append(sec)
        gc.collect()

    figures = [f for s in sections for f in s.figures]
    total = time.perf_counter() - started
    verdicts = [f.passed for f in figures if f.passed is not None]
    summary = {
        "passed": sum(1 for v in verdicts if v),
        "failed": sum(1 for v in verdicts if not v),
        "seconds": round(total, 1),
    }
    mode = "quick" if args.quick else "full"
    result: dict[str, Any] = {
        "machine": info,
        "mode": mode,
        "sections": {s.name: s.to_json() for s in sections},
        "summary": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(json_safe(result), indent=1) + "\n")

    print()
    print(
        f"allele-observability benchmarks ({mode}), {info['date']}, "
        f"{info['cpu_count']} CPUs {info['cpu_model']}, Python {info['python']}, "
        f"MLflow {info['mlflow']}"
    )
    print()
    print(table(figures))
    print()
    print(
        f"{summary['passed']} passed, {summary['failed']} failed in {total:.0f} s; "
        f"JSON: {args.json}"
    )
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main()
    # MLflow's async-logging threads have hung interpreters at exit (mlflow/mlflow#20575):
    # everything is written and flushed, so leave without waiting for them.
    sys.stderr.flush()
    os._exit(code)
