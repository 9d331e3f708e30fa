"""
``allele-obs genomes``: list, trace, promote and compare genome versions.

Each subcommand prints a table by default and JSON with ``--json``. The tracking and
registry URIs default to ``ALLELE_MLFLOW_TRACKING_URI`` and
``ALLELE_MLFLOW_MODEL_REGISTRY_URI``. Exit codes: 0 success, 1 not found or MLflow
failed, 2 invalid configuration, alias or argument.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..config import ConfigError
from ..genomes import GenomeNotFoundError, GenomeRef, GenomeRegistry, GenomeVersion
from .common import handle_errors

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ..genomes import GenomeComparison

__all__ = ("genomes",)

_F = TypeVar("_F", bound="Callable[..., Any]")


def _registry_options(fn: _F) -> _F:
    """Add ``--tracking-uri``, ``--registry-uri`` and ``--json`` to a subcommand."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)
    fn = click.option(
        "--registry-uri",
        default=None,
        help="Model registry URI [default: $ALLELE_MLFLOW_MODEL_REGISTRY_URI or tracking URI].",
    )(fn)
    return click.option(
        "--tracking-uri",
        default=None,
        help="Tracking URI [default: $ALLELE_MLFLOW_TRACKING_URI or sqlite:///mlflow.db].",
    )(fn)


def _open(tracking_uri: str | None, registry_uri: str | None) -> GenomeRegistry:
    overrides: dict[str, Any] = {}
    if tracking_uri:
        overrides["tracking_uri"] = tracking_uri
    if registry_uri:
        overrides["model_registry_uri"] = registry_uri
    return GenomeRegistry.from_env(**overrides)


_handle_errors = handle_errors("allele-obs genomes", (ConfigError, ValueError), GenomeNotFoundError)


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:+.6g}" if math.isfinite(x) else str(x)


def _fit(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]
    return "\n".join(lines)


def _row(v: GenomeVersion, *, with_name: bool = False) -> list[str]:
    row = [
        str(v.version),
        v.genome_id,
        _fit(v.fitness),
        "-" if v.generation is None else str(v.generation),
        ",".join(v.parents) or "-",
        ",".join(v.aliases) or "-",
        v.run_id or "-",
    ]
    return [v.name, *row] if with_name else row


_HEADERS = ("VERSION", "GENOME_ID", "FITNESS", "GEN", "PARENTS", "ALIASES", "RUN")


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=repr))


@click.group("genomes")
def genomes() -> None:
    """
    Genome versions in the MLflow model registry.
    """


@genomes.command("list")
@click.argument("name")
@_registry_options
@_handle_errors
def list_(name: str, tracking_uri: str | None, registry_uri: str | None, as_json: bool) -> None:
    """
    List the genome versions of model NAME.
    """
    versions = _open(tracking_uri, registry_uri).versions(name)
    if as_json:
        _echo_json([v.as_dict() for v in versions])
    elif not versions:
        click.echo(f"no genome versions in model {name!r}")
    else:
        click.echo(_table(_HEADERS, [_row(v) for v in versions]))


@genomes.command("lineage")
@click.argument("genome_id")
@click.option("--name", default=None, help="Only follow versions of this registered model.")
@_registry_options
@_handle_errors
def lineage(
    genome_id: str,
    name: str | None,
    tracking_uri: str | None,
    registry_uri: str | None,
    as_json: bool,
) -> None:
    """
    Show the ancestors of GENOME_ID, nearest first.
    """
    ancestors = _open(tracking_uri, registry_uri).lineage(genome_id, name)
    if as_json:
        _echo_json({"genome_id": genome_id, "ancestors": [a.as_dict() for a in ancestors]})
        return
    if not ancestors:
        click.echo(f"{genome_id} has no recorded parents")
        return
    rows = [
        ["(not registered)", "-", a.genome_id, "-", "-", "-", "-", "-"]
        if isinstance(a, GenomeRef)
        else _row(a, with_name=True)
        for a in ancestors
    ]
    click.echo(f"ancestors of {genome_id}, nearest first:")
    click.echo(_table(("MODEL", *_HEADERS), rows))


@genomes.command("promote")
@click.argument("name")
@click.argument("genome_id_or_version")
@click.argument("alias")
@_registry_options
@_handle_errors
def promote(
    name: str,
    genome_id_or_version: str,
    alias: str,
    tracking_uri: str | None,
    registry_uri: str | None,
    as_json: bool,
) -> None:
    """
    Point ALIAS of model NAME at a version (a genome id or a version number).
    """
    version = _open(tracking_uri, registry_uri).promote(name, genome_id_or_version, alias)
    if as_json:
        _echo_json(version.as_dict())
    else:
        click.echo(
            f"{name} version {version.version} ({version.genome_id}) is now {alias!r}; "
            f"aliases: {', '.join(version.aliases)}"
        )


@genomes.command("compare")
@click.argument("name")
@click.argument("a")
@click.argument("b")
@_registry_options
@_handle_errors
def compare(
    name: str, a: str, b: str, tracking_uri: str | None, registry_uri: str | None, as_json: bool
) -> None:
    """
    Compare versions A and B of model NAME (genome ids or version numbers).
    """
    result = _open(tracking_uri, registry_uri).compare(name, a, b)
    if as_json:
        _echo_json(result.as_dict())
    else:
        click.echo(_render_comparison(result))


def _render_comparison(c: GenomeComparison) -> str:
    rows = [[label, *_row(v)] for label, v in (("a", c.a), ("b", c.b))]
    lines = [_table(("", *_HEADERS), rows), "", f"fitness delta (b - a): {_num(c.fitness_delta)}"]
    if c.welch is None:
        lines.append("welch t-test: n/a (needs >= 2 logged evaluations on both)")
    else:
        t, dof, p = c.welch
        lines.append(f"welch t-test (b vs a): t={t:.4g}  dof={dof:.4g}  p={p:.4g}")
    shown = len(c.differences)
    lines.append(
        f"differences: {c.difference_count}"
        + (f" (first {shown} shown)" if shown < c.difference_count else "")
    )
    if c.differences:
        diff_rows = [[d.path, repr(d.a), repr(d.b)] for d in c.differences]
        lines.append(_table(("PATH", "A", "B"), diff_rows))
    return "\n".join(lines)
