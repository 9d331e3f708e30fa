"""
Dead letters: events the store rejected for good, kept on disk with the reason.

One JSON object per line in ``<SPOOL_DIR>/dead-letters.jsonl`` (mode 0600)::

    {"time": ..., "kind": "param", "run_key": ..., "run_name": ..., "run_id": ...,
     "reason": "rejected", "message": "...", "rows": [["lr", "0.2"]]}

The file is append-only; ``allele-obs`` reads it, and ``ARTIFACT_RETENTION_DAYS`` prunes
old files at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._core.files import open_private, private_dir

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._core.runs import Run
    from ..backends.base import DeliveryError

__all__ = ("DEAD_LETTER_FILE", "DeadLetters")

DEAD_LETTER_FILE = "dead-letters.jsonl"
logger = logging.getLogger("allele.observability")


class DeadLetters:
    """
    Appends rejected events to the dead-letter file.

    Args:
        directory: the spool directory; created on first use (0700; the file is 0600).
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / DEAD_LETTER_FILE
        self._lock = threading.Lock()

    def write(self, kind: str, run: Run, rows: Sequence[Any], err: DeliveryError) -> None:
        """Append one record; an I/O error is logged, never raised."""
        record = {
            "time": time.time(),
            "kind": kind,
            "run_key": run.key,
            "run_name": run.name,
            "run_id": run.created_id,
            "reason": err.reason,
            "message": err.message,
            "rows": [list(r) if isinstance(r, tuple) else r for r in rows],
        }
        self.append(record)

    def append(self, record: dict[str, Any]) -> None:
        """Append one JSON-ready record; an I/O error is logged, never raised."""
        line = json.dumps(record, default=str, allow_nan=True) + "\n"
        try:
            with self._lock:
                private_dir(self.path.parent)
                fd = open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                with os.fdopen(fd, "a", encoding="utf-8") as fh:
                    fh.write(line)
        except OSError as exc:
            logger.warning(
                "allele-observability: cannot write dead letter to %s: %s", self.path, exc
            )

    def read(self) -> list[dict[str, Any]]:
        """Return every record (for the CLI and tests)."""
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
