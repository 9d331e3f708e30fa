"""
Alerts and phases as MLflow sees them (the storage contract of ``docs/alerts.md``).

For each run an alert hits:

- artifact ``allele/alerts/alerts-<seq>-<ms>.jsonl``: one JSON record per alert, a new
  chunk per delivery (a record whose ``occurrences`` grew later appears again, updated);
- metric ``allele.alerts.<severity>``: the run's cumulative count, at the alert's step, so
  the MLflow UI charts alerts next to fitness;
- tags ``allele.alerts.total``, ``allele.alerts.<severity>`` and
  ``allele.alerts.name.<name>``: counts, so ``search_runs`` can filter on them.

Phases: artifact ``allele/phases/phases-<seq>-<ms>.jsonl``, one record per ended phase.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._core.files import open_private, private_dir
from .record import alert_key

if TYPE_CHECKING:
    from .._core.runs import Run
    from .record import AlertRecord

__all__ = (
    "ALERTS_DIR",
    "COPY",
    "PHASES_DIR",
    "PRIMARY",
    "UPDATE",
    "AlertChunk",
    "prepare_alerts",
    "write_chunk",
)

ALERTS_DIR = "allele/alerts"
PHASES_DIR = "allele/phases"
_seq = itertools.count(1)


class AlertChunk:
    """Alerts of one run, ready to store: records, derived metrics and count tags."""

    __slots__ = ("metrics", "primary", "records", "tags")

    def __init__(
        self,
        records: list[dict[str, Any]],
        metrics: list[tuple[str, float, int, int]],
        tags: list[tuple[str, str]],
        primary: int,
    ) -> None:
        self.records = records
        self.metrics = metrics
        self.tags = tags
        #: how many of the records count as this run's alert events (the rest are copies
        #: of alerts raised elsewhere, or updated occurrence counts)
        self.primary = primary


def _run_id(run: Run | None) -> str | None:
    return None if run is None else run.created_id


#: an alert entry's role in a run: the alert itself (an event of kind "alert"), a copy
#: in another run it correlates to, or an updated occurrence count of one already stored
PRIMARY, COPY, UPDATE = "primary", "copy", "update"


def prepare_alerts(
    alerts: list[tuple[AlertRecord, int, str]], counts: dict[str, int]
) -> AlertChunk:
    """
    Turn ``(record, step, role)`` entries of one run into a chunk; ``counts`` (the run's
    running counts, updated here) give the cumulative metric values and the tags.
    """
    records = []
    metrics: list[tuple[str, float, int, int]] = []
    primary = 0
    for record, step, role in alerts:
        records.append(record.to_json(_run_id))
        if role == UPDATE:
            continue
        if role == PRIMARY:
            primary += 1
        sev = record.severity
        counts["total"] = counts.get("total", 0) + 1
        counts[sev] = counts.get(sev, 0) + 1
        name_key = "name." + alert_key(record.name)  # checked at the call: cannot fail
        counts[name_key] = counts.get(name_key, 0) + 1
        metrics.append((f"allele.alerts.{sev}", float(counts[sev]), record.time, step))
    tags = [(f"allele.alerts.{k}", str(v)) for k, v in counts.items()]
    return AlertChunk(records, metrics, tags, primary)


def write_chunk(directory: Path, run_key: str, kind: str, records: list[dict[str, Any]]) -> str:
    """Write records as JSON lines to a new chunk file (0600, folders 0700); return its path."""
    folder = private_dir(Path(directory) / "annotations" / run_key)
    path = folder / f"{kind}-{next(_seq):06d}-{time.time_ns() // 1_000_000}.jsonl"
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, allow_nan=True, default=str) + "\n")
    return str(path)
