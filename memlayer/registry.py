"""One registry for every extension chosen by name: selectors, eviction policies, context
strategies, embedders, tiers.

Part of the ground. Each kind of extension keeps one `Registry`; `register` adds a factory
under a name, `create` builds one by name, `names` lists them, and an unknown name gets the
same `InvalidInputError` everywhere, naming the config field and the choices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from memlayer.errors import InvalidInputError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[T]):
    """Factories of one kind of extension, by name; `field` is the config field that names one."""

    def __init__(self, field: str) -> None:
        self.field = field
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: make the decorated class or function the factory called `name`."""

        def add(factory: F) -> F:
            if name in self._factories:
                raise InvalidInputError(self.field, f"{name!r} is already registered", name)
            self._factories[name] = factory
            return factory

        return add

    def create(self, name: str, /, **options: Any) -> T:
        """A new instance of the extension registered as `name`."""
        factory = self._factories.get(name) if isinstance(name, str) else None
        if factory is None:
            raise InvalidInputError(self.field, f"must be one of {', '.join(self.names())}", name)
        return factory(**options)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
