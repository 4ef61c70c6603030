"""What every command shares: turning AbawfeatError into one line and an exit code, and the consoles.

User text (paths, video names, recipe sections, messages that quote them) is printed literally. The consoles
therefore never interpret rich markup, emoji codes or highlighting in a string: a folder named ``aw[v2]`` or
a TOML section ``[cells]`` would otherwise vanish from the message. Style is given explicitly, with
``rich.text.Text`` objects or ``style=``, never by markup inside a string.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from abawfeat.errors import AbawfeatError

F = TypeVar("F", bound=Callable[..., Any])


def literal_console(stderr: bool = False) -> Console:
    """A console that prints strings as they are: no markup, no emoji codes, no highlighting."""
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False)


console = literal_console()
err_console = literal_console(stderr=True)


def labelled(label: str, style: str, message: str) -> Text:
    """``label`` in ``style``, a space, then ``message`` verbatim."""
    return Text.assemble((label, style), " ", message)


def error_line(message: str, label: str = "error:") -> None:
    """One red-labelled line on stderr, the message verbatim."""
    err_console.print(labelled(label, "bold red", message), soft_wrap=True)


def warn_line(message: str) -> None:
    """One yellow-labelled warning line on stderr, the message verbatim."""
    err_console.print(labelled("warning:", "yellow", message), soft_wrap=True)


def guarded(fn: F) -> F:
    """Report user-caused errors as ``error: <file>:<line>: <problem>`` on stderr, exit with their code
    (2), and never print a traceback for them. Programming errors still raise with a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AbawfeatError as exc:
            error_line(str(exc))
            raise typer.Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            error_line("completed work is kept; re-run to resume", label="interrupted:")
            raise typer.Exit(code=130) from None
        except OSError as exc:
            # What the operating system refused (a name too long, a read-only folder, a path that is not
            # a folder, ...): the user's environment, not a bug, so one line naming the file, like any
            # other input problem. Every artefact is written to a temporary name and renamed, so what
            # existed before is intact whatever the call that failed.
            error_line(os_error_line(exc))
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


_OS_PROBLEMS = {
    errno.ENAMETOOLONG: "a name in this path is longer than the file system allows ({longest} bytes, most "
                        "allow 255); choose a shorter name",
    errno.EACCES: "permission denied; nothing was changed there (check the folder's permissions)",
    errno.EPERM: "operation not permitted; nothing was changed there",
    errno.EROFS: "the file system is read-only; nothing was changed there",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ELOOP: "too many levels of symbolic links (a link that points to itself?)",
    errno.ENOENT: "no such file or folder",
    errno.EXDEV: "cannot be moved across file systems",
}


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: the file (or files) it names, and what the error means for the user."""
    from abawfeat.utils.io import is_disk_full

    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    where = " -> ".join(names) or "a file"
    if is_disk_full(exc):
        return f"{where}: no space left on the device; nothing already written was replaced"
    problem = _OS_PROBLEMS.get(exc.errno or 0)
    if problem is None:
        problem = exc.strerror or str(exc) or type(exc).__name__
    longest = max((len(part.encode()) for n in names for part in n.split("/")), default=0)
    return f"{where}: {problem.format(longest=longest)}"


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
