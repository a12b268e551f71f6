"""Tables and plots: markdown/CSV matrices, confusion-matrix and heatmap PNGs (matplotlib, headless)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def confusion_png(path: Path, confusion: list[list[int]], classes: list[str], title: str) -> Path:
    """Row-normalised confusion matrix with counts."""
    plt = _plt()
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(classes), 1 + 0.7 * len(classes)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def heatmap_png(path: Path, mean: np.ndarray, std: np.ndarray, rows: list[str], cols: list[str], title: str) -> Path:
    """Cross-dataset matrix (rows trained on, columns tested on) as a heatmap of mean +- std."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(cols), 1.2 + 0.8 * len(rows)))
    ax.imshow(mean, cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(cols)), [f"test: {c}" for c in cols])
    ax.set_yticks(range(len(rows)), [f"train: {r}" for r in rows])
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{mean[i, j]:.1f}\n±{std[i, j]:.1f}", ha="center", va="center",
                    color="white" if mean[i, j] < 60 else "black", fontsize=9)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
