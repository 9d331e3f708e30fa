"""The exporter into a real `mlflow server` over HTTP (MLflow's REST API spoken directly)."""

from __future__ import annotations

import threading

from mlflow import MlflowClient

from allele.observability import Observability
from servers import MlflowServer


def test_http_round_trip_from_threads(mlflow_server: MlflowServer) -> None:
    """Metrics from 3 threads in 3 nested runs land exactly once over HTTP."""
    obs = Observability.from_env(tracking_uri=mlflow_server.url, system_metrics_interval=0)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    ids: dict[int, str | None] = {}

    with obs, obs.run("http-parent", experiment="http", params={"k": 3}) as parent:

        def work(t: int) -> None:
            with obs.run(f"http-{t}", experiment="http") as run:
                for i in range(3000):
                    obs.metric("v", float(t * 10_000 + i), step=i)
            ids[t] = run.run_id

        threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert obs.flush(60)
    stats = obs.stats()
    assert parent.run_id is not None

    for t, run_id in ids.items():
        assert run_id is not None
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "v"))
        assert [(i, float(t * 10_000 + i)) for i in range(3000)] == hist
        assert client.get_run(run_id).info.status == "FINISHED"
    assert {"k": "3"} == client.get_run(parent.run_id).data.params
    assert stats.metric.delivered == 9000
    assert stats.is_balanced()
