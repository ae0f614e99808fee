"""Named variants (proxy recipes, selection policies, schedules, attention modes, example
pruners) live in small registries: adding one is one decorated function, and an unknown name is
an error that lists the known ones."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> value table with a decorator to fill it and a clear error for a wrong name."""

    def __init__(self, kind: str, names: tuple[str, ...] | None = None) -> None:
        self.kind = kind  # what the names are, for messages: "selection policy", ...
        self.declared = names  # the names it may hold, listed where importing is cheap (CLI choices)
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@POLICIES.register("hard")` adds the function (or class) under `name`."""
        def add(value: T) -> T:
            self.add(name, value)
            return value
        return add

    def add(self, name: str, value: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if self.declared is not None and name not in self.declared:
            raise ValueError(f"{self.kind} {name!r} is not among the declared names {self.declared}")
        self._items[name] = value

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._items.get(name, default)
