"""Rich progress bars with rate and ETA, written to stderr so stdout stays machine-readable (--json).

Descriptions and warnings carry user text (video names, paths), so nothing here interprets rich markup: the
style is set on the column or the Text, never inside the string.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

err_console = Console(stderr=True, markup=False, emoji=False, highlight=False)


class RateColumn(ProgressColumn):
    """Items per second from rich's own speed estimate, e.g. ``212.4 frames/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:  # type: ignore[no-untyped-def]
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:,.1f} {self.unit}/s", style="cyan")


def make_progress(unit: str = "frames", disable: bool | None = None) -> Progress:
    """A progress bar with count, rate (``unit``/s), elapsed time and ETA; off with ABAWFEAT_NO_PROGRESS=1."""
    if disable is None:
        disable = os.environ.get("ABAWFEAT_NO_PROGRESS") == "1"
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        disable=disable,
        transient=not sys.stderr.isatty(),
    )


def warn(message: str) -> None:
    """One-line warning on stderr (yellow label, the message verbatim)."""
    err_console.print(Text.assemble(("warning:", "yellow"), " ", message), soft_wrap=True)


def loud_warning(message: str) -> None:
    """A warning that must not be missed (e.g. --random-init): boxed and red."""
    err_console.rule(Text("WARNING", style="bold red"))
    err_console.print(Text(message, style="bold red"), soft_wrap=True)
    err_console.rule(style="red")
