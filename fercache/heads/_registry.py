"""Head registry and the interface every head implements."""

from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError, did_you_mean
from ..registry import Registry

#: The training recipe a head declares nothing else for.
BASE_RECIPE = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "epochs": 30, "batch_size": 256,
               "scheduler": None, "sam_rho": 0.0}

@dataclass(frozen=True)
class Streams:
    """Where a training loss draws its randomness: torch's global generators (None, the default), or generators of
    its own. The stacked trainer (`fercache.stacked`) gives each configuration of a stack the streams its run alone
    would have drawn from, so a configuration trains the same in a stack as alone."""

    cpu: torch.Generator | None = None
    device: torch.Generator | None = None  # for draws made on an accelerator

    def on(self, t: torch.Tensor) -> torch.Generator | None:
        """The generator for a draw made on `t`'s device."""
        return self.cpu if t.device.type == "cpu" else self.device


TASKS = ("expr", "au")  # expression: one class per row; au: multi-label, one binary output per AU
LEVELS = ("frame", "clip")  # clip: x is [B, frames, D] with batch["lengths"] (see data.clip_level)


class Head(nn.Module):
    """A head maps a batch of cached features to logits.

    `forward(x, z=None)` returns logits [B, C] (z: optional mask-source features);
    `loss(batch)` returns the training loss for a batch dict with `x`, `y` (and `z`).
    The optional hooks below have defaults that do nothing special; a head overrides the ones it needs.
    What the rest of fercache knows of a head (task, level, recipe, ...) is its `HeadSpec`, set by `build_head`.
    """

    spec: HeadSpec

    def __init__(self):
        super().__init__()
        #: Hyperparameters the factory chose from the data ("auto" settings), saved with the run so that
        #: a restore rebuilds this same head.
        self.resolved_hp: dict = {}

    def logits(self, batch: dict) -> torch.Tensor:
        """Logits for a batch dict (clip-level heads also read `lengths`)."""
        return self(batch["x"], batch.get("z"))

    def loss(self, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(self.logits(batch), batch["y"])

    def noise(self, x: torch.Tensor, streams: Streams) -> dict[str, torch.Tensor]:
        """The random tensors one training `loss` call on the batch `x` draws (dropout masks, drop patterns), drawn
        from `streams` in the order the loss draws them. `loss` reads them from `batch["noise"]` when given, and
        draws them here itself otherwise: a loss that reads its noise from the batch can be vmapped over a stack
        of configurations. A head whose loss is not random draws nothing."""
        return {}

    def fit_stats(self, batch: dict) -> None:
        """Called once with the whole training split before training: frozen statistics (a standardiser)."""

    def solve(self, train: dict, val_score: Callable[[nn.Module], float], recipe: dict) -> dict | None:
        """Fit without the epoch loop (closed form, full batch), choosing on `val_score`; return a report of the
        choice. None: the head is trained by epochs."""
        return None

    def param_groups(self, recipe: dict) -> list[dict]:
        """The optimiser's parameter groups: one at the recipe's lr unless a head trains parts at other rates."""
        return [{"params": list(self.parameters())}]


def feature_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-feature std of training features [N, D] for a frozen standardiser, floored at 1% of the median std.
    A feature constant in training (a ReLU channel dead on every training image) would otherwise be divided by
    ~1e-6, and its first non-zero value at test time become a logit of thousands. The floor bounds any feature
    at 100x a typical one."""
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


@dataclass(frozen=True)
class HeadSpec:
    """Everything fercache knows of a head, declared where it is registered (`register_head`)."""

    name: str
    build: Callable[..., Head]  # factory(ctx, *, **hyperparameters), keyword-only so a sweep can pass a dict
    task: str = "expr"
    level: str = "frame"
    recipe: dict = field(default_factory=lambda: dict(BASE_RECIPE))  # the published recipe, trained unless overridden
    feature_output: str | None = None  # the store output it reads unless told; None: the store's default
    text_tower: bool = False  # needs the store's text tower: checked before any feature is read
    trainable: bool = True  # False: nothing is trained by epochs (zero-shot; a head that `solve`s)
    #: None: each run trains alone. A tuple: configurations of this head train as one stack (`fercache.stacked`:
    #: a vmapped loss, randomness only through `Head.noise`, one parameter group); it names the hyperparameters
    #: that may differ within a stack (read from tensors or only when drawing noise). Configurations that differ
    #: in any other hyperparameter train in separate stacks.
    stack: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.task not in TASKS or self.level not in LEVELS:
            raise ValueError(f"head {self.name!r}: task is one of {TASKS}, level one of {LEVELS}")

    @property
    def summary(self) -> str:
        return (self.build.__doc__ or "").strip().splitlines()[0]

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The head's hyperparameters and their defaults: its factory's keyword-only parameters."""
        params = inspect.signature(self.build).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}

    def to_dict(self) -> dict:
        """What `fercache heads` prints: summary, task, level, hyperparameters, published recipe, and whether its
        runs train many at once (`stacks`: the hyperparameters free within a stack; None: one run at a time)."""
        return {"name": self.name, "summary": self.summary, "task": self.task, "level": self.level,
                "hp": self.hyperparameters, "recipe": dict(self.recipe),
                "stacks": None if self.stack is None else list(self.stack)}


HEADS = Registry("head", entry=HeadSpec)
#: `@register_head(name, task=..., level=..., recipe=..., ...)` over a factory `fn(ctx, *, **hyperparameters)`.
register_head = HEADS.register


def hyperparameters(name: str) -> dict:
    """A head's hyperparameters and their defaults."""
    return HEADS.lookup(name).hyperparameters


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
    (use_sigmoid="yes" would be truthy, hidden="wide" fail inside torch)."""
    spec = HEADS.lookup(name)
    known = spec.hyperparameters
    unknown = sorted(set(hp) - set(known))
    if unknown:
        hints = [f"{k!r}{did_you_mean(k, known)}" for k in unknown]
        raise ConfigError(f"head {name!r} has no hyperparameter {', '.join(hints)}; "
                          f"it takes: {', '.join(f'{k}={v!r}' for k, v in known.items())}")
    hints = typing.get_type_hints(spec.build)
    for key, value in hp.items():
        if key in hints and not _matches(value, hints[key]):
            raise ConfigError(f"head {name!r}: {key}={value!r}; give {_hint_name(hints[key])} (default {known[key]!r})")


def build_head(name: str, ctx: HeadContext, **hp) -> Head:
    """Instantiate a registered head; unknown hyperparameters are an error, not silently ignored."""
    spec = HEADS.lookup(name)
    check_hyperparameters(name, hp)
    try:
        head = spec.build(ctx, **hp)
    except (TypeError, ValueError) as e:  # a value of the wrong type or range, e.g. --hp hidden=wide
        raise ConfigError(f"head {name!r} with {hp}: {e}") from None
    head.name, head.spec = name, spec
    return head
