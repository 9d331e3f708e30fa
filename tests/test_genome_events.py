"""obs.genome end to end: registered in the background, logged only, spooled and replayed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from allele.observability import GenomeRegistry, Observability
from servers import MlflowServer


def test_genomes_become_versions_and_champion_follows_fitness(
    store_uri: str, tmp_path: Path
) -> None:
    """Each distinct genome is one version; the champion moves only on improvement."""
    obs = Observability.from_env(
        tracking_uri=store_uri, delivery_process=False, artifact_location=str(tmp_path / "a")
    )
    with obs, obs.run("ga", experiment="genomes") as run:
        a = obs.genome({"w": [1, 0], "b": 1}, name="net", fitness=0.5, generation=0)
        b = obs.genome({"b": 1.0, "w": (1, 1)}, name="net", fitness=0.9, parents=[a])
        c = obs.genome({"w": [0, 0], "b": 2}, name="net", fitness=0.7, parents=[b])
        again = obs.genome({"b": 1, "w": [1, 0]}, name="net", fitness=0.5)
        with pytest.raises(TypeError, match="set"):
            obs.genome({"w": {1, "x"}}, name="net")
    registry = obs.genomes
    stats = obs.stats()

    assert a == again
    assert [a, b, c] == [v.genome_id for v in registry.versions("net")]
    champion = registry.champion("net")
    assert champion is not None
    assert b == champion.genome_id
    assert [b, a] == [g.genome_id for g in registry.lineage(c)]
    assert run.run_id == registry.get("net", a).run_id
    assert stats.genome.emitted == stats.genome.delivered == 4
    assert stats.is_balanced()


def test_registry_disabled_logs_genomes_to_the_run(store_uri: str, client: Any) -> None:
    """MODEL_REGISTRY_ENABLED=false: the genome is an artifact of the run, no model version."""
    obs = Observability.from_env(
        tracking_uri=store_uri, delivery_process=False, model_registry_enabled=False
    )
    with obs, obs.run("ga", experiment="genomes") as run:
        gid = obs.genome([1, 0, 1], name="bits", fitness=2)
    assert run.run_id is not None

    files = {f.path for f in client.list_artifacts(run.run_id, "genomes")}
    assert f"genomes/{gid}.json" in files
    assert [] == client.search_registered_models("name = 'bits'")


@pytest.mark.server
def test_genomes_spooled_while_down_are_registered_once(tmp_path: Path) -> None:
    """Registry unreachable: genomes are spooled, registered on replay, with no duplicates."""
    server = MlflowServer(tmp_path / "server")
    obs = Observability.from_env(
        tracking_uri=server.url, export_timeout=2, flush_interval=0.2, spool_dir=tmp_path / "s"
    )
    try:
        with obs, obs.run("offline", experiment="genomes"):
            ids = [obs.genome([i, i + 1], name="pair", fitness=float(i)) for i in range(3)]
            ids.append(obs.genome([0, 1], name="pair", fitness=0.0))  # the first one again
            assert not obs.flush(1)
            assert obs.stats().genome.spooled == 4
            server.start()
            assert obs.flush(60)
        versions = GenomeRegistry(server.url).versions("pair")
    finally:
        server.stop()

    assert ids[:3] == [v.genome_id for v in versions]
    assert obs.stats().genome.delivered == 4
