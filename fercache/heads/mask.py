"""Feature-mask head (METHODS.md §1, "CAFE"), cached variant.

The published mask network is a trainable ResNet-18 over pixels; a cache
cannot hold that, so here the mask logits come from an MLP over cached
features `z` (the same store by default, or a second store of the same
manifest). Everything after the mask follows the paper:

    m = sigmoid(g(z)),  h = m * f,  o = W h                     (CE on o; only o at test time)
    groups: C contiguous groups of k = D // C channels (the D - C*k leftover channels are in no group)
    s_c = max over group c of (h * drop)                         (L_sep = CE(s, y))
    drop: `n_drop` random zeros per group, one pattern per batch (the last group draws from k + leftover)
    L_div = 1 - mean_{batch, groups}(max over group of h) / k
    L = CE(o, y) + 1.5 L_sep + 5 L_div
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import Head, HeadContext, register_head


def group_size(dim: int, classes: int) -> int:
    """k = D // C (512 channels, 7 classes -> 73)."""
    return dim // classes


def group_max(h: torch.Tensor, classes: int) -> torch.Tensor:
    """[B, D] -> [B, C]: max over each contiguous group of k channels; leftover channels are ignored."""
    k = group_size(h.shape[-1], classes)
    return h[:, : classes * k].reshape(h.shape[0], classes, k).amax(dim=-1)


def drop_pattern(dim: int, classes: int, n_drop: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A [D] 0/1 mask with `n_drop` zeros in each group; the last group spans k + (D - C*k) channels."""
    k = group_size(dim, classes)
    parts = []
    for c in range(classes):
        width = k if c < classes - 1 else dim - (classes - 1) * k
        keep = torch.ones(width)
        keep[torch.randperm(width, generator=generator)[:n_drop]] = 0
        parts.append(keep)
    return torch.cat(parts)


class MaskHead(Head):
    recipe = {"optimizer": "adam", "lr": 2e-4, "weight_decay": 1e-4, "epochs": 60, "batch_size": 32,
              "scheduler": "exponential", "gamma": 0.9, "sam_rho": 0.0}  # paper seed 3407: pass --seeds 3407

    def __init__(self, in_dim: int, out_dim: int, z_dim: int, hidden: int, n_drop: int, use_sigmoid: bool,
                 w_sep: float, w_div: float):
        super().__init__()
        self.classes, self.n_drop, self.use_sigmoid, self.w_sep, self.w_div = out_dim, n_drop, use_sigmoid, w_sep, w_div
        self.mask_net = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, in_dim))
        self.fc = nn.Linear(in_dim, out_dim)

    def masked(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        g = self.mask_net(x if z is None else z)
        m = torch.sigmoid(g) if self.use_sigmoid else g
        return m * x

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.masked(x, z))

    def loss_terms(self, batch: dict) -> dict[str, torch.Tensor]:
        """The three published terms, for tests and logging."""
        x, y = batch["x"], batch["y"]
        h = self.masked(x, batch.get("z"))
        drop = drop_pattern(x.shape[-1], self.classes, self.n_drop).to(x.device)
        k = group_size(x.shape[-1], self.classes)
        return {
            "ce": F.cross_entropy(self.fc(h), y),
            "sep": F.cross_entropy(group_max(h * drop, self.classes), y),
            "div": 1.0 - group_max(h, self.classes).mean() / k,
        }

    def loss(self, batch: dict) -> torch.Tensor:
        t = self.loss_terms(batch)
        return t["ce"] + self.w_sep * t["sep"] + self.w_div * t["div"]


@register_head("mask")
def mask(ctx: HeadContext, *, hidden: int = 512, n_drop: int | None = None, use_sigmoid: bool = True,
         w_sep: float = 1.5, w_div: float = 5.0) -> MaskHead:
    """Feature-mask head with channel separation and channel-diverse losses (cached-mask variant of CAFE)."""
    k = group_size(ctx.in_dim, ctx.out_dim)
    if n_drop is None:
        n_drop = max(1, round(k * 10 / 73))  # the paper drops 10 of 73
    return MaskHead(ctx.in_dim, ctx.out_dim, ctx.z_dim or ctx.in_dim, hidden, n_drop, use_sigmoid, w_sep, w_div)
