"""What every command shares: turning AbawfeatError into one line and an exit code, and the consoles."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from abawfeat.errors import AbawfeatError

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)


def guarded(fn: F) -> F:
    """Report user-caused errors as ``error: <file>:<line>: <problem>`` on stderr, exit with their code
    (2), and never print a traceback for them. Programming errors still raise with a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AbawfeatError as exc:
            err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/bold red]: completed work is kept; re-run to resume")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """``key=value`` options (repeatable) as a dict; values read as JSON where they parse (numbers, true,
    false, lists), else kept as text. The library checks names and types against the component's config."""
    import json

    from abawfeat.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        for part in item.split(","):
            key, sep, text = part.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"{flag} {part!r}: expected key=value")
            try:
                value: Any = json.loads(text)
            except ValueError:
                value = text
            out[key] = value
    return out
