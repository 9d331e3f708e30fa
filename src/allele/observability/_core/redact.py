"""
Redaction: the one function that hides credentials in text the library shows.

Everything that may print a tracking URI, a setting or an error message from a store goes
through :func:`redact` first: ``repr(settings)``, ``str(settings)``, the CLI, log messages
and the reprs of the backends and readers. It hides:

- the user info of a URI: ``https://TOKEN@host`` becomes ``https://***@host``,
  ``postgresql://user:pass@host/db`` becomes ``postgresql://user:***@host/db``;
- the values of credential-like query or ``key=value`` parameters: ``?password=...``,
  ``&token=...``, ``access_token``, ``api_key``, ``secret``, ``signature``, ``sig``,
  ``credential``, AWS and Azure SAS signatures, ...;
- ``Bearer``/``Basic``/``Token`` authorisation values.

Log records of the library's logger (``allele.observability``) pass through
:class:`RedactFilter`, installed when this module is first imported (the configuration
imports it, so always): a message or a traceback that quotes a URI is redacted too.

It imports nothing of the package, so the configuration (the lowest layer) can use it.
"""

from __future__ import annotations

import logging
import re

__all__ = ("LOGGER_NAME", "MASK", "RedactFilter", "redact")

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


def _install() -> None:
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(f, RedactFilter) for f in logger.filters):
        logger.addFilter(RedactFilter())


_install()
