"""docs/performance.md is written in sections, one per benchmark script, each between its own markers."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def write_section(name: str, text: str, doc: Path = DOC) -> None:
    """Replace what stands between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` with ``text``; the rest
    of the file (prose, other sections) is left as it is. Missing markers are an error, not an append."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    content = doc.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(content):
        raise SystemExit(f"{doc}: markers {begin} ... {end} not found")
    doc.write_text(pattern.sub(lambda _: f"{begin}\n{text.rstrip(chr(10))}\n{end}", content))
