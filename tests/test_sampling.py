"""Sampling on the hot path: known answers for every/max_per_second and their accounting."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allele.observability import Observability, SamplingRule
from allele.observability.testing import InMemoryBackend

#: explicit timestamps (seconds): exact in binary, so the token bucket has no rounding
T0 = 1_700_000_000.0
T0_MS = 1_700_000_000_000
NAN = float("nan")


@pytest.fixture(name="backend")
def _backend() -> InMemoryBackend:
    return InMemoryBackend()


def _obs(backend: InMemoryBackend, **overrides: Any) -> Observability:
    return Observability(
        backend_factory=lambda _settings: backend, system_metrics_interval=0, **overrides
    )


def _steps(backend: InMemoryBackend, run_id: str | None, key: str) -> list[int]:
    assert run_id is not None
    return [step for _value, step in backend.metric_history(run_id, key)]


def _sampled_tag(backend: InMemoryBackend, run_id: str | None) -> str:
    assert run_id is not None
    return str(backend.runs[run_id]["tags"]["allele.telemetry.sampled_out"])


def _every_10(backend: InMemoryBackend) -> Observability:
    return _obs(backend, sampling={"fit*": SamplingRule(every=10)})


def test_every_n_keeps_points_0_n_2n(backend: InMemoryBackend) -> None:
    """every=10 delivers steps 0, 10, 20 of a flat series while the run is open."""
    obs = _every_10(backend)
    with obs, obs.run("r") as run:
        for i in range(25):
            obs.metric("fitness", 1.0, step=i)
        assert obs.flush(10)

        assert [0, 10, 20] == _steps(backend, run.run_id, "fitness")


def test_last_point_delivered_at_run_end(backend: InMemoryBackend) -> None:
    """The latest skipped point is held, then delivered when the run ends."""
    obs = _every_10(backend)
    with obs:
        with obs.run("r") as run:
            for i in range(25):
                obs.metric("fitness", 1.0, step=i)
        assert obs.flush(10)

        assert [0, 10, 20, 24] == _steps(backend, run.run_id, "fitness")


def test_sampled_out_counted_before_and_after_run_end(backend: InMemoryBackend) -> None:
    """Skipped points are sampled_out, the held one pending; balanced; the run's tag agrees."""
    obs = _every_10(backend)
    with obs:
        with obs.run("r") as run:
            for i in range(25):
                obs.metric("fitness", 1.0, step=i)
            assert obs.flush(10)
            during = obs.stats()
        assert obs.flush(10)
        after = obs.stats()

        assert (25, 3, 21, 1) == (
            during.metric.emitted,
            during.metric.delivered,
            during.metric.sampled_out,
            during.metric.pending,
        )
        assert during.is_balanced()
        assert (25, 4, 21, 0) == (
            after.metric.emitted,
            after.metric.delivered,
            after.metric.sampled_out,
            after.metric.pending,
        )
        assert after.is_balanced()
        assert "21" == _sampled_tag(backend, run.run_id)


def test_new_extremes_always_kept(backend: InMemoryBackend) -> None:
    """Every new maximum or minimum so far is kept, whatever every=N says."""
    values = [5.0, 3.0, 4.0, 7.0, 6.0, 2.0, 6.0, 8.0, 1.0, 4.0]
    obs = _obs(backend, sampling={"fit*": SamplingRule(every=100)})
    with obs:
        with obs.run("r") as run:
            for i, v in enumerate(values):
                obs.metric("fitness", v, step=i)
        assert obs.flush(10)

        assert [0, 1, 3, 5, 7, 8, 9] == _steps(backend, run.run_id, "fitness")
        assert 3 == obs.stats().metric.sampled_out
        assert "3" == _sampled_tag(backend, run.run_id)


def test_nan_always_kept(backend: InMemoryBackend) -> None:
    """NaN points are kept (and do not count as a new extreme)."""
    values = [1.0, 1.0, 1.0, NAN, 1.0, 1.0, NAN, 1.0, 1.0]
    obs = _obs(backend, sampling={"fit*": SamplingRule(every=100)})
    with obs:
        with obs.run("r") as run:
            for i, v in enumerate(values):
                obs.metric("fitness", v, step=i)
        assert obs.flush(10)

        assert [0, 3, 6, 8] == _steps(backend, run.run_id, "fitness")
        assert 5 == obs.stats().metric.sampled_out


def test_state_is_per_run(backend: InMemoryBackend) -> None:
    """Each run's series starts afresh: its first and last points are kept."""
    obs = _every_10(backend)
    with obs:
        with obs.run("a") as a:
            for i in range(5):
                obs.metric("fitness", 1.0, step=i)
        with obs.run("b") as b:
            for i in range(5):
                obs.metric("fitness", 1.0, step=i)
        assert obs.flush(10)

        assert [0, 4] == _steps(backend, a.run_id, "fitness")
        assert [0, 4] == _steps(backend, b.run_id, "fitness")
        assert 6 == obs.stats().metric.sampled_out


def test_unmatched_metrics_all_kept(backend: InMemoryBackend) -> None:
    """A metric no glob matches is never sampled."""
    obs = _every_10(backend)
    with obs:
        with obs.run("r") as run:
            for i in range(30):
                obs.metrics({"loss": 1.0, "fitness": 1.0}, step=i)
        assert obs.flush(10)

        assert list(range(30)) == _steps(backend, run.run_id, "loss")
        assert [0, 10, 20, 29] == _steps(backend, run.run_id, "fitness")
        assert 26 == obs.stats().metric.sampled_out


def test_env_compact_form(backend: InMemoryBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """ALLELE_MLFLOW_SAMPLING='fit*=every:10' samples like SamplingRule(every=10)."""
    monkeypatch.setenv("ALLELE_MLFLOW_SAMPLING", "fit*=every:10")
    obs = _obs(backend)
    with obs:
        with obs.run("r") as run:
            for i in range(25):
                obs.metric("fitness", 1.0, step=i)
        assert obs.flush(10)

        assert [0, 10, 20, 24] == _steps(backend, run.run_id, "fitness")
        assert "21" == _sampled_tag(backend, run.run_id)


def test_env_json_form_first_glob_wins(
    backend: InMemoryBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JSON form works and the first matching glob decides."""
    rules = {"fit.best": {"every": 2}, "fit*": {"every": 5}}
    monkeypatch.setenv("ALLELE_MLFLOW_SAMPLING", json.dumps(rules))
    obs = _obs(backend)
    with obs:
        with obs.run("r") as run:
            for i in range(12):
                obs.metrics({"fit.best": 1.0, "fit.mean": 1.0}, step=i)
        assert obs.flush(10)

        assert [0, 2, 4, 6, 8, 10, 11] == _steps(backend, run.run_id, "fit.best")
        assert [0, 5, 10, 11] == _steps(backend, run.run_id, "fit.mean")
        assert 13 == obs.stats().metric.sampled_out


def _per_second(backend: InMemoryBackend, run_id: str | None, key: str) -> Counter[int]:
    assert run_id is not None
    rows = [r for r in backend.runs[run_id]["metrics"] if r[0] == key]
    return Counter((ts - T0_MS) // 1000 for _k, _v, ts, _s in rows[:-1])


def test_max_per_second_steady_rate(backend: InMemoryBackend) -> None:
    """max_per_second=4 over 8 points a second keeps the first 4 of each second (and the last)."""
    obs = _obs(backend, sampling={"fit*": SamplingRule(max_per_second=4)})
    with obs:
        with obs.run("r") as run:
            for i in range(24):
                obs.metric("fitness", 1.0, step=i, timestamp=T0 + i * 0.125)
        assert obs.flush(10)

        assert [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 23] == _steps(
            backend, run.run_id, "fitness"
        )
        assert {0: 4, 1: 4, 2: 4} == _per_second(backend, run.run_id, "fitness")
        assert 11 == obs.stats().metric.sampled_out
        assert obs.stats().is_balanced()


def test_max_per_second_bounds_a_burst(backend: InMemoryBackend) -> None:
    """After an idle gap, a burst still keeps at most K points in any one second."""
    obs = _obs(backend, sampling={"fit*": SamplingRule(max_per_second=4)})
    with obs:
        with obs.run("r") as run:
            obs.metric("fitness", 1.0, step=0, timestamp=T0)
            for i in range(1, 40):
                obs.metric("fitness", 1.0, step=i, timestamp=T0 + 2.0 + i * 0.025)
        assert obs.flush(10)

        counts = _per_second(backend, run.run_id, "fitness")
        assert max(counts.values()) <= 4, counts


def _model(values: list[float], every: int) -> list[int]:
    """The documented rule: first, NaN, new extremes, every Nth, and the last point."""
    kept, high, low = [], -math.inf, math.inf
    for i, v in enumerate(values):
        keep = i == 0 or math.isnan(v) or v > high or v < low or i % every == 0
        if not math.isnan(v):
            high, low = max(high, v), min(low, v)
        if keep:
            kept.append(i)
    if kept[-1] != len(values) - 1:
        kept.append(len(values) - 1)
    return kept


@given(
    values=st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0, -1.0, NAN]), min_size=1, max_size=60),
    every=st.integers(1, 7),
)
@settings(max_examples=30, deadline=None)
def test_every_matches_the_documented_rule(values: list[float], every: int) -> None:
    """For any series: delivered points follow the documented rule; skipped = sampled_out."""
    backend = InMemoryBackend()
    obs = _obs(backend, sampling={"x*": SamplingRule(every=every)})
    with obs:
        with obs.run("r") as run:
            for i, v in enumerate(values):
                obs.metric("x", v, step=i)
            assert obs.flush(10)
            assert obs.stats().is_balanced()
        assert obs.flush(10)
        expected = _model(values, every)
        stats = obs.stats()

        assert expected == _steps(backend, run.run_id, "x")
        assert len(values) - len(expected) == stats.metric.sampled_out
        assert stats.is_balanced()
        assert str(len(values) - len(expected)) == _sampled_tag(backend, run.run_id)
