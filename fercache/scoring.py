"""Score trained runs on a store's split: metrics with intervals, calibration, confusion, predictions, surest
mistakes; refused when a run no longer matches its data (stale). The protocols that train and score many runs
(the cross matrix, folds, AU cross-validation) are in protocols.py."""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import metrics, report
from .data import FeatureSet, carve_val, clip_level, load_features, store_views
from .encoders import revision_note
from .errors import ConfigError, StaleRunError, StoreError, near_path
from .loop import predict_logits, to_device
from .manifests import read_manifest, rows_sha256
from .preprocess import tta_views
from .rundir import RunConfig, load_run
from .store import (
    check_same_encoder,
    encoder_key,
    encoder_label,
    exists,
    open_store,
    outdated,
    same_location,
    store_name,
)
from .train import targets

log = logging.getLogger(__name__)


def _check_same_encoder(cfg: RunConfig, store: str) -> None:
    trained = cfg.store_fingerprint["encoder"]
    here = open_store(store).fingerprint["encoder"]
    if encoder_key(trained) != encoder_key(here):
        why = revision_note(trained, here)
        raise StoreError(f"{store} was extracted with {encoder_label(here)} but the head was trained on "
                         f"{encoder_label(trained)}; features are not comparable" + (f" ({why})" if why else ""))


def _rows_sha256(path: str) -> str:
    """rows_sha256 of a manifest file, memoised on its path, size and mtime (a ledger checks hundreds of runs)."""
    st = os.stat(path)
    return _rows_sha256_of(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _rows_sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return rows_sha256(read_manifest(path))


def staleness(cfg: RunConfig, store: str | None = None, manifest=None) -> tuple[str, str] | None:
    """(short, long) reason why a run no longer matches its own data, or None when it does: its training store
    was re-extracted from other images, or its manifest's labels, splits or subjects changed. Either can move
    training images into the test split without any other error. Another store, or an explicit manifest, is
    not checked: that is scoring on purpose."""
    store = store or cfg.store
    if source := _mask_source_changed(cfg):
        return "mask source re-extracted", (
            f"its mask-source store {source} was re-extracted since it was trained, so the mask reads other features")
    if not same_location(store, cfg.store):
        return None
    then, now = cfg.store_fingerprint, open_store(store).fingerprint
    if (then["manifest_sha256"], then["n_rows"]) != (now["manifest_sha256"], now["n_rows"]):
        return "store re-extracted", (
            f"{store} was re-extracted from other images since it was trained ({then['n_rows']} rows, manifest sha "
            f"{then['manifest_sha256'][:12]} then; {now['n_rows']} rows, {now['manifest_sha256'][:12]} now)")
    if then["key"] != now["key"] and not outdated(then):  # a 0.1.0 BatchNorm store: the ledger says "re-extract"
        return "store re-extracted", (
            f"{store} was re-extracted with another encoder or preprocessing since it was trained ({_why(then, now)})")
    if manifest is None and cfg.manifest_rows_sha256:
        if _rows_sha256(cfg.manifest) != cfg.manifest_rows_sha256:
            return "manifest changed", (
                f"{cfg.manifest} changed since it was trained (its labels, splits or subjects differ), so its "
                "test split may now hold images the head trained or selected on")
    return None


def _mask_source_changed(cfg: RunConfig) -> str | None:
    """The mask-source store of a run, when its features are no longer those the run trained on."""
    source, then = cfg.mask_source, cfg.mask_source_fingerprint
    if not source or not then:  # no mask source, or a run from before 0.4 (not recorded)
        return None
    return None if open_store(source).fingerprint["key"] == then else source


def _why(then: dict, now: dict) -> str:
    a, b = then["encoder"], now["encoder"]
    if encoder_label(a) != encoder_label(b):
        return f"{encoder_label(a)} then, {encoder_label(b)} now"
    return "its preprocessing or outputs differ"


def _check_not_stale(run, cfg: RunConfig, store: str, manifest) -> None:
    stale = staleness(cfg, store, manifest)
    if stale:
        raise StaleRunError(f"run {run}: {stale[1]}. Retrain the head (seconds from the cache)"
                            + ("" if manifest else ", or pass --manifest to score it on other labels on purpose"))


def runs_hint(run: Path) -> str:
    """Where the runs might be: a folder of a near name, or runs deeper under `run` (a protocol's output); or
    what `run` is instead (a store or a manifest: the step before training, passed where a run goes)."""
    if not run.exists():
        return near_path(run, Path.is_dir)
    if exists(run):
        return (f": {run.name} is a feature store; `fercache train-head {run} --head linear` trains a run on it, "
                "and the run folder that prints is what this reads")
    if run.is_file() and run.name.endswith((".csv", ".csv.gz")):
        return (f": {run.name} is a manifest; extract it into a store "
                f"(`fercache extract {run} ...`) and train a head on that")
    # a few levels down, not the whole tree: `run` may be a home folder (a protocol's runs sit 3-4 levels deep)
    deeper = next((p for depth in range(2, 6) for p in sorted(run.glob("*/" * depth + "head.pt"))), None)
    if deeper is None:
        return ""
    return (f"; runs lie deeper, e.g. {deeper.parent.parent}: pass one of those folders, "
            f"or list them all with `fercache runs {run}`")


def run_dirs(run: str | Path) -> list[Path]:
    """A run directory, or every seed run under a parent directory."""
    run = Path(run)
    if (run / "head.pt").is_file():
        return [run]
    found = sorted(p.parent for p in run.glob("*/head.pt"))
    if not found:
        raise ConfigError(f"no trained run (head.pt) in {run} or its subfolders{runs_hint(run)}")
    return found


@dataclass
class Scored:
    """One run's outputs on a split, row by row: what metrics, intervals, predictions.csv and `compare` read."""

    sample_id: np.ndarray  # clip ids for a clip-level run
    subject: np.ndarray
    label: np.ndarray  # manifest label names (expression runs)
    y: np.ndarray  # class index [n], or AU matrix [n, A] (-1 = not annotated)
    prob: np.ndarray  # softmax [n, K], or sigmoid [n, A]
    classes: list[str]
    task: str
    thresholds: np.ndarray | None = None

    def take(self, idx: np.ndarray) -> "Scored":
        return replace(self, sample_id=self.sample_id[idx], subject=self.subject[idx], label=self.label[idx],
                       y=self.y[idx], prob=self.prob[idx])

    def decisions(self) -> dict[str, np.ndarray]:
        """The predictions each headline metric scores: argmax, or AUs at 0.5 and at the tuned thresholds."""
        if self.task == "expr":
            return {"pred": self.prob.argmax(1)}
        tuned = np.full(len(self.classes), 0.5) if self.thresholds is None else self.thresholds
        return {"at_0.5": (self.prob >= 0.5).astype(int), "tuned": (self.prob >= tuned).astype(int)}

    def clusters(self) -> np.ndarray:
        """What the bootstrap resamples: subjects, or rows whose subject is unknown."""
        return np.where(self.subject.astype(str) == "", self.sample_id.astype(str), self.subject.astype(str))

    def metric_draws(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """Each headline metric under row weights `w` [b, n] (one bootstrap resample per row of w)."""
        d = self.decisions()
        if self.task == "expr":
            return {**metrics.weighted_classification(w, self.y, d["pred"], len(self.classes)),
                    "ece": metrics.weighted_ece(w, self.prob, self.y)}
        return {"macro_f1_at_0.5": metrics.weighted_au_f1(w, self.y, d["at_0.5"]),
                "macro_f1_tuned": metrics.weighted_au_f1(w, self.y, d["tuned"])}


def score_run(run: str | Path, store: str | None = None, manifest=None, split: str = "test",
              device: str = "cpu", mask_source: str | None = None) -> tuple[dict, Scored]:
    """Metrics of one run on `split` of `store` (default: the store it was trained on), and its row outputs.
    `mask_source`: for a run that reads a mask-source store, `store`'s own mask source (the same second encoder
    over `store`'s images), needed when `store` is not the one it trained on."""
    model, cfg, fitted = load_run(run, device)
    if store is None and not exists(cfg.store):
        raise StoreError(f"run {run} was trained on {cfg.store}, which is gone (moved or deleted); if it moved, "
                         "pass --store NEW_LOCATION (the encoder is checked against the run's)")
    store = store or cfg.store
    fs, views = _features_to_score(run, cfg, model.spec.level, store, manifest, split, mask_source)
    y = targets(fs, cfg.task, cfg.classes)
    result = {"run": str(run), "store": store, "split": split, "head": cfg.head, "seed": cfg.seed,
              "level": model.spec.level,
              "tta_views": views}
    if manifest is not None and Path(manifest).resolve() != Path(cfg.manifest).resolve():
        result["labels"] = str(manifest)  # other labels for the same images: written apart (eval-...@<name>)
    if cfg.task == "expr":
        fs, y, result["excluded"] = _without_unknown_labels(fs, y)
    if not len(y):
        raise ConfigError(f"the {split} split of {store_name(store)} has no labelled sample of the run's classes "
                          f"({', '.join(cfg.classes)}) to score")
    logits = predict_logits(model, to_device(fs, y, device))
    prob = (torch.softmax(logits, 1) if cfg.task == "expr" else torch.sigmoid(logits)).cpu().numpy()
    out = Scored(fs.sample_id, fs.subject, fs.label, y, prob, list(cfg.classes), cfg.task, fitted.thresholds)
    if cfg.task == "expr":
        result.update(metrics.classification(y, out.decisions()["pred"], cfg.classes))
        # ECE of the raw softmax, and after the temperature the run fitted on its own validation split: on
        # another dataset, whether that in-domain calibration still holds
        result.update(metrics.calibration(logits.cpu().numpy(), y, fitted.temperature))
    else:
        result.update(metrics.au(y, prob, cfg.classes, fitted.thresholds))
    return result, out


def _features_to_score(run, cfg: RunConfig, level: str, store: str, manifest, split: str,
                       mask_source: str | None = None) -> tuple[FeatureSet, list[str]]:
    """The `split` rows of `store` the run is scored on, labelled by `manifest` (default: the run's own on its own
    store, else the store's), and the cached views averaged in at test time; refused when the store's encoder is
    not the run's, the run is stale, or a mask-source head meets another store without that store's source."""
    _check_same_encoder(cfg, store)
    _check_not_stale(run, cfg, store, manifest)
    own_store = same_location(store, cfg.store)
    source = _mask_source_for(cfg, store, own_store, mask_source)
    labels_from = manifest or (cfg.manifest if own_store else None)  # else the store's own manifest
    # Test-time augmentation over the cached views the head trained with, where this store has them too.
    views = [v for v in tta_views(cfg.views) if v in store_views(store)]
    fs = load_features(store, labels_from, cfg.output, source, views=views)
    if split == "val" and own_store and labels_from == cfg.manifest:
        fs = _val_as_trained(fs, run, cfg)
    return _rows_to_score(fs, split, store, level, cfg), views


def _mask_source_for(cfg: RunConfig, store: str, own_store: bool, given: str | None) -> str | None:
    """The mask-source store to join to `store`'s rows: the run's own on its training store; on another store,
    `given`, which must come from the encoder the run's source came from (the mask MLP reads its features)."""
    if given and not cfg.mask_source:
        raise ConfigError(f"mask source {given} given, but this run reads no mask-source store")
    if not cfg.mask_source or (own_store and not given):
        return cfg.mask_source
    if not given:
        raise ConfigError(f"this head reads a second (mask-source) store; to score it on {store_name(store)}, give "
                          f"that store's mask source (the same encoder as {store_name(cfg.mask_source)}, over "
                          f"{store_name(store)}'s images)")
    if own_store and not same_location(given, cfg.mask_source):
        raise ConfigError(f"on its own training store this run reads its own mask source {cfg.mask_source}, not "
                          f"{given}")
    check_same_encoder([cfg.mask_source, given])
    return given


def _val_as_trained(fs: FeatureSet, run, cfg: RunConfig) -> FeatureSet:
    """The rows as the run saw them: when its manifest has no val split, the one it carved from train (by subject,
    seeded by the run's seed), carved again the same way, so `--split val` scores what selection scored."""
    if (fs.split == "val").any():
        return fs
    trained = json.loads((Path(run) / "metrics.json").read_text())["selection"]["val_source"]
    kept = fs.take(fs.label != "") if cfg.task == "expr" else fs  # as train.prepare does before carving
    carved = carve_val(kept.take(kept.split != "test"), seed=cfg.seed)
    if carved.notes["val_source"] != trained:
        raise ConfigError(f"cannot carve the validation split of run {run} again ({trained!r} then, "
                          f"{carved.notes['val_source']!r} now)")
    return carved


def _rows_to_score(fs: FeatureSet, split: str, store: str, level: str, cfg: RunConfig) -> FeatureSet:
    """`split`'s rows (clips for a clip-level head); for expressions, only the labelled ones."""
    if not (fs.split == split).any():
        have = ", ".join(f"{s} ({n})" for s, n in zip(*np.unique(fs.split, return_counts=True)))
        raise ConfigError(f"{store_name(store)} has no {split!r} rows; its manifest's splits: {have}")
    fs = fs.rows(split)
    if level == "clip":
        fs = clip_level(fs, cfg.recipe["max_frames"])
    return fs.take(fs.label != "") if cfg.task == "expr" else fs


def _without_unknown_labels(fs: FeatureSet, y: np.ndarray) -> tuple[FeatureSet, np.ndarray, dict]:
    """Labels outside the training label set cannot be predicted: excluded, and counted per label."""
    scored = y >= 0
    excluded = {str(lbl): int((fs.label[~scored] == lbl).sum()) for lbl in np.unique(fs.label[~scored])}
    return fs.take(scored), y[scored], {"n": int(sum(excluded.values())), "by_label": excluded}


def with_intervals(result: dict, scored: Scored, n_boot: int = metrics.N_BOOT) -> dict:
    """`result` plus 95% bootstrap intervals of its headline metrics, resampling subjects (see metrics)."""
    clusters = scored.clusters()
    if len(clusters) == 0:
        return result
    n_clusters = len(np.unique(clusters))
    unit = "subjects" if n_clusters < len(clusters) else "samples (no subject shared by two)"
    return {**result, "ci95": metrics.bootstrap_ci(scored.metric_draws, clusters, n_boot),
            "ci_method": f"percentile bootstrap, {n_boot} resamples of the {n_clusters} {unit}, seed 0"}


def evaluate_run(run: str | Path, store: str | None = None, manifest=None, split: str = "test",
                 write: bool = True, device: str = "cpu", errors: int = 0, root: str | Path | None = None,
                 mask_source: str | None = None) -> dict:
    """Metrics of one run on `split` of `store`, with 95% intervals; written beside the run (eval-<store>-<split>/).

    `errors`: also draw the run's `errors` most confident mistakes (images read under data root `root`, else the
    one the store records).
    """
    check_errors(errors)
    result, scored = score_run(run, store, manifest, split, device, mask_source)
    if errors and scored.task != "expr":
        raise ConfigError("--errors shows expression mistakes; for AU runs "
                          "read predictions.csv (truth, decision, p per AU)")
    result = with_intervals(result, scored)
    if write:
        # the mistakes' images before anything is written: a wrong data root left one seed's evaluation written
        gallery = _error_images(result, scored, errors, root)  # and the other seeds unscored
        out = _write_eval(Path(run), result, scored)
        if errors:
            result["errors_png"] = str(error_gallery(out / "errors.png", result, scored, *gallery))
            result["errors_shown"] = len(gallery[0])
    return result


def check_errors(errors) -> None:
    """`errors` (how many mistakes to draw) is a whole number >= 0: a pipeline's `errors = -1` or `"12"` is said
    before its first step, not taken for none or drawn as a slice."""
    if isinstance(errors, bool) or not isinstance(errors, int) or errors < 0:
        raise ConfigError(f"errors={errors!r}: how many of the surest mistakes to draw, a whole number >= 0")


def _error_images(result: dict, s: Scored, k: int, root: str | Path | None) -> tuple[list, list[np.ndarray]]:
    """The k surest mistakes (`confident_errors`) and their images (`unit_images`: under `root`, else the store's)."""
    from .data import unit_images

    surest = confident_errors(s, k) if k else []
    return surest, unit_images(result["store"], [e[0] for e in surest], root) if surest else []


def confident_errors(s: Scored, k: int) -> list[tuple[str, str, str, float]]:
    """The k mistakes the head was surest of, surest first: (sample_id, true, predicted, p(predicted))."""
    pred = s.decisions()["pred"]
    wrong = np.flatnonzero(pred != s.y)
    surest = wrong[np.argsort(-s.prob[wrong, pred[wrong]], kind="stable")][:k]
    return [(str(s.sample_id[i]), s.classes[s.y[i]], s.classes[pred[i]], float(s.prob[i, pred[i]])) for i in surest]


def error_gallery(path: Path, result: dict, s: Scored, errors: list[tuple[str, str, str, float]],
                  images: list[np.ndarray]) -> Path:
    """errors.png: `errors` (from `confident_errors`) as `images` captioned `true -> predicted p`: label noise and
    systematic confusions show at a glance (FER2013 has many of the first)."""
    captions = [f"{t} → {p} {prob:.2f}\n{sid.rsplit('/', 1)[-1][-20:]}" for sid, t, p, prob in errors]
    wrong = int((s.decisions()["pred"] != s.y).sum())
    title = (f"{result['head']} on {store_name(result['store'])}:{result['split']}: the {len(errors)} surest of "
             f"{wrong} mistakes")
    return report.gallery_png(path, images, captions, title)


def labels_tag(manifest: str | Path) -> str:
    """`@name` of a manifest given to score on other labels (`fer2013-noleak.csv.gz` -> `@fer2013-noleak`)."""
    name = Path(manifest).name
    for suffix in (".gz", ".csv"):
        name = name.removesuffix(suffix)
    return f"@{name}"


def eval_name(result: dict) -> str:
    """Where an evaluation is written beside its run, and its column in the ledger: `<store> <split>[ @labels]`."""
    return f"{store_name(result['store'])} {result['split']}" + (f" {labels_tag(result['labels'])}"
                                                                 if "labels" in result else "")


def _write_eval(run: Path, result: dict, scored: Scored) -> Path:
    out = run / ("eval-" + eval_name(result).replace(" ", "-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    _write_predictions(out / "predictions.csv", scored)
    if "confusion" in result:
        classes = result["classes"]
        report.write_csv(out / "confusion.csv", ["true \\ predicted"] + classes,
                         [[c] + row for c, row in zip(classes, result["confusion"])])
        report.confusion_png(out / "confusion.png", result["confusion"], classes,
                             f"{result['head']} on {store_name(result['store'])} {result['split']}: acc "
                             f"{100 * result['accuracy']:.1f}%, UAR {100 * result['uar']:.1f}%, n={result['n']}")
    if "reliability" in result:
        report.reliability_png(out / "reliability.png", result,
                               f"{result['head']} on {store_name(result['store'])} {result['split']}, n={result['n']}")
    result["out"] = str(out)
    return out


def _write_predictions(path: Path, s: Scored) -> Path:
    """One row per scored sample (clip): its id, subject, truth, decision and probabilities, for error analysis."""
    if s.task == "expr":
        header = ["sample_id", "subject", "label", "prediction", "correct"] + [f"p_{c}" for c in s.classes]
        pred = s.decisions()["pred"]
        rows = [[i, subj, s.classes[t], s.classes[p], int(t == p)] + [f"{v:.5f}" for v in pr]
                for i, subj, t, p, pr in zip(s.sample_id, s.subject, s.y, pred, s.prob)]
    else:
        tuned = s.decisions()["tuned"]
        header = ["sample_id", "subject"] + [f"{a}_{k}" for a in s.classes for k in ("true", "pred", "p")]
        rows = [[i, subj] + [v for a in range(len(s.classes)) for v in (yt[a], pt[a], f"{pr[a]:.5f}")]
                for i, subj, yt, pt, pr in zip(s.sample_id, s.subject, s.y, tuned, s.prob)]
    return report.write_csv(path, header, rows)


def over_seeds(results: list[dict],
               keys=("accuracy", "uar", "macro_f1", "ece", "macro_f1_at_0.5", "macro_f1_tuned")) -> dict:
    """mean and std over seeds of each headline metric present."""
    out = {}
    for k in keys:
        vals = [r[k] for r in results if k in r]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n_seeds": len(vals)}
    return out


def format_summary(summary: dict) -> str:
    """`accuracy 47.19 ± 0.01, uar ...`: a summary's headline metrics in %, mean ± std over seeds."""
    return ", ".join(f"{k} {100 * v['mean']:.2f} ± {100 * v['std']:.2f}" for k, v in summary.items())


def evaluate(run: str | Path, store: str | None = None, manifest=None, split: str = "test", device: str = "cpu",
             errors: int = 0, root: str | Path | None = None) -> dict:
    """Evaluate a run (or every seed under it); returns per-seed results and mean/std."""
    results = [evaluate_run(r, store, manifest, split, device=device, errors=errors, root=root) for r in run_dirs(run)]
    return {"runs": results, "summary": over_seeds(results)}


def score_line(r: dict) -> str:
    """One evaluated run: its headline scores with their 95% intervals, and where the full report went."""
    names = {"accuracy": "acc", "uar": "UAR", "macro_f1": "macro-F1"} if "accuracy" in r \
        else {"macro_f1_at_0.5": "AU macro-F1 @0.5", "macro_f1_tuned": "tuned"}
    ci = r.get("ci95", {})
    interval = lambda k: f" [{100 * ci[k][0]:.1f}, {100 * ci[k][1]:.1f}]" if k in ci else ""  # noqa: E731
    scores = "  ".join(f"{name} {100 * r[k]:.2f}{interval(k)}" for k, name in names.items())
    if "ece" in r:  # calibration: raw, and after the temperature the run fitted on its validation split
        scores += f"  ECE {100 * r['ece']:.1f}{interval('ece')}"
        scores += f" (T={r['temperature']:.2f}: {100 * r['ece_ts']:.1f})" if "ece_ts" in r else ""
    excl = f"  (excluded {r['excluded']['n']})" if r.get("excluded", {}).get("n") else ""
    return f"{r['run']} on {r['store']}:{r['split']}  n={r['n']}  {scores}{excl}  -> {r['out']}"


def summarize(result: dict) -> str:
    """What `evaluate` prints, on the command line and in a pipeline: a score line per seed run (with where its
    surest mistakes were drawn), and the mean ± std over seeds."""
    lines = [score_line(r) + (f"\n  surest mistakes -> {r['errors_png']}" if "errors_png" in r else "")
             for r in result["runs"]]
    if len(result["runs"]) > 1:
        lines.append("mean ± std: " + format_summary(result["summary"]))
    return "\n".join(lines)
