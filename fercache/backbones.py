"""Backbones as an axis: one protocol over several encoders' stores of the same datasets, one table.

Each backbone's stores form their own cross-dataset matrix (features of two encoders are never mixed: a head
trained on one cannot read the other). The tables set the backbones side by side per dataset: the in-domain
score, and, with more than one dataset, the mean over the datasets a head did not train on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import report
from .errors import ConfigError, check_out_dir
from .protocols import CrossResult, check_cross_metrics, check_distinct, check_tables, cross_matrix
from .recipe import check_seeds
from .store import store_name


@dataclass(frozen=True)
class BackboneTable:
    """One head's backbone x dataset table of one view (in-domain, or mean over unseen datasets)."""

    head: str
    view: str
    markdown: str
    cells: dict[str, dict[str, dict]]  # backbone -> dataset -> mean, std (%), seeds
    csv: str
    png: str


@dataclass(frozen=True)
class BackbonesResult:
    tables: dict[str, BackboneTable]
    matrices: dict[str, CrossResult]  # backbone -> its cross-dataset matrices

    @property
    def markdown(self) -> str:
        return "\n".join(t.markdown for t in self.tables.values())


def check_backbones(stores: dict[str, list[str]], heads: list[str], hp: dict | None = None,
                    recipe: dict | None = None, metric: str = "accuracy") -> list[str]:
    """The datasets (store names) of a backbone axis, checked before any work (and by a pipeline's --check):
    two backbones or more, each with distinct stores, every backbone with the same datasets (else a row would
    compare other data), and the heads' tables and metric as `cross` checks them."""
    if not isinstance(stores, dict):
        raise ConfigError("backbones: stores is a table { BACKBONE = [STORE, ...] }, one entry per encoder")
    check_tables(heads, hp, recipe)
    check_cross_metrics(metric, heads)
    if len(stores) < 2:
        raise ConfigError(f"backbones: give two encoders' stores or more, got {len(stores)} ({', '.join(stores)})")
    names = {}
    for backbone, paths in stores.items():
        if not paths:
            raise ConfigError(f"backbone {backbone!r} has no stores")
        check_distinct(paths, f"store of backbone {backbone!r}")
        names[backbone] = [store_name(p) for p in paths]
        if len(set(names[backbone])) < len(paths):
            raise ConfigError(f"backbone {backbone!r}: two stores share a name ({', '.join(names[backbone])}); the "
                              "table matches datasets across backbones by store name")
    first, *_ = names.values()
    for backbone, these in names.items():
        if sorted(these) != sorted(first):
            raise ConfigError(f"backbone {backbone!r} has stores {', '.join(sorted(these))}, another "
                              f"{', '.join(sorted(first))}: every backbone needs the same datasets, named alike")
    return first


def backbones(stores: dict[str, list[str]], heads: list[str], out_dir: str | Path, seeds=(0,),
              hp: dict | None = None, recipe: dict | None = None, device: str = "cpu", metric: str = "accuracy",
              progress: bool = False, reuse: bool = False) -> BackbonesResult:
    """Train and test each head on each backbone's stores (a cross matrix per backbone, under out/<backbone>/),
    then write backbones-<head>.md/.csv/.png: rows backbones, columns datasets, in-domain `metric` (and
    backbones-<head>-unseen.*: the mean over the other datasets, when there are several)."""
    datasets = check_backbones(stores, heads, hp, recipe, metric)
    check_seeds(seeds)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, "the backbone tables and each backbone's matrices")
    matrices = {b: cross_matrix(paths, heads, out_dir / b, seeds=seeds, hp=hp, recipe=recipe, device=device,
                                metric=metric, progress=progress, reuse=reuse)
                for b, paths in stores.items()}
    tables = {}
    for head in heads:
        views = {"in-domain": lambda c, d: c == f"{d} -> {d}"}
        if len(datasets) > 1:
            views["unseen"] = lambda c, d: c.startswith(f"{d} -> ") and c != f"{d} -> {d}"
        for view, picks in views.items():
            cells = {b: {d: _pooled([v for c, v in m.tables[head].cells.items() if picks(c, d)]) for d in datasets}
                     for b, m in matrices.items()}
            key = head if view == "in-domain" else f"{head}-unseen"
            tables[key] = _write(out_dir / f"backbones-{key}", head, view, metric, cells, datasets, len(seeds))
    return BackbonesResult(tables, matrices)


def _pooled(cells: list[dict]) -> dict:
    """Mean over cells (one: in domain; several: the unseen datasets) of each seed's value, then over seeds."""
    per_seed = np.mean([c["seeds"] for c in cells], axis=0)
    return {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed)), "seeds": per_seed.tolist()}


def _write(base: Path, head: str, view: str, metric: str, cells: dict, datasets: list[str],
           n_seeds: int) -> BackboneTable:
    rows = list(cells)
    mean = np.array([[cells[b][d]["mean"] for d in datasets] for b in rows])
    std = np.array([[cells[b][d]["std"] for d in datasets] for b in rows])
    header = ["backbone \\ dataset"] + datasets + ["mean"]
    md_rows = [[b] + [report.mean_std(mean[i, j], std[i, j], n_seeds, 1) for j in range(len(datasets))]
               + [f"{mean[i].mean():.1f}"] for i, b in enumerate(rows)]
    what = ("trained and tested on the dataset" if view == "in-domain"
            else "trained on the dataset, mean over the other datasets' test splits")
    title = f"{head}: {metric} (%) by backbone, {what}, {report.over_seeds(n_seeds)}"
    md = f"### {title}\n\n" + report.markdown_table(header, md_rows) + "\n"
    report.sibling(base, ".md").write_text(md)
    report.write_csv(report.sibling(base, ".csv"), ["backbone"] + [f"{d}_mean" for d in datasets]
                     + [f"{d}_std" for d in datasets],
                     [[b] + [f"{v:.2f}" for v in mean[i]] + [f"{v:.2f}" for v in std[i]] for i, b in enumerate(rows)])
    report.sibling(base, ".json").write_text(json.dumps(cells, indent=2))
    report.heatmap_png(report.sibling(base, ".png"), mean, std if n_seeds > 1 else None, rows, datasets, title,
                       row_prefix="", col_prefix="")
    return BackboneTable(head, view, md, cells, str(report.sibling(base, ".csv")), str(report.sibling(base, ".png")))
