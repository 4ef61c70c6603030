"""User-facing errors.

Anything a user can cause (a bad file, a wrong option, a mismatched checkpoint) is raised as an
``AbawfeatError`` whose message is one self-contained line naming the file, the place and the problem. The CLI
prints that line and exits with ``exit_code``; it never shows a traceback for these.
"""

from __future__ import annotations

from pathlib import Path


class AbawfeatError(Exception):
    """An error caused by input or configuration, reported as one line."""

    exit_code = 2


class DataError(AbawfeatError):
    """A malformed data file: names the file and, where known, the 1-based line number."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path = Path(path)
        self.line = line
        self.problem = problem


class ConfigError(AbawfeatError):
    """An invalid option or combination of options."""


class CheckpointError(AbawfeatError):
    """A checkpoint or weights file that cannot be used (wrong architecture, format, provenance)."""


class CacheError(AbawfeatError):
    """A feature cache that is missing, locked, incomplete or does not match what is asked of it."""


class DiskFullError(AbawfeatError):
    """The device filled up while writing an artefact; the message names the file and what is kept."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None  # the file that was being written


class RunError(AbawfeatError):
    """A run directory that is incomplete, belongs to another run, or would be overwritten."""
