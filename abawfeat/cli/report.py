"""CLI commands for this area (see abawfeat/cli/__init__.py): ``abawfeat report``."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer

from abawfeat.cli import app
from abawfeat.cli._common import guarded, warn_line


@app.command("report")
@guarded
def report(
    run_dirs: list[Path] = typer.Argument(
        ..., metavar="RUN_DIR", show_default=False,
        help="Run directories written by `abawfeat train-head` (each needs metrics.json).",
    ),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write."),
) -> None:
    """Compare runs in one self-contained HTML report (Table 3 layout, plots embedded).

    Runs without plots get them first; prints the report's path.
    """
    # Imported here so that `abawfeat --help` does not pay for matplotlib.
    from abawfeat.report import build_report

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = build_report(run_dirs, out)
    # Skipped plots are worth one line each, not a warnings-module traceback line.
    for warning in caught:
        warn_line(str(warning.message))
    typer.echo(str(path))
