"""
Delivery to an http(s) tracking server by speaking MLflow's REST API directly.

``MlflowClient.log_batch`` costs ~25 us of the caller's CPU per metric over HTTP and its
HTTP layer retries for minutes. Posting the JSON with :mod:`http.client` costs a few
microseconds per metric, and every call makes exactly one attempt bounded by ``timeout``
(the exporter owns retries). Artifacts go the same way when the server proxies them
(``mlflow-artifacts:`` URIs, the default of ``mlflow server``): one ``PUT`` per file with
the same deadline, credentials, proxy and TLS; only other artifact stores (s3, ...) are
written through ``MlflowClient``.

NaN and +-inf are sent as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, as
MLflow's own client (protobuf JSON) does: a bare ``NaN`` literal is accepted with HTTP 200
by the server but the metric is stored as value 0, timestamp 0, step 0. Any value protobuf
cannot parse (a float timestamp, an int param value) is silently mangled the same way, so
every field is coerced to MLflow's type before it is sent.

Errors (all :class:`~.base.DeliveryError`; the HTTP table is in :mod:`.transport`)::

    refused, reset, DNS, TLS, proxy    network_error  retryable
    socket timeout / deadline          timeout        retryable
    HTTP 429                           rate_limited   retryable, retry_after from Retry-After
    HTTP 408, 5xx                      server_error   retryable (isolated if it repeats)
    HTTP 401, 403                      unauthorized   retryable, never split
    HTTP 404 not MLflow's, 405         unavailable    retryable (wrong URI path)
    RESOURCE_DOES_NOT_EXIST            not_found      not retryable, whole request
    FEATURE_DISABLED                   unsupported    not retryable, whole request
    HTTP 400 and other 4xx             rejected       not retryable, split to the bad rows
    an artifact's local file           local_file     not retryable, that artifact
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import threading
import time
import weakref
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from .base import DeliveryError, MetricRow, ParamRow, TagRow
from .client import ClientBackend, check_local_files, local_file_error
from .transport import ApiError, Endpoint, check

if TYPE_CHECKING:
    import socket
    from collections.abc import Sequence

__all__ = ("RestBackend",)

_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_SPECIAL_FLOATS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_STALE_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
#: artifact URIs of a run whose files the server stores itself (``--serve-artifacts``)
_PROXIED_ARTIFACTS = "mlflow-artifacts:/"
#: runs whose artifact URI is remembered
_MAX_ARTIFACT_ROOTS = 1024


class _Slot:
    """
    One thread's persistent connection; closed when the thread (and its slot) goes away.
    """

    __slots__ = ("__weakref__", "conn")

    def __init__(self) -> None:
        self.conn: http.client.HTTPConnection | None = None

    def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def __del__(self) -> None:
        self.drop()


class RestBackend:
    """
    A :class:`~._base.Backend` over MLflow's REST API 2.0 with :mod:`http.client`.

    Args:
        tracking_uri: ``http(s)://host[:port][/base/path]``.
        timeout: seconds one call may take before it raises ``DeliveryError("timeout")``.
        token: sent as ``Authorization: Bearer <token>`` (``MLFLOW_TRACKING_TOKEN``).
        basic_auth: ``(username, password)`` for HTTP basic auth (``MLFLOW_TRACKING_USERNAME``
            / ``MLFLOW_TRACKING_PASSWORD``); taken from the URI's user info if not given.
        insecure_tls: skip certificate verification (``MLFLOW_TRACKING_INSECURE_TLS=true``).
        server_cert_path: CA bundle (``MLFLOW_TRACKING_SERVER_CERT_PATH``).
        client_cert_path: client certificate and key (``MLFLOW_TRACKING_CLIENT_CERT_PATH``).

    Each thread keeps one keep-alive connection. ``HTTPS_PROXY``, ``HTTP_PROXY`` and
    ``NO_PROXY`` are honoured (see :mod:`.transport`). Artifacts the server proxies are
    uploaded like every other call; for other artifact stores ``MlflowClient`` is used,
    whose duration is bounded by MLflow's own settings, not by ``timeout``.
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        timeout: float,
        token: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        insecure_tls: bool = False,
        server_cert_path: str | None = None,
        client_cert_path: str | None = None,
    ) -> None:
        parts = urlsplit(tracking_uri)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("tracking_uri must be http(s)://host[:port][/path]")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self._endpoint = Endpoint(
            scheme,
            parts.hostname,
            parts.port,  # raises ValueError on a bad port
            insecure_tls=insecure_tls,
            server_cert_path=server_cert_path,
            client_cert_path=client_cert_path,
        )
        self._where = self._endpoint.where
        self._root = parts.path.rstrip("/")
        self._base = self._root + "/api/2.0/mlflow/"
        self._timeout = float(timeout)
        if basic_auth is None and parts.username is not None:
            basic_auth = (parts.username, parts.password or "")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self._secrets: tuple[str, ...] = ()  # scrubbed from every error message
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
            self._secrets = (token,)
        elif basic_auth is not None:
            raw = base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {raw}"
            self._secrets = tuple(x for x in (basic_auth[1], raw) if len(x) >= 4)
        self._secrets += self._endpoint.secrets
        self._artifact_roots: dict[str, str] = {}
        # The artifact client must not see credentials embedded in the URI.
        netloc = parts.netloc.rpartition("@")[2]
        self._artifacts = ClientBackend(f"{scheme}://{netloc}{parts.path}")
        self._local = threading.local()
        self._slots: weakref.WeakSet[_Slot] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False

    # -- Backend protocol ---------------------------------------------------------------

    def ensure_experiment(self, name: str, artifact_location: str | None) -> str:
        """Return the id of experiment ``name``, creating or restoring it if needed."""
        query = "experiments/get-by-name?" + urlencode({"experiment_name": name})
        for _ in range(3):  # each lost race with another process costs one round
            try:
                exp = _field(self._call("GET", query, None), "experiment")
            except ApiError as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            else:
                exp_id = str(_field(exp, "experiment_id"))
                if exp.get("lifecycle_stage") == "deleted":
                    try:
                        self._call("POST", "experiments/restore", {"experiment_id": exp_id})
                    except ApiError as exc:  # 404: someone else restored it first
                        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                            raise
                return exp_id
            body: dict[str, Any] = {"name": name}
            if artifact_location:
                body["artifact_location"] = artifact_location
            try:
                return str(_field(self._call("POST", "experiments/create", body), "experiment_id"))
            except ApiError as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        raise DeliveryError("server_error", f"experiment {name!r} kept changing", retryable=True)

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        start_time: int,
        tags: dict[str, str],
    ) -> str:
        """Create a RUNNING run and return its id (never resent: it is not idempotent)."""
        body: dict[str, Any] = {
            "experiment_id": experiment_id,
            "run_name": run_name,
            "start_time": int(start_time),
            "tags": [{"key": str(k), "value": str(v)} for k, v in tags.items()],
        }
        if tags.get("mlflow.user"):
            body["user_id"] = tags["mlflow.user"]
        resp = self._call("POST", "runs/create", body, idempotent=False)
        return str(_field(_field(_field(resp, "run"), "info"), "run_id"))

    def find_run(self, experiment_id: str, run_key: str) -> str | None:
        """Return the id of the run tagged ``allele.run_key = run_key``, if any."""
        body = {
            "experiment_ids": [experiment_id],
            "filter": f"tags.`allele.run_key` = '{run_key}'",
            "max_results": 1,
        }
        runs = self._call("POST", "runs/search", body).get("runs") or []
        return str(_field(_field(runs[0], "info"), "run_id")) if runs else None

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[MetricRow],
        params: Sequence[ParamRow],
        tags: Sequence[TagRow],
    ) -> None:
        """Log one batch (already within MLflow's limits) with one POST."""
        # Coercing to MLflow's types (see the module docstring) costs ~0.07 us per metric.
        try:
            body: dict[str, Any] = {
                "run_id": run_id,
                "metrics": [
                    {"key": str(k), "value": float(v), "timestamp": int(t), "step": int(s)}
                    for k, v, t, s in metrics
                ],
                "params": [{"key": str(k), "value": str(v)} for k, v in params],
                "tags": [{"key": str(k), "value": str(v)} for k, v in tags],
            }
        except (TypeError, ValueError, OverflowError) as exc:
            raise DeliveryError("rejected", f"malformed batch: {exc}", retryable=False) from None
        rows = body["metrics"]
        if rows:  # min/max run in C: ~0.02 us per metric
            steps, times = [m["step"] for m in rows], [m["timestamp"] for m in rows]
            if (
                min(steps) < _I64_MIN
                or max(steps) > _I64_MAX
                or min(times) < 0
                or (max(times) > _I64_MAX)
            ):
                # The server would answer 200 and store the whole request mangled (step 0).
                raise DeliveryError(
                    "rejected",
                    "a metric step or timestamp is outside the signed 64-bit range MLflow stores",
                    retryable=False,
                )
        try:
            payload = _ENCODER.encode(body)
        except ValueError:  # NaN or +-inf somewhere: the rare, slower path
            for metric in body["metrics"]:
                metric["value"] = _SPECIAL_FLOATS.get(repr(metric["value"]), metric["value"])
            payload = _ENCODER.encode(body)
        self._send("POST", "runs/log-batch", payload.encode(), idempotent=True)

    def end_run(self, run_id: str, status: str, end_time: int) -> None:
        """Set the run's terminal status and end time."""
        body = {"run_id": run_id, "status": status, "end_time": int(end_time)}
        self._call("POST", "runs/update", body)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None) -> None:
        """
        Upload a file or a directory: one ``PUT`` per file when the server stores the
        run's artifacts itself, else through ``MlflowClient`` (imported lazily).
        """
        check_local_files(local_path)
        root = self._artifact_root(run_id)
        if not root.startswith(_PROXIED_ARTIFACTS) or root.startswith("mlflow-artifacts://"):
            self._artifacts.log_artifact(run_id, local_path, artifact_path)
            return
        base = [p for p in (urlsplit(root).path.strip("/"), (artifact_path or "").strip("/")) if p]
        if os.path.isdir(local_path):
            for folder, _, files in os.walk(local_path):
                rel = os.path.relpath(folder, local_path)
                sub = [] if rel == "." else rel.split(os.sep)
                for name in sorted(files):
                    self._put_file(os.path.join(folder, name), [*base, *sub, name])
        else:
            self._put_file(local_path, [*base, os.path.basename(local_path)])

    def _artifact_root(self, run_id: str) -> str:
        root = self._artifact_roots.get(run_id)
        if root is None:
            query = "runs/get?" + urlencode({"run_id": run_id})
            info = _field(_field(self._call("GET", query, None), "run"), "info")
            root = str(info.get("artifact_uri") or "")
            if len(self._artifact_roots) >= _MAX_ARTIFACT_ROOTS:
                self._artifact_roots.clear()
            self._artifact_roots[run_id] = root
        return root

    def _put_file(self, path: str, dest: list[str]) -> None:
        endpoint = "/api/2.0/mlflow-artifacts/artifacts/" + quote("/".join(dest))
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below, after the request
        except OSError as exc:
            raise (
                local_file_error(exc, path)
                or DeliveryError("local_file", f"cannot read {path}: {exc}", retryable=False)
            ) from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            self._send("PUT", endpoint, fh, idempotent=True, size=size, absolute=True)

    def close(self) -> None:
        """Close every thread's connection. Idempotent; later calls raise ``unavailable``."""
        with self._lock:
            self._closed = True
            slots = list(self._slots)
        for slot in slots:
            slot.drop()
        self._artifacts.close()

    # -- HTTP ---------------------------------------------------------------------------

    def _call(
        self, method: str, endpoint: str, body: dict[str, Any] | None, *, idempotent: bool = True
    ) -> dict[str, Any]:
        data = None if body is None else _ENCODER.encode(body).encode()
        return self._send(method, endpoint, data, idempotent=idempotent)

    def _slot(self) -> _Slot:
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = _Slot()
            with self._lock:
                self._slots.add(slot)
        return slot

    def _send(
        self,
        method: str,
        endpoint: str,
        data: bytes | IO[bytes] | None,
        *,
        idempotent: bool,
        size: int | None = None,
        absolute: bool = False,
    ) -> dict[str, Any]:
        """
        One request (once more if a kept-alive connection turned out closed). ``data`` may
        be an open file of ``size`` bytes; ``absolute``: ``endpoint`` is a path from the
        server's base path, not from ``api/2.0/mlflow/``.
        """
        if self._closed:
            raise DeliveryError("unavailable", "the REST backend is closed", retryable=True)
        deadline = time.monotonic() + self._timeout
        what = f"{method} {endpoint.partition('?')[0]} to {self._where}"
        path = (self._root if absolute else self._base) + endpoint
        ep = self._endpoint
        target, headers = ep.target(path), ep.headers(self._headers)
        if size is not None:
            headers = {**headers, "Content-Type": "application/octet-stream"}
            headers["Content-Length"] = str(size)
        rewind = data.tell() if data is not None and not isinstance(data, bytes) else None
        slot = self._slot()
        for attempt in (0, 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeliveryError("timeout", f"{what}: out of time", retryable=True)
            conn = slot.conn
            if conn is not None and (conn.sock is None or _dropped(conn.sock)):
                slot.drop()  # the server closed the idle connection: open a new one
                conn = None
            reused = conn is not None
            if conn is None:
                conn = slot.conn = ep.connect(remaining)
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(remaining)
                if rewind is not None and not isinstance(data, bytes) and data is not None:
                    data.seek(rewind)
                conn.request(method, target, data, headers)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("deadline passed while sending")  # noqa: TRY301
                if conn.sock is not None:
                    conn.sock.settimeout(remaining)
                resp = conn.getresponse()
                raw = resp.read()
            except TimeoutError as exc:
                slot.drop()
                msg = f"{what}: no answer within {self._timeout:g} s ({exc})"
                raise DeliveryError("timeout", msg, retryable=True) from None
            except (OSError, http.client.HTTPException) as exc:
                slot.drop()
                # A kept-alive connection the server closed just as we reused it: the
                # request was not processed, so an idempotent one may go once more.
                if attempt == 0 and reused and idempotent and isinstance(exc, _STALE_ERRORS):
                    continue
                msg = f"{what}: {type(exc).__name__}: {exc}"
                raise DeliveryError("network_error", msg, retryable=True) from None
            return check(resp.status, resp.getheader("Retry-After"), raw, what, self._secrets)
        raise AssertionError("unreachable")  # pragma: no cover


def _dropped(sock: socket.socket) -> bool:
    """Whether an idle keep-alive socket is readable, i.e. closed (or garbled) by the peer."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except AttributeError:  # no poll() on this platform
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _field(obj: Any, name: str) -> Any:
    if not isinstance(obj, dict) or name not in obj:
        msg = f"unexpected response from the server: no {name!r} field"
        raise DeliveryError("server_error", msg, retryable=True)
    return obj[name]
