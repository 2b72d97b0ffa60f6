"""The `probe` command line: each command parses its options, calls one library function and prints the result.

Every command that reports something takes ``--json``; user errors go to stderr with exit code 1.
"""

from __future__ import annotations

import inspect

# importing each command module registers its commands on the app
from . import demo, doctor, extract, finetune, heads, map, search, serve, sweep, zeroshot  # noqa: F401
from .app import app

for _command in app.registered_commands:  # typer keeps a docstring's line breaks after its first paragraph
    _command.help = _command.help or "\n\n".join(
        " ".join(p.split()) for p in (inspect.getdoc(_command.callback) or "").split("\n\n"))


def main() -> None:  # console-script entry point
    app(prog_name="probe")


if __name__ == "__main__":
    main()
