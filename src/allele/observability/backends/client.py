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
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

from .base import DeliveryError, MetricRow, ParamRow, TagRow

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ("ClientBackend", "classify_exception")

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

#: MLflow error codes that mean "this request can never succeed as it is"
_REJECTED_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "BAD_REQUEST",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_STATE",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "FEATURE_DISABLED",
    }
)


def classify_exception(exc: BaseException) -> DeliveryError:
    """
    Map an exception raised by MLflow or its store to a :class:`DeliveryError`.
    """
    if isinstance(exc, DeliveryError):
        return exc
    code = getattr(exc, "error_code", None)
    text = f"{type(exc).__name__}: {exc}"[:2000]
    if code in _REJECTED_CODES:
        return DeliveryError("rejected", text, retryable=False)
    if isinstance(exc, ImportError):
        return DeliveryError("unavailable", text, retryable=True)
    if isinstance(exc, TimeoutError):
        return DeliveryError("timeout", text, retryable=True)
    if isinstance(exc, (ConnectionError, OSError)):
        return DeliveryError("network_error", text, retryable=True)
    return DeliveryError("server_error", text, retryable=True)


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
        """Upload a file or a directory."""
        import os

        try:
            client = self._get()
            if os.path.isdir(local_path):
                client.log_artifacts(run_id, local_path, artifact_path)
            else:
                client.log_artifact(run_id, local_path, artifact_path)
        except Exception as exc:
            raise classify_exception(exc) from None

    def close(self) -> None:
        """Drop the client."""
        self._client = None
