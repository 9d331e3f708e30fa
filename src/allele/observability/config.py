"""
Configuration from ``ALLELE_MLFLOW_*`` environment variables.

One :class:`Settings` model holds every knob. ``Settings()`` reads the environment;
keyword arguments override it. Invalid values raise :class:`ConfigError`, whose message
names the environment variable, at start-up rather than deep inside the exporter.

:func:`redact` is the one function that hides credentials in whatever the library shows:
the user info of a URI (``https://TOKEN@host`` -> ``https://***@host``,
``postgresql://user:pass@host/db`` -> ``postgresql://user:***@host/db``), the values of
credential-like ``name=value`` parameters (``?password=``, ``&token=``, ``api_key``,
``secret``, ``signature``, ``sig``, ...) and ``Bearer``/``Basic``/``Token`` values. It lives
here, in the lowest layer, because the settings are the first thing that must not show a
secret; the str and repr of :class:`Settings`, ``ConfigError`` messages, ``DeliveryError``
messages, the reprs of backends and readers and the CLI use it, and
:class:`RedactFilter`, installed on the ``allele.observability`` logger when this module
is imported, applies it to every log record (message and traceback text).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = (
    "ENV_PREFIX",
    "MASK",
    "ConfigError",
    "RedactFilter",
    "SamplingRule",
    "Settings",
    "load_settings",
    "redact",
)

ENV_PREFIX = "ALLELE_MLFLOW_"

# -- redaction (see the module's docstring) ----------------------------------------------
#: the library's logger
LOGGER_NAME = "allele.observability"

#: what a hidden value is replaced with
MASK = "***"

# scheme://userinfo@ : the user info runs to the last "@" before the path, query or end.
_USERINFO = re.compile(
    r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<info>[^/\s?#@]*(?:@[^/\s?#@]*)*)@"
)
# name=value where the name says it is a credential; at a query, a DSN or a word boundary.
_NAMES = (
    "password|passwd|passphrase|token|secret|signature|credential"
    "|api_?key|private_?key|access_?key|session_?key"
)
_SECRET_NAMES = rf"[\w.\-]*(?:{_NAMES})[\w.\-]*|pwd|sig"
_PARAM = re.compile(
    rf"(?P<lead>(?:^|[?&;,\s({{\[\"']))(?P<name>{_SECRET_NAMES})(?P<eq>=)"
    r"(?P<quote>[\"']?)(?P<value>[^&;,\s#\"')}\]]+)",
    re.IGNORECASE,
)
_AUTH = re.compile(r"\b(?P<kind>Bearer|Basic|Token)\s+(?P<value>[A-Za-z0-9._~+/\-]+=*)")


def _userinfo(match: re.Match[str]) -> str:
    info = match["info"]
    user, sep, _ = info.partition(":")
    shown = f"{user}:{MASK}" if sep else MASK
    return f"{match['scheme']}{shown}@"


def _param(match: re.Match[str]) -> str:
    if match["value"] == MASK:
        return match[0]
    return f"{match['lead']}{match['name']}{match['eq']}{match['quote']}{MASK}"


def redact(text: object) -> str:
    """
    Return ``str(text)`` with every credential it holds replaced by ``***``.

    Safe on any text (a URI, a log line, an exception message, a repr): what is not a
    credential is left as it is. Idempotent.

    >>> redact("postgresql://bob:hunter2@db/mlflow?sslmode=require&password=x")
    'postgresql://bob:***@db/mlflow?sslmode=require&password=***'
    """
    out = text if isinstance(text, str) else str(text)
    if "@" in out:
        out = _USERINFO.sub(_userinfo, out)
    if "=" in out:
        out = _PARAM.sub(_param, out)
    if " " in out:
        out = _AUTH.sub(lambda m: f"{m['kind']} {MASK}", out)
    return out


class RedactFilter(logging.Filter):
    """
    A logging filter that redacts a record's message and traceback text; drops nothing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always keep it."""
        try:
            message = record.getMessage()
        except Exception:  # a broken record is the handler's to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = redact(_FORMATTER.formatException(record.exc_info))
        return True


_FORMATTER = logging.Formatter()


def _install_log_filter() -> None:
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(f, RedactFilter) for f in logger.filters):
        logger.addFilter(RedactFilter())


_install_log_filter()


class ConfigError(ValueError):
    """
    Raised when a setting is invalid; the message names the environment variable.
    """


class SamplingRule:
    """
    A sampling policy for the metrics whose name matches a glob.

    Args:
        every: keep every Nth step (1 keeps all).
        max_per_second: keep at most this many points per second per metric (0: no limit).

    The first and the last point of a series and every new extreme (best or worst so far)
    are always kept, whatever the rule says.
    """

    __slots__ = ("every", "max_per_second")

    def __init__(self, every: int = 1, max_per_second: float = 0.0) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"sampling 'every' must be an integer >= 1, got {every!r}")
        if not isinstance(max_per_second, (int, float)) or not 0 <= max_per_second < math.inf:
            raise ValueError(
                f"sampling 'max_per_second' must be a finite number >= 0, got {max_per_second!r}"
            )
        self.every = every
        self.max_per_second = float(max_per_second)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SamplingRule):
            return NotImplemented
        return (self.every, self.max_per_second) == (other.every, other.max_per_second)

    def __hash__(self) -> int:
        return hash((self.every, self.max_per_second))

    def __repr__(self) -> str:
        return f"SamplingRule(every={self.every}, max_per_second={self.max_per_second:g})"


def parse_sampling(raw: str | dict[str, Any]) -> dict[str, SamplingRule]:
    """
    Parse the ``SAMPLING`` setting.

    Two forms are accepted: a JSON object ``{"glob": {"every": N, "max_per_second": K}}``
    or the compact form ``glob=every:N,max_per_second:K;glob2=every:M``.
    """
    if isinstance(raw, dict):
        items: dict[str, Any] = raw
    else:
        text = raw.strip()
        if not text:
            return {}
        if text.startswith("{"):
            items = json.loads(text)
        else:
            items = {}
            for part in filter(None, (p.strip() for p in text.split(";"))):
                glob, sep, spec = part.partition("=")
                if not sep or not glob.strip():
                    raise ValueError(f"expected 'glob=every:N,max_per_second:K', got {part!r}")
                rule: dict[str, float] = {}
                for kv in filter(None, (s.strip() for s in spec.split(","))):
                    k, sep2, v = kv.partition(":")
                    if not sep2:
                        raise ValueError(f"expected 'name:value' in {part!r}, got {kv!r}")
                    rule[k.strip()] = float(v)
                items[glob.strip()] = rule
    out: dict[str, SamplingRule] = {}
    for glob, spec in items.items():
        if isinstance(spec, SamplingRule):
            out[glob] = spec
            continue
        if not isinstance(spec, dict):
            raise ValueError(f"rule for {glob!r} must be a mapping, got {spec!r}")  # noqa: TRY004
        unknown = set(spec) - {"every", "max_per_second"}
        if unknown:
            raise ValueError(f"unknown sampling option(s) {sorted(unknown)} for {glob!r}")
        every = spec.get("every", 1)
        if isinstance(every, float) and every.is_integer():
            every = int(every)
        rate = spec.get("max_per_second", 0)
        if not isinstance(rate, (int, float)) or isinstance(rate, bool):
            # ValueError, not TypeError: pydantic turns only ValueError into a ConfigError.
            msg = f"sampling 'max_per_second' for {glob!r} must be a number, got {rate!r}"
            raise ValueError(msg)  # noqa: TRY004
        out[glob] = SamplingRule(every=every, max_per_second=float(rate))
    return out


class Settings(BaseSettings):
    """
    Every ``ALLELE_MLFLOW_*`` setting, with its default.

    The field ``tracking_uri`` is read from ``ALLELE_MLFLOW_TRACKING_URI`` and so on.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
        arbitrary_types_allowed=True,
        # a rejected value may be a URI with a password: load_settings shows it redacted
        hide_input_in_errors=True,
    )

    # -- the original specification's variables --------------------------------------
    #: master switch; false turns every call into a no-op that writes nothing
    enabled: bool = True
    #: MLflow tracking URI (MLflow 3's own default: an embedded sqlite file)
    tracking_uri: str = "sqlite:///mlflow.db"
    #: prepended to every experiment name the library creates
    experiment_prefix: str = ""
    #: artifact root for experiments the library creates (None: MLflow's default)
    artifact_location: str | None = None
    #: register genome versions in the model registry
    model_registry_enabled: bool = True
    #: registry URI when it differs from the tracking URI
    model_registry_uri: str | None = None
    #: register each new genome as a model version automatically
    auto_register_models: bool = True
    #: open a run named after the program for events emitted outside any run
    auto_experiment_tracking: bool = True
    #: metrics per log_batch request and the queue depth that wakes the exporter
    metrics_batch_size: int = Field(default=1000, ge=1, le=1000)
    #: local files (replayed spool, dead letters) older than this are pruned at start
    artifact_retention_days: float = Field(default=30.0, gt=0)

    # -- the project's own ---------------------------------------------------------------
    #: seconds between exports when batches do not fill up
    flush_interval: float = Field(default=1.0, gt=0, le=3600)
    #: capacity of the data lane (metrics); the control lane holds a tenth of it, >= 1000
    queue_size: int = Field(default=100_000, ge=100)
    #: what a full lane does: drop the new event (counted) or block up to block_timeout
    overflow: Literal["drop", "block"] = "drop"
    #: seconds a producer may block with overflow=block before the event is dropped
    block_timeout: float = Field(default=1.0, ge=0)
    #: metric-name globs to sampling rules (JSON or compact form, see SamplingRule)
    sampling: Annotated[dict[str, SamplingRule], NoDecode] = Field(default_factory=dict)
    #: directory for the disk spool and dead letters
    spool_dir: Path = Path(".allele-spool")
    #: bytes the spool may hold; past it, new records are dropped (counted: spool_full)
    spool_max_bytes: int = Field(default=1 << 30, ge=1 << 20)
    #: seconds one export attempt may take before it is abandoned
    export_timeout: float = Field(default=10.0, gt=0)
    #: seconds close() and the atexit handler may spend flushing
    shutdown_timeout: float = Field(default=10.0, ge=0)
    #: seconds between system metric samples; 0 turns the sampler off
    system_metrics_interval: float = Field(default=10.0, ge=0)
    #: seconds within which identical alerts fold into one record
    alert_dedupe_window: float = Field(default=60.0, ge=0)
    #: built-in detectors as JSON, e.g. [{"type": "stagnation", "metric": "fitness.best"}]
    detectors: str = ""
    #: deliver to database stores from a worker process (keeps the experiment's CPU free)
    delivery_process: bool = True
    #: bearer token for the tracking server (never logged; MLFLOW_TRACKING_TOKEN also works)
    tracking_token: SecretStr | None = None
    #: password for basic auth (never logged; MLFLOW_TRACKING_PASSWORD also works)
    tracking_password: SecretStr | None = None
    #: user name for basic auth
    tracking_username: str | None = None

    @field_validator("sampling", mode="before")
    @classmethod
    def _parse_sampling(cls, value: Any) -> dict[str, SamplingRule]:
        if isinstance(value, (str, dict)):
            return parse_sampling(value)
        raise ValueError(f"expected a JSON object or 'glob=every:N' string, got {value!r}")

    @field_validator("tracking_uri")
    @classmethod
    def _check_uri(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        if "://" not in value and not value.startswith(("databricks", "file:")):
            # A bare path is a file store; MLflow refuses it unless explicitly allowed.
            return value
        scheme = value.split(":", 1)[0].lower()
        allowed = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks")
        if not scheme.startswith(allowed):
            raise ValueError(f"unsupported URI scheme {scheme!r}")
        return value

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Settings({shown})"

    def __str__(self) -> str:
        return " ".join(f"{k}={v!r}" for k, v in self.redacted().items())

    def __repr_args__(self) -> Any:
        # pydantic's pretty printers (devtools, rich) read this rather than __repr__
        return list(self.redacted().items())

    def redacted(self) -> dict[str, Any]:
        """
        Return the effective settings as plain values with secrets replaced by ``'***'``.

        Token and password are ``'***'`` when set; every text value (the URIs, the
        artifact location) goes through :func:`redact`, which hides the
        user info of a URI and credential-like query parameters.
        """
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = MASK
            elif isinstance(value, Path):
                value = redact(value)
            elif name == "sampling":
                value = {
                    g: {"every": r.every, "max_per_second": r.max_per_second}
                    for g, r in value.items()
                }
            elif isinstance(value, str):
                value = redact(value)
            out[name] = value
        return out

    def auth_token(self) -> str | None:
        """Return the bearer token from the settings or ``MLFLOW_TRACKING_TOKEN``."""
        if self.tracking_token is not None:
            return self.tracking_token.get_secret_value()
        return os.environ.get("MLFLOW_TRACKING_TOKEN") or None

    def basic_auth(self) -> tuple[str, str] | None:
        """Return (user, password) from the settings or MLflow's own variables."""
        user = self.tracking_username or os.environ.get("MLFLOW_TRACKING_USERNAME")
        pw = (
            self.tracking_password.get_secret_value()
            if self.tracking_password is not None
            else os.environ.get("MLFLOW_TRACKING_PASSWORD")
        )
        if user and pw:
            return user, pw
        return None


def load_settings(**overrides: Any) -> Settings:
    """
    Read the settings from the environment, with keyword overrides.

    Raises:
        ConfigError: naming the offending ``ALLELE_MLFLOW_*`` variable.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            var = ENV_PREFIX + field.upper()
            source = "keyword argument" if field in overrides else "environment variable"
            shown = err.get("input")
            if isinstance(shown, str):
                shown = redact(shown)
            if field.startswith("tracking_") and field != "tracking_uri":
                shown = MASK
            problems.append(f"{var} ({source} {field}={shown!r}): {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
