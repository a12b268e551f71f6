"""Cheap hyperparameter sweeps on cached features: a grid of head and recipe values, ranked on validation only."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import report
from .data import features_memo
from .devices import barrier, dist_rank_world
from .errors import ConfigError, check_out_dir, did_you_mean, repeated
from .heads import HEADS, check_hyperparameters
from .recipe import Recipe, check_seeds, recipe_keys
from .rundir import check_owner, drop_numbered
from .store import store_name
from .train import Point, fit_many

log = logging.getLogger(__name__)


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values. An axis without values would make no point at all; a value given
    twice, two points that are one (trained twice, ranked against itself)."""
    if not grid:
        raise ConfigError("empty sweep grid; give at least one axis, e.g. --axis n_drop=5,10,20")
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep axis {axis!r} has no values ({values!r}); give a list of one or more")
        if twice := repeated([json.dumps(v, sort_keys=True) for v in values]):
            raise ConfigError(f"sweep axis {axis!r} repeats {', '.join(twice)}: each value once")
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _check_axes(head: str, grid: dict[str, list], in_recipe: set[str], in_hp: set[str]) -> None:
    """An axis that is neither a recipe key nor a hyperparameter is named as such, with the nearest of either
    (--axis lrr=... is a slip for the recipe's lr, not a hyperparameter the head lacks)."""
    for axis in grid:
        if axis not in in_recipe | in_hp:
            raise ConfigError(f"sweep axis {axis!r}{did_you_mean(axis, sorted(in_recipe | in_hp))}: head {head!r} has "
                              f"no such hyperparameter ({', '.join(sorted(in_hp)) or 'none'}) or recipe key "
                              f"({', '.join(sorted(in_recipe))})")


def plan(head: str, grid: dict[str, list], base_recipe: dict, base_hp: dict) -> list[tuple[dict, dict, dict]]:
    """(point, recipe, hp) for every grid point, each checked before the first is trained: a bad value at point
    17 fails now, not after 16 points of work."""
    in_recipe, spec = recipe_keys(head), HEADS.lookup(head)  # an axis is a recipe key, or else a hyperparameter
    _check_axes(head, grid, in_recipe, set(spec.hyperparameters))
    if both := sorted(set(grid) & (set(base_recipe) | set(base_hp))):  # the axis won, and the fixed value was lost
        raise ConfigError(f"{', '.join(both)}: both a sweep axis and a fixed --recipe/--hp value (base_recipe/base_hp "
                          "in a pipeline); give it one way")
    out = []
    for point in grid_points(grid):
        recipe = {**base_recipe, **{k: v for k, v in point.items() if k in in_recipe}}
        hp = {**base_hp, **{k: v for k, v in point.items() if k not in in_recipe}}
        Recipe.of(head, recipe)
        check_hyperparameters(head, hp)
        out.append((point, recipe, hp))
    return out


POINT_FILE = "point.json"  # in each pointNNN folder: the settings that point trains with
STAGED = ".moving-"  # a point folder on its way to its new number


def _point_key(head: str, recipe: dict, hp: dict) -> str:
    return json.dumps({"head": head, "recipe": recipe, "hp": hp}, sort_keys=True, default=str)


def _saved_key(folder: Path) -> str | None:
    try:
        saved = json.loads((folder / POINT_FILE).read_text())
        return _point_key(saved["head"], saved["recipe"], saved["hp"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a sweep from before point.json, or a point cut short: it keeps its number


def _line_up(out_dir: Path, keys: list[str]) -> int:
    """Move each point folder an earlier sweep left in `out_dir` to the number its settings have in this plan:
    a value added inside a grid (lr=1e-3,1e-1 -> 1e-3,1e-2,1e-1) renumbers the points after it, which would
    otherwise all be trained again. Only where the runs lie changes; `fit` still checks each run before reusing
    it. In two steps (aside, then into place) so no move lands on a folder yet to move; folders set aside by
    a run interrupted between the two are found again by their settings. Returns how many moved."""
    number = {k: i for i, k in enumerate(keys)}
    found: dict[str, Path] = {}
    for d in sorted(out_dir.glob("point[0-9]*")) + sorted(out_dir.glob(f"{STAGED}*")):
        if d.is_dir() and (k := _saved_key(d)) in number:
            found.setdefault(k, d)
    for d in out_dir.glob(f"{STAGED}*"):  # set aside before, and no point of this plan now
        if d not in found.values():
            shutil.rmtree(d)
    moves = {k: d for k, d in found.items() if d.name != f"point{number[k]:03d}"}
    aside = {k: d if d.name.startswith(STAGED)
             else d.rename(out_dir / (STAGED + hashlib.sha256(k.encode()).hexdigest()[:16]))
             for k, d in moves.items()}
    for k, d in aside.items():
        dest = out_dir / f"point{number[k]:03d}"
        if dest.exists():  # a point with settings this plan does not have: it would be trained over
            shutil.rmtree(dest)
        d.rename(dest)
    if moves:
        log.info("%s: %d point folder(s) renumbered to this grid's order", out_dir, len(moves))
    return len(moves)


def _mark_point(folder: Path, head: str, point: dict, recipe: dict, hp: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    saved = {"head": head, "point": point, "recipe": recipe, "hp": hp}
    (folder / POINT_FILE).write_text(json.dumps(saved, indent=2, default=str))


@dataclass(frozen=True)
class SweepResult:
    """A sweep's points ranked on validation (`rows`, as sweep.json holds them: the point's values, `mean` and
    `std` of the validation metric over seeds, its `runs`), its table and plots, and how many runs were reused."""

    head: str
    axes: list[str]
    rows: list[dict]
    markdown: str
    runs: int = 0
    reused: int = 0
    curve_png: str | None = None  # one numeric axis: the metric as a curve of it

    @property
    def best(self) -> dict:
        return self.rows[0]

    def _repr_markdown_(self) -> str:  # a table in Jupyter
        return self.markdown

    def to_frame(self):
        """One row per point, best first: its values, the validation metric's mean and std over seeds."""
        return report.frame([{k: v for k, v in row.items() if k != "runs"} for row in self.rows])


def _report(out_dir: Path, store: str, head: str, grid: dict[str, list], rows: list[dict], n_seeds: int) -> dict:
    """sweep.md/.csv/.json and sweep.png, points ranked on validation; with one numeric axis (shots, fraction,
    lr), sweep-curve.png: the metric as a curve of it, e.g. a data-efficiency curve."""
    rows.sort(key=lambda r: -r["mean"])
    metric, name = f"val {rows[0]['val_metric']} (%)", store_name(store)
    header = ["rank"] + list(grid) + [metric]
    table = [[k + 1] + [report.cell(r[a]) for a in grid] + [report.mean_std(100 * r["mean"], 100 * r["std"], n_seeds)]
             for k, r in enumerate(rows)]
    md = f"### sweep of {head} on {name} (ranked on the validation split)\n\n" + report.markdown_table(header,
                                                                                                       table) + "\n"
    (out_dir / "sweep.md").write_text(md)
    report.write_csv(out_dir / "sweep.csv", header, table)
    means, stds = [100 * r["mean"] for r in rows], [100 * r["std"] for r in rows]
    report.ranking_png(out_dir / "sweep.png", [", ".join(f"{a}={report.cell(r[a])}" for a in grid) for r in rows],
                       means, stds, f"{metric}, {report.over_seeds(n_seeds)}", f"sweep of {head} on {name}")
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2))
    out = {"head": head, "markdown": md, "rows": rows, "axes": list(grid)}
    (axis,) = grid if len(grid) == 1 else (None,)
    if axis and all(isinstance(r[axis], (int, float)) and not isinstance(r[axis], bool) for r in rows):
        out["curve_png"] = str(report.curve_png(out_dir / "sweep-curve.png", [r[axis] for r in rows], means, stds, axis,
                                                metric, f"{head} on {name}: {report.over_seeds(n_seeds)}"))
    return out


@features_memo()
def sweep(store: str, head: str, grid: dict[str, list], out_dir: str | Path, seeds=(0,), device: str = "cpu",
          base_recipe: dict | None = None, base_hp: dict | None = None, progress: bool = False,
          reuse: bool = True, max_batch_configs: int | None = None, **fit_kw) -> SweepResult | None:
    """Train every grid point (x seeds); rank by the validation metric. Test is never read here.

    Points of a head that stacks train as stacks, as many at once as memory allows (`max_batch_configs` caps
    it; 1 trains one run after another); their runs are the runs each point would have trained alone.
    A run already finished in `out_dir` with the same configuration (a sweep interrupted and run again) is
    reused rather than trained again (`reuse=False` trains every run); `reused` counts them.
    Under torchrun each rank trains whole stacks; rank 0 writes the tables and returns the result, the other
    ranks None."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, "the sweep's runs and tables")
    check_seeds(seeds)
    points = plan(head, grid, base_recipe or {}, base_hp or {})
    check_owner(out_dir, store, head, "sweep")
    rank, world = dist_rank_world()
    if rank == 0:  # one process moves and marks the point folders, before any rank trains into them
        if reuse:
            _line_up(out_dir, [_point_key(head, recipe, hp) for _, recipe, hp in points])
        for i, (point, recipe, hp) in enumerate(points):
            _mark_point(out_dir / f"point{i:03d}", head, point, recipe, hp)
    barrier(world)
    runs = fit_many(store, head, [Point(s, hp, recipe, f"point{i:03d}/seed{{seed}}")
                                  for i, (_, recipe, hp) in enumerate(points) for s in seeds],
                    out_dir=out_dir, device=device, progress=progress, reuse=reuse,
                    max_batch_configs=max_batch_configs, **fit_kw)
    if rank:
        return None
    return _ranked(out_dir, store, head, grid, points, seeds, runs)


def _ranked(out_dir: Path, store: str, head: str, grid: dict, points: list, seeds, runs: list) -> SweepResult:
    """The sweep's rows from its runs (point-major, seeds within), its tables and plots; what earlier, larger
    sweeps left in `out_dir` removed."""
    rows, n = [], len(seeds)
    for i, (point, _, _) in enumerate(points):
        mine = runs[i * n:(i + 1) * n]
        metric = mine[0].metrics["selection"]["metric"]
        vals = [r.metrics["val"][metric] for r in mine]
        rows.append({"point": i, **point, "val_metric": metric, "mean": float(np.mean(vals)),
                     "std": float(np.std(vals)), "runs": [str(r.run_dir) for r in mine]})
        # a point swept before with more seeds: `evaluate POINT` and the ledger would average the old ones in
        drop_numbered(out_dir / f"point{i:03d}", "seed", keep=set(seeds), what="runs of seeds no longer asked for")
    # an earlier, larger sweep's points: sweep.json no longer lists them, `fercache runs` would rank them with these
    drop_numbered(out_dir, "point", keep=range(len(points)), what="points of an earlier, larger sweep")
    reused = sum(r.reused for r in runs)
    if reused:
        log.info("%d of %d runs were found finished in %s with the same settings and were not trained again "
                 "(--retrain trains every run)", reused, len(runs), out_dir)
    return SweepResult(**_report(out_dir, store, head, grid, rows, n), runs=len(runs), reused=reused)


def summarize(result: SweepResult) -> str:
    """The ranked table, the curve's path, and the best point on validation with the command that scores it on
    test: the sweep itself never reads the test split."""
    best = Path(result.best["runs"][0]).parent
    setting = ", ".join(f"{a}={report.cell(result.best[a])}" for a in result.axes)  # as the table writes them
    return (result.markdown + (f"\ncurve -> {result.curve_png}" if result.curve_png else "")
            + f"\nbest on validation: {best} ({setting}); its test score: `fercache evaluate {best}`")
