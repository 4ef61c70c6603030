"""Published Aff-Wild2 results kept as package data (``published.json``), each with its source.

Reports show them as context rows next to our own runs. They are data, not code, so that correcting a number
or adding a system is a one-line change reviewed like any other, and every number carries its citation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

from abawfeat.errors import DataError

# The four Table 3 columns of the seed paper, in its order; the keys match metrics.json.
TABLE3_COLUMNS: tuple[str, ...] = ("ccc_va", "f1_expr", "f1_au", "f1_au_opt")
# development: a team's own development split (train+val repartitioned), as some report: not the official
# validation split, so not directly comparable with it either.
SPLITS: tuple[str, ...] = ("validation", "development", "test")
_RESOURCE = "published.json"


@dataclass(frozen=True)
class PublishedResult:
    """One published system: its Table 3 numbers (None = not reported), split and citation."""

    id: str
    label: str
    split: str
    ccc_va: float | None
    f1_expr: float | None
    f1_au: float | None
    f1_au_opt: float | None
    source: str
    note: str = ""

    def value(self, column: str) -> float | None:
        return getattr(self, column)


def _parse(entry: Any, where: str) -> PublishedResult:
    if not isinstance(entry, dict):
        raise DataError(where, "each result must be an object")
    for key in ("id", "label", "split", "source"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise DataError(where, f"result needs a non-empty string {key!r}")
    if entry["split"] not in SPLITS:
        raise DataError(where, f"{entry['id']}: split must be one of {SPLITS}, got {entry['split']!r}")
    values: dict[str, float | None] = {}
    for column in TABLE3_COLUMNS:
        value = entry.get(column)
        # bool is an int subclass; a stray true/false must not pass as 1/0.
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DataError(where, f"{entry['id']}: {column} must be a number or null, got {value!r}")
        if value is not None and not (math.isfinite(value) and -1.0 <= value <= 1.0):
            raise DataError(where, f"{entry['id']}: {column} = {value} is outside [-1, 1]")
        values[column] = None if value is None else float(value)
    return PublishedResult(
        id=entry["id"], label=entry["label"], split=entry["split"], source=entry["source"],
        note=str(entry.get("note") or ""), **values,
    )


def load_published() -> list[PublishedResult]:
    """The published results in file order (the order reports show them)."""
    where = f"abawfeat/reference/{_RESOURCE}"
    text = resources.files(__name__).joinpath(_RESOURCE).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(where, f"invalid JSON: {exc.msg}", exc.lineno) from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise DataError(where, "expected an object with a 'results' list")
    parsed = [_parse(entry, where) for entry in results]
    ids = [r.id for r in parsed]
    if len(set(ids)) != len(ids):
        raise DataError(where, "result ids must be unique")
    return parsed


__all__ = ["TABLE3_COLUMNS", "PublishedResult", "load_published"]
