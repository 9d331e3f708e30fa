"""
Genome events on their way to the model registry (or to the run only).

The bus canonicalises and validates a genome at the call; here the exporter (or a replay)
hands it to :class:`~allele.observability.genomes.GenomeRegistry`, which is idempotent
across replays and processes, so a genome spooled and replayed twice is one version.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from ..backends.base import DeliveryError
from ..backends.client import classify_exception

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ("GenomeSink",)


class GenomeSink:
    """
    Registers (or logs) genome payloads; blocking, thread-safe, one registry per sink.

    Args:
        settings: tracking and registry URIs, and whether to register.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._registry: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._registry is None:
                from ..genomes.registry import GenomeRegistry

                s = self._settings
                self._registry = GenomeRegistry(s.tracking_uri, s.model_registry_uri)
            return self._registry

    def __call__(self, run_id: str, payload: dict[str, Any]) -> None:
        """Register or log one genome into ``run_id``; raise DeliveryError on failure."""
        from ..genomes.identity import CanonicalGenome

        s = self._settings
        genome = CanonicalGenome(payload["genome_id"], payload["text"])
        kwargs = {
            "name": payload["name"],
            "fitness": payload["fitness"],
            "generation": payload["generation"],
            "parents": payload["parents"],
            "evaluations": payload["evaluations"],
        }
        try:
            registry = self._get()
            if s.model_registry_enabled and s.auto_register_models:
                registry.register(run_id, genome, tags=payload["tags"] or None, **kwargs)
            else:
                registry.log(run_id, genome, **kwargs)
        except (TypeError, ValueError) as exc:
            raise DeliveryError("rejected", f"genome: {exc}", retryable=False) from None
        except DeliveryError:
            raise
        except Exception as exc:
            raise classify_exception(exc) from None
