"""fercache from Python (a notebook): load a store's features, fit a head on them or on arrays from another tool,
and the cross-dataset matrix and sweeps, each returning a dataclass that renders as a table in Jupyter.

    import fercache
    feats = fercache.load("stores/rafdb.zarr")
    head = fercache.fit(feats, head="linear")
    head.score(*feats.split_of("test"))
    fercache.cross(["stores/rafdb.zarr", "stores/ferplus.zarr"], heads=["linear", "mask"])
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import metrics, report
from .data import FeatureSet, load_features
from .errors import ConfigError
from .labels import CANONICAL
from .loop import predict_logits
from .protocols import CrossResult, cross_matrix
from .rundir import Fitted, RunConfig, load_run, save_run
from .sweeps import SweepResult
from .sweeps import sweep as run_sweep
from .train import Trained, fit_features, fit_seeds


@dataclass
class Features:
    """A store's features with their manifest's labels, splits, subjects and AUs (rows that decoded fine)."""

    x: np.ndarray  # [N, D]
    label: np.ndarray  # canonical names, "" where none
    split: np.ndarray
    subject: np.ndarray
    sample_id: np.ndarray
    au: np.ndarray | None = None  # [N, A]: 1, 0, or -1 where not annotated
    au_names: list[str] = field(default_factory=list)
    store: str | None = None

    def __len__(self) -> int:
        return len(self.x)

    def __repr__(self) -> str:
        splits = ", ".join(f"{s} {n}" for s, n in zip(*np.unique(self.split, return_counts=True)))
        return f"Features({len(self)} rows x {self.x.shape[-1]} dims; {splits}; from {self.store or 'arrays'})"

    def split_of(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(X, labels) of one split, e.g. `head.score(*feats.split_of("test"))`."""
        rows = self.split == split
        return self.x[rows], self.label[rows]

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in (("x", self.x), ("label", self.label), ("split", self.split),
                                  ("subject", self.subject), ("sample_id", self.sample_id), ("au", self.au))
                if v is not None}

    def to_torch(self) -> dict[str, torch.Tensor]:
        """The numeric arrays as tensors: x (float32) and, when there are AUs, au."""
        return {k: torch.as_tensor(v, dtype=torch.float32 if k == "x" else None)
                for k, v in self.to_numpy().items() if k in ("x", "au")}

    def to_frame(self):
        """One row per sample: sample_id, label, split, subject, the AUs, then the features f0 ... f<D-1>."""
        meta = {"sample_id": self.sample_id, "label": self.label, "split": self.split, "subject": self.subject}
        aus = {a: self.au[:, i] for i, a in enumerate(self.au_names)} if self.au is not None else {}
        return report.frame({**meta, **aus, **{f"f{i}": self.x[:, i] for i in range(self.x.shape[-1])}})


def load(store: str | Path, manifest: str | Path | None = None, output: str | None = None) -> Features:
    """The features of a complete store (`output`: which of its outputs; default the store's own) with the labels
    of its manifest, or of `manifest` (other labels for the same images)."""
    fs = load_features(str(store), manifest, output)
    return Features(fs.x.astype(np.float32), fs.label, fs.split, fs.subject, fs.sample_id, fs.au, fs.au_names,
                    str(store))


def _from_arrays(x, y, groups=None, split=None) -> FeatureSet:
    """A FeatureSet of arrays from elsewhere: `y` canonical names, `groups` subjects (default: one per row),
    `split` train/val/test per row (default: all train; validation is then carved from it by group)."""
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y).astype(str)
    if x.ndim != 2 or len(x) != len(y):
        raise ConfigError(f"X must be [N, D] and y [N]; got {x.shape} and {y.shape}")
    if unknown := sorted(map(str, set(y) - set(CANONICAL) - {""})):
        raise ConfigError(f"labels {unknown[:5]} are not fercache's class names ({', '.join(CANONICAL)}); map them "
                          "first, as the manifest adapters do")
    n = len(x)
    subject = np.asarray(groups).astype(str) if groups is not None else np.array([f"row{i}" for i in range(n)])
    split = np.asarray(split).astype(str) if split is not None else np.full(n, "train")
    return FeatureSet(sample_id=np.array([str(i) for i in range(n)]), x=x, label=y, split=split, subject=subject,
                      notes={"manifest": "<arrays>"})


@dataclass
class FittedHead:
    """A head fitted on cached features, one model per seed (their probabilities are averaged)."""

    head: str
    classes: list[str]
    task: str
    models: list[nn.Module]
    fitted: list[Fitted]
    results: list[dict]  # per seed: what its metrics.json holds
    configs: list[RunConfig | None] = field(default_factory=list)  # None: fitted on arrays (no store to record)

    def __repr__(self) -> str:
        sel = self.results[0]["selection"]
        val = np.mean([r["val"][sel["metric"]] for r in self.results])
        return (f"FittedHead({self.head}, {len(self.models)} seed(s), classes {self.classes}; validation "
                f"{sel['metric']} {100 * val:.2f}%)")

    def predict_proba(self, x) -> np.ndarray:
        """[N, C]: class probabilities (softmax at each run's validation temperature), or per-AU probabilities."""
        data = {"x": torch.as_tensor(np.asarray(x, dtype=np.float32))}
        probs = []
        for model, fitted in zip(self.models, self.fitted):
            logits = predict_logits(model, data).float()
            if self.task == "au":
                probs.append(torch.sigmoid(logits))
            else:
                probs.append(torch.softmax(logits / (fitted.temperature or 1.0), 1))
        return torch.stack(probs).mean(0).numpy()

    def predict(self, x) -> np.ndarray:
        """Class names, or for AUs a [N, A] 0/1 matrix at the thresholds tuned on validation (mean over seeds)."""
        prob = self.predict_proba(x)
        if self.task == "au":
            thresholds = np.mean([f.thresholds for f in self.fitted], axis=0)
            return (prob >= thresholds).astype(int)
        return np.array(self.classes)[prob.argmax(1)]

    def score(self, x, y) -> dict[str, Any]:
        """The metrics `evaluate` reports (expressions: accuracy, UAR, macro-F1, per class; AUs: per-AU F1), on
        rows whose label is one of the head's classes."""
        prob = self.predict_proba(x)
        if self.task == "au":
            return metrics.au(np.asarray(y), prob, self.classes, np.mean([f.thresholds for f in self.fitted], 0))
        index = {c: i for i, c in enumerate(self.classes)}
        y = np.array([index.get(str(label), -1) for label in np.asarray(y)])
        known = y >= 0
        return metrics.classification(y[known], prob[known].argmax(1), self.classes)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Each seed's run folder under `out_dir` (seed<N>/), exactly as `fercache train-head` writes it."""
        if not self.configs or any(c is None for c in self.configs):
            raise ConfigError("a head fitted on arrays has no store to record: fit it on a store to save a run "
                              "folder that evaluate and predict can use")
        out = []
        for model, config, result, fitted in zip(self.models, self.configs, self.results, self.fitted):
            run_dir = Path(out_dir) / f"seed{config.seed}"
            save_run(run_dir, model, config, result, fitted)
            out.append(run_dir)
        return out


def _from_runs(run_dirs: list[Path]) -> FittedHead:
    loaded = [load_run(d) for d in run_dirs]
    results = [json.loads((d / "metrics.json").read_text()) for d in run_dirs]
    cfg = loaded[0][1]
    return FittedHead(cfg.head, cfg.classes, cfg.task, [m for m, _, _ in loaded], [f for _, _, f in loaded],
                      results, [c for _, c, _ in loaded])


def fit(data: str | Path | Features | np.ndarray, head: str = "linear", *, y=None, groups=None, split=None,
        seeds=(0,), recipe: dict | None = None, out_dir: str | Path | None = None, device: str = "cpu",
        progress: bool = False, **hp) -> FittedHead:
    """Fit `head` (hyperparameters as keywords) on a store, on `load`ed features, or on arrays `data`=X with
    labels `y` (canonical names), optional `groups` (subjects) and `split` (train/val/test per row). The epoch
    is chosen on validation (carved from train by group when there is none), never on test.

    On a store, `out_dir` keeps the run folders `fercache train-head` writes (evaluate, predict and the ledger
    read them); without it nothing is written."""
    if isinstance(data, (str, Path)):
        with tempfile.TemporaryDirectory() if out_dir is None else contextlib.nullcontext(str(out_dir)) as folder:
            runs = fit_seeds(str(data), head, seeds=seeds, out_dir=folder, hp=hp, recipe=recipe, device=device,
                             progress=progress)
            return _from_runs([r.run_dir for r in runs])
    fs = _from_arrays(data, y, groups, split) if y is not None else _as_featureset(data)
    trained: list[Trained] = [fit_features(fs, head, seed=s, hp=hp, recipe=recipe, device=device, progress=progress)
                              for s in seeds]
    first = trained[0]
    return FittedHead(head, first.classes, first.task, [t.model.cpu() for t in trained],
                      [t.fitted for t in trained], [t.result for t in trained], [None] * len(trained))


def _as_featureset(data) -> FeatureSet:
    if not isinstance(data, Features):
        raise ConfigError("fit takes a store path, fercache.load's Features, or arrays X with y=labels")
    return FeatureSet(sample_id=data.sample_id, x=data.x, label=data.label, split=data.split, subject=data.subject,
                      au=data.au, au_names=data.au_names, notes={"manifest": data.store})


@dataclass
class Evaluation:
    """`evaluate`'s scores of one run folder: each seed run's metrics and their mean and std."""

    runs: list[dict]
    summary: dict

    def to_frame(self):
        keys = ("run", "store", "split", "n", "accuracy", "uar", "macro_f1", "ece", "macro_f1_at_0.5")
        return report.frame([{k: r[k] for k in keys if k in r} for r in self.runs])

    def _repr_markdown_(self) -> str:
        from .scoring import summarize

        return "```\n" + summarize({"runs": self.runs, "summary": self.summary}) + "\n```"


def evaluate(run: str | Path, store: str | None = None, manifest=None, split: str = "test",
             device: str = "cpu") -> Evaluation:
    """Score a run folder (or every seed run under it) on `split` of `store` (default: its own)."""
    from .scoring import evaluate as run_evaluate

    result = run_evaluate(run, store, manifest, split, device)
    return Evaluation(result["runs"], result["summary"])


def cross(stores: list[str], heads: list[str] = ("linear",), out_dir: str | Path = "runs/cross", **kw) -> CrossResult:
    """The cross-dataset matrix of each head (`fercache cross`); `kw` as `protocols.cross_matrix` takes them."""
    return cross_matrix(list(stores), list(heads), out_dir, **kw)


def sweep(store: str, head: str, grid: dict[str, list], out_dir: str | Path = "runs/sweep", **kw) -> SweepResult:
    """A grid of hyperparameters or recipe keys ranked on validation (`fercache sweep`)."""
    return run_sweep(store, head, grid, out_dir, **kw)
