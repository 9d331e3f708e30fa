"""
allele-observability: invisible experiment tracking for long-running evolution experiments.

Runtime code emits metrics, params, tags and artifacts onto an in-process bus; a background
exporter batches them into MLflow runs. See ``docs/`` for the guide.
"""

from __future__ import annotations

from ._core.accounting import KindStatistics as KindStatistics
from ._core.accounting import Statistics as Statistics
from ._core.observability import Observability as Observability
from ._core.runs import Run as Run
from .alerts.queries import Queries as Queries
from .alerts.results import Alert as Alert
from .alerts.results import AlertContext as AlertContext
from .alerts.results import RunRef as RunRef
from .backends.base import DeliveryError as DeliveryError
from .config import ConfigError as ConfigError
from .config import SamplingRule as SamplingRule
from .config import Settings as Settings
from .genomes import GenomeRegistry as GenomeRegistry
from .genomes import GenomeVersion as GenomeVersion

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
