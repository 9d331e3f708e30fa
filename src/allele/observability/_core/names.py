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
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from typing import Any

__all__ = (
    "MAX_KEY_LENGTH",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "as_text",
    "sanitize_key",
)

MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000

_VALID = re.compile(r"^[/\w.\- :]*$")
_INVALID_CHARS = re.compile(r"[^/\w.\- :]")


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
        ValueError: the text is longer than ``limit`` (names the field and the key).
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        raise ValueError(
            f"{field} {key!r}: value is {len(text)} characters; MLflow allows at most {limit}"
        )
    return text
