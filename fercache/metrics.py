"""Classification and AU metrics: WAR, UAR, macro-F1, per-class recall, confusion; per-AU F1 (docs/heads.md)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, recall_score


def classification(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy (WAR), UAR (mean recall over the classes present in `y_true`: scikit-learn's balanced accuracy),
    macro-F1, per-class recall, confusion matrix.

    Macro-F1 is scikit-learn's `f1_score(average="macro")`: the mean over every class in the true or the predicted
    labels. A class the test set lacks but the head predicts (neutral on CK+48) scores F1 0 and counts: leaving
    it out would forgive exactly the mistakes a cross-dataset cell is there to show.
    """
    labels = np.arange(len(class_names))
    present = np.unique(y_true)
    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "uar": float(recall[present].mean()) if len(present) else float("nan"),
        "macro_f1": float(f1_score(y_true, y_pred, labels=np.union1d(y_true, y_pred), average="macro",
                                   zero_division=0)),
        "per_class_recall": {class_names[i]: float(recall[i]) for i in present},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(class_names),
    }


def from_confusion(conf: np.ndarray) -> dict[str, float]:
    """Accuracy, UAR and macro-F1 of a confusion matrix (rows true, columns predicted), equal to what
    `classification` computes from the labels: the stacked trainer counts predictions on the device and
    selects epochs on these."""
    tp, true, pred = np.diag(conf), conf.sum(1), conf.sum(0)
    n, present, seen = int(conf.sum()), true > 0, (true + pred) > 0
    f1 = 2.0 * tp[seen] / (1.0 * true[seen] + pred[seen])
    return {"accuracy": float(tp.sum() / n) if n else float("nan"),
            "uar": float((tp[present] / true[present]).mean()) if present.any() else float("nan"),
            "macro_f1": float(f1.mean()) if seen.any() else 0.0}


def au_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, known: np.ndarray) -> float:
    """macro_f1_at_0.5 from per-AU counts at 0.5 (`known`: annotated rows per AU), as `au` computes it."""
    denom = 2.0 * tp + fp + fn
    f1 = [float("nan") if not k else float(2.0 * t / d) if d else 0.0 for t, d, k in zip(tp, denom, known)]
    return float(np.nanmean(f1))


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


# --- Uncertainty: cluster bootstrap over the test set --------------------------------------------------------
# Every resample is a weight per row (how often its cluster was drawn), so a whole chunk of resamples is one
# matrix product with per-row indicators: 1,000 resamples of 100k rows take a second, not a Python loop each.

N_BOOT = 1000


def bootstrap_weights(groups: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, budget: int = 4_000_000):
    """Yield [b, n] row weights of a cluster bootstrap, chunks of b resamples summing to n_boot.

    Clusters (subjects, or clips) are drawn with replacement, as many as there are; each row weighs how often
    its cluster was drawn. Frames of one subject are not independent (CK+'s three frames per sequence are near
    copies), so resampling rows would make the interval too narrow. Seeded: the same run gives the same interval.
    """
    _, cluster = np.unique(groups.astype(str), return_inverse=True)
    n_clusters = int(cluster.max()) + 1 if len(cluster) else 0
    rng = np.random.default_rng(seed)
    step = max(1, budget // max(1, len(groups), n_clusters))
    for start in range(0, n_boot, step):
        b = min(step, n_boot - start)
        draws = rng.integers(0, n_clusters, size=(b, n_clusters)) + n_clusters * np.arange(b)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n_clusters).reshape(b, n_clusters)
        yield counts[:, cluster].astype(np.float64)


def weighted_classification(w: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """accuracy, UAR and macro-F1 of each row of weights `w` [b, n], as `classification` computes them.

    UAR averages over the classes present in that resample's true labels, macro-F1 over those in its true or
    predicted labels, as `classification` does for its sample.
    """
    onehot = np.zeros((len(y_true), k * k))
    onehot[np.arange(len(y_true)), y_true * k + y_pred] = 1
    conf = (w @ onehot).reshape(-1, k, k)  # [b, true, predicted]
    hit, true_n, pred_n = np.diagonal(conf, axis1=1, axis2=2), conf.sum(2), conf.sum(1)
    present, seen = true_n > 0, (true_n + pred_n) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, hit / true_n, 0.0)
        f1 = np.where(seen, 2 * hit / (true_n + pred_n), 0.0)
        return {"accuracy": hit.sum(1) / true_n.sum(1), "uar": recall.sum(1) / present.sum(1),
                "macro_f1": f1.sum(1) / seen.sum(1)}


def weighted_au_f1(w: np.ndarray, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Macro-F1 over AUs (rows [n, A], -1 = not annotated) for each row of weights `w` [b, n], as `au` computes it."""
    known = y >= 0
    tp = w @ (known & (y == 1) & (pred == 1))
    fp = w @ (known & (y == 0) & (pred == 1))
    fn = w @ (known & (y == 1) & (pred == 0))
    annotated = (w @ known) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        return np.where(annotated, f1, 0.0).sum(1) / annotated.sum(1)  # nanmean over annotated AUs, as `au`


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """The central `level` interval of bootstrap samples (NaN resamples, e.g. a class-free draw, ignored)."""
    a = (1 - level) / 2
    return [float(v) for v in np.nanquantile(samples, [a, 1 - a])]


def bootstrap_ci(stats, groups: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, list[float]]:
    """95% intervals of each metric `stats(w)` returns ({name: [b] values}), over cluster-bootstrap weights."""
    draws: dict[str, list[np.ndarray]] = {}
    for w in bootstrap_weights(groups, n_boot, seed):
        for name, v in stats(w).items():
            draws.setdefault(name, []).append(v)
    return {name: percentile_ci(np.concatenate(v)) for name, v in draws.items()}


# --- Calibration: is the probability of the predicted class the chance that it is right? -------------------
# A head can rank classes well and still be over-confident, most of all on a dataset it never saw; a user who
# thresholds its probabilities needs to know. Expected calibration error (top-label, equal-width bins), NLL and
# Brier score, before and after temperature scaling (one scalar T fitted on the validation split; Guo et al.,
# "On calibration of modern neural networks", 2017). T never changes the argmax, so accuracy is untouched.

N_BINS = 15
LOWER_IS_BETTER = frozenset({"ece", "ece_ts", "nll", "nll_ts", "brier", "brier_ts"})


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _bin_of(conf: np.ndarray, n_bins: int) -> np.ndarray:
    return np.minimum((conf * n_bins).astype(int), n_bins - 1)  # a confidence of exactly 1 joins the top bin


def reliability(prob: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Per confidence bin: how many predictions, their mean confidence and their accuracy (NaN where empty)."""
    conf, correct = prob.max(1), (prob.argmax(1) == y)
    b = _bin_of(conf, n_bins)
    n = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = lambda v: np.bincount(b, weights=v, minlength=n_bins) / n  # noqa: E731
        return {"edges": np.linspace(0, 1, n_bins + 1).tolist(), "n": n.tolist(),
                "confidence": mean(conf).tolist(), "accuracy": mean(correct.astype(float)).tolist()}


def weighted_ece(w: np.ndarray, prob: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """ECE under each row of weights `w` [b, n]: sum over bins of |weighted (correct - confidence)| / total weight."""
    conf = prob.max(1)
    gap = np.zeros((len(y), n_bins))
    gap[np.arange(len(y)), _bin_of(conf, n_bins)] = (prob.argmax(1) == y) - conf
    return np.abs(w @ gap).sum(1) / w.sum(1)


def ece(prob: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over confidence bins."""
    return float(weighted_ece(np.ones((1, len(y))), prob, y, n_bins)[0]) if len(y) else float("nan")


def _nll(logits: np.ndarray, y: np.ndarray) -> float:
    return float(-log_softmax(logits)[np.arange(len(y)), y].mean())


T_RANGE = (0.05, 20.0)


def fit_temperature(logits: np.ndarray, y: np.ndarray, lo: float = T_RANGE[0], hi: float = T_RANGE[1],
                    iters: int = 80) -> float:
    """The T in [lo, hi] minimising the NLL of softmax(logits / T): call on the validation split only.

    NLL is convex in 1/T (a log-sum-exp of a linear function of it, minus a linear term), so a golden-section
    search over 1/T finds the minimum without a gradient, a learning rate or a host-side optimiser loop.
    A validation split the head separates perfectly has its minimum at T -> 0: the result is then `lo`.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if len(y) == 0:
        return 1.0
    a, b = 1.0 / hi, 1.0 / lo
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = _nll(logits * c, y), _nll(logits * d, y)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = _nll(logits * c, y)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = _nll(logits * d, y)
    return float(2.0 / (a + b))


def temperature_at_bound(logits: np.ndarray, y: np.ndarray, t: float) -> str | None:
    """What a fitted temperature stuck at an end of T_RANGE says about the head on this split; None inside it.

    At the upper end there are two heads to tell apart: one whose logits carry no information (softmax(z / T)
    is then near uniform) and one whose logits are huge (after a learning rate too high for it, say), whose
    NLL-optimal T lies beyond the bound while softmax(z / T) stays far from uniform. The mean top probability
    after T tells which.
    """
    lo, hi = T_RANGE
    at = f"the calibration temperature hit its bound (T = {t:.2f})"
    if t <= lo * 1.01:
        return (f"{at}: the head separates every validation sample, so its calibrated probabilities are close to "
                "0 or 1; a larger validation split calibrates better")
    if t < hi * 0.99:
        return None
    logits = np.asarray(logits, dtype=np.float64)
    def top(z): return float(np.exp(log_softmax(z)).max(1).mean())
    raw, scaled, acc = top(logits), top(logits / t), float((logits.argmax(1) == np.asarray(y)).mean())
    if scaled < 1.5 / logits.shape[1]:
        return (f"{at}: the head's confidence tells nothing on validation (accuracy {acc:.1%}), so its calibrated "
                "probabilities are close to uniform")
    return (f"{at}: the head is over-confident on validation by more than that factor (mean top probability "
            f"{raw:.1%} raw, {scaled:.1%} at T, accuracy {acc:.1%}): its logits are very large, as after a learning "
            "rate too high for the head")


def calibration(logits: np.ndarray, y: np.ndarray, temperature: float | None = None) -> dict:
    """ECE, NLL and Brier score (sum over classes, 0 to 2) of softmax(logits), with the reliability bins; with a
    `temperature` (fitted on validation), the same of softmax(logits / T) as `*_ts`."""
    def of(z: np.ndarray, suffix: str) -> dict:
        logp = log_softmax(z)
        prob, onehot = np.exp(logp), np.eye(z.shape[1])[y]
        return {f"ece{suffix}": ece(prob, y), f"nll{suffix}": float(-logp[np.arange(len(y)), y].mean()),
                f"brier{suffix}": float(((prob - onehot) ** 2).sum(1).mean()),
                f"reliability{suffix}": reliability(prob, y)}

    logits = np.asarray(logits, dtype=np.float64)
    if len(y) == 0:
        return {}
    out = of(logits, "")
    if temperature is not None:
        out = {**out, "temperature": float(temperature), **of(logits / temperature, "_ts")}
    return out
