"""
A real ``mlflow server`` subprocess on 127.0.0.1 for the HTTP and fault-injection tests.

The server runs in its own process group (its worker children outlive a plain SIGTERM to
the parent), so :meth:`MlflowServer.stop` kills the whole group. :meth:`restart` brings it
back on the same port and the same stores, for kill/restart fault tests.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self

__all__ = ("MlflowServer", "free_port")

MLFLOW_BIN = Path(sys.executable).parent / "mlflow"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MlflowServer:
    """
    One ``mlflow server`` bound to 127.0.0.1 with a sqlite store in ``workdir``.

    Usable as a context manager. ``url`` is the tracking URI (``http://127.0.0.1:PORT``).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        startup_timeout: float = 60.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self._owned_tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._owned_tmp = tempfile.TemporaryDirectory(prefix="mlflow-server-")
            workdir = self._owned_tmp.name
        self.workdir = Path(workdir)
        self.port = port if port is not None else free_port()
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_path = self.workdir / "server.log"

    @property
    def url(self) -> str:
        """The tracking URI of this server."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        """The server's sqlite store (readable directly once the server has stopped)."""
        return f"sqlite:///{self.workdir / 'server.db'}"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> Self:
        """Start the server and wait until ``/health`` answers; raise with its output if not."""
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "artifacts").mkdir(exist_ok=True)
        argv = [
            str(MLFLOW_BIN),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            str(self.workdir / "artifacts"),
            *self.extra_args,
        ]
        env = dict(os.environ)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.pop("MLFLOW_TRACKING_URI", None)
        with self._log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                out = self.output()
                self.proc = None
                msg = f"mlflow server exited early:\n{out}"
                raise RuntimeError(msg)
            if self.healthy():
                return
            time.sleep(0.1)
        out = self.output()
        self.stop()
        msg = f"mlflow server not healthy after {self.startup_timeout} s:\n{out}"
        raise RuntimeError(msg)

    def healthy(self, timeout: float = 1.0) -> bool:
        """Whether ``GET /health`` answers 200 right now."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Kill the server's whole process group (SIGKILL unless ``sig`` says otherwise)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # Children may linger a moment after the leader is reaped.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.05)

    def restart(self) -> Self:
        """Stop (if running) and start again on the same port with the same stores."""
        self.stop()
        deadline = time.monotonic() + 10
        while not _port_free(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.start()

    def cleanup(self) -> None:
        """Stop the server and remove its working directory if this object created it."""
        self.stop()
        if self._owned_tmp is not None:
            self._owned_tmp.cleanup()
            self._owned_tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
