"""Multi-label AU detector: per-AU BCE under CVaR (the worst alpha of each batch), an optional AUC-margin term;
-1 labels (AU not annotated) are ignored."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._registry import Head, HeadContext, register_head
from .cvar_mlp import CVAR_RECIPE, check_fractions, cvar, mlp


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample mean BCE over the AUs annotated for that sample (y == -1 is ignored, not dropped whole)."""
    known = (y >= 0).float()
    bce = F.binary_cross_entropy_with_logits(logits, y.clamp(min=0).float(), reduction="none") * known
    return bce.sum(1) / known.sum(1).clamp(min=1)


def auc_margin(logits: torch.Tensor, y: torch.Tensor, margin: float = 0.6, p: int = 2) -> torch.Tensor:
    """Pairwise AUC-margin loss: mean over AUs of mean_{pos i, neg j} relu(margin - (s_i - s_j))^p, s = sigmoid."""
    s = torch.sigmoid(logits)
    terms = []
    for a in range(y.shape[1]):
        pos, neg = s[y[:, a] == 1, a], s[y[:, a] == 0, a]
        if len(pos) and len(neg):
            terms.append(F.relu(margin - (pos[:, None] - neg[None, :])).pow(p).mean())
    return torch.stack(terms).mean() if terms else logits.sum() * 0


class AUDetector(Head):
    def __init__(self, in_dim: int, n_aus: int, hidden: int, alpha: float, dropout: float, auc_weight: float):
        super().__init__()
        self.alpha, self.auc_weight = alpha, auc_weight
        self.net = mlp(in_dim, n_aus, hidden, dropout=dropout)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)

    def loss(self, batch: dict) -> torch.Tensor:
        logits, y = self(batch["x"]), batch["y"]
        loss = cvar(masked_bce(logits, y), self.alpha)
        if self.auc_weight:
            loss = (1 - self.auc_weight) * loss + self.auc_weight * auc_margin(logits, y)
        return loss


@register_head("au", task="au", recipe=CVAR_RECIPE)
def au(ctx: HeadContext, *, hidden: int | None = None, alpha: float = 0.5, dropout: float = 0.6,
       auc_weight: float = 0.0) -> AUDetector:
    """AU detector; `auc_weight=0.2` gives the published 0.8 CVaR + 0.2 AUC-margin loss."""
    check_fractions(alpha=alpha, dropout=dropout, auc_weight=auc_weight)
    return AUDetector(ctx.in_dim, ctx.out_dim, hidden or ctx.in_dim, alpha, dropout, auc_weight)
