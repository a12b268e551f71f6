"""Two heads that live only in the tests, registered from outside the package as a user's own head would be:
an AU head and a clip-level head. Nothing else in fercache names them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fercache.heads import Head, HeadContext, register_head
from fercache.heads._registry import BASE_RECIPE

QUICK = {**BASE_RECIPE, "epochs": 3, "batch_size": 8}


class AUProbe(Head):
    def __init__(self, in_dim: int, n_aus: int):
        super().__init__()
        self.register_buffer("mu", torch.zeros(in_dim))
        self.fc = nn.Linear(in_dim, n_aus)

    def fit_stats(self, batch: dict) -> None:
        self.mu.copy_(batch["x"].float().mean(0))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(x.float() - self.mu)

    def loss(self, batch: dict) -> torch.Tensor:
        y = batch["y"]
        known = (y >= 0).float()
        bce = F.binary_cross_entropy_with_logits(self(batch["x"]), y.clamp(min=0).float(), reduction="none")
        return (bce * known).sum() / known.sum().clamp(min=1)


@register_head("test_au_probe", task="au", recipe=QUICK)
def au_probe(ctx: HeadContext, *, hidden: int = 0) -> AUProbe:
    """A linear AU detector (tests only)."""
    return AUProbe(ctx.in_dim, ctx.out_dim)


class ClipMean(Head):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None, lengths: torch.Tensor | None = None):
        if lengths is None:
            lengths = torch.full((len(x),), x.shape[1], device=x.device)
        valid = (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]).float()[..., None]
        return self.fc((x.float() * valid).sum(1) / valid.sum(1).clamp(min=1))

    def logits(self, batch: dict) -> torch.Tensor:
        return self(batch["x"], None, batch.get("lengths"))


@register_head("test_clip_mean", level="clip", recipe={**QUICK, "max_frames": 8})
def clip_mean(ctx: HeadContext, *, scale: float = 1.0) -> ClipMean:
    """A linear layer on the mean of a clip's frames (tests only)."""
    return ClipMean(ctx.in_dim, ctx.out_dim)
