"""
A fault-injecting HTTP proxy on 127.0.0.1 in front of a real ``mlflow server``.

The tests point the library at :attr:`FaultProxy.url`; the proxy forwards every request to
the real server unless its :attr:`~FaultProxy.mode` says otherwise:

========  ================================================================================
mode      what the client sees
========  ================================================================================
pass      the real server's answer (a killed server: the connection is reset)
down      every connection reset without an answer, as from a server that is gone
401       ``401 Unauthorized`` (MLflow's basic-auth text), as with an expired token
403       ``403 Forbidden`` with MLflow's ``PERMISSION_DENIED`` body
500       ``500`` with MLflow's ``INTERNAL_ERROR`` body, as from a failing database
503       ``503 Service Unavailable`` in plain text, as from a load balancer
slow      the request is forwarded at once; the answer is held back ``delay`` seconds
          (longer than the client's timeout: the server did the work, the client retries)
========  ================================================================================

The proxy never reorders requests: a "slow" answer is delayed after the server applied the
request, so a retried request always reaches the server after the one it repeats.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ("MODES", "FaultProxy")

MODES = ("pass", "down", "401", "403", "500", "503", "slow")

#: headers that belong to one connection, not to the request or the answer
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)

_NOT_AUTHENTICATED = (
    b"You are not authenticated. Please see "
    b"https://www.mlflow.org/docs/latest/auth/index.html#authenticating-to-mlflow "
    b"on how to authenticate."
)
_CANNED: dict[str, tuple[int, str, bytes, dict[str, str]]] = {
    "401": (
        401,
        "text/plain",
        _NOT_AUTHENTICATED,
        {"WWW-Authenticate": 'Basic realm="mlflow"'},
    ),
    "403": (
        403,
        "application/json",
        b'{"error_code": "PERMISSION_DENIED", "message": "Permission denied (injected)"}',
        {},
    ),
    "500": (
        500,
        "application/json",
        b'{"error_code": "INTERNAL_ERROR", "message": "database is locked (injected)"}',
        {},
    ),
    "503": (503, "text/plain", b"Service Unavailable (injected)", {}),
}


class FaultProxy:
    """
    A threaded HTTP proxy to ``127.0.0.1:upstream_port`` whose behaviour the test switches.

    Args:
        upstream_port: the port of the real server.
        upstream_timeout: seconds the proxy waits for the real server's answer.
    """

    def __init__(self, upstream_port: int, *, upstream_timeout: float = 60.0) -> None:
        self.upstream_port = upstream_port
        self.upstream_timeout = upstream_timeout
        self.mode = "pass"
        self.delay = 0.0
        #: requests seen per mode they were answered in ("reset": upstream unreachable)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The tracking URI to give the library."""
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: str, delay: float = 0.0) -> None:
        """Switch the behaviour for every request from now on."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        with self._lock:
            self.mode, self.delay = mode, delay

    def start(self) -> FaultProxy:
        """Serve in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- used by the handler ---------------------------------------------------------------
    def current(self) -> tuple[str, float]:
        """The mode and delay in force now."""
        with self._lock:
            return self.mode, self.delay

    def count(self, what: str) -> None:
        """Count one request."""
        with self._lock:
            self.counts[what] += 1

    def forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request to the real server; raise OSError if it cannot be reached."""
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.upstream_port, timeout=self.upstream_timeout
        )
        try:
            headers = {**headers, "Host": f"127.0.0.1:{self.upstream_port}"}
            conn.request(method, path, body=body if body or method != "GET" else None,
                         headers=headers)  # fmt: skip
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        except http.client.HTTPException as exc:
            raise ConnectionResetError(str(exc)) from exc
        finally:
            conn.close()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (reset, timed out) is part of the test, not an error."""


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            """Silent: the tests read :attr:`FaultProxy.counts` instead."""

        def do_GET(self) -> None:
            self._handle()

        do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET  # noqa: N815

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _reset(self) -> None:
            """Drop the connection with a TCP reset and no answer."""
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )

        def _reply(
            self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes
        ) -> None:
            self.send_response(status, reason)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            body = self._body()
            mode, delay = proxy.current()
            if mode == "down":
                proxy.count("down")
                self._reset()
                return
            if mode in _CANNED:
                proxy.count(mode)
                status, ctype, text, extra = _CANNED[mode]
                self._reply(status, "", [("Content-Type", ctype), *extra.items()], text)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            try:
                status, reason, out_headers, data = proxy.forward(
                    self.command, self.path, headers, body
                )
            except OSError:  # the real server is down: so is the proxy, to the client
                proxy.count("reset")
                self._reset()
                return
            proxy.count(mode)
            if mode == "slow" and delay > 0:
                time.sleep(delay)
            try:
                self._reply(status, reason, out_headers, data)
            except OSError:  # the client gave up waiting
                self.close_connection = True

    return Handler
