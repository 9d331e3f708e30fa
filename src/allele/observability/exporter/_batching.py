"""
Split a run's pending rows into ``log_batch`` requests within MLflow's limits.

Limits per request (MLflow 3): 1000 metrics, 100 params, 100 tags, 1000 entities in
all, and a request body of at most 1,000,000 characters. Params and tags go first so a
run's configuration lands before its bulk data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..sinks._base import MetricRow, ParamRow, TagRow

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = ("MAX_ENTITIES", "MAX_METRICS", "MAX_PARAMS_TAGS", "MAX_REQUEST_CHARS", "split_batches")

MAX_METRICS = 1000
MAX_PARAMS_TAGS = 100
MAX_ENTITIES = 1000
MAX_REQUEST_CHARS = 1_000_000
#: JSON overhead per entity beyond key and value (braces, field names, numbers)
_METRIC_OVERHEAD = 80
_KV_OVERHEAD = 30
#: headroom for the request envelope
_ENVELOPE = 2_000

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
            cost = len(k) + len(v) * 2 + _KV_OVERHEAD  # x2: JSON escaping headroom
            if bp and size + cost > budget:
                break
            bp.append(params[pi])
            size += cost
            pi += 1
        while ti < nt and len(bt) < MAX_PARAMS_TAGS and len(bp) + len(bt) < MAX_ENTITIES:
            k, v = tags[ti]
            cost = len(k) + len(v) * 2 + _KV_OVERHEAD
            if (bp or bt) and size + cost > budget:
                break
            bt.append(tags[ti])
            size += cost
            ti += 1
        room = min(max_metrics, MAX_ENTITIES - len(bp) - len(bt))
        end = mi
        limit = min(nm, mi + room)
        while end < limit:
            cost = len(metrics[end][0]) + _METRIC_OVERHEAD
            if size + cost > budget:
                break
            size += cost
            end += 1
        yield list(metrics[mi:end]), bp, bt
        mi = end
