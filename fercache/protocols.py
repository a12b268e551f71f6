"""Multi-run protocols: the cross-dataset matrix, manifest folds (the video protocol) and subject-grouped AU
cross-validation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import metrics, report
from .aus import choose_aus
from .data import features_memo
from .errors import ConfigError, ManifestError, check_out_dir, repeated
from .heads import HEADS, check_hyperparameters
from .published import Comparison, Paper, paper, write_comparison
from .recipe import Recipe, check_seeds
from .rundir import check_owner
from .scoring import evaluate_run
from .store import canonical, check_same_encoder, store_name
from .train import fit_seeds

log = logging.getLogger(__name__)


def head_of(label: str) -> str:
    """The registered head behind a table label: `HEAD` or `HEAD@VARIANT` (same head, its own hp/recipe entry),
    so one protocol run can tabulate ablations, e.g. "temporal" beside "temporal@mean" with hp {pool = "mean"}."""
    return label.split("@", 1)[0]


def check_tables(heads: list[str], hp: dict | None, recipe: dict | None) -> None:
    """Before any training: every label names a registered head, every hp/recipe entry names one of the labels
    (an entry for "linaer" is refused, not ignored), and each entry's values pass the head's checks. A label given
    twice would train its runs twice into one folder and write its table twice over."""
    if twice := repeated(list(heads)):
        raise ConfigError(f"head {', '.join(map(repr, twice))} is given twice; each head once (HEAD@NAME, with "
                          "its own hp/recipe entry, trains the same head with other settings beside it)")
    for label in heads:
        HEADS.lookup(head_of(label))
    for table, entries in (("hp", hp or {}), ("recipe", recipe or {})):
        stray = sorted(set(entries) - set(heads))
        if stray:
            raise ConfigError(f"{table} has entries for {', '.join(map(repr, stray))}, which is none of the heads "
                              f"({', '.join(heads)}); {table} is keyed by head label, e.g. {{ {heads[0]} = {{ ... }} "
                              f"}}")
    for label in heads:
        Recipe.of(head_of(label), (recipe or {}).get(label))
        check_hyperparameters(head_of(label), (hp or {}).get(label) or {})


def check_distinct(items: list, what: str) -> None:
    """A store or fold manifest named twice (spelt alike or not) would make a matrix with two identical rows, or a
    mean over 'folds' that are one fold counted twice: refused before any training."""
    seen: dict[str, str] = {}
    for item in items:
        key = canonical(str(item))
        if key in seen:
            raise ConfigError(f"{what} {item} is given twice" + (f" (as {seen[key]})" if seen[key] != str(item) else "")
                              + f"; each {what} once")
        seen[key] = str(item)


def _fit_label(store: str, label: str, hp: dict | None, recipe: dict | None, **kw):
    """`fit_seeds` for a table label: its registered head, with the hp and recipe entries keyed by the label."""
    return _said_reused(fit_seeds(store, head_of(label), hp=(hp or {}).get(label), recipe=(recipe or {}).get(label),
                                  **kw))


def _said_reused(runs: list) -> list:
    """The runs, saying which were found finished and scored as they are rather than trained again (a re-run
    of a protocol after an interruption, or after a change to one head only)."""
    if reused := [r.run_dir for r in runs if r.reused]:
        log.info("reused %d finished run(s) trained with the same settings, data and code: %s", len(reused),
                 ", ".join(str(d) for d in reused))
    return runs


def _by_store(table: dict[str, str] | None, stores: list[str], what: str) -> dict[str, str | None]:
    """Each store's entry of `table` (keyed by store path or store name), else None; a key that is none of the
    stores is refused (`what` names the table in the message)."""
    table = dict(table or {})
    out = {s: table.pop(str(s), None) or table.pop(store_name(s), None) for s in stores}
    if table:
        raise ConfigError(f"{what} names {', '.join(table)}, which is none of the stores "
                          f"({', '.join(store_name(s) for s in stores)})")
    return out


def _labels_for(labels: dict[str, str] | None, stores: list[str]) -> dict[str, str | None]:
    """Each store's manifest from `labels`, else None: the store's own."""
    return _by_store(labels, stores, "--labels")


@features_memo()
@dataclass(frozen=True)
class CrossTable:
    """One head's matrix of one metric: rows trained on, columns tested on, written as .md/.csv/.png/.json."""

    head: str
    metric: str
    markdown: str
    cells: dict[str, dict]  # "A -> B": mean and std over seeds (%), each seed's value, n, excluded samples
    csv: str
    png: str


@dataclass(frozen=True)
class CrossResult:
    """Every matrix of a cross-dataset run, by `head` (the first metric) or `head-metric` (the others)."""

    tables: dict[str, CrossTable]
    published: Comparison | None = None  # beside a paper's numbers, when the run named one

    @property
    def markdown(self) -> str:
        return "\n".join([t.markdown for t in self.tables.values()] + ([self.published.markdown] if self.published
                                                                        else []))

    def _repr_markdown_(self) -> str:  # a table in Jupyter
        return self.markdown

    def to_frame(self):
        """One row per table and cell: head, metric, trained_on, tested_on, mean and std over seeds (%), n."""
        return report.frame([{"table": key, "head": t.head, "metric": t.metric, "trained_on": cell.split(" -> ")[0],
                              "tested_on": cell.split(" -> ")[1], "mean": v["mean"], "std": v["std"], "n": v["n"]}
                             for key, t in self.tables.items() for cell, v in t.cells.items()])


def cross_matrix(stores: list[str], heads: list[str], out_dir: str | Path, seeds=(0,),
                 test_stores: list[str] | None = None,
                 hp: dict | None = None, recipe: dict | None = None, device: str = "cpu",
                 metric: str | list[str] = "accuracy",
                 progress: bool = False, labels: dict[str, str] | None = None, reuse: bool = False,
                 published: str | None = None, mask_source: dict[str, dict[str, str]] | None = None,
                 aus: str | list[str] | None = None) -> CrossResult:
    """Train each head on each store, test on each test store's `test` split; rows trained-on, columns tested-on.

    Predictions are over the training label set; test samples whose true label is not in it are
    excluded from that cell and counted. Values are `metric` in %, mean and std over seeds; a list of metrics
    writes one matrix each (the first as cross-<head>, the others as cross-<head>-<metric>), from the same runs:
    e.g. ["accuracy", "ece", "ece_ts"] asks whether the calibration a head learnt in domain holds on other data.
    `labels` ({store or store name: manifest}) trains and tests that store on other labels of the same images,
    e.g. the manifest `manifest check --without-leaks` or `near-dups --without-leaks` wrote.
    `reuse` (in this and the other protocols): a run already finished in its folder with the same configuration
    is scored as it is, not trained again (`rundir.finished_run`); pipelines run again pass it.
    `published` (a key of resources/published.toml, e.g. "cafe"): also write cross-published.*, the paper's
    numbers beside this run's for every cell both have (see `fercache.published`).
    `mask_source` ({head label: {store or store name: mask-source store}}): that label's mask reads a second
    encoder's features of each store's images, on the store it trains on and on each it is tested on (CAFE's
    two-network design across datasets; the other labels read none).
    `aus` (AU heads): the AUs to detect, as `train-head --aus` takes them (default: those with 20 training
    positives or more).
    """
    check_tables(heads, hp, recipe)
    names = check_cross_metrics(metric, heads)
    p = _paper_for(published, heads, names)
    test_stores = test_stores or stores
    manifests = _labels_for(labels, list(dict.fromkeys(list(stores) + list(test_stores))))
    sources = mask_sources(mask_source, heads, list(dict.fromkeys(list(stores) + list(test_stores))))
    out_dir = Path(out_dir)
    check_out_dir(out_dir, "the matrix and its runs")
    check_seeds(seeds)
    check_distinct(stores, "training store")
    check_distinct(test_stores, "test store")
    check_same_encoder(list(dict.fromkeys([*stores, *test_stores])))  # before the first row trains, not after it
    tables = {}
    for head in heads:
        cells: dict[str, dict] = {m: {} for m in names}
        for train in stores:
            runs = _fit_label(train, head, hp, recipe, seeds=seeds, out_dir=out_dir / "runs", device=device,
                              progress=progress, name=f"{store_name(train)}-{head}/seed{{seed}}",
                              manifest=manifests[train], mask_source=sources[head][train],
                              reuse=reuse, own=True, aus=aus)
            for test in test_stores:
                res = [evaluate_run(r.run_dir, test, manifests[test], device=device,
                                    mask_source=sources[head][test]) for r in runs]
                for m in names:
                    vals = [100 * r.get(m, np.nan) for r in res]  # ece_ts: NaN for a run fitted no temperature
                    cells[m][(train, test)] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "seeds": vals,
                                               "n": res[0]["n"], "excluded": res[0].get("excluded", NONE_EXCLUDED)}
        for i, m in enumerate(names):
            key = head if i == 0 else f"{head}-{m}"
            tables[key] = _write_matrix(out_dir, key, head, stores, test_stores, cells[m], m, len(seeds))
    return CrossResult(tables, p and write_comparison(out_dir / "cross-published", p, _cross_rows(p, tables),
                                                      f"{report.over_seeds(len(seeds))}, on the test split"))


def mask_sources(given: dict | None, heads: list[str], stores: list[str],
                 open_stores: bool = True) -> dict[str, dict[str, str | None]]:
    """{label: {store: its mask source, or None}}, every store of a label given one (a store without one could be
    neither trained on nor tested), checked before any training; the sources of a label share one encoder
    (checked when `open_stores`: a pipeline's --check runs before the stores exist)."""
    given = dict(given or {})
    if stray := sorted(set(given) - set(heads)):
        raise ConfigError(f"mask_source has entries for {', '.join(map(repr, stray))}, which is none of the heads "
                          f"({', '.join(heads)}); it is keyed by head label, e.g. {{ mask = {{ STORE = SOURCE }} }}")
    out: dict[str, dict[str, str | None]] = {}
    for label in heads:
        out[label] = _by_store(given.get(label), stores, f"mask_source.{label}")
        if label not in given:
            continue
        if missing := [store_name(s) for s, src in out[label].items() if not src]:
            raise ConfigError(f"mask_source.{label} gives no mask source for {', '.join(missing)}: every store "
                              "the label trains or is tested on needs its own (the second encoder over its images)")
        if open_stores:
            check_same_encoder(list(out[label].values()))
    return out


def _paper_for(published: str | None, heads: list[str], metrics_reported: list[str]) -> Paper | None:
    """The paper a protocol compares with, checked before any training: it must publish numbers for one of the
    heads, in a metric the protocol reports."""
    if published is None:
        return None
    p = paper(published)
    if not any(p.compares(h) for h in heads):
        raise ConfigError(f"published={published!r} compares head {' or '.join(map(repr, p.heads))} (and its "
                          f"variants), which none of the heads ({', '.join(heads)}) is")
    if not set(p.metrics) & set(metrics_reported):
        raise ConfigError(f"published={published!r}: its numbers are {' and '.join(p.metrics)}; report "
                          f"{p.metrics[0]!r} too")
    return p


def _cross_rows(p: Paper, tables: dict[str, CrossTable]) -> list[dict]:
    return [{"label": t.head, "cell": cell, "metric": t.metric, "fercache": v["mean"], "published": p.cross[cell],
             "n_runs": len(v["seeds"])}
            for t in tables.values() if t.metric == p.metrics[0] and p.compares(t.head)
            for cell, v in t.cells.items() if cell in p.cross]


NONE_EXCLUDED = {"n": 0, "by_label": {}}  # AU rows: every AU head predicts every AU of the store it trained on

#: What a cross-matrix cell can report (all in %), by head task; ECE is lower-is-better, the others higher.
TASK_METRICS = {"expr": ("accuracy", "uar", "macro_f1", "ece", "ece_ts"),
                "au": ("macro_f1_tuned", "macro_f1_at_0.5")}
CROSS_METRICS = tuple(m for names in TASK_METRICS.values() for m in names)


def check_cross_metrics(metric: str | list[str], heads: list[str] = ()) -> list[str]:
    """The metrics, refused when unknown, repeated, or not one every head's task reports (an AU head has no
    accuracy; an expression head no tuned-threshold F1)."""
    names = [metric] if isinstance(metric, str) else list(metric)
    unknown = [m for m in names if m not in CROSS_METRICS]
    if unknown or not names:
        raise ConfigError(f"cross-matrix metric {unknown or names!r}: choose from {', '.join(CROSS_METRICS)}")
    if twice := repeated(names):
        raise ConfigError(f"cross-matrix metric {', '.join(twice)} is given twice; each metric once")
    for label in heads:
        task = HEADS.lookup(head_of(label)).task
        if wrong := [m for m in names if m not in TASK_METRICS[task]]:
            raise ConfigError(f"head {label!r} ({task}) reports no {', '.join(wrong)}; its metrics: "
                              f"{', '.join(TASK_METRICS[task])} (one cross step per task)")
    return names


def _write_matrix(out_dir: Path, key: str, head: str, rows: list[str], cols: list[str], cells: dict, metric: str,
                  n_seeds: int) -> CrossTable:
    names_r, names_c = [store_name(s) for s in rows], [store_name(s) for s in cols]
    mean = np.array([[cells[(r, c)]["mean"] for c in cols] for r in rows])
    std = np.array([[cells[(r, c)]["std"] for c in cols] for r in rows])
    # None where a row has no other dataset to test on (one store): printed as '-', not nan
    unseen = [np.mean(others) if (others := [mean[i, j] for j, c in enumerate(cols) if c != r]) else None
              for i, r in enumerate(rows)]
    header = ["trained on \\ tested on"] + names_c + ["mean unseen"]
    md_rows, csv_rows = [], []
    for i, r in enumerate(rows):
        cell = [report.mean_std(mean[i, j], std[i, j], n_seeds, 1) + (" (in-domain)" if c == r else "") +
                (f" [excl. {cells[(r, c)]['excluded']['n']}]" if cells[(r, c)]["excluded"]["n"] else "")
                for j, c in enumerate(cols)]
        md_rows.append([names_r[i]] + cell + ["-" if unseen[i] is None else f"{unseen[i]:.1f}"])
        csv_rows.append([names_r[i]] + [f"{mean[i, j]:.2f}" for j in range(len(cols))] +
                        [f"{std[i, j]:.2f}" for j in range(len(cols))] +
                        [cells[(r, c)]["excluded"]["n"] for c in cols]
                        + ["" if unseen[i] is None else f"{unseen[i]:.2f}"])
    base = out_dir / f"cross-{key}"
    report.write_csv(report.sibling(base, ".csv"),
                     ["trained_on"] + [f"{c}_mean" for c in names_c] + [f"{c}_std" for c in names_c]
                     + [f"{c}_excluded" for c in names_c] + ["mean_unseen"], csv_rows)
    lower = metric in metrics.LOWER_IS_BETTER
    title = (f"{head}: {metric} (%{', lower is better' if lower else ''}) on the test split, "
             f"{report.over_seeds(n_seeds)}")
    md = f"### {title}\n\n" + report.markdown_table(header, md_rows) + \
        "\n\n[excl. N]: test samples whose label is not in the training label set (not scored).\n"
    report.sibling(base, ".md").write_text(md)
    report.heatmap_png(report.sibling(base, ".png"), mean, std if n_seeds > 1 else None, names_r, names_c, title,
                       lower_is_better=lower)
    serial = {f"{store_name(r)} -> {store_name(c)}": v for (r, c), v in cells.items()}
    report.sibling(base, ".json").write_text(json.dumps(serial, indent=2))
    return CrossTable(head, metric, md, serial, str(report.sibling(base, ".csv")), str(report.sibling(base, ".png")))


@features_memo()
def manifest_folds(store: str, manifests: list[str], heads: list[str], out_dir: str | Path, seeds=(0,),
                   hp: dict | None = None, recipe: dict | None = None, device: str = "cpu", progress: bool = False,
                   reuse: bool = False, published: str | None = None) -> dict:
    """The published video protocol: one store, one manifest per fold (same frames, other splits).

    DFEW and MAFW come with 5 official folds, FERV39k with one fixed split: train each head on
    each fold's train split (validation carved from it by subject/clip), test on that fold's test
    split, and report UAR and WAR as mean ± std over folds x seeds. Extraction happens once: the
    folds' manifests list the same frames in the same order, so they all match the store.
    `published` (e.g. "dfer_clip"): also write folds-published.*, the paper's UAR/WAR for this store's dataset
    (named as the store is: dfew, ferv39k, mafw) beside this run's.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, "the folds' table and runs")
    check_seeds(seeds)
    check_owner(out_dir, store, None, "folds protocol")
    check_distinct(manifests, "fold manifest")
    check_tables(heads, hp, recipe)
    if au := [h for h in heads if HEADS[head_of(h)].task != "expr"]:
        raise ConfigError(f"`folds` reports expression metrics (UAR/WAR); {', '.join(au)} detect AUs: use "
                          "`fercache au-cv`")
    p = _paper_for(published, heads, ["uar", "war"])
    if p and store_name(store) not in p.folds:
        raise ConfigError(f"published={published!r} has UAR/WAR for stores named {', '.join(p.folds)}; this store "
                          f"is {store_name(store)!r} (name the store after its dataset, e.g. dfew.zarr)")
    results = {}
    for head in heads:
        results[head] = []
        for f, m in enumerate(manifests, 1):
            runs = _fit_label(store, head, hp, recipe, seeds=seeds, manifest=m, out_dir=out_dir / "runs", device=device,
                              progress=progress, name=f"{head}/fold{f}/seed{{seed}}", fold=f, reuse=reuse, own=True)
            results[head] += [evaluate_run(r.run_dir, store, manifest=m, device=device) | {"fold": f,
                                                                                           "manifest": str(m)}
                              for r in runs]
    table = _folds_table(out_dir, store, results, len(manifests), len(seeds))
    if p:
        compared = _folds_rows(p, store_name(store), results)
        table["published"] = write_comparison(out_dir / "folds-published", p, compared,
                                              f"{len(manifests)} fold(s) x {len(seeds)} seed(s)")
        table["markdown"] += "\n" + table["published"].markdown
    return table


def _folds_rows(p: Paper, name: str, results: dict) -> list[dict]:
    keys = {"uar": "uar", "war": "accuracy"}
    return [{"label": label, "cell": name, "metric": m.upper(), "fercache": 100 * float(np.mean([r[k] for r in rs])),
             "published": p.folds[name][m], "n_runs": len(rs)}
            for label, rs in results.items() if p.compares(label) for m, k in keys.items()]


def _folds_table(out_dir: Path, store: str, results: dict, n_folds: int, n_seeds: int) -> dict:
    n = n_folds * n_seeds  # one fold and one seed have no spread: `± 0.00` read as a perfectly stable result

    def stat(rs: list[dict], k: str) -> str:
        return report.mean_std(100 * np.mean([r[k] for r in rs]), 100 * np.std([r[k] for r in rs]), n)

    unit = "clips" if any(r.get("level") == "clip" for rs in results.values() for r in rs) else "samples"
    header = ["head", "UAR (%)", "WAR (%)", "macro-F1 (%)", f"test {unit} / fold", "excluded / fold"]
    rows = [[head, stat(rs, "uar"), stat(rs, "accuracy"), stat(rs, "macro_f1"),
             f"{np.mean([r['n'] for r in rs]):.0f}", f"{np.mean([r['excluded']['n'] for r in rs]):.0f}"]
            for head, rs in results.items()]
    how = "mean ± std over folds x seeds" if n > 1 else "no ± std"
    md = (f"### {store_name(store)}: {n_folds} fold(s) x {n_seeds} seed(s), test split of each fold ({how})\n\n"
          + report.markdown_table(header, rows)
          + f"\n\nUAR: mean per-class recall; WAR: accuracy. Test units: {unit}. The epoch is chosen on each fold's "
            "validation split, never its test split.\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "folds.md").write_text(md)
    report.write_csv(out_dir / "folds.csv", header, rows)
    (out_dir / "folds.json").write_text(json.dumps(results, indent=2, default=str))
    return {"markdown": md, "results": results}


def subject_folds(subjects: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold index per row, assigning whole subjects to folds (balanced by row count)."""
    uniq, counts = np.unique(subjects, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of, load = {}, np.zeros(k)
    for i in sorted(order, key=lambda i: -counts[i]):  # largest subjects first, each to the lightest fold
        f = int(load.argmin())
        fold_of[uniq[i]] = f
        load[f] += counts[i]
    return np.array([fold_of[s] for s in subjects])


@features_memo()
def au_crossval(store: str, out_dir: str | Path, folds: int = 5, aus: str = "top8", seeds=(0,), hp: dict | None = None,
                recipe: dict | None = None, device: str = "cpu", progress: bool = False, reuse: bool = False,
                head: str = "au") -> dict:
    """Subject-grouped k-fold AU detection over all rows of a store with an AU head; per-AU F1 pooled over test
    folds."""
    check_tables([head], {head: hp or {}}, {head: recipe or {}})
    if HEADS[head].task != "au":
        raise ConfigError(f"au-cv trains an AU head; {head!r} is a {HEADS[head].task} head")
    from .data import manifest_for
    from .manifests import Manifest, write_manifest
    from .store import open_store

    out_dir = Path(out_dir)
    check_out_dir(out_dir, "the AU table and its runs")
    check_seeds(seeds)
    check_owner(out_dir, store, None, "AU cross-validation")
    base = manifest_for(open_store(store), None)
    subjects = np.array(base.column("subject"))
    if not 2 <= folds <= len(set(subjects)):  # 1 fold has no training data; more folds than subjects, empty tests
        raise ConfigError(f"--folds {folds}: give 2 to {len(set(subjects))} (the subjects of {store_name(store)}; "
                          "each fold tests on whole subjects)")
    fold = subject_folds(subjects, folds)
    au_list = _fixed_aus(base, aus)  # one AU set for every fold, so per-AU scores can be pooled
    results = []
    for f in range(folds):
        rows = [{**r, "split": "test" if fold[i] == f else "train"} for i, r in enumerate(base.rows)]
        m = write_manifest(Manifest(rows=rows, source=f"fold{f}", columns=base.columns), out_dir / f"fold{f}.csv")
        runs = _said_reused(fit_seeds(store, head, seeds=seeds, manifest=m, aus=au_list, out_dir=out_dir / "runs",
                                      device=device, hp=hp, recipe=recipe, progress=progress,
                                      name=f"fold{f}/seed{{seed}}", fold=f, reuse=reuse, own=True))
        results += [evaluate_run(r.run_dir, store, manifest=m, device=device) | {"fold": f} for r in runs]
    return _au_table(out_dir, results)


def _fixed_aus(manifest, aus: str | list[str]) -> list[str]:
    """`topK` over the whole dataset, or an explicit list / comma-separated AU numbers.

    Checked here, before any fold manifest is written, so a wrong store or AU name leaves nothing behind.
    """
    have = manifest.au_columns
    if not have:
        raise ManifestError(f"{manifest.source} has no AU columns (AU1, AU2, ...); AU cross-validation needs a "
                            "manifest with FACS codes (e.g. the ckplus adapter)")
    pos = {a: sum(v == "1" for v in manifest.column(a)) for a in have}
    return choose_aus(aus, have, pos, manifest.source)


def _au_table(out_dir: Path, results: list[dict]) -> dict:
    aus = list(results[0]["per_au_f1_at_0.5"])
    avg = lambda key, a: float(np.mean([r[key][a] for r in results]))  # noqa: E731
    header = ["AU", "positives (test folds)", "F1 @0.5", "F1 tuned thr (val)", "F1 always-positive"]
    rows = [[a, sum(r["positives"][a] for r in results) // max(1, len({r["seed"] for r in results})),
             f"{100 * avg('per_au_f1_at_0.5', a):.1f}", f"{100 * avg('per_au_f1_tuned', a):.1f}",
             f"{100 * avg('per_au_f1_always_positive', a):.1f}"] for a in aus]
    macro = {k: float(np.mean([r[k] for r in results]))
             for k in ("macro_f1_at_0.5", "macro_f1_tuned", "macro_f1_always_positive")}
    rows.append(["**macro**", "", f"{100 * macro['macro_f1_at_0.5']:.1f}", f"{100 * macro['macro_f1_tuned']:.1f}",
                 f"{100 * macro['macro_f1_always_positive']:.1f}"])
    n_folds = len({r["fold"] for r in results})
    md = (f"### AU detection, {n_folds}-fold subject-grouped cross-validation (F1 %, mean over folds and seeds)\n\n"
          + report.markdown_table(header, rows) + "\n")
    (out_dir / "au-cv.md").write_text(md)
    report.write_csv(out_dir / "au-cv.csv", header, rows)
    (out_dir / "au-cv.json").write_text(json.dumps({"macro": macro, "folds": results}, indent=2, default=str))
    series = {"F1 @0.5": "per_au_f1_at_0.5", "F1 tuned thr (val)": "per_au_f1_tuned",
              "always positive": "per_au_f1_always_positive"}
    png = report.au_png(out_dir / "au-cv.png", aus, {k: [100 * avg(v, a) for a in aus] for k, v in series.items()},
                        f"AU detection, {n_folds}-fold subject-grouped CV (mean over folds and seeds)")
    return {"markdown": md, "macro": macro, "png": png}
