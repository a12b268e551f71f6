"""Feature-mask head (CAFE), cached variant.

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

The reviewers' questions are hyperparameters, so `fercache sweep` can answer them:
`n_drop` (drop rate), `use_sigmoid`, `budgets` (unequal channel budgets per class:
relative weights, given or taken from the training class counts as freq, sqrt_freq or
inv_freq, that share out the same C*k grouped channels; each group's drop count and
L_div normaliser scale with its width) and `mask`:

    sample  m(z) per face (the paper)
    class   one learned mask per class: h_c = m_c * f, o_c = W_c . h_c, s_c = max over group c of h_c
    none    no mask (h = f): what the mask itself adds
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._registry import Head, HeadContext, Streams, register_head

MASK_MODES = ("sample", "class", "none")


def group_size(dim: int, classes: int) -> int:
    """k = D // C (512 channels, 7 classes -> 73)."""
    return dim // classes


def group_widths(dim: int, classes: int, budgets=None) -> list[int]:
    """Channels per class group. Equal (k each) by default; with `budgets` (C relative weights), the same
    C*k grouped channels shared out in proportion, each group at least one channel; leftovers join no group."""
    k = group_size(dim, classes)
    if budgets is None:
        return [k] * classes
    if len(budgets) != classes or any(not isinstance(b, (int, float)) or b <= 0 for b in budgets):
        raise ConfigError(f"budgets needs {classes} positive weights (one per class), got {budgets!r}")
    total = sum(budgets)
    widths = [max(1, int(classes * k * b / total)) for b in budgets]
    if sum(widths) > dim:
        raise ConfigError(f"budgets {budgets!r} leave no channel for some class at D={dim}")
    return widths


BUDGET_RULES = {"freq": lambda n: n, "sqrt_freq": lambda n: n ** 0.5, "inv_freq": lambda n: 1.0 / n}


def resolve_budgets(budgets, counts: list[int] | None) -> list[float] | None:
    """`budgets` as explicit weights: None/"equal" -> None; "freq", "sqrt_freq", "inv_freq" -> from the training
    class counts (so the saved run records the numbers, and a restore needs no data); a list -> itself."""
    if budgets is None or budgets == "equal":
        return None
    if isinstance(budgets, str):
        if budgets not in BUDGET_RULES:
            raise ConfigError(f"budgets={budgets!r}: give equal, {', '.join(BUDGET_RULES)} or a list of C weights")
        if counts is None:
            raise ConfigError(f"budgets={budgets!r} needs the training class counts (expression tasks only)")
        return [round(BUDGET_RULES[budgets](max(n, 1)), 6) for n in counts]
    if not isinstance(budgets, (list, tuple)):
        raise ConfigError(f"budgets={budgets!r}: give equal, {', '.join(BUDGET_RULES)} or a list of C weights")
    return list(budgets)


def _widths(dim: int, groups) -> list[int]:
    """`groups` is the class count (equal groups of D // C) or the list of group widths itself."""
    return group_widths(dim, groups) if isinstance(groups, int) else list(groups)


def group_max(h: torch.Tensor, groups) -> torch.Tensor:
    """[..., D] -> [..., C]: max over each contiguous group of channels; leftover channels are ignored.
    `groups` is the class count (equal groups) or the list of group widths."""
    widths = _widths(h.shape[-1], groups)
    parts = h[..., : sum(widths)].split(widths, dim=-1)
    return torch.stack([p.amax(dim=-1) for p in parts], dim=-1)


def drop_pattern(dim: int, groups, n_drop: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A [D] 0/1 mask with `n_drop` zeros in each group of width k (scaled with the width of unequal groups);
    the last group also draws from the leftover channels."""
    widths = _widths(dim, groups)
    k = group_size(dim, len(widths))
    parts = []
    for c, width in enumerate(widths):
        span = width if c < len(widths) - 1 else dim - sum(widths[:-1])
        keep = torch.ones(span)
        keep[torch.randperm(span, generator=generator)[: round(n_drop * width / k)]] = 0
        parts.append(keep)
    return torch.cat(parts)


#: The published recipe (the paper's seed is 3407: pass --seeds 3407).
MASK_RECIPE = {"optimizer": "adam", "lr": 2e-4, "weight_decay": 1e-4, "epochs": 60, "batch_size": 32,
               "scheduler": "exponential", "gamma": 0.9, "sam_rho": 0.0}


class MaskHead(Head):
    def __init__(self, in_dim: int, out_dim: int, z_dim: int, hidden: int, n_drop: int, use_sigmoid: bool,
                 w_sep: float, w_div: float, widths: list[int], mode: str = "sample"):
        super().__init__()
        self.classes, self.n_drop, self.use_sigmoid = out_dim, n_drop, use_sigmoid
        # tensors, not saved with the weights: configurations with other loss weights train in one stack
        self.register_buffer("w_sep", torch.tensor(float(w_sep)), persistent=False)
        self.register_buffer("w_div", torch.tensor(float(w_div)), persistent=False)
        self.widths, self.mode = widths, mode
        if mode == "sample":
            self.mask_net = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, in_dim))
        elif mode == "class":  # starts neutral: sigmoid(0) = 0.5 everywhere, or 1 without the sigmoid
            self.class_mask = nn.Parameter(torch.zeros(out_dim, in_dim) if use_sigmoid else torch.ones(out_dim, in_dim))
        self.fc = nn.Linear(in_dim, out_dim)

    def masked(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """h: [B, D], or [B, C, D] for per-class masks (row c is the feature seen by class c)."""
        if self.mode == "none":
            return x
        g = self.mask_net(x if z is None else z) if self.mode == "sample" else self.class_mask
        m = torch.sigmoid(g) if self.use_sigmoid else g
        return m * x if self.mode == "sample" else m[None] * x[:, None]

    def output(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h) if h.dim() == 2 else (h * self.fc.weight).sum(-1) + self.fc.bias

    def group_scores(self, h: torch.Tensor) -> torch.Tensor:
        """[B, C]: class c's score is the max of its own group (of its own masked feature, per-class masks)."""
        g = group_max(h, self.widths)
        return g if h.dim() == 2 else g.diagonal(dim1=1, dim2=2)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.masked(x, z))

    def loss_terms(self, batch: dict) -> dict[str, torch.Tensor]:
        """The three published terms, for tests and logging."""
        x, y = batch["x"], batch["y"]
        h = self.masked(x, batch.get("z"))
        drop = (batch.get("noise") or self.noise(x, Streams()))["drop"]
        width = torch.tensor(self.widths, dtype=x.dtype, device=x.device)
        return {
            "ce": F.cross_entropy(self.output(h), y),
            "sep": F.cross_entropy(self.group_scores(h * drop), y),
            "div": 1.0 - (self.group_scores(h) / width).mean(),
        }

    def noise(self, x: torch.Tensor, streams: Streams) -> dict[str, torch.Tensor]:
        drop = drop_pattern(x.shape[-1], self.widths, self.n_drop, generator=streams.cpu)
        return {"drop": drop.to(x.device, non_blocking=True)}  # CPU draws: the same on any device

    def loss(self, batch: dict) -> torch.Tensor:
        t = self.loss_terms(batch)
        return t["ce"] + self.w_sep * t["sep"] + self.w_div * t["div"]


@register_head("mask", recipe=MASK_RECIPE, stack=("n_drop", "w_sep", "w_div"))
def mask(ctx: HeadContext, *, hidden: int = 512, n_drop: int | None = None, use_sigmoid: bool = True,
         w_sep: float = 1.5, w_div: float = 5.0, budgets: str | list[float] | None = None,
         mask: str = "sample") -> MaskHead:
    """Feature-mask head with channel separation and channel-diverse losses (cached-mask variant of CAFE).
    mask=sample|class|none; budgets=equal|freq|sqrt_freq|inv_freq|[w_1, ..., w_C] (channel budget per class)."""
    if mask not in MASK_MODES:
        raise ConfigError(f"mask={mask!r}: choose one of {', '.join(MASK_MODES)}")
    if ctx.z_dim and mask != "sample":
        raise ConfigError(f"a mask-source store feeds the per-sample mask only; mask={mask!r} reads none")
    k = group_size(ctx.in_dim, ctx.out_dim)
    if n_drop is None:
        n_drop = max(1, round(k * 10 / 73))  # the paper drops 10 of 73
    if n_drop >= k:  # every channel of a group dropped: its class score would be 0 for every sample
        raise ConfigError(f"n_drop={n_drop}: at most {k - 1} of the {k} channels per class group "
                          f"(D={ctx.in_dim}, {ctx.out_dim} classes)")
    budgets = resolve_budgets(budgets, ctx.class_counts)
    head = MaskHead(ctx.in_dim, ctx.out_dim, ctx.z_dim or ctx.in_dim, hidden, n_drop, use_sigmoid, w_sep, w_div,
                    group_widths(ctx.in_dim, ctx.out_dim, budgets), mask)
    head.resolved_hp = {"budgets": budgets}  # the weights themselves, so a restore rebuilds the same groups
    return head
