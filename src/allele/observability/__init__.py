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
from .genomes import GenomeRegistry as GenomeRegistry
from .genomes import GenomeVersion as GenomeVersion
from .queries import Alert as Alert
from .queries import AlertContext as AlertContext
from .queries import Queries as Queries
from .queries import RunRef as RunRef
from .sinks._base import DeliveryError as DeliveryError

__all__ = (
    "Alert",
    "AlertContext",
    "ConfigError",
    "DeliveryError",
    "GenomeRegistry",
    "GenomeVersion",
    "KindStatistics",
    "Observability",
    "Queries",
    "Run",
    "RunRef",
    "SamplingRule",
    "Settings",
    "Statistics",
)

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
