"""Shared fixtures: a clean environment and a real, pre-migrated sqlite MLflow store."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from allele.observability import Observability
from servers import MlflowServer


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts with no ALLELE_MLFLOW_* or MLflow variables, spool in tmp_path."""
    for name in list(os.environ):
        if name.startswith(("ALLELE_MLFLOW_", "MLFLOW_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ALLELE_MLFLOW_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("ALLELE_MLFLOW_SYSTEM_METRICS_INTERVAL", "0")


@pytest.fixture(name="template_db", scope="session")
def _template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sqlite store migrated once (MLflow's migrations take ~1.5 s per new file)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(name="store_uri")
def _store_uri(template_db: Path, tmp_path: Path) -> str:
    """A fresh, already-migrated sqlite tracking URI in this test's temp dir."""
    path = tmp_path / "mlflow.db"
    shutil.copy(template_db, path)
    return f"sqlite:///{path}"


@pytest.fixture(name="make_obs")
def _make_obs(store_uri: str) -> Iterator[Callable[..., Observability]]:
    """Build Observability instances on the test store; all are closed at teardown."""
    made: list[Observability] = []

    def make(**overrides: Any) -> Observability:
        overrides.setdefault("tracking_uri", store_uri)
        overrides.setdefault("delivery_process", False)
        obs = Observability.from_env(**overrides)
        made.append(obs)
        return obs

    yield make
    for obs in made:
        obs.close(timeout=10)


@pytest.fixture(name="mlflow_server", scope="session")
def _mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real `mlflow server` on 127.0.0.1 for the whole session (killed by PID)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(name="client")
def _client(store_uri: str) -> Any:
    """An MlflowClient on the test store, to read back what was delivered."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store_uri)
