"""
Supervision (issue 9): one odd event or one broken component never stops delivery. Each
test breaks one thing for real (a detector, a spool record, the loop itself, psutil) and
checks that the events around it reach a real sqlite store, that the broken part is
counted, and that the accounting still balances.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from allele.observability import Observability
from allele.observability.exporter.backlog import Router
from allele.observability.sinks.deadletter import DeadLetters
from allele.observability.spool import frames
from servers import free_port


def _history(client: Any, run_id: str | None, key: str) -> list[tuple[int, float]]:
    assert run_id is not None
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _dead_letters(tmp_path: Path) -> list[dict[str, Any]]:
    return DeadLetters(tmp_path / "spool").read()


class _Broken:
    """A detector with a bug: it raises on the third value it sees."""

    def __init__(self) -> None:
        self.seen = 0

    def observe(self, run_key: str, name: str, value: float, step: int) -> list[Any]:
        self.seen += 1
        if self.seen == 3:
            raise ZeroDivisionError("a bug in the user's detector")
        return []


class _Counting:
    """A detector that only counts what it sees."""

    def __init__(self) -> None:
        self.seen = 0

    def observe(self, run_key: str, name: str, value: float, step: int) -> list[Any]:
        self.seen += 1
        return []


def test_broken_detector_is_disabled_once_and_delivery_goes_on(
    make_obs: Callable[..., Observability], client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    obs = make_obs(flush_interval=0.05)
    broken, counting = _Broken(), _Counting()
    detectors: list[Any] = [broken, counting]
    for detector in detectors:
        obs.add_detector(detector)
    caplog.set_level(logging.ERROR, logger="allele.observability")
    with obs, obs.run("detectors", experiment="supervision") as run:
        for i in range(50):
            obs.metric("x", float(i), step=i)
        assert obs.flush(30)
        for i in range(50, 100):
            obs.metric("x", float(i), step=i)
    stats = obs.stats()

    assert [(i, float(i)) for i in range(100)] == _history(client, run.run_id, "x")
    assert counting.seen == 100  # the other detector kept watching
    assert broken.seen == 3  # the broken one was not called again
    disabled = [r for r in caplog.records if "disabled" in r.getMessage()]
    assert len(disabled) == 1
    assert "ZeroDivisionError" in (disabled[0].exc_text or "")
    assert stats.metric.delivered == 100
    assert stats.is_balanced()


def test_loop_failure_is_restarted_and_counted(
    make_obs: Callable[..., Observability],
    client: Any,
    store_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop itself fails (its backend cannot be built once): it restarts, loses nothing."""
    from allele.observability.backends.factory import make_backend

    calls = {"n": 0}

    def flaky_factory(settings: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("backend construction failed once")
        return make_backend(settings)

    obs = Observability.from_env(
        tracking_uri=store_uri, delivery_process=False, backend_factory=flaky_factory
    )
    with obs, obs.run("restarted", experiment="supervision") as run:
        for i in range(20):
            obs.metric("x", float(i), step=i)
        assert obs.flush(60)
    stats = obs.stats()

    assert [(i, float(i)) for i in range(20)] == _history(client, run.run_id, "x")
    assert stats.restarts == 1
    assert stats.failures.get("internal_error") == 1
    assert stats.is_balanced()


def test_dead_exporter_thread_is_revived_with_its_backlog(
    make_obs: Callable[..., Observability], client: Any
) -> None:
    """The thread ends without a stop (as if killed): the next flush starts it again."""
    obs = make_obs()
    with obs, obs.run("revived", experiment="supervision") as run:
        obs.metric("x", 1.0, step=0)
        assert obs.flush(30)
        exporter = obs._runtime.exporter
        assert exporter is not None
        # End the loop as a crash would: the stop flag stays False.
        exporter._stop = True
        exporter._source.wake()
        assert exporter._finished.wait(30)
        exporter._stop = False
        obs.metric("x", 2.0, step=1)
        assert obs.flush(30)
    stats = obs.stats()

    assert [(0, 1.0), (1, 2.0)] == _history(client, run.run_id, "x")
    assert stats.restarts == 1
    assert stats.is_balanced()


def _dead_store_obs(tmp_path: Path, **overrides: Any) -> Observability:
    """An instance whose store is down for good (nothing listens on the port)."""
    return Observability.from_env(
        tracking_uri=f"http://127.0.0.1:{free_port()}",
        export_timeout=1,
        flush_interval=0.05,
        spool_dir=str(tmp_path / "spool"),
        **overrides,
    )


def test_unspoolable_events_are_dead_lettered_and_the_rest_is_spooled(tmp_path: Path) -> None:
    """
    While the store is down: a genome that is not JSON, and one larger than a spool record
    may be, are dead-lettered with the reason; the events around them are spooled.
    """
    obs = _dead_store_obs(tmp_path)
    with obs, obs.run("unspoolable", experiment="supervision") as run:
        obs.metric("before", 1.0, step=0)
        # Both bypass validation at the call: they stand for anything the call misses.
        payload = {"genome_id": "g1", "text": "[]", "name": "g", "tags": {"k": object()}}
        obs._bus.control(("genome", run, payload))
        huge = {"genome_id": "g2", "text": "x" * (frames.MAX_RECORD_BYTES + 10), "name": "g"}
        obs._bus.control(("genome", run, huge))
        obs.metric("after", 2.0, step=0)
        assert not obs.flush(2)
    stats = obs.stats()

    assert stats.genome.dead_lettered == 2
    assert stats.genome.pending == 0
    assert stats.metric.spooled == 2
    assert stats.run.spooled == 2
    letters = [d for d in _dead_letters(tmp_path) if d["kind"] == "genome"]
    assert len(letters) == 2
    assert {d["reason"] for d in letters} == {"internal_error"}
    messages = " ".join(d["message"] for d in letters)
    assert "not JSON serializable" in messages
    assert "exceeds" in messages
    assert stats.is_balanced()


def test_psutil_errors_disable_system_metrics_not_delivery(
    make_obs: Callable[..., Observability], client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from allele.observability.sources import system

    def broken(self: Any) -> dict[str, float]:
        raise OSError("psutil cannot read /proc")

    monkeypatch.setattr(system.SystemSampler, "sample", broken)
    obs = make_obs(system_metrics_interval=0.01, flush_interval=0.05)
    with obs, obs.run("psutil", experiment="supervision") as run:
        for i in range(10):
            obs.metric("x", float(i), step=i)
            assert obs.flush(30)  # gives the sampler time to fail
    stats = obs.stats()

    assert [(i, float(i)) for i in range(10)] == _history(client, run.run_id, "x")
    assert stats.failures.get("internal_error", 0) >= 1
    assert stats.system.emitted == 0
    assert stats.is_balanced()


def test_accounting_check_fails_when_an_event_is_leaked(
    make_obs: Callable[..., Observability], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pending is measured, so an event lost without being counted shows as an imbalance."""
    route = Router.route_metrics

    def leaky(self: Router, items: list[Any], *args: Any) -> None:
        route(self, items[1:], *args)  # the first metric of each round vanishes

    obs = make_obs()
    with obs, obs.run("leak", experiment="supervision"):
        obs.metric("x", 1.0, step=0)
        obs.metric("x", 2.0, step=1)
        assert obs.flush(30)
        assert obs.stats().is_balanced()
        monkeypatch.setattr(Router, "route_metrics", leaky)
        obs.metric("x", 3.0, step=2)
        obs.metric("x", 4.0, step=3)
        assert obs.flush(30)
        stats = obs.stats()

    assert not stats.metric.is_balanced()
    assert stats.metric.emitted == 4
    assert stats.metric.delivered == 3
    assert stats.metric.pending == 0


def test_pending_is_where_the_events_are(make_obs: Callable[..., Observability]) -> None:
    """Before the exporter starts, every event is pending in a lane, per kind."""
    obs = make_obs()
    run = obs.run("lanes", experiment="supervision", params={"a": 1})
    run.__enter__()
    try:
        # The exporter is started by the run; stop it from draining by not flushing.
        stats = obs.stats()
        assert stats.is_balanced()
        assert stats.param.emitted == 1
        assert stats.run.emitted == 1
    finally:
        run.__exit__(None, None, None)
    assert obs.flush(30)
    final = obs.stats()
    assert final.total.pending == 0
    assert final.run.delivered == 2
    assert final.is_balanced()


def test_alert_chunk_that_cannot_be_written_is_dead_lettered(
    make_obs: Callable[..., Observability],
    client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An OSError writing an alert chunk (disk full) costs that chunk, not the exporter."""
    from allele.observability.alerts.store import write_chunk
    from allele.observability.exporter import delivery

    def disk_full(*args: Any, **kwargs: Any) -> str:
        raise OSError(28, "No space left on device")

    obs = make_obs(flush_interval=0.05)
    with obs, obs.run("disk-full", experiment="supervision") as run:
        monkeypatch.setattr(delivery, "write_chunk", disk_full)
        obs.alert("lost.to.disk", severity="warning")
        obs.metric("x", 1.0, step=0)
        assert obs.flush(30)
        monkeypatch.setattr(delivery, "write_chunk", write_chunk)
        obs.alert("written", severity="warning")
        obs.metric("x", 2.0, step=1)
        assert obs.flush(30)
    stats = obs.stats()

    assert [(0, 1.0), (1, 2.0)] == _history(client, run.run_id, "x")
    assert stats.alert.dead_lettered == 1
    assert stats.alert.delivered == 1
    assert stats.state == "closed"
    letters = [d for d in _dead_letters(tmp_path) if d["kind"] == "alert"]
    assert len(letters) == 1
    assert "No space left on device" in letters[0]["message"]
    assert stats.is_balanced()
