"""Tables and plots: markdown/CSV matrices, confusion-matrix and heatmap PNGs (matplotlib, headless)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ConfigError


def _subplots(*args, figsize, **kw):
    """(figure, axes) on a plain matplotlib Figure: pyplot would pick (or be switched to) a process-wide backend,
    replacing a notebook's inline one, and keep every figure alive until closed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # this figure's own canvas; the process-wide backend is left as it is
    return fig, fig.subplots(*args, **kw)


def _save(fig, path: Path, dpi: int, margins: dict | None = None) -> Path:
    """Lay out and write a figure. A plot drawn once per run (a sweep draws hundreds) gets fixed `margins`
    (subplots_adjust: tight_layout's measuring pass was a third of its cost) and light PNG compression."""
    if margins:
        fig.subplots_adjust(**margins)
        fig.savefig(path, dpi=dpi, pil_kwargs={"compress_level": 1})
    else:
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    return path


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def cell(value) -> str:
    """A setting as a table shows it: None is the head's default; lists stay compact; strings unquoted."""
    if value is None:
        return "default"
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def mean_std(mean: float, std: float, n: int, digits: int = 2) -> str:
    """`47.39 ± 0.28` over n > 1 seeds; one seed has no spread to show, and `68.9 ± 0.0` read as a stable result."""
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def over_seeds(n: int) -> str:
    """How a table's `mean_std` cells were taken, for its title."""
    return f"mean ± std over {n} seeds" if n > 1 else "one seed (no ± std)"


def duration(seconds: float) -> str:
    """`0.4 s`, `12 s`, `3 min 12 s`, `1 h 02 min`: how long a step took, at the precision anyone reads it."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


#: A spreadsheet runs a cell that starts with one of these as a formula (`=HYPERLINK(...)` in a file name).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    """`value` as a CSV cell a spreadsheet shows as text: a string starting a formula gets a leading quote. Numbers,
    and strings that are plain numbers (`-0.91`), are kept as they are."""
    if not isinstance(value, str) or not value.startswith(FORMULA_START):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def sibling(base: Path, ext: str) -> Path:
    """`base` + `ext`: a table's .md/.csv/.png/.json, also when its name holds a dot (cross-au-macro_f1_at_0.5),
    which `with_suffix` would cut."""
    return base.with_name(base.name + ext)


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    """A CSV for people (tables, predictions, ledgers), every text cell made safe to open in a spreadsheet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([safe_cell(h) for h in header])
        w.writerows([safe_cell(v) for v in row] for row in rows)
    return path


def check_replaceable(path: Path, header: list[str] | Callable[[list[str]], bool], flag: str) -> None:
    """Refuse to write over a file fercache did not write: an existing CSV is replaced only when its header is the
    one this output writes (or one `header` accepts: an earlier run of the same command), a JSON only when it is a
    list of objects with a `path`, as predict writes. `-o` or `--csv` naming a manifest or a dataset's label file
    would destroy it."""
    if not path.is_file():
        return
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix == ".json":
                data = json.load(f)
                ours = isinstance(data, list) and all(isinstance(r, dict) and "path" in r for r in data)
            else:
                first = next(csv.reader(f), [])
                ours = header(first) if callable(header) else first == [safe_cell(h) for h in header]
    except (OSError, UnicodeDecodeError, ValueError, csv.Error):
        ours = False
    if not ours:
        raise ConfigError(f"{flag} {path} exists and is not a file this command wrote; writing there would "
                              "destroy it: choose another name, or remove the file first")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def confusion_png(path: Path, confusion: list[list[int]], classes: list[str], title: str) -> Path:
    """Row-normalised confusion matrix with counts; each true class is labelled with its recall and size."""
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = _subplots(figsize=(2.5 + 0.8 * len(classes), 1 + 0.7 * len(classes)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    # Recall per class beside its name: the number FER papers report, and what UAR averages.
    ax.set_yticks(range(len(classes)),
                  [f"{c}  {100 * norm[i, i]:.0f}% of {int(cm[i].sum())}" for i, c in enumerate(classes)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (recall of n)")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black",
                    fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path, 120)


def gallery_png(path: Path, images: list[np.ndarray], captions: list[str], title: str, cols: int = 8) -> Path:
    """Images in a grid, each with its caption below (grayscale-looking faces stay as they are: RGB, no colormap)."""
    rows = max(1, -(-len(images) // cols))
    fig, axes = _subplots(rows, cols, figsize=(1.6 * cols, 1.95 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, cap in zip(axes.ravel(), images, captions):
        ax.imshow(img)
        ax.set_title(cap, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path, 110)


def hist_png(path: Path, groups: dict[str, np.ndarray], threshold: float, xlabel: str, title: str) -> Path:
    """Overlaid histograms (log counts) of a score per group, with a threshold marked."""
    fig, ax = _subplots(figsize=(7, 3.2))
    lowest = min([0.5] + [float(v.min()) for v in groups.values() if len(v)])
    for name, values in groups.items():
        ax.hist(values, bins=np.linspace(lowest, 1, 101), alpha=0.6, label=name)
    ax.axvline(threshold, color="red", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.legend()
    ax.set_title(title, fontsize=9)
    return _save(fig, path, 120)


def heatmap_png(path: Path, mean: np.ndarray, std: np.ndarray | None, rows: list[str], cols: list[str], title: str,
                lower_is_better: bool = False, row_prefix: str = "train: ", col_prefix: str = "test: ") -> Path:
    """Cross-dataset matrix (rows trained on, columns tested on) as a heatmap of mean +- std (%; std None: one
    seed, the mean alone); bright is good either way (the colour scale turns over for a lower-is-better metric
    such as ECE)."""
    fig, ax = _subplots(figsize=(1.5 + 1.6 * len(cols), 1.2 + 0.8 * len(rows)))
    ax.imshow(mean, cmap="viridis_r" if lower_is_better else "viridis", vmin=0, vmax=100)
    good = 100 - mean if lower_is_better else mean
    ax.set_xticks(range(len(cols)), [f"{col_prefix}{c}" for c in cols])
    ax.set_yticks(range(len(rows)), [f"{row_prefix}{r}" for r in rows])
    for i in range(len(rows)):
        for j in range(len(cols)):
            text = f"{mean[i, j]:.1f}" + ("" if std is None else f"\n±{std[i, j]:.1f}")
            ax.text(j, i, text, ha="center", va="center", color="white" if good[i, j] < 60 else "black", fontsize=9)
    ax.set_title(_wrapped(title, fig), fontsize=9)
    return _save(fig, path, 120)


def _wrapped(title: str, fig) -> str:
    """A title broken into lines that fit the figure's width (tight_layout keeps it in, but cannot shorten it)."""
    import textwrap

    return textwrap.fill(title, max(30, int(fig.get_figwidth() * 15)))


def training_png(path: Path, history: list[dict], metric: str, best_epoch: int, title: str) -> Path:
    """Training loss and the validation metric per epoch, with the epoch that selection kept."""
    epochs = [h["epoch"] for h in history]
    fig, ax = _subplots(figsize=(6, 3.5))
    ax.plot(epochs, [h["loss"] for h in history], color="tab:gray", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [100 * h[f"val_{metric}"] for h in history], color="tab:blue", marker=".", label=f"val {metric}")
    ax2.set_ylabel(f"val {metric} (%)")
    if best_epoch:  # in the legend, not as text on the axes, where it landed on the curves
        ax2.axvline(best_epoch, color="tab:blue", linestyle=":", linewidth=1, label=f"kept: epoch {best_epoch}")
    lines = ax.get_lines() + ax2.get_lines()
    # Below the axes: any spot inside them can hold a curve (a loss near 0, a validation dip).
    ax2.legend(lines, [ln.get_label() for ln in lines], loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3,
               fontsize=8, frameon=False)
    ax.set_title(title, fontsize=9)
    return _save(fig, path, 110, margins={"left": 0.11, "right": 0.88, "top": 0.91, "bottom": 0.3})


def ranking_png(path: Path, labels: list[str], mean: list[float], std: list[float], xlabel: str, title: str) -> Path:
    """A dot per point with its seed spread, best at the top: a sweep at a glance. Dots, not bars, because the
    axis is zoomed to the points' range, where a bar's length would mean nothing."""
    n = len(labels)
    fig, ax = _subplots(figsize=(6.5, 1.0 + 0.32 * n))
    pos = np.arange(n)[::-1]
    ax.errorbar(mean, pos, xerr=std, fmt="o", color="tab:gray", ecolor="tab:gray", capsize=3)
    ax.errorbar(mean[:1], pos[:1], xerr=std[:1], fmt="o", color="tab:blue", ecolor="tab:blue", capsize=3)
    ax.set_yticks(pos, labels, fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    for p, m, s in zip(pos, mean, std):
        ax.annotate(f"{m:.2f}", (m + s, p), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    return _save(fig, path, 110)


def paired_png(path: Path, labels: list[str], ours: list[float], theirs: list[float], title: str) -> Path:
    """One line per compared number from the published value (hollow) to fercache's (filled): how far and which
    way each cell departs from the paper, at a glance."""
    n = max(1, len(labels))
    fig, ax = _subplots(figsize=(7.5, 1.6 + 0.3 * n))
    pos = np.arange(len(labels))[::-1]
    ax.hlines(pos, theirs, ours, color="tab:gray", linewidth=1)
    ax.plot(theirs, pos, "o", mfc="white", color="tab:orange", label="published")
    ax.plot(ours, pos, "o", color="tab:blue", label="fercache")
    ax.set_yticks(pos, labels, fontsize=7)
    ax.set_ylim(-0.7, n - 0.3)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("%")
    ax.set_title(_wrapped(title, fig), fontsize=9)
    # the legend in a strip of its own at the bottom (a fixed 0.35 inch), under the x label at any height
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    return path


def reliability_png(path: Path, result: dict, title: str) -> Path:
    """Reliability diagram: accuracy against confidence per bin (on the diagonal = calibrated; below it =
    over-confident), raw softmax and, where the run fitted one on validation, after its temperature; beneath,
    how many predictions fall in each bin, so a far-off but empty bin is not mistaken for a problem."""
    curves = [("raw softmax", result["reliability"], result["ece"], "tab:blue")]
    if "reliability_ts" in result:
        curves.append((f"T = {result['temperature']:.2f} (fit on val)", result["reliability_ts"], result["ece_ts"],
                       "tab:orange"))
    fig, (ax, axn) = _subplots(2, 1, figsize=(5, 6.3), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="gray", lw=1, linestyle="--")
    edges = np.asarray(curves[0][1]["edges"])
    width = np.diff(edges)
    for i, (name, rel, ece, color) in enumerate(curves):
        conf, acc = (np.asarray(rel[k], dtype=float) for k in ("confidence", "accuracy"))
        full = np.asarray(rel["n"]) > 0
        ax.plot(conf[full], acc[full], marker="o", color=color, label=f"{name}: ECE {100 * ece:.1f}%")
        axn.bar(edges[:-1] + i * width / len(curves), rel["n"], width / len(curves), align="edge", color=color,
                alpha=0.8)
    ax.set_xlim(0, 1.02)  # room for the markers of bins at 0 or 1
    ax.set_ylim(-0.02, 1.03)
    ax.set_ylabel("accuracy in bin")
    # Under the figure: a small split's bins land anywhere on the axes, the legend's corner too.
    axn.legend(*ax.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, -0.5), fontsize=8,
               frameon=False, title="below the diagonal: over-confident; above: under-confident", title_fontsize=7)
    ax.set_title(title, fontsize=9)
    axn.set_xlabel("confidence (probability of the predicted class)")
    axn.set_ylabel("predictions")
    return _save(fig, path, 110)


def curve_png(path: Path, x: list[float], mean: list[float], std: list[float], xlabel: str, ylabel: str,
              title: str) -> Path:
    """A metric against one numeric setting (shots, a learning rate), seed spread shaded; the x axis is
    logarithmic when the values span a factor of 10 or more, as shot counts and learning rates do."""
    order = np.argsort(x)
    x, mean, std = (np.asarray(v, dtype=float)[order] for v in (x, mean, std))
    fig, ax = _subplots(figsize=(6, 3.4))
    ax.plot(x, mean, marker="o", color="tab:blue")
    ax.fill_between(x, mean - std, mean + std, color="tab:blue", alpha=0.2, linewidth=0)
    if x.min() > 0 and x.max() / x.min() >= 10:
        ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.minorticks_off()
    for xi, m in zip(x, mean):
        ax.annotate(f"{m:.1f}", (xi, m), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return _save(fig, path, 110)


def au_png(path: Path, aus: list[str], series: dict[str, list[float]], title: str) -> Path:
    """Per-AU F1 (%) of each series side by side, the baseline last: which AUs a detector gets, at a glance."""
    n, k = len(aus), len(series)
    fig, ax = _subplots(figsize=(6.5, 1.2 + 0.45 * n))
    height = 0.8 / k
    colors = ["tab:blue", "tab:green", "tab:gray"] + ["tab:orange"] * k
    for j, (name, values) in enumerate(series.items()):
        pos = np.arange(n)[::-1] + (k - 1 - 2 * j) * height / 2
        ax.barh(pos, values, height=height, color=colors[j], label=name)
        for p, v in zip(pos, values):
            ax.annotate(f"{v:.0f}", (v, p), xytext=(2, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(np.arange(n)[::-1], aus, fontsize=8)
    ax.set_xlim(0, 105)
    ax.set_xlabel("F1 (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14 - 0.3 / n), ncol=k, frameon=False)
    ax.set_title(title, fontsize=9)
    return _save(fig, path, 110)


def timeline_png(path: Path, seconds: np.ndarray, prob: np.ndarray, classes: list[str], title: str,
                 stacked: bool = True, xlabel: str = "time (s)") -> Path:
    """Class probabilities over a video's time: stacked (they sum to 1: an expression run) or as lines (AUs, each
    its own probability); the argmax class of each moment is the widest band."""
    fig, ax = _subplots(figsize=(9, 3.4))
    colors = _colormap("tab10" if len(classes) <= 10 else "tab20").colors
    if stacked:
        ax.stackplot(seconds, 100 * prob.T, labels=classes, colors=colors[:len(classes)], alpha=0.85)
    else:
        for k, c in enumerate(classes):
            ax.plot(seconds, 100 * prob[:, k], label=c, color=colors[k % len(colors)], linewidth=1)
    ax.set_xlim(seconds[0], seconds[-1] if len(seconds) > 1 else seconds[0] + 1)
    ax.set_ylim(0, 100)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("probability (%)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(title, fontsize=9)
    return _save(fig, path, 110)


def frame(data):
    """A pandas DataFrame of rows (a list of dicts) or columns (a dict of arrays); pandas is optional."""
    try:
        import pandas as pd
    except ImportError:
        raise ConfigError("to_frame() needs pandas: pip install pandas") from None
    return pd.DataFrame(data)
