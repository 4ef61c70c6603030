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
        tune,
        video,
        weights,
    )


_register()


def _usage_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """The exception classes of command-line mistakes and of Ctrl-C aborts: typer's own (recent typer
    versions carry their own click) and click's (older ones raise those)."""
    errors: list[type[BaseException]] = [typer.TyperException]
    aborts: list[type[BaseException]] = [typer.Abort]
    try:
        import click
    except ImportError:
        pass
    else:
        errors.append(click.ClickException)
        aborts.append(click.exceptions.Abort)
    return tuple(errors), tuple(aborts)


def main() -> None:
    """Run the CLI; a mistyped command line is one line too (click's usage box would be several)."""
    import sys

    from abawfeat.utils.allocator import keep_heap

    keep_heap()
    errors, aborts = _usage_errors()
    try:
        code = app(standalone_mode=False)
    except errors as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `abawfeat` or a group alone: its help, as always
            exc.show()  # type: ignore[attr-defined]
            sys.exit(getattr(exc, "exit_code", 2))
        from abawfeat.cli._common import error_line

        message = exc.format_message()  # type: ignore[attr-defined]
        if ctx is not None:
            message = f"{ctx.command_path}: {message} (see {ctx.command_path} --help)"
        error_line(message)
        sys.exit(getattr(exc, "exit_code", 2))
    except aborts:
        sys.stderr.write("aborted\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
