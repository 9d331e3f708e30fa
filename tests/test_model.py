"""
Model-based tests (issue 9, item 9): hypothesis drives random interleavings of emits (poison
values among them), runs, flushes, exporter restarts, forked children and store faults
against a real sqlite store or a real ``mlflow server`` behind a fault-injecting proxy
(``tests/faults.py``), while a plain-Python model records what was promised. After every
step the accounting balances; after every example, with the faults lifted and the
instance closed, MLflow and the model agree: every event delivered exactly once (metric
history per key, no duplicates; params, tags, alerts, phases, artifacts, genomes), or
dead-lettered with its reason when the model says it may be (an artifact whose file was
deleted), and nothing is pending or left in the spool.

``ALLELE_MODEL_EXAMPLES`` and ``ALLELE_MODEL_STEPS`` raise the search for a deeper local run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sqlite3
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from mlflow import MlflowClient

from allele.observability import GenomeRegistry, Observability
from allele.observability.queries import Queries
from allele.observability.sinks.deadletter import DeadLetters
from faults import FaultProxy
from servers import MlflowServer

#: bound on a forked child's life and on the final close (a hang fails the example)
HANG_GUARD = 60
EXAMPLES = int(os.environ.get("ALLELE_MODEL_EXAMPLES", "8"))
STEPS = int(os.environ.get("ALLELE_MODEL_STEPS", "20"))
#: per test: a deeper search (more examples or steps) gets the time it needs
TEST_TIMEOUT = max(600, EXAMPLES * STEPS * 4)
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
#: what every instance is built with: small deadlines, frequent rounds, no folding
BASE_OVERRIDES: dict[str, Any] = {
    "export_timeout": 1.5,
    "flush_interval": 0.1,
    "shutdown_timeout": 5.0,
    "alert_dedupe_window": 0.0,
    "system_metrics_interval": 0.0,
}
METRIC_NAMES = ("loss", "fitness.best", "pop/size")
SEVERITIES = ("info", "warning", "error", "critical")

#: calls that must raise at the call and leave no event behind: (label, call, exception)
POISON: list[tuple[str, Callable[[Any], Any], type[Exception]]] = [
    ("step 2**63", lambda o: o.metric("loss", 1.0, step=2**63), ValueError),
    ("timestamp in ns", lambda o: o.metric("loss", 1.0, timestamp=time.time_ns()), ValueError),
    ("name ['a']", lambda o: o.metric(["a"], 1.0), TypeError),
    ("alert '/'", lambda o: o.alert("/"), ValueError),
    ("param over 6000 chars", lambda o: o.param("p.long", "x" * 6001), ValueError),
    ("tag key not a str", lambda o: o.tag({"a": 1}, "v"), TypeError),
    ("genome with a mixed set", lambda o: o.genome({1, "x"}, name="poison"), TypeError),
]


M = TypeVar("M", bound="ModelMachine")


@dataclass
class RunModel:
    """What one run must hold in MLflow once everything is delivered."""

    key: str
    name: str
    parent: RunModel | None
    run: Any  # the library's Run (its created_id, when this process learnt it)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    alerts: set[str] = field(default_factory=set)
    phases: list[str] = field(default_factory=list)
    artifacts: set[str] = field(default_factory=set)
    #: artifacts whose file was deleted right after the call: delivered or dead-lettered
    deleted: set[str] = field(default_factory=set)
    genomes: set[str] = field(default_factory=set)


@dataclass
class Harness:
    """What a machine needs from the test: where to deliver, where to read back."""

    workdir: Path
    #: per example: (tracking URI for the library, URI to read MLflow with, overrides)
    store: Callable[[Path], tuple[str, str, dict[str, Any]]]


def _unbalanced(stats: Any) -> dict[str, Any]:
    """The kinds whose accounting does not add up, for assertion messages."""
    kinds = ("metric", "param", "tag", "run", "artifact", "alert", "phase", "genome", "system")
    bad = {k: getattr(stats, k) for k in kinds if not getattr(stats, k).is_balanced()}
    return {**bad, "drop_reasons": stats.drop_reasons, "failures": stats.failures}


def _left(stats: Any, column: str) -> dict[str, Any]:
    """The kinds with events in ``column``, for assertion messages."""
    kinds = ("metric", "param", "tag", "run", "artifact", "alert", "phase", "genome", "system")
    return {k: getattr(stats, k) for k in kinds if getattr(getattr(stats, k), column)}


def _child_emits(obs: Observability, items: list[tuple[str, float, int]]) -> None:
    """In a forked child: emit into the current run and return (exit hooks deliver)."""
    for name, value, step in items:
        obs.metric(name, value, step=step)


class ModelMachine(RuleBasedStateMachine):
    """The rules every store shares; subclasses add the store's faults."""

    #: set on the subclass each test makes (see :func:`_bound`)
    harness: ClassVar[Harness]

    def __init__(self) -> None:
        super().__init__()
        harness = self.h = self.harness
        uid = uuid.uuid4().hex[:12]
        self.dir = harness.workdir / uid
        self.files = self.dir / "files"
        self.files.mkdir(parents=True)
        self.spool = self.dir / "spool"
        self.experiment = f"model-{uid}"
        self.model_name = f"gm-{uid}"
        self.uri, self.read_uri, self.overrides = harness.store(self.dir)
        self.counter = 0
        self.runs: list[RunModel] = []
        self.stack: list[tuple[Any, RunModel]] = []
        self.genomes: set[str] = set()
        #: metrics this instance accepted (the parent's; a child counts its own)
        self.emitted = 0
        self.closed: list[Observability] = []
        #: invariant violations seen after a step: (step number, what was wrong)
        self.violations: list[tuple[int, dict[str, Any]]] = []
        self.steps = 0
        #: failed export attempts by reason, over every instance of the example
        self.failures: Counter[str] = Counter()
        self.obs = self._build()
        self._open_run()

    # -- helpers -----------------------------------------------------------------------------
    def _build(self) -> Observability:
        self.emitted = 0
        return Observability.from_env(
            tracking_uri=self.uri, spool_dir=self.spool, **BASE_OVERRIDES, **self.overrides
        )

    def _next(self) -> float:
        self.counter += 1
        return float(self.counter)

    @property
    def top(self) -> RunModel:
        return self.stack[-1][1]

    def _open_run(self) -> None:
        parent = self.top if self.stack else None
        name = f"r{len(self.runs)}"
        experiment = None if parent is not None else self.experiment
        scope = self.obs.run(name, experiment=experiment)
        run = scope.__enter__()
        model = RunModel(run.key, name, parent, run)
        self.runs.append(model)
        self.stack.append((scope, model))

    def _exit_all(self) -> None:
        while self.stack:
            scope, _ = self.stack.pop()
            scope.__exit__(None, None, None)

    # -- emits -------------------------------------------------------------------------------
    @rule(name=st.sampled_from(METRIC_NAMES), step=st.integers(0, 3))
    def metric(self, name: str, step: int) -> None:
        value = self._next()
        self.obs.metric(name, value, step=step)
        self.top.metrics[name].append((step, value))
        self.emitted += 1

    @rule(step=st.integers(0, 3))
    def metrics(self, step: int) -> None:
        values = {"loss": self._next(), "fitness.best": self._next()}
        self.obs.metrics(values, step=step)
        for name, value in values.items():
            self.top.metrics[name].append((step, value))
        self.emitted += len(values)

    @rule(poison=st.sampled_from(POISON))
    def poison(self, poison: tuple[str, Callable[[Any], Any], type[Exception]]) -> None:
        _label, call, error = poison
        with pytest.raises(error):
            call(self.obs)

    @rule(name=st.sampled_from(("p.a", "p.b")), value=st.sampled_from(("1", "2")))
    def param(self, name: str, value: str) -> None:
        old = self.top.params.get(name)
        if old is not None and old != value:
            with pytest.raises(ValueError, match=name):
                self.obs.param(name, value)
        else:
            self.obs.param(name, value)
            self.top.params[name] = value

    @rule(key=st.sampled_from(("t.a", "t.b")), value=st.sampled_from(("u", "v", "w")))
    def tag(self, key: str, value: str) -> None:
        self.obs.tag(key, value)
        self.top.tags[key] = value

    @rule(name=st.sampled_from(("slow", "fitness.nan")), severity=st.sampled_from(SEVERITIES))
    def alert(self, name: str, severity: str) -> None:
        alert_id = self.obs.alert(name, severity=severity, message="from the model")
        assert alert_id
        self.top.alerts.add(alert_id)

    @rule(genome=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def genome(self, genome: list[int]) -> None:
        gid = self.obs.genome(genome, name=self.model_name, fitness=float(sum(genome)))
        self.genomes.add(gid)
        self.top.genomes.add(gid)

    @rule()
    def artifact(self) -> None:
        path = self.files / f"kept-{self.counter}.txt"
        self.counter += 1
        path.write_text("kept\n")
        self.obs.artifact(path)
        self.top.artifacts.add(path.name)

    @rule()
    def artifact_deleted(self) -> None:
        path = self.files / f"gone-{self.counter}.txt"
        self.counter += 1
        path.write_text("gone\n")
        self.obs.artifact(path)
        path.unlink()
        self.top.deleted.add(path.name)

    @rule(name=st.sampled_from(("generation", "evaluation")))
    def phase(self, name: str) -> None:
        with self.obs.phase(name):
            self.metric("loss", 0)
        self.top.phases.append(name)

    @rule(timeout=st.sampled_from((0.1, 1.0)))
    def flush(self, timeout: float) -> None:
        self.obs.flush(timeout)

    # -- runs, restarts, forks -------------------------------------------------------------
    @precondition(lambda self: len(self.stack) < 3)
    @rule()
    def open_run(self) -> None:
        self._open_run()

    @precondition(lambda self: len(self.stack) > 1)
    @rule()
    def end_run(self) -> None:
        scope, _ = self.stack.pop()
        scope.__exit__(None, None, None)

    @rule(timeout=st.sampled_from((0.0, 2.0)))
    def restart(self, timeout: float) -> None:
        """Close (spooling what is left at the deadline); a new instance replays it."""
        self._exit_all()
        self.obs.close(timeout=timeout)
        stats = self.obs.stats()
        assert stats.is_balanced(), _unbalanced(stats)
        assert stats.total.dropped == 0, stats.drop_reasons
        self.closed.append(self.obs)
        self.failures.update(stats.failures)
        self.obs = self._build()
        self._open_run()

    @rule(n=st.integers(1, 3))
    def fork(self, n: int) -> None:
        """A forked child emits into the current run and exits through its exit hooks."""
        items = [("child", self._next(), i) for i in range(n)]
        child = multiprocessing.get_context("fork").Process(
            target=_child_emits, args=(self.obs, items)
        )
        child.start()
        child.join(HANG_GUARD)
        if child.exitcode is None:
            child.kill()
            child.join()
        assert child.exitcode == 0, f"forked child exit code {child.exitcode}"
        for name, value, step in items:
            self.top.metrics[name].append((step, value))

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def accounting_balances(self) -> None:
        """Checked after every step; a violation is kept and reported at the end of the
        example (where it is found depends on timing; stopping there would make
        hypothesis's replays draw different steps)."""
        stats = self.obs.stats()
        problems: dict[str, Any] = {}
        if not stats.is_balanced():
            problems["unbalanced"] = _unbalanced(stats)
        if stats.total.dropped:
            problems["dropped"] = stats.drop_reasons
        if stats.metric.emitted != self.emitted:
            problems["metrics accepted"] = (stats.metric.emitted, self.emitted)
        if problems:
            self.violations.append((self.steps, problems))
        self.steps += 1

    # -- the end of an example ---------------------------------------------------------------
    def restore(self) -> None:
        """Lift every fault (the store is up and answers)."""

    def teardown(self) -> None:
        failing = sys.exc_info()[1] is not None
        self.restore()
        try:
            self._exit_all()
        finally:
            self.obs.close(timeout=HANG_GUARD)
        if failing:  # a step failed: that is the error to report, not the model's view
            return
        assert not self.violations, f"invariants broken after steps: {self.violations}"
        stats = self.obs.stats()
        assert stats.is_balanced(), _unbalanced(stats)
        assert stats.total.pending == 0, _left(stats, "pending")
        assert stats.total.spooled == 0, _left(stats, "spooled")
        assert stats.total.dropped == 0, stats.drop_reasons
        self.failures.update(stats.failures)
        self.check_failures(self.failures)
        self.check_mlflow()

    def check_failures(self, failures: Counter[str]) -> None:
        """What the failed export attempts of the example may be (any, by default)."""

    def check_mlflow(self) -> None:
        client = MlflowClient(tracking_uri=self.read_uri)
        exp = client.get_experiment_by_name(self.experiment)
        assert exp is not None, f"experiment {self.experiment} was never created"
        found = client.search_runs([exp.experiment_id], max_results=1000)
        by_key: dict[str, list[Any]] = defaultdict(list)
        for r in found:
            by_key[r.data.tags.get("allele.run_key", "")].append(r)
        ids: dict[str, str] = {}
        for m in self.runs:
            copies = by_key.get(m.key, [])
            assert len(copies) == 1, f"run {m.name}: {len(copies)} MLflow runs"
            ids[m.key] = copies[0].info.run_id
        assert len(found) == len(self.runs), sorted(by_key)
        letters = DeadLetters(self.spool).read()
        for record in letters:
            assert record.get("reason"), record
            assert record["kind"] == "artifact", (
                f"a dead letter the model has no reason for: {record}"
            )
        dead_text = [json.dumps(rec["rows"]) for rec in letters]
        for m in self.runs:
            self._check_run(client, m, by_key[m.key][0], ids, dead_text)
        self._check_genomes(ids)

    def _check_run(
        self, client: Any, m: RunModel, got: Any, ids: dict[str, str], dead_text: list[str]
    ) -> None:
        run_id = got.info.run_id
        where = f"run {m.name}"
        assert got.info.status == "FINISHED", (where, got.info.status)
        assert got.info.run_name == m.name, where
        parent = ids[m.parent.key] if m.parent is not None else None
        assert got.data.tags.get("mlflow.parentRunId") == parent, where
        for key, points in m.metrics.items():
            history = sorted((p.step, p.value) for p in client.get_metric_history(run_id, key))
            assert history == sorted(points), (where, key)
        extra = {k for k in got.data.metrics if not k.startswith("allele.")} - set(m.metrics)
        assert not extra, (where, extra)
        assert got.data.params == m.params, where
        for key, value in m.tags.items():
            assert got.data.tags.get(key) == value, (where, key)
        # alerts and phases as the library's readers return them (one per alert or span id:
        # docs/alerts.md lets a chunk be stored again; readers keep the latest record)
        queries = Queries(self.read_uri)
        alerts = Counter(a.alert_id for a in queries.alerts(run_id))
        assert alerts == Counter(m.alerts), where
        assert got.data.tags.get("allele.alerts.total", "0") == str(len(m.alerts)), where
        assert Counter(p.name for p in queries.phases(run_id)) == Counter(m.phases), where
        files = {f.path for f in client.list_artifacts(run_id)}
        assert m.artifacts <= files, (where, m.artifacts - files)
        for name in m.deleted:
            uploaded = name in files
            lettered = sum(name in text for text in dead_text)
            assert uploaded + lettered == 1, (where, name, uploaded, lettered)

    def _check_genomes(self, ids: dict[str, str]) -> None:
        versions = GenomeRegistry(self.read_uri).versions(self.model_name)
        got = [v.genome_id for v in versions]
        assert sorted(got) == sorted(self.genomes), "genome versions"
        emitted_by: dict[str, set[str]] = defaultdict(set)
        for m in self.runs:
            for gid in m.genomes:
                emitted_by[gid].add(ids[m.key])
        for v in versions:
            assert v.run_id in emitted_by[v.genome_id], v


class SqliteMachine(ModelMachine):
    """The sqlite store; its fault: another writer holding the database lock for a while."""

    def check_failures(self, failures: Counter[str]) -> None:
        """A local store has no network: a missing artifact file is the event's problem."""
        assert "network_error" not in failures, failures

    @rule(hold=st.sampled_from((0.3, 2.5)))
    def store_locked(self, hold: float) -> None:
        """A metric emitted while another connection holds the write lock ``hold`` s."""
        path = self.uri.removeprefix("sqlite:///")
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            self.metric("loss", 1)
            time.sleep(hold)
        finally:
            conn.execute("COMMIT")
            conn.close()


class ServerMachine(ModelMachine):
    """
    A real ``mlflow server`` behind the fault proxy. A fault rule switches the proxy and
    holds it a while (the exporter works under it meanwhile); ``heal`` lifts it.
    """

    server: ClassVar[MlflowServer]
    proxy: ClassVar[FaultProxy]

    def _fault(self, mode: str, hold: float, delay: float = 0.0) -> None:
        """Switch the proxy; with ``hold``, emit and flush under the fault that long."""
        self.proxy.set(mode, delay)
        if hold:
            self.metric("loss", 0)
            self.obs.flush(hold)

    @rule(mode=st.sampled_from(("401", "403")), hold=st.sampled_from((0.0, 0.5)))
    def auth_fails(self, mode: str, hold: float) -> None:
        self._fault(mode, hold)

    @rule(mode=st.sampled_from(("500", "503")), hold=st.sampled_from((0.0, 0.5)))
    def server_fails(self, mode: str, hold: float) -> None:
        self._fault(mode, hold)

    @rule(delay=st.sampled_from((0.3, 3.0)), hold=st.sampled_from((0.0, 0.5)))
    def slow(self, delay: float, hold: float) -> None:
        self._fault("slow", hold, delay)

    @rule(kill=st.sampled_from((False, False, False, True)), hold=st.sampled_from((0.0, 0.5)))
    def down(self, kill: bool, hold: float) -> None:
        """Unreachable: connections reset by the proxy, or (rarely: ~10 s) the server killed."""
        if kill:
            self.server.stop()
            self._fault("pass", hold)
        else:
            self._fault("down", hold)

    @rule()
    def heal(self) -> None:
        self.restore()

    def restore(self) -> None:
        if not self.server.running:
            self.server.restart()
        self.proxy.set("pass")


def _bound(machine: type[M], **context: Any) -> type[M]:
    """A subclass of ``machine`` that carries this test's harness (hypothesis builds it)."""
    return cast("type[M]", type(machine.__name__, (machine,), context))


# -- the tests ---------------------------------------------------------------------------------
@pytest.mark.timeout(TEST_TIMEOUT)
def test_model_sqlite_store(template_db: Path, tmp_path: Path) -> None:
    """Random interleavings against a real sqlite store: MLflow and the model agree."""

    def store(example: Path) -> tuple[str, str, dict[str, Any]]:
        db = example / "mlflow.db"
        shutil.copy(template_db, db)
        uri = f"sqlite:///{db}"
        return (
            uri,
            uri,
            {
                "delivery_process": False,
                "artifact_location": str(example / "artifacts"),
            },
        )

    machine = _bound(SqliteMachine, harness=Harness(tmp_path, store))
    run_state_machine_as_test(machine, settings=SETTINGS)


@pytest.fixture(name="faulty_server", scope="module")
def _faulty_server(
    tmp_path_factory: pytest.TempPathFactory, template_db: Path
) -> Iterator[tuple[MlflowServer, FaultProxy]]:
    """A real server (killed and restarted by the rules) behind a fault proxy."""
    workdir = tmp_path_factory.mktemp("model-server")
    shutil.copy(template_db, workdir / "server.db")  # migrated already: a faster start
    server = MlflowServer(workdir)
    server.start()
    proxy = FaultProxy(server.port).start()
    yield server, proxy
    proxy.stop()
    server.stop()


@pytest.mark.server
@pytest.mark.timeout(TEST_TIMEOUT)
def test_model_mlflow_server(
    faulty_server: tuple[MlflowServer, FaultProxy], tmp_path: Path
) -> None:
    """Random interleavings with the server up, down, killed, slow, 401/403, 500/503."""
    server, proxy = faulty_server

    def store(_example: Path) -> tuple[str, str, dict[str, Any]]:
        return proxy.url, server.url, {}

    machine = _bound(ServerMachine, harness=Harness(tmp_path, store), server=server, proxy=proxy)
    run_state_machine_as_test(machine, settings=SETTINGS)
    if os.environ.get("ALLELE_MODEL_VERBOSE") and sys.__stderr__ is not None:
        sys.__stderr__.write(f"requests seen by the proxy, per mode: {dict(proxy.counts)}\n")
