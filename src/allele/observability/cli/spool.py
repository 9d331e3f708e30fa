"""
``allele-obs spool status|replay``: look at and replay the disk spool.

``status`` reads the spool directory without changing it. ``replay`` delivers every
replayable segment (those of processes that have exited or closed them) to the tracking
store, in order, with a progress bar, and exits non-zero if something is left. A spool of
another user's, or one that group or others may write, is refused and listed
(:mod:`..spool.safety`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..config import ConfigError, Settings, load_settings

__all__ = ("spool",)


def _settings(tracking_uri: str | None, spool_dir: str | None) -> Settings:
    overrides: dict[str, object] = {}
    if tracking_uri:
        overrides["tracking_uri"] = tracking_uri
    if spool_dir:
        overrides["spool_dir"] = Path(spool_dir)
    try:
        return load_settings(**overrides)
    except ConfigError as err:
        click.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None


_URI = click.option("--tracking-uri", help="Override ALLELE_MLFLOW_TRACKING_URI.")
_DIR = click.option("--spool-dir", help="Override ALLELE_MLFLOW_SPOOL_DIR.")


@click.group()
def spool() -> None:
    """Inspect and replay the disk spool (events that could not be delivered)."""


@spool.command()
@_DIR
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(spool_dir: str | None, *, as_json: bool) -> None:
    """Show the segments waiting in the spool."""
    from ..sinks.deadletter import DeadLetters
    from ..spool.segments import Spool

    settings = _settings(None, spool_dir)
    directory = Path(settings.spool_dir)
    segments = Spool.inspect(directory) if directory.exists() else []
    dead = len(DeadLetters(directory).read())
    rows: list[dict[str, Any]] = [
        {
            "segment": s.path.name,
            "state": s.state,
            "pid": s.pid,
            "owner_alive": s.owner_alive,
            "records": s.records,
            "bytes": s.size,
        }
        for s in segments
    ]
    if as_json:
        click.echo(
            json.dumps(
                {"spool_dir": str(directory), "segments": rows, "dead_letters": dead}, indent=2
            )
        )
        return
    click.echo(f"spool: {directory.resolve()}")
    if not rows:
        click.echo("  no segments waiting")
    for r in rows:
        click.echo(
            f"  {r['segment']}  {r['state']:<10}  pid {r['pid']:<7}  "
            f"{r['records'] or 0:>7} records  {r['bytes']:>10} bytes"
        )
    total = sum(r["records"] or 0 for r in rows)
    click.echo(f"  {len(rows)} segments, {total} records; {dead} dead letters")


@spool.command()
@_URI
@_DIR
def replay(tracking_uri: str | None, spool_dir: str | None) -> None:
    """Deliver every replayable segment to the tracking store, oldest first."""
    from ..backends.factory import make_backend
    from ..sinks.deadletter import DeadLetters
    from ..sinks.registry import GenomeSink
    from ..spool.replay import Replayer
    from ..spool.runmap import RunMap
    from ..spool.safety import refused_paths
    from ..spool.segments import SEGMENTS, Spool

    settings = _settings(tracking_uri, spool_dir)
    directory = Path(settings.spool_dir)
    if not directory.exists():
        click.echo(f"nothing to replay: {directory} does not exist")
        return
    total = sum(s.records or 0 for s in Spool.inspect(directory) if s.state == "replayable")
    backend = make_backend(settings)
    store = Spool(directory, max_bytes=settings.spool_max_bytes)
    replayer = Replayer(
        store,
        backend,
        RunMap(directory),
        DeadLetters(directory),
        genome_sink=GenomeSink(settings),
    )
    try:
        progressbar: Any = click.progressbar  # its overloads confuse mypy
        with progressbar(length=total, label="replaying", show_pos=True, file=sys.stderr) as bar:
            report = replayer.replay(max_records=None, progress=bar.update)
    finally:
        backend.close()
        store.close()
    events = sum(report.events.values())
    click.echo(
        f"replayed {report.records} records ({events} events) from {report.segments} segments "
        f"into {settings.redacted()['tracking_uri']}; {report.dead_lettered} dead-lettered; "
        f"{store.stats().corrupt_records_skipped} corrupt records skipped"
    )
    left = [s.path for s in Spool.inspect(directory, count_records=False)]
    refused = refused_paths(directory, directory / SEGMENTS, left)
    for path, reason in refused:
        click.echo(f"refused: {path}: {reason}; left in place, not replayed", err=True)
    if report.error is not None:
        click.echo(f"error: stopped early: {report.error}; run it again later", err=True)
    if report.error is not None or refused:
        raise SystemExit(1)
