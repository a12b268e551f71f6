"""Multi-label AU detector: per-AU BCE under CVaR (the worst alpha of each batch), an optional AUC-margin term;
-1 labels (AU not annotated) are ignored."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ._registry import Head, HeadContext, Streams, register_head
from .cvar_mlp import CVAR_RECIPE, check_fractions, cvar, dropout_noise, mlp, run_mlp


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample mean BCE over the AUs annotated for that sample (y == -1 is ignored, not dropped whole)."""
    known = (y >= 0).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, y.clamp(min=0).to(logits.dtype), reduction="none") * known
    return bce.sum(1) / known.sum(1).clamp(min=1)


def auc_margin(logits: torch.Tensor, y: torch.Tensor, margin: float = 0.6, p: int = 2) -> torch.Tensor:
    """Pairwise AUC-margin loss: mean over AUs of mean_{pos i, neg j} relu(margin - (s_i - s_j))^p, s = sigmoid.
    AUs without a positive and a negative in the batch are left out (0 when none has both). Every pair is
    weighed rather than picked by boolean indexing, so the loss keeps its shapes and vmaps over a stack."""
    s = torch.sigmoid(logits)
    pairs = (y == 1).to(s.dtype)[:, None] * (y == 0).to(s.dtype)[None]  # [B_pos, B_neg, A]
    hinge = F.relu(margin - (s[:, None] - s[None])).pow(p)
    n_pairs = pairs.sum((0, 1))
    per_au = (hinge * pairs).sum((0, 1)) / n_pairs.clamp(min=1)
    has = (n_pairs > 0).to(s.dtype)
    return (per_au * has).sum() / has.sum().clamp(min=1)


class AUDetector(Head):
    def __init__(self, in_dim: int, n_aus: int, hidden: int, alpha: float, dropout: float, auc_weight: float,
                 auc_margin: float = 0.6, auc_p: int = 2):
        super().__init__()
        self.alpha, self.auc_weight, self.auc_margin, self.auc_p = alpha, auc_weight, auc_margin, auc_p
        self.net = mlp(in_dim, n_aus, hidden, dropout=dropout)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)

    def noise(self, x: torch.Tensor, streams: Streams) -> dict[str, torch.Tensor]:
        return {"dropout": dropout_noise(self.net, x, streams)}

    def loss(self, batch: dict) -> torch.Tensor:
        noise = batch.get("noise") or self.noise(batch["x"], Streams())
        logits, y = run_mlp(self.net, batch["x"], noise["dropout"]), batch["y"]
        loss = cvar(masked_bce(logits, y), self.alpha)
        if self.auc_weight:
            loss = (1 - self.auc_weight) * loss + self.auc_weight * auc_margin(logits, y, self.auc_margin, self.auc_p)
        return loss


@register_head("au", task="au", recipe=CVAR_RECIPE, stack=("dropout",))
def au(ctx: HeadContext, *, hidden: int | None = None, alpha: float = 0.5, dropout: float = 0.6,
       auc_weight: float = 0.0, auc_margin: float = 0.6, auc_p: int = 2) -> AUDetector:
    """AU detector; `auc_weight=0.2` gives the published 0.8 CVaR + 0.2 AUC-margin loss (margin 0.6, p = 2: the
    AUC-margin term's `auc_margin` and `auc_p`, sweepable like the rest)."""
    check_fractions(alpha=alpha, dropout=dropout, auc_weight=auc_weight)
    if auc_p < 1:  # p = 0 makes every pair's hinge 1: a constant loss with no gradient
        raise ConfigError(f"auc_p={auc_p}: the hinge's power is a whole number >= 1 (published: 2)")
    return AUDetector(ctx.in_dim, ctx.out_dim, hidden or ctx.in_dim, alpha, dropout, auc_weight, auc_margin, auc_p)
