"""Linear probe on raw (standardised) or L2-normalised features: the standard frozen-feature baseline."""

from __future__ import annotations

import torch
from torch import nn

from ._registry import BASE_RECIPE, Head, HeadContext, feature_scale, register_head

LINEAR_RECIPE = {**BASE_RECIPE, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "epochs": 30, "batch_size": 256,
                 "scheduler": "cosine"}


class LinearProbe(Head):
    def __init__(self, in_dim: int, out_dim: int, normalize: bool):
        super().__init__()
        self.normalize = normalize
        # Raw features differ in scale across encoders; a frozen standardiser makes one lr work for all.
        self.register_buffer("mu", torch.zeros(in_dim))
        self.register_buffer("sigma", torch.ones(in_dim))
        self.fc = nn.Linear(in_dim, out_dim)

    def fit_stats(self, batch: dict) -> None:
        """Set the standardiser from the training features (called once by the trainer)."""
        x = batch["x"]
        if not self.normalize:
            self.mu.copy_(x.mean(0))
            self.sigma.copy_(feature_scale(x))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        x = nn.functional.normalize(x, dim=-1) if self.normalize else (x - self.mu) / self.sigma
        return self.fc(x)


@register_head("linear", recipe=LINEAR_RECIPE, stack=())
def linear(ctx: HeadContext, *, normalize: bool = False) -> LinearProbe:
    """Linear probe; `normalize=True` L2-normalises inputs (else standardises with train statistics)."""
    return LinearProbe(ctx.in_dim, ctx.out_dim, normalize)
