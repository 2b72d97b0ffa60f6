"""The typer app and what every command shares: --json output and user errors as one line + exit code 1."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from functools import wraps
from pathlib import Path
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
    if not verbose:
        for h in logging.getLogger().handlers:
            if not any(isinstance(f, _NoLibraryTracebacks) for f in h.filters):
                h.addFilter(_NoLibraryTracebacks())


class _NoLibraryTracebacks(logging.Filter):
    """Libraries' log lines without their tracebacks (gcsfs logs one per failed request when offline): the
    one-line error probe prints after says what failed; --verbose keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("probe", "cli")):
            record.exc_info, record.exc_text = None, None
        return True


def emit(obj: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str) if as_json else text(obj))


def show_progress(as_json: bool) -> bool:
    """Whether a command draws progress bars: only when stderr is a terminal, never with --json (a script reads)."""
    return sys.stderr.isatty() and not as_json


FLAGS = {"shots": "--shots", "n_Cs": "--n-Cs", "batch_size": "--batch-size", "max_pixels": "--max-pixels",
         "allow_missing": "--allow-missing", "select": "--select", "grid": "--grid", "bootstrap": "--bootstrap",
         "max_points": "--max-points", "sweep_rows": "--sweep-rows",
         "pair_recall": "--recall"}
"""Library parameter names that appear in messages, and the flag a CLI user types instead."""
QUOTED_FLAGS = {"balanced": "--balanced", "reject": "--reject"}
"""Names that are also plain words ("balanced accuracy"): a flag only where a message quotes them (`reject`)."""


def as_flags(message: str) -> str:
    """The library names its parameters (``shots``); the CLI user typed flags (``--shots``)."""
    for name, flag in FLAGS.items():
        message = re.sub(rf"(?<![\w-])`?{name}`?(?=\b)", flag, message)
    for name, flag in QUOTED_FLAGS.items():
        message = message.replace(f"`{name}`", flag)
    return message


def refuse_overwriting_inputs(outputs: Iterable[str | os.PathLike | None],
                              inputs: Iterable[str | os.PathLike | None], text: bool = False) -> None:
    """A ProbeError naming the output when writing it would replace one of the command's inputs: the same file
    (``os.path.samefile``: links and other spellings of a path count), or an image inside an input folder (a
    folder's images are read as inputs; not those in its hidden folders, which no command reads). When the
    outputs are ``text`` (a CSV, an HTML page), an existing image file (by its suffix) is refused too: the text would
    destroy a picture. An output that does not exist yet replaces nothing; None is skipped."""
    from probe.data import IMG_EXTENSIONS, _visible_files
    from probe.errors import ProbeError

    given = [Path(p) for p in inputs if p is not None and os.path.exists(p)]
    for out in (Path(p) for p in outputs if p is not None):
        if not out.is_file():
            continue
        for src in given:
            inside = src.is_dir() and out.name.lower().endswith(IMG_EXTENSIONS) and \
                out.resolve().is_relative_to(src.resolve()) and \
                bool(_visible_files([out.resolve().relative_to(src.resolve()).as_posix()])[0])
            if inside or os.path.samefile(out, src):
                raise ProbeError(f"{out} is one of this command's inputs" + (f" (an image in {src})" if inside else "")
                                 + ": writing there would destroy it; choose another output path")
        if text and out.name.lower().endswith(IMG_EXTENSIONS):
            raise ProbeError(f"{out} is an image ({out.suffix} file): writing text there would destroy it; choose "
                             "another output path")


def handles_errors(fn: Callable) -> Callable:
    """User-facing errors (``ProbeError``: bad data, backbone, store, value) -> one clear line on stderr and exit
    code 1. Anything else is a bug in probe: its traceback is shown, with a line asking to report it."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from probe.errors import ProbeError

        try:
            return fn(*args, **kwargs)
        except ProbeError as e:
            typer.echo(f"error: {as_flags(str(e))}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is kept; re-run the same command to resume", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception:
            typer.echo(traceback.format_exc().rstrip(), err=True)
            typer.echo("this is a bug in probe, not in your input: please report it with the traceback above",
                       err=True)
            raise typer.Exit(2) from None

    return wrapper
