"""
allele-observability: invisible experiment tracking for long-running evolution experiments.

Runtime code emits metrics, params, tags and artifacts onto an in-process bus; a background
exporter batches them into MLflow runs. See ``docs/`` for the guide.
"""

from __future__ import annotations

from ._observability import Observability as Observability
from ._runs import Run as Run
from ._stats import KindStatistics as KindStatistics
from ._stats import Statistics as Statistics
from .config import ConfigError as ConfigError
from .config import SamplingRule as SamplingRule
from .config import Settings as Settings
from .sinks._base import DeliveryError as DeliveryError

__all__ = (
    "ConfigError",
    "DeliveryError",
    "KindStatistics",
    "Observability",
    "Run",
    "SamplingRule",
    "Settings",
    "Statistics",
)

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
