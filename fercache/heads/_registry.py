"""Head registry and the interface every head implements."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
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


def build_head(name: str, ctx: HeadContext, **hp) -> Head:
    """Instantiate a registered head; unknown hyperparameters are an error, not silently ignored."""
    factory = HEADS.lookup(name)
    try:
        head = factory(ctx, **hp)
    except TypeError as e:
        raise ConfigError(f"head {name!r}: {e}") from None
    head.name = name
    return head
