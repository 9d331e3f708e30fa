"""
Bounded memory for the life of a process (issue 9, promise 4): what the bus, the exporter
and the detectors keep per run is released once the run has ended and its end has left,
so a process that runs thousands of trials does not grow with them.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from allele.observability import Observability
from allele.observability._core import runs as runs_module
from allele.observability.detectors import Stagnation


def _trials(obs: Observability, n: int) -> list[weakref.ref[Any]]:
    refs = []
    for t in range(n):
        with obs.run(f"trial-{t}", experiment="memory") as run:
            for g in range(5):
                obs.metric("fitness", float(g % 2), step=g)
            obs.alert("trial.done", severity="warning", attributes={"trial": t})
            refs.append(weakref.ref(run))
        del run
    return refs


def test_ended_runs_release_their_state(
    make_obs: Callable[..., Observability], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs_module, "ENDED_KEPT", 20)
    obs = make_obs(flush_interval=0.05)
    detector = Stagnation("fitness", window=3)
    obs.add_detector(detector)
    with obs:
        refs = _trials(obs, 60)
        assert obs.flush(60)
        obs.metric("after", 1.0)  # one more round: ended runs' detector state is released
        assert obs.flush(60)
        exporter = obs._runtime.exporter
        assert exporter is not None
        router = exporter._router

        assert router.backlogs == {} or all(r.status == "RUNNING" for r in router.backlogs)
        trial_keys = {r().key for r in refs if r() is not None}  # type: ignore[union-attr]
        # The runs' own state is released; the registry keeps the latest ENDED_KEPT runs
        # for late events.
        assert not {k for k, _ in detector._state} & trial_keys
        assert len(obs._runs._by_key) <= 20 + 2  # the kept ended runs and the open ones
        assert len(router._seen_start) <= 20 + 2
    stats = obs.stats()
    assert stats.run.delivered == 2 * 60 + 2
    assert stats.is_balanced()


def test_many_trials_keep_the_registry_bounded(
    make_obs: Callable[..., Observability], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trials the user no longer holds are garbage once delivered (nothing keeps them)."""
    monkeypatch.setattr(runs_module, "ENDED_KEPT", 10)
    obs = make_obs(flush_interval=0.05, alert_dedupe_window=0)
    with obs:
        refs = _trials(obs, 40)
        assert obs.flush(60)
        gc.collect()
        alive = [r for r in refs[:20] if r() is not None]
        assert alive == []
    assert obs.stats().is_balanced()
