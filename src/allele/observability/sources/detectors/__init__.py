"""
Detectors: small state machines that watch metric streams and say which alerts to raise.

Each detector is fed every metric point with :meth:`Detector.observe` and returns the
:class:`Finding` objects to raise as alerts (usually none). They are pure: no I/O, no
clock, no dependency beyond the standard library, O(1) work per point. State is kept per
``(run_key, metric)``; :meth:`Detector.reset` forgets a run's state when it ends.
Detectors are not thread-safe: feed each from one thread or behind one lock.

Metric selectors are :func:`fnmatch.fnmatchcase` globs. Every detector except
:class:`NonFinite` ignores NaN and +-inf points. The alert name is stable per detector:
``<metric>.<kind>`` for a plain metric name, ``metric.<kind>`` for a glob (the concrete
metric is always in the attributes), or the ``alert_name`` given.

``ALLELE_MLFLOW_DETECTORS`` holds a JSON array parsed by :func:`parse_detectors`::

    [{"type": "stagnation", "metric": "fitness.best", "window": 20},
     {"type": "non_finite"}]
"""

from __future__ import annotations

from .base import Detector, Finding
from .builtin import NonFinite, Regression, Stagnation, Threshold, ZScore
from .spec import DETECTOR_TYPES, detectors_from_setting, parse_detectors

__all__ = (
    "DETECTOR_TYPES",
    "Detector",
    "Finding",
    "NonFinite",
    "Regression",
    "Stagnation",
    "Threshold",
    "ZScore",
    "detectors_from_setting",
    "parse_detectors",
)
