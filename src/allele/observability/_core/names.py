r"""
Metric, param and tag names that MLflow accepts.

MLflow rejects a whole ``log_batch`` when one key is invalid: keys must match
``^[/\\w.\\- :]*$``, be at most 250 characters and be stable under POSIX path
normalisation (no ``a//b``, no leading ``/``, no ``..`` segment, not ``.``).

Policy (documented in ``docs/usage.md``): a key that is not a ``str`` or is empty raises
at the call; any other key is *sanitised* so the event is never lost: characters outside
the allowed set become ``_``, repeated slashes collapse, leading and trailing slashes and
``.``/``..`` segments are removed, and keys longer than 250 characters are cut and given a
short hash suffix so distinct long names stay distinct. The exporter logs one warning per
sanitised name.

The other checks here run at the call too, for values the store would reject later
(where one bad row would otherwise block or poison a whole batch): steps are signed 64-bit
integers; timestamps are seconds since the epoch within a plausible range (a value that
looks like milliseconds, microseconds or nanoseconds is refused, naming the unit); text
values must be encodable as UTF-8 (no lone surrogates) and within MLflow's length limits.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import re
from datetime import datetime
from typing import Any

__all__ = (
    "INT64_MAX",
    "INT64_MIN",
    "MAX_KEY_LENGTH",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "MAX_TIMESTAMP_SECONDS",
    "as_int64",
    "as_text",
    "check_artifact_path",
    "check_run_names",
    "check_utf8",
    "sanitize_key",
    "timestamp_ms",
)

MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
#: the range of a step (MLflow stores it as a signed 64-bit integer)
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
#: the largest timestamp accepted as a number, in seconds since the epoch (the year 5138):
#: anything larger is a timestamp in a smaller unit passed by mistake (``time.time()`` is
#: about 1.7e9; the same instant is 1.7e12 in ms, 1.7e15 in us and 1.7e18 in ns)
MAX_TIMESTAMP_SECONDS = 1e11
#: the unit a too-large timestamp most likely is in: (smallest value, unit, how to get s)
_UNITS = (
    (1e17, "nanoseconds", "time.time_ns() / 1e9"),
    (1e14, "microseconds", "value / 1e6"),
    (MAX_TIMESTAMP_SECONDS, "milliseconds", "value / 1000"),
)

_VALID = re.compile(r"^[/\w.\- :]*$")
_INVALID_CHARS = re.compile(r"[^/\w.\- :]")
_BAD_PATH_CHARS = re.compile(r"[\\#\x00-\x1f\x7f]")


def _stable(name: str) -> bool:
    norm = posixpath.normpath(name)
    return not (norm != name or norm == "." or norm.startswith(("..", "/")))


def sanitize_key(name: object, field: str) -> str:
    """
    Return ``name`` as MLflow will accept it.

    Args:
        name: the key given by the caller.
        field: what the key names, for the error message (``"metric name"``, ...).

    Raises:
        TypeError: ``name`` is not a ``str``.
        ValueError: ``name`` is empty or nothing valid is left after sanitising.
    """
    if not isinstance(name, str):
        raise TypeError(f"{field} must be a str, got {type(name).__name__}: {name!r}")
    if len(name) <= MAX_KEY_LENGTH and _VALID.match(name) and name and _stable(name):
        return name
    if not name.strip():
        raise ValueError(f"{field} must not be empty")
    key = _INVALID_CHARS.sub("_", name)
    parts = [p for p in key.split("/") if p not in ("", ".", "..")]
    key = "/".join(parts)
    if not key:
        raise ValueError(f"{field} {name!r} has no valid characters")
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:8]
        key = key[: MAX_KEY_LENGTH - 9].rstrip("/") + "-" + digest
    return key


def as_text(field: str, key: str, value: Any, limit: int) -> str:
    """
    A param or tag value as MLflow stores it (text), checked against MLflow's limit.

    Raises:
        ValueError: the text is longer than ``limit``, or holds a lone surrogate that no
            store can encode (names the field and the key).
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        raise ValueError(
            f"{field} {key!r}: value is {len(text)} characters; MLflow allows at most {limit}"
        )
    return check_utf8(f"{field} {key!r}: value", text)


def check_utf8(field: str, text: str) -> str:
    """
    Return ``text`` if it can be encoded as UTF-8 (what every store needs).

    Raises:
        ValueError: ``text`` holds a lone surrogate (from ``os.fsdecode`` of bad bytes, or
            a ``surrogateescape`` decode); the message names ``field`` and the position.
    """
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = text[exc.start]
            raise ValueError(
                f"{field} is not valid Unicode text: lone surrogate {bad!r} at index "
                f"{exc.start} (no store can encode it)"
            ) from None
    return text


def as_int64(field: str, value: Any) -> int:
    """
    ``value`` as a step: an int (or an integral float, numpy integer) in MLflow's range,
    ``-2**63 <= value < 2**63``.

    Raises:
        TypeError: not an integer (``bool`` is refused too), naming ``field``.
        ValueError: outside the signed 64-bit range, naming ``field``.
    """
    number: int
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        if isinstance(value, float) and value.is_integer():
            number = int(value)
        else:
            raise TypeError(f"{field} must be an int, got {type(value).__name__}: {value!r}")
    else:
        number = int(value.__index__())
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(
            f"{field} must fit a signed 64-bit integer (-2**63 <= value < 2**63), got {number}"
        )
    return number


def timestamp_ms(timestamp: Any) -> int:
    """
    A metric timestamp given in seconds since the epoch (a number) or as a datetime, in
    milliseconds since the epoch, as MLflow stores it.

    Raises:
        TypeError: neither a real number nor a datetime.
        ValueError: negative, not finite, before 1970, or larger than
            ``MAX_TIMESTAMP_SECONDS`` (1e11 s, the year 5138): the message says which unit
            the value looks like (ms, us or ns) and how to pass seconds.
    """
    if isinstance(timestamp, datetime):
        try:
            seconds = timestamp.timestamp()
        except (OverflowError, OSError, ValueError) as exc:
            raise ValueError(f"timestamp {timestamp!r} cannot be converted: {exc}") from None
        if seconds < 0:
            raise ValueError(f"timestamp {timestamp!r} is before 1970; MLflow needs >= 0")
        return int(seconds * 1000)
    if isinstance(timestamp, bool) or not hasattr(timestamp, "__float__"):
        raise TypeError(
            "timestamp must be seconds since the epoch (time.time()) or a datetime, "
            f"got {type(timestamp).__name__}: {timestamp!r}"
        )
    try:
        seconds = float(timestamp)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"timestamp must be seconds since the epoch: {exc}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"timestamp must be a finite number >= 0, got {timestamp!r}")
    if seconds > MAX_TIMESTAMP_SECONDS:
        for smallest, unit, fix in _UNITS:
            if seconds >= smallest:
                raise ValueError(
                    f"timestamp {timestamp!r} looks like {unit} since the epoch; pass "
                    f"seconds (time.time()), e.g. {fix}. Timestamps above "
                    f"{MAX_TIMESTAMP_SECONDS:.0e} s (the year 5138) are refused"
                )
    return int(seconds * 1000)


def check_artifact_path(artifact_path: object) -> str | None:
    """
    An artifact folder (``obs.artifact(path, artifact_path)``) as MLflow accepts it:
    None (or ``""``) for the run's artifact root, else a relative POSIX path.

    Raises:
        TypeError: not a str or None.
        ValueError: absolute, not normalised (``a//b``, ``./a``, a trailing ``/``), going
            up (``..``), or holding a backslash, ``#``, a control character or a lone
            surrogate (MLflow refuses these, or they break the artifact's URL).
    """
    if artifact_path is None or artifact_path == "":
        return None
    if not isinstance(artifact_path, str):
        raise TypeError(f"artifact_path must be a str or None, got {type(artifact_path).__name__}")
    if not _stable(artifact_path) or ".." in artifact_path.split("/"):
        raise ValueError(
            f"artifact_path {artifact_path!r} must be a normalised relative path "
            "(no leading '/', no '..', '.' or empty segments)"
        )
    if _BAD_PATH_CHARS.search(artifact_path):
        raise ValueError(
            f"artifact_path {artifact_path!r} must not hold a backslash, '#' or a control character"
        )
    return check_utf8("artifact_path", artifact_path)


def check_run_names(name: object, experiment: str, prefix: str) -> None:
    """
    Check a run's name and its experiment's full name (``prefix + experiment``) as the
    store will: text, at most 250 and 500 characters (MLflow's limits).

    Raises:
        TypeError: the run name or the experiment is not a str.
        ValueError: empty, too long, or holding a lone surrogate (names which).
    """
    if not isinstance(name, str):
        raise TypeError(f"run name must be a str, got {type(name).__name__}: {name!r}")
    if not isinstance(experiment, str):
        raise TypeError(f"experiment must be a str, got {type(experiment).__name__}")
    for field, text, limit in (("run name", name, 250), ("experiment", prefix + experiment, 500)):
        if not text:
            raise ValueError(f"{field} must not be empty")
        if len(text) > limit:
            raise ValueError(f"{field} is {len(text)} characters; MLflow allows at most {limit}")
        check_utf8(field, text)
