"""
Validation at the call (issue 9, item 2): everything the store, the exporter or the spool
would refuse later raises at the call, with the right exception type and a message naming
the field, so a poison value never reaches the exporter; events before and after it are
all delivered.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from allele.observability import Observability
from allele.observability._core.names import sanitize_key
from allele.observability.alerts.record import alert_key
from allele.observability.sinks.deadletter import DEAD_LETTER_FILE
from servers import MlflowServer

UTC = timezone.utc
_NOW = time.time()
_CYCLE: dict[str, Any] = {}
_CYCLE["self"] = _CYCLE

#: (id, call, exception type, regex of the message); the call gets an Observability in a
#: run, typed Any: the poison values are of the wrong types on purpose
POISON: list[tuple[str, Callable[[Any], Any], type[Exception], str]] = [
    # metric names, values, steps and timestamps
    ("metric name list", lambda o: o.metric(["a"], 1), TypeError,
     r"metric name must be a str, got list"),
    ("metric name tuple", lambda o: o.metric(("a",), 1), TypeError,
     r"metric name must be a str, got tuple"),
    ("metric name empty", lambda o: o.metric("", 1), ValueError, r"metric name must not be empty"),
    ("metric name slash", lambda o: o.metric("/", 1), ValueError,
     r"metric name '/' has no valid characters"),
    ("metric value str", lambda o: o.metric("m", "1"), TypeError,
     r"metric 'm': value must be a real number"),
    ("metric value huge int", lambda o: o.metric("m", 10**400), ValueError,
     r"metric 'm': value .* too large for a 64-bit float"),
    ("step 2**63", lambda o: o.metric("m", 1, step=2**63), ValueError,
     r"metric 'm': step must fit a signed 64-bit integer"),
    ("step -2**63-1", lambda o: o.metric("m", 1, step=-(2**63) - 1), ValueError,
     r"metric 'm': step must fit a signed 64-bit integer"),
    ("step numpy uint64", lambda o: o.metric("m", 1, step=np.uint64(2**64 - 1)), ValueError,
     r"metric 'm': step must fit a signed 64-bit integer"),
    ("step huge float", lambda o: o.metric("m", 1, step=1e300), ValueError,
     r"metric 'm': step must fit a signed 64-bit integer"),
    ("step str", lambda o: o.metric("m", 1, step="3"), TypeError,
     r"metric 'm': step must be an int, got str"),
    ("step bool", lambda o: o.metric("m", 1, step=True), TypeError,
     r"metric 'm': step must be an int, got bool"),
    ("timestamp ns", lambda o: o.metric("m", 1, timestamp=time.time_ns()), ValueError,
     r"timestamp .* looks like nanoseconds since the epoch; pass seconds \(time\.time\(\)\)"),
    ("timestamp us", lambda o: o.metric("m", 1, timestamp=_NOW * 1e6), ValueError,
     r"looks like microseconds since the epoch; pass seconds"),
    ("timestamp ms", lambda o: o.metric("m", 1, timestamp=_NOW * 1000), ValueError,
     r"looks like milliseconds since the epoch; pass seconds"),
    ("timestamp ms int", lambda o: o.metric("m", 1, timestamp=time.time_ns() // 10**6),
     ValueError, r"looks like milliseconds"),
    ("timestamp nan", lambda o: o.metric("m", 1, timestamp=float("nan")), ValueError,
     r"timestamp must be a finite number >= 0"),
    ("timestamp negative", lambda o: o.metric("m", 1, timestamp=-1.0), ValueError,
     r"timestamp must be a finite number >= 0"),
    ("timestamp 1960", lambda o: o.metric("m", 1, timestamp=datetime(1960, 1, 1, tzinfo=UTC)),
     ValueError, r"timestamp .* is before 1970"),
    ("timestamp str", lambda o: o.metric("m", 1, timestamp="now"), TypeError,
     r"timestamp must be seconds since the epoch \(time\.time\(\)\) or a datetime, got str"),
    ("obs.step 2**63", lambda o: o.step(2**63), ValueError,
     r"step must fit a signed 64-bit integer"),
    ("obs.step str", lambda o: o.step("1"), TypeError, r"step must be an int, got str"),
    # runs
    ("run name list", lambda o: o.run(["a"]), TypeError, r"run name must be a str, got list"),
    ("run name surrogate", lambda o: o.run("r\udc80"), ValueError,
     r"run name is not valid Unicode text"),
    ("experiment too long", lambda o: o.run("r", experiment="e" * 501), ValueError,
     r"experiment is 501 characters; MLflow allows at most 500"),
    # params and tags
    ("param name list", lambda o: o.param(["a"], 1), TypeError,
     r"param name must be a str, got list"),
    ("param value too long", lambda o: o.param("p", "x" * 6001), ValueError,
     r"param 'p': value is 6001 characters; MLflow allows at most 6000"),
    ("param value surrogate", lambda o: o.param("p", "a\ud800"), ValueError,
     r"param 'p': value is not valid Unicode text: lone surrogate"),
    ("params key dict", lambda o: o.params({("a", 1): 1}), TypeError,
     r"param name must be a str, got tuple"),
    ("tag key dict", lambda o: o.tag({"a": 1}, 1), TypeError, r"tag key must be a str, got dict"),
    ("tag value too long", lambda o: o.tag("t", "x" * 8001), ValueError,
     r"tag 't': value is 8001 characters; MLflow allows at most 8000"),
    # alerts
    ("alert name list", lambda o: o.alert(["a"]), TypeError, r"alert name must be a str, got list"),
    ("alert name slash", lambda o: o.alert("/"), ValueError,
     r"alert name '/' has no valid characters"),
    ("alert name dots", lambda o: o.alert("./.."), ValueError,
     r"alert name '\./\.\.' has no valid"),
    ("alert name empty", lambda o: o.alert(""), ValueError, r"alert name must not be empty"),
    ("alert name surrogate", lambda o: o.alert("a\udc80"), ValueError,
     r"alert name is not valid Unicode text: lone surrogate"),
    ("alert severity", lambda o: o.alert("a", severity="fatal"), ValueError,
     r"alert 'a': severity must be one of"),
    ("alert attributes list", lambda o: o.alert("a", attributes=[("k", 1)]), TypeError,
     r"alert 'a': attributes must be a mapping, got list"),
    ("alert attributes tuple key", lambda o: o.alert("a", attributes={"k": {(1, 2): 3}}),
     TypeError, r"alert 'a': attributes must be JSON-serialisable"),
    ("alert attributes cycle", lambda o: o.alert("a", attributes=_CYCLE), TypeError,
     r"alert 'a': attributes must be JSON-serialisable"),
    ("alert too large", lambda o: o.alert("a", message="x" * 70_000), ValueError,
     r"alert 'a': name, message and attributes are \d+ bytes as JSON; an alert holds at most"),
    # phases (checked when obs.phase is called, not when the block is entered)
    ("phase name list", lambda o: o.phase(["a"]), TypeError, r"phase name must be a str, got list"),
    ("phase name empty", lambda o: o.phase(""), ValueError, r"phase name must not be empty"),
    ("phase name too long", lambda o: o.phase("p" * 1001), ValueError,
     r"phase name is 1001 characters"),
    # genomes
    ("genome name list", lambda o: o.genome([1], name=["g"]), TypeError,
     r"genome name must be a str, got list"),
    ("genome name slash", lambda o: o.genome([1], name="a/b"), ValueError,
     r"genome name 'a/b': MLflow model names cannot contain '/' or ':'"),
    ("genome name too long", lambda o: o.genome([1], name="g" * 257), ValueError,
     r"genome name is 257 characters"),
    ("genome name both quotes", lambda o: o.genome([1], name="it's \"x\""), ValueError,
     r"genome name .* cannot hold both"),
    ("genome name dotdot", lambda o: o.genome([1], name=".."), ValueError,
     r"genome name '\.\.' is not a normalised path"),
    ("generation 2**63", lambda o: o.genome([1], name="g", generation=2**63), ValueError,
     r"generation must fit a signed 64-bit integer"),
    ("generation str", lambda o: o.genome([1], name="g", generation="1"), TypeError,
     r"generation must be an int, got str"),
    ("fitness huge int", lambda o: o.genome([1], name="g", fitness=10**400), ValueError,
     r"fitness: .* too large for a 64-bit float"),
    ("fitness str", lambda o: o.genome([1], name="g", fitness="high"), TypeError,
     r"fitness must be a number or None, got str"),
    ("evaluations int", lambda o: o.genome([1], name="g", evaluations=5), TypeError,
     r"evaluations must be an iterable of numbers, got int"),
    ("parents int", lambda o: o.genome([1], name="g", parents=5), TypeError,
     r"parents must be a genome id or an iterable of them, got int"),
    ("genome tags list", lambda o: o.genome([1], name="g", tags=["a"]), TypeError,
     r"genome tags must be a mapping of str to str, got list"),
    ("genome tag key int", lambda o: o.genome([1], name="g", tags={1: "a"}), TypeError,
     r"genome tag key must be a str, got int"),
    ("genome tag reserved", lambda o: o.genome([1], name="g", tags={"genome_id": "x"}),
     ValueError, r"genome tags \['genome_id'\] are reserved"),
    ("genome tag value too long", lambda o: o.genome([1], name="g", tags={"k": "x" * 100_001}),
     ValueError, r"genome tag 'k': value is 100001 characters"),
    ("genome tag value surrogate", lambda o: o.genome([1], name="g", tags={"k": "\udcff"}),
     ValueError, r"genome tag 'k': value is not valid Unicode text"),
    # 3 M characters, each 6 bytes as the spool's ASCII JSON: over one spool record
    ("genome too large", lambda o: o.genome(["\u00e9" * 3_000_000], name="g"), ValueError,
     r"genome g-\w+ \('g'\) is \d+ bytes as JSON; one event holds at most \d+ \(the spool"),
    # artifacts
    ("artifact_path absolute", lambda o: o.artifact(__file__, "/abs"), ValueError,
     r"artifact_path '/abs' must be a normalised relative path"),
    ("artifact_path up", lambda o: o.artifact(__file__, "a/../../b"), ValueError,
     r"artifact_path 'a/\.\./\.\./b' must be a normalised relative path"),
    ("artifact_path backslash", lambda o: o.artifact(__file__, "a\\b"), ValueError,
     r"artifact_path .* must not hold a backslash"),
    ("artifact_path int", lambda o: o.artifact(__file__, 5), TypeError,
     r"artifact_path must be a str or None, got int"),
]  # fmt: skip


@pytest.fixture(name="shared_obs", scope="module")
def _shared_obs(
    template_db: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Observability]:
    """One instance on a real sqlite store for the raise-at-the-call cases (they emit nothing)."""
    folder = tmp_path_factory.mktemp("validation")
    shutil.copy(template_db, folder / "mlflow.db")
    obs = Observability.from_env(
        tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
        delivery_process=False,
        spool_dir=folder / "spool",
        system_metrics_interval=0,
    )
    with obs:
        yield obs


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [pytest.param(c, e, m, id=i) for i, c, e, m in POISON],
)
def test_poison_raises_at_the_call_naming_the_field(
    shared_obs: Observability,
    call: Callable[[Observability], Any],
    error: type[Exception],
    message: str,
) -> None:
    """Each poison value raises the right exception, naming the field; nothing is emitted."""
    with shared_obs.run("poison", experiment="validation"):
        before = shared_obs.stats()
        with pytest.raises(error, match=message):
            call(shared_obs)
        after = shared_obs.stats()

    for kind in ("metric", "param", "tag", "alert", "phase", "genome", "artifact"):
        assert getattr(before, kind).emitted == getattr(after, kind).emitted, kind


def _assert_clean(obs: Observability) -> None:
    """Everything emitted was delivered: balanced, nothing dead-lettered, spooled or pending."""
    stats = obs.stats()
    total = stats.total
    assert stats.is_balanced()
    assert (total.dead_lettered, total.spooled, total.pending, total.dropped) == (0, 0, 0, 0)
    assert total.emitted == total.delivered
    assert not (obs.settings.spool_dir / DEAD_LETTER_FILE).exists()


def test_bad_alert_name_raises_and_later_events_are_delivered(
    make_obs: Callable[..., Observability], client: Any
) -> None:
    """
    ``obs.alert("/")`` used to be accepted and then raise inside the exporter's alert
    preparation, which stopped all later delivery. Now it raises at the call and the
    alerts and metrics before and after it are delivered.
    """
    obs = make_obs(flush_interval=0.2)
    with obs, obs.run("alerts", experiment="validation") as run:
        obs.metric("before", 1.0, step=1)
        obs.alert("before", severity="warning")
        with pytest.raises(ValueError, match="alert name '/' has no valid characters"):
            obs.alert("/")
        obs.alert("after", severity="warning")
        # a long name whose 200-character cut ends in "/": its tag key is made valid
        long_name = "a" * 199 + "/b"
        obs.alert(long_name, severity="error")
        obs.metric("after", 2.0, step=2)
    assert run.run_id is not None
    data = client.get_run(run.run_id).data

    assert {"before", "after"} <= set(data.metrics)
    assert "3" == data.tags["allele.alerts.total"]
    assert "1" == data.tags["allele.alerts.name.after"]
    assert "1" == data.tags[f"allele.alerts.name.{'a' * 199}"]
    assert "a" * 199 == alert_key(long_name)
    assert obs.stats().alert.delivered == 3
    _assert_clean(obs)


def test_out_of_range_steps_and_ns_timestamps_never_reach_the_store(
    make_obs: Callable[..., Observability], client: Any
) -> None:
    """
    A step >= 2**63 or ``timestamp=time.time_ns()`` used to be accepted, then overflow
    SQLite (INTERNAL_ERROR, retried forever, blocking replay). Now they raise at the call;
    the good metrics around them, including the int64 extremes, are all delivered.
    """
    obs = make_obs(flush_interval=0.2)
    with obs, obs.run("steps", experiment="validation") as run:
        obs.metric("m", 1.0, step=-(2**63))
        with pytest.raises(ValueError, match="step must fit a signed 64-bit integer"):
            obs.metric("m", 2.0, step=2**63)
        with pytest.raises(ValueError, match="looks like nanoseconds"):
            obs.metric("m", 3.0, timestamp=time.time_ns())
        with pytest.raises(ValueError, match="step must fit"):
            obs.step(2**63)
        obs.metric("m", 4.0, step=2**63 - 1, timestamp=_NOW)
        obs.metric("m", 5.0, step=np.int64(7), timestamp=datetime.now(tz=UTC))
        obs.step(9)
        obs.alert("at.step.9")
    assert run.run_id is not None
    history = client.get_metric_history(run.run_id, "m")

    assert [(-(2**63), 1.0), (7, 5.0), (2**63 - 1, 4.0)] == sorted(
        (h.step, h.value) for h in history
    )
    assert {int(_NOW * 1000)} <= {h.timestamp for h in history}
    assert obs.stats().metric.delivered == 3
    _assert_clean(obs)


def test_bad_params_tags_and_genomes_raise_and_the_rest_is_delivered(
    make_obs: Callable[..., Observability], client: Any, tmp_path: Path
) -> None:
    """Params, tags and genomes: the poison raises, the good events around it land."""
    obs = make_obs(flush_interval=0.2, artifact_location=str(tmp_path / "artifacts"))
    long_key = "k" * 300
    with obs, obs.run("mixed", experiment="validation") as run:
        obs.param("good", 1)
        with pytest.raises(ValueError, match="lone surrogate"):
            obs.param("bad", "a\ud800")
        obs.param(long_key, 2)  # sanitised: cut to 250 with a hash suffix, delivered
        obs.tag("t", "x" * 8000)
        with pytest.raises(TypeError, match="genome tag key must be a str"):
            obs.genome([0], name="net", tags={1: "x"})  # type: ignore[dict-item]
        # tag values become text; numpy values are plain JSON numbers in the event
        gid = obs.genome(
            [1], name="net", fitness=np.float32(0.5), generation=np.int64(3),
            tags={"seed": np.int64(4), "note": object()},  # type: ignore[dict-item]
        )  # fmt: skip
        with pytest.raises(ValueError, match="generation must fit"):
            obs.genome([2], name="net", generation=2**63)
        obs.genome([3], name="net", parents=gid, evaluations=(float(x) for x in range(3)))
        obs.genome([4], name="net", evaluations=np.array([0.5, 0.25]))
    assert run.run_id is not None
    data = client.get_run(run.run_id).data
    versions = obs.genomes.versions("net")

    assert "1" == data.params["good"]
    assert "2" == data.params[sanitize_key(long_key, "param name")]
    assert len(sanitize_key(long_key, "param name")) == 250
    assert "bad" not in data.params
    assert [gid] == [v.genome_id for v in versions][:1]
    assert 3 == versions[0].generation
    assert "4" == client.get_model_version("net", "1").tags["seed"]
    # the parent given as one str is one parent, and the evaluations generator was kept
    assert (gid,) == versions[1].parents
    assert [3, 2] == [v.evaluations for v in versions[1:]]
    _assert_clean(obs)


@pytest.mark.server
def test_genome_with_numpy_fields_is_spooled_and_replayed(tmp_path: Path) -> None:
    """
    The store is down: a genome with numpy generation and tag values used to make the
    spool append raise inside the exporter (not JSON). Now its fields are plain JSON at
    the call: it is spooled, replayed once the server is up, and registered.
    """
    server = MlflowServer(tmp_path / "server")
    obs = Observability.from_env(
        tracking_uri=server.url, export_timeout=2, flush_interval=0.2, spool_dir=tmp_path / "s"
    )
    try:
        with obs, obs.run("offline", experiment="validation"):
            gid = obs.genome(
                [1, 2], name="pair", fitness=np.float64(1.5), generation=np.int64(2),
                tags={"seed": np.int64(7)}, evaluations=[np.float64(1.0), 2.0],
            )  # fmt: skip
            obs.metric("after", 1.0, step=1)
            assert not obs.flush(1)
            assert obs.stats().genome.spooled == 1
            server.start()
            assert obs.flush(60)
        versions = obs.genomes.versions("pair")
        tags = obs.genomes.client.get_model_version("pair", "1").tags
    finally:
        server.stop()

    assert [gid] == [v.genome_id for v in versions]
    assert (2, 2) == (versions[0].generation, versions[0].evaluations)
    assert "7" == tags["seed"]
    _assert_clean(obs)


#: any text, lone surrogates included (``st.characters`` never draws them)
_NAMES = st.text(
    alphabet=st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)), max_size=300
)


def _error_of(call: Callable[[], Any]) -> str | None:
    """The message of the TypeError or ValueError ``call`` raises, else None."""
    try:
        call()
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def test_arbitrary_names_raise_clearly_or_are_delivered(
    make_obs: Callable[..., Observability], client: Any
) -> None:
    """
    Any text as a metric, param or alert name: either a TypeError/ValueError naming the
    field at the call, or the event is delivered (under its sanitised key).
    """
    obs = make_obs(flush_interval=0.2)
    metrics: set[str] = set()
    params: set[str] = set()
    alerts: dict[str, str] = {}

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(name=_NAMES)
    @example(name="/")
    @example(name="./..")
    @example(name=" ")
    @example(name="\ud800")
    @example(name="a" * 199 + "/..b")
    def emit(name: str) -> None:
        for field, call, accepted in (
            ("metric name", lambda: obs.metric(name, 1.0, step=1), metrics),
            ("param name", lambda: obs.param(name, "v"), params),
            ("alert name", lambda: obs.alert(name, severity="info"), None),
        ):
            error = _error_of(call)
            if error is not None:
                assert field in error
                continue
            if accepted is not None:
                accepted.add(sanitize_key(name, field))
            else:
                alerts[name] = alert_key(name)

    with obs, obs.run("names", experiment="validation") as run:
        emit()
    assert run.run_id is not None
    data = client.get_run(run.run_id).data
    name_tags = {k for k in data.tags if k.startswith("allele.alerts.name.")}

    assert metrics == set(data.metrics) - {"allele.alerts.info"}
    assert params == set(data.params)
    assert {f"allele.alerts.name.{k}" for k in alerts.values()} == name_tags
    assert obs.stats().alert.emitted >= len(alerts) > 0
    _assert_clean(obs)
