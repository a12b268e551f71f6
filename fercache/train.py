"""Train a head on cached features; select the epoch on the validation split (never test); write the run.

A run directory holds `head.pt` (weights + how to rebuild the head), `config.json` (everything
that produced it) and `metrics.json` (validation metrics, the selecting split and epoch); head.pt is written
last, so a folder with it holds a whole run.
The test split is removed before training starts, so no head can see it during selection.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import metrics, report
from .data import (FeatureSet, carve_val, clip_level, features_memo, load_features, require_clips, store_views,
                   subset_train)
from .devices import torch_device
from .errors import ConfigError, check_out_dir, did_you_mean, repeated
from .encoders import check_text_tower
from .heads import HEADS, HeadContext, build_head
from .labels import sorted_labels
from .store import canonical, library_versions, open_store, same_location, store_name, writing

log = logging.getLogger(__name__)


#: The validation metric that chooses the epoch, per task (recipe key `select` picks another of SELECTABLE).
SELECT_METRIC = {"expr": "accuracy", "au": "macro_f1_at_0.5"}
SELECTABLE = {"expr": ("accuracy", "uar", "macro_f1"), "au": ("macro_f1_at_0.5",)}

#: Recipe keys the trainer reads for every head; a head's own recipe may add keys (the temporal head's max_frames).
TRAINER_KEYS = frozenset({"optimizer", "lr", "weight_decay", "epochs", "batch_size", "scheduler", "sam_rho", "gamma",
                          "eta_min", "milestones", "momentum", "balance", "select", "shots", "fraction", "views"})

#: Recipe key `balance`: each training row is drawn with probability proportional to count(its class) ** -power,
#: with replacement, as many draws per epoch as rows. "class" gives every class the same share of the batches
#: (what UAR rewards on skewed sets such as FER2013's disgust, 1.5% of it); "sqrt" goes half way.
BALANCE = {"none": 0.0, "sqrt": 0.5, "class": 1.0}


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = (None, "exponential", "cosine", "cosine_quarter", "multistep")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: What each trainer key accepts. A value outside it would crash mid-run (lr="abc" in the optimiser) or, worse,
#: train something else than asked without a word (scheduler="cos" used to mean no schedule at all).
RECIPE_VALUES = {
    "optimizer": (lambda v: v in OPTIMIZERS, "adam, adamw or sgd"),
    "lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "epochs": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    "batch_size": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "scheduler": (lambda v: v in SCHEDULERS, "null, " + ", ".join(SCHEDULERS[1:])),
    "sam_rho": (lambda v: _number(v) and v >= 0, "a number >= 0 (0: plain steps, no SAM)"),
    "gamma": (lambda v: _number(v) and v > 0, "a number > 0"),
    "eta_min": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "milestones": (lambda v: isinstance(v, list) and all(_whole(e) and e >= 1 for e in v), "a list of epochs, e.g. [30, 40]"),
    # a view named twice trained as once, while the saved recipe (and a sweep point's key) said twice
    "views": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v) and not repeated(v),
              'a list of the store\'s views, each once, e.g. ["flip", "erase"]'),
    "momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
}


def _like_default(default) -> tuple:
    """A head's own recipe key (max_frames, prompt_lr, max_iter) takes a value of its published default's kind."""
    if _whole(default):
        return lambda v: _whole(v) and v >= 1, f"a whole number >= 1 (published: {default})"
    if _number(default):
        return lambda v: _number(v) and v > 0, f"a number > 0 (published: {default})"
    return lambda v: True, ""


def _check_values(head: str, r: dict) -> None:
    published = HEADS.lookup(head).recipe
    for key, value in r.items():
        ok, what = RECIPE_VALUES.get(key) or _like_default(published.get(key))
        if not ok(value):
            raise ConfigError(f"recipe {key}={value!r}: {what}")
    if published.get("epochs") and r.get("epochs") == 0:
        raise ConfigError(f"epochs=0: head {head!r} is trained by epochs, and 0 would save it untrained")


def recipe_keys(head: str) -> frozenset[str]:
    """Every recipe key `head` trains with: the trainer's and its own."""
    return TRAINER_KEYS | set(HEADS.lookup(head).recipe)


def check_recipe(head: str, r: dict, task: str) -> None:
    """Refuse what training would otherwise ignore or misread: a misspelt key, an unknown balance or metric."""
    known = recipe_keys(head)
    unknown = sorted(set(r) - known)
    if unknown:
        hints = [f"{k!r}{did_you_mean(k, known)}" for k in unknown]
        raise ConfigError(f"head {head!r} has no recipe key {', '.join(hints)}; it reads: {', '.join(sorted(known))}")
    _check_values(head, r)
    if r.get("balance", "none") not in BALANCE:
        raise ConfigError(f"balance={r['balance']!r}: choose from {', '.join(BALANCE)}")
    if r.get("balance", "none") != "none" and task != "expr":
        raise ConfigError("balance samples rows by their class: expression heads only (an AU row has many labels)")
    if r.get("select", SELECT_METRIC[task]) not in SELECTABLE[task]:
        raise ConfigError(f"select={r['select']!r}: an {task} head is selected on {', '.join(SELECTABLE[task])}")
    _check_subset(r, task)


def _check_subset(r: dict, task: str) -> None:
    """Recipe keys `shots` (training units per class) and `fraction` (of the training units): data-efficiency
    curves are a sweep axis (`--axis shots=1,4,16,64`)."""
    shots, fraction = r.get("shots"), r.get("fraction")
    if shots is not None and fraction is not None:
        raise ConfigError("give shots (units per class) or fraction (of the training units), not both")
    if shots is not None and (task != "expr" or not _whole(shots) or shots < 1):
        raise ConfigError(f"shots={shots!r}: a whole number >= 1 of training units per class, for expression heads "
                          "(AU heads: fraction)")
    if fraction is not None and (not _number(fraction) or not 0 < fraction <= 1):
        raise ConfigError(f"fraction={fraction!r}: a number in (0, 1]")


def sampling_weights(y: torch.Tensor, balance: str) -> torch.Tensor | None:
    """Per-row draw weights for `balance` (None: plain shuffling)."""
    power = BALANCE[balance]
    if not power:
        return None
    counts = torch.bincount(y).double()
    return counts[y] ** -power


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    reused: bool = False  # found finished in its folder (`fit(reuse=True)`), not trained by this call


def choose_aus(aus: str | list[str], have: list[str], positives: dict[str, int], source) -> list[str]:
    """The AUs `aus` names among the manifest's columns `have`: `topK`, the K with most positives (`positives`,
    AU name -> count), in AU order; or AU numbers or names, comma-separated ("1,2,4", "AU1, AU2") or a list.
    Each AU once: one named twice was two outputs of one AU, counted twice in every macro-F1. `train-head` and
    `au-cv` both choose here."""
    if isinstance(aus, str) and aus.strip().startswith("top"):
        k = aus.strip()[3:]
        if not k.isdigit() or int(k) < 1:
            raise ConfigError(f"--aus {aus!r}: write topK with K >= 1 (e.g. top8), or AU numbers like 1,2,4")
        return sorted(sorted(positives, key=positives.get, reverse=True)[: int(k)], key=lambda a: int(a[2:]))
    names = [a.strip() for a in (aus if isinstance(aus, list) else str(aus).split(","))]
    chosen = [f"AU{a[2:].strip()}" if a.upper().startswith("AU") else f"AU{a}" for a in names if a]
    if not chosen:
        raise ConfigError(f"--aus {aus!r} names no AU; write AU numbers like 1,2,4, or topK")
    if missing := [a for a in chosen if a not in have]:
        raise ConfigError(f"AU(s) {', '.join(missing)} not in {source}; it has {', '.join(have)}")
    if twice := repeated(chosen):
        raise ConfigError(f"--aus names {', '.join(twice)} twice; each AU once (twice, it would count twice in "
                          "every macro-F1)")
    return chosen


def select_aus(fs: FeatureSet, aus: str | list[str] | None, min_pos: int = 20) -> list[str]:
    """AU columns to model: `choose_aus`, or by default those with >= min_pos train positives."""
    if not fs.au_names:
        raise ConfigError(f"{fs.notes.get('manifest')} has no AU columns; the au head needs them")
    pos = {a: int((fs.au[fs.split == "train", i] == 1).sum()) for i, a in enumerate(fs.au_names)}
    if aus is None or aus == "":
        return [a for a in fs.au_names if pos[a] >= min_pos]
    return choose_aus(aus, fs.au_names, pos, fs.notes.get("manifest"))


def targets(fs: FeatureSet, task: str, classes: list[str]) -> np.ndarray:
    """Class indices (-1 where the label is outside `classes`), or the [N, A] AU matrix for `classes` AUs."""
    if task == "au":
        return fs.au[:, [fs.au_names.index(a) for a in classes]]
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(lbl, -1) for lbl in fs.label], dtype=np.int64)


def _train_counts(fs: FeatureSet, task: str, classes: list[str]) -> list[int] | None:
    """Training rows per class (frames for video stores), for heads that size themselves by class frequency."""
    if task != "expr":
        return None
    y = targets(fs, task, classes)[fs.split == "train"]
    return np.bincount(y[y >= 0], minlength=len(classes)).tolist()


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


def _scheduler(opt, r: dict):
    kind, epochs = r.get("scheduler"), r["epochs"]
    if kind == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=r.get("gamma", 0.9))
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=r.get("eta_min", 0.0))
    if kind == "multistep":  # the published temporal recipe: x gamma at each milestone epoch
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=r["milestones"], gamma=r.get("gamma", 0.1))
    if kind == "cosine_quarter":  # the published CVaR recipe: T_max = epochs / 4
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs // 4), eta_min=r.get("eta_min", 1e-5))
    return None


class _FrozenBN:
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
    with _FrozenBN(head):
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


def _view_mean_logits(head: nn.Module, batch: dict) -> torch.Tensor:
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
    out = [_view_mean_logits(head, {k: v[i:i + batch_size] for k, v in data.items()}) for i in range(0, len(data["x"]), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def score(head: nn.Module, data: dict, task: str, classes: list[str], thresholds=None) -> dict:
    """Metrics of `head` on `data` (expression: over rows whose label is in `classes`)."""
    logits = predict_logits(head, data)
    y = data["y"].cpu().numpy()
    if task == "au":
        return metrics.au(y, torch.sigmoid(logits).cpu().numpy(), classes, thresholds)
    return metrics.classification(y, logits.argmax(1).cpu().numpy(), classes)


def epoch_batches(n: int, batch_size: int, gen: torch.Generator, weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Shuffled index batches, or with `weights` n rows drawn with replacement in proportion to them; a trailing
    batch of 1 is dropped (BatchNorm cannot train on it)."""
    perm = torch.randperm(n, generator=gen) if weights is None else torch.multinomial(weights, n, True, generator=gen)
    batches = list(perm.split(batch_size))
    return batches[:-1] if len(batches) > 1 and len(batches[-1]) < 2 else batches


def train_loop(head: nn.Module, train: dict, val: dict, recipe: dict, task: str, classes: list[str],
               seed: int, progress: bool = False) -> tuple[dict, list[dict], int]:
    """Train for recipe['epochs']; return the state of the epoch with the best validation metric."""
    from tqdm.auto import tqdm

    select = recipe.get("select", SELECT_METRIC[task])
    gen = torch.Generator().manual_seed(seed)
    weights = sampling_weights(train["y"].cpu(), recipe.get("balance", "none")) if task == "expr" else None
    opt, history = _optimizer(head, recipe), []
    sched = _scheduler(opt, recipe)
    best, best_state, best_epoch = -math.inf, copy.deepcopy(head.state_dict()), 0
    bar = tqdm(range(1, recipe["epochs"] + 1), desc=f"train {getattr(head, 'name', '')} seed {seed}",
               unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        head.train()
        t0, losses = time.perf_counter(), []
        for idx in epoch_batches(len(train["x"]), recipe["batch_size"], gen, weights):
            idx = idx.to(train["x"].device)
            batch = {k: v[idx] for k, v in train.items()}
            if "xv" in batch:
                batch = random_view(batch, gen)
            step = sam_step(head, opt, batch, recipe["sam_rho"]) if recipe.get("sam_rho") else plain_step(head, opt, batch)
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


def _run_name(store: str, head: str, seed: int) -> str:
    return f"{store_name(store)}-{head}/seed{seed}"


def _train_views(store: str, views: bool | list[str] | None) -> list[str]:
    """The cached views a run trains with: all the store holds (True/None), none (False), or the named ones
    (recipe key `views`, e.g. ["flip", "erase"]: an augmentation ablation is a sweep axis)."""
    held = store_views(store)
    if views is None or views is True:
        return held
    if views is False:
        return []
    missing = [v for v in views if v not in held]
    if missing:
        raise ConfigError(f"views={views!r}: {store_name(store)} holds {held or 'no views'}, not {', '.join(missing)}; "
                          f"extract it with --views {','.join(dict.fromkeys(held + missing))}")
    return [v for v in held if v in views]


def prepare(store: str, head: str, manifest=None, output=None, mask_source=None, aus=None, seed: int = 0,
            views: bool | list[str] | None = True):
    """Load features (and the store's cached views), carve val if needed, drop test rows, fix the label set."""
    spec = HEADS.lookup(head)
    clip, task = spec.level == "clip", spec.task
    if spec.text_tower:
        check_text_tower(open_store(store).meta, head)  # before reading features: fail on the real cause
    output = output or spec.feature_output
    # Views augment frame-level heads; a clip-level head resamples frames instead.
    fs = load_features(store, manifest, output, mask_source, views=_train_views(store, views) if not clip else ())
    if clip:
        require_clips(fs)  # before building the head, which may load a text tower
    if task == "expr":
        fs = fs.take(fs.label != "")
    fs = carve_val(fs.take(fs.split != "test"), seed=seed)  # test rows never reach training or selection
    classes = select_aus(fs, aus) if task == "au" else sorted_labels(fs.label[fs.split == "train"])
    check_splits(fs, task, classes)
    return fs, task, classes, output


def check_splits(fs: FeatureSet, task: str, classes: list[str]) -> None:
    """Refuse data no score can mean anything on: no training rows, one class (every prediction right: 100%
    accuracy, UAR and F1), or no validation row the head could be selected on."""
    where = fs.notes.get("manifest") or fs.notes.get("store")
    n_train = int((fs.split == "train").sum())
    if not n_train:
        raise ConfigError(f"{where}: no training rows{' with a label' if task == 'expr' else ''}; a head needs the "
                          "train split (check the manifest's split column)")
    if task == "expr" and len(classes) < 2:
        raise ConfigError(f"{where}: the training rows hold {len(classes)} class ({', '.join(classes) or 'none'}); "
                          "a classifier needs at least 2, or every prediction is right by construction")
    val = fs.split == "val"
    usable = val & np.isin(fs.label, classes) if task == "expr" else val
    if not usable.any():
        what = "no validation rows" if not val.any() else "no validation row of a class seen in training"
        raise ConfigError(f"{where}: {what} ({int(val.sum())} in val; training classes {', '.join(classes)}); the "
                          "epoch and any threshold are chosen on validation, never on test: give the manifest a val "
                          "split, or leave it out and a subject-grouped one is carved from train")


@dataclass
class Fitted:
    """What a run fits on its validation split once trained, to turn logits into decisions and probabilities:
    per-AU thresholds (AU heads) or a softmax temperature (expression heads). Never fitted on test."""

    thresholds: np.ndarray | None = None
    temperature: float | None = None


def _val_scores(model: nn.Module, val: dict, yval: np.ndarray, task: str, classes: list[str]) -> tuple[dict, Fitted]:
    """Validation metrics, and what is fitted on this same split (never on test): per-AU thresholds for AU heads,
    the temperature that calibrates an expression head's probabilities (with ECE before and after it)."""
    logits = predict_logits(model, val)
    if task == "au":
        prob = torch.sigmoid(logits).cpu().numpy()
        thresholds = metrics.tune_thresholds(yval, prob)
        return metrics.au(yval, prob, classes, thresholds), Fitted(thresholds=thresholds)
    logits = logits.cpu().numpy()
    t = metrics.fit_temperature(logits, yval)
    if note := metrics.temperature_at_bound(logits, yval, t):
        log.warning("%s", note)
    cal = metrics.calibration(logits, yval, t)
    scores = {**metrics.classification(yval, logits.argmax(1), classes),
              **{k: v for k, v in cal.items() if not k.startswith("reliability")}}
    return scores, Fitted(temperature=t)


def _train_val(fs: FeatureSet, y: np.ndarray, task: str, dev: torch.device):
    """The train and val batches on `dev`, and their targets."""
    train_fs, val_fs = fs.rows("train"), fs.rows("val").tta_only()  # selection scores what evaluate will
    ytr, yval = y[fs.split == "train"], y[fs.split == "val"]
    if task == "expr":  # val rows with a class unseen in train cannot be predicted; keep them out of selection
        val_fs, yval = val_fs.take(yval >= 0), yval[yval >= 0]
    return to_device(train_fs, ytr, dev), to_device(val_fs, yval, dev), ytr, yval


@functools.cache
def _fercache_version() -> str | None:
    return library_versions().get("fercache")  # read once: importlib.metadata takes ~10 ms, a run on the cache less


@functools.cache
def code_sha256() -> str:
    """sha256 over fercache's own source files: a head or training loop edited in a checkout (no new version
    number) is other code, so `finished_run` does not pass off a run trained by the old code as the new code's."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _provenance(fs: FeatureSet, st, ctx: HeadContext) -> dict:
    """What a run was trained from, so evaluate can refuse it once the store or the labels change; and with
    which code, so a finished run is not taken as this code's result after an upgrade (`finished_run`)."""
    return {"manifest_rows_sha256": fs.notes["manifest_rows_sha256"],
            "trained_with": {"fercache": _fercache_version(), "code_sha256": code_sha256(),
                             "torch": str(torch.__version__)},  # str: a TorchVersion does not load weights_only
            "in_dim": ctx.in_dim, "z_dim": ctx.z_dim, "store_fingerprint": st.fingerprint,
            "encoder_args": st.meta.get("encoder_args"),
            "variant": "cached features (frozen encoder; see METHODS.md)"}


def _changed(old, new) -> str:
    """`old -> new`, narrowed to the keys that differ when both are dicts (a recipe, hyperparameters)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in {**old, **new} if old.get(k) != new.get(k)]
        return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
    return f"{old!r} -> {new!r}"


def _located(settings: dict) -> dict:
    """`settings` with its store, mask-source store and manifest file as absolute locations: a run's record of
    its data holds from any working directory, and one file spelled two ways is one file."""
    out = dict(settings)
    for k in ("store", "mask_source", "manifest"):
        v = settings.get(k)
        if v and ("://" in str(v) or Path(v).exists()):  # not "<memory>", a manifest built in code
            out[k] = canonical(v)
    return out


def _refuse_other_run(run_dir: Path, settings: dict) -> None:
    """A run directory already holding a run with other settings is kept: nothing trained is lost silently."""
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return
    saved = _located(json.loads(saved_path.read_text()))  # older runs may hold relative paths
    differ = [k for k, v in settings.items() if json.dumps(saved.get(k), sort_keys=True) != json.dumps(v, sort_keys=True)]
    if differ:
        detail = "; ".join(f"{k}: {_changed(saved.get(k), settings[k])}" for k in differ)
        raise ConfigError(f"{run_dir} holds a run trained with other settings ({detail}); "
                          "pass another --out, or --overwrite to replace it")


def fit(store: str, head: str = "linear", *, manifest=None, out_dir: str | Path = "runs", seed: int = 0,
        device: str = "cpu", output: str | None = None, mask_source: str | None = None, hp: dict | None = None,
        recipe: dict | None = None, aus=None, name: str | None = None, progress: bool = False,
        views: bool = True, overwrite: bool = True, fold: int | None = None, reuse: bool = False) -> RunResult:
    """Train one head with one seed on a store; writes <out_dir>/<name>/{head.pt,config.json,metrics.json}.

    With `views` (default) and a store extracted with `--views`, each training image contributes a random
    one of its cached views per epoch, and validation scores the average of the views' logits.
    `overwrite=False` refuses, before training, to replace a run trained with other settings.
    `fold` marks the run as one fold of a protocol (`folds`, `au-cv`), so the ledger pools folds like seeds.
    `reuse=True` returns the run already saved in its folder, untrained again, when it was trained with this
    same configuration (see `finished_run`): an interrupted sweep goes on where it stopped.
    """
    dev = torch_device(device)  # before any reading
    check_out_dir(out_dir)
    spec = HEADS.lookup(head)
    r = {**spec.recipe, **(recipe or {})}  # the head's published recipe, with the overrides
    check_recipe(head, r, spec.task)  # before any work
    fs, task, classes, output = prepare(store, head, manifest, output, mask_source, aus, seed,
                                        r["views"] if views and "views" in r else views)
    fs = subset_train(fs, r.get("shots"), r.get("fraction"), seed, stratify=task == "expr")
    st = open_store(store)
    ctx = HeadContext(in_dim=fs.x.shape[-1], out_dim=len(classes), class_names=classes,
                      z_dim=None if fs.z is None else fs.z.shape[1], store_meta={**st.meta, "location": store},
                      class_counts=_train_counts(fs, task, classes))
    torch.manual_seed(seed)
    model = build_head(head, ctx, **(hp or {}))
    hp = {**(hp or {}), **model.resolved_hp}  # e.g. an "auto" choice, so load_run rebuilds this head
    run_dir = Path(out_dir) / (name.format(seed=seed) if name else _run_name(store, head, seed))
    settings = _located({"head": head, "hp": hp, "recipe": r, "store": store, "output": output or st.default_output,
                         "mask_source": mask_source, "manifest": fs.notes["manifest"], "views": fs.views,
                         "classes": classes})
    if not overwrite:
        _refuse_other_run(run_dir, settings)
    config = {**settings, "level": spec.level, "seed": seed, "fold": fold, "task": task, "device": device,
              **_provenance(fs, st, ctx)}
    if mask_source:  # a re-extracted mask source makes the run stale (evaluate.staleness) and not reusable
        config["mask_source_fingerprint"] = open_store(mask_source).fingerprint["key"]
    with run_lock(run_dir):
        if reuse and (done := finished_run(run_dir, config)):
            log.debug("%s: trained before with the same settings and code; reused", run_dir)
            return done
        result, fitted = _train_on(model, fs, r, task, classes, seed, progress, dev)
        result = {**result, "seed": seed, "config": config}
        save_run(run_dir, model, config, result, fitted)
    return RunResult(run_dir, result)


def summarize(r: RunResult) -> str:
    """A trained run in one line, as `train-head` and a pipeline's train step print it: its selected validation
    score and what chose it."""
    sel = r.metrics["selection"]
    chosen = f"l2 {sel['solver']['l2']:g}" if "solver" in sel else f"epoch {sel['best_epoch']}"
    reused = "; reused" if r.reused else ""
    return (f"{r.run_dir}: val {sel['metric']} {100 * r.metrics['val'][sel['metric']]:.2f}% ({chosen}; val: "
            f"{sel['val_source']}{reused})")


RUN_BUSY = ("the run folder {location} is being trained into by another process ({holder}); wait for it, or pass "
            "another --out (or --name)")


def run_lock(run_dir: Path):
    """Held while a run is trained into `run_dir` (its `.lock`): a second train-head into the same folder fails at
    once instead of both exiting 0 and the second replacing the first."""
    return writing(run_dir, RUN_BUSY, lock_file=Path(run_dir).resolve() / ".lock", transient=True)


def _train_on(model: nn.Module, fs: FeatureSet, r: dict, task: str, classes: list[str], seed: int,
              progress: bool, dev: torch.device) -> tuple[dict, Fitted]:
    """Train `model` on fs's train split, the epoch chosen on its val split; what metrics.json reports of it
    (selection, val scores, history, sizes) and what was fitted on val beside the weights (the temperature)."""
    if model.spec.level == "clip":
        fs = clip_level(fs, r["max_frames"])
    model.to(dev)
    train, val, ytr, yval = _train_val(fs, targets(fs, task, classes), task, dev)
    model.fit_stats(train)
    t0 = time.perf_counter()
    select = r.get("select", SELECT_METRIC[task])
    solver, history, best_epoch = _fit_model(model, train, val, r, task, classes, seed, progress, select)
    val_metrics, fitted = _val_scores(model, val, yval, task, classes)
    return {
        "selection": {"split": "val", "val_source": fs.notes["val_source"], "metric": select,
                      "best_epoch": best_epoch, "test_split_used": False, **({"solver": solver} if solver else {})},
        "val": val_metrics, "history": history, "train_seconds": time.perf_counter() - t0,
        "n_train": int(len(ytr)), "n_val": int(len(yval)), "unit": "clips" if model.spec.level == "clip" else "images",
    }, fitted


def _what_it_is(config: dict) -> str:
    """A run's configuration as comparable text, without the device: where it trained does not change what it is."""
    return json.dumps({k: v for k, v in config.items() if k != "device"}, sort_keys=True)


def finished_run(run_dir: Path, config: dict) -> RunResult | None:
    """The run saved in `run_dir`, when it is whole (head.pt is written last, and loads) and was trained with
    `config` (settings, seed, fold, store fingerprint, manifest rows, fercache version and source, torch version;
    on any device). None otherwise: nothing there, a run cut short or damaged, or other settings."""
    if not (run_dir / "head.pt").is_file():
        return None
    try:
        saved = _located(json.loads((run_dir / "config.json").read_text()))
        result = json.loads((run_dir / "metrics.json").read_text())
        if _what_it_is(saved) != _what_it_is(config):
            return None
        load_run(run_dir)  # what evaluate will do with it: damaged weights are trained again, not reused
    except (OSError, ValueError, ConfigError):
        return None
    return RunResult(run_dir, result, reused=True)


def _fit_model(model: nn.Module, train, val, r: dict, task: str, classes: list[str], seed: int, progress: bool,
               select: str) -> tuple[dict | None, list[dict], int]:
    """Fit `model` in place, choosing on validation only: (solver report, epoch history, best epoch)."""
    solver = model.solve(train, lambda m: score(m, val, task, classes)[select], r)  # closed form, full batch
    if solver is not None:
        return solver, [], 0
    if model.spec.trainable and r["epochs"] > 0:
        state, history, best_epoch = train_loop(model, train, val, r, task, classes, seed, progress)
        model.load_state_dict(state)
        return None, history, best_epoch
    return None, [], 0  # zero-shot: nothing to fit


def save_run(run_dir: Path, model: nn.Module, config: dict, result: dict, fitted: Fitted) -> None:
    """head.pt marks a run (evaluate and the ledger look for it), so it is written last and by rename: a save
    killed half-way leaves no half run behind. A run saved here before goes first, with its evaluations: they
    scored weights that no longer exist."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _clear_run(run_dir)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    if result["history"]:
        sel = result["selection"]
        report.training_png(run_dir / "training.png", result["history"], sel["metric"], sel["best_epoch"],
                            f"{config['head']} on {store_name(config['store'])}, seed {config['seed']}")
    torch.save({"state_dict": model.state_dict(), "config": config,
                "thresholds": None if fitted.thresholds is None else torch.as_tensor(fitted.thresholds),
                "temperature": fitted.temperature}, run_dir / "head.pt.partial")
    (run_dir / "head.pt.partial").replace(run_dir / "head.pt")


def _clear_run(run_dir: Path) -> None:
    (run_dir / "head.pt").unlink(missing_ok=True)
    evaluations = sorted(d for d in run_dir.glob("eval-*") if d.is_dir())
    for d in evaluations:
        shutil.rmtree(d)
    if evaluations:
        log.info("%s: replaced the run there, and its %d evaluation(s)", run_dir, len(evaluations))


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, dict, Fitted]:
    """Rebuild a trained head from its run directory: (model, config, what it fitted on validation)."""
    path, device = Path(run_dir) / "head.pt", torch_device(device)
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no head.pt); train one with `fercache train-head`")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        model, cfg, fitted = _rebuilt(saved)
    except (RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, AttributeError) as e:
        # a file cut short or empty, not one torch wrote, or one without what a run saves
        first = (str(e).splitlines() or [""])[0].split(". ")[0]
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {first}); the run's weights are damaged: "
                          "train it again (a sweep or pipeline re-run retrains it by itself)") from None
    return model.to(device).eval(), cfg, fitted


def _rebuilt(saved: dict) -> tuple[nn.Module, dict, Fitted]:
    """The head a head.pt describes, with its weights and what was fitted on validation."""
    cfg = saved["config"]
    ctx = HeadContext(in_dim=cfg["in_dim"], out_dim=len(cfg["classes"]), class_names=cfg["classes"],
                      z_dim=cfg["z_dim"], restore=True)
    model = build_head(cfg["head"], ctx, **cfg["hp"])
    model.load_state_dict(saved["state_dict"])
    thr = saved.get("thresholds")  # runs saved before temperatures existed have none: raw softmax
    return model, cfg, Fitted(None if thr is None else thr.cpu().numpy(), saved.get("temperature"))


#: torch seeds its generators with an unsigned 64-bit number, and JSON readers keep 2**63 - 1 exactly.
MAX_SEED = 2**63 - 1


def check_seeds(seeds) -> None:
    """Seeds are distinct whole numbers >= 0. A repeated seed trained into its own folder (seed<N>/) again and
    counted twice in the mean, its std shrunk by a copy of itself: '2 seeds' that were one run."""
    seeds = list(seeds)
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ConfigError(f"seeds {seeds}: give one or more whole numbers >= 0")
    if big := [s for s in seeds if s > MAX_SEED]:
        raise ConfigError(f"seed {big[0]} is over {MAX_SEED} (2**63 - 1), the largest seed fercache records")
    if twice := repeated(seeds):
        raise ConfigError(f"seeds {seeds} repeat {', '.join(map(str, twice))}: each seed is one run, in its own "
                          "folder seed<N>/; give distinct seeds")


@features_memo()
def fit_seeds(store: str, head: str, seeds=(0,), own: bool = False, **kw) -> list[RunResult]:
    """`fit` once per seed. `own`: the caller (a protocol, a sweep) owns the folder its seed runs share, so runs
    left there by an earlier call with other seeds are removed (`drop_numbered`)."""
    check_seeds(seeds)
    runs = [fit(store, head, seed=s, **kw) for s in seeds]
    if own:  # run again with fewer seeds, the old ones would be averaged in by `evaluate PARENT` and the ledger
        drop_numbered(runs[0].run_dir.parent, "seed", keep=set(seeds), what="runs of seeds no longer asked for")
    return runs


def check_owner(folder: Path, store: str, head: str | None, what: str) -> None:
    """Refuse to train into a folder a sweep or protocol owns while runs of another store (or, for a sweep, of
    another head) lie there: the owner replaces and removes the runs it does not make, so a sweep of mask into
    the default runs/sweep deleted an earlier sweep of linear without a word. A store moved or re-extracted
    is the same store: its path or its fingerprint matches."""
    key, others = open_store(store).fingerprint["key"], set()
    for path in folder.glob("**/config.json"):
        try:
            cfg = json.loads(path.read_text())
            theirs, their_key, their_head = cfg["store"], cfg["store_fingerprint"]["key"], cfg["head"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a run's config
        if (not same_location(theirs, store) and their_key != key) or (head and their_head != head):
            others.add(f"{their_head} on {store_name(theirs)}")
    if others:
        raise ConfigError(f"{folder} holds runs of {', '.join(sorted(others))}, which this {what} of "
                          f"{head + ' on ' if head else ''}{store_name(store)} would replace or remove; pass another "
                          f"--out, or remove {folder} first")


def drop_numbered(parent: Path, prefix: str, keep, what: str) -> list[Path]:
    """Remove the `<prefix><N>` folders under `parent` (seed3, point017) whose N is not in `keep`: what an
    earlier call of a protocol or sweep that owns `parent` left there and this one no longer makes."""
    stale = sorted(d for d in parent.glob(f"{prefix}*") if d.is_dir() and d.name[len(prefix):].isdigit()
                   and int(d.name[len(prefix):]) not in keep)
    for d in stale:
        shutil.rmtree(d)
    if stale:
        log.info("%s: removed %d folder(s) of %s (%s)", parent, len(stale), what, ", ".join(d.name for d in stale[:5]))
    return stale
