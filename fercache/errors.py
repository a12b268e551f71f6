"""Typed errors. Every message says what went wrong and what to do about it."""

import difflib
from pathlib import Path
from typing import Callable


def did_you_mean(name: str, known) -> str:
    """' (did you mean 'x'?)' naming the closest of `known`, or '' when none is close: every typo answer's wording."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], 1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def repeated(values: list) -> list:
    """The values that occur more than once, sorted: every 'given twice' answer's finding."""
    return sorted({v for v in values if values.count(v) > 1})


class FercacheError(Exception):
    """Base class: the CLI prints these as `error: ...` and exits 2."""


class ManifestError(FercacheError):
    """A manifest or a dataset's native annotation file is malformed."""


class StoreError(FercacheError):
    """A feature store is missing, incomplete, or built from other inputs."""


class EncoderError(FercacheError):
    """An encoder or its weights cannot be loaded."""


class UnknownNameError(FercacheError):
    """A registry lookup (encoder, head, adapter, label) found no such name."""

    LIST_ALL = 40  # longer lists (open_clip's ~150 models, timm's ~1,400) are cut to the names nearest the typo

    def __init__(self, kind: str, name: str, known):
        known = sorted(str(k) for k in known)
        close = difflib.get_close_matches(str(name), known, 5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if len(known) <= self.LIST_ALL:
            listed = f"known: {', '.join(known)}"
        else:
            listed = f"{len(known)} known, " + (f"the nearest: {', '.join(close)}" if close else "none close to it")
        super().__init__(f"unknown {kind} {name!r}{hint}; {listed}")


class StaleRunError(FercacheError):
    """A trained run no longer matches its data: the store was re-extracted or the manifest's labels changed."""


class ConfigError(FercacheError):
    """A pipeline file or head configuration is invalid."""


def check_whole(flag: str, value, least: int, hint: str = "", optional: bool = False) -> None:
    """An option that must be a whole number >= `least` (or, `optional`, None: left out): a pipeline's
    `every = 0`, `"2"` or `true` is refused before the work, naming the option."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"--{flag} must be a whole number >= {least}{f' ({hint})' if hint else ''}, got {value!r}")


def file_in_the_way(folder: str | Path) -> Path | None:
    """The file at `folder` or above it, if any, that stops the folder being made: the nearest existing path,
    when it is no folder (everything above an existing folder is one)."""
    folder = Path(folder)
    there = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return there if there is not None and not there.is_dir() else None


def check_out_dir(out_dir: str | Path, what: str = "the runs") -> None:
    """A file where an output folder should be (or above it) is refused before the work, not found when saving
    after it: the OS's one-line 'File exists' or 'Not a directory' named neither the option nor the cure."""
    if there := file_in_the_way(out_dir):
        raise ConfigError(f"--out {out_dir}: {there} is a file, not a folder; pass a folder for {what}")


def check_out_file(path: str | Path, flag: str = "--out", folder_ok: bool = False) -> None:
    """The same for an output file (or, `folder_ok`, a store) that is a folder or whose folder, or one above, is a
    file: OSError (Is a directory, Not a directory, File exists) when writing, after the work."""
    path = Path(path)
    if path.is_dir() and not folder_ok:
        raise ConfigError(f"{flag} {path} is a folder; {flag} names the file to write")
    if there := file_in_the_way(path.parent):
        raise ConfigError(f"{flag} {path}: {there} is a file, not a folder; choose another {flag}")


ENDINGS = (".gz", ".csv", ".zarr")


def near_path(path: str | Path, keep: Callable[[Path], bool]) -> str:
    """' (did you mean 'X'?)' naming the existing path closest to a missing `path` (one that `keep` accepts):
    ckplus48.csv for ckplus48.csv.gz, fer2013.zarr for fer2031.zarr, data/faces/a.jpg for data/faecs/a.jpg (a
    misspelt folder on the way is corrected too). '' when none is close, or `path` is a URL."""
    if "://" in str(path):
        return ""
    near = _nearest(Path(path), keep, depth=8)
    return f" (did you mean {str(near)!r}?)" if near else ""


def _nearest(path: Path, keep: Callable[[Path], bool], depth: int) -> Path | None:
    """The entry beside `path` whose name is closest, endings aside; when `path`'s folder is missing too, the
    same name in the folder nearest to that one."""
    if not path.parent.is_dir():
        folder = _nearest(path.parent, Path.is_dir, depth - 1) if depth > 0 and path.parent != path else None
        if folder is None:
            return None
        path = folder / path.name
        if keep(path):
            return path

    def stem(name: str) -> str:  # compared without the endings, which every manifest (or store) shares
        for ending in ENDINGS:
            name = name.removesuffix(ending)
        return name

    beside = {stem(p.name): p for p in sorted(path.parent.iterdir()) if p != path and keep(p)}
    close = difflib.get_close_matches(stem(path.name), list(beside), 1)
    return beside[close[0]] if close else None
