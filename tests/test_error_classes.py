"""
Error classes that mean what they say (issue 9, item 3; item 8's network layer).

Against a real sqlite store, a real ``mlflow server`` and tiny real relays on 127.0.0.1
(:class:`Relay`: a reverse proxy that can answer 401 for a while, or a forward proxy for
``HTTP_PROXY``, with ``CONNECT`` tunnels for https): a missing local file is the
artifact's problem, an expired token keeps every event, a poison row is isolated after a
few INTERNAL_ERRORs, and the REST backend goes through the proxy the environment names.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from mlflow import MlflowClient

from allele.observability import Observability
from allele.observability.backends.base import REPEAT_LIMIT, DeliveryError
from allele.observability.backends.client import ClientBackend
from allele.observability.backends.rest import RestBackend
from allele.observability.sinks.batching import Repeats
from allele.observability.sinks.deadletter import DeadLetters
from allele.observability.spool.records import (
    ArtifactRecord,
    BatchRecord,
    EndRecord,
    Record,
    RunRecord,
)
from allele.observability.spool.records import encode as encode_record
from allele.observability.spool.replay import Replayer
from allele.observability.spool.runmap import RunMap
from allele.observability.spool.segments import Spool
from servers import MlflowServer

#: what a real ``mlflow server --app-name basic-auth`` answers without valid credentials
UNAUTHENTICATED = (
    b"You are not authenticated. Please see "
    b"https://www.mlflow.org/docs/latest/auth/index.html#authenticating-to-mlflow "
    b"on how to authenticate."
)


# -- a tiny real relay ------------------------------------------------------------------------
class Relay:
    """
    An HTTP relay on 127.0.0.1 that records every request it sees.

    With ``upstream`` it is a reverse proxy (clients use its URL as the tracking URI);
    without, a forward proxy (absolute-URI requests and ``CONNECT`` tunnels). While
    ``deny`` is set, it answers 401 as MLflow's basic-auth app does, without forwarding.
    """

    def __init__(self, upstream: str | None = None, port: int = 0) -> None:
        self.upstream = urlsplit(upstream) if upstream else None
        self.requests: list[tuple[str, str]] = []
        self.tunnels: list[str] = []
        self.deny = False
        self._open: set[socket.socket] = set()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                relay._open.add(self.connection)

            def finish(self) -> None:
                relay._open.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def log_message(self, *_args: Any) -> None:
                pass

            def _forward(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else None
                relay.requests.append((self.command, self.path))
                if relay.deny:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                    self.send_header("Content-Length", str(len(UNAUTHENTICATED)))
                    self.end_headers()
                    self.wfile.write(UNAUTHENTICATED)
                    return
                if self.path.startswith("http://"):
                    parts = urlsplit(self.path)
                    target = self.path[len(f"http://{parts.netloc}") :] or "/"
                else:
                    assert relay.upstream is not None, "origin-form request to a forward proxy"
                    parts, target = relay.upstream, self.path
                skip = {"connection", "proxy-connection", "proxy-authorization", "keep-alive"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                host = parts.hostname or "127.0.0.1"
                conn = http.client.HTTPConnection(host, parts.port, timeout=30)
                try:
                    conn.request(self.command, target, body, headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in {"connection", "content-length", "transfer-encoding"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward  # noqa: N815

            def do_CONNECT(self) -> None:
                relay.tunnels.append(self.path)
                host, _, port = self.path.rpartition(":")
                upstream = socket.create_connection((host, int(port)), timeout=30)
                self.send_response(200, "Connection established")
                self.end_headers()
                self.close_connection = True
                _pipe(self.connection, upstream)

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop serving and cut every open connection (kept-alive ones too)."""
        self._server.shutdown()
        self._server.server_close()
        for conn in list(self._open):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""

    def copy(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    other = threading.Thread(target=copy, args=(b, a), daemon=True)
    other.start()
    copy(a, b)
    other.join(30)
    b.close()


@pytest.fixture(name="relay_factory")
def _relay_factory() -> Iterator[Callable[..., Relay]]:
    made: list[Relay] = []

    def make(upstream: str | None = None, port: int = 0) -> Relay:
        relay = Relay(upstream, port)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()


def _dead_letters(obs: Observability | None = None, spool_dir: Path | None = None) -> list[Any]:
    directory = spool_dir if spool_dir is not None else Path(os.environ["ALLELE_MLFLOW_SPOOL_DIR"])
    return DeadLetters(directory).read()


def _run_id(client: MlflowClient, experiment: str, run_key: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, experiment
    runs = client.search_runs([exp.experiment_id], f"tags.`allele.run_key` = '{run_key}'")
    assert len(runs) == 1, runs
    return str(runs[0].info.run_id)


# -- local file errors are the event's problem ------------------------------------------------
@pytest.mark.parametrize("delivery_process", [False, True], ids=["thread", "worker-process"])
def test_artifact_deleted_before_upload_is_dead_lettered_and_delivery_stays_healthy(
    make_obs: Callable[..., Observability],
    client: MlflowClient,
    tmp_path: Path,
    delivery_process: bool,
) -> None:
    """
    ``obs.artifact(path)`` and the file deleted before the upload: that artifact is
    dead-lettered with reason ``local_file``; no failed attempt is counted, the exporter
    stays healthy and the metrics around it are delivered directly (nothing spooled).
    (Before: FileNotFoundError was a network_error, so the exporter went degraded and
    spooled everything.)
    """
    obs = make_obs(delivery_process=delivery_process)
    doomed = tmp_path / "model.bin"
    doomed.write_bytes(b"weights")
    with obs.run("artifact-gone", experiment="errors") as run:
        obs.metric("before", 1.0, step=0)
        obs.artifact(doomed)  # validated at the call: the file exists
        doomed.unlink()  # ... and is gone before the exporter uploads it
        obs.metric("after", 2.0, step=1)
        assert obs.flush(timeout=60)
    assert obs.flush(timeout=60)

    stats = obs.stats()
    dead = _dead_letters()
    assert stats.artifact.dead_lettered == 1
    assert stats.artifact.spooled == 0
    assert stats.metric.delivered == 2
    assert stats.total.spooled == 0
    assert stats.failures == {}
    assert stats.state == "healthy"
    assert stats.is_balanced()
    assert [(d["kind"], d["reason"]) for d in dead] == [("artifact", "local_file")]
    assert "FileNotFoundError" in dead[0]["message"]
    run_id = _run_id(client, "errors", run.key)
    assert sorted(client.get_run(run_id).data.metrics) == ["after", "before"]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_spooled_artifact_whose_file_is_gone_does_not_stop_replay(
    store_uri: str, client: MlflowClient, tmp_path: Path
) -> None:
    """
    A spool whose artifact record names a file deleted since: replay dead-letters that
    record (``local_file``) and goes on with the records after it, in one pass.
    (Before: the replay stopped on that record with a retryable network_error, forever.)
    """
    spool_dir = tmp_path / "replay-spool"
    head = ("inst-1", "run-key-artifact-gone", "errors-replay")
    t0 = 1_700_000_000_000
    metrics = [["m", float(i), t0 + i, i] for i in range(5)]
    records: list[Record] = [
        RunRecord(*head, None, "replayed", t0, {"allele.run_key": head[1]}, None, None),
        ArtifactRecord(*head, None, str(spool_dir / "artifacts" / "a1" / "gone.txt"), None),
        BatchRecord(*head, None, metrics, [], [], system=False),
        EndRecord(*head, None, "FINISHED", t0 + 1000, []),
    ]
    writer = Spool(spool_dir)
    for record in records:
        assert writer.append(encode_record(record))
    writer.flush(fsync=True)
    writer.close()
    backend = ClientBackend(store_uri)

    report = Replayer(Spool(spool_dir), backend, RunMap(spool_dir), DeadLetters(spool_dir)).replay()

    backend.close()
    dead = _dead_letters(spool_dir=spool_dir)
    assert report.error is None
    assert (report.records, report.dead_lettered) == (3, 1)
    assert [(d["kind"], d["reason"]) for d in dead] == [("artifact", "local_file")]
    run_id = _run_id(client, "errors-replay", head[1])
    history = client.get_metric_history(run_id, "m")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
    assert client.get_run(run_id).info.status == "FINISHED"


# -- auth errors keep the events -------------------------------------------------------------
@pytest.mark.server
def test_expired_token_keeps_every_event_and_is_never_bisected(
    mlflow_server: MlflowServer,
    relay_factory: Callable[..., Relay],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """
    The server starts answering 401 (an expired token) while 3 batches of 1000 metrics are
    emitted: a handful of requests (one per retry), no dead letter, the failure logged as a
    state change (not once per batch); once the 401s stop, every metric lands exactly once.
    (Before: 401 was a rejection: each batch was bisected down to single rows, ~2000
    requests and 1000 dead letters per batch, and the telemetry was gone.)
    """
    relay = relay_factory(mlflow_server.url)
    experiment = f"errors-401-{uuid.uuid4().hex[:8]}"
    obs = Observability.from_env(tracking_uri=relay.url, export_timeout=5)
    try:
        with obs.run("token-expires", experiment=experiment) as run:
            obs.metric("m", 0.0, step=0)
            assert obs.flush(timeout=30)  # the run exists; now the token expires
            relay.deny = True
            seen_before = len(relay.requests)
            caplog.set_level(logging.WARNING, logger="allele.observability")
            for step in range(1, 3001):
                obs.metric("m", float(step), step=step)
            assert not obs.flush(timeout=5)  # a few retries, all refused
            under_401 = relay.requests[seen_before:]
            stats = obs.stats()
            dead_during = _dead_letters()
            relay.deny = False
            assert obs.flush(timeout=60)
    finally:
        obs.close(timeout=30)

    assert 1 <= len(under_401) <= 60  # a few per retry within the deadline; bisecting: ~6000
    assert stats.failures.get("unauthorized", 0) >= 1
    assert set(stats.failures) == {"unauthorized"}
    assert stats.metric.dead_lettered == 0
    assert stats.metric.spooled >= 3000  # kept on disk, not dropped
    assert dead_during == []
    warnings = [r.getMessage() for r in caplog.records if "credentials" in r.getMessage()]
    assert 1 <= len(warnings) <= 2  # degraded, then offline: not one line per batch
    final = obs.stats()
    assert final.metric.delivered == 3001
    assert final.metric.dead_lettered == 0
    assert final.total.spooled == 0
    assert final.is_balanced()
    client = MlflowClient(tracking_uri=mlflow_server.url)
    history = client.get_metric_history(_run_id(client, experiment, run.key), "m")
    assert sorted(m.step for m in history) == list(range(3001))
    assert _dead_letters() == []


# -- a poison row is isolated after repeated INTERNAL_ERRORs --------------------------------
@pytest.mark.parametrize("delivery_process", [False, True], ids=["thread", "worker-process"])
def test_step_overflow_in_the_lane_is_isolated_after_repeated_internal_errors(
    make_obs: Callable[..., Observability], client: MlflowClient, delivery_process: bool
) -> None:
    """
    A metric with step 2**63 reaches the exporter (written into the bus lane, as an old
    release or a bypassed check would): SQLite overflows and MLflow answers INTERNAL_ERROR,
    every time. After REPEAT_LIMIT attempts (the store answers an empty request for the
    run, so it is the rows) the batch is isolated: the 49 good metrics are delivered, the
    poison one is dead-lettered with the store's reason, nothing is pending.
    (Before: retried forever, blocking the run and the replay of everything behind it.)
    """
    obs = make_obs(delivery_process=delivery_process)
    with obs.run("poison", experiment="errors-poison") as run:
        for step in range(25):
            obs.metric("m", float(step), step=step)
        obs._bus._data.append((run.key, "m", 99.0, time.time_ns(), 2**63))
        for step in range(25, 49):
            obs.metric("m", float(step), step=step)
    assert obs.flush(timeout=90)

    stats = obs.stats()
    dead = _dead_letters()
    assert stats.metric.delivered == 49
    assert stats.metric.dead_lettered == 1
    assert stats.total.spooled == 0
    assert stats.failures.get("server_error", 0) >= REPEAT_LIMIT - 1
    assert stats.is_balanced()
    # the first failure spooled the batch: the replay isolated it (a spool record's form)
    assert [(d["kind"], d["reason"]) for d in dead] == [("batch", "server_error")]
    assert [row[3] for row in dead[0]["rows"][0]] == [2**63]
    assert "INTERNAL_ERROR" in dead[0]["message"]
    assert "isolated" in dead[0]["message"]
    run_id = _run_id(client, "errors-poison", run.key)
    assert sorted(m.step for m in client.get_metric_history(run_id, "m")) == list(range(49))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_poison_record_in_the_spool_is_isolated_and_replay_goes_on(
    store_uri: str, client: MlflowClient, tmp_path: Path
) -> None:
    """
    A spool record with a step of 2**63 among good metrics, followed by more records:
    the first REPEAT_LIMIT - 1 replays stop on it (server_error, retried later); the next
    one isolates the poison row, delivers the rest and goes on to the end.
    """
    spool_dir = tmp_path / "poison-spool"
    head = ("inst-2", "run-key-poison", "errors-poison-replay")
    good = [["m", float(i), 1_700_000_000_000 + i, i] for i in range(10)]
    poison = ["m", 7.0, 1_700_000_000_500, 2**63]
    t0 = 1_700_000_000_000
    records: list[Record] = [
        RunRecord(*head, None, "poisoned", t0, {"allele.run_key": head[1]}, None, None),
        BatchRecord(*head, None, [*good[:5], poison, *good[5:]], [["p", "1"]], [], system=False),
        BatchRecord(*head, None, [["n", 1.0, 1_700_000_000_000, 0]], [], [], system=False),
        EndRecord(*head, None, "FINISHED", 1_700_000_001_000, []),
    ]
    writer = Spool(spool_dir)
    for record in records:
        assert writer.append(encode_record(record))
    writer.flush(fsync=True)
    writer.close()
    backend = ClientBackend(store_uri)
    spool = Spool(spool_dir)
    repeats = Repeats()
    reports = []
    for _ in range(REPEAT_LIMIT):
        dead_letters = DeadLetters(spool_dir)
        replayer = Replayer(spool, backend, RunMap(spool_dir), dead_letters, repeats=repeats)
        reports.append(replayer.replay())

    backend.close()
    dead = _dead_letters(spool_dir=spool_dir)
    assert [r.error.reason if r.error else None for r in reports] == [
        *["server_error"] * (REPEAT_LIMIT - 1),
        None,
    ]
    assert {k: n for k, n in reports[-1].events.items() if n} == {
        "metric": 11,
        "param": 1,
        "run": 1,
    }
    assert [(d["kind"], d["reason"], d["rows"]) for d in dead] == [
        ("batch", "server_error", [[poison], [], [], False])
    ]
    run_id = _run_id(client, "errors-poison-replay", head[1])
    assert sorted(m.step for m in client.get_metric_history(run_id, "m")) == list(range(10))
    assert len(client.get_metric_history(run_id, "n")) == 1
    assert client.get_run(run_id).data.params == {"p": "1"}
    assert client.get_run(run_id).info.status == "FINISHED"


# -- proxies and TLS ----------------------------------------------------------------------------
def _use_proxy(
    monkeypatch: pytest.MonkeyPatch, scheme: str, url: str | None, no_proxy: str
) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    if url is not None:
        monkeypatch.setenv(f"{scheme}_proxy", url)
        monkeypatch.setenv(f"{scheme.upper()}_PROXY", url)
    if no_proxy:
        monkeypatch.setenv("no_proxy", no_proxy)
        monkeypatch.setenv("NO_PROXY", no_proxy)


@pytest.mark.server
def test_http_proxy_carries_every_call_and_artifact(
    mlflow_server: MlflowServer,
    relay_factory: Callable[..., Relay],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """
    With ``HTTP_PROXY`` set, the REST backend sends every call, artifact uploads included,
    through the proxy (absolute-URI requests), and the data lands on the server.
    (Before: the proxy was ignored; it saw nothing.)
    """
    proxy = relay_factory()
    _use_proxy(monkeypatch, "http", proxy.url, "")
    experiment = f"errors-proxy-{uuid.uuid4().hex[:8]}"
    notes = tmp_path / "notes.txt"
    notes.write_text("through the proxy")
    obs = Observability.from_env(tracking_uri=mlflow_server.url)
    with obs.run("proxied", experiment=experiment) as run:
        obs.metric("m", 1.0, step=0)
        obs.param("p", "v")
        obs.artifact(notes)
    obs.close(timeout=30)

    stats = obs.stats()
    paths = [path for _, path in proxy.requests]
    origin = mlflow_server.url
    assert stats.total.delivered >= 4  # run, metric, param, artifact
    assert stats.artifact.delivered == 1
    assert all(p.startswith(origin + "/api/2.0/") for p in paths), paths
    assert origin + "/api/2.0/mlflow/runs/log-batch" in paths
    assert any(p.startswith(origin + "/api/2.0/mlflow-artifacts/artifacts/") for p in paths)
    monkeypatch.delenv("http_proxy")
    monkeypatch.delenv("HTTP_PROXY")
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run_id = _run_id(client, experiment, run.key)
    assert [f.path for f in client.list_artifacts(run_id)] == ["notes.txt"]
    assert client.get_run(run_id).data.params == {"p": "v"}


@pytest.mark.server
def test_no_proxy_bypasses_the_proxy(
    mlflow_server: MlflowServer,
    relay_factory: Callable[..., Relay],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host listed in ``NO_PROXY`` is reached directly: the proxy sees nothing."""
    proxy = relay_factory()
    _use_proxy(monkeypatch, "http", proxy.url, "localhost,127.0.0.1")
    backend = RestBackend(mlflow_server.url, timeout=10)
    exp_id = backend.ensure_experiment(f"errors-no-proxy-{uuid.uuid4().hex[:8]}", None)
    backend.close()

    assert exp_id
    assert proxy.requests == []
    assert proxy.tunnels == []


class _TlsServer:
    """A tiny https server on 127.0.0.1 answering ``{}`` to everything (self-signed)."""

    def __init__(self, tmp_path: Path) -> None:
        from test_rest_backend import _self_signed_context  # writes cert.pem in tmp_path

        context = _self_signed_context(tmp_path)
        self.cert = tmp_path / "cert.pem"
        self.paths: list[str] = []
        paths = self.paths

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_https_proxy_tunnels_and_server_cert_path_is_trusted(
    relay_factory: Callable[..., Relay], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """
    ``HTTPS_PROXY``: an https server is reached through a CONNECT tunnel, with TLS end to
    end; ``MLFLOW_TRACKING_SERVER_CERT_PATH`` is the CA the certificate is checked against
    (without it, the self-signed certificate is refused, through the tunnel too).
    """
    from allele.observability.backends.factory import make_backend
    from allele.observability.config import Settings

    server = _TlsServer(tmp_path)
    proxy = relay_factory()
    _use_proxy(monkeypatch, "https", proxy.url, "")
    untrusting = make_backend(Settings(tracking_uri=server.url))
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(server.cert))
    trusting = make_backend(Settings(tracking_uri=server.url))
    try:
        with pytest.raises(DeliveryError) as refused:
            untrusting.end_run("r", "FINISHED", 0)
        trusting.end_run("r", "FINISHED", 0)
    finally:
        untrusting.close()
        trusting.close()
        server.close()

    where = server.url.removeprefix("https://")
    assert proxy.tunnels == [where, where]
    assert proxy.requests == []  # nothing in clear text
    assert (refused.value.reason, refused.value.retryable) == ("network_error", True)
    assert "CERTIFICATE_VERIFY_FAILED" in refused.value.message
    assert server.paths == ["/api/2.0/mlflow/runs/update"]


# -- fail fast: no MLflow retries for minutes in the experiment's process -----------------------
@pytest.mark.server
def test_artifact_upload_and_genome_registration_fail_fast_with_the_server_down(
    mlflow_server: MlflowServer, relay_factory: Callable[..., Relay], tmp_path: Path
) -> None:
    """
    With the server unreachable (the reverse relay in front of the real server closed:
    connections are refused), a REST-mode artifact upload and a genome registration fail
    at once as ``network_error``, like every other call: nothing waits on MLflow's own
    HTTP retries until the exporter abandons the call as a ``timeout``. Both are spooled,
    and delivered once the server is reachable again.
    (Before: both went through MlflowClient in this process, whose HTTP layer retried a
    refused connection for minutes: the exporter gave up on them as ``timeout`` and the
    abandoned thread went on retrying.)
    """
    notes = tmp_path / "notes.txt"
    notes.write_text("kept")
    model = f"net-{uuid.uuid4().hex[:8]}"
    relay = relay_factory(mlflow_server.url)
    port = relay.port
    obs = Observability.from_env(tracking_uri=relay.url, export_timeout=10)
    try:
        with obs.run("fail-fast", experiment="errors-fail-fast") as run:
            obs.genome([1, 2, 3], name=model, fitness=1.0)  # starts the genome worker
            assert obs.flush(timeout=90)
            before = obs.stats().failures  # starting the worker may take a while here
            relay.close()  # the server is gone
            obs.artifact(notes)
            assert not obs.flush(timeout=4)
            after_artifact = obs.stats()
            relay = relay_factory(mlflow_server.url, port)  # back
            assert obs.flush(timeout=60)
            relay.close()
            obs.genome([3, 2, 1], name=model, fitness=2.0)
            assert not obs.flush(timeout=4)
            after_genome = obs.stats()
            relay = relay_factory(mlflow_server.url, port)
        assert obs.flush(timeout=60)
    finally:
        obs.close(timeout=30)
    final = obs.stats()
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run_id = _run_id(client, "errors-fail-fast", run.key)
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    versions = client.search_model_versions(f"name = '{model}'")

    assert after_artifact.artifact.spooled == 1
    assert after_genome.genome.spooled == 1
    new = {k: n - before.get(k, 0) for k, n in after_genome.failures.items()}
    assert {k for k, n in new.items() if n} == {"network_error"}, (before, new)
    assert final.artifact.delivered == 1
    assert final.genome.delivered == 2
    assert final.total.spooled == 0
    assert final.total.dead_lettered == 0
    assert "notes.txt" in artifacts
    assert len(versions) == 2


# -- isolation never counts a row twice (pure batching logic: the in-memory backend) ----------
def test_failure_in_the_middle_of_isolation_keeps_only_the_undelivered_rows(
    tmp_path: Path,
) -> None:
    """
    A batch with one rejected row is split in halves; the network fails once while the
    second half is sent. Only the rows not yet delivered are kept (spooled, replayed):
    every good metric is counted delivered once, the bad one dead-lettered, and the
    accounting balances. (Before: the whole batch went back, and the half already
    delivered was counted again.)
    """
    from allele.observability.testing import InMemoryBackend

    backend = InMemoryBackend()
    original = backend.log_batch
    calls: list[int] = []
    delivered: list[int] = []

    def flaky(run_id: str, metrics: Any, params: Any, tags: Any) -> None:
        calls.append(len(metrics))
        if any(m[0] == "bad" for m in metrics):
            raise DeliveryError("rejected", "INVALID_PARAMETER_VALUE: bad", retryable=False)
        if len(delivered) == 1 and calls.count(-1) == 0:  # one half went through: now fail
            calls.append(-1)
            raise DeliveryError("network_error", "reset", retryable=True)
        original(run_id, metrics, params, tags)
        delivered.append(len(metrics))

    backend.log_batch = flaky  # type: ignore[method-assign]
    obs = Observability(
        backend_factory=lambda _settings: backend,
        system_metrics_interval=0,
        spool_dir=tmp_path / "spool",
    )
    with obs:
        with obs.run("flaky") as run:
            for i in range(63):
                obs.metric("good", float(i), step=i)
            obs.metric("bad", 1.0, step=63)
        assert obs.flush(timeout=60)  # after the backoff, the spool is replayed
    stats = obs.stats()

    assert run.run_id is not None
    assert sorted(s for _, s in backend.metric_history(run.run_id, "good")) == list(range(63))
    assert stats.metric.delivered == 63
    assert stats.metric.dead_lettered == 1
    assert stats.total.spooled == 0
    assert stats.is_balanced()
    assert stats.failures == {"network_error": 1}, calls


@pytest.mark.server
def test_step_out_of_int64_is_dead_lettered_not_mangled_over_rest(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """
    The server answers 200 to a step of 2**63 and stores the request mangled (step 0): the
    REST backend refuses such a row itself, so it is isolated and the batch around it is
    stored exactly.
    """
    obs = Observability.from_env(
        tracking_uri=mlflow_server.url, spool_dir=str(tmp_path / "spool"), flush_interval=0.05
    )
    with obs, obs.run("int64", experiment=f"int64-{uuid.uuid4().hex[:8]}") as run:
        for i in range(20):
            obs.metric("x", float(i), step=i)
        # Past the call's validation, as an old spool or a bug would deliver it.
        obs._bus._data.append((run.key, "poison", 1.0, time.time_ns(), 2**63))
        for i in range(20, 40):
            obs.metric("x", float(i), step=i)
        assert obs.flush(60)
    stats = obs.stats()
    client = MlflowClient(tracking_uri=mlflow_server.url)
    assert run.run_id is not None

    history = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, "x"))
    assert [(i, float(i)) for i in range(40)] == history
    assert client.get_metric_history(run.run_id, "poison") == []
    letters = [d for d in DeadLetters(tmp_path / "spool").read() if d["kind"] == "metric"]
    assert len(letters) == 1
    assert letters[0]["reason"] == "rejected"
    assert "64-bit" in letters[0]["message"]
    assert stats.metric.dead_lettered == 1
    assert stats.is_balanced()
