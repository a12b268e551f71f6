"""Is run B better than run A? A paired cluster bootstrap of the difference on the same test samples.

Both runs score every resample drawn (the same subjects, as often), so what the two heads have in common cancels
out: the interval of B - A is much narrower than the two separate intervals suggest, and honest about
subjects that contribute several frames. A seed group (a parent of seed runs) counts as the mean of its seeds,
the number the cross matrix and the ledger report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import metrics
from .errors import ConfigError, check_out_file
from .scoring import Scored, run_dirs, score_run
from .store import canonical, store_name


def _scored(run: str | Path, store, manifest, split: str, device: str) -> list[Scored]:
    return [score_run(r, store, manifest, split, device)[1] for r in run_dirs(run)]


def _aligned(groups: list[list[Scored]]) -> tuple[list[list[Scored]], int]:
    """Every run restricted to the samples all of them scored, in one order; and how many were dropped."""
    tasks = {s.task for g in groups for s in g}
    if len(tasks) > 1:
        raise ConfigError("cannot compare an expression run with an AU run")
    ids = [set(s.sample_id.tolist()) for g in groups for s in g]
    common = sorted(set.intersection(*ids))
    if not common:
        raise ConfigError("the two runs scored no sample in common on this split")
    out = []
    for g in groups:
        out.append([])
        for s in g:
            index = {v: i for i, v in enumerate(s.sample_id.tolist())}
            out[-1].append(s.take(np.array([index[c] for c in common])))
    return out, max(len(i) for i in ids) - len(common)


def _test_store(a, b, store: str | None) -> str:
    """The one store both runs are scored on: --store, else their common training store."""
    if store:
        return store
    trained = {str(r): canonical(json.loads((r / "config.json").read_text())["store"])
               for r in run_dirs(a) + run_dirs(b)}
    if len(set(trained.values())) > 1:
        raise ConfigError("the runs were trained on different stores (" + ", ".join(sorted(set(trained.values())))
                          + "); pass --store to score both on the same test samples")
    return next(iter(trained.values()))


def _group_metric(group: list[Scored], w: np.ndarray) -> dict[str, np.ndarray]:
    """Each headline metric under weights `w`, averaged over the group's seeds."""
    per_seed = [s.metric_draws(w) for s in group]
    return {k: np.mean([d[k] for d in per_seed], axis=0) for k in per_seed[0]}


def paired(ga: list[Scored], gb: list[Scored], n_boot: int = metrics.N_BOOT, seed: int = 0) -> dict[str, dict]:
    """B - A per headline metric over aligned runs: point estimate, 95% interval, two-sided bootstrap p-value."""
    clusters = ga[0].clusters()
    ones = np.ones((1, len(clusters)))
    point_a, point_b = _group_metric(ga, ones), _group_metric(gb, ones)
    diffs: dict[str, list[np.ndarray]] = {}
    for w in metrics.bootstrap_weights(clusters, n_boot, seed):
        da, db = _group_metric(ga, w), _group_metric(gb, w)
        for k in da:
            diffs.setdefault(k, []).append(db[k] - da[k])
    rows = {}
    for k, parts in diffs.items():
        d = np.concatenate(parts)
        d = d[np.isfinite(d)]
        # How often the resampled difference lands on the other side of zero, both tails.
        p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())) if len(d) else float("nan")
        rows[k] = {"a": float(point_a[k][0]), "b": float(point_b[k][0]), "diff": float(point_b[k][0] - point_a[k][0]),
                   "ci95": metrics.percentile_ci(d), "p": float(p)}
    return rows


def compare(a: str | Path, b: str | Path, store: str | None = None, manifest=None, split: str = "test",
            device: str = "cpu", n_boot: int = metrics.N_BOOT, seed: int = 0, out: str | Path | None = None) -> dict:
    """Score runs (or seed groups) A and B on the same samples of one store and compare them with `paired`;
    the result is also written as JSON to `out` if given."""
    if out:
        check_out_file(out)
    store = _test_store(a, b, store)
    scored = [_scored(run, store, manifest, split, device) for run in (a, b)]
    (ga, gb), dropped = _aligned(scored)
    clusters = ga[0].clusters()
    result = {"a": str(a), "b": str(b), "seeds_a": len(ga), "seeds_b": len(gb), "store": store, "split": split,
              "n": len(clusters), "clusters": int(len(np.unique(clusters))), "dropped": int(dropped), "n_boot": n_boot,
              "metrics": paired(ga, gb, n_boot, seed)}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def summarize(result: dict) -> str:
    """The comparison as a small table, one metric a row, in percentage points."""
    n, k = result["n"], result["clusters"]
    unit = f"{n} samples from {k} subjects" if k < n else f"{n} samples, each its own subject"
    head = (f"B - A on {store_name(result['store'])}:{result['split']}  ({unit}; {result['n_boot']} paired bootstrap "
            "resamples of the subjects" + (f"; {result['dropped']} samples not scored by both left "
                                           "out" if result["dropped"] else "")
            + f")\n  A = {result['a']} ({result['seeds_a']} seed(s))\n  B = "
              f"{result['b']} ({result['seeds_b']} seed(s))\n")
    lines = [f"  {'metric':<21} {'A':>7} {'B':>7} {'B - A':>7}  {'95% CI':<16} {'p':>6}"]
    for k, m in result["metrics"].items():
        k = f"{k} (lower=better)" if k in metrics.LOWER_IS_BETTER else k
        ci = f"[{100 * m['ci95'][0]:+.1f}, {100 * m['ci95'][1]:+.1f}]"
        p = f"{m['p']:.3f}" if m["p"] > 0 else f"<{1 / result['n_boot']:.3g}"  # zero of n_boot resamples
        lines.append(f"  {k:<21} {100 * m['a']:7.2f} {100 * m['b']:7.2f} {100 * m['diff']:+7.2f}  {ci:<16} {p:>6}")
    return head + "\n".join(lines)
