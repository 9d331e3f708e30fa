"""
A real ``mlflow server`` on 127.0.0.1 (the minimal start/stop of ``tests/servers.py``).

The server runs in its own process group: its workers outlive a plain SIGTERM to the
parent, so :meth:`BenchServer.stop` kills the whole group.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BenchServer:
    """``mlflow server --workers 1`` with a sqlite store in ``workdir``."""

    def __init__(self, workdir: Path, startup_timeout: float = 90.0) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "server.log"
        self.startup_seconds = float("nan")
        #: CPU seconds the server's workers had used when it was stopped (the leader is
        #: our child and reaped, so its CPU is accounted already; its children are not)
        self.cpu_at_stop = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> BenchServer:
        (self.workdir / "artifacts").mkdir(parents=True, exist_ok=True)
        argv = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{(self.workdir / 'server.db').resolve()}",
            "--artifacts-destination",
            str(self.workdir / "artifacts"),
        ]
        env = dict(os.environ)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.pop("MLFLOW_TRACKING_URI", None)
        t0 = time.perf_counter()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.log.read_text(errors="replace")[-2000:]
                self.proc = None
                raise RuntimeError(f"mlflow server exited early: {out}")
            if self._healthy():
                self.startup_seconds = time.perf_counter() - t0
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {self.startup_timeout} s")

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def cpu_seconds(self, *, descendants_only: bool = False) -> float:
        """CPU used so far by the server and its children (user + system)."""
        if self.proc is None:
            return float("nan")
        import psutil

        total = 0.0
        with contextlib.suppress(Exception):
            root = psutil.Process(self.proc.pid)
            procs = root.children(recursive=True)
            if not descendants_only:
                procs.append(root)
            for p in procs:
                with contextlib.suppress(Exception):
                    t = p.cpu_times()
                    total += t.user + t.system
        return total

    def stop(self) -> None:
        if self.proc is None:
            return
        self.cpu_at_stop = self.cpu_seconds(descendants_only=True)
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # children may linger after the leader is reaped
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.05)
