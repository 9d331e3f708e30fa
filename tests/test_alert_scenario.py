"""
The alert scenario end to end: real emission into a store, then every query answered from
a fresh process (they read MLflow only), against sqlite and a real `mlflow server`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import uuid
from typing import Any

import pytest

from allele.observability import Observability
from allele.observability.detectors import Stagnation
from servers import MlflowServer


def _scenario(uri: str, prefix: str, experiment: str) -> dict[str, Any]:
    """Two runs, nested phases, a folded flood, a critical flood, a host-wide alert."""
    obs = Observability.from_env(
        tracking_uri=uri,
        delivery_process=False,
        alert_dedupe_window=600,
        experiment_prefix=prefix,
    )
    obs.add_detector(Stagnation("plateau", window=5))
    ids: dict[str, Any] = {}
    b_open, b_release = threading.Event(), threading.Event()

    def run_b() -> None:
        with obs.run("B", experiment=experiment) as b:
            for step in range(12):
                obs.metric("plateau", 1.0, step=step)
            b_open.set()
            b_release.wait(30)
        ids["B"] = b.run_id

    with obs:
        thread = threading.Thread(target=run_b)
        thread.start()
        b_open.wait(30)
        with obs.run("A", experiment=experiment) as a:
            for step in range(21):
                obs.metric("fitness.best", float(step * 10), step=step)
            obs.step(5)
            with obs.phase("evaluation"), obs.phase("fitness"):
                ids["nan"] = obs.alert("fitness.nan", severity="error", message="NaN")
            obs.step(8)
            with obs.phase("selection"):
                slow = {obs.alert("slow", severity="warning") for _ in range(100)}
            ids["slow"] = slow.pop()
            ids["oom"] = [obs.alert("oom", severity="critical") for _ in range(5)]
            host: list[str] = []
            raiser = threading.Thread(
                target=lambda: host.append(obs.alert("host.disk", severity="critical"))
            )
            raiser.start()
            raiser.join()
            ids["host"] = host[0]
            assert obs.flush(60)
        b_release.set()
        thread.join()
    ids["A"] = a.run_id
    return ids


QUERY_SCRIPT = textwrap.dedent("""
    import json, sys
    from dataclasses import asdict
    from allele.observability import Queries
    uri, prefix, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    q = Queries(uri, experiment_prefix=prefix)
    names = lambda alerts: sorted(a.name for a in alerts)
    host = q.alert(ids["host"])
    ctx = q.alert_context(ids["nan"], metrics=["fitness.best"], window=2)
    print(json.dumps({
        "run_a": names(q.alerts(ids["A"])),
        "critical": names(q.alerts(severity="critical")),
        "evaluation": [a.alert_id for a in q.alerts(phase="evaluation")],
        "slow": [a.occurrences for a in q.alerts(name="slow")],
        "host_runs": sorted(r.run_id for r in q.runs_for_alert(ids["host"])),
        "active": sorted(r.run_id for r in q.runs_active_at(host.time / 1000)),
        "context": ctx.metrics[ids["A"]]["fitness.best"],
        "phase": list(ctx.phase.path) if ctx.phase else None,
        "stagnation": names(q.alerts(ids["B"], name="*stagnation")),
    }))
""")


def _check(uri: str) -> None:
    # Its own prefix: the queries that search every experiment (all critical alerts) see
    # this scenario's only, whatever other tests stored on a shared server.
    prefix = f"scenario-{uuid.uuid4().hex[:8]}/"
    ids = _scenario(uri, prefix, "alerts")
    out = subprocess.run(
        [sys.executable, "-c", QUERY_SCRIPT, uri, prefix, json.dumps(ids)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    got = json.loads(out.stdout)

    assert ["fitness.nan", "host.disk", *["oom"] * 5, "slow"] == got["run_a"]
    assert ["host.disk", *["oom"] * 5] == got["critical"]
    assert [ids["nan"]] == got["evaluation"]
    assert [100] == got["slow"]
    assert sorted([ids["A"], ids["B"]]) == got["host_runs"]
    assert {ids["A"], ids["B"]} <= set(got["active"])
    assert [[3, 30.0], [4, 40.0], [5, 50.0], [6, 60.0], [7, 70.0]] == got["context"]
    assert ["evaluation", "fitness"] == got["phase"]
    assert ["plateau.stagnation"] == got["stagnation"]


def test_scenario_on_sqlite(store_uri: str) -> None:
    """Every query returns exactly the expected set from a fresh process (sqlite store)."""
    _check(store_uri)


@pytest.mark.server
def test_scenario_on_mlflow_server(mlflow_server: MlflowServer) -> None:
    """The same scenario against a real `mlflow server` over HTTP."""
    _check(mlflow_server.url)
