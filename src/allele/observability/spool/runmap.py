"""
Run key to MLflow run id, shared by the processes of one spool directory.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from .._core.files import open_private, private_dir

__all__ = ("RUN_MAP_FILE", "RunMap")

logger = logging.getLogger("allele.observability")

RUN_MAP_FILE = "runs.jsonl"


class RunMap:
    """
    Run key to MLflow run id, kept in memory and appended to ``<spool>/runs.jsonl`` (mode
    0600), so a replay by another process finds runs created by this one without
    searching the store.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / RUN_MAP_FILE
        self._lock = threading.Lock()
        self._map: dict[str, str] = {}
        self._loaded_size = -1

    def get(self, key: str) -> str | None:
        """Return the run id of ``key`` if known here or on disk."""
        found = self._map.get(key)
        if found is None:
            self._reload()
            found = self._map.get(key)
        return found

    def put(self, key: str, run_id: str) -> None:
        """Remember a run id (in memory and on disk)."""
        with self._lock:
            if self._map.get(key) == run_id:
                return
            self._map[key] = run_id
            try:
                private_dir(self.path.parent)
                fd = open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                with os.fdopen(fd, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"key": key, "run_id": run_id}) + "\n")
            except OSError as exc:
                logger.warning("allele-observability: cannot write %s: %s", self.path, exc)

    def _reload(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size == self._loaded_size:
            return
        with self._lock, self.path.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    item = json.loads(line)
                    self._map.setdefault(item["key"], item["run_id"])
                except (ValueError, KeyError, TypeError):
                    continue
            self._loaded_size = size
