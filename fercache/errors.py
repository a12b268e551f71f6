"""Typed errors. Every message says what went wrong and what to do about it."""

import difflib


class FercacheError(Exception):
    """Base class: the CLI prints these as `error: ...` and exits 2."""


class ManifestError(FercacheError):
    """A manifest or a dataset's native annotation file is malformed."""


class StoreError(FercacheError):
    """A feature store is missing, incomplete, or built from other inputs."""


class EncoderError(FercacheError):
    """An encoder or its weights cannot be loaded."""


class UnknownNameError(FercacheError):
    """A registry lookup (encoder, head, adapter, label) found no such name."""

    def __init__(self, kind: str, name: str, known):
        close = difflib.get_close_matches(str(name), [str(k) for k in known], 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        super().__init__(f"unknown {kind} {name!r}{hint}; known: {', '.join(sorted(known))}")


class StaleRunError(FercacheError):
    """A trained run no longer matches its data: the store was re-extracted or the manifest's labels changed."""


class ConfigError(FercacheError):
    """A pipeline file or head configuration is invalid."""
