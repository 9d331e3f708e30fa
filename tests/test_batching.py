"""split_batches: every log_batch request within MLflow's limits, rows kept in order."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from allele.observability.backends.base import MetricRow, ParamRow, TagRow
from allele.observability.sinks.batching import Batch, split_batches

RUN_ID = "0123456789abcdef0123456789abcdef"
#: the widest numbers a metric row can carry
WIDE_VALUE = -1.7976931348623157e308
WIDE_TS = 1_700_000_000_000
WIDE_STEP = -(2**63)


def _request_chars(batch: Batch) -> int:
    """The size of the MLflow ``runs/log-batch`` JSON body for one batch."""
    metrics, params, tags = batch
    body = {
        "run_id": RUN_ID,
        "metrics": [{"key": k, "value": v, "timestamp": t, "step": s} for k, v, t, s in metrics],
        "params": [{"key": k, "value": v} for k, v in params],
        "tags": [{"key": k, "value": v} for k, v in tags],
    }
    return len(json.dumps(body))


def _metrics(n: int, key_len: int = 12) -> list[MetricRow]:
    return [(f"m{i:05d}".ljust(key_len, "k"), WIDE_VALUE, WIDE_TS + i, WIDE_STEP) for i in range(n)]


def _kv(prefix: str, n: int, value_len: int, char: str = "a") -> list[tuple[str, str]]:
    return [(f"{prefix}{i:04d}", char * value_len) for i in range(n)]


def _shape(batch: Batch) -> tuple[int, int, int]:
    return len(batch[0]), len(batch[1]), len(batch[2])


def _check_limits(batches: list[Batch], max_metrics: int = 1000) -> None:
    for batch in batches:
        metrics, params, tags = batch
        assert metrics or params or tags, "empty batch"
        assert len(metrics) <= min(max_metrics, 1000)
        assert len(params) <= 100
        assert len(tags) <= 100
        assert len(metrics) + len(params) + len(tags) <= 1000
        assert _request_chars(batch) <= 1_000_000


def _check_preserved(
    batches: list[Batch],
    metrics: Sequence[MetricRow],
    params: Sequence[ParamRow],
    tags: Sequence[TagRow],
) -> None:
    assert list(metrics) == [row for b in batches for row in b[0]]
    assert list(params) == [row for b in batches for row in b[1]]
    assert list(tags) == [row for b in batches for row in b[2]]


def _check_config_is_a_prefix(batches: list[Batch]) -> None:
    """Batches carrying params or tags come before every batch that carries only metrics."""
    flags = [bool(b[1] or b[2]) for b in batches]
    assert flags == sorted(flags, reverse=True)


def test_nothing_in_nothing_out() -> None:
    """No rows yield no batch (no empty log_batch request)."""

    assert [] == list(split_batches([], [], []))


@pytest.mark.parametrize(
    ("n", "max_metrics", "expected"),
    [
        (2500, 1000, [1000, 1000, 500]),
        (1000, 1000, [1000]),
        (1001, 1000, [1000, 1]),
        (10, 3, [3, 3, 3, 1]),
        (250, 100, [100, 100, 50]),
        (2500, 5000, [1000, 1000, 500]),
    ],
)
def test_metrics_split_by_max_metrics(n: int, max_metrics: int, expected: list[int]) -> None:
    """Metrics fill batches of max_metrics (capped at MLflow's 1000), the rest in the last."""
    metrics = _metrics(n)

    batches = list(split_batches(metrics, [], [], max_metrics=max_metrics))

    assert expected == [len(b[0]) for b in batches]
    _check_preserved(batches, metrics, [], [])
    _check_limits(batches, max_metrics)


def test_small_config_rides_in_the_first_batch() -> None:
    """Params and tags that fit go in the first request; metrics fill the 1000-entity room."""
    metrics, params, tags = _metrics(1500), _kv("p", 10, 20), _kv("t", 5, 20)

    batches = list(split_batches(metrics, params, tags))

    assert [(985, 10, 5), (515, 0, 0)] == [_shape(b) for b in batches]
    _check_preserved(batches, metrics, params, tags)


def test_params_and_tags_split_by_count() -> None:
    """More than 100 params or tags are spread over requests of at most 100 each."""
    params, tags = _kv("p", 250, 5), _kv("t", 130, 5)

    batches = list(split_batches([], params, tags))

    assert [(0, 100, 100), (0, 100, 30), (0, 50, 0)] == [_shape(b) for b in batches]
    _check_preserved(batches, [], params, tags)


def test_entity_limit_counts_params_tags_and_metrics() -> None:
    """Params and tags take room from the metrics: no request carries over 1000 entities."""
    metrics, params, tags = _metrics(3000), _kv("p", 100, 1), _kv("t", 100, 1)

    batches = list(split_batches(metrics, params, tags, max_metrics=1000))

    assert [800, 1000, 1000, 200] == [len(b[0]) for b in batches]
    _check_limits(batches)
    _check_preserved(batches, metrics, params, tags)


def test_largest_values_are_split_by_size() -> None:
    """100 params of 6000 chars and 100 tags of 8000 chars exceed 1,000,000 chars: split."""
    metrics = _metrics(1000, key_len=250)
    params, tags = _kv("p", 100, 6000), _kv("t", 100, 8000)

    batches = list(split_batches(metrics, params, tags))

    assert len(batches) > 1
    _check_limits(batches)
    _check_preserved(batches, metrics, params, tags)
    _check_config_is_a_prefix(batches)


@st.composite
def _rows(draw: st.DrawFn) -> tuple[list[MetricRow], list[ParamRow], list[TagRow], int]:
    n_metrics = draw(st.integers(0, 2500))
    key_len = draw(st.integers(6, 250))
    # ASCII that JSON copies as is (escaped values: see the test below).
    char = draw(st.sampled_from(["a", " ", "~", "/"]))
    param_lens = draw(st.lists(st.integers(0, 6000), max_size=220))
    tag_lens = draw(st.lists(st.integers(0, 8000), max_size=220))
    max_metrics = draw(st.integers(1, 1200))
    params = [(f"p{i:04d}", char * n) for i, n in enumerate(param_lens)]
    tags = [(f"t{i:04d}", char * n) for i, n in enumerate(tag_lens)]
    return _metrics(n_metrics, key_len), params, tags, max_metrics


@given(_rows())
@example((_metrics(1000, 250), _kv("p", 100, 6000), _kv("t", 100, 8000), 1000))
@example((_metrics(0), _kv("p", 100, 6000), _kv("t", 100, 8000), 1000))
@example((_metrics(2999, 250), _kv("p", 101, 6000), _kv("t", 201, 8000), 7))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_rows_fit_mlflow_limits(
    rows: tuple[list[MetricRow], list[ParamRow], list[TagRow], int],
) -> None:
    """For any sizes: limits and JSON size held, every row once and in order, config first."""
    metrics, params, tags, max_metrics = rows

    batches = list(split_batches(metrics, params, tags, max_metrics=max_metrics))

    _check_limits(batches, max_metrics)
    _check_preserved(batches, metrics, params, tags)
    _check_config_is_a_prefix(batches)


def test_configuration_lands_before_bulk_data() -> None:
    """No metric is sent before the last request that carries a param or tag."""
    metrics = _metrics(1000)
    params, tags = _kv("p", 100, 6000), _kv("t", 100, 8000)

    batches = list(split_batches(metrics, params, tags))

    last_config = max(i for i, b in enumerate(batches) if b[1] or b[2])
    first_metric = min(i for i, b in enumerate(batches) if b[0])
    assert first_metric >= last_config


@pytest.mark.parametrize(
    ("metrics", "params", "tags"),
    [
        pytest.param([], [], _kv("t", 100, 8000, "\u00e9"), id="tags-non-ascii"),
        pytest.param([], _kv("p", 100, 6000, "\x01"), [], id="params-control-chars"),
        pytest.param(
            _metrics(1000, 250),
            _kv("p", 100, 6000, '"'),
            _kv("t", 100, 8000, "\\"),
            id="quotes-and-wide-metrics",
        ),
        pytest.param(
            [("\u00e9" * 250, WIDE_VALUE, WIDE_TS, WIDE_STEP)] * 1000, [], [], id="metric-keys"
        ),
    ],
)
def test_escaped_requests_fit_the_size_limit(
    metrics: list[MetricRow], params: list[ParamRow], tags: list[TagRow]
) -> None:
    """Values JSON escapes to several characters still give requests <= 1,000,000 chars."""
    batches = list(split_batches(metrics, params, tags))

    assert all(_request_chars(b) <= 1_000_000 for b in batches)
