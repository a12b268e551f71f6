"""TOML pipelines: a list of `[[step]]` tables, each naming a library function and its arguments.

    [vars]                     # `{name}` in any string is replaced; env FERCACHE_<NAME> overrides
    data = "../shared/data"
    [[step]]
    run = "manifest"           # a key of STEPS
    format = "imagefolder"
    src = "{data}/fer2013"

Steps are plain calls into the library, so a pipeline does nothing the CLI can't.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, FercacheError
from .registry import Registry

STEPS = Registry("pipeline step")
register_step = STEPS.register


@register_step("manifest")
def _manifest_step(format: str, src: str, out: str, data_root: str | None = None, options: dict | None = None):
    from .adapters import build
    from .manifests import write_manifest

    manifest = build(format, src, data_root=data_root, **(options or {}))
    return f"{write_manifest(manifest, out)} ({len(manifest)} rows)"


@register_step("audit")
def _audit_step(manifest: str, data_root: str | None = None, without_leaks: str | None = None):
    from .audit import check, describe

    m, found, written = check(manifest, data_root, without_leaks_to=without_leaks)
    return "\n" + describe(m, found) + (f"\n-> {written}" if written else "")


@register_step("extract")
def _extract_step(manifest: str, encoder: str, out: str, **kw):
    from .extract import extract

    r = extract(manifest, encoder, out, **kw)
    state = "already complete" if r.already_complete else f"{r.chunks_computed} chunks, {r.images_per_s:.0f} img/s"
    return f"{r.store}: {r.rows} rows, {r.n_ok} ok, {r.n_failed} failed ({state})"


@register_step("train")
def _train_step(store: str, head: str, seeds: list[int] = (0,), **kw):
    from .train import fit_seeds

    runs = fit_seeds(store, head, seeds=seeds, **kw)
    return ", ".join(f"{r.run_dir} (val {r.metrics['selection']['metric']} "
                     f"{100 * r.metrics['val'].get('accuracy', r.metrics['val'].get('macro_f1_at_0.5')):.1f}%)" for r in runs)


@register_step("cross")
def _cross_step(stores: list[str], heads: list[str], out: str, **kw):
    from .protocols import cross_matrix

    kw.setdefault("progress", True)  # minutes of training: show per-epoch bars
    tables = cross_matrix(stores, heads, out, **kw)
    return "\n" + "\n".join(t["markdown"] for t in tables.values())


@register_step("near_dups")
def _near_dups_step(store: str, out: str, **kw):
    from .neighbours import describe, near_duplicates

    return "\n" + describe(near_duplicates(store, out, **kw))


@register_step("evaluate")
def _evaluate_step(runs: list[str], store: str | None = None, manifest: str | None = None, split: str = "test",
                   device: str = "cpu"):
    from .evaluate import eval_name, evaluate, format_summary

    lines = []
    for run in runs:
        res = evaluate(run, store, manifest, split, device)
        first = res["runs"][0]
        lines.append(f"{run} on {eval_name(first)}: n={first['n']}, {format_summary(res['summary'])} "
                     f"({len(res['runs'])} seed(s))")
    return "\n" + "\n".join(lines)


@register_step("au_cv")
def _au_cv_step(store: str, out: str, **kw):
    from .protocols import au_crossval

    kw.setdefault("progress", True)
    return "\n" + au_crossval(store, out, **kw)["markdown"]


@register_step("folds")
def _folds_step(store: str, manifests: list[str], heads: list[str], out: str, **kw):
    from .protocols import manifest_folds

    kw.setdefault("progress", True)
    return "\n" + manifest_folds(store, manifests, heads, out, **kw)["markdown"]


@register_step("sweep")
def _sweep_step(store: str, head: str, grid: dict, out: str, **kw):
    from .sweep import sweep

    return "\n" + sweep(store, head, grid, out, **kw)["markdown"]


@register_step("compare")
def _compare_step(a: str, b: str, out: str | None = None, **kw):
    import json

    from .compare import compare, describe

    result = compare(a, b, **kw)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    return "\n" + describe(result)


@register_step("runs")
def _runs_step(root: str, csv: str | None = None):
    from .runs import ledger, write_ledger

    result = ledger(root)
    if csv:
        write_ledger(result, csv)
    stale = f"\n{len(result['stale'])} STALE run(s): retrain them before trusting their numbers" if result["stale"] else ""
    return "\n" + result["markdown"] + stale


def _typed(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _substitute(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}") and value[1:-1] in variables:
        return variables[value[1:-1]]  # a whole-value reference keeps the variable's type
    if isinstance(value, str):
        try:
            return value.format(**variables)
        except KeyError as e:
            raise ConfigError(f"unknown variable {{{e.args[0]}}} in {value!r}; define it under [vars]") from None
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    return value


def load_pipeline(path: str | Path) -> list[dict]:
    """Parse a pipeline file into steps with variables substituted."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    variables = {k: _typed(os.environ[f"FERCACHE_{k.upper()}"]) if f"FERCACHE_{k.upper()}" in os.environ else v
                 for k, v in doc.get("vars", {}).items()}
    steps = doc.get("step", [])
    if not steps:
        raise ConfigError(f"{path}: no [[step]] tables")
    for i, step in enumerate(steps):
        if step.get("run") not in STEPS:
            raise ConfigError(f"{path}: step {i + 1} has run={step.get('run')!r}; known: {', '.join(sorted(STEPS))}")
    return [_substitute(s, variables) for s in steps]


def run_pipeline(path: str | Path, on_step: Callable[[int, dict, Any], None] | None = None,
                 only: list[str] | None = None) -> list[Any]:
    """Run each step in order; `on_step(i, step, result)` is called after each."""
    results = []
    for i, step in enumerate(load_pipeline(path)):
        kind = step.pop("run")
        name = step.pop("name", kind)
        if only and name not in only and kind not in only:
            continue
        try:
            result = STEPS[kind](**step)
        except TypeError as e:
            raise ConfigError(f"step {i + 1} ({name}): {e}") from None
        except FercacheError as e:
            e.args = (f"step {i + 1} ({name}): {e}",)
            raise
        results.append(result)
        if on_step:
            on_step(i, {"run": kind, "name": name, **step}, result)
    return results
