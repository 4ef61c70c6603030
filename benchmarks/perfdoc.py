"""What the benchmark scripts share: docs/performance.md written in sections, one per script, each between its
own markers, and measurements run each in a fresh interpreter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def measure_in_child(script: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``script --child <spec as JSON>`` in a fresh interpreter, so that the measurement's peak memory and
    torch state are its own, with no progress bars and no network; return the JSON of its last output line.
    A failed child stops the benchmark with the end of its stderr."""
    env = dict(os.environ, ABAWFEAT_NO_PROGRESS="1", ABAWFEAT_OFFLINE="1")
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"measurement {spec['label']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
