"""Tests of the metric-stream detectors (`allele.observability.sources.detectors`)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from allele.observability.config import ConfigError
from allele.observability.sources.detectors import (
    Detector,
    Finding,
    NonFinite,
    Regression,
    Stagnation,
    Threshold,
    ZScore,
    detectors_from_setting,
    parse_detectors,
)

NAN = float("nan")
INF = float("inf")


def feed(detector: Detector, values: list[float], *, run: str = "r") -> list[Finding]:
    """Feed values as steps 0, 1, 2, ... of the detector's metric ("m" for a glob)."""
    metric = "m" if "*" in detector.metric else detector.metric
    out: list[Finding] = []
    for step, value in enumerate(values):
        out.extend(detector.observe(run, metric, value, step))
    return out


def steps(findings: list[Finding]) -> list[int]:
    return [f.attributes["step"] for f in findings]


# -- NonFinite -----------------------------------------------------------------------------------
def test_non_finite_fires_once_per_episode() -> None:
    """NaN, +inf and -inf fire when a series turns non-finite, again only after a finite point."""
    found = feed(NonFinite(), [1.0, NAN, NAN, 2.0, INF, -INF, 3.0, -INF])

    assert [1, 4, 7] == steps(found)
    assert ["nan", "inf", "-inf"] == [f.attributes["value"] for f in found]
    assert {("metric.non_finite", "error")} == {(f.name, f.severity) for f in found}
    assert "m" == found[0].attributes["metric"]


def test_non_finite_selector_and_runs() -> None:
    """The glob selects metrics, and each (run, metric) series has its own state."""
    detector = NonFinite("fitness.*")

    assert [] == detector.observe("a", "loss", NAN, 0)
    assert 1 == len(detector.observe("a", "fitness.best", NAN, 0))
    assert 1 == len(detector.observe("b", "fitness.best", NAN, 0))
    assert 1 == len(detector.observe("a", "fitness.mean", NAN, 0))
    assert [] == detector.observe("a", "fitness.best", NAN, 1)


def test_reset_forgets_a_run() -> None:
    """After reset(run) the run's series start afresh; other runs keep their state."""
    detector = NonFinite()
    detector.observe("a", "m", NAN, 0)
    detector.observe("b", "m", NAN, 0)

    detector.reset("a")

    assert 1 == len(detector.observe("a", "m", NAN, 1))
    assert [] == detector.observe("b", "m", NAN, 1)


# -- Threshold -----------------------------------------------------------------------------------
def test_threshold_fires_once_per_excursion() -> None:
    """Above/below fire on leaving the bounds, again only after coming back; NaN is ignored."""
    found = feed(Threshold("m", above=4.0, below=0.0), [1.0, 5.0, 6.0, NAN, 2.0, 7.0, -1.0, 3.0])

    assert [1, 5, 6] == steps(found)
    assert [{"above": 4.0}, {"above": 4.0}, {"below": 0.0}] == [
        {k: f.attributes[k] for k in ("above", "below") if k in f.attributes} for f in found
    ]
    assert "m.threshold" == found[0].name
    assert "warning" == found[0].severity


def test_threshold_needs_a_bound() -> None:
    """A threshold without 'above' or 'below' is a ValueError."""
    with pytest.raises(ValueError, match="above"):
        Threshold("m")


# -- Stagnation ----------------------------------------------------------------------------------
def test_stagnation_episodes_max() -> None:
    """No improvement of the best for `window` steps fires once, and again after an improvement."""
    values = [0.0, 1.0, 2.0, 3.0, 4.0] + [3.5] * 26 + [5.0] + [4.0] * 15
    found = feed(Stagnation("fitness.best", window=10), values)

    assert [14, 41] == steps(found)
    assert "fitness.best.stagnation" == found[0].name
    assert (4.0, 4) == (found[0].attributes["best"], found[0].attributes["best_step"])
    assert (5.0, 31) == (found[1].attributes["best"], found[1].attributes["best_step"])


def test_stagnation_min_with_min_delta() -> None:
    """direction='min' counts decreases; gains of at most min_delta are not improvements."""
    values = [10.0, 9.0, 8.95, 8.92, 8.91, 8.93, 8.5]
    found = feed(Stagnation("loss", window=4, direction="min", min_delta=0.1), values)

    assert [5] == steps(found)
    assert 9.0 == found[0].attributes["best"]


def test_stagnation_ignores_non_finite() -> None:
    """NaN and inf are neither an improvement nor a step of stagnation by value."""
    found = feed(Stagnation("m", window=3), [1.0, INF, NAN, 0.5, 0.5])

    assert [3] == steps(found)


# -- Regression ----------------------------------------------------------------------------------
def test_regression_relative_drop() -> None:
    """A drop of more than `drop` relative to the previous value fires at that step."""
    found = feed(Regression("m", drop=0.1), [10.0, 9.5, 8.0, 8.0, 0.0, 1.0])

    assert [2, 4] == steps(found)
    assert pytest.approx(1.5 / 9.5) == found[0].attributes["drop"]
    assert (8.0, 3) == (found[1].attributes["previous"], found[1].attributes["previous_step"])


def test_regression_minimize() -> None:
    """With direction='min' a sudden rise is the regression."""
    found = feed(Regression("loss", drop=0.2, direction="min"), [1.0, 1.05, 1.5, 0.1])

    assert [2] == steps(found)


def test_regression_from_zero_is_absolute() -> None:
    """After a previous value of 0 the change is measured absolutely."""
    found = feed(Regression("m", drop=0.5), [0.0, -0.4, 0.0, -0.6])

    assert [3] == steps(found)


# -- ZScore --------------------------------------------------------------------------------------
def test_zscore_spike() -> None:
    """A spike far outside the moving window fires once; the window must be full first."""
    values = [math.sin(i) for i in range(100)]
    values[60] = 10.0
    values[5] = 50.0  # before the window is full: no baseline yet
    detector = ZScore("m", window=30, threshold=4.0)

    found = feed(detector, values)

    assert [60] == steps(found)
    assert found[0].attributes["z"] > 10
    assert "m.spike" == found[0].name


def test_zscore_matches_naive_computation() -> None:
    """Running sums give the same findings as mean/pstdev over the window, at a large offset."""
    rng = random.Random(7)
    values = [1e6 + rng.gauss(0, 1) for _ in range(2000)]
    for i in range(50, 2000, 97):
        values[i] += rng.choice([-1, 1]) * rng.uniform(2, 8)
    window, threshold = 25, 3.0
    expected = []
    for i in range(window, len(values)):
        past = values[i - window : i]
        z = (values[i] - statistics.fmean(past)) / statistics.pstdev(past)
        if abs(z) > threshold:
            expected.append(i)

    found = feed(ZScore("m", window=window, threshold=threshold), values)

    assert len(expected) > 5
    assert expected == steps(found)


def test_zscore_constant_and_non_finite() -> None:
    """A window without spread never fires, and NaN/inf never enter the window."""
    detector = ZScore("m", window=5)

    assert [] == feed(detector, [0.1] * 20 + [NAN, INF, 0.1])


# -- naming and parsing --------------------------------------------------------------------------
def test_names() -> None:
    """Plain metrics name the alert after the metric, globs after 'metric'; both can be set."""
    assert "fitness.best.stagnation" == Stagnation("fitness.best").alert_name
    assert "metric.regression" == Regression("fitness.*").alert_name
    assert "stagnation(fitness.best)" == Stagnation("fitness.best").name
    custom = ZScore("m", name="spiky", alert_name="m.weird", severity="error")
    assert ("spiky", "m.weird") == (custom.name, custom.alert_name)
    assert "error" == feed(custom, [0.0, 1.0] * 20 + [100.0])[0].severity


def test_parse_detectors() -> None:
    """The documented JSON builds the detectors with their options."""
    text = """[{"type": "stagnation", "metric": "fitness.best", "window": 20},
              {"type": "non_finite"},
              {"type": "threshold", "metric": "mem", "above": 0.9, "severity": "critical"},
              {"type": "regression", "metric": "f", "drop": 0.5, "direction": "min"},
              {"type": "zscore", "metric": "g", "window": 10, "threshold": 3}]"""

    stag, nonfinite, thresh, reg, zscore = parse_detectors(text)

    assert isinstance(stag, Stagnation)
    assert (20, "max") == (stag.window, stag.direction)
    assert isinstance(nonfinite, NonFinite)
    assert "*" == nonfinite.metric
    assert isinstance(thresh, Threshold)
    assert (0.9, "critical") == (thresh.above, thresh.severity)
    assert isinstance(reg, Regression)
    assert (0.5, "min") == (reg.drop, reg.direction)
    assert isinstance(zscore, ZScore)
    assert (10, 3.0) == (zscore.window, zscore.threshold)
    assert [] == parse_detectors("  ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[", "invalid JSON"),
        ('{"type": "non_finite"}', "expected a JSON array"),
        ("[1]", r"detectors\[0\]: expected an object"),
        ('[{"type": "nope"}]', r"detectors\[0\]: 'type' must be one of"),
        ('[{"metric": "m"}]', r"detectors\[0\]: 'type'"),
        (
            '[{"type": "non_finite"}, {"type": "stagnation"}]',
            r"\[1\] \(stagnation\): missing.*metric",
        ),
        ('[{"type": "stagnation", "metric": "m", "windw": 3}]', r"\(stagnation\): unknown.*windw"),
        ('[{"type": "stagnation", "metric": "m", "window": 0}]', r"\(stagnation\): window must"),
        ('[{"type": "stagnation", "metric": "m", "window": "20"}]', "window must"),
        ('[{"type": "zscore", "metric": "m", "window": true}]', "window must"),
        ('[{"type": "regression", "metric": "m", "direction": "up"}]', "direction must"),
        ('[{"type": "threshold", "metric": "m", "above": "1"}]', "above must"),
        ('[{"type": "non_finite", "severity": "fatal"}]', r"\(non_finite\): severity must"),
        ('[{"type": "threshold", "metric": ""}]', r"\(threshold\): metric must"),
    ],
)
def test_parse_errors_name_the_entry_and_field(text: str, message: str) -> None:
    """Each bad entry or field is a ValueError naming the entry and the field."""
    with pytest.raises(ValueError, match=message):
        parse_detectors(text)


def test_detectors_from_setting_raises_config_error() -> None:
    """A bad setting is a ConfigError naming the variable and the entry; empty is none."""
    bad = '[{"type": "non_finite"}, {"type": "stagnation", "metric": "m", "window": 0}]'
    expected = r"^ALLELE_MLFLOW_DETECTORS: detectors\[1\] \(stagnation\): window must"

    with pytest.raises(ConfigError, match=expected):
        detectors_from_setting(bad)
    assert [] == detectors_from_setting("")
