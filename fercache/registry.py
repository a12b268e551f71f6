"""A name -> entry registry (adapters, encoders, heads, pipeline steps): adding one is one decorated function,
with everything the rest of fercache needs to know of it declared in that decoration."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from .errors import UnknownNameError

F = TypeVar("F", bound=Callable)


class Registry(dict):
    """A dict of named entries with a `register(name, **declared)` decorator and a lookup that names the
    alternatives. Without `entry` an entry is the decorated function; with it, `entry(name, fn, **declared)`
    (a spec dataclass that carries what the registration declares)."""

    def __init__(self, kind: str, entry: Callable[..., Any] | None = None):
        super().__init__()
        self.kind, self.entry = kind, entry

    def register(self, name: str, **declared) -> Callable[[F], F]:
        """Decorator: register `fn` under `name`."""
        if declared and self.entry is None:
            raise TypeError(f"a {self.kind} registers a function alone; got {sorted(declared)}")

        def wrap(fn: F) -> F:
            self[name] = self.entry(name, fn, **declared) if self.entry else fn
            return fn
        return wrap

    def lookup(self, name: str) -> Any:
        """The entry for `name`, or UnknownNameError listing the known names."""
        if name not in self:
            raise UnknownNameError(self.kind, name, self)
        return self[name]
