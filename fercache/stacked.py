"""Train G configurations of one head as one stacked model: a sweep's points and a run's seeds in one
forward and backward per step.

Each configuration's head is built and seeded as `train.fit` builds it alone. Their parameters and buffers
are stacked on a leading G axis and one vmapped loss trains all G. Each configuration keeps what makes it
itself: the hyperparameters its head declares free within a stack (`HeadSpec.stack`), its recipe's lr,
weight decay, momentum, scheduler and SAM rho, its batch order (a generator seeded as the loop seeds it), its
noise (dropout masks and drop patterns, drawn from the generator state its run alone would start from), and
its best epoch, chosen on its own validation score. Configurations whose batch orders coincide (the points
of a grid trained with one seed) share one drawn batch, broadcast rather than copied G times.

The optimiser steps repeat torch's single-tensor Adam, AdamW and SGD operation for operation, and the
validation scores are counted on the device and computed as `metrics` computes them, so a configuration
trained here follows its run trained alone to within float rounding (tests/test_stacked.py).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from . import metrics
from .heads import Head, HeadSpec, Streams
from .loop import FrozenBN, epoch_batches, lr_scheduler, random_view, sampling_weights, view_mean_logits
from .recipe import Recipe

#: The size of every stack trained in this process (`fercache bench sweep` reports the largest).
SIZES: list[int] = []

#: Recipe keys every configuration of a stack shares: they set the number and shape of the steps.
SHARED_RECIPE = ("optimizer", "epochs", "batch_size", "views", "shots", "fraction")


@dataclass
class Config:
    """One configuration of a stack: its head (built, seeded and given its training statistics), its recipe,
    the seed of its batch order, and the streams its noise is drawn from."""

    head: Head
    recipe: Recipe
    seed: int
    streams: Streams


def stack_key(head: str, spec: HeadSpec, hp: dict, recipe: Recipe, data_key: str) -> str | None:
    """Configurations with equal keys can train as one stack; None: this one trains alone (its head declares no
    `stack`, or trains on clips)."""
    if spec.stack is None or spec.level != "frame" or not spec.trainable:
        return None
    fixed = {k: v for k, v in hp.items() if k not in spec.stack}
    shared = {k: recipe.get(k) for k in SHARED_RECIPE}
    return json.dumps([head, fixed, shared, bool(recipe.sam_rho), data_key], sort_keys=True, default=str)


def stream_key(seed: int, recipe: Recipe) -> tuple:
    """Configurations with equal stream keys (and one stack key) draw the same batches in the same order."""
    return seed, recipe.balance


def plan(keys: list[str | None], streams: list[tuple], max_configs: int | None) -> list[list[int]]:
    """Groups of indices to train together, in the order of their first member. Within one stack key, the
    configurations of a batch order shared by several form a group of their own (their batch is broadcast);
    the rest pool into one group (each draws its own). Groups are cut to `max_configs`."""
    groups: dict[tuple, list[int]] = {}
    count = Counter(zip(keys, streams))
    for i, (key, stream) in enumerate(zip(keys, streams)):
        shared = key is not None and count[key, stream] > 1
        groups.setdefault((i,) if key is None else (key, stream if shared else None), []).append(i)
    cap = max(1, max_configs or len(keys))
    return [g[i:i + cap] for g in groups.values() for i in range(0, len(g), cap)]


class _StackedLinear(nn.Linear):
    """nn.Linear as `(W x^T)^T + b`: under vmap, with the weights stacked and the input shared by the stack (a
    broadcast batch), this is one matrix product for all G, where `x W^T` expands the input G times (6x slower
    for a linear probe on 1280 features, forward and backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return super().forward(x)
        out = (self.weight @ x.T).T
        return out if self.bias is None else out + self.bias


def _for_stacking(head: Head) -> Head:
    """A copy of `head` to run the stack's calls through (its tensors are replaced at each call)."""
    template = copy.deepcopy(head)
    for m in template.modules():
        if type(m) is nn.Linear:
            m.__class__ = _StackedLinear
    return template


def _mutable(head: Head) -> set[str]:
    """Buffers training changes (BatchNorm statistics); a stacking head's other buffers stay as `fit_stats` or
    its factory set them."""
    return {f"{name}.{b}" if name else b for name, m in head.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for b, _ in m.named_buffers(recurse=False)}


class _Call(nn.Module):
    """`head.<what>(batch)` as a module call, so functional_call can run any of the head's methods."""

    def __init__(self, head: Head):
        super().__init__()
        self.head = head

    def forward(self, batch: dict, what: str):
        if what == "val":
            return view_mean_logits(self.head, batch)
        return getattr(self.head, what)(batch)


def _stack_trees(trees: list):
    """Leaf-wise torch.stack of equally shaped dicts and lists of tensors (each configuration's noise)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _stack_trees([t[k] for t in trees]) for k in first}
    if isinstance(first, (list, tuple)):
        return [_stack_trees([t[i] for t in trees]) for i in range(len(first))]
    return torch.stack(trees)


class StackedOptimizer:
    """Adam, AdamW or SGD over stacked parameters, each configuration with its own lr, weight decay and momentum
    (betas 0.9, 0.999; eps 1e-8), each configuration's slice stepped as torch's own optimiser steps it alone."""

    def __init__(self, params: list[torch.Tensor], kind: str, weight_decay: list[float], momentum: list[float]):
        self.params, self.kind, self.wd, self.momentum = params, kind, weight_decay, momentum
        self.state: dict[int, dict] = {}
        self.t = 0
        self.steps = torch.zeros((), device=params[0].device)  # the count again, as the fused kernel reads it

    def step(self, lrs: list[float]) -> None:
        self.t += 1
        self.steps += 1
        with torch.no_grad():
            live = [(i, p) for i, p in enumerate(self.params) if p.grad is not None]
            if self.kind == "sgd":
                for i, p in live:
                    self._sgd(i, p, p.grad, lrs)
            elif live:
                self._adam(live, lrs)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _adam(self, live: list[tuple[int, torch.Tensor]], lrs: list[float]) -> None:
        """torch's fused Adam/AdamW kernel (one pass over memory: on CPU ~10x the single-tensor loop for a stack's
        millions of weights), called once per distinct (lr, weight decay) with every configuration's slice of
        every parameter; with many distinct pairs (a grid over both), one pass of whole-stack operations instead,
        each configuration's lr and decay a column. Both compute torch's single-tensor Adam bit for bit."""
        for i, p in live:
            if i not in self.state:
                self.state[i] = {k: torch.zeros_like(p) for k in ("m", "v", "tmp")}
        groups: dict[tuple[float, float], list[int]] = {}
        for g, key in enumerate(zip(lrs, self.wd)):
            groups.setdefault(key, []).append(g)
        if len(groups) > 4:
            for i, p in live:
                self._adam_columns(p, p.grad, self.state[i], lrs)
            return
        fused = torch._fused_adamw_ if self.kind == "adamw" else torch._fused_adam_
        for (lr, wd), configs in groups.items():
            part = [(p[g], p.grad[g], self.state[i]["m"][g], self.state[i]["v"][g]) for i, p in live for g in configs]
            params, grads, ms, vs = (list(t) for t in zip(*part))
            fused(params, grads, ms, vs, [], [self.steps] * len(params), amsgrad=False, lr=lr, beta1=0.9,
                  beta2=0.999, weight_decay=wd, eps=1e-8, maximize=False)

    @staticmethod
    def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
        """One value per configuration as a [G, 1, ...] factor of like's dtype: each element is multiplied by its
        configuration's value rounded to that dtype, as torch multiplies by a Python number."""
        column = torch.tensor(values, dtype=like.dtype).to(like.device, non_blocking=True)  # no wait for the GPU
        return column.view(-1, *[1] * (like.dim() - 1))

    def _adam_columns(self, p: torch.Tensor, grad: torch.Tensor, st: dict, lrs: list[float]) -> None:
        """The single-tensor Adam/AdamW step on the whole stack, in place into buffers kept across steps."""
        if self.kind == "adamw":
            p.mul_(self._column([1 - lr * wd for lr, wd in zip(lrs, self.wd)], p))
        elif any(self.wd):  # grad + wd * p
            grad = torch.mul(p, self._column(self.wd, p), out=st["tmp"]).add_(grad)
        st["m"].lerp_(grad, 1 - 0.9)
        st["v"].mul_(0.999).addcmul_(grad, grad, value=1 - 0.999)
        bc1, bc2 = 1 - 0.9 ** float(self.t), 1 - 0.999 ** float(self.t)
        denom = torch.sqrt(st["v"], out=st["tmp"]).div_(bc2 ** 0.5).add_(1e-8)
        p.add_(st["m"] * self._column([-(lr / bc1) for lr in lrs], p) / denom)  # addcdiv's order: (v * m) / d

    def _sgd(self, i: int, p: torch.Tensor, grad: torch.Tensor, lrs: list[float]) -> None:
        for g, (lr, wd, mom) in enumerate(zip(lrs, self.wd, self.momentum)):
            d = grad[g].add(p[g], alpha=wd) if wd else grad[g]
            if mom:
                buf = self.state.setdefault(i, {}).get(g)
                if buf is None:
                    buf = self.state[i][g] = d.detach().clone()
                else:
                    buf.mul_(mom).add_(d, alpha=1)
                d = buf
            p[g].add_(d, alpha=-lr)


def _schedules(configs: list[Config]) -> list:
    """Each configuration's learning rate per epoch, from torch's own scheduler for its recipe."""
    out = []
    for c in configs:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=c.recipe["lr"])
        sched = lr_scheduler(opt, c.recipe)
        opt.step()  # a no-op (no gradient) that tells the scheduler its optimiser steps
        out.append((opt, sched))
    return out


class Stack:
    """G configurations' parameters and buffers stacked, and their loss, logits and scores in one call each."""

    def __init__(self, configs: list[Config]):
        self.configs, heads = configs, [c.head for c in configs]
        self.call = _Call(_for_stacking(heads[0]))
        self.params = {f"head.{n}": torch.stack([h.get_parameter(n).detach() for h in heads]).requires_grad_()
                       for n, _ in heads[0].named_parameters()}
        self.buffers, self.shared = {}, {}  # stacked; one for all (a constant every configuration has alike)
        mutable = _mutable(heads[0])
        for n, b in heads[0].named_buffers():
            alike = n not in mutable and all(torch.equal(b, h.get_buffer(n)) for h in heads[1:])
            if alike:
                self.shared[f"head.{n}"] = b
            else:
                self.buffers[f"head.{n}"] = torch.stack([h.get_buffer(n) for h in heads])

    def _run(self, what: str, batch: dict, dims: dict) -> torch.Tensor:
        def one(params, buffers, shared, b):
            return functional_call(self.call, (params, buffers, shared), (b, what))

        return vmap(one, in_dims=(0, 0, None, dims))(self.params, self.buffers, self.shared, batch)

    def loss(self, batch: dict, stacked: bool) -> torch.Tensor:
        """[G] training losses; `batch` is one batch for all (stacked=False) or [G, B, ...]; noise drawn here."""
        noise = _stack_trees([c.head.noise(batch["x"][g] if stacked else batch["x"], c.streams)
                              for g, c in enumerate(self.configs)])
        dims = {k: 0 if stacked else None for k in batch}
        self.call.train()
        return self._run("loss", {**batch, "noise": noise}, {**dims, "noise": 0})

    @torch.no_grad()
    def val_logits(self, val: dict, rows: int) -> torch.Tensor:
        """[G, N, C] eval-mode logits on the validation split (averaged over its cached views, as the loop does)."""
        self.call.eval()
        parts = [self._run("val", {k: v[i:i + rows] for k, v in val.items()}, {k: None for k in val})
                 for i in range(0, len(val["x"]), rows)]
        return torch.cat(parts, dim=1)

    def state_of(self, g: int, best: dict) -> dict:
        """Configuration g's state_dict (what its run alone would save) from the kept `best` tensors."""
        keys = self.configs[g].head.state_dict().keys()
        return {k: self.shared[f"head.{k}"].clone() if f"head.{k}" in self.shared else best[f"head.{k}"][g].clone()
                for k in keys}

    def frozen_bn(self):
        """SAM's second pass: BatchNorm statistics not updated (momentum 0 on the template; counts restored)."""
        return _StackFrozenBN(self)


class _StackFrozenBN(FrozenBN):
    def __init__(self, stack: Stack):
        super().__init__(stack.call)
        self.counts = {k: v for k, v in stack.buffers.items() if k.endswith("num_batches_tracked")}

    def __enter__(self):
        super().__enter__()
        self.saved_counts = {k: v.clone() for k, v in self.counts.items()}

    def __exit__(self, *exc):
        super().__exit__(*exc)
        for k, v in self.counts.items():
            v.copy_(self.saved_counts[k])


def _val_scores(logits: torch.Tensor, y: torch.Tensor, task: str, selects: list[str]) -> list[float]:
    """Each configuration's selection metric on validation: predictions counted on the device, one transfer."""
    if task == "au":
        pred, pos, neg = logits.sigmoid() >= 0.5, y == 1, y == 0
        counts = torch.stack([(pred & pos).sum(1), (pred & neg).sum(1), (~pred & pos).sum(1)]).cpu().numpy()
        known = (y >= 0).sum(0).cpu().numpy()
        return [metrics.au_from_counts(*counts[:, g], known) for g in range(len(selects))]
    n_cls, g_count = logits.shape[-1], logits.shape[0]
    cells = (torch.arange(g_count, device=y.device)[:, None] * n_cls + y) * n_cls + logits.argmax(-1)
    conf = torch.bincount(cells.flatten(), minlength=g_count * n_cls * n_cls).view(g_count, n_cls, n_cls)
    conf = conf.cpu().numpy()
    return [metrics.from_confusion(conf[g])[s] for g, s in enumerate(selects)]


class _Batches:
    """Each stream's batches of one epoch, drawn as the loop draws them (its permutation, then its views)."""

    def __init__(self, configs: list[Config], train: dict, task: str):
        self.train = train
        self.keys = [stream_key(c.seed, c.recipe) for c in configs]
        self.order = list(dict.fromkeys(self.keys))
        self.gens = {k: torch.Generator().manual_seed(k[0]) for k in self.order}
        y = train["y"].cpu()
        self.weights = {k: sampling_weights(y, k[1]) if task == "expr" else None for k in self.order}
        self.size = configs[0].recipe.batch_size
        self.stacked = len(self.order) > 1

    def epoch(self):
        n = len(self.train["x"])
        per_stream = [epoch_batches(n, self.size, self.gens[k], self.weights[k]) for k in self.order]
        for idxs in zip(*per_stream):
            drawn = {k: self._draw(k, idx) for k, idx in zip(self.order, idxs)}
            if not self.stacked:
                yield drawn[self.order[0]]
            else:
                yield {key: torch.stack([drawn[k][key] for k in self.keys]) for key in drawn[self.order[0]]}

    def _draw(self, key: tuple, idx: torch.Tensor) -> dict:
        idx = idx.to(self.train["x"].device, non_blocking=True)
        batch = {k: v[idx] for k, v in self.train.items()}
        return random_view(batch, self.gens[key]) if "xv" in batch else batch


def _sam(stack: Stack, batch: dict, stacked: bool, rhos: torch.Tensor) -> torch.Tensor:
    """One SAM step for every configuration: each ascends along its own normalised gradient."""
    loss = stack.loss(batch, stacked)
    loss.sum().backward()
    params = [p for p in stack.params.values() if p.grad is not None]
    norm = torch.stack([p.grad.flatten(1).norm(dim=1) for p in params]).norm(dim=0)  # [G]
    eps = [p.grad * rhos.view(-1, *[1] * (p.dim() - 1)) / (norm + 1e-12).view(-1, *[1] * (p.dim() - 1))
           for p in params]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    for p in params:
        p.grad = None
    with stack.frozen_bn():
        stack.loss(batch, stacked).sum().backward()
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    return loss.detach()


def _step(stack: Stack, opt: StackedOptimizer, batch: dict, stacked: bool, lrs: list[float],
          rhos: torch.Tensor | None) -> torch.Tensor:
    if rhos is not None:
        loss = _sam(stack, batch, stacked, rhos)
    else:
        loss = stack.loss(batch, stacked)
        loss.sum().backward()
        loss = loss.detach()
    opt.step(lrs)
    opt.zero_grad()
    return loss


def _rhos(configs: list[Config], like: torch.Tensor) -> torch.Tensor | None:
    """Each configuration's SAM rho as a tensor on the training device (None: plain steps)."""
    rhos = [c.recipe.sam_rho for c in configs]
    return torch.tensor(rhos, dtype=like.dtype, device=like.device) if any(rhos) else None


def train_stack(configs: list[Config], train: dict, val: dict, task: str, progress: bool = False,
                val_rows: int = 4096) -> list[tuple[dict, list[dict], int]]:
    """Train the configurations together; for each, what `loop.train_loop` returns for it alone: the state of its
    best validation epoch, its history, that epoch."""
    from tqdm.auto import tqdm

    stack = Stack(configs)
    SIZES.append(len(configs))
    selects = [c.recipe.select for c in configs]
    opt = StackedOptimizer(list(stack.params.values()), configs[0].recipe["optimizer"],
                           [c.recipe["weight_decay"] for c in configs],
                           [c.recipe.get("momentum", 0.0) for c in configs])
    schedules, batches = _schedules(configs), _Batches(configs, train, task)
    rhos = _rhos(configs, next(iter(stack.params.values())))
    best = {k: v.detach().clone() for k, v in {**stack.params, **stack.buffers}.items()}
    best_score, best_epoch = np.full(len(configs), -math.inf), [0] * len(configs)
    histories: list[list[dict]] = [[] for _ in configs]
    epochs = configs[0].recipe.epochs
    bar = tqdm(range(1, epochs + 1), desc=f"train {configs[0].head.spec.name} x{len(configs)}", unit="epoch",
               disable=not progress, leave=False)
    for epoch in bar:
        t0, lrs = time.perf_counter(), [o.param_groups[0]["lr"] for o, _ in schedules]
        losses = torch.stack([_step(stack, opt, b, batches.stacked, lrs, rhos) for b in batches.epoch()])
        for _, sched in schedules:
            if sched:
                sched.step()
        scores = _val_scores(stack.val_logits(val, val_rows), val["y"], task, selects)
        _keep_best(stack, best, best_score, best_epoch, scores, epoch)
        seconds, mean_loss = (time.perf_counter() - t0) / len(configs), losses.mean(0).tolist()
        for g, h in enumerate(histories):
            h.append({"epoch": epoch, "loss": mean_loss[g], f"val_{selects[g]}": scores[g], "seconds": seconds})
        bar.set_postfix({"best val": f"{np.nanmax(best_score):.3f}"})
    return [(stack.state_of(g, best), histories[g], best_epoch[g]) for g in range(len(configs))]


def _keep_best(stack: Stack, best: dict, best_score: np.ndarray, best_epoch: list[int], scores: list[float],
               epoch: int) -> None:
    """Keep each configuration's state when its validation score beats its best so far (NaN never does)."""
    better = np.array(scores) > best_score
    if not better.any():
        return
    mask = torch.as_tensor(better, device=next(iter(best.values())).device)
    for k, v in {**stack.params, **stack.buffers}.items():
        best[k] = torch.where(mask.view(-1, *[1] * (v.dim() - 1)), v.detach(), best[k])
    for g in np.flatnonzero(better):
        best_score[g], best_epoch[g] = scores[g], epoch


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd saves for one call of `fn` (the activations one configuration's step holds)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def free_bytes(dev: torch.device) -> int:
    """Memory the stacks may use: half of what the device (or the host, for cpu) has free now."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0] // 2
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) // 2


def configs_that_fit(head: Head, train: dict, recipe: Recipe, val_rows: int, dev: torch.device) -> int:
    """How many configurations of `head` fit in one stack on `dev`: per configuration its parameters four times
    over (weights, gradients, two optimiser moments) plus the best state kept, the activations of one step (twice
    with SAM), its own batch, and its validation logits. The features themselves are shared by all."""
    sample = {k: v[:recipe.batch_size] for k, v in train.items() if k != "xv"}
    probe = copy.deepcopy(head).train()  # its BatchNorm statistics move, and its noise comes from a spare stream
    spare = Streams(torch.Generator(), torch.Generator(dev) if dev.type != "cpu" else None)
    batch = sum(v.numel() * v.element_size() for v in sample.values())
    acts = _saved_bytes(lambda: probe.loss({**sample, "noise": probe.noise(sample["x"], spare)}))
    acts *= 2 if recipe.sam_rho else 1
    weights = 5 * sum(p.numel() * p.element_size() for p in head.parameters())
    per = weights + acts + batch + val_rows * 4 * max(p.shape[0] for p in head.parameters())
    return max(1, free_bytes(dev) // per)
