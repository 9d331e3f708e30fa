"""
Fork at any moment (issue 9): a child forked before its run exists in MLflow finds the
run the parent creates (by ``allele.run_key``) and delivers into it, never creating a
second one; a child forked while another thread holds one of the library's locks gets
fresh locks and does not hang.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from typing import Any

from allele.observability import Observability, Settings
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
