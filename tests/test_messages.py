"""User text is printed literally: rich markup, emoji codes and highlighting never touch a path, a video name
or a recipe section, in errors, warnings, progress bars and tables (issue 13; the CLI cases are in
tests/faults/)."""

from __future__ import annotations

import pytest
from rich.console import Console

TRICKY = "aw[v2]/r.toml: [grid] unknown key 'epochz' :smile: [bold]x[/bold] [/]"


def test_error_and_warning_lines_are_literal(capsys: pytest.CaptureFixture[str]) -> None:
    from abawfeat.cli._common import error_line, warn_line
    from abawfeat.utils.progress import loud_warning, warn

    error_line(TRICKY)
    warn_line(TRICKY)
    warn(TRICKY)
    loud_warning(TRICKY)
    err = capsys.readouterr().err
    assert f"error: {TRICKY}\n" in err
    assert err.count(f"warning: {TRICKY}\n") == 2
    assert f"\n{TRICKY}\n" in err  # the loud warning's text, between its rules


def test_error_label_keeps_its_style() -> None:
    from abawfeat.cli._common import labelled

    text = labelled("error:", "bold red", TRICKY)
    assert text.plain == f"error: {TRICKY}" and text.spans[0].style == "bold red"


def test_progress_descriptions_are_literal() -> None:
    from abawfeat.utils.progress import make_progress

    progress = make_progress("frames", disable=False)
    progress.add_task(TRICKY, total=3)
    console = Console(record=True, width=400, markup=False)
    console.print(progress.get_renderable())
    assert TRICKY in console.export_text()


def test_the_clis_consoles_do_not_interpret_strings() -> None:
    from abawfeat.cli._common import console, err_console
    from abawfeat.utils import progress

    for c in (console, err_console, progress.err_console):
        with c.capture() as captured:
            c.print(TRICKY, soft_wrap=True)
        assert captured.get() == TRICKY + "\n"


@pytest.mark.parametrize(
    ("argv", "names"),
    [(["train-head", "--bogus[x]"], ["abawfeat train-head", "--bogus[x]"]),
     (["nosuch"], ["nosuch"]),
     (["train-head", "--epochs", "abc"], ["--epochs", "integer"]),
     (["predict"], ["abawfeat predict", "run_dir"])],
)
def test_a_mistyped_command_line_is_one_line(argv: list[str], names: list[str]) -> None:
    # The real entry point (typer's CliRunner would bypass main()), so this is what a user sees.
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "abawfeat", *argv], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert all(n in lines[0] for n in names) and "--help" in lines[0]
