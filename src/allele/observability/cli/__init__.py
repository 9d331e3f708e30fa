"""
The ``allele-obs`` command line.

``allele-obs demo`` runs the built-in genetic-algorithm matrix fully tracked and says
where the data went and how to look at it; ``allele-obs config`` shows the effective
``ALLELE_MLFLOW_*`` settings with secrets redacted.

Exit codes: 0 success, 1 the demo lost or could not deliver events, 2 invalid
configuration or usage.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from ..config import ENV_PREFIX, ConfigError, Settings, load_settings
from ..demo.matrix import DEFAULT_GENERATIONS
from ..sources.detectors import detectors_from_setting
from .alerts import alerts, correlate
from .genomes import genomes
from .retention import retention
from .spool import spool

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._core.accounting import Statistics
    from ..demo.matrix import DemoResult

__all__ = ("main",)

#: exit code when the configuration is invalid
EXIT_CONFIG = 2
#: exit code when the demo dropped, dead-lettered or could not deliver events
EXIT_UNDELIVERED = 1


def _configure_logging() -> None:
    """Send the library's warnings to stderr (a no-op if logging is already set up)."""
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """
    Invisible MLflow tracking for evolution experiments.
    """
    _configure_logging()


def _config_failed(err: ConfigError) -> None:
    """Report an invalid configuration and exit with code 2 (no traceback)."""
    click.echo(f"allele-obs: {err}", err=True)
    raise SystemExit(EXIT_CONFIG)


# -- allele-obs config -------------------------------------------------------------------------
def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _show(value: Any) -> str:
    """Render one setting the way it would be written in the environment."""
    if value is None:
        return "(unset)"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True) if value else "(none)"
    return str(value)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
def config(*, as_json: bool) -> None:
    """
    Show the effective settings (secrets as '***') and their environment variables.
    """
    try:
        settings = load_settings()
        detectors_from_setting(settings.detectors)  # checked where it is parsed
    except ConfigError as err:
        _config_failed(err)
        return
    values = settings.redacted()
    if as_json:
        document = {_env_name(field): value for field, value in values.items()}
        click.echo(json.dumps(document, indent=2, sort_keys=False, default=str))
        return
    explicit = settings.model_fields_set
    width = max(len(_env_name(field)) for field in values)
    for field, value in values.items():
        origin = "environment" if field in explicit else "default"
        click.echo(f"{_env_name(field):<{width}}  {_show(value)}  [{origin}]")


# -- allele-obs demo ---------------------------------------------------------------------------
def sqlite_path(uri: str) -> str | None:
    """
    Return the absolute path of the database file of a ``sqlite:///`` URI.

    Relative paths resolve against the current directory, as SQLAlchemy resolves them.
    Returns None for other URIs and for in-memory databases.
    """
    prefix = "sqlite:///"
    if not uri.lower().startswith(prefix):
        return None
    path = uri[len(prefix) :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return os.path.abspath(path)


def _where(settings: Settings) -> tuple[list[str], str]:
    """Return the lines that say where the data is and the URI a client should use."""
    shown = settings.redacted()["tracking_uri"]
    lines = [f"  tracking URI: {shown}"]
    path = sqlite_path(settings.tracking_uri)
    if path is not None:
        client_uri = f"sqlite:///{path}"
        lines.append(f"  database:     {path}")
        lines.append("")
        lines.append("Look at it in the MLflow UI:")
        lines.append(f"  mlflow ui --backend-store-uri {client_uri}")
        return lines, client_uri
    lines.append("")
    if shown.lower().startswith(("http://", "https://")):
        lines.append("Look at it in the MLflow UI:")
        lines.append(f"  {shown}")
    else:
        lines.append("Look at it in the MLflow UI:")
        lines.append(f"  mlflow ui --backend-store-uri {shown}")
    return lines, shown


def _snippet(client_uri: str, experiment: str, best_run_id: str | None) -> list[str]:
    """Return a Python snippet that reads the demo back from the store."""
    lines = [
        "import mlflow",
        "",
        f"client = mlflow.MlflowClient(tracking_uri={client_uri!r})",
        f"experiment = client.get_experiment_by_name({experiment!r})",
        "runs = client.search_runs(",
        "    [experiment.experiment_id],",
        "    \"tags.suite = 'demo' and tags.cell != ''\",",
        '    order_by=["metrics.`fitness.best` DESC"],',
        ")",
        "for run in runs:",
        "    print(run.info.run_name, run.data.metrics['fitness.best'])",
    ]
    if best_run_id is not None:
        lines += [
            f"history = client.get_metric_history({best_run_id!r}, 'fitness.best')",
            "print([(m.step, m.value) for m in history][:5])",
        ]
    return ["  " + line if line else "" for line in lines]


def _losses(result: DemoResult, stats: Statistics, settings: Settings) -> list[str]:
    """Return why the demo's telemetry is incomplete (empty when all was delivered)."""
    total = stats.total
    problems = []
    if not result.flushed:
        pending = result.stats.total.pending
        problems.append(f"the flush timed out with {pending} events not yet delivered")
    if total.dropped:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(stats.drop_reasons.items()))
        problems.append(f"{total.dropped} events were dropped ({reasons})")
    if total.dead_lettered:
        problems.append(
            f"{total.dead_lettered} events were rejected by the store; "
            f"see {settings.spool_dir.resolve() / 'dead-letters.jsonl'}"
        )
    if total.spooled:
        problems.append(
            f"{total.spooled} events were spooled to {settings.spool_dir.resolve()} "
            "for a later replay"
        )
    return problems


def _report(settings: Settings, result: DemoResult, stats: Statistics, wall: float) -> list[str]:
    """Return the closing report of ``allele-obs demo``."""
    experiments = ", ".join(settings.experiment_prefix + p for p in result.parent_run_ids)
    headline = (
        f"Tracked {result.runs} runs ({len(result.parent_run_ids)} parents, "
        f"{len(result.child_run_ids)} children) in experiments {experiments}, {wall:.1f} s."
    )
    delivered = (
        f"  delivered:    {stats.metric.delivered} of {stats.metric.emitted} metrics, "
        f"{stats.param.delivered} params, {stats.tag.delivered} tags, "
        f"{stats.artifact.delivered} artifacts, {stats.run.delivered} run starts and ends "
        f"({stats.total.dropped} dropped, {stats.total.dead_lettered} dead-lettered)"
    )
    lines = [headline, delivered]
    where, client_uri = _where(settings)
    lines += where
    problem = next(iter(result.parent_run_ids), "onemax")
    cells = [c for c in result.cells if c.problem == problem]
    best = max(cells, key=lambda c: (c.best, -c.best_generation), default=None)
    best_run = result.child_run_ids.get(f"{problem}/{best.cell}") if best else None
    experiment = settings.experiment_prefix + problem
    lines += ["", "Query it from Python:", *_snippet(client_uri, experiment, best_run)]
    return lines


@main.command()
@click.option(
    "--tracking-uri",
    metavar="URI",
    default=None,
    help="Tracking URI (default: ALLELE_MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).",
)
@click.option(
    "--generations",
    type=click.IntRange(min=1),
    default=DEFAULT_GENERATIONS,
    show_default=True,
    help="Generations per cell of the matrix.",
)
@click.option("--quiet", "-q", is_flag=True, help="Do not print a line per cell.")
def demo(tracking_uri: str | None, generations: int, *, quiet: bool) -> None:
    """
    Run a small genetic-algorithm matrix fully tracked and show where the data is.

    Two problems (OneMax, Rastrigin), each a parent run with one child run per
    (population size, mutation rate) cell: every GA knob as params, per-generation
    fitness and diversity as metrics, results as tags and a summary.json artifact.
    """
    from .._core.observability import Observability
    from ..demo.matrix import run_demo

    overrides = {"tracking_uri": tracking_uri} if tracking_uri else {}
    try:
        obs = Observability.from_env(**overrides)
    except ConfigError as err:
        _config_failed(err)
        return
    settings = obs.settings
    if not settings.enabled:
        click.echo(
            f"allele-obs: tracking is disabled ({_env_name('enabled')}=false); "
            "the demo would record nothing",
            err=True,
        )
        raise SystemExit(EXIT_UNDELIVERED)
    progress: Callable[[str], None] | None = None
    if not quiet:
        click.echo(
            f"Running the demo matrix into {settings.redacted()['tracking_uri']} ...", err=True
        )

        def progress(line: str) -> None:
            click.echo("  " + line, err=True)

    start = time.perf_counter()
    with obs:
        result = run_demo(
            obs,
            generations=generations,
            progress=progress,
            flush_timeout=max(settings.shutdown_timeout, 30.0),
        )
    stats = obs.stats()
    wall = time.perf_counter() - start
    click.echo("\n".join(_report(settings, result, stats, wall)))
    if stats.failures:
        failed = ", ".join(f"{r}: {n}" for r, n in sorted(stats.failures.items()))
        click.echo(f"allele-obs: note: some export attempts failed and were retried ({failed})")
    problems = _losses(result, stats, settings)
    if problems:
        click.echo("", err=True)
        for problem in problems:
            click.echo(f"allele-obs: error: {problem}", err=True)
        click.echo("allele-obs: the demo's telemetry is incomplete", err=True)
        raise SystemExit(EXIT_UNDELIVERED)


main.add_command(spool)
main.add_command(genomes)
main.add_command(alerts)
main.add_command(correlate)
main.add_command(retention)

if __name__ == "__main__":  # pragma: no cover
    main()
