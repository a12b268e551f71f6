"""The numbers each implemented paper publishes (resources/published.toml), set beside fercache's own.

A protocol that is given a paper (`published="cafe"`) writes, next to its tables, one row per number the paper
publishes for a cell fercache also measured: fercache's mean over seeds, the published value, the difference,
and why the two may differ by design. Cells the paper has no number for, and heads it did not train, are left
out rather than compared with nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import tomllib

from . import report
from .errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Paper:
    """One paper's entry: what it is, which head its numbers belong to, and the numbers by cell."""

    name: str
    title: str
    source: str
    heads: list[str]
    differs: str
    metrics: list[str]  # what its numbers are in (cross-matrix metrics; uar and war for folds)
    cross: dict[str, float] = field(default_factory=dict)  # "trained -> tested": accuracy %
    folds: dict[str, dict[str, float]] = field(default_factory=dict)  # store: {"uar": %, "war": %}
    gains: str = ""

    def note(self, label: str) -> str:
        """What a compared row says: a variant label is not the published configuration."""
        head = label.split("@", 1)[0]
        variant = f"variant {label!r} of the published head; " if label != head else ""
        return f"{variant}by design: {self.differs}"

    def compares(self, label: str) -> bool:
        return label.split("@", 1)[0] in self.heads


def papers() -> dict[str, Paper]:
    doc = tomllib.loads((resources.files("fercache") / "resources" / "published.toml").read_text(encoding="utf-8"))
    return {name: Paper(name=name, **entry) for name, entry in doc.items()}


def paper(name: str) -> Paper:
    """A paper by its key, refused with the known ones (before any training, by the protocols)."""
    known = papers()
    if name not in known:
        raise ConfigError(f"published={name!r}{did_you_mean(name, known)}: fercache keeps the numbers of "
                          f"{', '.join(known)}")
    return known[name]


@dataclass(frozen=True)
class Comparison:
    """fercache beside a paper: one row per compared number, written as .md/.csv/.json/.png."""

    paper: str
    markdown: str
    rows: list[dict]
    csv: str
    png: str


def write_comparison(base: Path, p: Paper, rows: list[dict], what: str) -> Comparison:
    """Rows of {label, cell, metric, fercache, published, n_runs}: the difference and the note are added here.
    `what` says what fercache's value is a mean over ("2 seed(s), on the test split"), under the table."""
    rows = [{**r, "difference": r["fercache"] - r["published"], "note": p.note(r["label"])} for r in rows]
    header = ["head", "cell", "metric", "fercache (%)", "published (%)", "difference (points)", "note"]
    table = [[r["label"], r["cell"], r["metric"], f"{r['fercache']:.2f}", f"{r['published']:.2f}",
              f"{r['difference']:+.2f}", r["note"]] for r in rows]
    md = (f"### Beside the published numbers: {p.title}\n\n"
          + (report.markdown_table(header, table) if table else "_No cell of this run has a published number._")
          + f"\n\nfercache: mean over {what}. Published: {p.source}."
          + (f" The paper reports {p.gains}." if p.gains else "") + "\n")
    report.sibling(base, ".md").write_text(md)
    report.write_csv(report.sibling(base, ".csv"), ["head", "cell", "metric", "fercache", "published", "difference",
                                                 "note"],
                     [[r["label"], r["cell"], r["metric"], f"{r['fercache']:.2f}", f"{r['published']:.2f}",
                       f"{r['difference']:.2f}", r["note"]] for r in rows])
    report.sibling(base, ".json").write_text(json.dumps({"paper": p.name, "source": p.source, "rows": rows}, indent=2))
    png = report.paired_png(report.sibling(base, ".png"), [f"{r['label']}  {r['cell']}  {r['metric']}" for r in rows],
                            [r["fercache"] for r in rows], [r["published"] for r in rows],
                            f"fercache (mean) beside {p.name} (published), %")
    return Comparison(p.name, md, rows, str(report.sibling(base, ".csv")), str(png))
