"""
Delivery to an http(s) tracking server by speaking MLflow's REST API directly.

``MlflowClient.log_batch`` costs ~25 us of the caller's CPU per metric over HTTP and its
HTTP layer retries for minutes. Posting the JSON with :mod:`http.client` costs a few
microseconds per metric, and every call makes exactly one attempt bounded by ``timeout``
(the exporter owns retries). Artifacts, which are rare, go through ``MlflowClient``.

NaN and +-inf are sent as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, as
MLflow's own client (protobuf JSON) does: a bare ``NaN`` literal is accepted with HTTP 200
by the server but the metric is stored as value 0, timestamp 0, step 0. Any value protobuf
cannot parse (a float timestamp, an int param value) is silently mangled the same way, so
every field is coerced to MLflow's type before it is sent.

Errors (all :class:`~._base.DeliveryError`)::

    refused, reset, DNS, TLS       network_error  retryable
    socket timeout / deadline      timeout        retryable
    HTTP 429                       rate_limited   retryable, retry_after from Retry-After
    HTTP 408, 5xx                  server_error   retryable
    HTTP 401, 403, other 4xx       rejected       not retryable, MLflow's message
"""

from __future__ import annotations

import base64
import http.client
import json
import select
import ssl
import threading
import time
import weakref
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from .base import DeliveryError, MetricRow, ParamRow, TagRow
from .client import ClientBackend

if TYPE_CHECKING:
    import socket
    from collections.abc import Sequence

__all__ = ("RestBackend",)

_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_SPECIAL_FLOATS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_STALE_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
_MAX_MESSAGE = 1000


class _ApiError(DeliveryError):
    """
    A :class:`DeliveryError` from an HTTP error response, with MLflow's ``error_code``.
    """

    #: MLflow's ``error_code`` (``RESOURCE_DOES_NOT_EXIST``, ...), "" if the body had none
    error_code = ""


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

    Each thread keeps one keep-alive connection. Artifacts are uploaded by
    ``MlflowClient``, which authenticates from the ``MLFLOW_TRACKING_*`` environment and
    whose duration is bounded by MLflow's own HTTP settings, not by ``timeout``.
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        timeout: float,
        token: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        insecure_tls: bool = False,
    ) -> None:
        parts = urlsplit(tracking_uri)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("tracking_uri must be http(s)://host[:port][/path]")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self._host = parts.hostname
        self._port = parts.port  # raises ValueError on a bad port
        self._where = f"{self._host}:{self._port or (443 if scheme == 'https' else 80)}"
        self._base = parts.path.rstrip("/") + "/api/2.0/mlflow/"
        self._timeout = float(timeout)
        self._tls: ssl.SSLContext | None = None
        if scheme == "https":
            self._tls = ssl.create_default_context()
            if insecure_tls:
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE
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
            except _ApiError as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            else:
                exp_id = str(_field(exp, "experiment_id"))
                if exp.get("lifecycle_stage") == "deleted":
                    try:
                        self._call("POST", "experiments/restore", {"experiment_id": exp_id})
                    except _ApiError as exc:  # 404: someone else restored it first
                        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                            raise
                return exp_id
            body: dict[str, Any] = {"name": name}
            if artifact_location:
                body["artifact_location"] = artifact_location
            try:
                return str(_field(self._call("POST", "experiments/create", body), "experiment_id"))
            except _ApiError as exc:
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
        """Upload a file or directory through ``MlflowClient`` (imported lazily)."""
        self._artifacts.log_artifact(run_id, local_path, artifact_path)

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
        self, method: str, endpoint: str, data: bytes | None, *, idempotent: bool
    ) -> dict[str, Any]:
        if self._closed:
            raise DeliveryError("unavailable", "the REST backend is closed", retryable=True)
        deadline = time.monotonic() + self._timeout
        what = f"{method} {endpoint.partition('?')[0]} to {self._where}"
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
                conn = slot.conn = (
                    http.client.HTTPSConnection(
                        self._host, self._port, timeout=remaining, context=self._tls
                    )
                    if self._tls is not None
                    else http.client.HTTPConnection(self._host, self._port, timeout=remaining)
                )
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(remaining)
                conn.request(method, self._base + endpoint, data, self._headers)
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
            return _check(resp.status, resp.getheader("Retry-After"), raw, what, self._secrets)
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


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def _check(
    status: int, retry_after: str | None, raw: bytes, what: str, secrets: tuple[str, ...]
) -> dict[str, Any]:
    try:
        obj = json.loads(raw) if raw else {}
    except ValueError:
        obj = None
    if 200 <= status < 300:
        if not isinstance(obj, dict):
            msg = f"{what}: HTTP {status} without a JSON object (is this an MLflow server?)"
            raise DeliveryError("server_error", msg, retryable=True)
        return obj
    code, text = "", ""
    if isinstance(obj, dict):
        code, text = str(obj.get("error_code", "")), str(obj.get("message", ""))
    else:
        text = raw[:200].decode("utf-8", "replace")
    text = f"{what}: HTTP {status} {code}: {text}"
    reason, retryable, after = "rejected", False, None
    if status in (408, 429) or status >= 500:
        reason = "rate_limited" if status == 429 else "server_error"
        retryable, after = True, _retry_after(retry_after)
    elif status in (401, 403):
        text = f"{what}: HTTP {status}: the server refused our credentials (check "
        text += "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD)"
    elif status == 404 and not code:
        text += " (not an MLflow endpoint: check the tracking URI's path)"
    for secret in secrets:
        text = text.replace(secret, "***")
    error = _ApiError(reason, text[:_MAX_MESSAGE], retryable=retryable, retry_after=after)
    error.error_code = code
    raise error
