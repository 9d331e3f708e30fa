"""
Detectors from a setting: ``ALLELE_MLFLOW_DETECTORS``, a JSON array of detector specs.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ...config import ConfigError
from .builtin import NonFinite, Regression, Stagnation, Threshold, ZScore

if TYPE_CHECKING:
    from .base import Detector

__all__ = ("DETECTOR_TYPES", "detectors_from_setting", "parse_detectors")

#: ``type`` in ``ALLELE_MLFLOW_DETECTORS`` -> detector class
DETECTOR_TYPES: dict[str, type[Detector]] = {
    cls.kind: cls for cls in (NonFinite, Threshold, Stagnation, Regression, ZScore)
}


def parse_detectors(text: str) -> list[Detector]:
    """
    Build detectors from ``ALLELE_MLFLOW_DETECTORS``: a JSON array of objects with a
    ``type`` (one of :data:`DETECTOR_TYPES`) and the detector's keyword arguments. An
    empty string gives no detectors.

    Raises:
        ValueError: naming the entry (by index and type) and the bad field.
    """
    if not text.strip():
        return []
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"detectors: invalid JSON: {exc}") from None
    if not isinstance(entries, list):
        # ValueError throughout: a bad setting is a bad value, whatever its JSON type.
        raise ValueError(f"detectors: expected a JSON array, got {type(entries).__name__}")  # noqa: TRY004
    detectors: list[Detector] = []
    for index, entry in enumerate(entries):
        where = f"detectors[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {entry!r}")  # noqa: TRY004
        options = dict(entry)
        kind = options.pop("type", None)
        if kind not in DETECTOR_TYPES:
            raise ValueError(
                f"{where}: 'type' must be one of {sorted(DETECTOR_TYPES)}, got {kind!r}"
            )
        cls = DETECTOR_TYPES[kind]
        where = f"{where} ({kind})"
        if cls is NonFinite and "metric" in options:
            options.setdefault("metrics", options.pop("metric"))
        allowed = (*cls.fields, "severity", "name", "alert_name")
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; expected some of {allowed}")
        if cls is not NonFinite and "metric" not in options:
            raise ValueError(f"{where}: missing field 'metric'")
        try:
            detectors.append(cls(**options))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return detectors


def detectors_from_setting(spec: str) -> list[Detector]:
    """
    Build detectors from the ``ALLELE_MLFLOW_DETECTORS`` setting, like :func:`parse_detectors`.

    Raises:
        ConfigError: naming ``ALLELE_MLFLOW_DETECTORS`` and the bad entry.
    """
    try:
        return parse_detectors(spec)
    except ValueError as exc:
        raise ConfigError(f"ALLELE_MLFLOW_DETECTORS: {exc}") from None
