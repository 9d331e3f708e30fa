"""
Alert and run queries over MLflow (public facade of :mod:`allele.observability.alerts`).

They read only MLflow, so they work against any tracking URI, from any machine, after the
experiment has ended. See ``docs/alerts.md``.
"""

from __future__ import annotations

from .alerts.queries import Queries
from .alerts.results import (
    SEVERITIES,
    Alert,
    AlertContext,
    AlertNotFoundError,
    Phase,
    RunRef,
)

__all__ = (
    "SEVERITIES",
    "Alert",
    "AlertContext",
    "AlertNotFoundError",
    "Phase",
    "Queries",
    "RunRef",
)
