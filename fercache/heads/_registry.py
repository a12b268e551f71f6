"""Head registry and the interface every head implements."""

from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, did_you_mean
from ..registry import Registry


class Head(nn.Module):
    """A head maps a batch of cached features to logits.

    `forward(x, z=None)` returns logits [B, C] (z: optional mask-source features);
    `loss(batch)` returns the training loss for a batch dict with `x`, `y` (and `z`).
    `recipe` holds the published training recipe, which the trainer uses unless overridden.
    """

    task = "expr"  # or "au" (multi-label)
    level = "frame"  # or "clip": x is [B, frames, D] with batch["lengths"] (see data.clip_level)
    recipe: dict = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "epochs": 30, "batch_size": 256,
                    "scheduler": None, "sam_rho": 0.0}
    trainable = True

    def logits(self, batch: dict) -> torch.Tensor:
        """Logits for a batch dict (clip-level heads also read `lengths`)."""
        return self(batch["x"], batch.get("z"))

    def loss(self, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(self.logits(batch), batch["y"])


def feature_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-feature std of training features [N, D] for a frozen standardiser, floored at 1% of the median std.
    A feature (almost) constant in training, such as a ReLU channel dead on every training image, was divided by
    ~1e-6, so its first non-zero value at test time became a logit of thousands (MobileNetV2 at 64 px on CK+48:
    validation NLL 324 instead of 1.2, accuracy -4 points). The floor bounds any feature at 100x a typical one."""
    sd = x.std(0)
    return sd.clamp_min(max(0.01 * float(sd.median()), 1e-6))


@dataclass
class HeadContext:
    """What a head is built for: feature sizes, the label set, and the store it reads."""

    in_dim: int
    out_dim: int
    class_names: list[str]
    z_dim: int | None = None  # features of a second (mask-source) store, if any
    store_meta: dict = field(default_factory=dict)
    class_counts: list[int] | None = None  # training rows per class (expression tasks), when training
    restore: bool = False  # True when loading a saved head: weights come from head.pt, not from a build step


HEADS = Registry("head")
#: Register a head factory `fn(ctx, *, **hyperparameters)`: keyword-only, so a sweep can pass a dict.
register_head = HEADS.register


def hyperparameters(name: str) -> dict:
    """A head's hyperparameters and their defaults, read from its factory's keyword-only parameters."""
    params = inspect.signature(HEADS.lookup(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


def describe(name: str) -> dict:
    """What `fercache heads` prints: the head's summary, task, level, hyperparameters and published recipe."""
    factory = HEADS.lookup(name)
    cls = typing.get_type_hints(factory).get("return", Head)  # each factory is annotated with its Head class
    return {"name": name, "summary": (factory.__doc__ or cls.__doc__ or "").strip().splitlines()[0],
            "task": cls.task, "level": cls.level, "hp": hyperparameters(name), "recipe": dict(cls.recipe)}


def _matches(value, hint) -> bool:
    """Does `value` (as --hp parses it: JSON or a Python literal) fit the factory's annotation?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):  # numbers are non-negative and finite for every head so far
        ok = isinstance(value, int) if hint is int else isinstance(value, (int, float))
        return ok and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return isinstance(value, hint) if isinstance(hint, type) else True


_NAMES = {int: "a whole number >= 0", float: "a number >= 0", bool: "true or false", str: "a string",
          type(None): "null"}


def _hint_name(hint) -> str:
    """`int | None` -> "a whole number >= 0 or null": what the error message asks for."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_hint_name(a) for a in args)
    if origin in (list, tuple):
        return f"a list of ({_hint_name(args[0])})"
    return _NAMES.get(hint, str(hint))


def check_hyperparameters(name: str, hp: dict) -> None:
    """Refuse, before any work, a name the head does not take or a value its factory's annotation rules out
    (use_sigmoid="yes" would otherwise be truthy, hidden="wide" fail inside torch)."""
    known = hyperparameters(name)
    unknown = sorted(set(hp) - set(known))
    if unknown:
        hints = [f"{k!r}{did_you_mean(k, known)}" for k in unknown]
        raise ConfigError(f"head {name!r} has no hyperparameter {', '.join(hints)}; "
                          f"it takes: {', '.join(f'{k}={v!r}' for k, v in known.items())}")
    hints = typing.get_type_hints(HEADS.lookup(name))
    for key, value in hp.items():
        if key in hints and not _matches(value, hints[key]):
            raise ConfigError(f"head {name!r}: {key}={value!r}; give {_hint_name(hints[key])} (default {known[key]!r})")


def build_head(name: str, ctx: HeadContext, **hp) -> Head:
    """Instantiate a registered head; unknown hyperparameters are an error, not silently ignored."""
    factory = HEADS.lookup(name)
    check_hyperparameters(name, hp)
    try:
        head = factory(ctx, **hp)
    except (TypeError, ValueError) as e:  # a value of the wrong type or range, e.g. --hp hidden=wide
        raise ConfigError(f"head {name!r} with {hp}: {e}") from None
    head.name = name
    return head
