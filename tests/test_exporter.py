"""Exporter logic against the in-memory backend: overload, deadlines, retries, rejects."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from allele.observability import DeliveryError, Observability
from allele.observability.sinks.deadletter import DeadLetters
from allele.observability.testing import InMemoryBackend


def _obs(backend: InMemoryBackend, **overrides: Any) -> Observability:
    overrides.setdefault("system_metrics_interval", 0)
    return Observability(backend_factory=lambda _settings: backend, **overrides)


class _Gate:
    """Blocks every backend call until opened."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()

    def __call__(self, _name: str) -> None:
        self.entered.set()
        self.opened.wait(30)


def test_overload_drops_are_counted_and_memory_stays_bounded() -> None:
    """With overflow=drop and a stuck store, the lane never exceeds its bound; drops are counted."""
    backend = InMemoryBackend()
    gate = _Gate()
    backend.before_call = gate
    obs = _obs(backend, queue_size=100)
    with obs, obs.run("flood") as run:
        gate.entered.wait(10)  # the exporter is stuck creating the run
        for i in range(10_000):
            obs.metric("x", float(i), step=i)
            if i % 1000 == 0:
                assert obs.stats().is_balanced()
        lane_len = obs._bus.lane_length()
        during = obs.stats()
        gate.opened.set()
        assert obs.flush(10)
    after = obs.stats()

    assert lane_len <= 100
    assert during.drop_reasons["queue_full"] == during.metric.dropped
    assert during.is_balanced()
    assert after.is_balanced()
    assert after.metric.emitted == 10_000
    assert after.metric.delivered + after.metric.dropped == 10_000
    assert after.metric.pending == 0
    assert run.run_id is not None
    assert len(backend.metric_history(run.run_id, "x")) == after.metric.delivered


def test_overflow_block_waits_then_drops() -> None:
    """overflow=block holds the producer up to block_timeout, then drops and counts."""
    backend = InMemoryBackend()
    gate = _Gate()
    backend.before_call = gate
    obs = _obs(backend, queue_size=100, overflow="block", block_timeout=0.01)
    with obs, obs.run("block"):
        gate.entered.wait(10)
        for i in range(110):
            obs.metric("x", float(i), step=i)
        stats = obs.stats()
        gate.opened.set()

    assert stats.metric.dropped == 10
    assert stats.is_balanced()


def test_flush_and_close_honour_their_deadlines() -> None:
    """A store that never answers: flush returns False, close returns, the rest is spooled."""
    backend = InMemoryBackend()
    gate = _Gate()
    backend.before_call = gate
    obs = _obs(backend, export_timeout=0.2)
    with obs.run("stuck"):
        obs.metric("x", 1.0, step=0)
        ok = obs.flush(0.2)
    obs.close(timeout=0.3)
    gate.opened.set()
    stats = obs.stats()

    assert ok is False
    assert stats.state == "closed"
    assert stats.is_balanced()
    assert stats.metric.spooled == 1
    assert stats.run.spooled == 2
    assert stats.total.dropped == 0


def test_retryable_failures_are_retried_until_delivered() -> None:
    """Transient store errors back off and retry; nothing is lost, state recovers."""
    backend = InMemoryBackend()
    failures = iter([True, True, False])

    def flaky(name: str) -> None:
        if name == "log_batch" and next(failures, False):
            raise DeliveryError("server_error", "503", retryable=True)

    backend.before_call = flaky
    obs = _obs(backend)
    with obs, obs.run("flaky") as run:
        for i in range(10):
            obs.metric("x", float(i), step=i)
        assert obs.flush(30)
        stats = obs.stats()
    assert run.run_id is not None

    assert [(float(i), i) for i in range(10)] == backend.metric_history(run.run_id, "x")
    assert stats.failures == {"server_error": 2}
    assert stats.state == "healthy"


def test_rejected_rows_are_isolated_and_dead_lettered(tmp_path: Path) -> None:
    """A batch the store rejects is split: good rows land, the bad one is dead-lettered."""
    backend = InMemoryBackend()
    original = backend.log_batch

    def picky(run_id: str, metrics: Any, params: Any, tags: Any) -> None:
        if any(m[0] == "bad" for m in metrics):
            raise DeliveryError("rejected", "INVALID_PARAMETER_VALUE: bad", retryable=False)
        original(run_id, metrics, params, tags)

    backend.log_batch = picky  # type: ignore[method-assign]
    obs = _obs(backend, spool_dir=tmp_path / "spool")
    with obs, obs.run("picky") as run:
        for i in range(50):
            obs.metric("good", float(i), step=i)
        obs.metric("bad", 1.0, step=3)
    stats = obs.stats()
    assert run.run_id is not None

    assert len(backend.metric_history(run.run_id, "good")) == 50
    assert stats.metric.dead_lettered == 1
    assert stats.is_balanced()
    lines = (tmp_path / "spool" / "dead-letters.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    assert record["reason"] == "rejected"
    assert record["rows"][0][0] == "bad"
    assert backend.runs[run.run_id]["tags"]["allele.telemetry.complete"] == "false"


def test_async_with_runs_the_exporter_in_the_callers_loop() -> None:
    """`async with obs` exports from a task in the running loop, not from a thread."""
    backend = InMemoryBackend()
    obs = _obs(backend)

    async def main() -> tuple[str | None, bool, list[str]]:
        async with obs:
            async with obs.run("async") as run:
                for i in range(100):
                    obs.metric("x", float(i), step=i)
                ok = await obs.aflush(10)
                with pytest.raises(RuntimeError, match="aflush"):
                    obs.flush(1)
            names = [t.name for t in threading.enumerate()]
        return run.run_id, ok, names

    run_id, ok, names = asyncio.run(main())

    assert ok
    assert "allele-exporter" not in names
    assert run_id is not None
    assert len(backend.metric_history(run_id, "x")) == 100
    assert backend.runs[run_id]["status"] == "FINISHED"


def test_emits_after_close_are_counted_as_dropped() -> None:
    """Calls after close() are no-ops counted under drop reason 'closed'."""
    backend = InMemoryBackend()
    obs = _obs(backend)
    with obs, obs.run("r"):
        obs.metric("x", 1.0)
    obs.metric("late", 1.0)
    obs.param("late", 1)
    stats = obs.stats()

    assert stats.drop_reasons["closed"] == 2
    assert stats.metric.dropped == 1
    assert stats.param.dropped == 1
    assert stats.is_balanced()


def test_run_accounting_tags_are_written_at_run_end() -> None:
    """Each run ends with allele.telemetry.* tags describing its own completeness."""
    backend = InMemoryBackend()
    obs = _obs(backend)
    with obs, obs.run("acct", params={"a": 1}) as run:
        for i in range(7):
            obs.metric("x", float(i), step=i)
    assert run.run_id is not None
    tags = backend.runs[run.run_id]["tags"]

    assert tags["allele.telemetry.complete"] == "true"
    assert tags["allele.telemetry.dropped"] == "0"
    assert int(tags["allele.telemetry.emitted"]) == int(tags["allele.telemetry.delivered"])


def test_a_snapshot_from_another_thread_always_balances() -> None:
    """
    A producer opens runs with params and tags, logs phases, alerts and tags while another
    thread takes snapshots: every snapshot balances (an event counted as emitted before it
    reached its lane was, for a moment, in no column).
    """
    backend = InMemoryBackend()
    obs = _obs(backend, flush_interval=0.01)
    stop = threading.Event()
    unbalanced: list[Any] = []

    def watch() -> None:
        while not stop.is_set():
            stats = obs.stats()
            if not stats.is_balanced():
                unbalanced.append(stats)

    watcher = threading.Thread(target=watch)
    with obs:
        watcher.start()
        try:
            for i in range(300):
                with obs.run(f"r{i}", params={"a": 1, "b": 2}, tags={"t": "x"}):
                    obs.tag("k", str(i))
                    with obs.phase("generation"):
                        obs.alert("slow", message=str(i))
        finally:
            stop.set()
            watcher.join()
    final = obs.stats()

    assert unbalanced == []
    assert final.is_balanced()
    assert final.param.emitted == 600
    assert final.param.delivered == 600
    assert final.phase.delivered == 300


def test_a_run_start_dropped_on_a_full_lane_counts_its_tags_and_params() -> None:
    """The control lane full: a run's start is dropped with the params and tags it carries."""
    backend = InMemoryBackend()
    gate = _Gate()
    backend.before_call = gate
    obs = _obs(backend, queue_size=100)  # the control lane holds 1,000 events
    with obs, obs.run("first"):
        gate.entered.wait(10)  # the exporter is stuck creating the run
        for i in range(1000):
            obs.tag(f"t{i % 10}", str(i))
        with obs.run("late", params={"a": 1}, tags={"t": "x"}):
            during = obs.stats()
        gate.opened.set()
        assert obs.flush(10)
    after = obs.stats()

    assert during.run.dropped == 1
    assert during.param.dropped == 1
    assert during.param.emitted == 1
    assert during.is_balanced()
    assert after.is_balanced()
    assert after.drop_reasons["queue_full"] == sum(
        getattr(after, k).dropped for k in ("run", "param", "tag")
    )


def test_an_artifact_gone_before_it_is_spooled_is_dead_lettered_at_once(tmp_path: Path) -> None:
    """
    The store is down and the artifact's file is deleted before the exporter spools it:
    it is dead-lettered there with ``local_file`` (no record the replay would refuse as
    ``rejected`` later), and the metric beside it is spooled.
    """
    backend = InMemoryBackend()
    gate = _Gate()
    backend.before_call = gate
    backend.fail_with = DeliveryError("network_error", "down (test)", retryable=True)
    spool = tmp_path / "spool"
    obs = _obs(backend, spool_dir=spool)
    path = tmp_path / "model.txt"
    path.write_text("weights\n")
    with obs.run("gone"):
        gate.entered.wait(10)  # the exporter is stuck on its first call
        obs.artifact(path)
        obs.metric("loss", 1.0, step=0)
        path.unlink()
        gate.opened.set()
    obs.close(timeout=0.5)
    stats = obs.stats()

    assert stats.artifact.dead_lettered == 1
    assert stats.artifact.spooled == 0
    assert stats.metric.spooled == 1
    assert stats.is_balanced()
    letters = DeadLetters(spool).read()
    assert [(d["kind"], d["reason"]) for d in letters] == [("artifact", "local_file")]
    assert "model.txt" in letters[0]["message"]
