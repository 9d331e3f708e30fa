"""Alerts and phases as stored in MLflow (artifacts, metrics, tags), from real runs."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from allele.observability import Observability


def _records(client: Any, run_id: str, folder: str, tmp: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in client.list_artifacts(run_id, folder):
        local = client.download_artifacts(run_id, f.path, str(tmp))
        out.extend(json.loads(line) for line in Path(local).read_text().splitlines())
    return out


def _latest(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Alert id to its record with the highest occurrence count."""
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["alert_id"] not in best or r["occurrences"] > best[r["alert_id"]]["occurrences"]:
            best[r["alert_id"]] = r
    return best


@pytest.fixture(name="obs")
def _obs(store_uri: str, tmp_path: Path) -> Observability:
    return Observability.from_env(
        tracking_uri=store_uri,
        delivery_process=False,
        alert_dedupe_window=600,
        artifact_location=str(tmp_path / "artifacts"),
    )


def test_alert_is_stamped_with_its_context(obs: Observability, client: Any, tmp_path: Path) -> None:
    """An alert carries run, phase path, step, trace and span ids, host and pid."""
    with obs, obs.run("stamp", experiment="alerts") as run:
        obs.metric("fitness", 1.0, step=7)
        with obs.phase("evaluation"), obs.phase("batch"):
            alert_id = obs.alert(
                "fitness.nan", severity="error", message="NaN", attributes={"i": 3}
            )
    assert run.run_id is not None
    (record,) = _records(client, run.run_id, "allele/alerts", tmp_path)

    assert alert_id == record["alert_id"]
    assert record["run_id"] == run.run_id
    assert record["scope"] == "run"
    assert record["phase"] == "batch"
    assert ["evaluation", "batch"] == record["phase_path"]
    assert record["step"] == 7
    assert len(record["trace_id"]) == 32
    assert len(record["span_id"]) == 16
    assert record["attributes"] == {"i": 3}
    assert record["occurrences"] == 1
    tags = client.get_run(run.run_id).data.tags
    assert tags["allele.alerts.error"] == "1"
    assert tags["allele.alerts.name.fitness.nan"] == "1"
    assert [(7, 1.0)] == [
        (m.step, m.value) for m in client.get_metric_history(run.run_id, "allele.alerts.error")
    ]


def test_identical_alerts_fold_and_critical_never_do(
    obs: Observability, client: Any, tmp_path: Path
) -> None:
    """A flood of identical warnings is one record with an exact count; criticals stay apart."""
    with obs, obs.run("flood", experiment="alerts") as run:
        ids = {obs.alert("slow", severity="warning") for _ in range(500)}
        assert obs.flush(30)
        ids |= {obs.alert("slow", severity="warning") for _ in range(100)}
        crit = [obs.alert("oom", severity="critical") for _ in range(3)]
    stats = obs.stats()
    assert run.run_id is not None
    latest = _latest(_records(client, run.run_id, "allele/alerts", tmp_path))

    assert len(ids) == 1
    assert latest[ids.pop()]["occurrences"] == 600
    assert len(set(crit)) == 3
    assert all(latest[c]["occurrences"] == 1 for c in crit)
    assert stats.alert.emitted == 603
    assert stats.alert.sampled_out == 599
    assert stats.alert.delivered == 4
    assert stats.is_balanced()


def test_alert_outside_runs_hits_every_active_run(
    obs: Observability, client: Any, tmp_path: Path
) -> None:
    """A host-wide alert raised outside any run is stored in every run active at that moment."""
    ready = threading.Barrier(3)
    done = threading.Event()
    run_ids: list[str | None] = []

    def worker(n: int) -> None:
        with obs.run(f"w{n}", experiment="alerts") as run:
            ready.wait()
            done.wait(30)
        run_ids.append(run.run_id)

    with obs:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        ready.wait()
        host_alert = threading.Thread(
            target=lambda: run_ids.append(obs.alert("host.memory", severity="critical"))
        )
        host_alert.start()
        host_alert.join()
        done.set()
        for t in threads:
            t.join()
    alert_id = run_ids[0]
    runs = [r for r in run_ids[1:] if r]

    assert len(runs) == 2
    for run_id in runs:
        (record,) = _records(client, run_id, "allele/alerts", tmp_path / run_id)
        assert record["alert_id"] == alert_id
        assert record["scope"] == "process"
        assert set(runs) == set(record["correlated_run_ids"])
    assert obs.stats().alert.delivered == 1


def test_failed_run_raises_a_categorised_error_alert(
    obs: Observability, client: Any, tmp_path: Path
) -> None:
    """An exception escaping obs.run becomes an error alert categorised by its type."""
    with obs, pytest.raises(ZeroDivisionError), obs.run("fail", experiment="alerts") as run:
        _ = 1 / 0
    assert run.run_id is not None
    (record,) = _records(client, run.run_id, "allele/alerts", tmp_path)

    assert record["name"] == "run.failed"
    assert record["severity"] == "error"
    assert record["attributes"] == {"category": "numeric", "exception_type": "ZeroDivisionError"}
    assert client.get_run(run.run_id).data.tags["allele.error.category"] == "numeric"


def test_phases_are_recorded_with_their_steps(
    obs: Observability, client: Any, tmp_path: Path
) -> None:
    """Each ended phase is stored with its path, span ids and start and end steps."""
    with obs, obs.run("phases", experiment="alerts") as run:
        for gen in range(3):
            with obs.phase("generation"):
                obs.metric("x", 1.0, step=gen)
                with obs.phase("evaluation"):
                    pass
    assert run.run_id is not None
    records = _records(client, run.run_id, "allele/phases", tmp_path)
    gens = [r for r in records if r["name"] == "generation"]
    evals = [r for r in records if r["name"] == "evaluation"]

    assert len(gens) == 3
    assert [0, 1, 2] == sorted(r["end_step"] for r in gens)
    assert all(r["path"] == ["generation", "evaluation"] for r in evals)
    by_span = {r["span_id"]: r for r in gens}
    assert all(e["parent_span_id"] in by_span for e in evals)
    assert obs.stats().phase.delivered == 6


def test_invalid_alerts_raise_and_late_ones_are_counted(obs: Observability) -> None:
    """A bad severity raises naming it; an alert after close is a counted drop."""
    with obs, obs.run("bad", experiment="alerts"):
        with pytest.raises(ValueError, match="severity"):
            obs.alert("x", severity="fatal")
        with pytest.raises(TypeError, match="attribute keys"):
            obs.alert("x", attributes={1: "a"})  # type: ignore[dict-item]
    late = obs.alert("late", severity="critical")

    assert late == ""
    assert obs.stats().drop_reasons["closed"] == 1
    assert obs.stats().is_balanced()
