"""The run ledger: every trained run under a folder, seeds grouped, ranked on validation, stale runs flagged.

Researchers end up with hundreds of run folders (sweeps, cross matrices, folds). `fercache runs DIR` reads
what each run saved (config.json, metrics.json and its eval-*/metrics.json) and answers "what did I train,
which setting won on validation, what did it score, and is any of it stale?" without re-scoring anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from . import report
from .errors import ConfigError, FercacheError
from .rundir import RunConfig
from .scoring import eval_name, runs_hint, staleness
from .store import canonical, exists, outdated, store_name


def find_runs(root: str | Path) -> list[Path]:
    """Every run directory (one with head.pt) under `root`, sorted."""
    root = Path(root)
    runs = sorted(p.parent for p in root.rglob("head.pt"))
    if not runs:
        raise ConfigError(f"no trained run (head.pt) under {root}{runs_hint(root)}")
    return runs


class Status(Enum):
    OK = "ok"
    STALE = "STALE"  # its store was re-extracted or its manifest edited since it trained: retrain it
    MISSING = "MISSING"  # its store or manifest is gone (moved or deleted): nothing to check it against
    UNREADABLE = "unreadable data"


@dataclass(frozen=True)
class RunStatus:
    """A run's status in the ledger, and why: `STALE: manifest changed`, `MISSING: store`, `ok`."""

    status: Status
    why: str = ""

    def __str__(self) -> str:
        return f"{self.status.value}: {self.why}" if self.why else self.status.value


def _status(cfg: RunConfig) -> RunStatus:
    """ok, STALE (retrain; re-extract first when its store is a 0.1.0 BatchNorm store), or MISSING."""
    if not exists(cfg.store):
        return RunStatus(Status.MISSING, "store")
    if cfg.manifest and not Path(cfg.manifest).is_file():
        return RunStatus(Status.MISSING, "manifest")
    try:
        stale = staleness(cfg)
    except (FercacheError, OSError, KeyError) as e:
        return RunStatus(Status.UNREADABLE, type(e).__name__)
    if stale is None and outdated(cfg.store_fingerprint, (cfg.encoder_args or {}).get("spec")):
        revision = cfg.store_fingerprint["encoder"].get("revision") or 1
        return RunStatus(Status.STALE, f"encoder revision {revision} (re-extract)")
    return RunStatus(Status.OK) if stale is None else RunStatus(Status.STALE, stale[0])


def run_record(run: Path) -> dict:
    """What one run saved: settings, its validation score, every evaluation written next to it, and its status."""
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    met = json.loads((run / "metrics.json").read_text())
    metric = met["selection"]["metric"]
    evals = {}
    for f in sorted(run.glob("eval-*/metrics.json")):
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError):  # an evaluation cut short: the run itself is whole, and listed without it
            continue
        if isinstance(r, dict) and metric in r:
            evals[eval_name(r)] = r[metric]
    return {"run": run, "head": cfg.head, "hp": cfg.hp or {}, "recipe": cfg.recipe or {},
            "store": canonical(cfg.store), "manifest": cfg.manifest, "output": cfg.output,
            "views": cfg.views, "task": cfg.task, "seed": cfg.seed, "fold": cfg.fold, "metric": metric,
            "val": met["val"][metric], "evals": evals, "status": _status(cfg)}


def _setting(rec: dict) -> str:
    """Everything but the seed: runs with the same setting are seeds of one experiment. Folds of a protocol
    differ in their manifest by design, so they pool with the seeds too (ranking fold 3 above fold 1 means nothing)."""
    keys = ("head", "hp", "recipe", "store", "output", "views")
    manifest = rec["manifest"] if rec["fold"] is None else "(folds)"
    return json.dumps({**{k: rec[k] for k in keys}, "manifest": manifest}, sort_keys=True, default=str)


def _one_per_seed(records: list[dict]) -> tuple[list[dict], list[str]]:
    """The records with one run per (setting, seed, fold), and `run (same as other)` for each copy left out: a
    train step and a sweep point of the same settings train the same run twice into two folders, and counted
    as two seeds they would narrow the spread with a copy of one run."""
    kept: dict[tuple, dict] = {}
    copies = []
    for rec in records:  # sorted by folder: the first folder of a setting and seed keeps it
        key = (_setting(rec), rec["seed"], rec["fold"])
        if key in kept:
            copies.append(f"{rec['run']} (same settings and seed as {kept[key]['run']})")
        else:
            kept[key] = rec
    return list(kept.values()), copies


def _count(g: list[dict]) -> str:
    """How many runs a row pools: `3` seeds, or `3 x 5` seeds x folds."""
    folds = {r["fold"] for r in g}
    return str(len(g)) if folds == {None} else f"{len({r['seed'] for r in g})} x {len(folds)}"


def _settings(groups: list[list[dict]]) -> dict[int, str]:
    """Per group, the hyperparameters and recipe keys that differ between groups of the same head (what a sweep
    varied), as `k=v, ...`; keys every group of that head shares are left out."""
    out = {}
    for head in {g[0]["head"] for g in groups}:
        same = [g for g in groups if g[0]["head"] == head]
        keys = sorted({(part, k) for g in same for part in ("hp", "recipe") for k in g[0][part]})
        varying = [pk for pk in keys if len({json.dumps(g[0][pk[0]].get(pk[1]), sort_keys=True) for g in same}) > 1]
        for g in same:
            out[id(g)] = ", ".join(f"{k}={report.cell(g[0][part].get(k))}" for part, k in varying)
    return out


def _mean_std(values: list[float]) -> str:
    return report.mean_std(100 * np.mean(values), 100 * np.std(values), len(values)) if values else ""


def _records(root: Path, runs: list[Path]) -> tuple[list[dict], list[str]]:
    """The records of the runs, and `run (why)` for each folder holding head.pt without a readable config.json
    and metrics.json (a save killed by an earlier version, a file deleted by hand): left out, not a traceback."""
    records, incomplete = [], []
    for run in runs:
        try:
            records.append(run_record(run))
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = f"no {Path(e.filename).name}" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
            incomplete.append(f"{run} ({why})")
    if not records:
        raise ConfigError(f"no complete run under {root}: {'; '.join(incomplete)}")
    return records, incomplete


@dataclass(frozen=True)
class LedgerRow:
    """One setting of one table: its seed (and fold) runs pooled."""

    rank: int
    head: str
    settings: str  # what differs from the other settings of this head, `k=v, ...`
    count: str  # `3` seeds, or `3 x 5` seeds x folds
    val: str  # mean ± std of the selecting validation metric, in %
    evals: dict[str, str]  # evaluation (`<store> <split>`) -> mean ± std in %, "" when not evaluated
    status: str
    runs: str  # the folder holding its runs, relative to the ledger's root

    def cells(self) -> list:
        return [self.rank, self.head, self.settings, self.count, self.val, *self.evals.values(), self.status, self.runs]


@dataclass(frozen=True)
class LedgerTable:
    """The runs trained on one store for one task, selected on one metric, ranked on it."""

    store: str
    task: str
    metric: str
    rows: list[LedgerRow]

    @property
    def evals(self) -> list[str]:
        return list(self.rows[0].evals) if self.rows else []

    @property
    def header(self) -> list[str]:
        return (["rank", "head", "settings", "seeds (x folds)", f"val {self.metric} (%)"]
                + [f"{e} (%)" for e in self.evals] + ["status", "runs"])

    @property
    def markdown(self) -> str:
        title = f"### runs trained on {store_name(self.store)} ({self.task}), ranked on validation {self.metric}"
        return title + "\n\n" + report.markdown_table(self.header, [r.cells() for r in self.rows])


@dataclass(frozen=True)
class Ledger:
    """Every run under a folder: each run's record, the ranked tables, and what was left out or counted once."""

    records: list[dict]
    tables: dict[tuple[str, str, str], LedgerTable] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)  # `run (why)`: head.pt without a readable config/metrics
    copies: list[str] = field(default_factory=list)  # `run (same as other)`: one setting and seed trained twice

    @property
    def markdown(self) -> str:
        return "\n\n".join(t.markdown for t in self.tables.values()) + "\n"

    @property
    def stale(self) -> list[str]:
        return [str(r["run"]) for r in self.records if r["status"].status is Status.STALE]

    @property
    def unchecked(self) -> list[str]:
        """Runs whose data is gone or unreadable: neither ok nor known to be stale."""
        return [str(r["run"]) for r in self.records if r["status"].status in (Status.MISSING, Status.UNREADABLE)]


def ledger(root: str | Path) -> Ledger:
    """Runs under `root` grouped over seeds, one table per (training store, task, selection metric), ranked on
    that validation metric."""
    root = Path(root)
    records, incomplete = _records(root, find_runs(root))
    records, copies = _one_per_seed(records)
    by_setting: dict[str, list[dict]] = {}
    for rec in records:
        by_setting.setdefault(_setting(rec), []).append(rec)
    tables = {}
    # One table per training store, task and selection metric: runs selected on UAR rank on their val UAR
    key = lambda g: (g[0]["store"], g[0]["task"], g[0]["metric"])  # noqa: E731
    for store_task in sorted({key(g) for g in by_setting.values()}):
        groups = [g for g in by_setting.values() if key(g) == store_task]
        groups.sort(key=lambda g: -float(np.mean([r["val"] for r in g])))
        tables[store_task] = _table(root, groups)
    return Ledger(records, tables, incomplete, copies)


def _table(root: Path, groups: list[list[dict]]) -> LedgerTable:
    settings = _settings(groups)
    evals = sorted({k for g in groups for r in g for k in r["evals"]})
    rows = []
    for i, g in enumerate(groups):
        where = g[0]["run"].relative_to(root)
        if len(g) > 1:  # the seed (and fold) runs of one setting share a parent folder
            where = Path(os.path.commonpath([r["run"].relative_to(root) for r in g]))
        rows.append(LedgerRow(i + 1, g[0]["head"], settings[id(g)], _count(g), _mean_std([r["val"] for r in g]),
                              {e: _mean_std([r["evals"][e] for r in g if e in r["evals"]]) for e in evals},
                              ", ".join(sorted({str(r["status"]) for r in g})), str(where)))
    return LedgerTable(*(groups[0][0][k] for k in ("store", "task", "metric")), rows)


LEDGER_HEADER = ["table", "rank", "head", "settings", "seeds (x folds)", "val metric", "val (%)", "evaluations (%)",
                 "status", "runs"]


def write_ledger(result: Ledger, out: str | Path) -> Path:
    """Every table as rows of one CSV with fixed columns; evaluations as `target=mean ± std` pairs."""
    report.check_replaceable(Path(out), LEDGER_HEADER, "--csv")
    rows = [[f"{store_name(t.store)} ({t.task})", r.rank, r.head, r.settings, r.count, t.metric, r.val,
             "; ".join(f"{e}={v}" for e, v in r.evals.items() if v), r.status, r.runs]
            for t in result.tables.values() for r in t.rows]
    return report.write_csv(Path(out), LEDGER_HEADER, rows)


def warnings(result: Ledger) -> list[str]:
    """What a ledger's reader must know before trusting its numbers: stale, unchecked, repeated and incomplete
    runs (the command prints these on stderr, a pipeline's runs step under its table)."""
    out = []
    if result.stale:
        first = "re-extract their stores (see `fercache info STORE`), then " if any(
            "re-extract" in r["status"].why for r in result.records) else ""
        out.append(f"{len(result.stale)} run(s) are STALE: {first}retrain them before trusting their numbers")
    if result.unchecked:
        out.append(f"{len(result.unchecked)} run(s) could not be checked: their training store or manifest is "
                   "missing (moved or deleted); `fercache evaluate RUN --store NEW` scores a run on a moved store")
    if result.copies:
        out.append(f"{len(result.copies)} run(s) repeat another's settings and seed, counted once: "
                   f"{'; '.join(result.copies[:5])}")
    if result.incomplete:
        out.append(f"{len(result.incomplete)} folder(s) hold head.pt but not a whole run, left out (retrain them): "
                   f"{'; '.join(result.incomplete)}")
    return out


def summarize(result: Ledger) -> str:
    """The ledger's table with its warnings under it."""
    return "\n".join([result.markdown, *warnings(result)])
