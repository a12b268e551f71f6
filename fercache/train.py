"""Train a head on cached features: prepare the data (the test split is removed before training starts, so no head
can see it during selection), fit the head with the epoch chosen on the validation split, and save the run
(`rundir`). The recipe's checks are in `recipe`, the loop in `loop`, AU selection in `aus`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import metrics, stacked
from .aus import select_aus
from .data import (
    FeatureSet,
    carve_val,
    clip_level,
    features_memo,
    load_features,
    require_clips,
    store_views,
    subset_train,
)
from .devices import barrier, dist_rank_world, torch_device
from .encoders import check_text_tower
from .errors import ConfigError, check_out_dir
from .heads import HEADS, HeadContext, Streams, build_head, check_hyperparameters
from .labels import sorted_labels
from .loop import predict_logits, score, to_device, train_loop
from .recipe import Recipe, check_seeds
from .rundir import (
    Fitted,
    RunConfig,
    RunResult,
    code_sha256,
    drop_numbered,
    fercache_version,
    finished_run,
    located,
    refuse_other_run,
    run_lock,
    save_run,
)
from .store import open_store, store_name

log = logging.getLogger(__name__)


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
    fs, classes = for_training(fs, task, aus, seed)
    return fs, task, classes, output


def for_training(fs: FeatureSet, task: str, aus=None, seed: int = 0) -> tuple[FeatureSet, list[str]]:
    """The rows a head trains and is selected on (unlabelled and test rows out, val carved if there is none),
    and the classes (AUs) it predicts."""
    if task == "expr":
        fs = fs.take(fs.label != "")
    fs = carve_val(fs.take(fs.split != "test"), seed=seed)  # test rows never reach training or selection
    classes = select_aus(fs, aus) if task == "au" else sorted_labels(fs.label[fs.split == "train"])
    check_splits(fs, task, classes)
    return fs, classes


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


def _provenance(fs: FeatureSet, st, ctx: HeadContext) -> dict:
    """What a run was trained from, so evaluate can refuse it once the store or the labels change; and with
    which code, so a finished run is not taken as this code's result after an upgrade (`finished_run`)."""
    return {"manifest_rows_sha256": fs.notes["manifest_rows_sha256"],
            "trained_with": {"fercache": fercache_version(), "code_sha256": code_sha256(),
                             "torch": str(torch.__version__)},  # str: a TorchVersion does not load weights_only
            "in_dim": ctx.in_dim, "z_dim": ctx.z_dim, "store_fingerprint": st.fingerprint,
            "encoder_args": st.meta.get("encoder_args")}


@dataclass(frozen=True)
class Point:
    """One run `fit_many` trains: its seed, hyperparameters, recipe overrides and folder name (`{seed}` in it is
    the seed; None: <store>-<head>/seed<N>)."""

    seed: int = 0
    hp: dict | None = None
    recipe: dict | None = None
    name: str | None = None


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
    return fit_many(store, head, [Point(seed, hp, recipe, name)], manifest=manifest, out_dir=out_dir, device=device,
                    output=output, mask_source=mask_source, aus=aus, progress=progress, views=views,
                    overwrite=overwrite, fold=fold, reuse=reuse)[0]


@dataclass
class _Job:
    """A run planned by `fit_many`: its data, built head, settings and folder, and the global random state its
    build left (what its training draws noise from)."""

    model: nn.Module
    fs: FeatureSet
    recipe: Recipe
    task: str
    classes: list[str]
    seed: int
    config: RunConfig
    run_dir: Path
    rng: torch.Tensor
    stack_key: str | None = None


def _rows(store: str, head: str, r: Recipe, seed: int, manifest, output, mask_source, aus, views: bool,
          cache: dict) -> tuple:
    """(rows, task, classes, output, data key) a run trains on; runs of one seed and data recipe share them (a
    sweep's points hold one copy of the features, not one each)."""
    views = r.views if views and r.views is not None else views
    key = (seed, json.dumps(views), r.shots, r.fraction)
    if key not in cache:
        fs, task, classes, output = prepare(store, head, manifest, output, mask_source, aus, seed, views)
        fs = subset_train(fs, r.shots, r.fraction, seed, stratify=task == "expr")
        cache[key] = fs, task, classes, output, _data_key(fs)
    return cache[key]


def _plan_job(store: str, head: str, point: Point, out_dir, manifest, output, mask_source, aus, views: bool,
              overwrite: bool, fold, device: str, cache: dict) -> _Job:
    """Check, load and build one run (nothing trained): its data and head seeded as `fit` trains it."""
    spec, r, seed = HEADS.lookup(head), Recipe.of(head, point.recipe), point.seed  # checked before any work
    check_hyperparameters(head, point.hp or {})
    fs, task, classes, output, data_key = _rows(store, head, r, seed, manifest, output, mask_source, aus, views, cache)
    if "store" not in cache:  # opened once for all the runs, as their rows are read once
        cache["store"] = open_store(store), open_store(mask_source).fingerprint["key"] if mask_source else None
    st, source_key = cache["store"]
    ctx, model = _seeded_head(head, fs, task, classes, seed, point.hp, {**st.meta, "location": store})
    rng = torch.get_rng_state()
    hp = {**(point.hp or {}), **model.resolved_hp}  # e.g. an "auto" choice, so load_run rebuilds this head
    run_dir = Path(out_dir) / (point.name.format(seed=seed) if point.name else _run_name(store, head, seed))
    settings = located({"head": head, "hp": hp, "recipe": r.to_dict(), "store": store,
                        "output": output or st.default_output, "mask_source": mask_source,
                        "manifest": fs.notes["manifest"], "views": fs.views, "classes": classes})
    if not overwrite:
        refuse_other_run(run_dir, settings)
    # a re-extracted mask source makes the run stale (scoring.staleness) and not reusable: its key is recorded
    config = RunConfig(**settings, level=spec.level, seed=seed, fold=fold, task=task, device=device,
                       **_provenance(fs, st, ctx), mask_source_fingerprint=source_key)
    key = stacked.stack_key(head, spec, hp, r, data_key)
    return _Job(model, fs, r, task, classes, seed, config, run_dir, rng, key)


def _data_key(fs: FeatureSet) -> str:
    """Which rows a run trains and is selected on: runs with equal keys can share their batches."""
    h = hashlib.sha256()
    for part in (fs.sample_id, fs.split, np.asarray(fs.views), np.asarray(fs.notes.get("manifest", ""))):
        h.update(np.asarray(part).astype(str).tobytes())
    return h.hexdigest()


def fit_many(store: str, head: str, points: list[Point], *, manifest=None, out_dir: str | Path = "runs",
             device: str = "cpu", output: str | None = None, mask_source: str | None = None, aus=None,
             progress: bool = False, views: bool = True, overwrite: bool = True, fold: int | None = None,
             reuse: bool = False, max_batch_configs: int | None = None) -> list[RunResult]:
    """`fit` for each point, in order; points of a head that stacks (`HeadSpec.stack`) on the same rows train
    together as stacks (`stacked`), each run saved as `fit` saves it. Stacks are as large as the device's memory
    allows, or `max_batch_configs` (1: every run alone, the sequential path). Under torchrun, each rank trains
    whole stacks and every rank returns all the runs."""
    dev = torch_device(device)  # before any reading
    check_out_dir(out_dir)
    rank, world = dist_rank_world()
    cache: dict = {}
    jobs = [_plan_job(store, head, p, out_dir, manifest, output, mask_source, aus, views, overwrite, fold, device,
                      cache) for p in points]
    if len(jobs) > 1 and jobs[0].stack_key is None and (max_batch_configs or 0) != 1:
        log.info("head %r trains one run at a time (it declares no stack)", head)
    groups = stacked.plan([j.stack_key for j in jobs], [stacked.stream_key(j.seed, j.recipe) for j in jobs],
                          max_batch_configs)
    results: dict[int, RunResult] = {}
    with _RunsBar(len(jobs), head, progress) as bar:
        for k, group in enumerate(groups):
            if k % world == rank:
                done = _train_group([jobs[i] for i in group], group, reuse, progress, dev, max_batch_configs)
                results.update(done)
                bar.done(done.values())
    barrier(world)
    for i, j in enumerate(jobs):  # the runs other ranks trained, read back from their folders
        if i not in results:
            done = finished_run(j.run_dir, j.config)
            if done is None:
                raise ConfigError(f"{j.run_dir}: the rank that trained it saved no run there")
            results[i] = RunResult(done.run_dir, done.metrics)
    return [results[i] for i in range(len(jobs))]


class _RunsBar:
    """A bar over the runs of several (a sweep of many points runs for minutes), with the best validation score
    so far."""

    def __init__(self, total: int, head: str, progress: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=f"train {head}", unit="run", disable=not progress or total < 2)
        self.best: dict[str, float] = {}

    def done(self, runs) -> None:
        for r in runs:
            metric = r.metrics["selection"]["metric"]
            self.best[metric] = max(self.best.get(metric, -np.inf), r.metrics["val"][metric])
            self.bar.update(1)
        self.bar.set_postfix({f"best val {m}": f"{100 * v:.2f}" for m, v in self.best.items()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def _train_group(jobs: list[_Job], index: list[int], reuse: bool, progress: bool, dev: torch.device,
                 max_configs: int | None) -> dict[int, RunResult]:
    """Train one group of runs (one stack, or one run alone), each found finished first when `reuse`."""
    out: dict[int, RunResult] = {}
    with ExitStack() as locks:
        for j in jobs:
            locks.enter_context(run_lock(j.run_dir))
        pending = []
        for i, j in zip(index, jobs):
            if reuse and (done := finished_run(j.run_dir, j.config)):
                log.debug("%s: trained before with the same settings and code; reused", j.run_dir)
                out[i] = done
            else:
                pending.append((i, j))
        if len(pending) == 1 or (pending and pending[0][1].stack_key is None):
            for i, j in pending:
                _rewind(j)
                out[i] = _save(j, *_train_on(j.model, j.fs, j.recipe, j.task, j.classes, j.seed, progress, dev))
        elif pending:
            out.update(_train_stacks([j for _, j in pending], [i for i, _ in pending], progress, dev, max_configs))
    return out


def _rewind(job: _Job) -> None:
    """Global random state as `fit` leaves it just after building this run's head (other heads were built since)."""
    torch.set_rng_state(job.rng)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(job.seed)  # as torch.manual_seed(seed) does; building draws nothing on a GPU


def _save(job: _Job, result: dict, fitted: Fitted) -> RunResult:
    result = {**result, "seed": job.seed, "config": job.config.to_dict()}
    save_run(job.run_dir, job.model, job.config, result, fitted)
    return RunResult(job.run_dir, result)


def _fit_stats_once(models: list[nn.Module], train: dict) -> None:
    """`fit_stats` of the first head, and what it set copied into the others: heads of one stack train on the same
    rows and differ only in hyperparameters their statistics do not read (a standardiser over 10,000 x 1,280
    features took 43 ms a head)."""
    first = models[0]
    before = {n: t.detach().clone() for n, t in first.state_dict(keep_vars=True).items()}
    first.fit_stats(train)
    after = first.state_dict()
    changed = [n for n, t in after.items() if not torch.equal(t, before[n])]
    with torch.no_grad():
        for m in models[1:]:
            mine = m.state_dict()
            for n in changed:
                mine[n].copy_(after[n])


def _streams(job: _Job, dev: torch.device) -> Streams:
    """The generators a run alone would draw its noise from: the CPU state its build left, and on a GPU that
    device's generator as `torch.manual_seed(seed)` left it."""
    cpu = torch.Generator()
    cpu.set_state(job.rng)
    return Streams(cpu, torch.Generator(dev).manual_seed(job.seed) if dev.type != "cpu" else None)


def _train_stacks(jobs: list[_Job], index: list[int], progress: bool, dev: torch.device,
                  max_configs: int | None) -> dict[int, RunResult]:
    """Train runs that share a stack key and their rows as stacks cut to fit memory, then finish each as `fit`."""
    first = jobs[0]
    for j in jobs:
        j.model.to(dev)
    train, val, _, yval = _train_val(first.fs, targets(first.fs, first.task, first.classes), first.task, dev)
    _fit_stats_once([j.model for j in jobs], train)
    fits = stacked.configs_that_fit(first.model, train, first.recipe, 4096, dev)
    size = min(fits, max_configs or fits)
    log.info("training %d runs of %s as %d stack(s) of up to %d", len(jobs), first.config.head,
             -(-len(jobs) // size), size)
    out = {}
    for start in range(0, len(jobs), size):
        part = jobs[start:start + size]
        t0 = time.perf_counter()
        configs = [stacked.Config(j.model, j.recipe, j.seed, _streams(j, dev)) for j in part]
        trained = stacked.train_stack(configs, train, val, first.task, progress)
        seconds = (time.perf_counter() - t0) / len(part)
        for i, j, (state, history, best_epoch) in zip(index[start:], part, trained):
            j.model.load_state_dict(state)
            result, fitted = _finish(j, val, yval, history, best_epoch, seconds, len(train["x"]))
            out[i] = _save(j, result, fitted)
    return out


def _seeded_head(head: str, fs: FeatureSet, task: str, classes: list[str], seed: int, hp: dict | None,
                 store_meta: dict | None = None) -> tuple[HeadContext, nn.Module]:
    """The head built for `fs`'s features and `classes`, its initial weights drawn from `seed`."""
    ctx = HeadContext(in_dim=fs.x.shape[-1], out_dim=len(classes), class_names=classes,
                      z_dim=None if fs.z is None else fs.z.shape[1], store_meta=store_meta or {},
                      class_counts=_train_counts(fs, task, classes))
    torch.manual_seed(seed)
    return ctx, build_head(head, ctx, **(hp or {}))


@dataclass
class Trained:
    """A head trained in memory (`fit_features`): nothing of it is written anywhere."""

    model: nn.Module
    classes: list[str]
    task: str
    result: dict  # what a run's metrics.json holds: selection, validation scores, history
    fitted: Fitted


def fit_features(fs: FeatureSet, head: str = "linear", *, seed: int = 0, hp: dict | None = None,
                 recipe: dict | None = None, aus=None, device: str = "cpu", progress: bool = False) -> Trained:
    """Train a frame-level head on features held in memory (from another tool, or a store already loaded), with
    the same selection on validation as `fit`; writes nothing."""
    spec, r = HEADS.lookup(head), Recipe.of(head, recipe)
    check_hyperparameters(head, hp or {})
    if spec.level != "frame" or spec.text_tower:
        raise ConfigError(f"head {head!r} reads clips or a store's text tower: train it on a store with `fit`")
    dev = torch_device(device)
    fs, classes = for_training(fs, spec.task, aus, seed)
    fs = subset_train(fs, r.shots, r.fraction, seed, stratify=spec.task == "expr")
    _, model = _seeded_head(head, fs, spec.task, classes, seed, hp)
    result, fitted = _train_on(model, fs, r, spec.task, classes, seed, progress, dev)
    return Trained(model.eval(), classes, spec.task, {**result, "seed": seed}, fitted)


def summarize(r: RunResult) -> str:
    """A trained run in one line, as `train-head` and a pipeline's train step print it: its selected validation
    score and what chose it."""
    sel = r.metrics["selection"]
    chosen = f"l2 {sel['solver']['l2']:g}" if "solver" in sel else f"epoch {sel['best_epoch']}"
    reused = "; reused" if r.reused else ""
    return (f"{r.run_dir}: val {sel['metric']} {100 * r.metrics['val'][sel['metric']]:.2f}% ({chosen}; val: "
            f"{sel['val_source']}{reused})")


def _train_on(model: nn.Module, fs: FeatureSet, r: Recipe, task: str, classes: list[str], seed: int,
              progress: bool, dev: torch.device) -> tuple[dict, Fitted]:
    """Train `model` on fs's train split, the epoch chosen on its val split; what metrics.json reports of it
    (selection, val scores, history, sizes) and what was fitted on val beside the weights (the temperature)."""
    if model.spec.level == "clip":
        fs = clip_level(fs, r["max_frames"])
    model.to(dev)
    train, val, ytr, yval = _train_val(fs, targets(fs, task, classes), task, dev)
    model.fit_stats(train)
    t0 = time.perf_counter()
    select = r.select
    solver, history, best_epoch = _fit_model(model, train, val, r, task, classes, seed, progress, select)
    val_metrics, fitted = _val_scores(model, val, yval, task, classes)
    return _result(model, fs, r, solver, history, best_epoch, val_metrics, time.perf_counter() - t0, len(ytr),
                   len(yval)), fitted


def _finish(job: _Job, val: dict, yval: np.ndarray, history: list[dict], best_epoch: int, seconds: float,
            n_train: int) -> tuple[dict, Fitted]:
    """What `_train_on` reports for a run trained in a stack (its seconds: the stack's time shared out)."""
    val_metrics, fitted = _val_scores(job.model, val, yval, job.task, job.classes)
    return _result(job.model, job.fs, job.recipe, None, history, best_epoch, val_metrics, seconds, n_train,
                   len(yval)), fitted


def _result(model: nn.Module, fs: FeatureSet, r: Recipe, solver: dict | None, history: list[dict], best_epoch: int,
            val_metrics: dict, seconds: float, n_train: int, n_val: int) -> dict:
    return {
        "selection": {"split": "val", "val_source": fs.notes["val_source"], "metric": r.select,
                      "best_epoch": best_epoch, "test_split_used": False, **({"solver": solver} if solver else {})},
        "val": val_metrics, "history": history, "train_seconds": seconds,
        "n_train": int(n_train), "n_val": int(n_val), "unit": "clips" if model.spec.level == "clip" else "images",
    }


def _fit_model(model: nn.Module, train, val, r: Recipe, task: str, classes: list[str], seed: int, progress: bool,
               select: str) -> tuple[dict | None, list[dict], int]:
    """Fit `model` in place, choosing on validation only: (solver report, epoch history, best epoch)."""
    solver = model.solve(train, lambda m: score(m, val, task, classes)[select], r)  # closed form, full batch
    if solver is not None:
        return solver, [], 0
    if model.spec.trainable and r.epochs > 0:
        state, history, best_epoch = train_loop(model, train, val, r, task, classes, seed, progress)
        model.load_state_dict(state)
        return None, history, best_epoch
    return None, [], 0  # zero-shot: nothing to fit


@features_memo()
def fit_seeds(store: str, head: str, seeds=(0,), own: bool = False, hp: dict | None = None,
              recipe: dict | None = None, name: str | None = None, **fit_kw) -> list[RunResult]:
    """`fit` once per seed, the seeds trained as one stack where the head stacks (`fit_many`). `own`: the caller
    (a protocol, a sweep) owns the folder its seed runs share, so runs left there by an earlier call with other
    seeds are removed (`drop_numbered`)."""
    check_seeds(seeds)
    runs = fit_many(store, head, [Point(s, hp, recipe, name) for s in seeds], **fit_kw)
    if own:  # run again with fewer seeds, the old ones would be averaged in by `evaluate PARENT` and the ledger
        drop_numbered(runs[0].run_dir.parent, "seed", keep=set(seeds), what="runs of seeds no longer asked for")
    return runs
