"""CVaR MLP (the ABAW expression head): 3 x [Linear, BatchNorm, ReLU, Dropout 0.6] + Linear, trained on CVaR_alpha with
SAM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._registry import Head, HeadContext, Streams, register_head


def cvar(losses: torch.Tensor, alpha: float) -> torch.Tensor:
    """CVaR_alpha: the mean of the largest ceil(alpha * n) per-sample losses (closed form, no host sync)."""
    k = max(1, math.ceil(alpha * losses.shape[0]))
    return losses.topk(k).values.mean()


def check_fractions(**values: float) -> None:
    """alpha in (0, 1] (alpha = 0 would average no loss, > 1 more losses than the batch has); dropout and loss
    weights in [0, 1)."""
    for name, v in values.items():
        ok = 0 < v <= 1 if name == "alpha" else 0 <= v < 1
        if not ok:
            raise ConfigError(f"{name}={v!r}: " + ("a fraction in (0, 1]" if name == "alpha" else "a fraction "
                                                                                                  "in [0, 1)"))


def mlp(in_dim: int, out_dim: int, hidden: int, layers: int = 3, dropout: float = 0.6) -> nn.Sequential:
    """The published head: `layers` x [Linear, BatchNorm1d, ReLU, Dropout] then Linear."""
    blocks, d = [], in_dim
    for _ in range(layers):
        blocks += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout)]
        d = hidden
    return nn.Sequential(*blocks, nn.Linear(d, out_dim))


def dropout_noise(net: nn.Sequential, x: torch.Tensor, streams: Streams) -> list[torch.Tensor]:
    """The scaled keep-masks the Dropout layers of `net` draw on a batch `x`, in order, as F.dropout draws them
    (bernoulli of 1 - p on a tensor like the layer's input, divided by 1 - p; nothing drawn at p = 0)."""
    masks, width = [], x.shape[-1]
    for layer in net:
        width = layer.out_features if isinstance(layer, nn.Linear) else width
        if isinstance(layer, nn.Dropout):
            keep, q = torch.ones(x.shape[0], width, dtype=x.dtype, device=x.device), 1 - layer.p
            masks.append(keep.bernoulli_(q, generator=streams.on(x)).div_(q) if layer.p else keep)
    return masks


def run_mlp(net: nn.Sequential, x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """`net` in training with its Dropout layers' masks given (`dropout_noise`)."""
    keep = iter(masks)
    for layer in net:
        x = x * next(keep) if isinstance(layer, nn.Dropout) else layer(x)
    return x


CVAR_RECIPE = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "epochs": 32, "batch_size": 32,
               "scheduler": "cosine_quarter", "eta_min": 1e-5, "sam_rho": 0.5}


class CVaRMLP(Head):
    def __init__(self, in_dim: int, out_dim: int, hidden: int, alpha: float, dropout: float):
        super().__init__()
        self.alpha = alpha
        self.net = mlp(in_dim, out_dim, hidden, dropout=dropout)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)

    def noise(self, x: torch.Tensor, streams: Streams) -> dict[str, torch.Tensor]:
        return {"dropout": dropout_noise(self.net, x, streams)}

    def loss(self, batch: dict) -> torch.Tensor:
        noise = batch.get("noise") or self.noise(batch["x"], Streams())
        logits = run_mlp(self.net, batch["x"], noise["dropout"])
        return cvar(F.cross_entropy(logits, batch["y"], reduction="none"), self.alpha)


@register_head("cvar_mlp", recipe=CVAR_RECIPE, stack=("dropout",))
def cvar_mlp(ctx: HeadContext, *, hidden: int | None = None, alpha: float = 0.5, dropout: float = 0.6) -> CVaRMLP:
    """MLP trained on the CVaR of per-sample losses (top alpha fraction); width = feature dim by default."""
    check_fractions(alpha=alpha, dropout=dropout)
    return CVaRMLP(ctx.in_dim, ctx.out_dim, hidden or ctx.in_dim, alpha, dropout)
