"""
How the REST backend reaches the server: TLS, proxies, and what an HTTP answer means.

Proxies come from the standard variables, read once (``urllib.request.getproxies``):
``HTTPS_PROXY`` for an https tracking URI, ``HTTP_PROXY`` for http, and ``NO_PROXY``
(``urllib.request.proxy_bypass``) for hosts reached directly. An https server is reached
through a ``CONNECT`` tunnel (TLS end to end, the certificate checked against the
server's name); an http server through absolute-URI requests to the proxy. Credentials
in the proxy URL (``http://user:pass@proxy:3128``) are sent as ``Proxy-Authorization``.

TLS follows MLflow's variables: ``MLFLOW_TRACKING_SERVER_CERT_PATH`` (a CA bundle to
trust), ``MLFLOW_TRACKING_CLIENT_CERT_PATH`` (a PEM with the client certificate and its
key) and ``MLFLOW_TRACKING_INSECURE_TLS=true`` (no verification).

HTTP answers (:func:`check`), the classification used by every REST call::

    status / MLflow error_code                  reason        retryable  split?
    2xx                                         (success)
    401, 403, UNAUTHENTICATED, PERMISSION_DENIED unauthorized  yes        never
    429, REQUEST_LIMIT_EXCEEDED                 rate_limited  yes        (Retry-After)
    408, 5xx (INTERNAL_ERROR, ...)              server_error  yes        after REPEAT_LIMIT
    404 without an MLflow body, 405,            unavailable   yes        never
      ENDPOINT_NOT_FOUND (wrong URI path)
    404 RESOURCE_DOES_NOT_EXIST, INVALID_STATE  not_found     no         never (all dead)
    FEATURE_DISABLED, NOT_IMPLEMENTED           unsupported   no         never (all dead)
    400 INVALID_PARAMETER_VALUE, BAD_REQUEST,   rejected      no         yes: bad rows
      RESOURCE_ALREADY_EXISTS, 413, other 4xx                             dead-lettered
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import time
import urllib.request
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from .base import RETRYABLE_REASONS, DeliveryError
from .client import CODE_REASONS

__all__ = ("ApiError", "Endpoint", "check")

_MAX_MESSAGE = 1000
_AUTH_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})


class ApiError(DeliveryError):
    """
    A :class:`DeliveryError` from an HTTP error response, with MLflow's ``error_code``.
    """

    #: MLflow's ``error_code`` (``RESOURCE_DOES_NOT_EXIST``, ...), "" if the body had none
    error_code = ""


class Endpoint:
    """
    Where the REST calls go and how: the server, TLS, and the proxy if one applies.

    Args:
        scheme: ``http`` or ``https``.
        host: the server's host name.
        port: its port, or None for the scheme's default.
        insecure_tls: skip certificate verification.
        server_cert_path: a CA bundle to verify the server with.
        client_cert_path: a PEM file with the client's certificate and key.
    """

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int | None,
        *,
        insecure_tls: bool = False,
        server_cert_path: str | None = None,
        client_cert_path: str | None = None,
    ) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port or (443 if scheme == "https" else 80)
        self.where = f"{host}:{self.port}"
        #: a TLS setup error, raised (retryable, events kept) by every call
        self.setup_error: str | None = None
        self.tls: ssl.SSLContext | None = None
        if scheme == "https":
            try:
                self.tls = ssl.create_default_context(cafile=server_cert_path or None)
                if client_cert_path:
                    self.tls.load_cert_chain(client_cert_path)
            except (OSError, ssl.SSLError) as exc:
                self.setup_error = f"TLS setup failed ({type(exc).__name__}: {exc})"
            if insecure_tls and self.tls is not None:
                self.tls.check_hostname = False
                self.tls.verify_mode = ssl.CERT_NONE
        #: (host, port) of the proxy, if one applies to this server
        self.proxy: tuple[str, int] | None = None
        self.proxy_headers: dict[str, str] = {}
        #: secrets of the proxy URL, scrubbed from messages
        self.secrets: tuple[str, ...] = ()
        self._find_proxy()

    def _find_proxy(self) -> None:
        url = urllib.request.getproxies().get(self.scheme)
        if not url or urllib.request.proxy_bypass(self.host):
            return
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if not parts.hostname:
            return
        self.proxy = (parts.hostname, parts.port or 80)
        if parts.username is not None:
            user, password = unquote(parts.username), unquote(parts.password or "")
            raw = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self.proxy_headers["Proxy-Authorization"] = f"Basic {raw}"
            self.secrets = tuple(x for x in (password, raw) if len(x) >= 4)
        self.where += f" via proxy {parts.hostname}:{self.proxy[1]}"

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        """A new (unopened) connection to the server, or to the proxy in front of it."""
        if self.setup_error is not None:
            raise DeliveryError("network_error", self.setup_error, retryable=True)
        host, port = self.proxy or (self.host, self.port)
        if self.tls is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=self.tls
            )
            if self.proxy is not None:
                conn.set_tunnel(self.host, self.port, headers=self.proxy_headers or None)
            return conn
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def target(self, path: str) -> str:
        """The request target for ``path``: absolute when an http proxy relays it."""
        if self.proxy is not None and self.tls is None:
            return f"http://{self.host}:{self.port}{path}"
        return path

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` plus the proxy's credentials when an http proxy relays the request."""
        if self.proxy is not None and self.tls is None and self.proxy_headers:
            return {**headers, **self.proxy_headers}
        return headers


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def check(
    status: int, after: str | None, raw: bytes, what: str, secrets: tuple[str, ...]
) -> dict[str, Any]:
    """The JSON object of a 2xx answer; otherwise raise :class:`ApiError` (see the table)."""
    try:
        obj = json.loads(raw) if raw else {}
    except ValueError:
        obj = None
    if 200 <= status < 300:
        if not isinstance(obj, dict):
            msg = f"{what}: HTTP {status} without a JSON object (is this an MLflow server?)"
            raise DeliveryError("server_error", msg, retryable=True)
        return obj
    code, text = "", ""
    if isinstance(obj, dict):
        code, text = str(obj.get("error_code", "")), str(obj.get("message", ""))
    else:
        text = raw[:200].decode("utf-8", "replace")
    status_code = f"HTTP {status} {code}".rstrip()
    text = f"{what}: {status_code}: {text}"
    wait = None
    if status in (401, 403) or code in _AUTH_CODES:
        reason = "unauthorized"
        text = f"{what}: {status_code}: the server refused our credentials (check "
        text += "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD)"
    elif status == 429:
        reason, wait = "rate_limited", retry_after(after)
    elif status == 408 or status >= 500:
        reason, wait = "server_error", retry_after(after)
    elif code in CODE_REASONS:
        reason = CODE_REASONS[code]
    elif status in (404, 405):
        reason = "unavailable"
        text += " (not an MLflow endpoint: check the tracking URI's path)"
    else:
        reason = "rejected"
    for secret in secrets:
        text = text.replace(secret, "***")
    retryable = reason in RETRYABLE_REASONS
    error = ApiError(reason, text[:_MAX_MESSAGE], retryable=retryable, retry_after=wait)
    error.error_code = code
    raise error
