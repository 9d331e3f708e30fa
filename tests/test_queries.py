"""
Tests of `allele.observability.queries` against a scenario written in the storage format.

The scenario is written with a bare ``MlflowClient`` (no emitter involved), into a sqlite
store and into a real ``mlflow server``. Times are fixed: ``BASE`` is an epoch in ms.

run A  q-ga     hostA pid 100  BASE+0 .. BASE+100k FINISHED   a1 (folded 1 -> 3), a2, a3, a8
run B  q-ga     hostA pid 100  BASE+10k .. BASE+200k FINISHED a3, a4
run C  q-bench  hostA pid 100  BASE+50k .. RUNNING           a3 (2 occurrences), a5
run D  q-ga     hostB pid 7    BASE+300k .. BASE+400k        a7 (id time 10 days off)
run E  q-bench  hostB pid 8    BASE+55k .. RUNNING           no alerts
run O  other-q  hostA pid 100  BASE+5k .. BASE+500k          a6, a8 (outside the prefix)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from allele.observability.queries import AlertNotFoundError, Queries

BASE = 1_700_000_000_000
DAY = 86_400_000


@dataclasses.dataclass(frozen=True)
class Scenario:
    """Where the scenario lives: label -> run id and label -> alert id."""

    uri: str
    prefix: str
    runs: dict[str, str]
    alerts: dict[str, str]
    root: Path

    def ids(self, *labels: str) -> list[str]:
        return [self.alerts[label] for label in labels]

    def run_ids(self, *labels: str) -> list[str]:
        return [self.runs[label] for label in labels]


def make_alert_id(time_ms: int, n: int) -> str:
    return f"a-{time_ms * 1_000_000 + n:016x}-{n:08x}"


def record(
    alert_id: str,
    name: str,
    severity: str,
    time: int,
    *,
    run_id: str | None,
    step: int | None,
    path: tuple[str, ...] = (),
    occurrences: int = 1,
    last_time: int | None = None,
    correlated: list[str] | None = None,
    span_id: str | None = None,
) -> dict[str, Any]:
    """One alert record exactly as the storage spec writes it."""
    return {
        "alert_id": alert_id,
        "name": name,
        "severity": severity,
        "message": f"{name} happened",
        "attributes": {"window": 20, "nested": {"k": [1, 2]}},
        "fingerprint": f"fp-{name}",
        "time": time,
        "last_time": time if last_time is None else last_time,
        "occurrences": occurrences,
        "run_id": run_id,
        "experiment": "ga" if run_id else None,
        "phase": path[-1] if path else None,
        "phase_path": list(path),
        "step": step,
        "trace_id": "0" * 31 + "1",
        "span_id": span_id,
        "host": "hostA",
        "pid": 100,
        "scope": "run" if run_id else "process",
        "correlated_run_ids": correlated if correlated is not None else [run_id],
    }


def phase(
    name: str, path: tuple[str, ...], span: str, start: int, end: int | None, run_id: str
) -> dict[str, Any]:
    return {
        "name": name,
        "path": list(path),
        "trace_id": "0" * 31 + "1",
        "span_id": span.rjust(16, "0"),
        "parent_span_id": None,
        "start_time": start,
        "end_time": end,
        "start_step": (start - BASE) // 2000,
        "end_step": None if end is None else (end - BASE) // 2000,
        "run_id": run_id,
    }


class Writer:
    """Writes chunks, metrics and tags of the storage format with a bare MlflowClient."""

    def __init__(self, client: Any, tmp: Path) -> None:
        self.client = client
        self.tmp = tmp
        self.seq = 0

    def chunk(self, run_id: str, kind: str, lines: list[Any], time_ms: int) -> None:
        self.seq += 1
        directory = self.tmp / uuid.uuid4().hex
        directory.mkdir(parents=True)
        path = directory / f"{kind}-{self.seq:06d}-{time_ms}.jsonl"
        text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
        path.write_text(text)
        self.client.log_artifact(run_id, str(path), f"allele/{kind}")

    def metrics(self, run_id: str, key: str, points: list[tuple[int, float, int]]) -> None:
        from mlflow.entities import Metric

        rows = [Metric(key, value, ts, step) for step, value, ts in points]
        self.client.log_batch(run_id, metrics=rows, synchronous=True)


def build_scenario(client: Any, prefix: str, tmp: Path, uri: str, *, local: bool) -> Scenario:
    """Write the scenario of the module docstring; artifacts under ``tmp`` when ``local``."""
    w = Writer(client, tmp / "chunks")

    def experiment(name: str) -> str:
        location = str(tmp / "artifacts" / name) if local else None
        return str(client.create_experiment(name, artifact_location=location))

    ga, bench, other = (
        experiment(f"{prefix}ga"),
        experiment(f"{prefix}bench"),
        experiment(f"other-{prefix}"),
    )
    specs = {
        "A": (ga, 0, 100_000, "hostA", "100"),
        "B": (ga, 10_000, 200_000, "hostA", "100"),
        "C": (bench, 50_000, None, "hostA", "100"),
        "D": (ga, 300_000, 400_000, "hostB", "7"),
        "E": (bench, 55_000, None, "hostB", "8"),
        "O": (other, 5_000, 500_000, "hostA", "100"),
    }
    runs = {}
    for label, (exp, start, end, host, pid) in specs.items():
        tags = {"allele.host": host, "allele.pid": pid}
        run_id = client.create_run(exp, BASE + start, tags, run_name=f"run-{label}").info.run_id
        runs[label] = run_id
        if end is not None:
            client.set_terminated(run_id, "FINISHED", BASE + end)
    a, b, c, d, o = (runs[x] for x in "ABCDO")
    ids = {
        f"a{n}": make_alert_id(BASE + t, n)
        for n, t in [
            (1, 20_000),
            (2, 30_000),
            (3, 60_000),
            (4, 150_000),
            (5, 70_000),
            (6, 20_000),
            (8, 80_000),
        ]
    }
    ids["a7"] = make_alert_id(BASE + 10 * DAY, 7)
    gen_eval, gen_sel = ("generation", "evaluation"), ("generation", "selection")
    a1 = record(
        ids["a1"],
        "fitness.stagnation",
        "warning",
        BASE + 20_000,
        run_id=a,
        step=10,
        path=gen_eval,
        span_id="00000000000000e1",
    )
    a2 = record(
        ids["a2"],
        "metric.non_finite",
        "error",
        BASE + 30_000,
        run_id=a,
        step=15,
        path=gen_sel,
        span_id="ffffffffffffffff",
    )
    a3 = record(
        ids["a3"],
        "memory.pressure",
        "critical",
        BASE + 60_000,
        run_id=None,
        step=None,
        correlated=[a, b, c],
    )
    a8 = record(
        ids["a8"],
        "host.disk_full",
        "critical",
        BASE + 80_000,
        run_id=None,
        step=None,
        correlated=[a, o],
    )
    w.chunk(a, "alerts", [a1, a2], BASE + 31_000)
    w.chunk(
        a, "alerts", [{**a1, "occurrences": 3, "last_time": BASE + 25_000}, a3, a8], BASE + 90_000
    )
    w.chunk(b, "alerts", [a3], BASE + 61_000)
    w.chunk(
        b,
        "alerts",
        [
            record(
                ids["a4"],
                "fitness.stagnation",
                "warning",
                BASE + 150_000,
                run_id=b,
                step=28,
                path=gen_eval,
                span_id="00000000000000e2",
            )
        ],
        BASE + 151_000,
    )
    w.chunk(
        c,
        "alerts",
        [a3, record(ids["a5"], "eval.timeout", "info", BASE + 70_000, run_id=c, step=20)],
        BASE + 71_000,
    )
    w.chunk(c, "alerts", [{**a3, "occurrences": 2, "last_time": BASE + 61_000}], BASE + 72_000)
    w.chunk(
        d,
        "alerts",
        [record(ids["a7"], "late.clock", "info", BASE + 350_000, run_id=d, step=1)],
        BASE + 351_000,
    )
    w.chunk(d, "alerts", ["not json", "[1]", {"alert_id": "a-broken"}], BASE + 352_000)
    w.chunk(
        o,
        "alerts",
        [record(ids["a6"], "other.thing", "warning", BASE + 20_000, run_id=o, step=0), a8],
        BASE + 81_000,
    )
    w.chunk(
        a,
        "phases",
        [
            phase("generation", ("generation",), "a1", BASE + 15_000, BASE + 40_000, a),
            phase("evaluation", gen_eval, "e1", BASE + 18_000, BASE + 22_000, a),
            phase("selection", gen_sel, "c1", BASE + 29_000, None, a),
        ],
        BASE + 30_000,
    )
    w.chunk(
        a,
        "phases",
        [phase("selection", gen_sel, "c1", BASE + 29_000, BASE + 31_000, a)],
        BASE + 32_000,
    )
    w.chunk(
        b,
        "phases",
        [phase("evaluation", gen_eval, "e2", BASE + 140_000, BASE + 160_000, b)],
        BASE + 161_000,
    )
    steps_a = range(41)
    w.metrics(a, "fitness.best", [(s, float(s), BASE + 2000 * s) for s in steps_a])
    w.metrics(a, "diversity", [(s, 1 / (s + 1), BASE + 2000 * s) for s in steps_a])
    w.metrics(a, "system/cpu", [(s, 50.0, BASE + 2000 * s) for s in steps_a])
    w.metrics(b, "fitness.best", [(s, 100.0 + s, BASE + 10_000 + 5000 * s) for s in range(31)])
    w.metrics(c, "fitness.best", [(s, 1000.0 + s, BASE + 50_000 + 1000 * s) for s in range(51)])
    for run_id, counts in {
        a: {"warning": (10, 1), "error": (15, 1), "critical": (0, 2)},
        b: {"critical": (0, 1), "warning": (28, 1)},
        c: {"critical": (0, 1), "info": (20, 1)},
        d: {"info": (1, 1)},
        o: {"warning": (0, 1), "critical": (0, 1)},
    }.items():
        for severity, (step, n) in counts.items():
            w.metrics(run_id, f"allele.alerts.{severity}", [(step, float(n), BASE)])
            client.set_tag(run_id, f"allele.alerts.{severity}", str(n))
        client.set_tag(run_id, "allele.alerts.total", str(sum(n for _, n in counts.values())))
    return Scenario(uri, prefix, runs, ids, tmp)


@pytest.fixture(name="scenario", scope="module")
def _scenario(template_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """The scenario in a sqlite store of its own, built once for the module (read-only)."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("queries")
    shutil.copy(template_db, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return build_scenario(MlflowClient(tracking_uri=uri), "q-", tmp, uri, local=True)


@pytest.fixture(name="q")
def _q(scenario: Scenario) -> Queries:
    return Queries(scenario.uri, experiment_prefix=scenario.prefix)


def alert_ids(alerts: list[Any]) -> list[str]:
    return [a.alert_id for a in alerts]


def test_alerts_merged_over_chunks_and_runs(q: Queries, scenario: Scenario) -> None:
    """All alerts of the prefixed experiments, by time, folded records and runs merged."""
    found = q.alerts()

    assert scenario.ids("a1", "a2", "a3", "a5", "a8", "a4", "a7") == alert_ids(found)
    a1, _, a3, _, a8, _, _ = found
    assert (3, BASE + 25_000, (scenario.runs["A"],)) == (a1.occurrences, a1.last_time, a1.run_ids)
    assert (2, BASE + 61_000) == (a3.occurrences, a3.last_time)
    assert tuple(sorted(scenario.run_ids("A", "B", "C"))) == a3.run_ids
    assert (scenario.runs["A"],) == a8.run_ids  # run O is outside the prefix
    assert {"window": 20, "nested": {"k": [1, 2]}} == a1.attributes
    assert (("generation", "evaluation"), "evaluation", 10) == (a1.phase_path, a1.phase, a1.step)
    assert ("process", None, "run") == (a3.scope, a3.run_id, a1.scope)


def test_alerts_of_one_run(q: Queries, scenario: Scenario) -> None:
    """run_id reads only that run, whatever its experiment."""
    assert scenario.ids("a3", "a4") == alert_ids(q.alerts(scenario.runs["B"]))
    assert (scenario.runs["B"],) == q.alerts(scenario.runs["B"])[0].run_ids
    assert scenario.ids("a6", "a8") == alert_ids(q.alerts(scenario.runs["O"]))
    assert [] == q.alerts(scenario.runs["E"])


def test_malformed_lines_are_skipped(
    q: Queries, scenario: Scenario, caplog: pytest.LogCaptureFixture
) -> None:
    """Lines that are not alert records are skipped with a warning; the rest is read."""
    assert scenario.ids("a7") == alert_ids(q.alerts(scenario.runs["D"]))
    assert 3 == sum("skipping" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        ("evaluation", ["a1", "a4"]),
        ("generation", ["a1", "a2", "a4"]),
        ("generation/selection", ["a2"]),
        ("selection/generation", []),
    ],
)
def test_alerts_by_phase(q: Queries, scenario: Scenario, phase: str, expected: list[str]) -> None:
    """A phase matches anywhere in the alert's phase path, or as the whole path."""
    assert scenario.ids(*expected) == alert_ids(q.alerts(phase=phase))


@pytest.mark.parametrize(
    ("severity", "expected"),
    [
        ("warning", ["a1", "a4"]),
        (["error", "critical"], ["a2", "a3", "a8"]),
        (("info",), ["a5", "a7"]),
    ],
)
def test_alerts_by_severity(
    q: Queries, scenario: Scenario, severity: Any, expected: list[str]
) -> None:
    """Severity is one value or an iterable of them."""
    assert scenario.ids(*expected) == alert_ids(q.alerts(severity=severity))


def test_bad_severity(q: Queries) -> None:
    """An unknown severity is a ValueError naming the allowed ones."""
    with pytest.raises(ValueError, match="critical"):
        q.alerts(severity="fatal")


def test_alerts_by_name_and_run(q: Queries, scenario: Scenario) -> None:
    """Names match exactly or as globs, and combine with the other filters."""
    assert scenario.ids("a1", "a4") == alert_ids(q.alerts(name="fitness.stagnation"))
    assert scenario.ids("a2") == alert_ids(q.alerts(name="*.non_finite"))
    assert scenario.ids("a4") == alert_ids(
        q.alerts(scenario.runs["B"], name="fitness.*", severity="warning", phase="evaluation")
    )


def test_alerts_by_time_window(q: Queries, scenario: Scenario) -> None:
    """since/until keep alerts whose [first, last] occurrence overlaps the window."""
    until = dt.datetime.fromtimestamp((BASE + 65_000) / 1000, tz=dt.timezone.utc)

    assert scenario.ids("a1", "a2", "a3") == alert_ids(
        q.alerts(since=(BASE + 25_000) / 1000, until=until)
    )
    assert scenario.ids("a2", "a3") == alert_ids(
        q.alerts(since=(BASE + 25_001) / 1000, until=until)
    )
    assert scenario.ids("a4", "a7") == alert_ids(q.alerts(since=(BASE + 100_000) / 1000))
    with pytest.raises(TypeError, match="since"):
        q.alerts(since="yesterday")  # type: ignore[arg-type]


def test_runs_for_process_wide_alert(q: Queries, scenario: Scenario) -> None:
    """A process-wide alert's runs, with experiment names, status, host and pid."""
    refs = q.runs_for_alert(scenario.alerts["a3"])

    assert scenario.run_ids("A", "B", "C") == [r.run_id for r in refs]
    a, _, c = refs
    assert ["q-ga", "q-ga", "q-bench"] == [r.experiment for r in refs]
    assert ["FINISHED", "FINISHED", "RUNNING"] == [r.status for r in refs]
    assert (BASE, BASE + 100_000, "run-A") == (a.start_time, a.end_time, a.run_name)
    assert (None, "hostA", 100) == (c.end_time, c.host, c.pid)


def test_runs_for_alert_edge_cases(q: Queries, scenario: Scenario) -> None:
    """Correlated runs outside the prefix are found, odd id times fall back to a full scan."""
    assert scenario.run_ids("A", "O") == [r.run_id for r in q.runs_for_alert(scenario.alerts["a8"])]
    assert "other-q-" == q.runs_for_alert(scenario.alerts["a8"])[1].experiment
    assert scenario.run_ids("D") == [r.run_id for r in q.runs_for_alert(scenario.alerts["a7"])]
    assert [] == q.runs_for_alert("a-0000000000000000-00000000")
    assert [] == q.runs_for_alert("not-an-id")
    assert [] == q.runs_for_alert(scenario.alerts["a6"])  # only in a run outside the prefix


@pytest.mark.parametrize(
    ("offset", "host", "expected"),
    [
        (60_000, None, ["A", "B", "C", "E"]),
        (60_000, "hostA", ["A", "B", "C"]),
        (60_000, "hostB", ["E"]),
        (100_000, None, ["A", "B", "C", "E"]),
        (100_001, None, ["B", "C", "E"]),
        (250_000, None, ["C", "E"]),
        (350_000, "hostB", ["E", "D"]),
        (-1, None, []),
    ],
)
def test_runs_active_at(
    q: Queries, scenario: Scenario, offset: int, host: str | None, expected: list[str]
) -> None:
    """Finished runs spanning the time and running runs started before it, by host."""
    refs = q.runs_active_at((BASE + offset) / 1000, host=host)

    assert scenario.run_ids(*expected) == [r.run_id for r in refs]


def test_runs_active_at_datetime(q: Queries, scenario: Scenario) -> None:
    """The timestamp may be an aware datetime."""
    when = dt.datetime.fromtimestamp((BASE + 5_000) / 1000, tz=dt.timezone.utc)

    assert scenario.run_ids("A") == [r.run_id for r in q.runs_active_at(when)]


def test_alert_context_of_a_run_alert(q: Queries, scenario: Scenario) -> None:
    """Metrics within the window of the alert's step, without allele.alerts.* and system/*."""
    context = q.alert_context(scenario.alerts["a1"], window=2)

    a = scenario.runs["A"]
    assert {a: 10} == context.steps
    assert {
        a: {
            "diversity": [(s, 1 / (s + 1)) for s in range(8, 13)],
            "fitness.best": [(s, float(s)) for s in range(8, 13)],
        }
    } == context.metrics
    assert context.phase is not None
    assert ("evaluation", "00000000000000e1") == (context.phase.name, context.phase.span_id)
    assert [a] == [r.run_id for r in context.runs]
    assert 3 == context.alert.occurrences


def test_alert_context_phase_by_time(q: Queries, scenario: Scenario) -> None:
    """Without a matching span id the phase is found by name and time, its latest record."""
    context = q.alert_context(scenario.alerts["a2"], metrics=["fitness.best"])

    assert context.phase is not None
    assert (("generation", "selection"), BASE + 31_000) == (
        context.phase.path,
        context.phase.end_time,
    )
    assert [(s, float(s)) for s in range(10, 21)] == context.metrics[scenario.runs["A"]][
        "fitness.best"
    ]


def test_alert_context_of_a_process_alert(q: Queries, scenario: Scenario) -> None:
    """For each run hit, the window is centred on that run's step at the alert's time."""
    context = q.alert_context(scenario.alerts["a3"], metrics=["fitness.*"], window=1)

    a, b, c = scenario.run_ids("A", "B", "C")
    assert {a: 30, b: 10, c: 10} == context.steps
    assert {
        a: {"fitness.best": [(29, 29.0), (30, 30.0), (31, 31.0)]},
        b: {"fitness.best": [(9, 109.0), (10, 110.0), (11, 111.0)]},
        c: {"fitness.best": [(9, 1009.0), (10, 1010.0), (11, 1011.0)]},
    } == context.metrics
    assert context.phase is None


def test_alert_context_named_internal_metrics(q: Queries, scenario: Scenario) -> None:
    """allele.alerts.* and system/* are included when named."""
    context = q.alert_context(scenario.alerts["a1"], ["allele.alerts.*", "system/*"], window=0)

    assert {
        "allele.alerts.critical": [],
        "allele.alerts.error": [],
        "allele.alerts.warning": [(10, 1.0)],
        "system/cpu": [(10, 50.0)],
    } == context.metrics[scenario.runs["A"]]


def test_alert_context_errors(q: Queries) -> None:
    """An unknown alert is AlertNotFoundError; a negative window is a ValueError."""
    with pytest.raises(AlertNotFoundError):
        q.alert_context("a-0000000000000000-00000000")
    with pytest.raises(ValueError, match="window"):
        q.alert_context("a-0000000000000000-00000000", window=-1)


def test_phases(q: Queries, scenario: Scenario) -> None:
    """A run's phases, one per span (the ended record wins), by start time."""
    phases = q.phases(scenario.runs["A"])

    assert ["generation", "evaluation", "selection"] == [p.name for p in phases]
    assert BASE + 31_000 == phases[2].end_time


def test_from_env(monkeypatch: pytest.MonkeyPatch, scenario: Scenario) -> None:
    """from_env reads the tracking URI and the prefix; keywords override them."""
    monkeypatch.setenv("ALLELE_MLFLOW_TRACKING_URI", scenario.uri)
    monkeypatch.setenv("ALLELE_MLFLOW_EXPERIMENT_PREFIX", "q-")

    q = Queries.from_env()

    assert (scenario.uri, "q-") == (q.tracking_uri, q.experiment_prefix)
    assert "other-" == Queries.from_env(experiment_prefix="other-").experiment_prefix
    assert scenario.ids("a6", "a8") == alert_ids(
        Queries.from_env(experiment_prefix="other-").alerts()
    )


def test_new_chunks_of_ended_runs_are_seen(
    template_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached chunks are not downloaded again, and a chunk added later is read."""
    from mlflow import MlflowClient

    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    sc = build_scenario(client, "q-", tmp_path, uri, local=True)
    q = Queries(uri, experiment_prefix="q-")
    downloads: list[str] = []
    real = Queries._download

    def counting(self: Queries, run_id: str, path: str) -> Any:
        downloads.append(path)
        return real(self, run_id, path)

    monkeypatch.setattr(Queries, "_download", counting)
    assert 3 == q.alerts(sc.runs["A"])[0].occurrences
    first = len(downloads)
    rec = record(
        sc.alerts["a1"],
        "fitness.stagnation",
        "warning",
        BASE + 20_000,
        run_id=sc.runs["A"],
        step=10,
        occurrences=5,
        last_time=BASE + 99_000,
    )
    Writer(client, tmp_path / "more").chunk(sc.runs["A"], "alerts", [rec], BASE + 99_000)

    a1 = q.alerts(sc.runs["A"])[0]

    assert (5, BASE + 99_000) == (a1.occurrences, a1.last_time)
    assert 2 == first
    assert 1 == len(downloads) - first


QUERY_SCRIPT = """
import json, sys
from allele.observability.queries import Queries
q = Queries(sys.argv[1], experiment_prefix=sys.argv[2])
print(json.dumps({
    "alerts": [a.alert_id for a in q.alerts()],
    "runs": [r.run_id for r in q.runs_for_alert(sys.argv[3])],
    "active": [r.run_id for r in q.runs_active_at(float(sys.argv[4]))],
    "steps": q.alert_context(sys.argv[3], ["fitness.best"], 1).steps,
}))
"""


def test_queries_from_a_fresh_process(scenario: Scenario) -> None:
    """A new interpreter that only knows the tracking URI gets the same answers."""
    argv = [scenario.uri, "q-", scenario.alerts["a3"], str((BASE + 60_000) / 1000)]
    out = subprocess.run(
        [sys.executable, "-c", QUERY_SCRIPT, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=scenario.root,
    )

    assert 0 == out.returncode, out.stderr
    a, b, c = scenario.run_ids("A", "B", "C")
    assert {
        "alerts": scenario.ids("a1", "a2", "a3", "a5", "a8", "a4", "a7"),
        "runs": [a, b, c],
        "active": scenario.run_ids("A", "B", "C", "E"),
        "steps": {a: 30, b: 10, c: 10},
    } == json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.server
def test_against_mlflow_server(mlflow_server: Any, tmp_path: Path) -> None:
    """The same answers through a real `mlflow server`, artifacts proxied over HTTP."""
    from mlflow import MlflowClient

    prefix = f"q{uuid.uuid4().hex[:8]}-"
    client = MlflowClient(tracking_uri=mlflow_server.url)
    sc = build_scenario(client, prefix, tmp_path, mlflow_server.url, local=False)
    q = Queries(mlflow_server.url, experiment_prefix=prefix)
    experiment = client.get_experiment_by_name(f"{prefix}ga")
    assert experiment is not None
    assert experiment.artifact_location.startswith("mlflow-artifacts:")

    found = q.alerts()

    assert sc.ids("a1", "a2", "a3", "a5", "a8", "a4", "a7") == alert_ids(found)
    assert (3, 2) == (found[0].occurrences, found[2].occurrences)
    assert sc.ids("a2", "a3", "a8") == alert_ids(q.alerts(severity=["error", "critical"]))
    assert sc.ids("a1", "a4") == alert_ids(q.alerts(phase="evaluation", name="fitness.*"))
    assert sc.ids("a3", "a4") == alert_ids(q.alerts(sc.runs["B"]))
    assert sc.run_ids("A", "B", "C") == [r.run_id for r in q.runs_for_alert(sc.alerts["a3"])]
    assert sc.run_ids("A", "O") == [r.run_id for r in q.runs_for_alert(sc.alerts["a8"])]
    active = q.runs_active_at((BASE + 60_000) / 1000, host="hostA")
    assert sc.run_ids("A", "B", "C") == [r.run_id for r in active]
    assert sc.run_ids("C", "E") == [r.run_id for r in q.runs_active_at((BASE + 250_000) / 1000)]
    context = q.alert_context(sc.alerts["a1"], window=1)
    assert {
        sc.runs["A"]: {
            "diversity": [(s, 1 / (s + 1)) for s in (9, 10, 11)],
            "fitness.best": [(9, 9.0), (10, 10.0), (11, 11.0)],
        }
    } == context.metrics
    assert context.phase is not None
    assert "evaluation" == context.phase.name
    steps = q.alert_context(sc.alerts["a3"], ["fitness.best"], window=0).steps
    assert dict(zip(sc.run_ids("A", "B", "C"), (30, 10, 10), strict=True)) == steps
