"""A name -> factory registry (adapters, encoders, heads, pipeline steps): adding one is one decorated function."""

from __future__ import annotations

from typing import Callable, TypeVar

from .errors import UnknownNameError

F = TypeVar("F", bound=Callable)


class Registry(dict):
    """A dict of named factories with a `register(name)` decorator and a lookup that names the alternatives."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register `fn` under `name`."""
        def wrap(fn: F) -> F:
            self[name] = fn
            return fn
        return wrap

    def lookup(self, name: str) -> Callable:
        """The factory for `name`, or UnknownNameError listing the known names."""
        if name not in self:
            raise UnknownNameError(self.kind, name, self)
        return self[name]
