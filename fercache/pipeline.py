"""TOML pipelines: a list of `[[step]]` tables, each naming a library function and its arguments.

    [vars]                     # `{name}` in any string is replaced; env FERCACHE_<NAME> overrides
    data = "../shared/data"
    [[step]]
    run = "manifest"           # a key of STEPS
    format = "imagefolder"
    src = "{data}/fer2013"

Steps are plain calls into the library, so a pipeline does nothing the CLI can't; `fercache steps` lists each kind
with the keys it needs and takes.
"""

from __future__ import annotations

import importlib
import inspect
import os
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tomllib

from .errors import ConfigError, EncoderError, FercacheError, UnknownNameError, did_you_mean, file_in_the_way, near_path
from .registry import Registry


@dataclass(frozen=True)
class Step:
    """A kind of `[[step]]`, as registered: everything `--check` and the runner need to know of it, declared
    with its function (`@register_step(kind, forwards=..., reads=..., ...)`)."""

    kind: str
    run: Callable[..., Any]  # the step: its own arguments, the rest (**kw) forwarded
    #: (fercache module, function) its extra keyword arguments go to, and where that one's own **kwargs go in
    #: turn (a sweep hands them to every point's `fit`): a pipeline's arguments are checked against the library
    #: before step 1 runs, not when step 9 is reached after an hour of extraction.
    forwards: tuple[str, str] | None = None
    onward: tuple[str, str] | None = None
    #: The target's arguments the step fills in itself (every step names its output `out`, as the CLI's `--out`),
    #: or that TOML cannot hold: a pipeline naming one would pass the check and fail when the step is reached.
    supplied: frozenset[str] = frozenset()
    reads: tuple[str, ...] = ()  # arguments naming files or folders it reads
    writes: tuple[str, ...] = ()  # ... and those naming what it writes (folders, unless in `files`)
    files: tuple[str, ...] = ()  # outputs that are files (replaced by a later run, each with its own guard)
    #: What it writes exactly, when more precise than `writes` (the run folders of a train step), so that a
    #: misspelt run folder under its `out` is not taken for one of them: fn(step args, out) -> paths.
    outputs: Callable[[dict, str], list[str]] | None = None
    check: Callable[[dict], None] | None = None  # what the library would refuse only when the step is reached
    one_writer: bool = False  # `out` is a store: two steps writing it must give the same inputs
    renamed: tuple[tuple[str, str], ...] = ()  # (old, new): keys it took under another name before, still read

    @property
    def target(self) -> Callable | None:
        return _function(*self.forwards) if self.forwards else None

    def params(self) -> list[inspect.Parameter]:
        """The step function's own arguments."""
        return [p for p in inspect.signature(self.run).parameters.values() if p.kind is not p.VAR_KEYWORD]

    def functions(self) -> list[Callable]:
        """The step, and the library functions its arguments reach."""
        return [self.run] + [_function(*t) for t in (self.forwards, self.onward) if t]

    def takes(self) -> set[str]:
        """The argument names it accepts: its own and those of the library functions it forwards to."""
        names = {p.name for fn in self.functions() for p in inspect.signature(fn).parameters.values()
                 if p.kind is not p.VAR_KEYWORD}
        return names - self.supplied


def _function(module: str, fn: str) -> Callable:
    """A library function by (module, name): a fercache module, or a dotted one of your own (a plugin's step)."""
    return getattr(importlib.import_module(module if "." in module else f"fercache.{module}"), fn)


STEPS = Registry("pipeline step", entry=Step)
register_step = STEPS.register


def _check_manifest(args: dict) -> None:
    from .adapters import check_adapter_options

    check_adapter_options(args["format"], args.get("options") or {})


def _check_derived(key: str, base: str) -> Callable[[dict], None]:
    """audit's `without_leaks`, near_dups' `without_leaks_to`: a new manifest that must not overwrite its source."""
    def check(args: dict) -> None:
        from .manifests import check_derived_path

        check_derived_path(args.get(key), args.get(base))
    return check


@register_step("manifest", reads=("src", "data_root"), writes=("out",), files=("out",), check=_check_manifest)
def _manifest_step(format: str, src: str, out: str, data_root: str | None = None, options: dict | None = None):
    """A manifest from a dataset's native layout (`fercache manifest build`); `options` are the format's."""
    from .adapters import build
    from .manifests import write_manifest

    manifest = build(format, src, data_root=data_root, **(options or {}))
    return f"{write_manifest(manifest, out)} ({len(manifest)} rows)"


@register_step("audit", reads=("manifest", "data_root"), writes=("without_leaks",), files=("without_leaks",),
               check=_check_derived("without_leaks", "manifest"))
def _audit_step(manifest: str, data_root: str | None = None, without_leaks: str | None = None):
    """Subjects and identical images shared by splits, optionally a leak-free copy (`fercache manifest check`)."""
    from .audit import check, summarize

    m, found, written = check(manifest, data_root, without_leaks_to=without_leaks)
    return "\n" + summarize(m, found) + (f"\n-> {written}" if written else "")


def _check_frames(args: dict) -> None:
    from .video import check_frames_options

    check_frames_options(args.get("every", 1), args.get("short_side"), args.get("workers"))


@register_step("frames", reads=("src",), writes=("out",), check=_check_frames)
def _frames_step(src: str, out: str, every: int = 1, short_side: int | None = None, workers: int | None = None,
                 detect: bool = False, progress: bool = True):
    """Video files -> folders of JPEG frames for the video adapters' `frames` option (`fercache frames`)."""
    from .video import summarize, videos_to_frames

    return summarize(videos_to_frames(src, out, every=every, short_side=short_side, workers=workers, progress=progress,
                                      detect=detect))


def _check_extract(args: dict) -> None:
    from .encoders import check_encoder_name, missing_weights
    from .extract import check_options, extract
    from .store import check_location

    check_encoder_name(args["encoder"])
    if why := missing_weights(args["encoder"], args.get("pretrained")):
        raise EncoderError(why)
    o = {p.name: p.default for p in inspect.signature(extract).parameters.values()} | args
    check_options(o["batch_size"], o["workers"], o["chunk_rows"], o["precision"], o["image_size"], o["views"],
                  o["normalize"])
    check_location(str(args["out"]), bool(o["overwrite"]))


# The data folder is `data_root` in every step, as `--data-root` on the command line; extract and near_dups
# steps called it `root` up to 0.2.0.
@register_step("extract", forwards=("extract", "extract"), supplied=frozenset({"manifest_path", "encoder_obj", "root"}),
               reads=("manifest", "data_root"), writes=("out",), check=_check_extract, one_writer=True,
               renamed=(("root", "data_root"),))
def _extract_step(manifest: str, encoder: str, out: str, data_root: str | None = None, **kw):
    """Encode every manifest row once into a store at `out` (`fercache extract`)."""
    from .extract import extract

    r = extract(manifest, encoder, out, root=data_root, **kw)
    state = "already complete" if r.already_complete else f"{r.chunks_computed} chunks, {r.images_per_s:.0f} img/s"
    return f"{r.store}: {r.rows} rows, {r.n_ok} ok, {r.n_failed} failed ({state})"


def _check_head(args: dict) -> None:
    from .protocols import check_tables

    head = args["head"]
    check_tables([head], {head: args.get("hp") or {}}, {head: args.get("recipe") or {}})


def _run_folders(args: dict, out: str) -> list[str]:
    from .store import store_name

    return [f"{out}/{store_name(args['store'])}-{args['head']}"]


@register_step("train", forwards=("train", "fit_seeds"), onward=("train", "fit_many"),
               supplied=frozenset({"out_dir", "own", "points"}),
               reads=("store", "manifest", "mask_source"), outputs=_run_folders, check=_check_head)
def _train_step(store: str, head: str, out: str = "runs", seeds: list[int] = (0,), progress: bool = True, **kw):
    """Train a head on a store, one run per seed under `out` (`fercache train-head`)."""
    from .train import fit_seeds, summarize

    return "\n".join(summarize(r) for r in fit_seeds(store, head, seeds=seeds, out_dir=out, progress=progress, **kw))


def _check_protocol(args: dict) -> None:
    """cross and folds: heads with their hp/recipe tables, and no store or fold manifest given twice."""
    from .protocols import check_distinct, check_tables

    check_tables(args["heads"], args.get("hp"), args.get("recipe"))
    for key, what in (("stores", "training store"), ("test_stores", "test store"), ("manifests", "fold manifest")):
        if isinstance(args.get(key), list):
            check_distinct(args[key], what)


def _check_cross(args: dict) -> None:
    from .protocols import check_cross_metrics, mask_sources

    _check_protocol(args)
    check_cross_metrics(args.get("metric", "accuracy"), args["heads"])
    stores = list(dict.fromkeys(list(args["stores"]) + list(args.get("test_stores") or [])))
    mask_sources(args.get("mask_source"), args["heads"], stores, open_stores=False)


def _cross_folders(args: dict, out: str) -> list[str]:
    from .store import store_name

    return [f"{out}/runs/{store_name(s)}-{h}" for s in args["stores"] for h in args["heads"]]


@register_step("cross", forwards=("protocols", "cross_matrix"), supplied=frozenset({"out_dir"}),
               reads=("stores", "test_stores", "labels", "mask_source"), outputs=_cross_folders, check=_check_cross)
def _cross_step(stores: list[str], heads: list[str], out: str, progress: bool = True, **kw):
    """The train-on-A/test-on-B matrix of each head under `out` (`fercache cross`)."""
    from .protocols import cross_matrix

    return "\n" + cross_matrix(stores, heads, out, progress=progress, **kw).markdown  # minutes: per-epoch bars


def _check_backbones(args: dict) -> None:
    from .backbones import check_backbones

    check_backbones(args["stores"], args["heads"], args.get("hp"), args.get("recipe"), args.get("metric", "accuracy"))


@register_step("backbones", forwards=("backbones", "backbones"), supplied=frozenset({"out_dir"}), reads=("stores",),
               writes=("out",), check=_check_backbones)
def _backbones_step(stores: dict, heads: list[str], out: str, progress: bool = True, **kw):
    """The same heads over several encoders' stores of the same datasets: backbone x dataset tables under `out`
    (`fercache backbones`)."""
    from .backbones import backbones

    return "\n" + backbones(stores, heads, out, progress=progress, **kw).markdown


@register_step("near_dups", forwards=("neighbours", "near_duplicates"), supplied=frozenset({"out_dir", "root"}),
               reads=("store", "manifest", "against", "data_root"), writes=("out", "without_leaks_to"),
               files=("without_leaks_to",), check=_check_derived("without_leaks_to", "manifest"),
               renamed=(("root", "data_root"),))
def _near_dups_step(store: str, out: str, data_root: str | None = None, **kw):
    """Near-duplicates across splits from the cached features, written to `out` (`fercache near-dups`)."""
    from .neighbours import near_duplicates, summarize

    return "\n" + summarize(near_duplicates(store, out, root=data_root, **kw))


def _check_evaluate(args: dict) -> None:
    from .scoring import check_errors

    check_errors(args.get("errors", 0))


@register_step("evaluate", reads=("runs", "store", "manifest", "data_root"), check=_check_evaluate)
def _evaluate_step(runs: list[str], store: str | None = None, manifest: str | None = None, split: str = "test",
                   device: str = "cpu", errors: int = 0, data_root: str | None = None):
    """Score runs on a split, files beside each run; `errors = N` draws their N surest mistakes (`fercache
    evaluate`)."""
    from .scoring import evaluate, summarize

    results = [evaluate(run, store, manifest, split, device, errors=errors, root=data_root) for run in runs]
    return "\n" + "\n".join(summarize(res) for res in results)


def _check_au_head(args: dict) -> None:
    from .protocols import au_crossval

    _check_head({"head": inspect.signature(au_crossval).parameters["head"].default, **args})


@register_step("au_cv", forwards=("protocols", "au_crossval"), supplied=frozenset({"out_dir"}), reads=("store",),
               writes=("out",), check=_check_au_head)
def _au_cv_step(store: str, out: str, progress: bool = True, **kw):
    """Subject-grouped k-fold AU detection under `out` (`fercache au-cv`)."""
    from .protocols import au_crossval

    return "\n" + au_crossval(store, out, progress=progress, **kw)["markdown"]


@register_step("folds", forwards=("protocols", "manifest_folds"), supplied=frozenset({"out_dir"}),
               reads=("store", "manifests"), writes=("out",), check=_check_protocol)
def _folds_step(store: str, manifests: list[str], heads: list[str], out: str, progress: bool = True, **kw):
    """The video protocol: one store, one manifest per fold, tables under `out` (`fercache folds`)."""
    from .protocols import manifest_folds

    return "\n" + manifest_folds(store, manifests, heads, out, progress=progress, **kw)["markdown"]


def _check_sweep(args: dict) -> None:
    from .sweeps import plan

    plan(args["head"], args["grid"], args.get("base_recipe") or {}, args.get("base_hp") or {})


def _sweep_points(args: dict, out: str) -> list[str]:
    from .sweeps import grid_points

    return [f"{out}/point{i:03d}" for i in range(len(grid_points(args["grid"])))]


@register_step("sweep", forwards=("sweeps", "sweep"), onward=("train", "fit_many"),
               supplied=frozenset({"out_dir", "points"}),
               reads=("store", "manifest", "mask_source"), outputs=_sweep_points, check=_check_sweep)
def _sweep_step(store: str, head: str, grid: dict, out: str, progress: bool = True, **kw):
    """A grid of hyperparameters or recipe keys ranked on validation, under `out` (`fercache sweep`)."""
    from .sweeps import summarize, sweep

    return "\n" + summarize(sweep(store, head, grid, out, progress=progress, **kw))


@register_step("compare", forwards=("compare", "compare"), reads=("a", "b", "store", "manifest"), writes=("out",),
               files=("out",))
def _compare_step(a: str, b: str, out: str | None = None, **kw):
    """B - A on the same test samples with a paired bootstrap; JSON to `out` if given (`fercache compare`)."""
    from .compare import compare, summarize

    return "\n" + summarize(compare(a, b, out=out, **kw))


def _check_runs(args: dict) -> None:
    """A ledger's csv replaces only an earlier ledger, never a manifest or another file."""
    from .report import check_replaceable
    from .runs import LEDGER_HEADER

    if args.get("csv"):
        check_replaceable(Path(args["csv"]), LEDGER_HEADER, "csv")


@register_step("runs", reads=("root",), writes=("csv",), files=("csv",), check=_check_runs)
def _runs_step(root: str, csv: str | None = None):
    """The run ledger of every run under `root`, optionally as CSV (`fercache runs`)."""
    from .runs import ledger, summarize, write_ledger

    result = ledger(root)
    if csv:
        write_ledger(result, csv)
    return "\n" + summarize(result)


def _typed(name: str, text: str, default: Any) -> Any:
    """The value of FERCACHE_<NAME>=text, of the type of the variable's value in the file: a whole number stays one
    (`64.0` or `abc` for a batch size would fail mid-run, or become a float), a string stays the text as given, a
    list is comma-separated items of its first item's type."""
    env = f"FERCACHE_{name.upper()}={text}"
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{env}: [vars] {name} is true or false in the file; give true or false")
        return text.lower() in ("true", "1")
    if isinstance(default, list):  # FERCACHE_SEEDS=0 or 0,1,2 for seeds = [3407, 3408, 3409]
        like = default[0] if default else text
        return [_typed(name, item.strip(), like) for item in text.strip("[]").split(",") if item.strip()]
    for kind, cast, what in ((int, int, "a whole number"), (float, float, "a number")):
        if isinstance(default, kind):
            try:
                return cast(text)
            except ValueError:
                raise ConfigError(f"{env}: [vars] {name} is {what} in the file ({default!r}); give {what}") from None
    return text


def _variables(doc: dict) -> dict[str, Any]:
    """[vars] with their FERCACHE_<NAME> overrides and references to each other expanded (`manifest =
    "{out}/m.csv"`), so a step never receives a variable's text with `{out}` still in it."""
    raw = doc.get("vars", {})
    given = {k: _typed(k, os.environ[f"FERCACHE_{k.upper()}"], v) if f"FERCACHE_{k.upper()}" in os.environ else v
             for k, v in raw.items()}
    done: dict[str, Any] = {}

    def expand(name: str, seen: tuple[str, ...]) -> Any:
        if name in seen:
            raise ConfigError(f"[vars] {' -> '.join((*seen, name))}: variables refer to each other in a circle")
        if name not in done:
            refs = _references(given[name], given)
            for ref in refs:
                expand(ref, (*seen, name))
            try:
                done[name] = _substitute(given[name], {k: done[k] for k in refs})
            except ConfigError as e:
                raise ConfigError(f"[vars] {name}: {e}") from None
        return done[name]

    for name in given:
        expand(name, ())
    return done


def _texts(value: Any) -> list[str]:
    """Every string in a value, tables and lists included."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [text for item in items for text in _texts(item)]


def _references(value: Any, variables: dict[str, Any]) -> list[str]:
    """The variables a value's text names ({name}), in order; none for numbers, tables of them, or bad braces
    (substitution then says what is wrong)."""
    out = []
    for text in _texts(value):
        try:
            out += [f for _, f, _, _ in string.Formatter().parse(text) if f in variables and f not in out]
        except ValueError:
            pass
    return out


def _substitute(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}") and value[1:-1] in variables:
        return variables[value[1:-1]]  # a whole-value reference keeps the variable's type
    if isinstance(value, str):
        return _substitute_text(value, variables)
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    return value


def _substitute_text(value: str, variables: dict[str, Any]) -> str:
    """`{name}` is the variable's value and `{{` / `}}` a literal brace, as in str.format; its other fields
    (`{}`, `{0}`, a lone brace, `{data.x}`, `{data[0]}`, which takes a piece of a value) are refused."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
    except ValueError as e:  # a lone brace
        raise ConfigError(f"{value!r}: {e}; {_how_braces(variables)}") from None
    for f in fields:
        if f.isidentifier() and f not in variables:
            hint = did_you_mean(f, variables)
            raise ConfigError(f"unknown variable {{{f}}} in {value!r}; define it under [vars]{hint}")
        if f not in variables:
            raise ConfigError(f"{{{f}}} in {value!r} is not a variable; {_how_braces(variables)}")
    return value.format(**variables)


def _how_braces(variables: dict[str, Any]) -> str:
    return (f"variables are written {{name}} ([vars] here: "
            f"{', '.join(variables) or 'none'}), a literal brace {{{{ or }}}}")


TABLES = ("vars", "step")  # the top level of a pipeline file


def _check_tables(path: Path, doc: dict) -> None:
    """A pipeline file holds [vars] and [[step]] tables only: anything else ([[steps]], a variable written above
    [vars]) would be ignored: its steps never run, its value never used, without a word."""
    for key, value in doc.items():
        if key not in TABLES:
            where = "" if isinstance(value, (dict, list)) else " (a variable? put it under [vars])"
            raise ConfigError(f"{path}: unknown top-level key {key!r}{did_you_mean(key, TABLES)}{where}; "
                              "a pipeline file has a [vars] table and [[step]] tables")
    if not isinstance(doc.get("vars", {}), dict):
        raise ConfigError(f"{path}: 'vars' must be a table: [vars] then name = value lines")
    if not isinstance(doc.get("step", []), list) or not all(isinstance(s, dict) for s in doc.get("step", [])):
        raise ConfigError(f"{path}: 'step' must be [[step]] tables, one per step")


def load_pipeline(path: str | Path) -> list[dict]:
    """Parse a pipeline file into steps with variables substituted."""
    return _load(Path(path))[0]


def _load(path: Path) -> tuple[list[dict], dict[str, Any]]:
    """The substituted steps, and the [vars] they were substituted with (what a missing input's message names)."""
    doc = _document(path)
    try:
        variables = _variables(doc)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    steps = doc.get("step", [])
    if not steps:
        raise ConfigError(f"{path}: no [[step]] tables")
    for i, step in enumerate(steps):
        if step.get("run") not in STEPS:
            raise ConfigError(f"{path}: step {i + 1} has run={step.get('run')!r}; known: {', '.join(sorted(STEPS))}")
        for old, new in STEPS[step["run"]].renamed:
            if old in step and new in step:
                raise ConfigError(f"{path}: step {i + 1} ({step['run']}) has both {old!r} and {new!r}, which are one "
                                  f"key ({old!r} is its old name); keep {new!r}")
            if old in step:
                step[new] = step.pop(old)
    return [_substituted(path, i, s, variables) for i, s in enumerate(steps)], variables


def _document(path: Path) -> dict:
    """The pipeline file's TOML, its tables checked."""
    if path.is_dir():
        inside = ", ".join(sorted(p.name for p in path.glob("*.toml"))[:8])
        raise ConfigError(f"{path} is a folder; pass a pipeline file" + (f" (here: {inside})" if inside else ""))
    if not path.is_file():
        hint = near_path(path, lambda p: p.is_file() and p.suffix == ".toml")
        raise ConfigError(f"pipeline file {path} does not exist{hint}")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a TOML text file ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    _check_tables(path, doc)
    return doc


def _substituted(path: Path, i: int, step: dict, variables: dict[str, Any]) -> dict:
    try:
        return _substitute(step, variables)
    except ConfigError as e:  # named, as every other error of a step is
        raise ConfigError(f"{path}: step {i + 1} ({step['run']}): {e}") from None


def describe_step(kind: str) -> dict:
    """What a `[[step]]` of this kind takes: the keys it needs, and every optional key with its default."""
    step = STEPS.lookup(kind)
    defaults: dict[str, Any] = {}
    for fn in step.functions():
        for p in inspect.signature(fn).parameters.values():
            defaults.setdefault(p.name, p.default)
    takes, needs = step.takes(), [p.name for p in step.params() if p.default is p.empty]
    if "reuse" in defaults:
        defaults["reuse"] = True  # what run_pipeline passes unless `fercache run --retrain`
    return {"kind": kind, "summary": step.run.__doc__, "needs": needs,
            "optional": {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()
                         if k in takes and k not in needs}}


def _check_arguments(kind: str, args: dict) -> None:
    params, takes = STEPS[kind].params(), STEPS[kind].takes()
    for key in sorted(set(args) - takes):
        raise ConfigError(f"{kind} takes no argument {key!r}{did_you_mean(key, takes)}; it takes: "
                          f"{', '.join(sorted(takes))}")
    missing = [p.name for p in params if p.default is p.empty and p.name not in args]
    if missing:
        raise ConfigError(f"{kind} needs {', '.join(missing)}")


def _check_values(kind: str, args: dict) -> None:
    """What the library would refuse only when the step is reached: names, devices, head settings, options."""
    from .devices import torch_device
    from .recipe import check_seeds

    if "device" in args:
        torch_device(args["device"])
    if "seeds" in args:
        check_seeds(args["seeds"])
    if STEPS[kind].check:
        STEPS[kind].check(args)


def check_step(i: int, step: dict) -> None:
    """Step i's arguments against the library, raising ConfigError (or the library's own typed error) that
    names the step: argument names (with a suggestion), required ones, heads and their hp/recipe values, the
    device, the cross metrics, the dataset format, extract's options."""
    kind = step["run"]
    args = {k: v for k, v in step.items() if k not in ("run", "name")}
    try:
        _check_arguments(kind, args)
        _check_values(kind, args)
    except FercacheError as e:
        e.args = (f"step {i + 1} ({step.get('name', kind)}): {e}",)
        raise


def _selected(steps: list[dict], only: list[str] | None) -> list[tuple[int, dict]]:
    """The steps named (or of a kind named) in `only`, all without it; a name that matches none is an error, not
    a pipeline that runs nothing and exits 0."""
    names = {s.get("name", s["run"]) for s in steps} | {s["run"] for s in steps}
    for wanted in only or []:
        if wanted not in names:
            raise UnknownNameError("pipeline step name or kind", wanted, names)
    return [(i, s) for i, s in enumerate(steps) if not only or s.get("name", s["run"]) in only or s["run"] in only]


def _paths(value: Any) -> list[str]:
    """The paths an argument names: one, a list, or a table's values (cross's `labels`: store -> manifest), also
    tables of tables (cross's `mask_source`: label -> store -> source store)."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if v is not None]


def check_inputs(steps: list[tuple[int, dict]], variables: dict[str, Any] | None = None) -> None:
    """Every file or folder a step reads exists, or an earlier step writes it (or something under it, for the
    ledger's root), so a mistyped store in step 9 fails before the hour of extraction in step 1. A missing path
    that is a [vars] entry's value (or under it) names the FERCACHE_<NAME> variable that moves it."""
    written: list[Path] = []
    for i, step in steps:
        kind = step["run"]
        for key in STEPS[kind].reads:
            for p in _paths(step.get(key)):
                there = Path(os.path.abspath(p))
                if "://" in p or there.exists() or _written_before(there, written, key):
                    continue
                hint = near_path(p, Path.exists) or did_you_mean(there, written) or _set_by(p, variables or {})
                where = "" if Path(p).is_absolute() else f"; relative paths are read from {Path.cwd()}"
                raise ConfigError(f"step {i + 1} ({step.get('name', kind)}): {key} {p} does not exist, and no earlier "
                                  f"step writes it{hint}{where}")
        written += _writes(kind, step)
    check_outputs(steps)


def _set_by(path: str, variables: dict[str, Any]) -> str:
    """'; it is [vars] NAME: set FERCACHE_NAME=PATH ...' for the variable whose value `path` is or lies under."""
    under = [(len(v), k) for k, v in variables.items()
             if isinstance(v, str) and v and (path == v or path.startswith(v.rstrip("/") + "/"))]
    if not under:
        return ""
    name = max(under)[1]
    return f" (from [vars] {name}: set FERCACHE_{name.upper()}=PATH, or edit the file)"


def check_outputs(steps: list[tuple[int, dict]]) -> None:
    """No folder a step writes is blocked by a file, and no two steps write one store from different inputs
    (the second would be refused as "built from other inputs" after the first had run for an hour)."""
    stores: dict[str, tuple[int, dict]] = {}
    for i, step in steps:
        kind, name = step["run"], step.get("name", step["run"])
        files = {os.path.abspath(p) for key in STEPS[kind].files for p in _paths(step.get(key))}
        for path in _writes(kind, step):
            if str(path) not in files and (there := file_in_the_way(path)):
                raise ConfigError(f"step {i + 1} ({name}): it writes the folder {path}, but {there} is a file; "
                                  "choose another out")
        if STEPS[kind].one_writer and "://" not in str(step["out"]):
            inputs = {k: v for k, v in step.items() if k not in ("name", "run", "progress")}
            first = stores.setdefault(os.path.abspath(step["out"]), (i, inputs))
            if first[1] != inputs:
                differ = sorted(k for k in {**first[1], **inputs} if first[1].get(k) != inputs.get(k))
                raise ConfigError(f"steps {first[0] + 1} and {i + 1} both write the store {step['out']} from different "
                                  f"inputs ({', '.join(differ)} differ); give each its own out")


def _written_before(there: Path, written: list[Path], key: str) -> bool:
    """An earlier step writes `there` or a folder above it; for the ledger's root, something under it."""
    if key == "root":
        return any(w.is_relative_to(there) for w in written)
    return any(there.is_relative_to(w) for w in written)


def _writes(kind: str, step: dict) -> list[Path]:
    """What a step writes: its declared `outputs` exactly, else the paths its `writes` arguments name."""
    spec = STEPS[kind]
    out = step.get("out", describe_step(kind)["optional"].get("out"))
    if spec.outputs:
        paths = spec.outputs(step, out)
    else:
        paths = [p for key in spec.writes for p in _paths(step.get(key, out if key == "out" else None))]
    return [Path(os.path.abspath(p)) for p in paths]


def check_pipeline(path: str | Path, only: list[str] | None = None) -> int:
    """Check every (selected) step of a pipeline file without running any; returns how many were checked."""
    return len(_checked(path, only))


def _checked(path: str | Path, only: list[str] | None) -> list[tuple[int, dict]]:
    """The (selected) steps, each checked, and every input of theirs there or written by an earlier step."""
    loaded, variables = _load(Path(path))
    steps = _selected(loaded, only)
    for i, step in steps:
        check_step(i, step)
    check_inputs(steps, variables)
    return steps


def run_pipeline(path: str | Path, on_step: Callable[[int, dict, Any], None] | None = None,
                 only: list[str] | None = None, progress: bool = True, retrain: bool = False) -> list[Any]:
    """Check every step first (`check_pipeline`), then run each in order; `on_step(i, step, result)` after each
    (`step["seconds"]`: how long it ran).

    Run again (after a failed step, or to redo a report), the steps that train reuse every run already finished
    in their folders with the same settings, data and code (`rundir.finished_run`), as extraction resumes its
    store; `retrain=True` (`fercache run --retrain`) trains them all. A step's own `reuse` key wins.
    `progress=False` turns off every step's progress bars (`fercache -q run`)."""
    results, steps = [], _checked(path, only)
    for i, step in steps:
        kind = step.pop("run")
        takes = STEPS[kind].takes()
        if not progress and "progress" in takes:
            step["progress"] = False
        if "reuse" in takes:
            step.setdefault("reuse", not retrain)
        name, started = step.pop("name", kind), time.perf_counter()
        try:
            result = STEPS[kind].run(**step)
        except TypeError as e:
            raise ConfigError(f"step {i + 1} ({name}): {e}") from None
        except FercacheError as e:
            e.args = (f"step {i + 1} ({name}): {e}",)
            raise
        results.append(result)
        if on_step:
            on_step(i, {"run": kind, "name": name, **step, "seconds": time.perf_counter() - started}, result)
    return results
