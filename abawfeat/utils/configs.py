"""Dataclass configs saved as JSON with every artefact, so any artefact can be rebuilt without the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) dataclass; tuples become lists, paths strings."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return convert(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a dataclass from ``to_dict`` output; unknown keys are ignored (newer files stay readable),
    nested dataclass fields are rebuilt, lists become tuples where the default is a tuple."""
    kwargs: dict[str, Any] = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name, field in hints.items():
        if name not in data:
            continue
        value = data[name]
        ftype = field.type if not isinstance(field.type, str) else None
        default = (
            field.default
            if field.default is not dataclasses.MISSING
            else (field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        )
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        elif ftype is not None and dataclasses.is_dataclass(ftype) and isinstance(value, dict):
            value = from_dict(ftype, value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into plain numbers and lists (metrics, states)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays and scalars
        return value.tolist()
    return value


def read_json(path: str | Path) -> Any:
    with open(path) as fh:
        return json.load(fh)
