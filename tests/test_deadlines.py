"""
close() and flush() keep trying until their deadline (issue 9): against a real
`mlflow server` killed by PID and brought back while the caller waits, everything is
delivered; never back, everything is in the spool when close() returns.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from allele.observability import Observability
from servers import MlflowServer

pytestmark = pytest.mark.server

#: seconds the server stays down while the caller waits (well inside the caller's deadline)
DOWN_FOR = 3.0


@pytest.fixture(name="server", scope="module")
def _server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("deadline-server"))
    server.start()
    yield server
    server.stop()


def _history(url: str, run_id: str | None, key: str) -> list[tuple[int, float]]:
    assert run_id is not None
    client = MlflowClient(tracking_uri=url)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _restart_later(server: MlflowServer) -> threading.Thread:
    def restart() -> None:
        time.sleep(DOWN_FOR)
        server.restart()

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    return thread


def _obs(server: MlflowServer, tmp_path: Path) -> Observability:
    return Observability.from_env(
        tracking_uri=server.url,
        export_timeout=2,
        flush_interval=0.1,
        spool_dir=str(tmp_path / "spool"),
    )


def test_close_keeps_trying_while_the_server_restarts(server: MlflowServer, tmp_path: Path) -> None:
    server.start()
    obs = _obs(server, tmp_path)
    obs.start()
    with obs.run("close-waits", experiment="deadlines") as run:
        for i in range(100):
            obs.metric("x", float(i), step=i)
        assert obs.flush(30)
        server.stop(signal.SIGKILL)
        for i in range(100, 300):
            obs.metric("x", float(i), step=i)
    restarter = _restart_later(server)
    obs.close(timeout=120)
    restarter.join()
    stats = obs.stats()

    assert [(i, float(i)) for i in range(300)] == _history(server.url, run.run_id, "x")
    got = MlflowClient(tracking_uri=server.url).get_run(str(run.run_id))
    assert got.info.status == "FINISHED"
    assert got.data.tags["allele.telemetry.complete"] == "true"
    assert stats.metric.delivered == 300
    assert stats.total.spooled == 0
    assert stats.total.pending == 0
    assert stats.is_balanced()


def test_flush_keeps_trying_within_its_timeout(server: MlflowServer, tmp_path: Path) -> None:
    server.start()
    obs = _obs(server, tmp_path)
    with obs, obs.run("flush-waits", experiment="deadlines") as run:
        obs.metric("x", 0.0, step=0)
        assert obs.flush(30)
        server.stop(signal.SIGKILL)
        for i in range(1, 50):
            obs.metric("x", float(i), step=i)
        restarter = _restart_later(server)
        assert obs.flush(120)
        restarter.join()

    assert [(i, float(i)) for i in range(50)] == _history(server.url, run.run_id, "x")
    assert obs.stats().total.spooled == 0
    assert obs.stats().is_balanced()


def test_close_never_back_spools_everything(server: MlflowServer, tmp_path: Path) -> None:
    server.start()
    obs = _obs(server, tmp_path)
    obs.start()
    with obs.run("never-back", experiment="deadlines"):
        obs.metric("x", 0.0, step=0)
        assert obs.flush(30)
        server.stop(signal.SIGKILL)
        for i in range(1, 1000):
            obs.metric("x", float(i), step=i)
    obs.close(timeout=3)
    stats = obs.stats()
    server.start()

    assert stats.state == "closed"
    assert stats.metric.delivered == 1
    assert stats.metric.spooled == 999
    assert stats.run.spooled == 1  # the run's end waits in the spool
    assert stats.total.pending == 0
    assert stats.total.dropped == 0
    assert stats.is_balanced()
