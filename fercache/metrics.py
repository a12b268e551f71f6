"""Classification and AU metrics (METHODS.md §5): WAR, UAR, macro-F1, per-class recall, confusion; per-AU F1."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, recall_score


def classification(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy (WAR), UAR (mean recall over classes present), macro-F1, per-class recall, confusion matrix."""
    labels = np.arange(len(class_names))
    present = np.unique(y_true)
    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "uar": float(recall[present].mean()) if len(present) else float("nan"),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "per_class_recall": {class_names[i]: float(recall[i]) for i in present},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(class_names),
    }


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    known = y >= 0
    return float(f1_score(y[known], pred[known], zero_division=0)) if known.any() else float("nan")


def tune_thresholds(y: np.ndarray, prob: np.ndarray, grid=np.linspace(0.05, 0.95, 19)) -> np.ndarray:
    """Per-AU threshold maximising F1 (call on the validation split only)."""
    return np.array([max(grid, key=lambda t: _f1(y[:, a], (prob[:, a] >= t).astype(int))) for a in range(y.shape[1])])


def au(y: np.ndarray, prob: np.ndarray, au_names: list[str], thresholds: np.ndarray | None = None) -> dict:
    """Per-AU F1 at 0.5 and at the given thresholds, macro-F1 of each, and the always-positive baseline."""
    thresholds = np.full(y.shape[1], 0.5) if thresholds is None else thresholds
    f1_05 = [_f1(y[:, a], (prob[:, a] >= 0.5).astype(int)) for a in range(y.shape[1])]
    f1_t = [_f1(y[:, a], (prob[:, a] >= thresholds[a]).astype(int)) for a in range(y.shape[1])]
    f1_pos = [_f1(y[:, a], np.ones(len(y), dtype=int)) for a in range(y.shape[1])]
    return {
        "n": int(len(y)),
        "per_au_f1_at_0.5": dict(zip(au_names, f1_05)), "macro_f1_at_0.5": float(np.nanmean(f1_05)),
        "per_au_f1_tuned": dict(zip(au_names, f1_t)), "macro_f1_tuned": float(np.nanmean(f1_t)),
        "thresholds": dict(zip(au_names, map(float, thresholds))),
        "per_au_f1_always_positive": dict(zip(au_names, f1_pos)), "macro_f1_always_positive": float(np.nanmean(f1_pos)),
        "positives": {n: int((y[:, a] == 1).sum()) for a, n in enumerate(au_names)},
    }
