"""
``allele-obs retention``: artifacts of old runs, listed (dry run) or removed (``--apply``).

A run qualifies when it was created by this library (it has the tag ``allele.run_key``),
lives in an experiment whose name starts with ``ALLELE_MLFLOW_EXPERIMENT_PREFIX``, and
ended more than ``ALLELE_MLFLOW_ARTIFACT_RETENTION_DAYS`` days ago. Runs, params, metrics
and tags are kept; only the artifacts are removed.
"""

from __future__ import annotations

import time
from typing import Any

import click

from ..config import ConfigError, load_settings

__all__ = ("find_expired", "retention")

_DAY_MS = 86_400_000


def find_expired(client: Any, prefix: str, days: float, now_ms: int) -> list[Any]:
    """Return the library's finished runs in prefixed experiments older than ``days``."""
    experiments = [
        e for e in client.search_experiments() if e.name.startswith(prefix) or not prefix
    ]
    if not experiments:
        return []
    cutoff = now_ms - int(days * _DAY_MS)
    query = f"attributes.end_time < {cutoff} and tags.`allele.run_key` != ''"
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [e.experiment_id for e in experiments], query, max_results=1000, page_token=token
        )
        runs.extend(r for r in page if r.info.end_time and r.info.status != "RUNNING")
        token = page.token
        if not token:
            return runs


@click.command()
@click.option("--tracking-uri", help="Override ALLELE_MLFLOW_TRACKING_URI.")
@click.option("--days", type=float, help="Override ALLELE_MLFLOW_ARTIFACT_RETENTION_DAYS.")
@click.option("--apply", "apply_", is_flag=True, help="Remove the artifacts (default: list).")
def retention(tracking_uri: str | None, days: float | None, *, apply_: bool) -> None:
    """List (or with --apply remove) artifacts of runs older than the retention period."""
    overrides: dict[str, object] = {}
    if tracking_uri:
        overrides["tracking_uri"] = tracking_uri
    if days is not None:
        overrides["artifact_retention_days"] = days
    try:
        settings = load_settings(**overrides)
    except ConfigError as err:
        click.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = MlflowClient(tracking_uri=settings.tracking_uri)
    expired = find_expired(
        client,
        settings.experiment_prefix,
        settings.artifact_retention_days,
        int(time.time() * 1000),
    )
    verb = "removing" if apply_ else "would remove"
    removed = 0
    for run in expired:
        files = client.list_artifacts(run.info.run_id)
        if not files:
            continue
        age = (time.time() * 1000 - run.info.end_time) / _DAY_MS
        names = ", ".join(f.path for f in files)
        click.echo(f"{verb} {run.info.run_id} ({run.info.run_name}, {age:.0f} days): {names}")
        if apply_:
            repo: Any = get_artifact_repository(run.info.artifact_uri)
            repo.delete_artifacts()
        removed += 1
    mode = "removed" if apply_ else "dry run: add --apply to remove"
    click.echo(
        f"{removed} runs older than {settings.artifact_retention_days:g} days have artifacts "
        f"({mode})"
    )
