"""
RestBackend against a real ``mlflow server`` and against tiny misbehaving servers.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import pytest
from mlflow import MlflowClient

from allele.observability.backends import rest as _rest
from allele.observability.backends.base import DeliveryError
from allele.observability.backends.rest import RestBackend
from servers import MlflowServer, free_port

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.server

TOKEN = "s3cr3t-token-value"


@pytest.fixture(name="backend")
def _backend(mlflow_server: MlflowServer) -> Iterator[RestBackend]:
    backend = RestBackend(mlflow_server.url, timeout=10)
    yield backend
    backend.close()


@pytest.fixture(name="client")
def _client(mlflow_server: MlflowServer) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server.url)


@pytest.fixture(name="run_id")
def _run_id(backend: RestBackend, request: pytest.FixtureRequest) -> str:
    exp_id = backend.ensure_experiment("rest-backend-tests", None)
    return backend.create_run(exp_id, run_name=request.node.name, start_time=_now(), tags={})


def _now() -> int:
    return int(time.time() * 1000)


# -- a real server ----------------------------------------------------------------------


def test_ensure_experiment_creates_once(backend: RestBackend, client: MlflowClient) -> None:
    """The first call creates the experiment (with its artifact location); later calls get it."""
    first = backend.ensure_experiment("exp-idempotent", "mlflow-artifacts:/custom-place")
    second = backend.ensure_experiment("exp-idempotent", None)

    exp = client.get_experiment_by_name("exp-idempotent")
    assert exp is not None
    assert first == second == exp.experiment_id
    assert exp.artifact_location == "mlflow-artifacts:/custom-place"


def test_ensure_experiment_restores_deleted(backend: RestBackend, client: MlflowClient) -> None:
    """A deleted experiment is restored and its id returned."""
    exp_id = backend.ensure_experiment("exp-deleted", None)
    client.delete_experiment(exp_id)

    again = backend.ensure_experiment("exp-deleted", None)

    assert exp_id == again
    assert client.get_experiment(exp_id).lifecycle_stage == "active"


def test_create_run_with_tags(backend: RestBackend, client: MlflowClient) -> None:
    """A run is created RUNNING with its name, start time and tags (parent included)."""
    exp_id = backend.ensure_experiment("exp-runs", None)
    parent = backend.create_run(exp_id, run_name="parent", start_time=_now(), tags={})
    start = _now()

    child = backend.create_run(
        exp_id,
        run_name="child",
        start_time=start,
        tags={"mlflow.parentRunId": parent, "suite": "smoke"},
    )

    run = client.get_run(child)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "child"
    assert start == run.info.start_time
    assert parent == run.data.tags["mlflow.parentRunId"]
    assert run.data.tags["suite"] == "smoke"


def test_log_batch_round_trip(backend: RestBackend, client: MlflowClient, run_id: str) -> None:
    """1000 metrics, then params and tags, read back exactly."""
    now = _now()
    metrics = [(f"m{i % 10}", i * 0.25 - 3.0, now + i, i // 10) for i in range(1000)]
    params = [(f"param{i}", f"value-{i}") for i in range(100)]
    tags = [(f"tag{i}", f"t-{i}") for i in range(100)]

    backend.log_batch(run_id, metrics, [], [])
    backend.log_batch(run_id, [], params, tags)

    expected = {(k, v, t, s) for k, v, t, s in metrics}
    actual = {
        (m.key, m.value, m.timestamp, m.step)
        for key in {k for k, _, _, _ in metrics}
        for m in client.get_metric_history(run_id, key)
    }
    assert expected == actual
    data = client.get_run(run_id).data
    assert dict(params) == data.params
    assert dict(tags).items() <= data.tags.items()


def test_nan_and_inf_round_trip(backend: RestBackend, client: MlflowClient, run_id: str) -> None:
    """NaN is stored as NaN; +-inf as +-1.797e308, as MLflow's own client does."""
    now = _now()

    backend.log_batch(
        run_id,
        [("x", math.nan, now, 0), ("x", math.inf, now, 1), ("x", -math.inf, now, 2)],
        [],
        [],
    )

    history = sorted(client.get_metric_history(run_id, "x"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1, 2]
    assert [now] * 3 == [m.timestamp for m in history]
    assert math.isnan(history[0].value)
    assert [m.value for m in history[1:]] == [1.7976931348623157e308, -1.7976931348623157e308]


def test_end_run(backend: RestBackend, client: MlflowClient, run_id: str) -> None:
    """end_run sets the terminal status and end time."""
    end = _now()

    backend.end_run(run_id, "FINISHED", end)

    info = client.get_run(run_id).info
    assert ("FINISHED", end) == (info.status, info.end_time)


def test_changed_param_is_rejected(backend: RestBackend, run_id: str) -> None:
    """Re-logging a param with another value is rejected for good, with MLflow's message."""
    backend.log_batch(run_id, [], [("lr", "0.1")], [])
    backend.log_batch(run_id, [], [("lr", "0.1")], [])  # the same value is a no-op

    with pytest.raises(DeliveryError) as info:
        backend.log_batch(run_id, [], [("lr", "0.2")], [])

    assert (info.value.reason, info.value.retryable) == ("rejected", False)
    assert "Changing param values is not allowed" in info.value.message


def test_numbers_are_coerced(backend: RestBackend, client: MlflowClient, run_id: str) -> None:
    """Ints, bools and float timestamps are sent as MLflow's types, not silently zeroed."""
    odd: Any = [("odd", True, 1000.7, 3.0), ("odd", 2, 2000, 4)]

    backend.log_batch(run_id, odd, [("n", 5)], [("flag", False)])  # type: ignore[list-item]

    history = sorted(client.get_metric_history(run_id, "odd"), key=lambda m: m.step)
    assert [(m.value, m.timestamp, m.step) for m in history] == [(1.0, 1000, 3), (2.0, 2000, 4)]
    data = client.get_run(run_id).data
    assert (data.params["n"], data.tags["flag"]) == ("5", "False")


def test_malformed_row_is_rejected(backend: RestBackend) -> None:
    """A row that cannot become MLflow's types is rejected before anything is sent."""
    bad: Any = [("m", None, 0, 0)]

    with pytest.raises(DeliveryError) as info:
        backend.log_batch("no-such-run", bad, [], [])

    assert (info.value.reason, info.value.retryable) == ("rejected", False)


def test_log_artifact(
    backend: RestBackend, client: MlflowClient, run_id: str, tmp_path: Path
) -> None:
    """Artifacts go through MlflowClient into the server's artifact store."""
    report = tmp_path / "report.txt"
    report.write_text("hello")

    backend.log_artifact(run_id, str(report), "reports")

    assert [f.path for f in client.list_artifacts(run_id, "reports")] == ["reports/report.txt"]


def test_threads_share_nothing(backend: RestBackend, client: MlflowClient, run_id: str) -> None:
    """Several threads log through one backend at once; every metric lands."""
    now = _now()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(5):
                backend.log_batch(run_id, [(f"t{n}", float(i), now, i)], [], [])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert [len(client.get_metric_history(run_id, f"t{n}")) for n in range(4)] == [5] * 4


# -- network failures -------------------------------------------------------------------


def test_closed_port_is_retryable_network_error() -> None:
    """Nothing listening: a retryable network_error, at once."""
    backend = RestBackend(f"http://127.0.0.1:{free_port()}", timeout=5)

    with pytest.raises(DeliveryError) as info:
        backend.end_run("r", "FINISHED", 0)

    backend.close()
    assert (info.value.reason, info.value.retryable) == ("network_error", True)


def test_silent_server_times_out() -> None:
    """A server that accepts and never answers gives a retryable timeout."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    done = threading.Event()

    listener.settimeout(30)  # the thread ends even if no client ever comes

    def accept() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        accepted.append(conn)
        done.wait(30)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    backend = RestBackend(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5)
    try:
        with pytest.raises(DeliveryError) as info:
            backend.end_run("r", "FINISHED", 0)
    finally:
        done.set()
        thread.join()
        backend.close()
        for conn in accepted:
            conn.close()
        listener.close()

    assert (info.value.reason, info.value.retryable) == ("timeout", True)


# -- tiny HTTP servers ------------------------------------------------------------------


class Seen(NamedTuple):
    """One request as a fake server saw it."""

    path: str
    authorization: str | None
    peer: tuple[str, int]


Respond = Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, str], bytes]]


class FakeServer(Protocol):
    """Starts a tiny HTTP(S) server answering every request with ``respond``."""

    def __call__(
        self, respond: Respond, tls: ssl.SSLContext | None = None
    ) -> tuple[str, list[Seen]]: ...


@pytest.fixture(name="fake_server")
def _fake_server() -> Iterator[FakeServer]:
    servers: list[ThreadingHTTPServer] = []
    threads: list[threading.Thread] = []

    def start(respond: Respond, tls: ssl.SSLContext | None = None) -> tuple[str, list[Seen]]:
        seen: list[Seen] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen.append(Seen(self.path, self.headers["Authorization"], self.client_address))
                status, headers, body = respond(self)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append(server)
        threads.append(thread)
        return f"http://127.0.0.1:{server.server_address[1]}", seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join()


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error_code": code, "message": message}).encode()


def test_503_is_retryable_server_error(fake_server: FakeServer) -> None:
    """HTTP 503 is a retryable server_error."""
    url, _ = fake_server(lambda _: (503, {}, _error("TEMPORARILY_UNAVAILABLE", "busy")))
    backend = RestBackend(url, timeout=5)

    with pytest.raises(DeliveryError) as info:
        backend.log_batch("r", [("m", 1.0, 0, 0)], [], [])

    backend.close()
    assert (info.value.reason, info.value.retryable) == ("server_error", True)


def test_429_carries_retry_after(fake_server: FakeServer) -> None:
    """HTTP 429 is rate_limited, retryable, with the server's Retry-After in seconds."""
    url, _ = fake_server(lambda _: (429, {"Retry-After": "7"}, b"slow down"))
    backend = RestBackend(url, timeout=5)

    with pytest.raises(DeliveryError) as info:
        backend.log_batch("r", [("m", 1.0, 0, 0)], [], [])

    backend.close()
    assert (
        info.value.reason,
        info.value.retryable,
        info.value.retry_after,
    ) == ("rate_limited", True, 7.0)


def test_unauthorized_is_kept_for_retry_without_secrets(fake_server: FakeServer) -> None:
    """HTTP 401 is not the events' fault: retryable ("unauthorized"), never shows the token."""
    url, seen = fake_server(lambda _: (401, {}, _error("UNAUTHENTICATED", f"bad {TOKEN}")))
    backend = RestBackend(url, timeout=5, token=TOKEN)

    with pytest.raises(DeliveryError) as info:
        backend.end_run("r", "FINISHED", 0)

    backend.close()
    assert (info.value.reason, info.value.retryable) == ("unauthorized", True)
    assert TOKEN not in str(info.value)
    assert f"Bearer {TOKEN}" == seen[0].authorization


def test_base_path_basic_auth_and_keep_alive(fake_server: FakeServer) -> None:
    """Requests go under the URI's base path, with basic auth, on one kept-alive connection."""
    url, seen = fake_server(lambda _: (200, {"Content-Type": "application/json"}, b"{}"))
    backend = RestBackend(url + "/prefix/", timeout=5, basic_auth=("ann", "pw"))

    backend.end_run("r", "FINISHED", 0)
    backend.log_batch("r", [("m", 1.0, 0, 0)], [], [])

    backend.close()
    assert [h.path for h in seen] == [
        "/prefix/api/2.0/mlflow/runs/update",
        "/prefix/api/2.0/mlflow/runs/log-batch",
    ]
    assert seen[0].authorization == "Basic YW5uOnB3"
    assert len({h.peer for h in seen}) == 1


def test_reconnects_after_server_closes_idle_connection(fake_server: FakeServer) -> None:
    """A connection the server closed after answering is replaced without an error."""

    def respond(handler: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        handler.close_connection = True  # close after answering, without saying so
        return 200, {}, b"{}"

    url, seen = fake_server(respond)
    backend = RestBackend(url, timeout=5)

    for step in range(3):
        backend.log_batch("r", [("m", 1.0, 0, step)], [], [])

    backend.close()
    assert len({h.peer for h in seen}) == 3


def test_not_mlflow_endpoint_is_kept_for_retry(fake_server: FakeServer) -> None:
    """A 404 without an MLflow error body points at the tracking URI's path; the events are
    not at fault, so it is retryable ("unavailable"): they are kept until the URI is fixed."""
    url, _ = fake_server(lambda _: (404, {"Content-Type": "text/html"}, b"<h1>Not Found</h1>"))
    backend = RestBackend(url, timeout=5)

    with pytest.raises(DeliveryError) as info:
        backend.ensure_experiment("x", None)

    backend.close()
    assert (info.value.reason, info.value.retryable) == ("unavailable", True)
    assert "tracking URI" in info.value.message


def test_calls_after_close_raise() -> None:
    """close() is idempotent; a call after it raises instead of reconnecting."""
    backend = RestBackend("http://127.0.0.1:9", timeout=1)
    backend.close()
    backend.close()

    with pytest.raises(DeliveryError) as info:
        backend.end_run("r", "FINISHED", 0)

    assert info.value.reason == "unavailable"


def test_error_messages_never_show_the_token(fake_server: FakeServer) -> None:
    """A server echoing the credentials back in an error message has them scrubbed."""
    url, _ = fake_server(lambda _: (400, {}, _error("BAD_REQUEST", f"Authorization: {TOKEN}")))
    backend = RestBackend(url, timeout=5, token=TOKEN)

    with pytest.raises(DeliveryError) as info:
        backend.end_run("r", "FINISHED", 0)

    backend.close()
    assert (info.value.reason, info.value.retryable) == ("rejected", False)
    assert TOKEN not in str(info.value)
    assert "BAD_REQUEST" in info.value.message


def _self_signed_context(tmp_path: Path) -> ssl.SSLContext:
    """A server-side TLS context with a fresh self-signed certificate for 127.0.0.1."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


def test_https_verifies_unless_insecure(fake_server: FakeServer, tmp_path: Path) -> None:
    """A self-signed certificate is refused by default and accepted with insecure_tls."""
    url, seen = fake_server(lambda _: (200, {}, b"{}"), _self_signed_context(tmp_path))
    url = url.replace("http://", "https://")
    strict = RestBackend(url, timeout=5)
    insecure = RestBackend(url, timeout=5, insecure_tls=True)

    with pytest.raises(DeliveryError) as info:
        strict.end_run("r", "FINISHED", 0)
    insecure.end_run("r", "FINISHED", 0)

    strict.close()
    insecure.close()
    assert info.value.reason == "network_error"
    assert "CERTIFICATE_VERIFY_FAILED" in info.value.message
    assert [h.path for h in seen] == ["/api/2.0/mlflow/runs/update"]


def test_stale_connection_retried_only_when_idempotent(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reused connection found dead on send is retried once, except for create_run."""

    def respond(handler: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        handler.close_connection = True
        body = {"run": {"info": {"run_id": "abc"}}}
        return 200, {}, json.dumps(body).encode()

    monkeypatch.setattr(_rest, "_dropped", lambda _: False)  # as if the FIN arrived late
    url, seen = fake_server(respond)
    backend = RestBackend(url, timeout=5)

    backend.end_run("r", "FINISHED", 0)
    backend.log_batch("r", [("m", 1.0, 0, 0)], [], [])  # stale socket: retried
    with pytest.raises(DeliveryError) as info:
        backend.create_run("1", run_name="x", start_time=0, tags={})  # stale: not retried

    backend.close()
    assert [h.path.rsplit("/", 2)[-2:] for h in seen] == [["runs", "update"], ["runs", "log-batch"]]
    assert (info.value.reason, info.value.retryable) == ("network_error", True)
