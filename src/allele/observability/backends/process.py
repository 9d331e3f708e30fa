"""
Run :class:`~._client.ClientBackend` in a worker process.

``MlflowClient.log_batch`` into a database store costs ~100 us of CPU per metric in the
calling process (SQLAlchemy). With the GIL, every one of those microseconds is taken from
the experiment. The worker process pays them instead; the experiment's process only
pickles rows (well under a microsecond each) and waits on a pipe.

Not ``anyio.to_process``: its workers re-run the parent's ``__main__`` module (as
multiprocessing's spawn does), which would re-run an unguarded experiment script. This
worker starts with ``python -m`` and imports nothing of the user's.

Protocol: length-prefixed pickles on the worker's stdin/stdout. Request
``(method, args, kwargs)``; reply ``(True, result)`` or ``(False, DeliveryError)``. The
first request is ``("open", (tracking_uri,), {})``: the URI, which may hold a password,
never appears in the worker's argv (``/proc/<pid>/cmdline`` is readable by every user).
Error messages coming back are redacted (by :class:`~.base.DeliveryError`).
A worker that dies or overruns its deadline is killed and replaced on the next call;
the failed call raises a retryable :class:`~._base.DeliveryError`, so the exporter
retries the batch rather than losing it.
"""

from __future__ import annotations

import abc
import contextlib
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any

from ..config import redact
from .base import DeliveryError, MetricRow, ParamRow, TagRow

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ("PipeWorker", "ProcessBackend", "kill_worker", "read_exact")

_HEADER = struct.Struct("!I")
#: seconds the worker may take to start, import MLflow and migrate a new sqlite store
STARTUP_TIMEOUT = 120.0
#: seconds close() waits for a call in flight before it kills the worker under it
CLOSE_WAIT = 0.5


def kill_worker(proc: subprocess.Popen[bytes] | None) -> None:
    """Kill a pipe worker, reap it and close its pipes (None: nothing to do)."""
    if proc is None:
        return
    try:
        proc.kill()
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    """Read ``n`` bytes from a worker pipe by ``deadline`` (TimeoutError, EOFError)."""
    chunks: list[bytes] = []
    while n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _write_frame(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


class PipeWorker(abc.ABC):
    """
    Owns a worker process spoken to over its pipes, one request at a time (under
    ``_lock``): started on first use, replaced once it died, never shared with a forked
    child (the pipes belong to the parent).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = os.getpid()

    @abc.abstractmethod
    def _spawn(self) -> subprocess.Popen[bytes]:
        """Start the worker (set ``_proc`` first, so a failed opening request kills it)."""

    def _live(self) -> subprocess.Popen[bytes]:
        """This process's worker, started if there is none or it died; hold ``_lock``."""
        if self._pid != os.getpid():  # forked: the pipes belong to the parent
            self._proc, self._pid = None, os.getpid()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._kill()
            proc = self._spawn()
        return proc

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        kill_worker(proc)


class ProcessBackend(PipeWorker):
    """
    A :class:`~._base.Backend` that forwards every call to a worker process.

    Args:
        tracking_uri: the MLflow tracking URI the worker opens.
        timeout: seconds one call may take before the worker is killed.
    """

    def __init__(self, tracking_uri: str, *, timeout: float) -> None:
        super().__init__()
        self._uri = tracking_uri
        self._timeout = timeout
        #: worker processes started so far (1 normally; more after crashes)
        self.spawned = 0

    def __repr__(self) -> str:
        return f"ProcessBackend({redact(self._uri)!r}, timeout={self._timeout:g})"

    # -- process management -------------------------------------------------------------
    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
        env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(self._timeout)))
        proc = subprocess.Popen(
            [sys.executable, "-m", __name__],  # the URI goes over the pipe, not in argv
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self.spawned += 1
        self._proc = proc
        try:
            self._roundtrip(proc, ("open", (self._uri,), {}), STARTUP_TIMEOUT)
        except BaseException:
            self._kill()
            raise
        return proc

    def _roundtrip(
        self, proc: subprocess.Popen[bytes], request: tuple[Any, ...], timeout: float
    ) -> Any:
        assert proc.stdin is not None
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        try:
            _write_frame(proc.stdin, pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL))
            fd = proc.stdout.fileno()
            (size,) = _HEADER.unpack(read_exact(fd, _HEADER.size, deadline))
            ok, value = pickle.loads(read_exact(fd, size, deadline))  # noqa: S301 - our own child
        except TimeoutError:
            self._kill()
            raise DeliveryError(
                "timeout", f"store call {request[0]} exceeded {timeout:g} s", retryable=True
            ) from None
        except (EOFError, OSError, pickle.UnpicklingError, struct.error) as exc:
            self._kill()
            raise DeliveryError(
                "unavailable", f"delivery worker died during {request[0]} ({exc!r})", retryable=True
            ) from None
        if ok:
            return value
        assert isinstance(value, DeliveryError)
        raise value

    def start(self) -> None:
        """
        Start the worker now, within ``STARTUP_TIMEOUT`` (importing MLflow and opening,
        perhaps migrating, the store take seconds): the first store call is then bounded
        by ``timeout`` like every other.
        """
        with self._lock:
            self._live()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._roundtrip(self._live(), (method, args, kwargs), self._timeout)

    # -- Backend --------------------------------------------------------------------------
    def ensure_experiment(self, name: str, artifact_location: str | None) -> str:
        """Return the id of experiment ``name``, creating it if needed."""
        return str(self._call("ensure_experiment", name, artifact_location))

    def create_run(
        self, experiment_id: str, *, run_name: str, start_time: int, tags: dict[str, str]
    ) -> str:
        """Create a run and return its id."""
        return str(
            self._call(
                "create_run", experiment_id, run_name=run_name, start_time=start_time, tags=tags
            )
        )

    def find_run(self, experiment_id: str, run_key: str) -> str | None:
        """Return the id of the run tagged ``allele.run_key = run_key``, if any."""
        found = self._call("find_run", experiment_id, run_key)
        return None if found is None else str(found)

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[MetricRow],
        params: Sequence[ParamRow],
        tags: Sequence[TagRow],
    ) -> None:
        """Log one batch."""
        self._call("log_batch", run_id, metrics, params, tags)

    def end_run(self, run_id: str, status: str, end_time: int) -> None:
        """Terminate a run."""
        self._call("end_run", run_id, status, end_time)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None) -> None:
        """Upload an artifact from the worker."""
        self._call("log_artifact", run_id, local_path, artifact_path)

    def close(self) -> None:
        """
        Stop the worker: close its stdin, wait briefly, then kill it. If a call (or the
        start) abandoned at a deadline still holds the worker, it is killed under it: the
        call then fails, and close never waits for it.
        """
        if not self._lock.acquire(timeout=CLOSE_WAIT):
            proc = self._proc
            if proc is not None and self._pid == os.getpid():
                with contextlib.suppress(OSError):
                    proc.kill()
            return
        try:
            proc = self._proc
            if proc is None or self._pid != os.getpid():
                self._proc = None
                return
            try:
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._kill()
        finally:
            self._lock.release()


def _serve() -> None:
    """Worker main loop: open the store named by the first request, answer until EOF."""
    from .client import ClientBackend, classify_exception

    backend: ClientBackend | None = None
    stdin = sys.stdin.buffer
    stdout = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing the store prints may corrupt the protocol
    fd = stdin.fileno()
    while True:
        try:
            (size,) = _HEADER.unpack(read_exact(fd, _HEADER.size, None))
            method, args, kwargs = pickle.loads(read_exact(fd, size, None))  # noqa: S301
        except EOFError:
            return
        try:
            if method == "open":  # the first request: open the store and ping it
                backend = ClientBackend(*args)
                backend.ping()
                result: Any = None
            elif backend is None:
                raise RuntimeError("the delivery worker was not opened")  # noqa: TRY301
            else:
                result = getattr(backend, method)(*args, **kwargs)
            reply: tuple[bool, Any] = (True, result)
        except Exception as exc:
            reply = (False, classify_exception(exc))  # its message is redacted
        _write_frame(stdout, pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


if __name__ == "__main__":
    _serve()
