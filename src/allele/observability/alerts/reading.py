"""
Reading MLflow for the queries: experiments, runs, chunk files, alerts and run references.

:class:`MlflowReader` is the base of :class:`~.queries.Queries`: it owns the MLflow
client, the cache of chunk files of ended runs and the thread pool that reads runs in
parallel. Malformed lines and records are logged and skipped.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .results import Alert, RunRef, merge_alerts

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = ("MlflowReader",)

#: the logger of :mod:`.queries`, so that filters set on it still apply to these records
logger = logging.getLogger(__name__.rsplit(".", 1)[0] + ".queries")

_CACHE_SIZE = 4096
_CHUNK = re.compile(r"^(?:alerts|phases)-(\d+)-(\d+)\.jsonl$")
_R = TypeVar("_R")


def _chunk_key(path: str) -> tuple[int, int, str] | None:
    m = _CHUNK.match(path.rsplit("/", 1)[-1])
    return (int(m.group(1)), int(m.group(2)), path) if m else None


class MlflowReader:
    """
    The MLflow reads the queries are built on.

    Args:
        tracking_uri: the MLflow tracking URI.
        experiment_prefix: only experiments whose name starts with it are searched.
        max_workers: runs whose artifacts are read in parallel.

    Thread-safe. Chunk files of ended runs are cached by (run, path, size): chunks are
    only ever added, so a new listing always sees new data.
    """

    def __init__(
        self, tracking_uri: str, *, experiment_prefix: str = "", max_workers: int = 8
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_prefix = experiment_prefix
        self.max_workers = max(1, max_workers)
        self._lock = threading.Lock()
        self._client: Any = None
        self._cache: OrderedDict[tuple[str, str, int], tuple[dict[str, Any], ...]] = OrderedDict()

    @property
    def client(self) -> Any:
        """The ``mlflow.MlflowClient`` (imported and built on first use)."""
        with self._lock:
            if self._client is None:
                from mlflow import MlflowClient

                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            return self._client

    def _experiments(self) -> dict[str, str]:
        """Experiment id -> name, for the active experiments with the prefix."""
        out: dict[str, str] = {}
        token = None
        while True:
            page = self.client.search_experiments(max_results=1000, page_token=token)
            out.update(
                (e.experiment_id, e.name) for e in page if e.name.startswith(self.experiment_prefix)
            )
            if not (token := page.token):
                return out

    def _search(self, experiments: Mapping[str, str], where: str) -> list[Any]:
        ids, runs = list(experiments), []
        for i in range(0, len(ids), 100):
            token = None
            while True:
                page = self.client.search_runs(ids[i : i + 100], where, page_token=token)
                runs.extend(page)
                if not (token := page.token):
                    break
        return runs

    def _map(self, fn: Callable[[Any], _R], items: list[Any]) -> list[_R]:
        if len(items) <= 1 or self.max_workers == 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(min(len(items), self.max_workers)) as pool:
            return list(pool.map(fn, items))

    def _records(self, run: Any, directory: str) -> list[dict[str, Any]]:
        """Every JSON object in a run's chunk files under ``directory``, in chunk order."""
        run_id, ended = run.info.run_id, run.info.status != "RUNNING"
        files = [f for f in self.client.list_artifacts(run_id, directory) if _chunk_key(f.path)]
        out: list[dict[str, Any]] = []
        for f in sorted(files, key=lambda f: _chunk_key(f.path) or ()):
            key = (run_id, f.path, -1 if f.file_size is None else f.file_size)
            cacheable = ended and key[2] >= 0
            with self._lock:
                records = self._cache.get(key) if cacheable else None
            if records is None:
                records = self._download(run_id, f.path)
            if cacheable:
                with self._lock:
                    self._cache[key] = records
                    self._cache.move_to_end(key)
                    while len(self._cache) > _CACHE_SIZE:
                        self._cache.popitem(last=False)
            out.extend(records)
        return out

    def _download(self, run_id: str, path: str) -> tuple[dict[str, Any], ...]:
        with tempfile.TemporaryDirectory(prefix="allele-queries-") as tmp:
            text = Path(self.client.download_artifacts(run_id, path, tmp)).read_text("utf-8")
        out = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                out.append(rec)
            else:
                logger.warning(
                    "skipping line %d of %s in run %s: not a JSON object", number, path, run_id
                )
        return tuple(out)

    def _read_alerts(self, runs: Sequence[Any]) -> dict[str, Alert]:
        """Alert id -> the alert merged over the chunks of ``runs`` (most occurrences wins)."""

        def read(run: Any) -> list[Alert]:
            alerts = []
            for rec in self._records(run, "allele/alerts"):
                try:
                    alerts.append(Alert.from_record(rec, (run.info.run_id,)))
                except (KeyError, TypeError, ValueError) as exc:
                    logger.warning("skipping a malformed alert in run %s: %r", run.info.run_id, exc)
            return alerts

        merged: dict[str, Alert] = {}
        for alert in (a for alerts in self._map(read, list(runs)) for a in alerts):
            old = merged.get(alert.alert_id)
            merged[alert.alert_id] = alert if old is None else merge_alerts(old, alert)
        return merged

    def _get_run(self, run_id: str) -> Any:
        try:
            return self.client.get_run(run_id)
        except Exception as exc:
            if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None

    def _refs(self, runs: Iterable[Any], exps: Mapping[str, str] | None = None) -> list[RunRef]:
        names = dict(exps if exps is not None else self._experiments())
        refs = []
        for run in runs:
            info, tags = run.info, run.data.tags
            if info.experiment_id not in names:
                names[info.experiment_id] = self.client.get_experiment(info.experiment_id).name
            pid = tags.get("allele.pid", "")
            refs.append(
                RunRef(
                    run_id=info.run_id,
                    run_name=info.run_name or "",
                    experiment_id=info.experiment_id,
                    experiment=names[info.experiment_id],
                    status=info.status,
                    start_time=info.start_time,
                    end_time=info.end_time,
                    host=tags.get("allele.host"),
                    pid=int(pid) if pid.isdigit() else None,
                )
            )
        return sorted(refs, key=lambda r: (r.start_time or 0, r.run_id))
