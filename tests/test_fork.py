"""
Fork at any moment (issue 9): a child forked before its run exists in MLflow finds the
run the parent creates (by ``allele.run_key``) and delivers into it, never creating a
second one; a child forked while another thread holds one of the library's locks gets
fresh locks and does not hang.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any

from allele.observability import Observability, Settings
from allele.observability._core.lifecycle import forget_half_imported_modules
from allele.observability.backends.base import DeliveryError
from allele.observability.backends.factory import make_backend
from allele.observability.config import SamplingRule

#: the instance the pool's children inherit
_OBS: list[Observability] = []
#: seconds a forked child may take before the test calls it hung
HANG_GUARD = 60


def _history(client: Any, run_id: str | None, key: str) -> list[tuple[int, float]]:
    assert run_id is not None
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


class _SlowToCreate:
    """The parent's store takes 1.5 s to create a run: the pool forks before it exists."""

    def __init__(self, inner: Any, parent_pid: int) -> None:
        self._inner = inner
        self._parent_pid = parent_pid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create_run(self, *args: Any, **kwargs: Any) -> Any:
        if os.getpid() == self._parent_pid:
            time.sleep(1.5)
        return self._inner.create_run(*args, **kwargs)


def _child_work(i: int) -> int:
    obs = _OBS[0]
    for k in range(20):
        obs.metric("child", float(i * 100 + k), step=i * 100 + k)
    return os.getpid()


def test_pool_forked_before_the_run_exists_delivers_into_it(store_uri: str, client: Any) -> None:
    parent = os.getpid()

    def factory(settings: Settings) -> Any:
        return _SlowToCreate(make_backend(settings), parent)

    obs = Observability.from_env(
        tracking_uri=store_uri, delivery_process=False, flush_interval=0.1, backend_factory=factory
    )
    _OBS[:] = [obs]
    ctx = multiprocessing.get_context("fork")
    try:
        with obs, obs.run("forked-early", experiment="fork-early") as run:
            assert run.created_id is None  # the pool forks before the run exists
            pool = ctx.Pool(2)
            pids = pool.map(_child_work, range(4))
            pool.close()
            pool.join()  # the workers exit normally: their at-exit delivery runs
            obs.metric("parent", 1.0, step=0)
    finally:
        _OBS.clear()
    stats = obs.stats()

    assert parent not in pids
    experiment = client.get_experiment_by_name("fork-early")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["forked-early"]  # found, never created twice
    expected = sorted((i * 100 + k, float(i * 100 + k)) for i in range(4) for k in range(20))
    assert expected == _history(client, run.run_id, "child")
    assert [(0, 1.0)] == _history(client, run.run_id, "parent")
    assert stats.total.pending == 0
    assert stats.total.spooled == 0
    assert stats.is_balanced()


def test_fork_while_a_sampling_lock_is_held_does_not_hang(store_uri: str, client: Any) -> None:
    obs = Observability.from_env(
        tracking_uri=store_uri,
        delivery_process=False,
        sampling={"fit*": SamplingRule(every=2)},
    )
    with obs, obs.run("locks", experiment="fork-locks") as run:
        obs.metric("fitness", 0.0, step=0)
        series = run.series["fitness"]
        assert series.lock.acquire(timeout=5)  # as if another thread were sampling
        try:
            pid = os.fork()
            if pid == 0:  # the child: sample into the same series, deliver, exit
                code = 1
                try:
                    for i in range(1, 11):
                        obs.metric("fitness", float(i), step=i)
                    obs.close(timeout=30)
                    code = 0 if obs.stats().is_balanced() else 2
                finally:
                    os._exit(code)
        finally:
            series.lock.release()
        deadline = time.monotonic() + HANG_GUARD
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError("the forked child hung on a lock it inherited held")
            time.sleep(0.05)

    assert os.waitstatus_to_exitcode(status) == 0
    steps = [step for step, _ in _history(client, run.run_id, "fitness")]
    assert steps[0] == 0
    assert steps[-1] == 10  # the child's last point (the series' last) was delivered


class _DownInParent:
    """The parent's store refuses batches while ``down`` is set; the child's never does."""

    def __init__(self, inner: Any, parent_pid: int, down: Any) -> None:
        self._inner = inner
        self._parent_pid = parent_pid
        self._down = down

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def log_batch(self, *args: Any, **kwargs: Any) -> Any:
        if os.getpid() == self._parent_pid and self._down.is_set():
            raise DeliveryError("network_error", "connection refused (test)", retryable=True)
        return self._inner.log_batch(*args, **kwargs)


def test_a_child_leaves_its_parents_spool_to_the_parent(
    store_uri: str, client: Any, tmp_path: Any
) -> None:
    """
    The parent spooled (its store failing), tried a replay (its segment is closed and
    unlocked now), then forks a worker that exits with the store up: the child delivers its
    own events and leaves the parent's records to the parent, whose close delivers them
    and balances (the child used to replay them at its exit, counted as nobody's: the
    parent then waited for its own records until the deadline and reported them spooled).
    """
    parent = os.getpid()
    down = threading.Event()
    down.set()

    def factory(settings: Settings) -> Any:
        return _DownInParent(make_backend(settings), parent, down)

    obs = Observability.from_env(
        tracking_uri=store_uri,
        spool_dir=tmp_path / "spool",
        delivery_process=False,
        flush_interval=0.1,
        backend_factory=factory,
    )
    with obs.run("spooled-parent", experiment="fork-spool") as run:
        for step in range(5):
            obs.metric("parent", float(step), step=step)
        deadline = time.monotonic() + HANG_GUARD
        # spooled, then a replay tried (and failed): the segment is closed, unlocked
        while obs.stats().failures.get("network_error", 0) < 2:
            assert time.monotonic() < deadline, obs.stats()
            time.sleep(0.05)
        assert obs.stats().metric.spooled == 5
        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=_child_emits, args=(obs,))
        child.start()
        child.join(HANG_GUARD)
        assert child.exitcode == 0
        down.clear()
    obs.close(timeout=HANG_GUARD)
    stats = obs.stats()

    assert stats.metric.spooled == 0, stats.metric
    assert stats.metric.delivered == 5, stats.metric
    assert stats.is_balanced()
    assert [(s, float(s)) for s in range(5)] == _history(client, run.run_id, "parent")
    assert [(s, float(s)) for s in range(3)] == _history(client, run.run_id, "child")


def _child_emits(obs: Observability) -> None:
    for step in range(3):
        obs.metric("child", float(step), step=step)


def test_a_half_imported_package_is_dropped_with_its_submodules(tmp_path: Any) -> None:
    """
    A fork while the exporter thread imports a package leaves it half-initialised in the
    child; dropping only the package kept its complete submodules, so the re-imported
    package never got them as attributes ("module 'mlflow' has no attribute 'entities'").
    """
    pkg = tmp_path / "halfpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("VALUE = 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.import_module("halfpkg.sub")
        spec = sys.modules["halfpkg"].__spec__
        assert spec is not None
        spec._initializing = True  # type: ignore[attr-defined]  # as a fork mid-import leaves it
        forget_half_imported_modules()
        assert "halfpkg" not in sys.modules
        assert "halfpkg.sub" not in sys.modules
        package = importlib.import_module("halfpkg")
        importlib.import_module("halfpkg.sub")
        assert package.sub.VALUE == 1  # an attribute of the package imported afresh
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.split(".")[0] == "halfpkg"]:
            del sys.modules[name]
