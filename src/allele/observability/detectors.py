"""
Built-in detectors: they watch metric streams in the exporter and raise alerts.

Add them in code with ``obs.add_detector(Stagnation("fitness.best", window=20))`` or by
environment with ``ALLELE_MLFLOW_DETECTORS='[{"type": "stagnation", "metric":
"fitness.best", "window": 20}, {"type": "non_finite"}]'``. Metric selectors are globs.
"""

from __future__ import annotations

from .sources.detectors import (
    Detector,
    Finding,
    NonFinite,
    Regression,
    Stagnation,
    Threshold,
    ZScore,
    parse_detectors,
)

__all__ = (
    "Detector",
    "Finding",
    "NonFinite",
    "Regression",
    "Stagnation",
    "Threshold",
    "ZScore",
    "parse_detectors",
)
