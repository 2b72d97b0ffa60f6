"""The typer app and what every command shares: --json output and user errors as one line + exit code 1."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer

app = typer.Typer(
    name="probe",
    help="Cached-feature linear probes, few-shot heads and similarity search on pretrained vision backbones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def emit(obj: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str) if as_json else text(obj))


def handles_errors(fn: Callable) -> Callable:
    """User-facing errors (bad data, backbone, store, value) -> one clear line on stderr and exit code 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from probe.errors import USER_ERRORS

        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is kept; re-run the same command to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper
