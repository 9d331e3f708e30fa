"""Tests of ``allele-obs alerts`` and ``allele-obs correlate`` (`_cli_alerts`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from allele.observability.cli.alerts import alerts, correlate
from test_queries import BASE, Scenario, build_scenario


@pytest.fixture(name="scenario", scope="module")
def _scenario(template_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """The query scenario (see test_queries) in a sqlite store of its own."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("cli-alerts")
    shutil.copy(template_db, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return build_scenario(MlflowClient(tracking_uri=uri), "q-", tmp, uri, local=True)


@pytest.fixture(autouse=True)
def _prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands read the experiment prefix from the environment."""
    monkeypatch.setenv("ALLELE_MLFLOW_EXPERIMENT_PREFIX", "q-")


def invoke(command: click.Command, scenario: Scenario, *args: str) -> Result:
    return CliRunner().invoke(command, [*args, "--tracking-uri", scenario.uri])


def rows(result: Result) -> list[list[str]]:
    return [line.split() for line in result.stdout.splitlines()[1:]]


def listed(result: Result) -> list[str]:
    """The alert ids of a table, in order."""
    return [next(c for c in row if c.startswith("a-")) for row in rows(result)]


def test_alerts_table(scenario: Scenario) -> None:
    """One row per alert, oldest first, with severity, count, step, phase and runs."""
    result = invoke(alerts, scenario)

    assert 0 == result.exit_code, result.output
    header = result.stdout.splitlines()[0].split()
    assert ["TIME", "SEVERITY", "NAME", "COUNT", "STEP", "PHASE", "RUNS", "ALERT_ID"] == header[:8]
    table = rows(result)
    assert scenario.ids("a1", "a2", "a3", "a5", "a8", "a4", "a7") == listed(result)
    assert ["2023-11-14T22:13:40.000Z", "warning", "fitness.stagnation", "3", "10"] == table[0][:5]
    assert ["generation/evaluation", scenario.runs["A"]] == table[0][5:7]
    assert ["critical", "memory.pressure", "2", "-", "-", "3", "runs"] == table[2][1:8]


def test_alerts_filters(scenario: Scenario) -> None:
    """--severity repeats, and --run-id, --phase and --name narrow the list."""
    result = invoke(alerts, scenario, "--severity", "warning", "--severity", "error")
    narrowed = invoke(
        alerts, scenario, "--run-id", scenario.runs["B"], "--phase", "evaluation", "--name", "fit*"
    )

    assert ["warning", "error", "warning"] == [r[1] for r in rows(result)]
    assert 0 == narrowed.exit_code, narrowed.output
    assert scenario.ids("a4") == listed(narrowed)


def test_alerts_time_window(scenario: Scenario) -> None:
    """--since takes epoch seconds, --until an ISO time; an age like 2h reaches back from now."""
    since = str((BASE + 25_001) / 1000)
    result = invoke(alerts, scenario, "--since", since, "--until", "2023-11-14T22:14:25Z")
    recent = invoke(alerts, scenario, "--since", "2h")

    assert scenario.ids("a2", "a3") == listed(result)
    assert "no alerts\n" == recent.stdout


def test_alerts_bad_time_is_a_usage_error(scenario: Scenario) -> None:
    """An unreadable --since exits 2 and says which forms are accepted."""
    result = invoke(alerts, scenario, "--since", "last tuesday")

    assert 2 == result.exit_code
    assert "ISO date/time" in result.stderr


def test_alerts_json(scenario: Scenario) -> None:
    """--json prints every field, with run_ids and phase paths as lists."""
    result = invoke(alerts, scenario, "--json", "--name", "memory.pressure")

    assert 0 == result.exit_code, result.output
    (a3,) = json.loads(result.stdout)
    assert scenario.alerts["a3"] == a3["alert_id"]
    assert sorted(scenario.run_ids("A", "B", "C")) == a3["run_ids"]
    assert ("process", 2, []) == (a3["scope"], a3["occurrences"], a3["phase_path"])


def test_correlate_table(scenario: Scenario) -> None:
    """The alert, its phase, its runs and a step-by-metric table marking the alert's step."""
    result = invoke(correlate, scenario, scenario.alerts["a1"], "--window", "2")

    assert 0 == result.exit_code, result.output
    out = result.stdout
    assert f"alert {scenario.alerts['a1']}: fitness.stagnation (warning), 3 occurrence(s)" in out
    assert "phase:    generation/evaluation (2023-11-14T22:13:38.000Z" in out
    assert "span 00000000000000e1" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("METRIC"))
    assert ["METRIC", "8", "9", "10*", "11", "12"] == lines[header].split()
    assert ["diversity", "0.111111", "0.1", "0.0909091", "0.0833333", "0.0769231"] == lines[
        header + 1
    ].split()
    assert ["fitness.best", "8", "9", "10", "11", "12"] == lines[header + 2].split()
    assert any(line.startswith(scenario.runs["A"]) and "FINISHED" in line for line in lines)


def test_correlate_process_alert_json(scenario: Scenario) -> None:
    """--json gives the runs, each run's step at the alert and the metric values."""
    result = invoke(
        correlate,
        scenario,
        scenario.alerts["a3"],
        "--metric",
        "fitness.best",
        "--window",
        "0",
        "--json",
    )

    assert 0 == result.exit_code, result.output
    document = json.loads(result.stdout)
    a, b, c = scenario.run_ids("A", "B", "C")
    assert {a: 30, b: 10, c: 10} == document["steps"]
    assert {
        a: {"fitness.best": [[30, 30.0]]},
        b: {"fitness.best": [[10, 110.0]]},
        c: {"fitness.best": [[10, 1010.0]]},
    } == document["metrics"]
    assert [a, b, c] == [r["run_id"] for r in document["runs"]]
    assert document["phase"] is None


def test_correlate_unknown_alert(scenario: Scenario) -> None:
    """An unknown alert id exits 1 with one line on stderr."""
    result = invoke(correlate, scenario, "a-0000000000000000-00000000")

    assert 1 == result.exit_code
    assert "no run holds alert 'a-0000000000000000-00000000'\n" in result.stderr


def test_invalid_configuration(scenario: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalid ALLELE_MLFLOW_* variable exits 2 naming it."""
    monkeypatch.setenv("ALLELE_MLFLOW_QUEUE_SIZE", "1")

    result = invoke(alerts, scenario)

    assert 2 == result.exit_code
    assert "ALLELE_MLFLOW_QUEUE_SIZE" in result.stderr
