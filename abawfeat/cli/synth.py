"""CLI commands for this area (see abawfeat/cli/__init__.py)."""

from __future__ import annotations

from abawfeat.cli import app  # noqa: F401
