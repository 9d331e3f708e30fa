"""Tests of genome identity, the registry and Welch's t-test (`allele.observability.genomes`)."""

from __future__ import annotations

import dataclasses
import doctest
import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from allele.observability.genomes import (
    GenomeNotFoundError,
    GenomeRef,
    GenomeRegistry,
    GenomeVersion,
    canonical_json,
    canonicalize,
    genome_id,
    validate_alias,
    welch_t_test,
)
from allele.observability.genomes.identity import MISSING, DiffEntry, diff_genomes
from allele.observability.genomes.stats import betainc, student_t_cdf
from servers import MlflowServer

# -- identity ----------------------------------------------------------------------------------


def test_golden_identity() -> None:
    """A fixed genome has a fixed canonical text and id (changing either breaks every store)."""
    genome = {"b": [1, 2.5, True, None], "a": "x"}

    assert '{"a":"x","b":[1,2.5,true,null]}' == canonical_json(genome)
    assert "g-eefd48e492206a5b6adb10ad" == genome_id(genome)


def test_key_order_does_not_matter() -> None:
    """Mappings are sorted by key, recursively."""
    a = {"x": 1, "y": {"p": 1, "q": 2}}
    b = {"y": {"q": 2, "p": 1}, "x": 1}

    assert genome_id(a) == genome_id(b)


def test_integral_floats_equal_ints() -> None:
    """1 and 1.0 (and 0 and -0.0) are one genome; 1.5 is written with repr."""
    assert genome_id([1, 0, 3]) == genome_id([1.0, -0.0, 3])
    assert "[1.5,0.1]" == canonical_json([1.5, 0.1])
    assert genome_id([1.5]) != genome_id([1])


def test_tuples_equal_lists() -> None:
    """Tuples and lists are the same sequence."""
    assert genome_id({"w": (1, (2, 3))}) == genome_id({"w": [1, [2, 3]]})


def test_bool_is_not_int() -> None:
    """True is not 1 and False is not 0."""
    assert genome_id([True]) != genome_id([1])
    assert genome_id({"a": False}) != genome_id({"a": 0})


def test_non_finite_floats_are_strings() -> None:
    """NaN and the infinities become "NaN", "Infinity" and "-Infinity"."""
    assert '["NaN","Infinity","-Infinity"]' == canonical_json([math.nan, math.inf, -math.inf])


def test_bytes_as_base64() -> None:
    """Bytes and bytearray become {"__bytes__": base64} and are equal to each other."""
    assert '{"__bytes__":"AAH/"}' == canonical_json(b"\x00\x01\xff")
    assert genome_id(bytearray(b"ab")) == genome_id(b"ab")


def test_numpy_arrays_and_scalars() -> None:
    """Arrays keep dtype and shape but not byte order; numpy scalars are Python numbers."""
    np = pytest.importorskip("numpy")
    arr = np.arange(6, dtype="<f8").reshape(2, 3)

    assert {"__ndarray__": "f8", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]} == json.loads(
        canonical_json(arr)
    )
    assert genome_id(arr) == genome_id(arr.astype(">f8"))
    assert genome_id(arr) != genome_id(arr.astype("i8"))
    assert genome_id([1, 2.5, True]) == genome_id([np.int64(1), np.float32(2.5), np.bool_(True)])


def test_numpy_structured_dtype_rejected() -> None:
    """A structured array has no canonical form and says where it is."""
    np = pytest.importorskip("numpy")
    arr = np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])

    with pytest.raises(TypeError, match=r"genome\['w'\]: unsupported type ndarray"):
        genome_id({"w": arr})


def test_sets_of_str_or_numbers_are_sorted_lists() -> None:
    """A set of str or of numbers equals its sorted list; a mixed set is refused with its path."""
    assert genome_id({3, 1, 2}) == genome_id([1, 2, 3])
    assert genome_id(frozenset({"b", "a"})) == genome_id(["a", "b"])
    with pytest.raises(TypeError, match=r"genome\['layers'\]\[2\]: unsupported type set"):
        genome_id({"layers": [1, 2, {1, "a"}]})


@dataclasses.dataclass
class _Layer:
    units: int
    activation: str


class _Custom:
    def to_genome(self) -> Any:
        return {"units": 4, "activation": "relu"}


def test_dataclass_and_to_genome() -> None:
    """Dataclasses use asdict and objects with to_genome() use what it returns."""
    expected = genome_id({"units": 4, "activation": "relu"})

    assert expected == genome_id(_Layer(4, "relu"))
    assert expected == genome_id(_Custom())


@pytest.mark.parametrize(
    ("genome", "message"),
    [
        ({"layers": [1, 2, object()]}, r"genome\['layers'\]\[2\]: unsupported type object"),
        ({"a": {"b": 1j}}, r"genome\['a'\]\['b'\]: unsupported type complex"),
        ({"a": {1: "x"}}, r"genome\['a'\]: mapping key 1 has type int; keys must be str"),
        ([iter([1])], r"genome\[0\]: unsupported type list_iterator"),
    ],
)
def test_unsupported_types_name_type_and_path(genome: Any, message: str) -> None:
    """Unsupported values and keys raise TypeError naming the type and the path."""
    with pytest.raises(TypeError, match=message):
        genome_id(genome)


def test_reference_cycle_rejected() -> None:
    """A genome that contains itself raises TypeError instead of recursing forever."""
    loop: list[Any] = [1]
    loop.append(loop)

    with pytest.raises(TypeError, match=r"genome\[1\]: reference cycle"):
        genome_id(loop)


def test_identity_same_in_another_process() -> None:
    """Another interpreter with another hash seed computes the same id."""
    genome = {"z": [1.0, 2.25, (3, 4)], "a": {"k": {"y", "x"}}, "b": b"\x01"}
    code = (
        "from allele.observability.genomes import genome_id;"
        "print(genome_id({'b': b'\\x01', 'a': {'k': {'x', 'y'}}, 'z': [1, 2.25, [3, 4]]}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )

    assert genome_id(genome) == out.stdout.strip()


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(_json_values)
def test_canonical_form_is_a_fixed_point(value: Any) -> None:
    """Canonicalising the parsed canonical JSON gives the same text again."""
    text = canonical_json(value)

    assert text == canonical_json(json.loads(text))


@given(st.dictionaries(st.text(), st.integers(), max_size=8), st.randoms())
def test_insertion_order_never_matters(mapping: dict[str, int], rnd: random.Random) -> None:
    """Any insertion order of the same mapping gives the same id."""
    items = list(mapping.items())
    rnd.shuffle(items)

    assert genome_id(mapping) == genome_id(dict(items))


def test_diff_limits_entries_and_counts_all() -> None:
    """The structural diff keeps the first N differences and counts every one."""
    a = {"w": list(range(100)), "only_a": 1}
    b = {"w": [x + 1 for x in range(100)] + [7], "only_b": (2,)}

    diffs, total = diff_genomes(a, b, limit=5)

    assert 103 == total
    assert DiffEntry("genome['only_a']", 1, MISSING) == diffs[0]
    assert {"path": "genome['only_a']", "a": 1} == diffs[0].as_dict()
    assert 5 == len(diffs)


# -- statistics --------------------------------------------------------------------------------


def test_betainc_known_values() -> None:
    """Closed forms of I_x(a, b): I_x(1, 1) = x, I_x(a, 1) = x**a, I_0.5(a, a) = 0.5."""
    assert math.isclose(0.3, betainc(1, 1, 0.3), rel_tol=1e-13)
    assert math.isclose(0.3**2.5, betainc(2.5, 1, 0.3), rel_tol=1e-12)
    assert math.isclose(0.5, betainc(7.5, 7.5, 0.5), rel_tol=1e-12)
    assert 0.0 == betainc(2, 3, 0.0)
    assert 1.0 == betainc(2, 3, 1.0)
    with pytest.raises(ValueError, match="x="):
        betainc(1, 1, 1.5)


def test_student_t_cdf_table_values() -> None:
    """Textbook quantiles: t(10) = 2.228 and t(1) = 12.706 at 97.5 %, t(inf) ~ 1.96."""
    assert math.isclose(0.975, student_t_cdf(2.228, 10), abs_tol=1e-4)
    assert math.isclose(0.975, student_t_cdf(12.706, 1), abs_tol=1e-5)
    assert math.isclose(0.975, student_t_cdf(1.959964, 1e7), abs_tol=1e-6)
    assert math.isclose(0.025, student_t_cdf(-2.228, 10), abs_tol=1e-4)
    assert 0.5 == student_t_cdf(0.0, 3.5)


def test_betainc_matches_scipy() -> None:
    """I_x(a, b) agrees with scipy.special.betainc to 1e-10 over a wide random grid."""
    special = pytest.importorskip("scipy.special")
    rnd = random.Random(7)
    for _ in range(3000):
        a, b, x = rnd.uniform(0.05, 400), rnd.uniform(0.05, 400), rnd.random()
        expected = float(special.betainc(a, b, x))

        assert math.isclose(expected, betainc(a, b, x), rel_tol=1e-10, abs_tol=1e-300)


def test_welch_matches_scipy() -> None:
    """t, dof and p agree with scipy.stats.ttest_ind(equal_var=False)."""
    stats = pytest.importorskip("scipy.stats")
    rnd = random.Random(11)
    for _ in range(300):
        a = [rnd.gauss(0, 1) for _ in range(rnd.randint(2, 40))]
        b = [rnd.gauss(0.3, 4) for _ in range(rnd.randint(2, 40))]
        ref = stats.ttest_ind(a, b, equal_var=False)

        t, dof, p = welch_t_test(a, b)

        assert math.isclose(float(ref.statistic), t, rel_tol=1e-10)
        assert math.isclose(float(ref.pvalue), p, rel_tol=1e-9)
        assert math.isclose(float(ref.df), dof, rel_tol=1e-10)


def test_welch_hand_computed_value() -> None:
    """[1,2,3] vs [4,5,6]: t = -3.674, dof = 4, p = 0.02131 (two-sided)."""
    t, dof, p = welch_t_test([1, 2, 3], [4, 5, 6])

    assert math.isclose(-3 / math.sqrt(2 / 3), t, rel_tol=1e-12)
    assert math.isclose(4.0, dof, rel_tol=1e-12)
    assert math.isclose(0.021311641128756, p, rel_tol=1e-9)


def test_welch_edge_cases() -> None:
    """Zero variance gives t = 0 or +-inf; fewer than 2 values or NaN raise ValueError."""
    assert (0.0, 4.0, 1.0) == welch_t_test([1, 1, 1], [1, 1, 1])
    assert (math.inf, 2.0, 0.0) == welch_t_test([2, 2], [1, 1])
    with pytest.raises(ValueError, match="at least 2"):
        welch_t_test([1], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        welch_t_test([1, math.nan], [1, 2])


# -- registry ----------------------------------------------------------------------------------


@pytest.fixture(name="run_id")
def _run_id(client: Any, tmp_path: Path) -> str:
    """A fresh run whose artifacts live in this test's temp dir."""
    exp = client.create_experiment("genomes", artifact_location=str(tmp_path / "artifacts"))
    return str(client.create_run(exp).info.run_id)


@pytest.fixture(name="registry")
def _registry(store_uri: str) -> GenomeRegistry:
    """A registry on the test store (tracking and registry on the same sqlite file)."""
    return GenomeRegistry(store_uri)


def _read_artifact(client: Any, run_id: str, path: str, tmp: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp))).read_text()


def test_register_creates_version_with_artifact_source_and_tags(
    registry: GenomeRegistry, client: Any, run_id: str, tmp_path: Path
) -> None:
    """A new genome is a version whose source is its run artifact and whose tags describe it."""
    genome = {"w": [0.5, 1.0], "act": "relu"}
    gid = genome_id(genome)

    v = registry.register(
        run_id, genome, name="onemax", fitness=3.5, generation=7, parents=["g-p1", "g-p2"]
    )

    mv = client.get_model_version("onemax", str(v.version))
    assert f"runs:/{run_id}/genomes/{gid}.json" == mv.source == v.source
    assert run_id == mv.run_id
    assert {
        "genome_id": gid,
        "fitness": "3.5",
        "generation": "7",
        "parents": "g-p1,g-p2",
        "run_id": run_id,
        "direction": "maximize",
        "evaluations": "0",
    } == mv.tags
    assert canonical_json(genome) == _read_artifact(
        client, run_id, f"genomes/{gid}.json", tmp_path / "dl"
    )
    meta = json.loads(_read_artifact(client, run_id, f"genomes/{gid}.meta.json", tmp_path / "m"))
    assert {"fitness": 3.5, "generation": 7, "parents": ["g-p1", "g-p2"]}.items() <= meta.items()
    assert "onemax/1" == client.get_run(run_id).data.tags[f"allele.genome.{gid}"]
    assert {"allele.kind": "genome"} == client.get_registered_model("onemax").tags
    assert genome == registry.load(v)


def test_same_genome_twice_is_one_version(registry: GenomeRegistry, run_id: str) -> None:
    """Registering an equal genome again (reordered, 1.0 for 1, tuple for list) returns it."""
    first = registry.register(run_id, {"a": 1, "b": [1, 2]}, name="m", fitness=1.0)

    again = registry.register(run_id, {"b": (1.0, 2), "a": 1.0}, name="m", fitness=9.0)

    assert first == again
    assert [1] == [v.version for v in registry.versions("m")]


def test_same_genome_from_another_run_tags_that_run(
    registry: GenomeRegistry, client: Any, run_id: str
) -> None:
    """A second run meeting a registered genome gets the run tag, not a new version."""
    first = registry.register(run_id, {"a": 1}, name="m", fitness=1.0)
    other_run = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id

    again = registry.register(other_run, {"a": 1}, name="m", fitness=1.0)

    assert first == again
    assert run_id == again.run_id
    assert "m/1" == client.get_run(other_run).data.tags[f"allele.genome.{first.genome_id}"]


_RACE_SCRIPT = textwrap.dedent(
    """
    import sys
    from allele.observability.genomes import GenomeRegistry
    uri, run_id = sys.argv[1], sys.argv[2]
    registry = GenomeRegistry(uri)
    registry.client.search_registered_models()
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(6):
        registry.register(run_id, {"gene": i}, name="race", fitness=float(i % 4), generation=i)
    """
)


def test_concurrent_processes_register_one_version_each(
    registry: GenomeRegistry, store_uri: str, run_id: str
) -> None:
    """Two processes registering the same genomes at once leave one version per genome."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE_SCRIPT, store_uri, run_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:  # a start barrier: both have imported MLflow and opened the store
        assert proc.stdout is not None
        assert "ready\n" == proc.stdout.readline()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        _, err = proc.communicate(timeout=90)
        assert 0 == proc.returncode, err

    versions = registry.versions("race")

    assert [genome_id({"gene": i}) for i in range(6)] == [v.genome_id for v in versions]
    champion = registry.refresh_champion("race")  # exact across processes after a refresh
    assert champion is not None
    assert genome_id({"gene": 3}) == champion.genome_id
    assert champion == registry.champion("race")


def test_threads_register_one_version_each(registry: GenomeRegistry, run_id: str) -> None:
    """Four threads sharing one registry and the same genomes leave one version per genome."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in range(5):
                registry.register(run_id, {"t": i}, name="threads", fitness=float(i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert [] == errors
    assert [genome_id({"t": i}) for i in range(5)] == [
        v.genome_id for v in registry.versions("threads")
    ]
    champion = registry.champion("threads")
    assert champion is not None
    assert genome_id({"t": 4}) == champion.genome_id


def test_champion_moves_only_on_improvement(registry: GenomeRegistry, run_id: str) -> None:
    """Maximising: better fitness takes the alias, worse and equal (later) do not."""
    registry.register(run_id, [1], name="m", fitness=1.0)
    best = registry.register(run_id, [2], name="m", fitness=3.0)
    worse = registry.register(run_id, [3], name="m", fitness=2.0)
    tie = registry.register(run_id, [4], name="m", fitness=3.0)

    assert ("champion",) == best.aliases
    assert () == worse.aliases == tie.aliases
    assert best == registry.champion("m")


def test_champion_minimize(store_uri: str, run_id: str) -> None:
    """Minimising: the lowest fitness holds the alias."""
    registry = GenomeRegistry(store_uri, direction="minimize")
    registry.register(run_id, [1], name="m", fitness=5.0)
    best = registry.register(run_id, [2], name="m", fitness=-1.0)
    registry.register(run_id, [3], name="m", fitness=0.0)

    champion = registry.champion("m")

    assert champion is not None
    assert best.version == champion.version
    assert "minimize" == GenomeRegistry(store_uri, direction="minimise").direction


def test_refresh_champion_repairs_the_alias(registry: GenomeRegistry, run_id: str) -> None:
    """refresh_champion recomputes the best version from all versions and moves the alias."""
    registry.register(run_id, [1], name="m", fitness=1.0)
    best = registry.register(run_id, [2], name="m", fitness=5.0)
    registry.register(run_id, [3], name="m")
    registry.promote("m", 1, "champion")

    repaired = registry.refresh_champion("m")

    assert repaired is not None
    assert (best.version, ("champion",)) == (repaired.version, repaired.aliases)
    assert repaired == registry.champion("m")
    assert registry.refresh_champion("no-such-model") is None


def test_unknown_fitness_never_champion(registry: GenomeRegistry, run_id: str) -> None:
    """None and NaN fitness never take the champion alias, and nothing is champion yet."""
    registry.register(run_id, [1], name="m")
    registry.register(run_id, [2], name="m", fitness=math.nan)

    assert registry.champion("m") is None
    assert registry.champion("no-such-model") is None


def test_lineage_nearest_first_with_two_parents(registry: GenomeRegistry, run_id: str) -> None:
    """Ancestors come breadth first: both parents, then the grandparent; unknown ids as refs."""
    grand = registry.register(run_id, ["grand"], name="m", fitness=1.0, generation=0)
    mom = registry.register(run_id, ["mom"], name="m", generation=1, parents=[grand.genome_id])
    dad = registry.register(
        run_id, ["dad"], name="m", generation=1, parents=[grand.genome_id, "g-outsider"]
    )
    child = registry.register(
        run_id, ["child"], name="m", generation=2, parents=[mom.genome_id, dad.genome_id]
    )

    ancestors = registry.lineage(child.genome_id)

    assert [mom.genome_id, dad.genome_id, grand.genome_id, "g-outsider"] == [
        a.genome_id for a in ancestors
    ]
    assert isinstance(ancestors[2], GenomeVersion)
    assert ("champion",) == ancestors[2].aliases
    assert GenomeRef("g-outsider") == ancestors[3]
    assert [mom.genome_id] == [a.genome_id for a in registry.lineage(child.genome_id, limit=1)]
    assert [] == registry.lineage(grand.genome_id, "m")
    with pytest.raises(GenomeNotFoundError, match="g-nope"):
        registry.lineage("g-nope")


def test_promote_valid_alias(registry: GenomeRegistry, run_id: str) -> None:
    """promote points an alias at a version given by genome id or number."""
    v1 = registry.register(run_id, [1], name="m", fitness=1.0)
    v2 = registry.register(run_id, [2], name="m", fitness=0.5)

    promoted = registry.promote("m", v2.genome_id, "stable")
    by_number = registry.promote("m", 1, "canary-2")

    assert ("stable",) == promoted.aliases
    assert ("canary-2", "champion") == tuple(sorted(by_number.aliases))
    assert [("canary-2", "champion"), ("stable",)] == [
        tuple(sorted(v.aliases)) for v in registry.versions("m")
    ]
    assert v1.genome_id == registry.get("m", "1").genome_id


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v3", "V12", "bad alias", "", "a/b"])
def test_promote_rejects_invalid_alias(registry: GenomeRegistry, run_id: str, alias: str) -> None:
    """Aliases MLflow reserves or refuses raise ValueError naming the alias, before any call."""
    registry.register(run_id, [1], name="m")

    with pytest.raises(ValueError, match=f"invalid alias {alias!r}"):
        registry.promote("m", 1, alias)
    assert "v3a" == validate_alias("v3a")


def test_get_unknown_raises_not_found(registry: GenomeRegistry, run_id: str) -> None:
    """Unknown versions and genome ids raise GenomeNotFoundError; other keys ValueError."""
    registry.register(run_id, [1], name="m")

    with pytest.raises(GenomeNotFoundError, match="no version 9"):
        registry.get("m", 9)
    with pytest.raises(GenomeNotFoundError, match="g-missing"):
        registry.get("m", "g-missing")
    with pytest.raises(ValueError, match="expected a genome id"):
        registry.get("m", "champion")


def test_compare_without_evaluations(registry: GenomeRegistry, run_id: str) -> None:
    """compare reports fitness, generations and the structural diff; no Welch without data."""
    registry.register(run_id, {"w": [1, 2], "lr": 0.1}, name="m", fitness=1.0, generation=0)
    registry.register(run_id, {"w": [1, 3, 4], "lr": 0.1}, name="m", fitness=1.5, generation=3)

    c = registry.compare("m", 1, 2)

    assert 0.5 == c.fitness_delta
    assert (0, 3) == (c.a.generation, c.b.generation)
    assert (DiffEntry("genome['w'][1]", 2, 3), DiffEntry("genome['w'][2]", MISSING, 4)) == (
        c.differences
    )
    assert 2 == c.difference_count
    assert c.welch is None
    assert {"path": "genome['w'][2]", "b": 4} == c.as_dict()["differences"][1]


def test_compare_with_evaluations(registry: GenomeRegistry, run_id: str) -> None:
    """With >= 2 evaluations each, compare runs Welch's test of b against a."""
    ea, eb = [1.0, 1.2, 0.9, 1.1], [1.6, 1.4, 1.5, 1.9, 1.7]
    a = registry.register(run_id, [1], name="m", fitness=1.05, evaluations=ea)
    b = registry.register(run_id, [2], name="m", fitness=1.62, evaluations=eb)
    registry.register(run_id, [3], name="m", fitness=2.0, evaluations=[2.0])

    c = registry.compare("m", a.genome_id, b.genome_id)
    one_sided = registry.compare("m", a.genome_id, 3)

    assert welch_t_test(eb, ea) == c.welch
    assert c.welch is not None
    assert c.welch[0] > 0
    assert one_sided.welch is None
    assert json.dumps(c.as_dict())


def test_register_component_file_and_directory(
    registry: GenomeRegistry, client: Any, run_id: str, tmp_path: Path
) -> None:
    """Files and directories become versions pointing at their artifacts, idempotently."""
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x00" * 100)
    model_dir = tmp_path / "surrogate"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "sub" / "w.npy").write_bytes(b"abc")

    f1 = registry.register_component("surrogate", weights, run_id=run_id, tags={"role": "w"})
    d1 = registry.register_component("surrogate", model_dir, run_id=run_id)
    f2 = registry.register_component("surrogate", str(weights), run_id=run_id)
    weights.write_bytes(b"\x01" * 100)
    f3 = registry.register_component("surrogate", weights, run_id=run_id)

    assert (1, 2, 1, 3) == (f1.version, d1.version, f2.version, f3.version)
    assert f"runs:/{run_id}/components/{f1.content_sha256[:12]}/weights.bin" == f1.source
    mv = client.get_model_version("surrogate", "2")
    assert "directory" == mv.tags["kind"]
    assert "w" == client.get_model_version("surrogate", "1").tags["role"]
    artifact_path = mv.source.removeprefix(f"runs:/{run_id}/")
    local = Path(client.download_artifacts(run_id, artifact_path, str(tmp_path / "dl")))
    assert "abc" == (local / "sub" / "w.npy").read_text()
    assert [] == registry.versions("surrogate")


def test_registry_uri_differs_from_tracking(
    template_db: Path, store_uri: str, client: Any, run_id: str, tmp_path: Path
) -> None:
    """With a separate registry store, versions land there and artifacts stay with the run."""
    from mlflow import MlflowClient

    registry_db = tmp_path / "registry.db"
    shutil.copy(template_db, registry_db)
    registry_uri = f"sqlite:///{registry_db}"
    registry = GenomeRegistry(store_uri, registry_uri)

    v = registry.register(run_id, {"g": 1}, name="split", fitness=1.0)

    assert 1 == len(MlflowClient(registry_uri=registry_uri).search_model_versions("name='split'"))
    assert [] == list(client.search_model_versions("name='split'"))
    assert {"g": 1} == registry.load(v)
    assert v == registry.champion("split")


def test_from_env_reads_both_uris(
    monkeypatch: pytest.MonkeyPatch, store_uri: str, tmp_path: Path
) -> None:
    """from_env takes ALLELE_MLFLOW_TRACKING_URI and ALLELE_MLFLOW_MODEL_REGISTRY_URI."""
    other = f"sqlite:///{tmp_path / 'r.db'}"
    monkeypatch.setenv("ALLELE_MLFLOW_TRACKING_URI", store_uri)
    monkeypatch.setenv("ALLELE_MLFLOW_MODEL_REGISTRY_URI", other)

    registry = GenomeRegistry.from_env(direction="min")

    assert (store_uri, other, "minimize") == (
        registry.tracking_uri,
        registry.registry_uri,
        registry.direction,
    )
    assert store_uri == GenomeRegistry.from_env(model_registry_uri=None).registry_uri


def test_log_without_registry(registry: GenomeRegistry, client: Any, run_id: str) -> None:
    """With the registry disabled, log() still stores the genome and tags the run."""
    gid = registry.log(run_id, {"g": 2}, name="m", fitness=1.0, evaluations=[1, 2])

    assert genome_id({"g": 2}) == gid
    assert "m" == client.get_run(run_id).data.tags[f"allele.genome.{gid}"]
    paths = {f.path for f in client.list_artifacts(run_id, "genomes")}
    assert {f"genomes/{gid}.json", f"genomes/{gid}.meta.json"} == paths
    assert [] == client.search_registered_models()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"genome": {1: 2}}, TypeError, "keys must be str"),
        ({"fitness": "high"}, TypeError, "fitness must be a number"),
        ({"generation": 1.5}, TypeError, "generation must be an int"),
        ({"parents": ["g-a,g-b"]}, ValueError, "parent ids"),
        ({"tags": {"genome_id": "x"}}, ValueError, "reserved"),
        ({"evaluations": ["1"]}, TypeError, "evaluations must be numbers"),
        ({"name": ""}, ValueError, "name must be"),
    ],
)
def test_register_rejects_bad_input_before_io(
    registry: GenomeRegistry,
    client: Any,
    run_id: str,
    kwargs: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    """Bad input raises TypeError/ValueError naming the field and writes nothing."""
    call: dict[str, Any] = {"genome": [1], "name": "m", **kwargs}

    with pytest.raises(error, match=message):
        registry.register(run_id, **call)
    assert [] == client.list_artifacts(run_id)


def test_canonicalized_genome_is_accepted(registry: GenomeRegistry, run_id: str) -> None:
    """A CanonicalGenome computed at the call site registers as the genome itself."""
    canon = canonicalize({"frozen": [1, 2]})

    v = registry.register(run_id, canon, name="m")

    assert canon.genome_id == v.genome_id
    assert {"frozen": [1, 2]} == registry.load(v)


@pytest.mark.server
def test_register_and_champion_over_http(mlflow_server: MlflowServer) -> None:
    """Against a real tracking server: registration, idempotence, champion and load."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment("genomes-http")).info.run_id
    registry = GenomeRegistry(mlflow_server.url)

    a = registry.register(run_id, {"w": [1]}, name="http-m", fitness=1.0, evaluations=[1, 2])
    b = registry.register(run_id, {"w": [2]}, name="http-m", fitness=2.0, parents=[a.genome_id])
    again = registry.register(run_id, {"w": (2.0,)}, name="http-m", fitness=0.0)

    assert b == again
    assert b == registry.champion("http-m")
    assert f"runs:/{run_id}/genomes/{b.genome_id}.json" == b.source
    assert [a.genome_id] == [x.genome_id for x in registry.lineage(b.genome_id)]
    assert {"w": [2]} == registry.load(b)
    assert [1, 2] == [v.version for v in registry.versions("http-m")]


DOCS = Path(__file__).resolve().parent.parent / "docs" / "genomes.md"


def test_docs_examples_run(
    template_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pycon and Python examples of docs/genomes.md run and print what the page says."""
    text = DOCS.read_text()
    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, {}, "genomes.md", str(DOCS), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert 0 == runner.summarize(verbose=False).failed

    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    shutil.copy(template_db, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, check=True
    ).stdout.splitlines()

    assert "4" == out[0]
    assert out[2].startswith("2.0 (28.28")


def test_public_names_resolve() -> None:
    """Every name in allele.observability.genomes.registry.__all__ exists, each once."""
    from allele.observability import genomes

    assert len(set(genomes.__all__)) == len(genomes.__all__)
    for name in genomes.__all__:
        assert getattr(genomes, name) is not None
