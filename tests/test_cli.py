"""Tests of the ``allele-obs`` command line (`allele.observability.cli`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
from click.testing import CliRunner

from allele.observability.cli import main, sqlite_path
from allele.observability.demo.matrix import run_matrix

ALLELE_OBS = Path(sys.executable).parent / "allele-obs"
GENERATIONS = 5
PROBLEMS = ("onemax", "rastrigin")
CELLS = {"pop20-mut0.01", "pop20-mut0.05", "pop50-mut0.01", "pop50-mut0.05"}
KNOBS = {
    "population_size",
    "mutation_rate",
    "crossover_rate",
    "tournament_size",
    "elitism",
    "generations",
    "seed",
    "problem",
    "genome_length",
}


def clean_env(spool: Path) -> dict[str, str]:
    """The current environment without ALLELE_MLFLOW_*, plus the test settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLELE_MLFLOW_")}
    env["ALLELE_MLFLOW_SYSTEM_METRICS_INTERVAL"] = "0"
    env["ALLELE_MLFLOW_SPOOL_DIR"] = str(spool)
    return env


@dataclass(frozen=True)
class Demo:
    """One finished ``allele-obs demo`` and a client on its store."""

    cwd: Path
    result: subprocess.CompletedProcess[str]
    client: Any
    uri: str

    def runs(self, experiment: str) -> list[Any]:
        exp = self.client.get_experiment_by_name(experiment)
        assert exp is not None, f"experiment {experiment!r} missing"
        return list(self.client.search_runs([exp.experiment_id], max_results=100))

    def parent(self, experiment: str) -> Any:
        (parent,) = [r for r in self.runs(experiment) if "mlflow.parentRunId" not in r.data.tags]
        return parent

    def children(self, experiment: str) -> list[Any]:
        return [r for r in self.runs(experiment) if "mlflow.parentRunId" in r.data.tags]


@pytest.fixture(name="demo", scope="module")
def _demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    cwd = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [str(ALLELE_OBS), "demo", "--generations", str(GENERATIONS)],
        cwd=cwd,
        env=clean_env(cwd / "spool"),
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    return Demo(cwd, result, mlflow.MlflowClient(tracking_uri=uri), uri)


@pytest.fixture(name="env")
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("ALLELE_MLFLOW_"):
            monkeypatch.delenv(key)
    for key, value in clean_env(tmp_path / "spool").items():
        if key.startswith("ALLELE_MLFLOW_"):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)


# -- allele-obs demo -------------------------------------------------------------------------
def test_demo_succeeds_into_the_default_store(demo: Demo) -> None:
    """The demo exits 0 and writes mlflow.db into the current directory."""
    assert demo.result.returncode == 0, demo.result.stderr
    assert (demo.cwd / "mlflow.db").is_file()


def test_demo_prints_where_the_data_is_and_how_to_look(demo: Demo) -> None:
    """The report names the database file, the `mlflow ui` command and a client snippet."""
    out = demo.result.stdout

    assert str(demo.cwd / "mlflow.db") in out
    assert f"mlflow ui --backend-store-uri {demo.uri}" in out
    assert f"mlflow.MlflowClient(tracking_uri={demo.uri!r})" in out
    assert "Tracked 10 runs" in out


def test_demo_prints_one_progress_line_per_cell(demo: Demo) -> None:
    """Progress goes to stderr: one line per cell naming problem and cell."""
    lines = [line for line in demo.result.stderr.splitlines() if "pop" in line]

    assert len(lines) == 8
    assert {(p, c) for p in PROBLEMS for c in CELLS} == {
        (line.split()[0], line.split()[1]) for line in lines
    }


@pytest.mark.parametrize("experiment", PROBLEMS)
def test_demo_parent_has_four_children(demo: Demo, experiment: str) -> None:
    """Each problem's experiment holds one parent run with one child run per cell."""
    parent = demo.parent(experiment)
    children = demo.children(experiment)

    assert f"{experiment}-matrix" == parent.info.run_name
    assert parent.data.tags["suite"] == "demo"
    assert {c.info.run_name for c in children} == CELLS
    assert {parent.info.run_id} == {c.data.tags["mlflow.parentRunId"] for c in children}


@pytest.mark.parametrize("experiment", PROBLEMS)
def test_demo_children_log_every_knob(demo: Demo, experiment: str) -> None:
    """Every child run has a param for every GA knob, with the cell's values."""
    for child in demo.children(experiment):
        params = child.data.params

        assert set(params) >= KNOBS
        assert experiment == params["problem"]
        assert str(GENERATIONS) == params["generations"]
        assert child.info.run_name == f"pop{params['population_size']}-mut{params['mutation_rate']}"


@pytest.mark.parametrize("experiment", PROBLEMS)
def test_demo_children_have_one_point_per_generation(demo: Demo, experiment: str) -> None:
    """fitness.best has exactly one point per generation, steps 0..GENERATIONS-1."""
    for child in demo.children(experiment):
        history = demo.client.get_metric_history(child.info.run_id, "fitness.best")

        assert list(range(GENERATIONS)) == sorted(m.step for m in history)
        assert {
            "fitness.best",
            "fitness.mean",
            "fitness.worst",
            "fitness.std",
            "diversity",
            "evaluations",
            "stagnation",
        } <= set(child.data.metrics)
        assert float(child.data.tags["result.best"]) == max(m.value for m in history)


@pytest.mark.parametrize("experiment", PROBLEMS)
def test_demo_parent_summarises_the_matrix(demo: Demo, experiment: str) -> None:
    """The parent has a best.<cell> metric per cell and the summary.json artifact."""
    parent = demo.parent(experiment)
    artifacts = [a.path for a in demo.client.list_artifacts(parent.info.run_id)]

    assert {f"best.{cell}" for cell in CELLS} <= set(parent.data.metrics)
    assert artifacts == ["summary.json"]


def test_demo_summary_matches_the_untracked_matrix(demo: Demo, tmp_path: Path) -> None:
    """summary.json holds the same results the untracked matrix computes."""
    parent = demo.parent("onemax")
    local = demo.client.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path))
    summary = json.loads(Path(local).read_text(encoding="utf-8"))
    untracked = run_matrix(None, problems=("onemax",), generations=GENERATIONS)

    assert [(r.cell, r.best, r.evaluations) for r in untracked] == [
        (c["cell"], c["best"], c["evaluations"]) for c in summary["cells"]
    ]


@pytest.mark.parametrize("experiment", PROBLEMS)
def test_demo_runs_are_finished(demo: Demo, experiment: str) -> None:
    """Every run the demo opened ended FINISHED with complete telemetry."""
    runs = demo.runs(experiment)

    assert len(runs) == 5
    assert {"FINISHED"} == {r.info.status for r in runs}
    assert {"true"} == {r.data.tags.get("allele.telemetry.complete") for r in runs}


def test_demo_with_invalid_configuration_exits_2(
    env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalid variable stops the demo before it starts, naming the variable."""
    monkeypatch.setenv("ALLELE_MLFLOW_QUEUE_SIZE", "lots")

    result = CliRunner().invoke(main, ["demo"])

    assert result.exit_code == 2
    assert "ALLELE_MLFLOW_QUEUE_SIZE" in result.stderr
    assert "Traceback" not in result.output


# -- allele-obs config -----------------------------------------------------------------------
def test_config_redacts_secrets(env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The token is shown as *** and its value never appears."""
    monkeypatch.setenv("ALLELE_MLFLOW_TRACKING_TOKEN", "s3cret")

    result = CliRunner().invoke(main, ["config"])

    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    (line,) = [ln for ln in result.stdout.splitlines() if "ALLELE_MLFLOW_TRACKING_TOKEN" in ln]
    assert "***" in line


def test_config_names_every_variable(env: None) -> None:
    """Every setting is listed under its environment variable with its value."""
    result = CliRunner().invoke(main, ["config"])

    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert rows["ALLELE_MLFLOW_SYSTEM_METRICS_INTERVAL"] == ["0", "[environment]"]
    assert rows["ALLELE_MLFLOW_TRACKING_URI"] == ["sqlite:///mlflow.db", "[default]"]


def test_config_json_redacts_secrets(env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """--json prints an object keyed by variable, with secrets as ***."""
    monkeypatch.setenv("ALLELE_MLFLOW_TRACKING_TOKEN", "s3cret")
    monkeypatch.setenv("ALLELE_MLFLOW_TRACKING_URI", "http://bob:hunter2@127.0.0.1:5000")

    result = CliRunner().invoke(main, ["config", "--json"])
    document = json.loads(result.stdout)

    assert result.exit_code == 0, result.output
    assert document["ALLELE_MLFLOW_TRACKING_TOKEN"] == "***"
    assert document["ALLELE_MLFLOW_TRACKING_URI"] == "http://bob:***@127.0.0.1:5000"
    assert "s3cret" not in result.output
    assert "hunter2" not in result.output


def test_config_invalid_value_exits_2(env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalid value exits 2 with a message naming the variable, no traceback."""
    monkeypatch.setenv("ALLELE_MLFLOW_FLUSH_INTERVAL", "abc")

    result = CliRunner().invoke(main, ["config"])

    assert result.exit_code == 2
    assert "ALLELE_MLFLOW_FLUSH_INTERVAL" in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:///mlflow.db", "{cwd}/mlflow.db"),
        ("sqlite:////data/x.db", "/data/x.db"),
        ("sqlite:///sub/x.db?timeout=5", "{cwd}/sub/x.db"),
        ("sqlite:///:memory:", None),
        ("http://127.0.0.1:5000", None),
    ],
)
def test_sqlite_path_resolves_against_the_cwd(
    env: None, tmp_path: Path, uri: str, expected: str | None
) -> None:
    """sqlite:/// URIs resolve to an absolute file; other URIs have no file."""
    want = None if expected is None else expected.format(cwd=tmp_path)

    assert want == sqlite_path(uri)
