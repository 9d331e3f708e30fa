"""
Choosing the transport for a tracking URI.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Settings
    from .base import Backend

__all__ = ("make_backend",)


def make_backend(settings: Settings) -> Backend:
    """
    Choose how to reach the tracking store.

    http(s) URIs: the REST API spoken directly (~4 us of CPU per metric). Database URIs
    (sqlite, postgresql, mysql, mssql): ``MlflowClient`` in a worker process. Anything
    else (file stores, databricks): ``MlflowClient`` in a worker thread.
    """
    uri = settings.tracking_uri
    scheme = uri.split(":", 1)[0].lower() if "://" in uri else "file"
    if scheme in ("http", "https"):
        from .rest import RestBackend

        env = os.environ
        return RestBackend(
            uri,
            timeout=settings.export_timeout,
            token=settings.auth_token(),
            basic_auth=settings.basic_auth(),
            insecure_tls=env.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true",
            server_cert_path=env.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None,
            client_cert_path=env.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None,
        )
    if settings.delivery_process and scheme.startswith(("sqlite", "postgresql", "mysql", "mssql")):
        from .process import ProcessBackend

        return ProcessBackend(uri, timeout=settings.export_timeout)
    from .client import ClientBackend

    return ClientBackend(uri)
