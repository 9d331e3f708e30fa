"""
Split a run's pending rows into ``log_batch`` requests within MLflow's limits.

Limits per request (MLflow 3): 1000 metrics, 100 params, 100 tags, 1000 entities in
all, and a request body of at most 1,000,000 characters. Params and tags go first so a
run's configuration lands before its bulk data.

When a store refuses some rows (``DeliveryError.per_row``), :func:`halves` splits the
batch until they are alone. :class:`Repeats` remembers, across attempts, how often the
same batch failed with a ``server_error`` (an SQLite overflow comes back as MLflow's
``INTERNAL_ERROR``, every time): at ``REPEAT_LIMIT`` it is isolated the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..backends.base import REPEAT_LIMIT, MetricRow, ParamRow, TagRow

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = (
    "MAX_ENTITIES",
    "MAX_METRICS",
    "MAX_PARAMS_TAGS",
    "MAX_REQUEST_CHARS",
    "Batch",
    "Repeats",
    "batch_identity",
    "halves",
    "split_batches",
)

MAX_METRICS = 1000
MAX_PARAMS_TAGS = 100
MAX_ENTITIES = 1000
MAX_REQUEST_CHARS = 1_000_000
#: JSON characters per metric beyond its key: braces, field names and the widest numbers
#: ({"key": , "value": -1.7976931348623157e+308, "timestamp": 13 digits, "step": 19 digits})
_METRIC_OVERHEAD = 110
#: JSON characters per param or tag beyond key and value
_KV_OVERHEAD = 30
#: headroom for the request envelope
_ENVELOPE = 2_000


@functools.lru_cache(maxsize=8192)  # metric keys repeat: computed once per key
def _json_len(text: str) -> int:
    """Characters ``text`` takes as a JSON string with ``ensure_ascii`` (the worst case)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return len(text) + 2
    return len(json.dumps(text))


Batch = tuple[list[MetricRow], list[ParamRow], list[TagRow]]


def split_batches(
    metrics: Sequence[MetricRow],
    params: Sequence[ParamRow],
    tags: Sequence[TagRow],
    *,
    max_metrics: int = MAX_METRICS,
) -> Iterator[Batch]:
    """
    Yield ``(metrics, params, tags)`` batches, each within every MLflow limit.

    Args:
        metrics: metric rows, in order.
        params: param rows.
        tags: tag rows.
        max_metrics: metrics per batch (``METRICS_BATCH_SIZE``), at most 1000.
    """
    if max_metrics < 1:
        raise ValueError(f"max_metrics must be >= 1, got {max_metrics}")
    max_metrics = min(max_metrics, MAX_METRICS)
    budget = MAX_REQUEST_CHARS - _ENVELOPE
    mi = pi = ti = 0
    nm, np_, nt = len(metrics), len(params), len(tags)
    while mi < nm or pi < np_ or ti < nt:
        bp: list[ParamRow] = []
        bt: list[TagRow] = []
        size = 0
        while pi < np_ and len(bp) < MAX_PARAMS_TAGS:
            k, v = params[pi]
            cost = _json_len(k) + _json_len(v) + _KV_OVERHEAD
            if bp and size + cost > budget:
                break
            bp.append(params[pi])
            size += cost
            pi += 1
        while ti < nt and len(bt) < MAX_PARAMS_TAGS and len(bp) + len(bt) < MAX_ENTITIES:
            k, v = tags[ti]
            cost = _json_len(k) + _json_len(v) + _KV_OVERHEAD
            if (bp or bt) and size + cost > budget:
                break
            bt.append(tags[ti])
            size += cost
            ti += 1
        # Configuration first: a request with params or tags carries metrics only once
        # every param and tag has been placed.
        room = 0 if pi < np_ or ti < nt else min(max_metrics, MAX_ENTITIES - len(bp) - len(bt))
        end = mi
        limit = min(nm, mi + room)
        while end < limit:
            cost = _json_len(metrics[end][0]) + _METRIC_OVERHEAD
            if size + cost > budget:
                break
            size += cost
            end += 1
        yield list(metrics[mi:end]), bp, bt
        mi = end


def halves(metrics: list[MetricRow], params: list[ParamRow], tags: list[TagRow]) -> list[Batch]:
    """Split a batch into two of (nearly) equal size, to isolate the rows a store rejects."""
    rows: list[tuple[str, Any]] = (
        [("m", r) for r in metrics] + [("p", r) for r in params] + [("t", r) for r in tags]
    )
    mid = len(rows) // 2
    return [
        (
            [r for c, r in part if c == "m"],
            [r for c, r in part if c == "p"],
            [r for c, r in part if c == "t"],
        )
        for part in (rows[:mid], rows[mid:])
    ]


def batch_identity(*parts: Any) -> str:
    """A stable name for a request's content (run key, rows, ...), to count its failures."""
    text = json.dumps(parts, default=repr, separators=(",", ":"), allow_nan=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class Repeats:
    """
    Failed attempts per batch identity, bounded (the oldest are forgotten first).

    Args:
        limit: attempts after which :meth:`failed` says "isolate it".
        capacity: identities remembered.
    """

    def __init__(self, limit: int = REPEAT_LIMIT, capacity: int = 1024) -> None:
        self.limit = limit
        self._capacity = capacity
        self._counts: OrderedDict[str, int] = OrderedDict()

    def failed(self, identity: str) -> int:
        """Count one more failure of ``identity``; return how many it has had."""
        n = self._counts.pop(identity, 0) + 1
        self._counts[identity] = n
        while len(self._counts) > self._capacity:
            self._counts.popitem(last=False)
        return n

    def exhausted(self, identity: str) -> bool:
        """Count one more failure; whether ``identity`` has now failed ``limit`` times."""
        return self.failed(identity) >= self.limit

    def forget(self, identity: str) -> None:
        """The batch was delivered or isolated: start from zero."""
        self._counts.pop(identity, None)
