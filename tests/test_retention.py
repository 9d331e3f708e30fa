"""`allele-obs retention`: old runs' artifacts listed, then removed with --apply."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from allele.observability import Observability
from allele.observability.cli import main


def test_retention_lists_then_removes_old_artifacts(
    store_uri: str, client: Any, tmp_path: Path
) -> None:
    """Only runs past the retention period lose their artifacts, and only with --apply."""
    report = tmp_path / "report.txt"
    report.write_text("old")
    obs = Observability.from_env(
        tracking_uri=store_uri,
        delivery_process=False,
        experiment_prefix="ret_",
        artifact_location=str(tmp_path / "artifacts"),
    )
    with obs:
        with obs.run("old", experiment="e") as old:
            obs.artifact(report)
        with obs.run("new", experiment="e") as new:
            obs.artifact(report)
    assert old.run_id is not None
    assert new.run_id is not None
    forty_days_ago = int((time.time() - 40 * 86400) * 1000)
    client.set_terminated(old.run_id, end_time=forty_days_ago)
    runner = CliRunner()
    env = {"ALLELE_MLFLOW_TRACKING_URI": store_uri, "ALLELE_MLFLOW_EXPERIMENT_PREFIX": "ret_"}

    dry = runner.invoke(main, ["retention", "--days", "30"], env=env)
    assert dry.exit_code == 0, dry.output
    assert old.run_id in dry.output
    assert new.run_id not in dry.output
    assert ["report.txt"] == [f.path for f in client.list_artifacts(old.run_id)]

    applied = runner.invoke(main, ["retention", "--days", "30", "--apply"], env=env)
    assert applied.exit_code == 0, applied.output
    assert [] == client.list_artifacts(old.run_id)
    assert ["report.txt"] == [f.path for f in client.list_artifacts(new.run_id)]
