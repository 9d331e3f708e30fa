"""Round trips into a real sqlite MLflow store, read back with MlflowClient."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from allele.observability import Observability, Run


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_metrics_params_tags_round_trip(
    make_obs: Callable[..., Observability], client: Any
) -> None:
    """Everything emitted in a run is in MLflow exactly once, and the run says so in tags."""
    obs = make_obs()
    with obs, obs.run("r", experiment="exp", params={"pop": 50}, tags={"suite": "t"}) as run:
        for i in range(2500):
            obs.metric("fitness.best", i / 10, step=i)
        obs.metrics({"a": 1, "b": 2.5}, step=7)
        obs.param("mutation_rate", 0.01)
        obs.tag("note", "hello")
        assert obs.flush(30)
        run_id = run.run_id
    assert run_id is not None

    got = client.get_run(run_id)
    hist = _history(client, run_id, "fitness.best")

    assert [(i, i / 10) for i in range(2500)] == hist
    assert [(7, 1.0)] == _history(client, run_id, "a")
    assert {"pop": "50", "mutation_rate": "0.01"} == got.data.params
    assert got.data.tags["suite"] == "t"
    assert got.data.tags["note"] == "hello"
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "r"
    assert got.data.tags["allele.telemetry.complete"] == "true"
    assert got.data.tags["allele.telemetry.dropped"] == "0"
    stats = obs.stats()
    assert stats.is_balanced()
    assert stats.metric.emitted == stats.metric.delivered == 2502
    assert stats.total.pending == 0


def test_worker_process_delivery(make_obs: Callable[..., Observability], client: Any) -> None:
    """The default for sqlite: a worker process writes; the data is the same."""
    obs = make_obs(delivery_process=True)
    with obs, obs.run("proc", experiment="exp") as run:
        for i in range(3000):
            obs.metric("x", float(i), step=i)
    assert run.run_id is not None

    assert [(i, float(i)) for i in range(3000)] == _history(client, run.run_id, "x")
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_four_threads_100k_metrics_exactly_once(
    make_obs: Callable[..., Observability], client: Any
) -> None:
    """100k metrics from 4 threads in 4 runs: each lands exactly once; stats agree."""
    obs = make_obs(delivery_process=True)
    runs: dict[int, Run] = {}
    per_thread = 25_000

    def work(t: int) -> None:
        with obs.run(f"thread-{t}", experiment="threads") as run:
            for i in range(per_thread):
                obs.metric("v", float(t * per_thread + i), step=i)
        runs[t] = run

    with obs:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert obs.flush(120)
        stats = obs.stats()

    assert [0, 1, 2, 3] == sorted(runs)
    for t, run in runs.items():
        # read after the flush: how soon a run is created depends on the machine (the
        # delivery worker process starts on first use), and tests assert no timings
        run_id = run.run_id
        assert run_id is not None
        expected = [(i, float(t * per_thread + i)) for i in range(per_thread)]
        assert expected == _history(client, run_id, "v")
    assert stats.metric.emitted == 100_000
    assert stats.metric.delivered == 100_000
    assert stats.is_balanced()


def test_asyncio_tasks_each_log_into_their_own_run(
    make_obs: Callable[..., Observability], client: Any
) -> None:
    """Contextvars give each asyncio task its own current run."""
    obs = make_obs()

    async def task(n: int) -> str | None:
        async with obs.run(f"task-{n}", experiment="async") as run:
            for i in range(100):
                obs.metric("n", float(n), step=i)
                await asyncio.sleep(0)
        return run.run_id

    async def main() -> list[str | None]:
        return await asyncio.gather(*(task(n) for n in range(5)))

    with obs:
        run_ids = asyncio.run(main())
        assert obs.flush(30)

    for n, run_id in enumerate(run_ids):
        assert run_id is not None
        assert [(i, float(n)) for i in range(100)] == _history(client, run_id, "n")


def test_nested_run_becomes_child(make_obs: Callable[..., Observability], client: Any) -> None:
    """A run opened inside another is its child and inherits its experiment."""
    obs = make_obs()
    with obs, obs.run("parent", experiment="nest") as parent:
        with obs.run("child") as child:
            obs.metric("c", 1.0, step=0)
        obs.metric("p", 2.0, step=0)
    assert child.run_id is not None
    assert parent.run_id is not None

    got = client.get_run(child.run_id)
    assert parent.run_id == got.data.tags["mlflow.parentRunId"]
    assert client.get_run(parent.run_id).info.experiment_id == got.info.experiment_id
    assert [(0, 1.0)] == _history(client, child.run_id, "c")
    assert [(0, 2.0)] == _history(client, parent.run_id, "p")


def test_exception_ends_run_failed_with_traceback(
    make_obs: Callable[..., Observability], client: Any, tmp_path: Path
) -> None:
    """An exception escaping obs.run ends it FAILED with its type and traceback kept."""
    obs = make_obs(artifact_location=str(tmp_path / "artifacts"))
    with obs:
        with pytest.raises(ZeroDivisionError), obs.run("boom", experiment="fail") as run:
            obs.metric("before", 1.0, step=0)
            _ = 1 / 0
        assert obs.flush(30)
    assert run.run_id is not None

    got = client.get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["allele.error.type"] == "ZeroDivisionError"
    arts = [f.path for f in client.list_artifacts(run.run_id, "error")]
    assert ["error/traceback.txt"] == arts
    local = client.download_artifacts(run.run_id, "error/traceback.txt", str(tmp_path))
    assert "ZeroDivisionError" in Path(local).read_text()


def test_keyboard_interrupt_ends_run_killed(
    make_obs: Callable[..., Observability], client: Any
) -> None:
    """KeyboardInterrupt inside obs.run ends the run KILLED."""
    obs = make_obs()
    with obs, pytest.raises(KeyboardInterrupt), obs.run("ctrl-c", experiment="kill") as run:
        raise KeyboardInterrupt
    assert run.run_id is not None

    assert client.get_run(run.run_id).info.status == "KILLED"


def test_disabled_is_a_no_op(tmp_path: Path) -> None:
    """ENABLED=false: every call is a no-op and nothing is written."""
    db = tmp_path / "never.db"
    obs = Observability.from_env(enabled=False, tracking_uri=f"sqlite:///{db}")
    with obs, obs.run("r") as run:
        obs.metric("x", 1.0)
        obs.param("p", 1)
        obs.tag("t", "v")

    assert not db.exists()
    assert run.wait_created(0) is None
    assert obs.stats().state == "disabled"
    assert obs.stats().total.emitted == 0


def test_bad_values_raise_at_the_call_and_good_ones_land(
    make_obs: Callable[..., Observability], client: Any
) -> None:
    """A non-numeric value or step raises TypeError naming the metric; others still land."""
    obs = make_obs()
    with obs, obs.run("bad", experiment="bad") as run:
        obs.metric("ok", 1.0, step=0)
        with pytest.raises(TypeError, match="'fitness'"):
            obs.metric("fitness", "high", step=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="'fitness'"):
            obs.metric("fitness", None, step=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="step"):
            obs.metric("fitness", 1.0, step=1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="metric name"):
            obs.metric(3, 1.0)  # type: ignore[arg-type]
        obs.metric("ok", math.nan, step=1)
        obs.metric("ok", True, step=2)
    assert run.run_id is not None

    hist = _history(client, run.run_id, "ok")
    assert [0, 1, 2] == [s for s, _ in hist]
    assert math.isnan(hist[1][1])
    assert hist[2][1] == 1.0
    assert obs.stats().is_balanced()


def test_invalid_names_are_sanitised(make_obs: Callable[..., Observability], client: Any) -> None:
    """Names MLflow would reject are sanitised as documented, not lost."""
    obs = make_obs()
    with obs, obs.run("names", experiment="names") as run:
        obs.metric("fitness[best]", 1.0, step=0)
        obs.metric("/a//b/../c", 2.0, step=0)
    assert run.run_id is not None

    keys = set(client.get_run(run.run_id).data.metrics)
    assert {"fitness_best_", "a/b/c"} == keys


def test_param_relogged_with_another_value_raises(
    make_obs: Callable[..., Observability],
) -> None:
    """MLflow params are immutable: a second, different value raises at the call."""
    obs = make_obs()
    with obs, obs.run("p", experiment="p"):
        obs.param("lr", 0.1)
        obs.param("lr", 0.1)  # same value: fine
        with pytest.raises(ValueError, match="'lr'"):
            obs.param("lr", 0.2)


def test_auto_run_for_events_outside_any_run(
    make_obs: Callable[..., Observability], client: Any
) -> None:
    """With AUTO_EXPERIMENT_TRACKING, events outside a run go to a run named after the program."""
    obs = make_obs()
    with obs:
        obs.metric("loose", 3.0, step=1)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "metrics.loose = 3"
    )

    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"


def test_no_auto_run_drops_and_counts(make_obs: Callable[..., Observability]) -> None:
    """AUTO_EXPERIMENT_TRACKING=false: events outside a run are dropped and counted."""
    obs = make_obs(auto_experiment_tracking=False)
    with obs:
        obs.metric("loose", 1.0)
        obs.param("p", 1)
        stats = obs.stats()

    assert stats.metric.dropped == 1
    assert stats.param.dropped == 1
    assert stats.drop_reasons == {"no_run": 2}
    assert stats.is_balanced()


def test_experiment_prefix_from_env(
    make_obs: Callable[..., Observability], client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ALLELE_MLFLOW_EXPERIMENT_PREFIX names the experiments the library creates."""
    monkeypatch.setenv("ALLELE_MLFLOW_EXPERIMENT_PREFIX", "allele_benchmark_")
    obs = make_obs()
    with obs, obs.run("r", experiment="onemax") as run:
        obs.metric("x", 1.0)
    assert run.run_id is not None

    exp = client.get_experiment(client.get_run(run.run_id).info.experiment_id)
    assert exp.name == "allele_benchmark_onemax"


def test_artifact_upload(
    make_obs: Callable[..., Observability], client: Any, tmp_path: Path
) -> None:
    """obs.artifact uploads a file into the run in the background."""
    report = tmp_path / "report.html"
    report.write_text("<h1>ok</h1>")
    obs = make_obs(artifact_location=str(tmp_path / "artifacts"))
    with obs, obs.run("art", experiment="art") as run:
        obs.artifact(report)
        with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
            obs.artifact(tmp_path / "missing.txt")
    assert run.run_id is not None

    assert ["report.html"] == [f.path for f in client.list_artifacts(run.run_id)]
    assert obs.stats().artifact.delivered == 1


def test_threads_without_context_log_into_the_current_run(
    make_obs: Callable[..., Observability], client: Any
) -> None:
    """A worker thread started inside a run (no contextvars) logs into that run."""
    obs = make_obs()
    with obs, obs.run("pool", experiment="pool") as run:
        workers = [
            threading.Thread(target=lambda t=t: obs.metric("w", float(t), step=t)) for t in range(4)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert run.run_id is not None

    assert [(t, float(t)) for t in range(4)] == _history(client, run.run_id, "w")
