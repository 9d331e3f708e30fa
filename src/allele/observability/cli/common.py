"""Helpers shared by the ``allele-obs`` subcommands."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..config import redact

__all__ = ("handle_errors",)

_F = TypeVar("_F", bound=Callable[..., Any])


def handle_errors(
    prefix: str,
    usage: tuple[type[BaseException], ...],
    not_found: type[BaseException],
) -> Callable[[_F], _F]:
    """
    Turn expected failures into one line on stderr and an exit code: 2 for ``usage``
    errors (bad configuration or arguments), 1 for ``not_found`` and for MLflow failures.
    The line is redacted (:func:`~..config.redact`): MLflow's errors quote URIs.
    """

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except usage as exc:
                click.echo(redact(f"{prefix}: {exc}"), err=True)
                raise SystemExit(2) from None
            except not_found as exc:
                click.echo(redact(f"{prefix}: {exc.args[0] if exc.args else exc}"), err=True)
                raise SystemExit(1) from None
            except Exception as exc:
                if not type(exc).__module__.startswith("mlflow"):
                    raise
                click.echo(redact(f"{prefix}: MLflow failed: {exc}"), err=True)  # may quote a URI
                raise SystemExit(1) from None

        return wrapper  # type: ignore[return-value]

    return decorate
