"""One registry per concept (strategies, methods, quantizers, samplers, flavors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

# Set by the package entry (vidtrain/__init__.py): imports the composition root (vidtrain/plugins.py)
# the first time a registry is asked for a name it does not hold, so a registry never imports its
# own plugins and `import vidtrain` stays light.
_plugin_hooks: list[Callable[[], None]] = []


def add_plugin_hook(hook: Callable[[], None]) -> None:
    _plugin_hooks.append(hook)


def load_plugins() -> None:
    while _plugin_hooks:
        _plugin_hooks.pop(0)()


class Registry(Generic[T]):
    """A name -> object table; unknown or duplicate names are clear errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj

    def get(self, name: str) -> T:
        if name not in self._items:
            load_plugins()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._items
