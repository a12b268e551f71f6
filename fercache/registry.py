"""A name -> entry registry (adapters, encoders, heads, pipeline steps): adding one is one decorated function,
with everything the rest of fercache needs to know of it declared in that decoration."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, TypeVar

from .errors import ConfigError, UnknownNameError

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


#: Modules of the user's own to import before a command runs (comma-separated), e.g. `FERCACHE_PLUGINS=my_heads`:
#: their decorators register heads, encoders, adapters or steps the command line and pipelines then use.
PLUGINS_ENV = "FERCACHE_PLUGINS"


def load_plugins(names: str | None = None) -> list[str]:
    """Import each module named in `names` (default: $FERCACHE_PLUGINS); the names imported."""
    names = os.environ.get(PLUGINS_ENV, "") if names is None else names
    if names.strip() and os.getcwd() not in sys.path:  # the console script does not search the current folder
        sys.path.insert(0, os.getcwd())
    loaded = []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"{PLUGINS_ENV}: cannot import {name!r} ({e}); name a module on the Python path, "
                              "e.g. my_heads for my_heads.py in the current folder") from None
        loaded.append(name)
    return loaded
