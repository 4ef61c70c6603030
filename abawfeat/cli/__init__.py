"""The ``abawfeat`` command line: each command parses options, builds a config and calls one library
function. Commands live in one module per area (``cli/data.py``, ``cli/extract.py``, ...); nothing heavy
(torch, h5py) is imported at module level so that ``abawfeat --help`` answers at once."""

from __future__ import annotations

import typer

from abawfeat import __version__

app = typer.Typer(
    name="abawfeat",
    help=(
        "Facial affect analysis for ABAW / Aff-Wild2. Stage one: `abawfeat extract` caches frozen encoder "
        "features; stage two: `abawfeat train-head` trains light heads on them; `abawfeat finetune` trains "
        "an encoder with a head end to end."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"abawfeat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Facial affect analysis for ABAW / Aff-Wild2."""


def _register() -> None:
    # Each area module adds its commands to ``app``; the import order is the order in --help.
    from abawfeat.cli import (  # noqa: F401
        cache,
        data,
        encoders,
        extract,
        finetune,
        report,
        synth,
        train,
    )


_register()


def main() -> None:
    app()
