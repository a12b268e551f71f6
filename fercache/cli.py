"""The `fercache` command line: thin Typer wrappers over library functions.

Nothing below this module prints or exits; errors arrive as FercacheError
and are printed here as `error: ...` with exit status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import FercacheError, check_out_file, repeated

# Plain help (no Rich markup): help texts quote TOML (`[[step]]`, `[vars]`) and lists, which markup would eat.
PLAIN = {"no_args_is_help": True, "rich_markup_mode": None}
app = typer.Typer(help="Frozen-encoder features for facial expression and AU recognition, cached once in Zarr stores.",
                  pretty_exceptions_enable=False, **PLAIN)
manifest_app = typer.Typer(help="Build and check dataset manifests.", **PLAIN)
app.add_typer(manifest_app, name="manifest")
bench_app = typer.Typer(help="Benchmarks: figures and ratios measured in one run on one device.", **PLAIN)
app.add_typer(bench_app, name="bench")

DataRoot = typer.Option(None, "--data-root", help="Folder the manifest paths are relative "
                                                  "to (default: $FERCACHE_DATA, else .).")
Device = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or mps; checked before any data is read.")
Aus = typer.Option(None, "--aus", help="AU heads: 'top8', or AU numbers like 1,2,4 "
                                       "(default: AUs with >=20 train positives).")
PRECISION_HELP = ("auto (bf16 on CUDA, fp32 on CPU), fp32, fp16, bf16 (autocast: fp32 weights, matrix products in "
                  "half precision) or bf16-weights (the weights themselves in bf16, every op in bf16: faster, "
                  "features about as close to fp32's as bf16's; see docs/benchmarks.md).")
StoreArg = typer.Argument(..., metavar="STORE", help="A feature store: STORE.zarr, or any fsspec URL zarr supports.")
ManifestArg = typer.Argument(..., metavar="MANIFEST", help="Manifest CSV (.csv or .csv.gz).")
AsJson = typer.Option(False, "--json", help="Print one JSON document on stdout (logs and progress stay on stderr).")


def _echo_json(value) -> None:
    """`value` (dataclasses, lists and dicts of them, paths) as one JSON document."""
    import dataclasses
    import enum

    def plain(v):
        if isinstance(v, enum.Enum):
            return v.value
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    typer.echo(json.dumps(plain(value), indent=2, default=str))


Seeds = typer.Option("0", help="Comma-separated seeds; one run per seed.")
Retrain = typer.Option(False, "--retrain", help="Train every run again, also those already finished in --out with the "
                       "same settings, data and fercache code (by default those are reused: run again, it resumes).")
Published = typer.Option(None, "--published", metavar="PAPER", help="Also set the paper's published numbers beside "
                         "this run's, with the difference and why they may differ: cafe (cross), dfer_clip (folds); "
                         "`fercache published` lists them.")
_progress = {"bars": True}  # set by --quiet: logs of scripted runs stay free of progress-bar lines


def _version(asked: bool) -> None:
    if asked:
        from fercache import __version__

        typer.echo(f"fercache {__version__}")
        raise typer.Exit()


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings only, no progress bars."),
           version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                        help="Print fercache's version and exit."),
           threads: Optional[int] = typer.Option(None, "--threads", min=1, envvar="FERCACHE_THREADS",
                                                 help="torch's intra-op threads in this process "
                                                      "(default: torch's, one per core). On a machine "
                                                      "shared with other jobs, fewer run faster.")) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    # Our INFO lines are progress a user reads; the libraries' (open_clip logs each step of building a model to the
    # root logger) are noise unless debugging, so only --verbose lets them through.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("fercache").setLevel(level)
    _progress["bars"] = not quiet
    from .registry import load_plugins

    load_plugins()  # $FERCACHE_PLUGINS: the user's own heads, encoders, adapters or steps
    if threads:
        import torch

        torch.set_num_threads(threads)


def _options(pairs: list[str], flag: str) -> dict:
    """key=value pairs of a repeatable option. A key given twice is refused: a dict would keep the later value and
    drop the earlier without a word."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"{flag} takes key=value, got {pair!r}")
        if key in out:
            raise typer.BadParameter(f"{flag} {key} is given twice ({out[key]}, {value}); give each key once")
        out[key] = value
    return out


@manifest_app.command("build")
def manifest_build(
    src: Path = typer.Argument(..., metavar="SRC", help="The dataset folder in its native layout."),
    fmt: str = typer.Option(..., "--format", "-f", help="Dataset layout; see `fercache manifest formats`."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest CSV to write (.csv or .csv.gz)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Make paths relative to this "
                                                                       "folder (default: SRC)."),
    option: list[str] = typer.Option([], "--option", metavar="KEY=VALUE", help="Adapter option key=value (repeatable), "
                                                          "e.g. facs=ckplus_facs.csv; `fercache "
                                                          "manifest formats F` lists F's."),
) -> None:
    """Build a manifest (canonical labels, splits, subjects, AUs) from a dataset's native layout."""
    from .adapters import build
    from .manifests import write_manifest

    manifest = build(fmt, src, data_root=data_root, **_options(option, "--option"))
    typer.echo(f"{write_manifest(manifest, out)}: {len(manifest)} rows")


@manifest_app.command("formats")
def manifest_formats(name: Optional[str] = typer.Argument(None, metavar="NAME",
                                                          help="One format, described whole (default: all).")) -> None:
    """The dataset layouts `manifest build --format` reads, and the --option keys each takes with their defaults."""
    from .adapters import ADAPTERS, describe_format

    rows = [describe_format(n) for n in ([name] if name else sorted(ADAPTERS))]
    width = max(len(d["name"]) for d in rows)
    shown = lambda v: "(auto)" if v is None else str(v).lower() if isinstance(v, bool) else v  # noqa: E731
    for d in rows:
        options = " ".join(f"{k}={shown(v)}" for k, v in d["options"].items()) or "(none)"
        typer.echo(f"{d['description']}\n\n--option {options}" if name else
                   f"{d['name']:{width}s} {d['layout']}\n{'':{width}s} --option {options}")


@manifest_app.command("check")
def manifest_check(
    manifest: Path = ManifestArg,
    data_root: Optional[Path] = DataRoot,
    hash_images: bool = typer.Option(True, "--hash/--no-hash",
                                     help="Hash every image to find copies shared by splits."),
    without_leaks: Optional[Path] = typer.Option(None, "--without-leaks", help="Write this manifest with the leaking "
                                                 "val/test images (or clips) unlabelled; the same store serves it."),
    strict: bool = typer.Option(False, help="Exit with status 1 when anything leaks."),
    as_json: bool = typer.Option(False, "--json", help="Counts and findings as JSON."),
) -> None:
    """Validate a manifest and that every file exists; counts per split and label; leakage across splits.

    Leakage: subjects in more than one split, and byte-identical images (same face box) in more than one split
    or with different labels. Published splits have them (FER2013: a test image that is a training image).
    """
    from .audit import check, label_table, summarize
    from .manifests import summary

    m, found, written = check(manifest, data_root, hash_images, without_leaks,
                              progress=not as_json and _progress["bars"])
    if as_json:
        extra = {"duplicate_groups": len(found.duplicate_groups), "label_conflicts": len(found.label_conflicts),
                 "leaking_units": len(found.leaking)} if found else {}
        typer.echo(json.dumps({**summary(m), **extra}, indent=2))
    else:
        s = summary(m)
        typer.echo(f"{manifest}: {s['rows']} rows, {s['subjects']} subjects, every file present"
                   + (f", AU columns {', '.join(s['au_columns'])}" if s["au_columns"] else "") + "\n" + label_table(m)
                   + "\n" + summarize(m, found))
    if written:
        typer.echo(f"{written}: {len(found.leaking)} {found.unit}(s) unlabelled")
    if strict and (found is None or not found.clean):
        raise typer.Exit(1)


@app.command()
def frames(
    src: Path = typer.Argument(..., metavar="SRC", help="A video file, or a folder searched recursively for .mp4, "
                                                        ".avi, .mov, .mkv, .webm, ... files."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the frame folders: SRC/<rel>/<clip>.mp4 becomes "
                             "OUT/<rel>/<clip>/00001.jpg, ..."),
    every: int = typer.Option(1, help="Keep every N-th frame (files keep the frame's index in the video)."),
    short_side: Optional[int] = typer.Option(None, help="Resize each frame's shorter side to this many pixels "
                                             "(default: as decoded)."),
    workers: Optional[int] = typer.Option(None, help="Clips decoded side by side (default min(4, CPUs); 0: in this "
                                          "process)."),
    detect: bool = typer.Option(False, help="Crop each frame to its face (MTCNN, the crop predict --detect makes); "
                                "frames without a face are left out. Needs facenet-pytorch."),
) -> None:
    """Decode video files into folders of JPEG frames, the layout `manifest build` reads for video datasets
    (DFEW, FERV39k, MAFW, Aff-Wild2: pass OUT as their `frames` option; videos in class folders, as AFEW's or
    your own: --format clipfolder on OUT). Resumable: a clip is written under
    <clip>.partial/ and renamed when whole, so clips already decoded are skipped when run again. Needs PyAV
    (pip install av: fercache's `video` extra)."""
    from .video import summarize, videos_to_frames

    typer.echo(summarize(videos_to_frames(src, out, every=every, short_side=short_side, workers=workers,
                                         progress=_progress["bars"], detect=detect)))


@app.command()
def extract(
    manifest: Path = typer.Argument(..., metavar="MANIFEST", help="Manifest CSV."),
    encoder: str = typer.Option("torchvision:mobilenet_v2", "--encoder", "-e",
                                help="family:arch, e.g. open_clip:ViT-B-16, torchvision:resnet50, timm:convnext_tiny."),
    out: str = typer.Option(..., "--out", "-o", help="Store path (STORE.zarr) or any fsspec URL zarr supports."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip hub tag (e.g. openai), local weights "
                                                        "file, or 'none' (random init, never a silent "
                                                        "default: open_clip models, and torchvision/timm "
                                                        "ones other than mobilenet_v2, need it)."),
    image_size: Optional[int] = typer.Option(None, help="Encoder input size (default: the model's)."),
    preprocess_tag: Optional[str] = typer.Option(None, help="With --pretrained FILE of an open_clip model: the "
                                                            "pretrained tag the file is a copy of, whose preprocessing "
                                                            "(mean, std, interpolation, resize mode) it needs."),
    normalize: str = typer.Option("checkpoint", help="Pixel statistics: checkpoint (the weights' own), clip (OpenAI "
                                  "CLIP's) or imagenet (as the feature-mask recipe feeds CLIP). Fingerprinted."),
    data_root: Optional[Path] = DataRoot,
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps (under torchrun: cuda picks LOCAL_RANK)."),
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, help="Decode worker processes (default min(4, CPUs))."),
    chunk_rows: int = typer.Option(1024, help="Rows per store chunk (unit of resume and of distribution)."),
    read_chunk_rows: Optional[int] = typer.Option(
        None, help="Shard the store: each --chunk-rows chunk becomes one zarr v3 shard of inner chunks of this many "
                   "rows (must divide --chunk-rows). Use with a large --chunk-rows to keep the object count low on big "
                   "datasets; decoding and encoding work in inner chunks, so memory stays small."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing store built from other inputs."),
    views: str = typer.Option("", help="Augmented views to cache too, comma-separated: flip (mirror; evaluation "
                                       "averages it in), erase (random erasing) and noise (Gaussian pixel noise), "
                                       "training-only draws fixed per row. Heads train on a random one of {image, "
                                       "its views} per image per epoch."),
    as_json: bool = AsJson,
) -> None:
    """Run a frozen encoder once over every manifest row into a fingerprinted, resumable Zarr store."""
    from .extract import extract as run

    r = run(manifest, encoder, out, pretrained=pretrained, image_size=image_size, root=data_root, device=device,
            batch_size=batch_size, workers=workers, chunk_rows=chunk_rows, precision=precision, overwrite=overwrite,
            read_chunk_rows=read_chunk_rows, views=[v.strip() for v in views.split(",") if v.strip()],
            preprocess_tag=preprocess_tag, normalize=normalize, progress=_progress["bars"])
    if r.n_ok is None:
        return  # non-zero torchrun ranks: rank 0 reports
    if as_json:
        return _echo_json(r)
    state = ("already complete, nothing to do" if r.already_complete else f"{r.chunks_computed} chunks at "
                                                                          f"{r.images_per_s:.0f} img/s")
    typer.echo(f"{r.store}: {r.rows} rows, {r.n_ok} ok, {r.n_failed} failed ({state})")


@app.command("verify")
def verify_cmd(
    store: str = StoreArg,
    repair: bool = typer.Option(False, "--repair", help="Mark the damaged chunks not done, so the same `fercache "
                                "extract` command encodes exactly those rows again."),
) -> None:
    """Check every chunk of a store against the checksums written with it: deleted, edited or swapped chunk files.
    Names the damaged chunks and their rows; exit 1 when any is damaged (after --repair too, until re-extracted)."""
    from .store import open_store

    st = open_store(store, mode="r+" if repair else "r")
    v = st.verify()
    for i, arrays in v.bad.items():
        a, b = v.rows[i]
        typer.echo(f"chunk {i} (rows {a}-{b - 1}): {', '.join(arrays)} damaged")
    if v.unchecked:
        typer.echo(f"{len(v.unchecked)} of {v.n_chunks} chunk(s) have no "
                   "checksums (extracted before fercache 0.4): not checked", err=True)
    if v.ok:
        typer.echo(f"{store}: {v.n_chunks - len(v.unchecked)} chunk(s) checked, none damaged")
        return
    if repair:
        st.repair(list(v.bad))
        typer.echo(f"{len(v.bad)} chunk(s) marked for re-extraction: run the same `fercache extract` command "
                   "(the store's own manifest, encoder and --data-root) to encode them again")
    else:
        typer.echo(f"{len(v.bad)} damaged chunk(s): `fercache verify {store} --repair`, then the same extract command, "
                   "re-encodes exactly those rows", err=True)
    raise typer.Exit(1)


@app.command()
def info(store: str = StoreArg, as_json: bool = typer.Option(False, "--json", help="Print the whole record as JSON."),
         verify: bool = typer.Option(False, "--verify", help="Also check every chunk against its checksums (as "
                                     "`fercache verify`); exit 1 when one fails.")) -> None:
    """Shape, outputs, completeness, failures and fingerprint of a store."""
    from dataclasses import asdict

    from .store import open_store

    d = open_store(store).info()
    if as_json:
        extra = {"verification": asdict(open_store(store).verify())} if verify else {}
        typer.echo(json.dumps({**asdict(d), **extra}, indent=2))
        return
    typer.echo("\n".join(d.lines()))
    if verify:
        verify_cmd(store, repair=False)


@app.command()
def export(store: str = StoreArg, to: Path = typer.Option(..., "--to", help="HDF5 file to write."),
           overwrite: bool = typer.Option(False,
                                          help="Replace an existing file that is not an export of STORE.")) -> None:
    """Export a complete store to HDF5 (features, sample ids, ok mask, clip ids and frame indices, fingerprint)."""
    from .store import export_h5

    typer.echo(export_h5(store, to, overwrite, progress=_progress["bars"]))


# so `--hp use_sigmoid=False` is not the truthy string "False"
_PY_LITERALS = {"True": True, "False": False, "None": None}


def _literal(value: str):
    """An --hp, --recipe or --axis value: JSON when it parses (numbers, booleans, null, lists), Python's
    True/False/None, else the string."""
    if value in _PY_LITERALS:
        return _PY_LITERALS[value]
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _kv(pairs: list[str], flag: str) -> dict:
    """key=value pairs of `flag`, each value a `_literal`."""
    return {key: _literal(value) for key, value in _options(pairs, flag).items()}


def _ints(text: str, option: str = "--seeds", least: int = 0) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) < least:
        raise typer.BadParameter(f"{option} takes comma-separated whole numbers >= {least}, got {text!r}")
    return values


MaxBatchConfigs = typer.Option(None, "--max-batch-configs", min=1, metavar="G",
                               help="Train at most G runs of a head at once as one stacked model (default: as many "
                                    "as half the free memory holds; 1 trains one run after another).")


@app.command("train-head")
def train_head(
    store: str = typer.Argument(..., metavar="STORE", help="A complete feature store."),
    head: str = typer.Option("linear", "--head", "-H", help="A registered head; `fercache heads` "
                                                            "lists each one's task, level (images "
                                                            "or video clips), --hp keys and recipe."),
    seeds: str = Seeds,
    out: Path = typer.Option(Path("runs"), "--out", "-o", help="Runs are written to OUT/<store>-<head>/seed<k>/."),
    manifest: Optional[Path] = typer.Option(None, help="Labels from this manifest (default: the store's own)."),
    output: Optional[str] = typer.Option(None, help="Store output to train on (default: the store's default)."),
    mask_source: Optional[str] = typer.Option(None, help="mask head: a second store of the "
                                                         "same manifest for the mask MLP."),
    hp: list[str] = typer.Option([], "--hp", metavar="KEY=VALUE", help="Head hyperparameter key=value (repeatable), "
                                                                       "e.g. --hp hidden=512."),
    recipe: list[str] = typer.Option([], "--recipe", metavar="KEY=VALUE", help="Training override key=value, e.g. "
                                                                               "--recipe epochs=10 --recipe lr=1e-3."),
    aus: Optional[str] = Aus,
    device: str = Device,
    views: bool = typer.Option(True, help="Train on the store's cached augmented views (extract "
                                          "--views) and evaluate on the average with its mirror "
                                          "(flip); --no-views uses the plain images only."),
    overwrite: bool = typer.Option(False, help="Replace a run of the same name trained with other settings "
                                              "(without it such a run is kept and this one refused)."),
    max_batch_configs: Optional[int] = MaxBatchConfigs,
    as_json: bool = AsJson,
) -> None:
    """Train a head on cached features; the epoch is chosen on the validation split, never on test.

    Several seeds of a head that stacks train at once, as one stacked model; each seed's run is the run it
    would be trained alone."""
    from .train import fit_seeds, summarize

    runs = fit_seeds(store, head, seeds=_ints(seeds), out_dir=out, manifest=manifest, output=output,
                     mask_source=mask_source, hp=_kv(hp, "--hp"), recipe=_kv(recipe, "--recipe"), aus=aus,
                     device=device, progress=_progress["bars"], views=views, overwrite=overwrite,
                     max_batch_configs=max_batch_configs)
    if as_json:
        return _echo_json(runs)
    for r in runs:
        typer.echo(summarize(r))


@app.command("heads")
def heads_cmd(name: Optional[str] = typer.Argument(None, metavar="NAME", help="One head (default: all)."),
              as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """The registered heads: task, level, --hp keys with their defaults, and the published --recipe each one trains
    with."""
    from .heads import HEADS

    rows = [HEADS.lookup(n).to_dict() for n in ([name] if name else sorted(HEADS))]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for d in rows:
        typer.echo(f"{d['name']:10s} {d['task']}/{d['level']}  {d['summary']}")
        typer.echo(f"{'':10s} --hp      {' '.join(f'{k}={json.dumps(v)}' for k, v in d['hp'].items()) or '(none)'}")
        typer.echo(f"{'':10s} --recipe  "
                   f"{' '.join(f'{k}={json.dumps(v)}' for k, v in d['recipe'].items() if v is not None)}")
        free = "seed, lr, weight_decay, momentum, scheduler, sam_rho, balance, select" + "".join(
            f", {k}" for k in d["stacks"] or ())
        typer.echo(f"{'':10s} trains    " + ("one run at a time" if d["stacks"] is None else f"stacked: runs that "
                                             f"differ only in {free} train as one model"))
    typer.echo("(null: chosen from the data, e.g. hidden=null is the feature width; values are JSON, as --hp parses "
               "them)\nevery head also takes --recipe balance=none|sqrt|class (class-balanced sampling, expression "
               "heads), select=<val metric> (accuracy|uar|macro_f1; AU: macro_f1_at_0.5), and shots=K (training units "
               "per class) or fraction=F (of the training units) to train on a seeded subset, and views=[...] (which "
               "of the store's cached views to train with; default all)")


@app.command("published")
def published_cmd(name: Optional[str] = typer.Argument(None, metavar="PAPER", help="One paper (default: all)."),
                  as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """The published numbers fercache sets beside its own (`cross`/`folds --published PAPER`): each paper's head,
    source, how the cached variant differs by design, and its numbers."""
    from dataclasses import asdict

    from .published import paper, papers

    entries = [paper(name)] if name else list(papers().values())
    if as_json:
        typer.echo(json.dumps([asdict(p) for p in entries], indent=2))
        return
    for p in entries:
        typer.echo(f"{p.name}: {p.title}\n  heads     {', '.join(p.heads)}\n  source    {p.source}\n"
                   f"  differs   {p.differs}")
        for cell, value in p.cross.items():
            typer.echo(f"  {cell:24s} accuracy {value:.2f}")
        for store, values in p.folds.items():
            typer.echo(f"  {store:24s} " + "  ".join(f"{k.upper()} {v:.2f}" for k, v in values.items()))
        if p.gains:
            typer.echo(f"  gains     {p.gains}")


def _by_head(pairs: list[str], flag: str) -> dict[str, dict]:
    """`HEAD:key=value` pairs as {HEAD: {key: value}}: `--mask-source mask:rafdb=stores/rafdb-r18.zarr`."""
    out: dict[str, dict] = {}
    for key, value in _options(pairs, flag).items():
        label, sep, name = key.partition(":")
        if not sep:
            raise typer.BadParameter(f"{flag} takes HEAD:STORE=VALUE, got {key}={value}")
        out.setdefault(label, {})[name] = value
    return out


def _per_head(pairs: list[str], flag: str, heads: list[str]) -> dict[str, dict]:
    """`key=value` for every head, `HEAD:key=value` for that head alone (a label of `heads`; it wins over the
    value for every head), as the pipeline's tables `{ HEAD = { key = value } }`: `--hp cvar_mlp:hidden=512`."""
    given = _kv(pairs, flag)
    tables = {h: {k: v for k, v in given.items() if ":" not in k} for h in heads}
    for key, value in given.items():
        label, sep, name = key.rpartition(":")
        if sep and label not in tables:
            raise typer.BadParameter(f"{flag} {key}={value!r}: {label!r} is none of the heads ({', '.join(heads)})")
        if sep:
            tables[label][name] = value
    return tables


@app.command()
def cross(
    stores: list[str] = typer.Argument(..., metavar="STORES", help="Stores to train on (each tested on too, unless "
                                                                   "--test is given)."),
    heads: list[str] = typer.Option(["linear"], "--heads", "--head", metavar="HEAD[,HEAD...]",
                                    help="Heads, comma-separated or repeated (--heads linear,mask or --head linear "
                                         "--head mask); HEAD@NAME trains a head again beside itself with its own "
                                         "HEAD@NAME:key=value settings."),
    test: list[str] = typer.Option([], "--test", metavar="STORE", help="Stores to test on (repeatable; default: the "
                                                                       "training stores)."),
    seeds: str = Seeds,
    hp: list[str] = typer.Option([], "--hp", metavar="KEY=VALUE", help="Head hyperparameter key=value for every head, "
                                                                       "or HEAD:key=value for one (repeatable), e.g. "
                                                                       "--hp cvar_mlp:hidden=512."),
    recipe: list[str] = typer.Option([], "--recipe", metavar="KEY=VALUE", help="Training override key=value for every "
                                                                               "head, or HEAD:key=value for one, e.g. "
                                                                               "--recipe mask:epochs=15."),
    out: Path = typer.Option(Path("runs/cross"), "--out", "-o", help="Folder for the runs and the matrices."),
    labels: list[str] = typer.Option([], "--labels", metavar="STORE=MANIFEST", help="STORE=MANIFEST (store path "
                                                                                    "or name): train and test "
                                                                                    "that store on these labels "
                                                                                    "of the same images, e.g. a "
                                                                                    "--without-leaks manifest."),
    metric: str = typer.Option("accuracy", help="Comma-separated metrics, one matrix each (accuracy, uar, macro_f1, "
                               "ece, ece_ts: ECE after the temperature fitted on the training store's val split)."),
    mask_source: list[str] = typer.Option([], "--mask-source", metavar="HEAD:STORE=SOURCE", help="HEAD's mask "
                                          "reads SOURCE (a second encoder's store of STORE's images, joined by sample "
                                          "id) on STORE; give one per store HEAD trains or is tested on (repeatable)."),
    published: Optional[str] = Published,
    retrain: bool = Retrain,
    device: str = Device,
) -> None:
    """The cross-dataset matrix: train each head on each store, test on each test store's test split (the
    pipeline's `cross` step). Test samples whose label the training store lacks are excluded and counted."""
    from .protocols import cross_matrix

    names = _names(heads)
    tables = cross_matrix(stores, names, out, seeds=_ints(seeds), test_stores=test or None,
                          hp=_per_head(hp, "--hp", names), recipe=_per_head(recipe, "--recipe", names), device=device,
                          progress=_progress["bars"], labels=_options(labels, "--labels"),
                          metric=[m for m in metric.split(",") if m], reuse=not retrain, published=published,
                          mask_source=_by_head(mask_source, "--mask-source"))
    typer.echo(tables.markdown)


@app.command("backbones")
def backbones_cmd(
    backbone: list[str] = typer.Option(..., "--backbone", "-b", metavar="NAME=STORE[,STORE...]", help="One encoder's "
                                       "stores of the datasets (repeatable, two or more), e.g. -b vit-b32=out/rafdb"
                                       ".zarr,out/sfew.zarr; datasets are matched across backbones by store name."),
    heads: list[str] = typer.Option(["linear"], "--heads", "--head", metavar="HEAD[,HEAD...]", help="Heads, "
                                    "comma-separated or repeated, as `cross` takes them."),
    seeds: str = Seeds,
    hp: list[str] = typer.Option([], "--hp", metavar="KEY=VALUE", help="As `cross`: key=value or HEAD:key=value."),
    recipe: list[str] = typer.Option([], "--recipe", metavar="KEY=VALUE", help="As `cross`."),
    metric: str = typer.Option("accuracy", help="The metric of the tables (accuracy, uar, macro_f1, ece, ece_ts)."),
    out: Path = typer.Option(Path("runs/backbones"), "--out", "-o", help="Folder for the tables and each "
                                                                          "backbone's matrix (out/NAME/)."),
    retrain: bool = Retrain,
    device: str = Device,
) -> None:
    """Backbones as an axis: the cross matrix of each encoder's stores, then backbone x dataset tables (in domain,
    and mean over unseen datasets) per head (the pipeline's `backbones` step)."""
    from .backbones import backbones

    names = _names(heads)
    stores = {k: [s for s in v.split(",") if s] for k, v in _options(backbone, "--backbone").items()}
    r = backbones(stores, names, out, seeds=_ints(seeds), hp=_per_head(hp, "--hp", names),
                  recipe=_per_head(recipe, "--recipe", names), device=device, metric=metric,
                  progress=_progress["bars"], reuse=not retrain)
    typer.echo(r.markdown)


@app.command()
def evaluate(
    runs: list[str] = typer.Argument(..., metavar="RUNS", help="Run directories (or parents of seed runs)."),
    store: Optional[str] = typer.Option(None, help="Store to evaluate on (default: the run's training store)."),
    split: str = typer.Option("test", help="Split to score."),
    manifest: Optional[Path] = typer.Option(None, help="Labels from this manifest (default: the store's own)."),
    errors: int = typer.Option(0, "--errors", min=0, help="Also draw the N mistakes each "
                                                          "run was surest of (errors.png)."),
    data_root: Optional[Path] = typer.Option(None, help="--errors: folder the manifest paths are relative to "
                                             "(default: $FERCACHE_DATA, else the one the store was extracted from)."),
    device: str = Device,
    as_json: bool = AsJson,
) -> None:
    """Score runs (WAR, UAR, macro-F1 with 95% intervals, per-class recall, confusion CSV/PNG, predictions.csv;
    calibration: ECE, NLL, Brier before and after the run's validation-fitted temperature, reliability.png;
    per-AU F1). The cross-dataset matrix is `fercache cross`."""
    from .scoring import evaluate as run_eval
    from .scoring import summarize

    results = [run_eval(run, store, manifest, split, device, errors=errors, root=data_root) for run in runs]
    if as_json:
        return _echo_json(results)
    for result in results:
        typer.echo(summarize(result))


@app.command()
def compare(
    a: str = typer.Argument(..., metavar="A", help="Run A: a run directory, or a parent "
                                                   "of seed runs (the mean of its seeds)."),
    b: str = typer.Argument(..., metavar="B", help="Run B, likewise."),
    store: Optional[str] = typer.Option(None, help="Score both on this store (default: their common training store)."),
    split: str = typer.Option("test", help="Split to score."),
    manifest: Optional[Path] = typer.Option(None, help="Labels from this manifest (default: the store's own)."),
    n_boot: int = typer.Option(1000, "--n-boot", min=100, help="Bootstrap resamples."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the comparison as JSON."),
    device: str = Device,
) -> None:
    """Is B better than A? B - A on the same test samples, with a paired 95% bootstrap interval and p-value.

    Subjects are resampled whole (several frames of one person are not independent evidence), and both runs
    score every resample, so the interval is that of the difference, not of either run alone.
    """
    from .compare import compare as run_compare
    from .compare import summarize

    typer.echo(summarize(run_compare(a, b, store, manifest, split, device, n_boot=n_boot, out=out)))
    if out:
        typer.echo(f"-> {out}")


@app.command("near-dups")
def near_dups(
    store: str = typer.Argument(..., metavar="STORE", help="A complete store."),
    threshold: float = typer.Option(0.95, min=0.0, max=1.0, help="Cosine at or above which two "
                                                                 "images count as one photo."),
    out: Path = typer.Option(Path("near-dups"), "--out", "-o", help="Folder for near-dups.csv and the plots."),
    manifest: Optional[Path] = typer.Option(None, help="Labels and splits from this manifest "
                                                       "(default: the store's own)."),
    output: Optional[str] = typer.Option(None, help="Store output to compare (default: the store's default)."),
    pairs: int = typer.Option(16, min=0, help="Draw the N least similar pairs above the threshold (needs the images; "
                              "without them the figure is skipped with a warning, the rest is written)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="--pairs: folder the manifest paths are "
                                                                       "relative to (default: $FERCACHE_DATA, else the "
                                                                       "one each store was extracted from)."),
    without_leaks: Optional[Path] = typer.Option(None, "--without-leaks", help="Write the manifest with those val/test "
                                                 "images (clips) unlabelled; the same store serves it."),
    against: Optional[str] = typer.Option(None, help="Compare with this other store's train and val images instead "
                                          "(same encoder): test images of STORE that a head trained on it has seen."),
    device: str = Device,
) -> None:
    """Near-duplicates across splits from the cached features: val/test images whose nearest train (or val)
    image is at least --threshold similar, mirrored views included. Finds the re-cropped and re-encoded copies
    that `manifest check` (byte-identical files) cannot. With --against B.zarr, across datasets: the images a
    train-on-B / test-on-STORE cell of the cross matrix would score from memory."""
    from .neighbours import near_duplicates, summarize

    found = near_duplicates(store, out, manifest, output, threshold, without_leaks, pairs, data_root, device, against)
    typer.echo(summarize(found))


@app.command()
def predict(
    run: Path = typer.Argument(..., metavar="RUN", help="A trained run directory, or a folder of seed runs (seed0, "
                                                        "seed1, ...): their probabilities are averaged."),
    images: list[Path] = typer.Argument(..., metavar="IMAGES", help="Image or video files, or folders of "
                                                                    "them (for a clip-level run: folders of "
                                                                    "one clip's frames, or video files)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write .json or .csv (default: JSON to stdout)."),
    every: int = typer.Option(1, help="Videos: every N-th frame (a frame-level run gives one row per frame, with "
                              "its index in the video)."),
    window: Optional[int] = typer.Option(None, help="Clip-level runs: one prediction per window of N frames of each "
                                         "video or clip folder, instead of one for all of it."),
    stride: Optional[int] = typer.Option(None, help="With --window: frames from one window's start to the next "
                                         "(default: half a window)."),
    detect: bool = typer.Option(False, help="Crop the most confident face with MTCNN (facenet-pytorch) first; each "
                                "row records the face's box and confidence."),
    face_margin: float = typer.Option(0.0, help="With --detect: grow the face's box by this fraction of its width "
                                      "and height on each side (e.g. 0.2)."),
    calibrated: bool = typer.Option(True, help="Expression probabilities scaled by the temperature the run fitted on "
                                    "its validation split (--no-calibrated: raw softmax; the prediction is the same)."),
    device: str = Device,
) -> None:
    """Class probabilities for new images or videos, using the run's encoder and preprocessing."""
    from .predict import check_out, tally, timelines, write_predictions
    from .predict import predict as run_predict

    check_out(out)
    rows = run_predict(run, images, detect=detect, face_margin=face_margin, device=device, calibrated=calibrated,
                       progress=_progress["bars"], every=every, window=window, stride=stride)
    if out:
        failed = sum("error" in r for r in rows)
        typer.echo(f"{write_predictions(rows, out)}: {len(rows) - failed} predicted"
                   + (f", {failed} failed (see the error column)" if failed else "")
                   + (f" ({counts})" if (counts := tally(rows)) else ""))
        for png in timelines(rows, out):
            typer.echo(f"  over time -> {png}")
    else:
        typer.echo(json.dumps(rows, indent=2))


@app.command("au-cv")
def au_cv(
    store: str = StoreArg,
    folds: int = typer.Option(5, help="Subject-grouped folds."),
    aus: str = typer.Option("top8", help="'topK' or AU numbers like 1,2,4."),
    seeds: str = Seeds,
    hp: list[str] = typer.Option([], "--hp", metavar="KEY=VALUE", help="Head hyperparameter key=value (repeatable)."),
    recipe: list[str] = typer.Option([], "--recipe", metavar="KEY=VALUE", help="Recipe override key=value "
                                                                               "(repeatable), e.g. epochs=30."),
    out: Path = typer.Option(Path("runs/au-cv"), "--out", "-o", help="Folder for the runs and the AU table."),
    retrain: bool = Retrain,
    device: str = Device,
    head: str = typer.Option("au", "--head", "-H", help="An AU head (see `fercache heads`)."),
) -> None:
    """Subject-grouped k-fold AU detection: per-AU F1 at 0.5, tuned thresholds, and the always-positive baseline."""
    from .protocols import au_crossval

    r = au_crossval(store, out, folds=folds, aus=aus, seeds=_ints(seeds), hp=_kv(hp, "--hp"),
                    recipe=_kv(recipe, "--recipe"), device=device, reuse=not retrain, head=head)
    typer.echo(r["markdown"] + f"\n-> {r['png']}")


@app.command()
def folds(
    store: str = StoreArg,
    manifest: list[Path] = typer.Option(..., "--manifest", "-m", metavar="MANIFEST",
                                        help="One manifest per fold (repeatable), e.g. DFEW's set_1..set_5 built with "
                                             "`fercache manifest build SRC --format dfew --option fold=K -o "
                                             "setK.csv`."),
    head: list[str] = typer.Option(["temporal"], "--head", "--heads", metavar="HEAD[,HEAD...]", help="Head(s) to train "
                                                                                                     "on every fold, "
                                                                                                     "comma-separated "
                                                                                                     "or repeated (as "
                                                                                                     "cross takes "
                                                                                                     "them)."),
    seeds: str = typer.Option("0,1,2", help="Seeds per fold; results are mean ± std over folds x seeds."),
    hp: list[str] = typer.Option([], "--hp", metavar="KEY=VALUE", help="Hyperparameter key=value for every head."),
    recipe: list[str] = typer.Option([], "--recipe", metavar="KEY=VALUE", help="Recipe override key=value for every "
                                                                               "head, e.g. epochs=30."),
    out: Path = typer.Option(Path("runs/folds"), "--out", "-o", help="Folder for the runs and the table."),
    published: Optional[str] = Published,
    retrain: bool = Retrain,
    device: str = Device,
) -> None:
    """The video protocol: train and test on each fold's manifest over ONE store; UAR and WAR over folds x seeds.

    All folds of DFEW or MAFW list the same frames, so one `fercache extract` serves all five.
    """
    from .protocols import manifest_folds

    head = _names(head)
    r = manifest_folds(store, [str(m) for m in manifest], head, out, seeds=_ints(seeds),
                       hp={h: _kv(hp, "--hp") for h in head}, recipe={h: _kv(recipe, "--recipe") for h in head},
                       device=device, progress=_progress["bars"], reuse=not retrain, published=published)
    typer.echo(r["markdown"])


def _names(values: list[str]) -> list[str]:
    """`--heads a,b` and `--head a --head b` alike: one list, in order."""
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def _axis(text: str) -> tuple[str, list]:
    """`name=v1,v2,...`, or `name=[v1, v2, ...]` as one JSON list when the values are lists themselves."""
    name, sep, values = text.partition("=")
    if not sep or not name:
        raise typer.BadParameter(f"--axis takes name=v1,v2,... or name=[JSON values], got {text!r}")
    if values.lstrip().startswith("["):
        try:
            points = json.loads(values)
        except json.JSONDecodeError as e:
            raise typer.BadParameter(f"--axis {name}: {values!r} is not a JSON list ({e}); points that are lists "
                                     f"themselves go in one outer list: {name}=[[], [\"flip\"]]") from None
        return name, points
    return name, [_literal(v) for v in values.split(",")]


@app.command("runs")
def runs_cmd(
    root: Path = typer.Argument(Path("runs"), metavar="ROOT", help="Folder to search for trained runs (any depth)."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Also write every table to this CSV."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when any run is stale or cannot be checked (for "
                                                        "scripts and CI)."),
    as_json: bool = AsJson,
    to: Optional[tuple[str, str]] = typer.Option(None, "--to", metavar="KIND TARGET",
                                       help="Also export every run to a tracker: `mlflow URI` (a tracking server, "
                                            "database or file store) or `tensorboard LOGDIR` (event files); runs "
                                            "exported before are left as they are."),
) -> None:
    """The run ledger: every run under ROOT, seeds grouped, ranked on validation, with the evaluations saved
    beside each run (eval-*/) and a status that flags STALE runs (store re-extracted or manifest edited since)."""
    from .runs import ledger, warnings, write_ledger
    from .tracking import EXPORTERS

    if to and to[0] not in EXPORTERS:
        raise typer.BadParameter(f"--to {to[0]}: one of {', '.join(EXPORTERS)}")
    if csv:
        check_out_file(csv, "--csv")
    result = ledger(root)
    if csv:
        written = write_ledger(result, csv)
    if as_json:
        _echo_json({"tables": list(result.tables.values()), "records": result.records, "stale": result.stale,
                    "unchecked": result.unchecked, "copies": result.copies, "incomplete": result.incomplete})
    else:
        typer.echo(result.markdown + (f"\nwrote {written}" if csv else ""))
    for line in warnings(result):
        typer.echo(line, err=True)
    if to:
        done = EXPORTERS[to[0]](root, to[1])
        typer.echo(f"{done.target}: {len(done.written)} run(s) exported"
                   + (f", {len(done.skipped)} exported before and left as they were" if done.skipped else ""), err=True)
    if strict and (result.stale or result.unchecked or result.incomplete):
        raise typer.Exit(1)


@app.command()
def sweep(
    store: str = StoreArg,
    head: str = typer.Option("mask", "--head", "-H", help="The head to sweep (see `fercache heads`)."),
    axis: list[str] = typer.Option(..., "--axis", metavar="NAME=V1,V2,...", help="name=v1,v2,... (repeatable); head "
                                                                                 "hyperparameters or recipe keys "
                                                                                 "(epochs, lr, weight_decay, "
                                                                                 "batch_size, sam_rho, balance, "
                                                                                 "select, shots, fraction, ...), e.g. "
                                                                                 "--axis n_drop=5,10,20 --axis "
                                                                                 "mask=sample,class,none; a "
                                                                                 "data-efficiency curve: --axis "
                                                                                 "shots=1,4,16,64; list-valued points "
                                                                                 "as one JSON list: --axis "
                                                                                 "'budgets=[null,[2,1,1,1,1,1,1]]'"),
    seeds: str = typer.Option("0", help="Comma-separated seeds; each point is "
                                        "trained once per seed, ranked on the mean."),
    recipe: list[str] = typer.Option([], "--recipe", metavar="KEY=VALUE", help="Fixed recipe overrides "
                                                                               "for every point."),
    hp: list[str] = typer.Option([], "--hp", metavar="KEY=VALUE", help="Fixed head hyperparameters for every point."),
    out: Path = typer.Option(Path("runs/sweep"), "--out", "-o", help="Folder for the runs, "
                                                                     "sweep.md/.csv/.json and plots."),
    retrain: bool = Retrain,
    device: str = Device,
    manifest: Optional[Path] = typer.Option(None, help="Labels from this manifest (default: the store's own)."),
    aus: Optional[str] = Aus,
    max_batch_configs: Optional[int] = MaxBatchConfigs,
    as_json: bool = AsJson,
) -> None:
    """Grid sweep of a head on cached features, ranked on the validation split (seconds per point on CPU).

    Points of a head that stacks (linear, mask, cvar_mlp, au) train many at once as one stacked model; their
    runs are those each point would train alone. Under `torchrun --nproc-per-node N -m fercache sweep ...`
    each process trains whole stacks and rank 0 writes the tables.

    Run again after an interruption, it goes on where it stopped: runs already finished in --out with the same
    settings, data and fercache code are read back instead of trained again (a stack cut short trains again)."""
    from .sweeps import summarize
    from .sweeps import sweep as run_sweep

    axes = [_axis(a) for a in axis]
    if twice := repeated([name for name, _ in axes]):  # dict() would keep the later --axis of a name, unsaid
        raise typer.BadParameter(f"--axis {twice[0]} is given twice; put all its values in one --axis name=v1,v2,...")
    grid = dict(axes)
    r = run_sweep(store, head, grid, out, seeds=_ints(seeds), device=device, base_recipe=_kv(recipe, "--recipe"),
                  base_hp=_kv(hp, "--hp"), progress=_progress["bars"], reuse=not retrain, manifest=manifest, aus=aus,
                  max_batch_configs=max_batch_configs)
    if r is None:
        return  # non-zero torchrun ranks: rank 0 reports
    if as_json:
        return _echo_json({**{f: getattr(r, f) for f in ("head", "axes", "rows", "runs", "reused", "curve_png")},
                           "best": r.best, "markdown": r.markdown})
    typer.echo(summarize(r))


def _print_figures(d: dict) -> None:
    for k, v in d.items():
        typer.echo(f"{k:32s} {v:,.2f}" if isinstance(v, float) else f"{k:32s} {v}")


@bench_app.command("extract")
def bench_extract_cmd(
    manifest: Path = ManifestArg,
    encoder: str = typer.Option("open_clip:ViT-B-16", "--encoder", "-e", help="family:arch, as for `extract`."),
    pretrained: Optional[str] = typer.Option(None, help="As for `extract`; the weights do not change the speed."),
    image_size: Optional[int] = typer.Option(None, help="Encoder input size (default: the model's)."),
    data_root: Optional[Path] = DataRoot,
    device: str = Device,
    batch_size: int = typer.Option(256, help="Images per forward pass, in every path measured."),
    workers: Optional[int] = typer.Option(None, help="Decode worker processes (default min(4, CPUs))."),
    n_images: Optional[int] = typer.Option(None, min=1, help="Use the first N rows (repeating the manifest if N is "
                                           "larger; default: every row)."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
) -> None:
    """(a) model-only, (b) end-to-end extract, (c) b/a, (d) PIL+DataLoader baseline, (e) input pipeline alone, (f)
    memory."""
    from .bench import bench_extract, verdict

    r = bench_extract(manifest, encoder, pretrained=pretrained, image_size=image_size, root=data_root, device=device,
                      batch_size=batch_size, workers=workers, n_images=n_images, precision=precision)
    _print_figures(r)
    typer.echo(verdict(r))


@bench_app.command("memory")
def bench_memory_cmd(
    manifest: Path = ManifestArg,
    sizes: str = typer.Option("10000,100000", help="Dataset sizes (rows; the manifest repeats to reach them)."),
    encoder: str = typer.Option("null:", "--encoder", "-e", help="null: measures the input pipeline and the store "
                                "writes alone; a real encoder adds the model and device memory."),
    image_size: int = typer.Option(224, help="Input size the images are decoded and resized to."),
    data_root: Optional[Path] = DataRoot,
    device: str = Device,
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, help="Decode worker processes (default min(4, CPUs))."),
) -> None:
    """Peak host RSS and device memory of whole extracts at several sizes: flat means it does not grow with N."""
    from .bench import bench_memory, memory_growth

    rows = bench_memory(manifest, _ints(sizes, "--sizes", least=1), encoder, image_size, data_root, device, batch_size,
                        workers)
    for r in rows:
        typer.echo("  ".join(f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if len(rows) > 1:
        g = memory_growth(rows)
        typer.echo(f"peak RSS ratio largest/smallest: {g['peak_rss_mib']:.3f}, steady-state (median RSS over each "
                   f"run's second half) {g['late_median_rss_mib']:.3f}, largest worker {g['peak_worker_rss_mib']:.3f}, "
                   f"for {g['images']:.3g}x the images")


@bench_app.command("head")
def bench_head_cmd(
    manifest: Path = ManifestArg,
    encoder: str = typer.Option("open_clip:ViT-B-16", "--encoder", "-e", help="family:arch, as for `extract`."),
    pretrained: Optional[str] = typer.Option(None, help="As for `extract`; the weights do not change the speed."),
    data_root: Optional[Path] = DataRoot,
    n_images: int = typer.Option(128, min=1, help="Images (the first N manifest rows) per epoch."),
    batch_size: int = typer.Option(32, help="Images per training step."),
    device: str = Device,
) -> None:
    """Seconds per epoch of the mask head from the cache vs re-encoding every image each epoch, and their ratio."""
    from .bench import bench_head

    _print_figures(bench_head(manifest, encoder, pretrained=pretrained, root=data_root, n_images=n_images,
                              batch_size=batch_size, device=device))


@bench_app.command("sweep")
def bench_sweep_cmd(
    store: str = StoreArg,
    head: str = typer.Option("linear", "--head", "-H", help="The head to sweep."),
    axis: list[str] = typer.Option([], "--axis", metavar="NAME=V1,V2,...", help="As for `sweep` (default: 32 points, "
                                   "lr x weight_decay)."),
    seeds: str = typer.Option("0", help="Comma-separated seeds, each point trained once per seed."),
    recipe: list[str] = typer.Option([], "--recipe", metavar="KEY=VALUE", help="Fixed recipe overrides."),
    hp: list[str] = typer.Option([], "--hp", metavar="KEY=VALUE", help="Fixed head hyperparameters."),
    manifest: Optional[Path] = typer.Option(None, help="Labels from this manifest (default: the store's own)."),
    device: str = Device,
    max_batch_configs: Optional[int] = MaxBatchConfigs,
) -> None:
    """One grid trained one run after another and as stacks: configurations/min of each, memory, the largest stack,
    and last `speedup X.XXx` (stacked over sequential)."""
    from .bench import bench_sweep

    r = bench_sweep(store, head, dict(_axis(a) for a in axis) or None, seeds=_ints(seeds),
                    recipe=_kv(recipe, "--recipe"), hp=_kv(hp, "--hp"), manifest=manifest, device=device,
                    max_batch_configs=max_batch_configs)
    speedup = r.pop("speedup")
    _print_figures(r)
    typer.echo(f"speedup {speedup:.2f}x")


@app.command("run")
def run_cmd(
    pipeline: Path = typer.Argument(..., metavar="PIPELINE", help="A pipeline TOML file, e.g. "
                                                                  "pipelines/quickstart.toml."),
    only: list[str] = typer.Option([], "--only", metavar="NAME", help="Run only steps with this name or kind."),
    check: bool = typer.Option(False, "--check", help="Check every step's arguments against the library "
                                                      "(names, heads, hp/recipe values, device) and that every file or "
                                                      "folder a step reads exists or an earlier step writes it; stop."),
    retrain: bool = typer.Option(False, "--retrain", help="Train every run again, also those already finished with "
                                 "the same settings, data and code (by default those are reused)."),
) -> None:
    """Run a TOML pipeline (see pipelines/quickstart.toml); every step is checked before the first runs.

    Run again, it goes on where it stopped: stores resume from their written chunks, and runs already finished
    with the same settings, data and fercache code are scored as they are instead of trained again."""
    from .pipeline import check_pipeline, run_pipeline

    if check:
        typer.echo(f"{pipeline}: {check_pipeline(pipeline, only or None)} step(s) checked, nothing run")
        return

    import time

    from .report import duration

    start = time.perf_counter()

    def show(i: int, step: dict, result) -> None:  # each step's time: where a pipeline's hour went
        text = str(result)
        sep = "" if text.startswith("\n") else " "  # a multi-line report starts on a line of its own
        typer.echo(f"[{i + 1}] {step['name']} ({duration(step['seconds'])}):{sep}{text}")

    done = run_pipeline(pipeline, on_step=show, only=only or None, progress=_progress["bars"], retrain=retrain)
    typer.echo(f"{pipeline}: {len(done)} step(s) in {duration(time.perf_counter() - start)}")


@app.command("steps")
def steps_cmd(kind: Optional[str] = typer.Argument(None, metavar="KIND", help="One step kind (default: all)."),
              as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """The kinds of pipeline step (`run = KIND` in a [[step]] table): what each needs, and its optional keys with
    their defaults."""
    from .pipeline import STEPS, describe_step

    rows = [describe_step(k) for k in ([kind] if kind else sorted(STEPS))]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    for d in rows:
        typer.echo(f"{d['kind']:10s} {d['summary']}")
        typer.echo(f"{'':10s} needs     {' '.join(d['needs'])}")
        typer.echo(f"{'':10s} optional  "
                   f"{' '.join(f'{k}={json.dumps(v, default=str)}' for k, v in d['optional'].items())}")
    typer.echo("(keys are mostly the command's options in snake_case; null: the library's default; "
               "`{name}` in a string is a [vars] entry, overridden by the environment variable FERCACHE_NAME)")


def main() -> None:
    """Console entry point: FercacheError (and OSError) -> `error: ...` on stderr, exit 2."""
    try:
        app()
    except FercacheError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # a folder not writable, a disk full, a file gone mid-run: the OS's own words say it
        if logging.getLogger("fercache").isEnabledFor(logging.DEBUG):
            raise  # -v: the traceback, for a bug report
        typer.echo(f"error: {e} (-v shows where)", err=True)
        sys.exit(2)
