"""The manifest format: one CSV row per image (or video frame), labels by canonical name.

Columns: ``sample_id, path, label, split, subject`` always; ``clip_id,
frame_idx`` for videos; ``bbox`` (``x0 y0 x1 y1`` pixels) where a face must
be cropped from a larger image; ``AU<n>`` columns (1 active, 0 inactive,
-1 not annotated) for action units. ``path`` is relative to a data root
given at run time, so a manifest works on every machine.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ManifestError, file_in_the_way, near_path, repeated
from .labels import CANONICAL

REQUIRED = ("sample_id", "path", "label", "split", "subject")
OPTIONAL = ("clip_id", "frame_idx", "bbox")
SPLITS = ("train", "val", "test")
#: Columns that change what the encoder sees; only these enter the store fingerprint,
#: so relabelling a manifest never forces re-extraction.
CONTENT_COLUMNS = ("sample_id", "path", "bbox")
#: An action-unit column: AU and a FACS number (AU1, AU12). AUTHOR or AU_note are ordinary columns.
AU_COLUMN = re.compile(r"AU[0-9]+")
#: Control characters (NUL, newlines, escapes) make an id that prints, compares and joins unlike what it shows.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_au(column: str) -> bool:
    """Whether `column` holds an action unit's labels."""
    return AU_COLUMN.fullmatch(column) is not None


@dataclass
class Manifest:
    """Rows of a manifest plus where they came from (for error messages)."""

    rows: list[dict[str, str]]
    source: str = "<memory>"
    columns: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.columns:
            self.columns = _columns_of(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def au_columns(self) -> list[str]:
        """AU columns in numeric order (AU1, AU2, AU4, ...)."""
        return sorted((c for c in self.columns if is_au(c)), key=lambda c: int(c[2:]))

    def column(self, name: str) -> list[str]:
        """One column as a list (empty strings where a row lacks it)."""
        return [r.get(name, "") for r in self.rows]

    def where(self, line: int) -> str:
        """`file:line: ` prefix for row index `line` (header is line 1)."""
        return f"{self.source}:{line + 2}: "


def _columns_of(rows: list[dict[str, str]]) -> list[str]:
    seen = dict.fromkeys(REQUIRED)
    for row in rows:
        for key in row:
            seen.setdefault(key)
    extra = [c for c in seen if c not in REQUIRED]
    aus = sorted((c for c in extra if is_au(c)), key=lambda c: int(c[2:]))
    return list(REQUIRED) + [c for c in OPTIONAL if c in seen] + [c for c in extra if c not in OPTIONAL
                                                                  and c not in aus] + aus


def _named_like_a_manifest(p: Path) -> bool:
    return p.is_file() and p.name.endswith((".csv", ".csv.gz"))


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest CSV."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        raise ManifestError(f"{path} is a feature store, not a manifest (a .csv or .csv.gz file); where --manifest "
                            "is left out, the store's own is used")
    if path.is_dir():
        inside = ", ".join(sorted(p.name for p in path.iterdir() if _named_like_a_manifest(p))[:5])
        raise ManifestError(f"manifest {path} is a folder; a manifest is a .csv or .csv.gz file"
                            + (f" (here: {inside})" if inside else "; build one with `fercache manifest build`"))
    if not path.is_file():
        hint = near_path(path, _named_like_a_manifest)
        raise ManifestError(f"manifest {path} does not exist{hint}; build one with `fercache manifest build`")
    try:
        with _open_text(path, "r") as f:
            reader = csv.DictReader(f)
            _check_header(path, reader.fieldnames or [])
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise ManifestError(f"{path}:1: missing required column(s) {missing}; a manifest needs "
                                    f"{list(REQUIRED)}")
            manifest = Manifest(rows=[dict(r) for r in reader], source=str(path), columns=list(reader.fieldnames))
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error, csv.Error) as e:  # EOFError: a cut .gz
        raise ManifestError(f"{path} is not a readable manifest ({type(e).__name__}: {e}); a manifest is a UTF-8 "
                            "CSV file, gzipped when it ends in .gz") from None
    if not manifest.rows:
        raise ManifestError(f"{path} has a header but no rows")
    _check_field_counts(manifest)
    validate(manifest)
    return manifest


def _check_header(path: Path, header: list[str]) -> None:
    """A column named twice is refused: csv.DictReader keeps the last one's values under the name, so a second
    `label` column would relabel every row."""
    if twice := repeated(header):
        raise ManifestError(f"{path}:1: column(s) {', '.join(map(repr, twice))} appear more than once in the header; "
                            "each column must be named once (rename or remove the copy)")


def _check_field_counts(manifest: Manifest) -> None:
    """csv.DictReader files a row's extra fields under None and pads a short row with None: say so by line, not
    as a puzzling "unknown label None" (the usual cause: a comma inside an unquoted value)."""
    n, last = len(manifest.columns), manifest.columns[-1]
    for i, row in enumerate(manifest.rows):
        if None in row:
            raise ManifestError(f"{manifest.where(i)}{n + len(row[None])} fields, the header has {n}; a value "
                                'holding a comma must be quoted ("a,b")')
        if row[last] is None:  # a short row is padded at its end: one look per row, not a scan of its values
            raise ManifestError(f"{manifest.where(i)}{sum(v is not None for v in row.values())} fields, the header "
                                f"has {n}; an empty value is still a field (a,,b)")


def validate(manifest: Manifest) -> None:
    """Check ids are unique, labels canonical, splits known, paths relative, AU values valid."""
    seen: dict[str, int] = {}
    aus = manifest.au_columns
    for i, row in enumerate(manifest.rows):
        where = manifest.where(i)
        sid = row["sample_id"]
        if not sid:
            raise ManifestError(f"{where}empty sample_id")
        if CONTROL.search(sid):
            raise ManifestError(f"{where}sample_id {sid!r} holds a control character (NUL, tab, newline, ...); "
                                "ids must be printable text")
        if sid in seen:
            raise ManifestError(f"{where}duplicate sample_id {sid!r} (first on line {seen[sid] + 2})")
        seen[sid] = i
        if row["label"] and row["label"] not in CANONICAL:
            raise ManifestError(f"{where}unknown label {row['label']!r}; canonical labels: {', '.join(CANONICAL)}")
        if row["split"] not in SPLITS:
            raise ManifestError(f"{where}unknown split {row['split']!r}; use one of {', '.join(SPLITS)}")
        _check_relative(row["path"], where)
        for au in aus:
            if row.get(au, "") not in ("0", "1", "-1", ""):
                raise ManifestError(f"{where}{au} must be 1, 0 or -1 (not annotated), got {row[au]!r}")


def _check_relative(rel: str, where: str) -> None:
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        raise ManifestError(f"{where}path {rel!r} escapes the data root; paths must be relative and stay inside it")


def check_derived_path(out: str | Path | None, source: str | Path | None, flag: str = "--without-leaks") -> None:
    """Refuse to write a manifest derived from `source` over `source` itself: its original labels would be lost."""
    if out is not None and source is not None and Path(out).resolve() == Path(source).resolve():
        raise ManifestError(f"{flag} {out} is the manifest it is derived from; its original labels would be lost: "
                            "write it to another file")


def _is_manifest(path: Path) -> bool:
    """Whether the file at `path` starts with a manifest header (the required columns)."""
    try:
        with _open_text(path, "r") as f:
            return set(REQUIRED) <= set(next(csv.reader(f), []))
    except (OSError, UnicodeDecodeError, csv.Error, EOFError):
        return False


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write a manifest CSV (validating it first). It may replace a manifest, never another file: `-o` naming a
    dataset's own label file (FER2013's fer2013.csv, say) would otherwise destroy it."""
    validate(manifest)
    path = Path(path)
    if path.exists() and not (path.is_file() and _is_manifest(path)):
        raise ManifestError(f"{path} exists and is not a manifest; writing "
                            "one there would destroy it: choose another -o")
    if file := file_in_the_way(path.parent):
        raise ManifestError(f"cannot write {path}: {file} is a file, not a folder; choose another -o")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with _open_text(tmp, "w") as f:
        writer = csv.DictWriter(f, fieldnames=manifest.columns, extrasaction="raise", lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: r.get(c, "") for c in manifest.columns} for r in manifest.rows)
    os.replace(tmp, path)  # never leave a half-written manifest behind
    return path


def _open_text(path: Path, mode: str):
    """Manifests may be gzipped (`.csv.gz`): large ones stay small in git."""
    # utf-8-sig reads a file with or without the byte-order mark a spreadsheet saves at its start ("\ufeffsample_id")
    encoding = "utf-8-sig" if mode == "r" else "utf-8"
    if not (path.name.endswith(".gz") or path.name.endswith(".gz.tmp")):
        return open(path, mode, newline="", encoding=encoding)
    if mode == "r":
        return gzip.open(path, "rt", newline="", encoding=encoding)
    # No name and a zero mtime in the header, so rebuilding an unchanged manifest gives identical bytes.
    raw = gzip.GzipFile(filename="", mode="wb", fileobj=open(path, "wb"), mtime=0)
    return _ClosingText(raw)


class _ClosingText(io.TextIOWrapper):
    """Text wrapper over a GzipFile that also closes the underlying file object."""

    def __init__(self, raw: gzip.GzipFile):
        super().__init__(raw, newline="", encoding="utf-8")
        self._fileobj = raw.fileobj

    def close(self) -> None:
        super().close()
        self._fileobj.close()


def rows_sha256(manifest: Manifest) -> str:
    """sha256 over every column of every row (labels, splits, subjects, AUs too), in row order: what a run
    trained and selected on, so a later edit of the manifest is noticed before the run is scored on it."""
    columns = sorted(manifest.columns)
    h = hashlib.sha256(json.dumps(columns).encode())
    for row in manifest.rows:
        h.update(json.dumps([row.get(c, "") for c in columns]).encode())
    return h.hexdigest()


def content_sha256(manifest: Manifest) -> str:
    """sha256 over the columns that determine encoder input (see CONTENT_COLUMNS), in row order."""
    h, buf = hashlib.sha256(), io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in manifest.rows:  # row by row: no O(N) text buffer for large manifests
        writer.writerow([row.get(c, "") for c in CONTENT_COLUMNS])
        h.update(buf.getvalue().encode())
        buf.seek(0)
        buf.truncate()
    return h.hexdigest()


def data_root(explicit: str | Path | None, recorded: str | None = None) -> Path:
    """The data root: the explicit argument, else $FERCACHE_DATA, else `recorded` (the one a store was extracted
    from) while that folder exists, else the current directory."""
    kept = recorded if recorded and Path(recorded).is_dir() else None
    root = explicit or os.environ.get("FERCACHE_DATA") or kept or "."
    return Path(root).expanduser().resolve()


def resolve_paths(manifest: Manifest, root: Path, check_exists: bool = True) -> list[Path]:
    """Absolute image paths; raises naming the first rows whose file is missing."""
    paths = [root / r["path"] for r in manifest.rows]
    if check_exists:
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        if missing and not root.is_dir():  # one line for the root, not one per file
            raise ManifestError(f"data root {root} does not exist{near_path(root, Path.is_dir)}. Pass --data-root "
                                "(or set FERCACHE_DATA) to the folder the manifest's paths are relative to.")
        if missing:
            shown = "; ".join(f"{manifest.where(i)}{paths[i]}" for i in missing[:5])
            there = root_holding([manifest.rows[i]["path"] for i in missing[:5]], root)
            fix = (f"They are under {there}: pass --data-root {there}" if there else
                   "Pass --data-root (or set FERCACHE_DATA) to the folder the paths are relative to")
            raise ManifestError(f"{len(missing)} file(s) listed in the manifest do not exist under data root {root}: "
                                f"{shown}{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}. {fix}.")
        _check_confined(manifest, paths, root)
    return paths


def _check_confined(manifest: Manifest, paths: list[Path], root: Path) -> None:
    """Refuse rows whose file is really outside the data root (a symlink in it leading elsewhere): a manifest's
    relative paths are confined to the root, and a link would let one read any file the user can."""
    real_root = Path(os.path.realpath(root))
    outside = [i for i, p in enumerate(paths) if not Path(os.path.realpath(p)).is_relative_to(real_root)]
    if outside:
        i = outside[0]
        raise ManifestError(f"{manifest.where(i)}{paths[i]} is a link to {os.path.realpath(paths[i])}, outside the "
                            f"data root {real_root} ({len(outside)} such row(s)); paths must stay inside the data "
                            "root: pass --data-root to a folder that holds the files themselves")


def root_holding(rels: list[str], root: Path) -> Path | None:
    """The folder one level above or below `root` under which every one of `rels` exists, or None: a data root
    one level off is the usual slip (../shared/data for CK+48, whose paths are relative to ../shared/data/ckplus48)."""
    if not root.is_dir():
        return None
    with os.scandir(root) as entries:  # d_type: no stat per entry, even in a folder of 100k images
        below = sorted(Path(e.path) for e in entries if e.is_dir())
    for there in [root.parent, *below]:
        if all((there / rel).is_file() for rel in rels):
            return there.resolve()
    return None


def subset(manifest: Manifest, split: str | None = None, labelled: bool = False) -> Manifest:
    """Rows of one split (all splits when None); `labelled` keeps rows with an expression label."""
    rows = [r for r in manifest.rows if (split is None or r["split"] == split) and (not labelled or r["label"])]
    return Manifest(rows=rows, source=manifest.source, columns=manifest.columns)


def summary(manifest: Manifest) -> dict:
    """Row counts per split and per label (for `manifest check` and reports)."""
    from collections import Counter

    return {
        "rows": len(manifest),
        "splits": dict(Counter(manifest.column("split"))),
        "labels": {s: dict(Counter(r["label"] for r in manifest.rows if r["split"] == s)) for s in SPLITS},
        "subjects": len(set(manifest.column("subject"))),
        "au_columns": manifest.au_columns,
    }
