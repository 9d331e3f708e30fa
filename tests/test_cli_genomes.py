"""Tests of ``allele-obs genomes`` (`allele.observability.cli.genomes`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from allele.observability.cli.genomes import genomes
from allele.observability.genomes import GenomeRegistry, GenomeVersion


@dataclass(frozen=True)
class Family:
    """A small registered lineage: grandparent, two parents, a child."""

    uri: str
    grand: GenomeVersion
    mom: GenomeVersion
    dad: GenomeVersion
    child: GenomeVersion


@pytest.fixture(name="family")
def _family(store_uri: str, client: Any, tmp_path: Path) -> Family:
    """Four genome versions of model 'onemax' with evaluations on two of them."""
    exp = client.create_experiment("cli", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    reg = GenomeRegistry(store_uri)
    grand = reg.register(run_id, {"bits": [0, 0, 0, 0]}, name="onemax", fitness=0.0, generation=0)
    mom = reg.register(
        run_id,
        {"bits": [1, 0, 0, 0]},
        name="onemax",
        fitness=1.0,
        generation=1,
        parents=[grand.genome_id],
        evaluations=[0.9, 1.0, 1.1],
    )
    dad = reg.register(
        run_id,
        {"bits": [0, 1, 0, 0]},
        name="onemax",
        fitness=1.0,
        generation=1,
        parents=[grand.genome_id, "g-immigrant"],
    )
    child = reg.register(
        run_id,
        {"bits": [1, 1, 0, 1]},
        name="onemax",
        fitness=3.0,
        generation=2,
        parents=[mom.genome_id, dad.genome_id],
        evaluations=[2.8, 3.0, 3.2, 3.0],
    )
    return Family(store_uri, grand, mom, dad, child)


def invoke(uri: str, *args: str) -> Result:
    return CliRunner().invoke(genomes, [*args, "--tracking-uri", uri])


def test_list_table(family: Family) -> None:
    """`list NAME` prints one row per version with fitness, parents and aliases."""
    result = invoke(family.uri, "list", "onemax")

    assert 0 == result.exit_code, result.output
    lines = result.output.splitlines()
    assert ["VERSION", "GENOME_ID", "FITNESS", "GEN", "PARENTS", "ALIASES", "RUN"] == (
        lines[0].split()
    )
    assert 5 == len(lines)
    assert ["4", family.child.genome_id, "3", "2"] == lines[4].split()[:4]
    assert "champion" == lines[4].split()[5]


def test_list_json(family: Family) -> None:
    """`list --json` prints the versions as a JSON list."""
    result = invoke(family.uri, "list", "onemax", "--json")

    assert 0 == result.exit_code, result.output
    rows = json.loads(result.output)
    assert [1, 2, 3, 4] == [r["version"] for r in rows]
    assert family.child.as_dict() == rows[3]


def test_list_unknown_model(family: Family) -> None:
    """Listing a model with no genome versions says so and succeeds."""
    result = invoke(family.uri, "list", "nothing")

    assert 0 == result.exit_code
    assert "no genome versions in model 'nothing'\n" == result.output


def test_lineage_table_and_json(family: Family) -> None:
    """`lineage` lists ancestors nearest first, marking unregistered parents."""
    table = invoke(family.uri, "lineage", family.child.genome_id, "--name", "onemax")
    as_json = invoke(family.uri, "lineage", family.child.genome_id, "--json")

    assert 0 == table.exit_code, table.output
    rows = table.output.splitlines()[2:]
    expected = [family.mom.genome_id, family.dad.genome_id, family.grand.genome_id, "g-immigrant"]
    assert expected == [next(w for w in row.split() if w.startswith("g-")) for row in rows]
    assert ["(not", "registered)", "-", "g-immigrant"] == rows[3].split()[:4]
    ancestors = json.loads(as_json.output)["ancestors"]
    assert expected == [a["genome_id"] for a in ancestors]
    assert {"genome_id": "g-immigrant", "registered": False} == ancestors[3]


def test_lineage_unknown_genome_exits_1(family: Family) -> None:
    """An unregistered genome id exits 1 with a one-line message."""
    result = CliRunner().invoke(genomes, ["lineage", "g-nope", "--tracking-uri", family.uri])

    assert 1 == result.exit_code
    assert "allele-obs genomes: genome g-nope is not registered\n" == result.stderr


def test_promote(family: Family) -> None:
    """`promote` sets an alias by version number or genome id."""
    by_number = invoke(family.uri, "promote", "onemax", "2", "stable")
    by_id = invoke(family.uri, "promote", "onemax", family.dad.genome_id, "canary", "--json")

    assert 0 == by_number.exit_code, by_number.output
    assert f"onemax version 2 ({family.mom.genome_id}) is now 'stable'" in by_number.output
    assert ["canary"] == json.loads(by_id.output)["aliases"]


@pytest.mark.parametrize("alias", ["latest", "v3", "bad alias"])
def test_promote_invalid_alias_exits_2(family: Family, alias: str) -> None:
    """An alias MLflow refuses exits 2 and names the alias."""
    result = invoke(family.uri, "promote", "onemax", "1", alias)

    assert 2 == result.exit_code
    assert f"invalid alias {alias!r}" in result.stderr


def test_compare_table(family: Family) -> None:
    """`compare` shows both versions, the fitness delta, Welch's test and the differences."""
    result = invoke(family.uri, "compare", "onemax", "2", family.child.genome_id)

    assert 0 == result.exit_code, result.output
    assert "fitness delta (b - a): +2" in result.output
    assert "welch t-test (b vs a): t=" in result.output
    assert "differences: 2" in result.output
    assert "genome['bits'][1]  0  1" in result.output
    assert "genome['bits'][3]  0  1" in result.output


def test_compare_json_without_evaluations(family: Family) -> None:
    """`compare --json` has welch null when a side has no evaluations."""
    result = invoke(family.uri, "compare", "onemax", "1", "3", "--json")

    data = json.loads(result.output)
    assert data["welch"] is None
    assert 1.0 == data["fitness_delta"]
    assert [{"path": "genome['bits'][1]", "a": 0, "b": 1}] == data["differences"]


def test_uris_default_to_environment(family: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --tracking-uri the command reads ALLELE_MLFLOW_TRACKING_URI."""
    monkeypatch.setenv("ALLELE_MLFLOW_TRACKING_URI", family.uri)

    result = CliRunner().invoke(genomes, ["list", "onemax", "--json"])

    assert 0 == result.exit_code, result.output
    assert 4 == len(json.loads(result.output))


def test_invalid_configuration_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalid ALLELE_MLFLOW_* variable exits 2 naming it."""
    monkeypatch.setenv("ALLELE_MLFLOW_TRACKING_URI", "ftp://nowhere")

    result = CliRunner().invoke(genomes, ["list", "onemax"])

    assert 2 == result.exit_code
    assert "ALLELE_MLFLOW_TRACKING_URI" in result.stderr
