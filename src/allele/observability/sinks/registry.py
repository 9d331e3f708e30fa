"""
Genome events on their way to the model registry (or to the run only).

The bus canonicalises and validates a genome at the call; here the exporter (or a replay)
hands it to :class:`~allele.observability.genomes.GenomeRegistry`, which is idempotent
across replays and processes, so a genome spooled and replayed twice is one version.

For an http(s) tracking server the registry's ``MlflowClient`` runs in a worker process
(:class:`_Worker`), started on the first genome, whose environment alone carries
``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=EXPORT_TIMEOUT`` and
the credentials of the settings: MLflow's HTTP layer would otherwise retry for minutes in
the experiment's process, and those variables are process-wide. The exporter gives up
waiting after ``EXPORT_TIMEOUT`` as for any call; the worker is killed (a retryable
``timeout``) only if one registration overruns ``REQUESTS_PER_GENOME`` times that, so a
slow start (importing MLflow) is not paid again on every attempt.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any

from ..backends.base import DeliveryError
from ..backends.client import classify_exception
from ..backends.process import PipeWorker, read_exact

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ("GenomeSink",)

_HEADER = struct.Struct("!I")
#: seconds the worker may take to start and import MLflow
STARTUP_TIMEOUT = 60.0
#: one registration is ~10 MLflow requests, each bounded by EXPORT_TIMEOUT in the worker
REQUESTS_PER_GENOME = 10


class GenomeSink:
    """
    Registers (or logs) genome payloads; blocking, thread-safe, one registry per sink.

    Args:
        settings: tracking and registry URIs, and whether to register.
        in_process: use MLflow from this process even for an http(s) server (the worker).
    """

    def __init__(self, settings: Settings, *, in_process: bool = False) -> None:
        self._settings = settings
        self._registry: Any = None
        self._lock = threading.Lock()
        uri = settings.tracking_uri.lower()
        remote = uri.startswith(("http:", "https:")) and not in_process
        self._worker = _Worker(settings) if remote else None

    def _get(self) -> Any:
        with self._lock:
            if self._registry is None:
                from ..genomes.registry import GenomeRegistry

                s = self._settings
                self._registry = GenomeRegistry(s.tracking_uri, s.model_registry_uri)
            return self._registry

    def __call__(self, run_id: str, payload: dict[str, Any]) -> None:
        """Register or log one genome into ``run_id``; raise DeliveryError on failure."""
        if self._worker is not None:
            self._worker.call(run_id, payload)
        else:
            self.here(run_id, payload)

    def close(self) -> None:
        """Stop the worker process, if one was started."""
        if self._worker is not None:
            self._worker.close()

    def here(self, run_id: str, payload: dict[str, Any]) -> None:
        """Register or log one genome from this process."""
        from ..genomes.identity import CanonicalGenome

        s = self._settings
        genome = CanonicalGenome(payload["genome_id"], payload["text"])
        kwargs = {
            "name": payload["name"],
            "fitness": payload["fitness"],
            "generation": payload["generation"],
            "parents": payload["parents"],
            "evaluations": payload["evaluations"],
        }
        try:
            registry = self._get()
            if s.model_registry_enabled and s.auto_register_models:
                registry.register(run_id, genome, tags=payload["tags"] or None, **kwargs)
            else:
                registry.log(run_id, genome, **kwargs)
        except (TypeError, ValueError) as exc:
            raise DeliveryError("rejected", f"genome: {exc}", retryable=False) from None
        except DeliveryError:
            raise
        except Exception as exc:
            raise classify_exception(exc) from None


class _Worker(PipeWorker):
    """A worker process that registers genomes with MLflow's retries off (see above)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings
        self._timeout = settings.export_timeout

    def _spawn(self) -> subprocess.Popen[bytes]:
        s = self._settings
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(self._timeout)))
        token, basic = s.auth_token(), s.basic_auth()
        if token:
            env["MLFLOW_TRACKING_TOKEN"] = token
        if basic is not None:
            env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = basic
        proc = self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        # The settings travel on the pipe (never in argv): the URIs may hold credentials.
        config = {
            "tracking_uri": s.tracking_uri,
            "model_registry_uri": s.model_registry_uri,
            "model_registry_enabled": s.model_registry_enabled,
            "auto_register_models": s.auto_register_models,
        }
        self._roundtrip(proc, config, STARTUP_TIMEOUT)
        return proc

    def call(self, run_id: str, payload: dict[str, Any]) -> None:
        """Register one genome in the worker; raise DeliveryError on failure."""
        with self._lock:
            self._roundtrip(self._live(), (run_id, payload), REQUESTS_PER_GENOME * self._timeout)

    def _roundtrip(self, proc: subprocess.Popen[bytes], request: Any, timeout: float) -> None:
        assert proc.stdin is not None
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        try:
            _write(proc.stdin, request)
            error = _read(proc.stdout.fileno(), deadline)
        except TimeoutError:
            self._kill()
            msg = f"genome registration exceeded {timeout:g} s"
            raise DeliveryError("timeout", msg, retryable=True) from None
        except (EOFError, OSError, pickle.UnpicklingError, struct.error) as exc:
            self._kill()
            msg = f"genome worker died ({exc!r})"
            raise DeliveryError("unavailable", msg, retryable=True) from None
        if error is not None:
            assert isinstance(error, DeliveryError)
            raise error

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._kill()
            self._proc = None


def _write(stream: IO[bytes], obj: Any) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _read(fd: int, deadline: float | None) -> Any:
    (size,) = _HEADER.unpack(read_exact(fd, _HEADER.size, deadline))
    return pickle.loads(read_exact(fd, size, deadline))  # noqa: S301 - our own parent or child


def _serve() -> None:
    """Worker main loop: the settings first, then one genome per request."""
    from types import SimpleNamespace

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing MLflow prints may corrupt the protocol
    fd = stdin.fileno()
    config = _read(fd, None)
    sink = GenomeSink(SimpleNamespace(**config), in_process=True)  # type: ignore[arg-type]
    _write(stdout, None)
    while True:
        try:
            run_id, payload = _read(fd, None)
        except EOFError:
            return
        try:
            sink.here(run_id, payload)
            reply: DeliveryError | None = None
        except DeliveryError as err:
            reply = err
        except Exception as exc:
            reply = classify_exception(exc)
        _write(stdout, reply)


if __name__ == "__main__":
    _serve()
