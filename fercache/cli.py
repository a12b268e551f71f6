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

from .errors import FercacheError

app = typer.Typer(help="Frozen-encoder features for facial expression and AU recognition, cached once in Zarr stores.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
manifest_app = typer.Typer(help="Build and check dataset manifests.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")

DataRoot = typer.Option(None, "--data-root", help="Folder the manifest paths are relative to (default: $FERCACHE_DATA, else .).")


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings only.")) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--option takes key=value, got {pair!r}")
        out[key] = value
    return out


@manifest_app.command("build")
def manifest_build(
    src: Path = typer.Argument(..., help="The dataset folder in its native layout."),
    fmt: str = typer.Option(..., "--format", "-f", help="Dataset layout; see `fercache manifest formats`."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest CSV to write (.csv or .csv.gz)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Make paths relative to this folder (default: SRC)."),
    option: list[str] = typer.Option([], "--option", help="Adapter option key=value (repeatable), e.g. facs=ckplus_facs.csv."),
) -> None:
    """Build a manifest (canonical labels, splits, subjects, AUs) from a dataset's native layout."""
    from .adapters import build
    from .manifests import write_manifest

    manifest = build(fmt, src, data_root=data_root, **_options(option))
    typer.echo(f"{write_manifest(manifest, out)}: {len(manifest)} rows")


@manifest_app.command("formats")
def manifest_formats() -> None:
    """List the dataset layouts `manifest build --format` understands."""
    from .adapters import ADAPTERS

    for name, fn in sorted(ADAPTERS.items()):
        typer.echo(f"{name:12s} {(fn.__doc__ or '').strip().splitlines()[0]}")


@manifest_app.command("check")
def manifest_check(manifest: Path, data_root: Optional[Path] = DataRoot) -> None:
    """Validate a manifest and that every file exists; print counts per split and label."""
    from .manifests import data_root as root_of, read_manifest, resolve_paths, summary

    m = read_manifest(manifest)
    resolve_paths(m, root_of(data_root))
    typer.echo(json.dumps(summary(m), indent=2))


@app.command()
def extract(
    manifest: Path = typer.Argument(..., help="Manifest CSV."),
    encoder: str = typer.Option("torchvision:mobilenet_v2", "--encoder", "-e",
                                help="family:arch, e.g. open_clip:ViT-B-16, torchvision:resnet50, timm:convnext_tiny."),
    out: str = typer.Option(..., "--out", "-o", help="Store path (STORE.zarr) or any fsspec URL zarr supports."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip hub tag (e.g. openai), local weights file, or 'none'."),
    image_size: Optional[int] = typer.Option(None, help="Encoder input size (default: the model's)."),
    data_root: Optional[Path] = DataRoot,
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N (under torchrun: cuda picks LOCAL_RANK)."),
    batch_size: int = typer.Option(256, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, help="Decode worker processes (default min(4, CPUs))."),
    chunk_rows: int = typer.Option(1024, help="Rows per store chunk (unit of resume and of distribution)."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, fp16 or bf16."),
    overwrite: bool = typer.Option(False, help="Replace an existing store built from other inputs."),
) -> None:
    """Run a frozen encoder once over every manifest row into a fingerprinted, resumable Zarr store."""
    from .extract import extract as run

    r = run(manifest, encoder, out, pretrained=pretrained, image_size=image_size, root=data_root, device=device,
            batch_size=batch_size, workers=workers, chunk_rows=chunk_rows, precision=precision, overwrite=overwrite)
    if r.n_ok is None:
        return  # non-zero torchrun ranks: rank 0 reports
    state = "already complete, nothing to do" if r.already_complete else f"{r.chunks_computed} chunks at {r.images_per_s:.0f} img/s"
    typer.echo(f"{r.store}: {r.rows} rows, {r.n_ok} ok, {r.n_failed} failed ({state})")


@app.command()
def info(store: str, as_json: bool = typer.Option(False, "--json", help="Print the whole record as JSON.")) -> None:
    """Shape, outputs, completeness, failures and fingerprint of a store."""
    from .store import open_store

    d = open_store(store).info()
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    fp = d["fingerprint"]
    enc = fp["encoder"]
    typer.echo(f"store      {d['location']} (schema {d['schema_version']})")
    typer.echo(f"complete   {d['complete']} ({d['chunks_done']}/{d['chunks_total']} chunks)")
    typer.echo(f"rows       {d['rows']}  ok {d['n_ok']}  failed {d['n_failed']}")
    typer.echo(f"outputs    " + ", ".join(f"{k}[{v}]" for k, v in d["outputs"].items()) + f" (default {d['default_output']})")
    typer.echo(f"encoder    {enc['name']} pretrained={enc['pretrained']} sha256={enc['weights_sha256'][:16]}")
    typer.echo(f"preprocess {json.dumps(enc['preprocess'])}")
    typer.echo(f"manifest   {d['manifest']} sha256={fp['manifest_sha256'][:16]}")
    typer.echo(f"key        {fp['key']}")
    for sid, why in list(d["failures"].items())[:20]:
        typer.echo(f"failed     {sid}: {why}")


@app.command()
def export(store: str, to: Path = typer.Option(..., "--to", help="HDF5 file to write.")) -> None:
    """Export a complete store to HDF5 (features, sample ids, ok mask, fingerprint)."""
    from .store import export_h5

    typer.echo(export_h5(store, to))


@app.command("run")
def run_cmd(pipeline: Path, only: list[str] = typer.Option([], "--only", help="Run only steps with this name or kind.")) -> None:
    """Run a TOML pipeline (see pipelines/quickstart.toml)."""
    from .pipeline import run_pipeline

    def show(i: int, step: dict, result) -> None:
        typer.echo(f"[{i + 1}] {step['name']}: {result}")

    run_pipeline(pipeline, on_step=show, only=only or None)


def main() -> None:
    """Console entry point: FercacheError -> `error: ...` on stderr, exit 2."""
    try:
        app()
    except FercacheError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
