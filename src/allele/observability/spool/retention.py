"""
Retention of a spool directory: old local files are deleted, live segments never.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..sinks.deadletter import DEAD_LETTER_FILE
from .safety import ARTIFACTS
from .segments import REPLAYED, SEGMENTS, TRACEBACKS, children

__all__ = ("prune",)


def prune(directory: Path, *, older_than_days: float, now: float | None = None) -> list[Path]:
    """
    Delete local files older than the retention limit; live segments are never touched.

    Removes replayed segments, the dead-letter file, entries of ``tracebacks/`` and
    ``artifacts/`` (a folder goes when everything in it is old, itself included), and
    leftover temporary and resume-offset files whose segment is gone.

    Args:
        directory: the spool directory.
        older_than_days: remove what was last modified longer ago than this.
        now: the current time in seconds since the epoch; defaults to ``time.time()``.

    Returns:
        The paths removed.
    """
    if older_than_days < 0:
        raise ValueError(f"older_than_days must be >= 0, got {older_than_days}")
    cutoff = (time.time() if now is None else now) - older_than_days * 86400
    directory = Path(directory)
    candidates = [*children(directory / REPLAYED), directory / DEAD_LETTER_FILE]
    candidates += children(directory / TRACEBACKS) + children(directory / ARTIFACTS)
    candidates += [
        path
        for path in children(directory / SEGMENTS)
        if (path.name.startswith(".") and path.name.endswith(".tmp"))
        or (path.name.endswith(".spool.offset") and not path.with_suffix("").exists())
    ]
    removed = []
    for path in candidates:
        try:
            stamps = [path.lstat().st_mtime]
            if path.is_dir() and not path.is_symlink():
                for root, _, files in os.walk(path):
                    stamps += [os.lstat(os.path.join(root, f)).st_mtime for f in files]
            if max(stamps) >= cutoff:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed
