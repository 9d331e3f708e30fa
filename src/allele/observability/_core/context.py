"""
Context that follows the code: the current run and phase, per thread and per async task.

Contextvars give each thread and each asyncio/anyio task its own current run, so four
threads can each log into their own run without locks. Threads started inside a run do
not inherit contextvars; the bus then falls back to the process's current top-level run
(see ``RunTracker.fallback``).
"""

from __future__ import annotations

import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runs import Run

__all__ = ("CURRENT_PHASES", "CURRENT_RUN", "program_name")

#: the run events are stamped with
CURRENT_RUN: ContextVar[Run | None] = ContextVar("allele_current_run", default=None)
#: the phase path (outermost first) of the current context
CURRENT_PHASES: ContextVar[tuple[str, ...]] = ContextVar("allele_phases", default=())


def program_name() -> str:
    """The name of the running program, as MLflow's fluent API would name its run."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if argv0 in ("", "-", "-c", "-m"):
        return "python"
    stem = Path(argv0).stem
    if stem == "__main__":
        stem = Path(argv0).parent.name or "python"
    return stem or os.path.basename(sys.executable)
