"""The one registry class: encoders, trunks, tasks and heads are each a ``Registry`` of named entries.

Like timm's model registry, an entry is added with a decorator in the file that defines it, so a new
encoder, trunk or task is one new file plus its import; tests are parametrised over ``registry.names()``, so
the new entry is tested without editing any test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from abawfeat.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` names them in messages: "encoder", "trunk", ...)."""

    def __init__(self, kind: str, check: Callable[[str, T], None] | None = None) -> None:
        self.kind = kind
        self._check = check
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; registering a different entry twice under one name is a bug."""
        if not name or name != name.strip():
            raise ValueError(f"{self.kind} name {name!r} must be a non-empty word")
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if self._check is not None:
            self._check(name, entry)
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of ``add``; also sets ``entry.name`` on classes that declare a ``name``."""

        def decorate(entry: T) -> T:
            self.add(name, entry)
            if isinstance(entry, type) and hasattr(entry, "name"):
                entry.name = name  # type: ignore[attr-defined]
            return entry

        return decorate

    def get(self, name: str) -> T:
        """The entry, or a ConfigError naming the choices."""
        try:
            return self._entries[name]
        except KeyError:
            choices = ", ".join(self.names())
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {choices}") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["Registry"]
