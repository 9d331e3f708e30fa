"""
``allele-obs alerts`` and ``allele-obs correlate``: alerts read back from MLflow.

``alerts`` lists the alerts of the prefixed experiments (or one run) with filters;
``correlate ALERT_ID`` shows the runs an alert hit, the phase it was raised in and the
metrics around its step. Both print a table by default and JSON with ``--json``; times
are shown in UTC. The tracking URI defaults to ``ALLELE_MLFLOW_TRACKING_URI`` and the
experiments to those starting with ``ALLELE_MLFLOW_EXPERIMENT_PREFIX``. Exit codes: 0
success, 1 alert not found or MLflow failed, 2 invalid configuration or argument.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import time
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..alerts.queries import Queries
from ..alerts.results import SEVERITIES, AlertNotFoundError
from ..config import ConfigError
from .common import handle_errors

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ..alerts.results import Alert, AlertContext, Phase

__all__ = ("alerts", "correlate")

_F = TypeVar("_F", bound="Callable[..., Any]")
_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _when(_ctx: click.Context, param: click.Parameter, text: str | None) -> float | None:
    """Parse --since/--until: an age (30m, 2h, 1d), epoch seconds or an ISO date/time."""
    if text is None:
        return None
    if m := _AGE.match(text.strip()):
        return time.time() - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an age (30m, 2h, 1d), epoch seconds or an ISO date/time",
            param=param,
        ) from None


def _options(fn: _F) -> _F:
    """Add ``--tracking-uri`` and ``--json``."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)
    return click.option(
        "--tracking-uri",
        default=None,
        help="Tracking URI [default: $ALLELE_MLFLOW_TRACKING_URI or sqlite:///mlflow.db].",
    )(fn)


_handle_errors = handle_errors(
    "allele-obs", (ConfigError, ValueError, TypeError), AlertNotFoundError
)


def _queries(tracking_uri: str | None) -> Queries:
    return Queries.from_env(**({"tracking_uri": tracking_uri} if tracking_uri else {}))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(_jsonable(value), indent=2, sort_keys=True))


def _ts(ms: float | None) -> str:
    if ms is None:
        return "-"
    stamp = dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ms) % 1000:03d}Z"


def _num(value: float) -> str:
    return f"{value:.6g}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    )


def _runs(alert: Alert) -> str:
    return alert.run_ids[0] if len(alert.run_ids) == 1 else f"{len(alert.run_ids)} runs"


def _dash(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


@click.command("alerts")
@click.option("--run-id", default=None, help="Only the alerts of this run.")
@click.option("--phase", default=None, help="A phase name in the alert's phase path.")
@click.option(
    "--severity",
    multiple=True,
    type=click.Choice(SEVERITIES),
    help="Only these severities (repeat for several).",
)
@click.option("--name", default=None, help="An alert name or glob (fitness.*).")
@click.option("--since", callback=_when, help="Age (2h), epoch seconds or ISO date/time.")
@click.option("--until", callback=_when, help="Age (2h), epoch seconds or ISO date/time.")
@_options
@_handle_errors
def alerts(
    run_id: str | None,
    phase: str | None,
    severity: tuple[str, ...],
    name: str | None,
    since: float | None,
    until: float | None,
    tracking_uri: str | None,
    as_json: bool,
) -> None:
    """
    List alerts, oldest first, with the filters given.
    """
    found = _queries(tracking_uri).alerts(
        run_id, phase=phase, severity=severity or None, name=name, since=since, until=until
    )
    if as_json:
        _echo_json(found)
        return
    if not found:
        click.echo("no alerts")
        return
    headers = ("TIME", "SEVERITY", "NAME", "COUNT", "STEP", "PHASE", "RUNS", "ALERT_ID", "MESSAGE")
    rows = [
        [
            _ts(a.time),
            a.severity,
            a.name,
            str(a.occurrences),
            _dash(a.step),
            "/".join(a.phase_path) or "-",
            _runs(a),
            a.alert_id,
            a.message,
        ]
        for a in found
    ]
    click.echo(_table(headers, rows))


@click.command("correlate")
@click.argument("alert_id")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="A metric name or glob (repeat; default: all but allele.alerts.* and system/*).",
)
@click.option(
    "--window", type=click.IntRange(min=0), default=5, show_default=True, help="Steps each side."
)
@_options
@_handle_errors
def correlate(
    alert_id: str,
    metrics: tuple[str, ...],
    window: int,
    tracking_uri: str | None,
    as_json: bool,
) -> None:
    """
    Show the runs, phase, step and metric values around ALERT_ID.
    """
    context = _queries(tracking_uri).alert_context(alert_id, list(metrics) or None, window)
    if as_json:
        _echo_json(context)
    else:
        click.echo(_render(context))


def _phase_line(phase: Phase | None) -> str:
    if phase is None:
        return "phase:    -"
    steps = f"steps {_dash(phase.start_step)}..{_dash(phase.end_step)}"
    return (
        f"phase:    {'/'.join(phase.path)} ({_ts(phase.start_time)} .. {_ts(phase.end_time)}, "
        f"{steps}, span {_dash(phase.span_id)})"
    )


def _render(c: AlertContext) -> str:
    a = c.alert
    lines = [
        f"alert {a.alert_id}: {a.name} ({a.severity}), {a.occurrences} occurrence(s)",
        f"message:  {a.message or '-'}",
        f"time:     {_ts(a.time)} .. {_ts(a.last_time)}",
        (
            f"raised:   scope {a.scope}, run {_dash(a.run_id)}, step {_dash(a.step)}, "
            f"host {_dash(a.host)} pid {a.pid}, trace {_dash(a.trace_id)}"
        ),
        _phase_line(c.phase),
    ]
    if a.attributes:
        lines.append(f"details:  {json.dumps(_jsonable(a.attributes), sort_keys=True)}")
    lines += ["", f"runs hit ({len(c.runs)}):"]
    rows = [
        [
            r.run_id,
            r.run_name,
            _dash(r.experiment),
            r.status,
            _ts(r.start_time),
            _ts(r.end_time),
            _dash(r.host),
        ]
        for r in c.runs
    ]
    if rows:
        run_headers = ("RUN_ID", "NAME", "EXPERIMENT", "STATUS", "START", "END", "HOST")
        lines.append(_table(run_headers, rows))
    for r in c.runs:
        center = c.steps.get(r.run_id)
        lines += ["", f"run {r.run_id} ({r.run_name}), step {_dash(center)} +- {c.window}:"]
        series = c.metrics.get(r.run_id, {})
        steps = sorted({s for points in series.values() for s, _ in points})
        if not steps:
            lines.append("  (no metric values in the window)")
            continue
        headers = ["METRIC", *(f"{s}*" if s == center else str(s) for s in steps)]
        table = []
        for metric, points in sorted(series.items()):
            by_step = {s: _num(v) for s, v in points}  # the latest value at each step
            table.append([metric, *(by_step.get(s, "-") for s in steps)])
        lines.append(_table(headers, table))
    return "\n".join(lines)
