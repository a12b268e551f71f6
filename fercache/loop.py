"""The training loop on cached features: batches (shuffled or class-balanced), plain and SAM steps, the
optimiser and scheduler a recipe names, and scoring on the validation split each epoch."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from . import metrics
from .data import FeatureSet
from .recipe import BALANCE, Recipe


def sampling_weights(y: torch.Tensor, balance: str) -> torch.Tensor | None:
    """Per-row draw weights for `balance` (None: plain shuffling)."""
    power = BALANCE[balance]
    if not power:
        return None
    counts = torch.bincount(y).double()
    return counts[y] ** -power


def to_device(fs: FeatureSet, y: np.ndarray, device) -> dict[str, torch.Tensor]:
    out = {"x": torch.as_tensor(fs.x, device=device), "y": torch.as_tensor(y, device=device)}
    if fs.z is not None:
        out["z"] = torch.as_tensor(fs.z, device=device)
    if fs.lengths is not None:
        out["lengths"] = torch.as_tensor(fs.lengths, device=device)
    if fs.xv is not None:
        out["xv"] = torch.as_tensor(fs.xv, device=device)
    return out


def random_view(batch: dict, gen: torch.Generator) -> dict:
    """Each row's `x` replaced by a uniformly drawn one of {x, its cached views}: augmentation from the cache."""
    xv = batch.pop("xv")
    pick = torch.randint(0, xv.shape[1] + 1, (len(xv),), generator=gen).to(xv.device)
    stacked = torch.cat([batch["x"][:, None], xv], dim=1)
    return {**batch, "x": stacked[torch.arange(len(xv), device=xv.device), pick]}


def _optimizer(head: nn.Module, r: dict) -> torch.optim.Optimizer:
    params = head.param_groups(r)  # several learning rates: the temporal head's prompts
    if r["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=r["lr"], momentum=r.get("momentum", 0.0), weight_decay=r["weight_decay"])
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[r["optimizer"]]
    return cls(params, lr=r["lr"], weight_decay=r["weight_decay"])


def lr_scheduler(opt, r: dict):
    kind, epochs = r.get("scheduler"), r["epochs"]
    if kind == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=r.get("gamma", 0.9))
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=r.get("eta_min", 0.0))
    if kind == "multistep":  # the published temporal recipe: x gamma at each milestone epoch
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=r["milestones"], gamma=r.get("gamma", 0.1))
    if kind == "cosine_quarter":  # the published CVaR recipe: T_max = epochs / 4
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs // 4),
                                                          eta_min=r.get("eta_min", 1e-5))
    return None


class FrozenBN:
    """Context: BatchNorm running statistics are not updated (SAM's second forward pass)."""

    def __init__(self, module: nn.Module):
        self.bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch

    def __exit__(self, *exc):
        for m, (mom, n) in zip(self.bns, self.saved):
            m.momentum = mom
            m.num_batches_tracked.copy_(n)


def sam_step(head: nn.Module, opt: torch.optim.Optimizer, batch: dict, rho: float) -> torch.Tensor:
    """One SAM step: ascend to w + rho * g/|g|, take the gradient there (BN stats frozen), step from w."""
    loss = head.loss(batch)
    loss.backward()
    params = [p for p in head.parameters() if p.grad is not None]
    norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
    eps = [rho * p.grad / (norm + 1e-12) for p in params]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    opt.zero_grad(set_to_none=True)
    with FrozenBN(head):
        head.loss(batch).backward()
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def plain_step(head: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> torch.Tensor:
    loss = head.loss(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def view_mean_logits(head: nn.Module, batch: dict) -> torch.Tensor:
    """Logits of `x`, averaged with those of its cached views when the batch has them (test-time augmentation)."""
    xv = batch.pop("xv", None)
    logits = head.logits(batch)
    if xv is None:
        return logits
    for v in range(xv.shape[1]):
        logits = logits + head.logits({**batch, "x": xv[:, v]})
    return logits / (xv.shape[1] + 1)


@torch.no_grad()
def predict_logits(head: nn.Module, data: dict, batch_size: int = 4096) -> torch.Tensor:
    """Eval-mode logits over all rows of `data`."""
    head.eval()
    out = [view_mean_logits(head, {k: v[i:i + batch_size] for k, v in data.items()})
           for i in range(0, len(data["x"]), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def score(head: nn.Module, data: dict, task: str, classes: list[str], thresholds=None) -> dict:
    """Metrics of `head` on `data` (expression: over rows whose label is in `classes`)."""
    logits = predict_logits(head, data)
    y = data["y"].cpu().numpy()
    if task == "au":
        return metrics.au(y, torch.sigmoid(logits).cpu().numpy(), classes, thresholds)
    return metrics.classification(y, logits.argmax(1).cpu().numpy(), classes)


def epoch_batches(n: int, batch_size: int, gen: torch.Generator,
                  weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Shuffled index batches, or with `weights` n rows drawn with replacement in proportion to them; a trailing
    batch of 1 is dropped (BatchNorm cannot train on it)."""
    perm = torch.randperm(n, generator=gen) if weights is None else torch.multinomial(weights, n, True, generator=gen)
    batches = list(perm.split(batch_size))
    return batches[:-1] if len(batches) > 1 and len(batches[-1]) < 2 else batches


def train_loop(head: nn.Module, train: dict, val: dict, recipe: Mapping, task: str, classes: list[str],
               seed: int, progress: bool = False) -> tuple[dict, list[dict], int]:
    """Train for the recipe's epochs; return the state of the epoch with the best validation metric."""
    from tqdm.auto import tqdm

    recipe = Recipe.of(head.spec.name, recipe)
    select = recipe.select
    gen = torch.Generator().manual_seed(seed)
    weights = sampling_weights(train["y"].cpu(), recipe.balance) if task == "expr" else None
    opt, history = _optimizer(head, recipe), []
    sched = lr_scheduler(opt, recipe)
    best, best_state, best_epoch = -math.inf, copy.deepcopy(head.state_dict()), 0
    bar = tqdm(range(1, recipe.epochs + 1), desc=f"train {getattr(head, 'name', '')} seed {seed}",
               unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        head.train()
        t0, losses = time.perf_counter(), []
        for idx in epoch_batches(len(train["x"]), recipe.batch_size, gen, weights):
            idx = idx.to(train["x"].device)
            batch = {k: v[idx] for k, v in train.items()}
            if "xv" in batch:
                batch = random_view(batch, gen)
            step = sam_step(head, opt, batch, recipe.sam_rho) if recipe.sam_rho else plain_step(head, opt, batch)
            losses.append(step)
        if sched:
            sched.step()
        val_metric = score(head, val, task, classes)[select]
        history.append({"epoch": epoch, "loss": float(torch.stack(losses).mean()), f"val_{select}": val_metric,
                        "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", val=f"{val_metric:.3f}")
        if val_metric > best:
            best, best_state, best_epoch = val_metric, copy.deepcopy(head.state_dict()), epoch
    return best_state, history, best_epoch
