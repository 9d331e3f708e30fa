"""
System metrics (CPU, memory, ...) sampled by the exporter into every open run's backlog.

Supervised like the rest of the exporter: a psutil error skips one sample (counted, logged
once); after :data:`SYSTEM_FAILURES_MAX` failures in a row system metrics are disabled
for the process, with one warning. Delivery is not affected either way.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from .._core.accounting import Accounting
    from .._core.runs import RunRegistry
    from .backlog import Router
    from .isolation import Isolation

__all__ = ("SYSTEM_FAILURES_MAX", "sample_system")

logger = logging.getLogger("allele.observability")

#: consecutive failed samples before system metrics are disabled
SYSTEM_FAILURES_MAX = 5


async def sample_system(
    interval: float,
    runs: RunRegistry,
    router: Router,
    accounting: Accounting,
    isolation: Isolation,
) -> None:
    """Every ``interval`` seconds, add one sample to the backlog of every open run."""
    from ..sources.system import SystemSampler

    try:
        sampler = SystemSampler()
    except Exception as exc:  # psutil cannot read this system
        isolation.report("system metrics (disabled)", exc)
        return
    failures = 0
    while True:
        await anyio.sleep(interval)
        open_runs = runs.open_runs()
        if not open_runs:
            continue
        try:
            values = sampler.sample()
        except Exception as exc:  # a psutil error skips one sample
            failures += 1
            isolation.report("system metrics", exc)
            if failures >= SYSTEM_FAILURES_MAX:
                logger.warning(
                    "allele-observability: system metrics failed %d times in a row; "
                    "they are disabled for this process",
                    failures,
                )
                return
            continue
        failures = 0
        ts = time.time_ns() // 1_000_000
        with accounting.lock:  # moved and counted in one step
            for run in open_runs:
                rows = [(k, v, ts, run.step) for k, v in values.items()]
                router.backlog(run).system.extend(rows)
                accounting.drained["system"] += len(rows)
                accounting.received(run, len(rows))
