"""fercache: facial expression / action-unit recognition on frozen encoder features cached in Zarr stores.

From Python (docs/python.md): `fercache.load`, `fit`, `evaluate`, `cross` and `sweep`, imported on first use so
that `import fercache` stays light (torch loads with the first of them).
"""

__version__ = "0.7.0"

__all__ = ["__version__", "load", "fit", "evaluate", "cross", "sweep", "Features", "FittedHead", "Evaluation"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'fercache' has no attribute {name!r}")
