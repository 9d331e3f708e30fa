"""
Degradation and durability against a real `mlflow server` (killed and restarted by PID),
real sqlite stores and real subprocesses: nothing is lost, nothing hangs.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from allele.observability import Observability
from servers import MlflowServer, free_port

ALLELE_OBS = Path(sys.executable).parent / "allele-obs"
#: generous bound on a subprocess that must exit by itself (a hang fails the test)
HANG_GUARD = 120


@pytest.fixture(name="fault_server", scope="module")
def _fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A server this module kills and restarts; not started until a test starts it."""
    server = MlflowServer(tmp_path_factory.mktemp("fault-server"))
    yield server
    server.stop()


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    assert exp is not None, name
    return str(exp.experiment_id)


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _run_script(code: str, tmp_path: Path, env: dict[str, str] | None = None) -> Any:
    script = tmp_path / "experiment.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )


def test_server_down_at_start_then_started(fault_server: MlflowServer, tmp_path: Path) -> None:
    """Runs opened while the server is down get all their data once it is up; stats agree."""
    fault_server.stop()
    obs = Observability.from_env(
        tracking_uri=fault_server.url, export_timeout=2, flush_interval=0.2
    )
    with obs, obs.run("down-at-start", experiment="faults", params={"p": 1}) as run:
        for i in range(500):
            obs.metric("x", float(i), step=i)
        assert not obs.flush(1)
        while_down = obs.stats()
        fault_server.start()
        assert obs.flush(60)
    stats = obs.stats()
    client = MlflowClient(tracking_uri=fault_server.url)
    assert run.run_id is not None

    assert while_down.metric.spooled + while_down.metric.pending == 500
    assert while_down.is_balanced()
    assert [(i, float(i)) for i in range(500)] == _history(client, run.run_id, "x")
    got = client.get_run(run.run_id)
    assert got.data.params == {"p": "1"}
    assert got.info.status == "FINISHED"
    assert got.data.tags["allele.telemetry.complete"] == "true"
    assert stats.metric.delivered == 500
    assert stats.total.spooled == 0
    assert stats.is_balanced()


def test_server_killed_mid_run_and_restarted(fault_server: MlflowServer) -> None:
    """Killed mid-run and restarted on the same port: metric history exact, no duplicates."""
    fault_server.start()
    obs = Observability.from_env(
        tracking_uri=fault_server.url, export_timeout=2, flush_interval=0.2
    )
    with obs, obs.run("killed", experiment="faults") as run:
        for i in range(1000):
            obs.metric("x", float(i), step=i)
        assert obs.flush(30)
        fault_server.stop(signal.SIGKILL)
        for i in range(1000, 2000):
            obs.metric("x", float(i), step=i)
        assert not obs.flush(1)
        fault_server.restart()
        assert obs.flush(60)
    client = MlflowClient(tracking_uri=fault_server.url)
    assert run.run_id is not None

    assert [(i, float(i)) for i in range(2000)] == _history(client, run.run_id, "x")
    assert obs.stats().metric.delivered == 2000
    assert obs.stats().is_balanced()


def _silent_listener() -> tuple[socket.socket, int]:
    """A socket that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return sock, sock.getsockname()[1]


def test_silent_server_exit_is_bounded_and_cli_replays(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """A server that never answers: the process exits on its own; the CLI replays the spool."""
    sock, port = _silent_listener()
    spool = tmp_path / "spool"
    try:
        result = _run_script(
            f"""
            from allele.observability import Observability
            obs = Observability.from_env(tracking_uri="http://127.0.0.1:{port}",
                                         export_timeout=1, shutdown_timeout=2)
            obs.start()
            with obs.run("silent", experiment="silent-exit"):
                for i in range(300):
                    obs.metric("x", float(i), step=i)
            print("experiment done")
            """,
            tmp_path,
            {"ALLELE_MLFLOW_SPOOL_DIR": str(spool)},
        )
    finally:
        sock.close()
    assert result.returncode == 0, result.stderr
    assert "experiment done" in result.stdout

    replay = subprocess.run(
        [str(ALLELE_OBS), "spool", "replay", "--tracking-uri", mlflow_server.url,
         "--spool-dir", str(spool)],
        capture_output=True, text=True, timeout=HANG_GUARD, check=False,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    client = MlflowClient(tracking_uri=mlflow_server.url)
    runs = client.search_runs([_experiment_id(client, "silent-exit")])

    assert len(runs) == 1
    assert [(i, float(i)) for i in range(300)] == _history(client, runs[0].info.run_id, "x")
    assert runs[0].info.status == "FINISHED"


def test_kill_9_keeps_the_spool_for_the_next_start(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """After kill -9, what reached the spool is replayed by the next process that starts."""
    port = free_port()  # nothing listens: connection refused
    spool = tmp_path / "spool"
    script = tmp_path / "victim.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        from allele.observability import Observability
        obs = Observability.from_env(tracking_uri="http://127.0.0.1:{port}",
                                     export_timeout=1, flush_interval=0.1)
        obs.start()
        with obs.run("victim", experiment="kill9"):
            for i in range(400):
                obs.metric("x", float(i), step=i)
            while obs.stats().metric.spooled < 400:
                obs.flush(0.2)
            print("spooled", flush=True)
            time.sleep(600)
    """)
    )
    env = {**os.environ, "ALLELE_MLFLOW_SPOOL_DIR": str(spool)}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "spooled"
    finally:
        proc.kill()
        proc.wait(timeout=HANG_GUARD)

    obs = Observability.from_env(tracking_uri=mlflow_server.url, spool_dir=spool)
    with obs:
        assert obs.flush(60)
        replayed = obs.stats().replayed
    client = MlflowClient(tracking_uri=mlflow_server.url)
    runs = client.search_runs([_experiment_id(client, "kill9")])

    assert replayed >= 400
    assert len(runs) == 1
    assert [(i, float(i)) for i in range(400)] == _history(client, runs[0].info.run_id, "x")


def test_mlflow_not_importable_the_experiment_finishes(tmp_path: Path) -> None:
    """With `import mlflow` failing, the experiment runs to the end; a later replay delivers."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name == "mlflow" or name.startswith("mlflow."):
                    raise ImportError("mlflow is blocked for this test")
                return None
        sys.meta_path.insert(0, _Block())
    """)
    )
    db = tmp_path / "store.db"
    spool = tmp_path / "spool"
    env = {
        "PYTHONPATH": os.pathsep.join([str(blocker), *sys.path]),
        "ALLELE_MLFLOW_SPOOL_DIR": str(spool),
        "ALLELE_MLFLOW_TRACKING_URI": f"sqlite:///{db}",
        "ALLELE_MLFLOW_SHUTDOWN_TIMEOUT": "3",
    }
    result = _run_script(
        """
        from allele.observability import Observability
        with Observability.from_env() as obs, obs.run("blocked", experiment="noimport"):
            for i in range(50):
                obs.metric("x", float(i), step=i)
        print("finished", obs.stats().metric.spooled)
        """,
        tmp_path,
        env,
    )

    assert result.returncode == 0, result.stderr
    assert "finished 50" in result.stdout
    assert "not importable" in result.stderr
    replay = subprocess.run(
        [str(ALLELE_OBS), "spool", "replay", "--tracking-uri", f"sqlite:///{db}",
         "--spool-dir", str(spool)],
        capture_output=True, text=True, timeout=HANG_GUARD, check=False,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([_experiment_id(client, "noimport")])
    assert [(i, float(i)) for i in range(50)] == _history(client, runs[0].info.run_id, "x")


def test_rejected_param_does_not_sink_the_metrics_in_its_batch(
    store_uri: str, client: Any, tmp_path: Path
) -> None:
    """MLflow rejects a param re-logged with another value; its batch's metrics still land."""
    obs = Observability.from_env(tracking_uri=store_uri, delivery_process=False)
    with obs, obs.run("conflict", experiment="reject") as run:
        assert run.run_id is not None
        client.log_param(run.run_id, "lr", "0.5")  # another writer got there first
        obs.param("lr", 0.1)
        for i in range(20):
            obs.metric("x", float(i), step=i)
    stats = obs.stats()

    assert [(i, float(i)) for i in range(20)] == _history(client, run.run_id, "x")
    assert client.get_run(run.run_id).data.params["lr"] == "0.5"
    assert stats.param.dead_lettered == 1
    assert stats.is_balanced()
    dead = (tmp_path / "spool" / "dead-letters.jsonl").read_text()
    assert "lr" in dead
    assert "rejected" in dead


def _child_work(i: int) -> int:
    from allele.observability._core import observability as _observability

    obs = _OBS[0]
    obs.metric("child", float(i), step=i)
    assert isinstance(obs, _observability.Observability)
    return os.getpid()


_OBS: list[Observability] = []


def test_forked_pool_children_log_into_the_parents_run(store_uri: str, client: Any) -> None:
    """multiprocessing (fork) workers get a working bus that logs into the parent's run."""
    obs = Observability.from_env(tracking_uri=store_uri, delivery_process=False)
    _OBS[:] = [obs]
    ctx = multiprocessing.get_context("fork")
    with obs, obs.run("pool", experiment="fork") as run:
        assert run.run_id is not None
        with ctx.Pool(2) as pool:
            pids = pool.map(_child_work, range(8))
        obs.metric("parent", 1.0, step=0)
    _OBS.clear()

    assert os.getpid() not in pids
    assert [(i, float(i)) for i in range(8)] == _history(client, run.run_id, "child")
    assert [(0, 1.0)] == _history(client, run.run_id, "parent")
    assert client.get_run(run.run_id).info.status == "FINISHED"


def _child_terminated_while_counting() -> None:
    from allele.observability._core.accounting import Accounting

    obs = _OBS[0]
    for i in range(5):
        obs.metric("late", float(i), step=i)
    statistics = Accounting.statistics

    def terminated_inside(self: Accounting, *args: Any, **kwargs: Any) -> Any:
        with self.lock:  # the SIGTERM handler runs here, with the lock held
            os.kill(os.getpid(), signal.SIGTERM)
        return statistics(self, *args, **kwargs)

    Accounting.statistics = terminated_inside  # type: ignore[method-assign]
    # returning ends the process: multiprocessing runs the at-exit delivery, which counts
    # the pending events (stats()) first


def test_sigterm_while_a_forked_child_counts_at_exit_loses_nothing(
    store_uri: str, client: Any
) -> None:
    """
    A pool worker terminated while its at-exit delivery counts what is pending (under the
    accounting lock the exporter needs) neither deadlocks nor dies: it delivers everything.
    """
    obs = Observability.from_env(tracking_uri=store_uri, delivery_process=False)
    _OBS[:] = [obs]
    ctx = multiprocessing.get_context("fork")
    with obs, obs.run("term", experiment="fork") as run:
        assert run.run_id is not None
        child = ctx.Process(target=_child_terminated_while_counting)
        child.start()
        child.join(60)
    _OBS.clear()

    assert 0 == child.exitcode
    assert [(i, float(i)) for i in range(5)] == _history(client, run.run_id, "late")


def _child_engine_is_fresh(conn: Any, uri: str, parent_pool: int) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    conn.send(id(SqlAlchemyStore._engine_map[uri].pool) != parent_pool)


def test_forked_child_gets_its_own_database_pool(store_uri: str) -> None:
    """
    MLflow caches one SQLAlchemy engine per database; a forked child must not use the
    parent's pool (its connections, or its lock held mid-call by the parent's exporter).
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from allele.observability.backends.client import ClientBackend

    backend = ClientBackend(store_uri)
    backend.ensure_experiment("pool", None)
    parent_pool = id(SqlAlchemyStore._engine_map[store_uri].pool)
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_engine_is_fresh, args=(send, store_uri, parent_pool))
    child.start()
    fresh = receive.recv() if receive.poll(30) else None
    child.join(30)
    backend.close()

    assert fresh is True
    assert parent_pool == id(SqlAlchemyStore._engine_map[store_uri].pool)


def test_killed_delivery_worker_is_replaced_and_nothing_is_lost(
    store_uri: str, client: Any
) -> None:
    """The sqlite delivery worker process is killed mid-run: a new one takes over, no loss."""
    obs = Observability.from_env(tracking_uri=store_uri, delivery_process=True, flush_interval=0.2)
    with obs, obs.run("worker-kill", experiment="worker") as run:
        for i in range(1000):
            obs.metric("x", float(i), step=i)
        assert obs.flush(60)
        exporter = obs._runtime.exporter
        assert exporter is not None
        backend: Any = exporter._delivery.backend
        assert backend._proc is not None
        os.kill(backend._proc.pid, signal.SIGKILL)
        for i in range(1000, 2000):
            obs.metric("x", float(i), step=i)
        assert obs.flush(60)
    assert run.run_id is not None

    assert backend.spawned >= 2
    assert [(i, float(i)) for i in range(2000)] == _history(client, run.run_id, "x")
    assert obs.stats().is_balanced()
