"""Settings from ALLELE_MLFLOW_* variables: every documented one, errors, overrides, secrets."""

from __future__ import annotations

import json
import re
import threading
import traceback
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from allele.observability import ConfigError, Observability, SamplingRule, Settings
from allele.observability.backends.base import Backend
from allele.observability.config import load_settings
from allele.observability.testing import InMemoryBackend

DOCS = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

#: variable (without prefix) -> (value set in the environment, field, expected field value)
VARIABLES: dict[str, tuple[str, str, Any]] = {
    "ENABLED": ("false", "enabled", False),
    "TRACKING_URI": ("postgresql+psycopg2://u@h:5432/db", "tracking_uri", None),
    "EXPERIMENT_PREFIX": ("lab-", "experiment_prefix", None),
    "ARTIFACT_LOCATION": ("s3://bucket/artifacts", "artifact_location", None),
    "MODEL_REGISTRY_ENABLED": ("false", "model_registry_enabled", False),
    "MODEL_REGISTRY_URI": ("sqlite:///registry.db", "model_registry_uri", None),
    "AUTO_REGISTER_MODELS": ("0", "auto_register_models", False),
    "AUTO_EXPERIMENT_TRACKING": ("no", "auto_experiment_tracking", False),
    "METRICS_BATCH_SIZE": ("250", "metrics_batch_size", 250),
    "ARTIFACT_RETENTION_DAYS": ("7.5", "artifact_retention_days", 7.5),
    "FLUSH_INTERVAL": ("2.5", "flush_interval", 2.5),
    "QUEUE_SIZE": ("5000", "queue_size", 5000),
    "OVERFLOW": ("block", "overflow", None),
    "BLOCK_TIMEOUT": ("0.25", "block_timeout", 0.25),
    "SAMPLING": ("fit*=every:10", "sampling", {"fit*": SamplingRule(every=10)}),
    "SPOOL_DIR": ("/data/spool", "spool_dir", Path("/data/spool")),
    "SPOOL_MAX_BYTES": ("2097152", "spool_max_bytes", 2097152),
    "EXPORT_TIMEOUT": ("3", "export_timeout", 3.0),
    "SHUTDOWN_TIMEOUT": ("4", "shutdown_timeout", 4.0),
    "SYSTEM_METRICS_INTERVAL": ("2.5", "system_metrics_interval", 2.5),
    "ALERT_DEDUPE_WINDOW": ("30", "alert_dedupe_window", 30.0),
    "DELIVERY_PROCESS": ("false", "delivery_process", False),
    "DETECTORS": ('[{"type": "non_finite"}]', "detectors", '[{"type": "non_finite"}]'),
    "TRACKING_TOKEN": ("tok-123", "tracking_token", None),
    "TRACKING_USERNAME": ("alice", "tracking_username", None),
    "TRACKING_PASSWORD": ("pw-123", "tracking_password", None),
}

SECRETS = ("tok-S3CRET", "pw-S3CRET", "uri-S3CRET")


def _documented() -> set[str]:
    names: set[str] = set()
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Z_]+)`", first_cell))
    return names


def _plain(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def test_table_covers_every_documented_variable() -> None:
    """The variables tested here are exactly those of docs/configuration.md."""

    assert _documented() == set(VARIABLES)


@pytest.mark.parametrize("var", sorted(VARIABLES))
def test_variable_read_with_prefix(var: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ALLELE_MLFLOW_<VAR> sets its Settings field."""
    raw, field, expected = VARIABLES[var]
    monkeypatch.setenv(f"ALLELE_MLFLOW_{var}", raw)

    settings = Settings()

    assert (raw if expected is None else expected) == _plain(getattr(settings, field))


def test_defaults_match_the_docs(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no variable set, every field has its documented default."""
    monkeypatch.delenv("ALLELE_MLFLOW_SPOOL_DIR")
    monkeypatch.delenv("ALLELE_MLFLOW_SYSTEM_METRICS_INTERVAL")

    settings = Settings()

    assert {
        "enabled": True,
        "tracking_uri": "sqlite:///mlflow.db",
        "experiment_prefix": "",
        "artifact_location": None,
        "model_registry_enabled": True,
        "model_registry_uri": None,
        "auto_register_models": True,
        "auto_experiment_tracking": True,
        "metrics_batch_size": 1000,
        "artifact_retention_days": 30.0,
        "flush_interval": 1.0,
        "queue_size": 100_000,
        "overflow": "drop",
        "block_timeout": 1.0,
        "sampling": {},
        "spool_dir": ".allele-spool",
        "spool_max_bytes": 1 << 30,
        "export_timeout": 10.0,
        "shutdown_timeout": 10.0,
        "system_metrics_interval": 10.0,
        "alert_dedupe_window": 60.0,
        "detectors": "",
        "delivery_process": True,
        "tracking_token": None,
        "tracking_username": None,
        "tracking_password": None,
    } == settings.redacted()


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("FLUSH_INTERVAL", "abc"),
        ("FLUSH_INTERVAL", "0"),
        ("QUEUE_SIZE", "-5"),
        ("OVERFLOW", "maybe"),
        ("METRICS_BATCH_SIZE", "5000"),
        ("METRICS_BATCH_SIZE", "0"),
        ("SAMPLING", "x=every:0"),
        ("SAMPLING", "garbage"),
        ("SAMPLING", '{"x": {"every": 2.5}}'),
        ("SAMPLING", '{"x": {"every": 2, "often": 1}}'),
        ("TRACKING_URI", "ftp://x"),
        ("ENABLED", "perhaps"),
    ],
)
def test_invalid_value_names_the_variable(
    var: str, raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalid value raises ConfigError naming ALLELE_MLFLOW_<VAR> as an env variable."""
    monkeypatch.setenv(f"ALLELE_MLFLOW_{var}", raw)

    with pytest.raises(ConfigError) as info:
        load_settings()

    assert re.search(rf"\bALLELE_MLFLOW_{var} \(environment variable\b", str(info.value))


@pytest.mark.parametrize("raw", ['{"x": 5}', '{"x": {"max_per_second": null}}'])
def test_invalid_sampling_json_is_a_config_error(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JSON SAMPLING rule of the wrong type raises ConfigError, not TypeError."""
    monkeypatch.setenv("ALLELE_MLFLOW_SAMPLING", raw)

    with pytest.raises(ConfigError, match="ALLELE_MLFLOW_SAMPLING"):
        load_settings()


def test_nan_rate_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAMPLING='x=max_per_second:nan' is invalid (it would keep no point by rate)."""
    monkeypatch.setenv("ALLELE_MLFLOW_SAMPLING", "x=max_per_second:nan")

    with pytest.raises(ConfigError, match="ALLELE_MLFLOW_SAMPLING"):
        load_settings()


def test_invalid_keyword_is_named_as_keyword() -> None:
    """An invalid keyword override is reported under its variable, as a keyword argument."""
    with pytest.raises(ConfigError, match=r"ALLELE_MLFLOW_QUEUE_SIZE \(keyword argument"):
        load_settings(queue_size=1)


def test_keywords_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyword wins over its variable; the other variables are still read."""
    monkeypatch.setenv("ALLELE_MLFLOW_FLUSH_INTERVAL", "5")
    monkeypatch.setenv("ALLELE_MLFLOW_QUEUE_SIZE", "5000")

    obs = Observability.from_env(flush_interval=2)

    assert (2.0, 5000) == (obs.settings.flush_interval, obs.settings.queue_size)


def test_keyword_overrides_an_invalid_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyword replaces a variable entirely, even one that would not parse."""
    monkeypatch.setenv("ALLELE_MLFLOW_FLUSH_INTERVAL", "abc")

    assert 2.0 == load_settings(flush_interval=2).flush_interval


def test_redacted_hides_token_and_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """redacted() shows TRACKING_TOKEN and TRACKING_PASSWORD as '***', the user name as is."""
    monkeypatch.setenv("ALLELE_MLFLOW_TRACKING_TOKEN", "tok-S3CRET")
    monkeypatch.setenv("ALLELE_MLFLOW_TRACKING_PASSWORD", "pw-S3CRET")
    monkeypatch.setenv("ALLELE_MLFLOW_TRACKING_USERNAME", "alice")

    shown = load_settings().redacted()

    assert ("***", "***", "alice") == (
        shown["tracking_token"],
        shown["tracking_password"],
        shown["tracking_username"],
    )
    assert not any(s in json.dumps(shown) for s in SECRETS)


@pytest.mark.parametrize("var", ["TRACKING_URI", "MODEL_REGISTRY_URI"])
def test_redacted_hides_uri_password(var: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A password inside a URI is shown as '***', the rest of the URI kept."""
    monkeypatch.setenv(f"ALLELE_MLFLOW_{var}", "postgresql://u:secret@h/db")

    shown = load_settings().redacted()

    assert "postgresql://u:***@h/db" == shown[var.lower()]
    assert "secret" not in json.dumps(shown)


def test_config_error_never_shows_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invalid values given with a token, a password and a URI password leak none of them."""
    monkeypatch.setenv("ALLELE_MLFLOW_TRACKING_TOKEN", "tok-S3CRET")
    monkeypatch.setenv("ALLELE_MLFLOW_TRACKING_PASSWORD", "pw-S3CRET")
    monkeypatch.setenv("ALLELE_MLFLOW_TRACKING_URI", "ftp://u:uri-S3CRET@h/db")
    monkeypatch.setenv("ALLELE_MLFLOW_FLUSH_INTERVAL", "abc")

    with pytest.raises(ConfigError) as info:
        load_settings()
    shown = "".join(traceback.format_exception(info.type, info.value, info.tb))

    assert "ALLELE_MLFLOW_TRACKING_URI" in shown
    assert "ALLELE_MLFLOW_FLUSH_INTERVAL" in shown
    assert [] == [s for s in SECRETS if s in shown]


def test_config_error_hides_keyword_secrets() -> None:
    """Secrets passed as keywords stay out of the message about another invalid keyword."""
    with pytest.raises(ConfigError) as info:
        load_settings(tracking_token="tok-S3CRET", tracking_password="pw-S3CRET", overflow="x")

    assert "ALLELE_MLFLOW_OVERFLOW" in str(info.value)
    assert [] == [s for s in SECRETS if s in str(info.value)]


def test_from_env_invalid_raises_without_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Observability.from_env() raises ConfigError for a bad variable and starts nothing."""
    monkeypatch.setenv("ALLELE_MLFLOW_OVERFLOW", "maybe")
    before = set(threading.enumerate())

    with pytest.raises(ConfigError, match="ALLELE_MLFLOW_OVERFLOW"):
        Observability.from_env()

    assert set() == set(threading.enumerate()) - before


def test_disabled_from_env_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """ENABLED=false: emits do nothing, no backend and no thread; stats count nothing."""
    monkeypatch.setenv("ALLELE_MLFLOW_ENABLED", "false")
    made: list[Backend] = []

    def factory(_settings: Settings) -> Backend:
        made.append(InMemoryBackend())
        return made[-1]

    before = set(threading.enumerate())
    obs = Observability.from_env(backend_factory=factory)
    with obs, obs.run("r"):
        obs.metric("x", 1.0, step=1)
        obs.metrics({"y": 2.0})
        obs.param("p", 1)
        obs.tag("t", "v")
        assert obs.flush(10)
        assert set() == set(threading.enumerate()) - before
    stats = obs.stats()

    assert 0 == stats.total.emitted
    assert "disabled" == stats.state
    assert [] == made


def test_invalid_detectors_fail_at_construction_and_in_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad ALLELE_MLFLOW_DETECTORS fails when the facade is built and in `allele-obs config`."""
    from click.testing import CliRunner

    from allele.observability.cli import main

    monkeypatch.setenv("ALLELE_MLFLOW_DETECTORS", '[{"type": "stagnation"}]')

    with pytest.raises(ConfigError, match=r"ALLELE_MLFLOW_DETECTORS: .*missing field 'metric'"):
        Observability.from_env()
    result = CliRunner().invoke(main, ["config"])
    assert 2 == result.exit_code
    assert "ALLELE_MLFLOW_DETECTORS" in result.output
