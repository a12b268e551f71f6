"""Heads trained on cached features. Importing this package registers every head module."""

from . import au, cvar_mlp, linear, logreg, mask, temporal, zeroshot  # noqa: F401  (registration side effect)
from ._registry import HEADS, Head, HeadContext, HeadSpec, Streams, build_head, check_hyperparameters, register_head

__all__ = ["HEADS", "Head", "HeadContext", "HeadSpec", "Streams", "build_head", "check_hyperparameters",
           "register_head"]
