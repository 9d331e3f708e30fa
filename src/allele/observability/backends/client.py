"""
Delivery through ``mlflow.MlflowClient``: any store MLflow supports.

This is the reference backend. For database stores it runs inside a worker process
(:mod:`.process`), so SQLAlchemy's ~100 us of CPU per metric is not taken from the
experiment; for http(s) stores :mod:`.rest` speaks the REST API directly and uses this
backend for artifacts only. MLflow is imported lazily, here and nowhere else.

Fork safety: MLflow caches one SQLAlchemy engine per database URI in class attributes of
its stores. A forked child (a ``multiprocessing`` worker) inherits them with the parent's
connection pool, possibly in the middle of a call the parent's exporter was making, and
would share its connections or wait forever on its pool's lock. In the child, every such
engine gets a fresh pool (``Engine.dispose(close=False)``, SQLAlchemy's recipe for forked
processes: the parent's connections are left alone) and the cache's lock is replaced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

from .base import RETRYABLE_REASONS, DeliveryError, MetricRow, ParamRow, TagRow

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = (
    "CODE_REASONS",
    "ClientBackend",
    "check_local_files",
    "classify_exception",
    "local_file_error",
)

#: MLflow's store classes that cache an engine per database URI (``_engine_map``)
_ENGINE_CACHES = (
    ("mlflow.store.tracking.sqlalchemy_store", "SqlAlchemyStore"),
    ("mlflow.store.model_registry.sqlalchemy_store", "SqlAlchemyStore"),
    ("mlflow.store.jobs.sqlalchemy_store", "SqlAlchemyJobStore"),
)


def _fresh_engines_in_child() -> None:
    """In a forked child: new pools for MLflow's cached engines (see the module docs)."""
    for module_name, class_name in _ENGINE_CACHES:
        store = getattr(sys.modules.get(module_name), class_name, None)
        engines = getattr(store, "_engine_map", None)
        if not isinstance(engines, dict):
            continue
        for engine in list(engines.values()):
            with contextlib.suppress(Exception):
                engine.dispose(close=False)
        if hasattr(store, "_engine_map_lock"):
            setattr(store, "_engine_map_lock", threading.Lock())  # noqa: B010 - MLflow's private


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_engines_in_child)

#: MLflow error codes and the reason they mean (see the table in :mod:`.base`); any other
#: code (INTERNAL_ERROR, ...) is a ``server_error``
CODE_REASONS = {
    # some rows of the request are invalid: split it to find them
    "INVALID_PARAMETER_VALUE": "rejected",
    "BAD_REQUEST": "rejected",
    "MALFORMED_REQUEST": "rejected",
    "RESOURCE_ALREADY_EXISTS": "rejected",
    # the target is gone: the whole request fails, whatever its rows
    "RESOURCE_DOES_NOT_EXIST": "not_found",
    "NOT_FOUND": "not_found",
    "INVALID_STATE": "not_found",
    "FEATURE_DISABLED": "unsupported",
    "NOT_IMPLEMENTED": "unsupported",
    # not the events' fault: keep them and retry
    "UNAUTHENTICATED": "unauthorized",
    "PERMISSION_DENIED": "unauthorized",
    "CUSTOMER_UNAUTHORIZED": "unauthorized",
    "UNAUTHORIZED": "unauthorized",
    "REQUEST_LIMIT_EXCEEDED": "rate_limited",
    "RESOURCE_EXHAUSTED": "rate_limited",
    "TEMPORARILY_UNAVAILABLE": "unavailable",
    "ENDPOINT_NOT_FOUND": "unavailable",
}
#: errno values of a local file that cannot be read (the event's problem, not the store's)
_LOCAL_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP}
)


def classify_exception(exc: BaseException) -> DeliveryError:
    """
    Map an exception raised by MLflow or its store to a :class:`DeliveryError`.
    """
    if isinstance(exc, DeliveryError):
        return exc
    code = getattr(exc, "error_code", None)
    named = f"{code}: " if isinstance(code, str) and code and code not in str(exc) else ""
    text = f"{type(exc).__name__}: {named}{exc}"[:2000]
    reason = CODE_REASONS.get(code) if isinstance(code, str) else None
    if reason is not None:
        return DeliveryError(reason, text, retryable=reason in RETRYABLE_REASONS)
    if isinstance(exc, ImportError):
        return DeliveryError("unavailable", text, retryable=True)
    # MLflow's HTTP client wraps a refused connection or a timeout in an MlflowException
    # (INTERNAL_ERROR): what failed is the network, not the server.
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None:
            break
        if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
            return DeliveryError("timeout", text, retryable=True)
        if isinstance(cause, OSError):
            return DeliveryError("network_error", text, retryable=True)
        cause = cause.__cause__ or cause.__context__
    return DeliveryError("server_error", text, retryable=True)


def check_local_files(local_path: str) -> None:
    """
    Raise ``DeliveryError("local_file")`` unless every file of the artifact at
    ``local_path`` (a file, or a directory walked recursively) can be opened for reading.
    """

    def fail(exc: OSError) -> None:
        raise exc

    try:
        if os.path.isdir(local_path):
            for root, _, files in os.walk(local_path, onerror=fail):
                for name in files:
                    with open(os.path.join(root, name), "rb"):
                        pass
        else:
            with open(local_path, "rb"):
                pass
    except OSError as exc:
        msg = f"cannot read the artifact's local file: {type(exc).__name__}: {exc}"
        raise DeliveryError("local_file", msg, retryable=False) from None


def local_file_error(exc: BaseException, local_path: str) -> DeliveryError | None:
    """
    ``DeliveryError("local_file")`` if ``exc`` is about reading ``local_path`` (or a file
    under it), e.g. the file was deleted during the upload; None if it is the store's.
    """
    if not isinstance(exc, OSError) or exc.errno not in _LOCAL_ERRNOS or not exc.filename:
        return None
    name = os.path.abspath(os.fsdecode(exc.filename))
    root = os.path.abspath(local_path)
    if name != root and not name.startswith(root.rstrip(os.sep) + os.sep):
        return None
    msg = f"cannot read the artifact's local file: {type(exc).__name__}: {exc}"
    return DeliveryError("local_file", msg, retryable=False)


class ClientBackend:
    """
    A :class:`~._base.Backend` over ``mlflow.MlflowClient``.

    Args:
        tracking_uri: the MLflow tracking URI.
    """

    def __init__(self, tracking_uri: str) -> None:
        self._uri = tracking_uri
        self._client: Any = None
        self._entities: Any = None

    def _get(self) -> Any:
        if self._client is None:
            try:
                import mlflow.entities
                from mlflow import MlflowClient
            except ImportError as exc:
                raise DeliveryError(
                    "unavailable",
                    f"MLflow is not importable ({exc}); install it with "
                    "`pip install allele-observability` (mlflow-skinny, sqlalchemy, alembic)",
                    retryable=True,
                ) from None
            self._entities = mlflow.entities
            self._client = MlflowClient(tracking_uri=self._uri)
        return self._client

    def ping(self) -> None:
        """Open the store (runs the sqlite migrations on first use)."""
        try:
            self._get().search_experiments(max_results=1)
        except Exception as exc:
            raise classify_exception(exc) from None

    def ensure_experiment(self, name: str, artifact_location: str | None) -> str:
        """Return the id of experiment ``name``, creating or restoring it if needed."""
        try:
            client = self._get()
            exp = client.get_experiment_by_name(name)
            if exp is None:
                try:
                    return str(client.create_experiment(name, artifact_location=artifact_location))
                except Exception as exc:
                    if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp = client.get_experiment_by_name(name)  # lost a race with another process
                    if exp is None:
                        raise
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return str(exp.experiment_id)
        except Exception as exc:
            raise classify_exception(exc) from None

    def create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        start_time: int,
        tags: dict[str, str],
    ) -> str:
        """Create a RUNNING run and return its id."""
        try:
            run = self._get().create_run(
                experiment_id, start_time=start_time, tags=tags, run_name=run_name
            )
            return str(run.info.run_id)
        except Exception as exc:
            raise classify_exception(exc) from None

    def find_run(self, experiment_id: str, run_key: str) -> str | None:
        """Return the id of the run tagged ``allele.run_key = run_key``, if any."""
        try:
            runs = self._get().search_runs(
                [experiment_id], f"tags.`allele.run_key` = '{run_key}'", max_results=1
            )
        except Exception as exc:
            raise classify_exception(exc) from None
        return str(runs[0].info.run_id) if runs else None

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[MetricRow],
        params: Sequence[ParamRow],
        tags: Sequence[TagRow],
    ) -> None:
        """Log one batch synchronously (never through MLflow's async queue)."""
        try:
            client = self._get()
            ent = self._entities
            metric = ent.Metric
            client.log_batch(
                run_id,
                metrics=[metric(k, v, t, s) for k, v, t, s in metrics],
                params=[ent.Param(k, v) for k, v in params],
                tags=[ent.RunTag(k, v) for k, v in tags],
                synchronous=True,
            )
        except Exception as exc:
            raise classify_exception(exc) from None

    def end_run(self, run_id: str, status: str, end_time: int) -> None:
        """Set the terminal status and end time."""
        try:
            self._get().set_terminated(run_id, status=status, end_time=end_time)
        except Exception as exc:
            raise classify_exception(exc) from None

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None) -> None:
        """
        Upload a file or a directory. A local file that cannot be read is the artifact's
        problem (``local_file``, not retryable), not the store's.
        """
        check_local_files(local_path)
        try:
            client = self._get()
            if os.path.isdir(local_path):
                client.log_artifacts(run_id, local_path, artifact_path)
            else:
                client.log_artifact(run_id, local_path, artifact_path)
        except Exception as exc:
            raise (local_file_error(exc, local_path) or classify_exception(exc)) from None

    def close(self) -> None:
        """Drop the client."""
        self._client = None
