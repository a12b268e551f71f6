"""Adapters: each dataset's native layout -> manifest rows with canonical labels.

An adapter takes the dataset folder and returns rows whose ``path`` is
absolute; :func:`build` makes them relative to the data root. Adding a
dataset is one decorated function here and one fixture test.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import logging
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from . import labels as L
from .errors import ManifestError, did_you_mean, near_path
from .manifests import Manifest, validate
from .registry import Registry

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SPLIT_NAMES = {
    "train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
    "publictest": "val", "test": "test", "privatetest": "test",
}

ADAPTERS = Registry("manifest format")
register_adapter = ADAPTERS.register  # `--format name`


def check_adapter_options(fmt: str, options: dict) -> None:
    """Refuse an --option the format does not read, naming the near one, and a
    value its parser refuses, so a pipeline finds `test_fraction = 1.5` before its first step, not at it."""
    known = describe_format(fmt)["options"]
    for key, value in options.items():
        if key not in known:
            takes = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
            raise ManifestError(f"format {fmt!r} has no option {key!r}{did_you_mean(key, known)}; it takes: {takes}")
        if key in OPTION_VALUES:
            OPTION_VALUES[key](value)


def describe_format(fmt: str) -> dict:
    """A format's name, layout (its docstring's first line), whole description and --option keys with defaults."""
    fn = ADAPTERS.lookup(fmt)
    doc = inspect.cleandoc(fn.__doc__ or "")
    params = list(inspect.signature(fn).parameters.values())[1:]  # after src
    return {"name": fmt, "layout": doc.splitlines()[0] if doc else "", "description": doc,
            "options": {p.name: p.default for p in params}}


def build(fmt: str, src: str | Path, data_root: str | Path | None = None, **options) -> Manifest:
    """Build a manifest from a dataset in its native layout; paths relative to `data_root` (default `src`)."""
    adapter = ADAPTERS.lookup(fmt)
    src = Path(src).resolve()
    if not src.exists():
        raise ManifestError(f"dataset folder {src} does not exist{near_path(src, Path.is_dir)}")
    root = Path(data_root).resolve() if data_root else src
    check_adapter_options(fmt, options)
    rows = adapter(src, **options)
    if not rows:
        raise ManifestError(f"no samples found in {src} for format {fmt!r}; "
                            "check the layout in `fercache manifest formats`")
    for row in rows:
        try:
            row["path"] = Path(row["path"]).resolve().relative_to(root).as_posix()
        except ValueError:
            raise ManifestError(f"{row['path']} is outside the data root {root}; pass a --data-root that contains "
                                f"{src}") from None
    manifest = Manifest(rows=rows, source=f"<{fmt}:{src}>")
    validate(manifest)
    return manifest


def _annotation(src: Path, rel: str, fmt: str, option: str, kind: str = "file") -> Path:
    """The annotation file `rel` of a dataset folder; when it is missing, a ManifestError naming the format's
    layout, the file's near namesake or the folder one level off that holds it, and the --option KEY=VALUE that
    points elsewhere. `option`: 'KEY=PATH', or how to pick a fold."""
    path, there = src / rel, Path.is_file if kind == "file" else Path.is_dir
    if there(path):
        return path
    hint = near_path(path, there)
    if not hint:
        beside = [src.parent] + sorted(p for p in src.iterdir() if p.is_dir()) if src.is_dir() else []
        held = next((d for d in beside if there(d / rel)), None)
        hint = f" (it is under {held}: pass that folder as the dataset folder)" if held else ""
    layout = (ADAPTERS[fmt].__doc__ or "").strip().splitlines()[0]
    where = (f"pass --option {option} (relative to the dataset folder) if yours is elsewhere"
             if option.endswith("=PATH") else option)
    raise ManifestError(f"{fmt} annotation {kind} {path} not found{hint}; {where}. The layout {fmt} reads: {layout}")


def _integer(text: str, where: str, what: str = "label") -> int:
    """A native integer field; anything else is named by file and line (a bare ValueError traceback before)."""
    try:
        return int(text)
    except ValueError:
        raise ManifestError(f"{where}{what} must be an integer, got {text!r}") from None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _split(name: str, where: str) -> str:
    key = name.lower().replace("_", "").replace("-", "")
    if key not in SPLIT_NAMES:
        raise ManifestError(f"{where}: unknown split folder {name!r}; expected one of {sorted(SPLIT_NAMES)}")
    return SPLIT_NAMES[key]


def _row(sample_id: str, path: Path, label: str, split: str, subject: str, **extra) -> dict:
    return {"sample_id": sample_id, "path": str(path), "label": label, "split": split, "subject": subject, **extra}


def _fraction(value, name: str = "test_fraction") -> float:
    """An --option fraction in [0, 1); it arrives as text from the command line (1.5 would put every subject in
    test)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = float("nan")
    if not 0 <= f < 1:
        raise ManifestError(f"--option {name}={value}: a fraction of the subjects in [0, 1), e.g. 0.2")
    return f


def _count(value, name: str, least: int) -> int:
    """An --option count >= `least` (text from the command line, a number from a pipeline)."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < least:
        raise ManifestError(f"--option {name}={value}: a whole number >= {least}")
    return int(text)


def _flag(value, name: str) -> bool:
    """An --option true/false (text from the command line, a boolean from a pipeline)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ManifestError(f"--option {name}={value}: true or false")
    return text in ("true", "1", "yes")


def _fold(value) -> int:
    """DFEW's and MAFW's official fold, 1-5, checked before any annotation file is looked for."""
    if str(value).strip() not in ("1", "2", "3", "4", "5") or isinstance(value, bool):
        raise ManifestError(f"--option fold={value}: one of the official folds 1-5")
    return int(value)


def _task(value) -> str:
    if value not in ("expr", "au"):
        raise ManifestError(f"--option task={value}: 'expr' or 'au'")
    return value


def _affectnet_classes(value) -> int:
    if str(value) not in ("7", "8"):
        raise ManifestError(f"--option classes={value}: 8 (with contempt) or 7 (without)")
    return int(value)


def _val_as(value) -> str:
    if value not in ("val", "test"):
        raise ManifestError(f"--option val={value}: 'val' (the val folder selects epochs) or 'test' (it is the "
                            "split reported, as AFEW's Val)")
    return value


# One meaning per option name across formats: each adapter parses its options with these, and
# check_adapter_options runs the same parsers before any file is read.
OPTION_VALUES = {
    "classes": _affectnet_classes,
    "test_fraction": _fraction,
    "face_margin": lambda v: _fraction(v, "face_margin"),
    "peak_frames": lambda v: _count(v, "peak_frames", 1),
    "neutral_frames": lambda v: _count(v, "neutral_frames", 0),
    "unlabelled": lambda v: _flag(v, "unlabelled"),
    "fold": _fold,
    "task": _task,
    "val": _val_as,
    "subject": lambda v: _subject_pattern(v),  # a lambda: _subject_pattern is defined below, beside clipfolder
}


def _subject_split(subject: str, test_fraction: float) -> str:
    """Stable subject-level split, so near-duplicate frames never straddle train and test."""
    bucket = int(hashlib.sha1(subject.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < test_fraction else "train"


@register_adapter("imagefolder")
def imagefolder(src: Path, split: str = "train", val: str = "val") -> list[dict]:
    """`SRC/<split>/<class>/*.jpg` or `SRC/<class>/*.jpg` (FER2013, SFEW, MMA); class = folder name.

    `val=test` makes the val folder the test split (SFEW 2.0 reports on Val: its test labels are not public).
    """
    val_split = _val_as(val)
    dirs = sorted(d for d in src.iterdir() if d.is_dir())
    has_splits = dirs and all(d.name.lower().replace("_", "") in SPLIT_NAMES for d in dirs)
    if len(dirs) == 1 and not has_splits and dirs[0].name.strip().lower() not in L.SYNONYMS:
        # ckplus48/ holding CK+48/<class>/: one level too high, read as a class named "CK+48"
        raise ManifestError(f"{src} holds one folder, {dirs[0].name}/, which is no split or class: the dataset is "
                            f"probably {dirs[0]}")
    groups = [(_split(d.name, str(src)), d) for d in dirs] if has_splits else [(split, src)]
    rows = []
    for split_name, split_dir in groups:
        for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
            label = L.canonical_name(class_dir.name, f"{class_dir}: ")
            for img in _images(class_dir):
                sid = img.relative_to(src).with_suffix("").as_posix()
                rows.append(_row(sid, img, label, val_split if split_name == "val" else split_name, subject=sid))
    return rows


def _split_folder(name: str) -> str | None:
    """The split a folder's name says, whole (`PublicTest`) or by its first word (`Train_AFEW`, `val-set`)."""
    for key in (name, re.split(r"[_\-\s]", name)[0]):
        key = key.lower().replace("_", "").replace("-", "")
        if key in SPLIT_NAMES:
            return SPLIT_NAMES[key]
    return None


@register_adapter("clipfolder")
def clipfolder(src: Path, split: str = "train", val: str = "val", test_fraction: float = 0.0,
               subject: str | None = None) -> list[dict]:
    """`SRC/[<split>/]<class>/<clip>/*.jpg`, a folder of frames per clip (AFEW, own videos); class = folder name.

    `fercache frames` writes this layout from videos in class folders (`<class>/<clip>.mp4`).
    Split folders are read by name or first word (`Train_AFEW`, `Val_AFEW`); `val=test` makes the val folder the
    test split (AFEW reports on Val: its test labels are not public). Without split folders every clip is in
    `split`, or, with `test_fraction`, a stable hash of its subject puts that fraction in test. The subject is the
    clip unless `subject` is a regular expression that finds it in the clip's folder name (its first group, else
    the match: `subject=^(S\\d+)_` for `S005_001`), so a person's clips stay in one split and one fold.
    """
    val_split, test_fraction, who = _val_as(val), _fraction(test_fraction), _subject_pattern(subject)
    dirs = sorted(d for d in src.iterdir() if d.is_dir())
    has_splits = bool(dirs) and all(_split_folder(d.name) for d in dirs)
    groups = [(_split_folder(d.name), d) for d in dirs] if has_splits else [(split, src)]
    rows = []
    for split_name, split_dir in groups:
        for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
            label = L.canonical_name(class_dir.name, f"{class_dir}: ")
            if _images(class_dir):
                raise ManifestError(f"{class_dir} holds images, not clip folders: for one image per sample use "
                                    "--format imagefolder")
            for clip_dir in sorted(d for d in class_dir.iterdir() if d.is_dir()):
                clip = clip_dir.relative_to(src).as_posix()
                person = who(clip_dir) or clip
                where = val_split if split_name == "val" else split_name
                if not has_splits and test_fraction:
                    where = _subject_split(person, test_fraction)
                rows += [_row(f"{clip}/{img.stem}", img, label, where, person, clip_id=clip, frame_idx=str(i))
                         for i, img in enumerate(_images(clip_dir))]
    return rows


def _subject_pattern(pattern: str | None):
    """clip folder -> what `pattern` finds in its name (None without a pattern: the clip is its own subject)."""
    if pattern is None:
        return lambda clip_dir: None
    try:
        rx = re.compile(str(pattern))
    except re.error as e:
        raise ManifestError(f"--option subject={pattern}: not a regular expression ({e})") from None

    def subject(clip_dir: Path) -> str:
        if not (m := rx.search(clip_dir.name)):
            raise ManifestError(f"{clip_dir}: --option subject={pattern} finds no subject in {clip_dir.name!r}")
        return m.group(1) if rx.groups else m.group(0)
    return subject


def _ckplus_facs(csv_path: Path) -> dict[str, dict]:
    if not csv_path.is_file():
        raise ManifestError(f"CK+ FACS file {csv_path} not found; pass --option facs=PATH")
    with open(csv_path, newline="") as f:
        return {r["video"]: r for r in csv.DictReader(f)}


def _au_codes(combination: str) -> tuple[set[int], bool]:
    """Active AU numbers, and whether every code parsed (the source has typos like `1.7`)."""
    codes = [c for c in combination.split("_") if c]
    active = {int(c) for c in codes if c.isdigit()}
    return active, len(active) == len(codes)


def _ckplus_aus(seq_row: dict, all_aus: list[int]) -> dict[str, str]:
    """AU columns for one sequence; with an unreadable code, unlisted AUs are unknown (-1), not absent."""
    active, clean = _au_codes(seq_row["AU.combination"])
    if not clean:
        log.warning("CK+ sequence %s has an unreadable AU code in %r: its unlisted AUs are marked -1",
                    seq_row["video"], seq_row["AU.combination"])
    return {f"AU{a}": "1" if a in active else ("0" if clean else "-1") for a in all_aus}


@register_adapter("ckplus")
def ckplus(src: Path, facs: str = "ckplus_facs.csv", images: str = "CK+48", test_fraction: float = 0.2) -> list[dict]:
    """CK+48 `SRC/CK+48/<class>/Sxxx_yyy_zzzzzzzz.png` plus `ckplus_facs.csv` AU codes; split by subject."""
    sequences, test_fraction = _ckplus_facs(src / facs), _fraction(test_fraction)
    all_aus = sorted(set().union(*(_au_codes(r["AU.combination"])[0] for r in sequences.values())))
    au_of = {video: _ckplus_aus(r, all_aus) for video, r in sequences.items()}
    rows = []
    for class_dir in sorted(d for d in (src / images).iterdir() if d.is_dir()):
        label = L.canonical_name(class_dir.name, f"{class_dir}: ")
        for img in _images(class_dir):
            parts = img.stem.split("_")
            if len(parts) < 3 or not parts[2].isdigit():
                raise ManifestError(f"{img}: expected a CK+ name like S005_001_00000011.png (subject_sequence_frame)")
            subject, seq, frame = parts[:3]
            video = f"{subject}_{seq}"
            if video not in au_of:
                raise ManifestError(f"{src / facs}: no row for sequence {video} (image {img})")
            aus = au_of[video]
            split = _subject_split(subject, test_fraction)
            rows.append(_row(img.stem, img, label, split, subject, clip_id=video, frame_idx=str(int(frame)), **aus))
    return rows


def _ckplus_number(path: Path, text: str, what: str) -> float:
    """A number of a CK+ label file, written as `   3.0000000e+00`."""
    try:
        return float(text)
    except ValueError:
        raise ManifestError(f"{path}: expected {what} written as a number (e.g. 3.0000000e+00), got "
                            f"{text.strip()!r}") from None


def _ckplus_label_file(folder: Path, suffix: str) -> Path | None:
    """The one `*_<suffix>.txt` of a sequence's label folder (named after its peak frame), or None."""
    found = sorted(folder.glob(f"*_{suffix}.txt")) if folder.is_dir() else []
    if len(found) > 1:
        raise ManifestError(f"{folder} holds {len(found)} {suffix} files; a CK+ sequence has one")
    return found[0] if found else None


def _ckplus_emotion(file: Path) -> str:
    """The canonical label of a CK+ `*_emotion.txt` (one code, 0-7: labels.NATIVE['ckplus'])."""
    values = file.read_text().split()
    if len(values) != 1 or not _ckplus_number(file, values[0], "an emotion code").is_integer():
        raise ManifestError(f"{file}: expected one emotion code 0-7 (e.g. 3.0000000e+00), got "
                            f"{' '.join(values)[:40]!r}")
    return L.from_native("ckplus", int(float(values[0])), f"{file}: ")


def _ckplus_aus_of(active: set[int] | None, all_aus: list[int]) -> dict[str, str]:
    """AU columns of a sequence: its FACS-coded AUs 1, the others 0; not FACS-coded (None), every AU -1."""
    if active is None:
        return {f"AU{a}": "-1" for a in all_aus}
    return {f"AU{a}": "1" if a in active else "0" for a in all_aus}


def _ckplus_active_aus(file: Path) -> set[int]:
    """The AUs a CK+ `*_facs.txt` lists (a line `AU intensity` each; intensity 0 means present, intensity not
    coded): all of them are active at the peak frame."""
    active = set()
    for n, line in enumerate(file.read_text().splitlines(), 1):
        values = line.split()
        if not values:
            continue
        if len(values) != 2:
            raise ManifestError(f"{file}:{n}: expected `AU intensity` (two numbers), got {line.strip()!r}")
        au, _intensity = (_ckplus_number(file, v, "an AU and its intensity") for v in values)
        if not au.is_integer():
            raise ManifestError(f"{file}:{n}: AU {values[0]} is not a whole AU number")
        active.add(int(au))
    return active


def _ckplus_frames(seq: Path) -> list[tuple[int, Path]]:
    """A sequence folder's frames, (frame number, image) in order."""
    frames = []
    for img in _images(seq):
        parts = img.stem.split("_")
        if len(parts) < 3 or not parts[2].isdigit():
            raise ManifestError(f"{img}: expected a CK+ name like S005_001_00000011.png (subject_sequence_frame)")
        frames.append((int(parts[2]), img))
    return sorted(frames)


def _ckplus_face_box(file: Path, margin: float) -> str:
    """A square face box ("x0 y0 x1 y1") around one frame's 68 landmarks (a line `x y` each): their extent, grown
    by `margin` of it on every side (the brows are the top landmarks: the margin keeps the forehead), cut at the
    image's top and left; PIL pads past the right and bottom."""
    try:
        points = np.array([[float(v) for v in line.split()] for line in file.read_text().splitlines() if line.strip()])
    except ValueError:
        points = np.empty((0,))
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 2:
        raise ManifestError(f"{file}: expected CK+ landmarks, a line `x y` per point (68 lines)")
    (x0, y0), (x1, y1) = points.min(0), points.max(0)
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * (0.5 + margin)
    return f"{max(cx - half, 0):.0f} {max(cy - half, 0):.0f} {cx + half:.0f} {cy + half:.0f}"


def _ckplus_up_to_peak(seq: Path, label_file: Path) -> list[tuple[int, Path]]:
    """A sequence's frames up to its peak, the frame its label file is named after (S005_001_00000011_emotion.txt:
    11), which the release makes the last; counted from that frame, so no frame after it is ever labelled."""
    parts = label_file.stem.split("_")
    if len(parts) < 4 or not parts[2].isdigit():
        raise ManifestError(f"{label_file}: expected a CK+ label file named after its frame, like "
                            "S005_001_00000011_emotion.txt")
    peak = int(parts[2])
    frames = [f for f in _ckplus_frames(seq) if f[0] <= peak]
    if not frames or frames[-1][0] != peak:
        raise ManifestError(f"{label_file} labels frame {peak}, but {seq} has no image of that frame")
    return frames


@register_adapter("ckplus_release")
def ckplus_release(src: Path, images: str = "cohn-kanade-images", emotion: str = "Emotion", facs: str = "FACS",
                   landmarks: str = "Landmarks", peak_frames: int = 3, neutral_frames: int = 0,
                   unlabelled: bool = False, face_margin: float = 0.15, test_fraction: float = 0.2) -> list[dict]:
    """CK+ as released: `cohn-kanade-images/S005/001/*.png`, `Emotion/` codes 0-7, `FACS/` AUs; split by subject.

    A sequence runs from a neutral face to its peak, the last frame, which alone is labelled and FACS-coded: the
    `peak_frames` frames ending at it take the sequence's emotion and AUs (3, as CK+48), and `neutral_frames=N` adds its
    first N frames labelled neutral (the 8-class protocol), their AUs -1 (not coded). The 327 sequences with an
    emotion file are kept; `unlabelled=true` keeps the other FACS-coded ones too, unlabelled (AU work). Each
    frame's face box (`bbox`) comes from its 68 points in `Landmarks/` (`landmarks=PATH` elsewhere, `none`: whole
    frames), grown by `face_margin` of its side on every side.
    """
    fmt = "ckplus_release"
    img_root = _annotation(src, images, fmt, "images=PATH", "folder")
    emo_root, facs_root = (_annotation(src, rel, fmt, f"{key}=PATH", "folder")
                           for key, rel in (("emotion", emotion), ("facs", facs)))
    peak, first = _count(peak_frames, "peak_frames", 1), _count(neutral_frames, "neutral_frames", 0)
    keep_unlabelled, test_fraction = _flag(unlabelled, "unlabelled"), _fraction(test_fraction)
    box = _CkplusBoxes(src, landmarks, _fraction(face_margin, "face_margin"))
    sequences = sorted(d.relative_to(img_root) for d in img_root.glob("*/*") if d.is_dir())  # S005/001
    facs_files = {seq: _ckplus_label_file(facs_root / seq, "facs") for seq in sequences}
    active = {seq: _ckplus_active_aus(f) for seq, f in facs_files.items() if f}  # each file read once
    all_aus = sorted(set().union(*active.values()))
    _say_orphans(emo_root, set(sequences))
    rows = []
    for seq in sequences:
        emo_file = _ckplus_label_file(emo_root / seq, "emotion")
        if emo_file is None and not (keep_unlabelled and facs_files[seq]):
            continue
        label, aus = _ckplus_emotion(emo_file) if emo_file else "", _ckplus_aus_of(active.get(seq), all_aus)
        subject, video = seq.parts[0], "_".join(seq.parts)
        frames = _ckplus_up_to_peak(img_root / seq, emo_file or facs_files[seq])
        split = _subject_split(subject, test_fraction)
        for n, img in frames[:min(first, max(len(frames) - peak, 0))]:  # never one of the peak frames
            rows.append(_row(img.stem, img, "neutral", split, subject, clip_id=f"{video}_neutral", frame_idx=str(n),
                             **box(seq, img), **dict.fromkeys(aus, "-1")))
        for n, img in frames[-peak:]:
            rows.append(_row(img.stem, img, label, split, subject, clip_id=video, frame_idx=str(n), **box(seq, img),
                             **aus))
    box.say_missing()
    return rows


class _CkplusBoxes:
    """seq, img -> {"bbox": face box from the frame's landmarks file}, or {} where there is none; the frames
    without one are counted and said once (they are encoded whole, the face a small part of a 640x490 frame)."""

    def __init__(self, src: Path, landmarks: str, margin: float):
        self.margin, self.missing, self.root = margin, [], None
        if str(landmarks).lower() == "none":
            return
        if landmarks != "Landmarks" or (src / landmarks).is_dir():  # a folder named elsewhere must be there
            self.root = _annotation(src, landmarks, "ckplus_release", "landmarks=PATH", "folder")
        else:
            log.warning("%s has no Landmarks/ folder: whole frames are encoded, the face a "
                        "small part of each; unzip the release's Landmarks beside Emotion/, "
                        "or pass --option landmarks=PATH (none: whole frames, unsaid)", src)

    def __call__(self, seq: Path, img: Path) -> dict:
        if self.root is None:
            return {}
        file = self.root / seq / f"{img.stem}_landmarks.txt"
        if not file.is_file():
            self.missing.append(file)
            return {"bbox": ""}
        return {"bbox": _ckplus_face_box(file, self.margin)}

    def say_missing(self) -> None:
        if self.missing:
            log.warning("%d frame(s) have no landmarks file (e.g. %s): encoded whole", len(self.missing),
                        self.missing[0])


def _say_orphans(emo_root: Path, sequences: set[Path]) -> None:
    """Emotion files whose sequence has no image folder: said, not silently dropped (a partly unzipped release)."""
    orphans = sorted({f.parent.relative_to(emo_root) for f in emo_root.glob("*/*/*_emotion.txt")} - sequences)
    if orphans:
        log.warning("%d sequence(s) have an emotion file but no images (e.g. %s): left out", len(orphans), orphans[0])


@register_adapter("jaffe")
def jaffe(src: Path) -> list[dict]:
    """JAFFE `SRC/KA.AN1.39.tiff`: subject KA, expression code AN."""
    rows = []
    for img in _images(src):
        parts = img.name.split(".")
        code = parts[1][:2].upper() if len(parts) > 2 else ""
        if code not in L.JAFFE_CODES:
            raise ManifestError(f"{img}: expected a JAFFE name like KA.AN1.39.tiff with a code in "
                                f"{sorted(L.JAFFE_CODES)}")
        rows.append(_row(img.stem, img, L.JAFFE_CODES[code], "train", subject=parts[0]))
    return rows


def _majority(votes: list[int]) -> str | None:
    """FERPlus majority: the class with more than half the votes; None for no majority, unknown or NF."""
    total = sum(votes)
    best = max(range(len(votes)), key=votes.__getitem__)
    if total == 0 or votes[best] * 2 <= total:
        return None
    name = L.FERPLUS_VOTES[best]
    return None if name in ("unknown", "NF") else name


FERPLUS_FOLDERS = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}
FERPLUS_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


def _ferplus_votes(src: Path) -> Iterable[tuple[str, str, list[int], str]]:
    """(split, image name, votes, where) from fer2013new.csv or the per-folder label.csv files."""
    new_csv = src / "fer2013new.csv"
    if new_csv.is_file():
        with open(new_csv, newline="") as f:
            for i, r in enumerate(csv.reader(f)):
                where = f"{new_csv}:{i + 1}"
                if i == 0 or not r:
                    continue  # the header, a blank line
                if len(r) < 2 or r[0] not in FERPLUS_USAGE:
                    raise ManifestError(f"{where}: expected Usage ({', '.join(FERPLUS_USAGE)}), Image name and "
                                        f"{len(L.FERPLUS_VOTES)} vote counts, got {','.join(r)[:60]!r}")
                if not r[1].strip():
                    continue  # an image FERPlus removed
                yield FERPLUS_USAGE[r[0]], r[1].strip(), [_integer(v, f"{where}: ",
                                                                   "a vote count") for v in r[2:12]], where
        return
    for split, folder in FERPLUS_FOLDERS.items():
        label_csv = src / folder / "label.csv"
        if label_csv.is_file():
            with open(label_csv, newline="") as f:
                for i, r in enumerate(csv.reader(f)):
                    if not r:
                        continue
                    where = f"{label_csv}:{i + 1}"
                    yield split, r[0].strip(), [_integer(v, f"{where}: ", "a vote count") for v in r[2:12]], where


@register_adapter("ferplus")
def ferplus(src: Path) -> list[dict]:
    """FERPlus vote counts (`fer2013new.csv` or `FER2013*/label.csv`) -> strict-majority label; unknown/NF dropped."""
    rows = []
    for split, name, votes, where in _ferplus_votes(src):
        if len(votes) != len(L.FERPLUS_VOTES):
            raise ManifestError(f"{where}: expected {len(L.FERPLUS_VOTES)} vote counts, got {len(votes)}")
        label = _majority(votes)
        if label:
            img = src / FERPLUS_FOLDERS[split] / name
            rows.append(_row(f"{split}/{Path(name).stem}", img, label, split, subject=Path(name).stem))
    return rows


def _fer2013_pixels(blob: str, where: str) -> np.ndarray:
    try:
        pixels = np.array(blob.split(), dtype=np.int64)
    except ValueError:
        raise ManifestError(f"{where}: `pixels` must be 2304 space-separated integers") from None
    if pixels.size != 48 * 48 or pixels.min() < 0 or pixels.max() > 255:
        span = f" in [{pixels.min()}, {pixels.max()}]" if pixels.size else ""
        raise ManifestError(f"{where}: `pixels` has {pixels.size} values{span}; "
                            "FER2013 rows are 48x48 = 2304 values in [0, 255]")
    return pixels.astype(np.uint8).reshape(48, 48)


@register_adapter("fer2013csv")
def fer2013csv(src: Path, csv_file: str = "fer2013.csv", images: str | None = None) -> list[dict]:
    """Kaggle `fer2013.csv` / `icml_face_data.csv` (emotion 0-6, pixels, Usage) -> PNGs laid out as FERPlus expects."""
    from PIL import Image

    path = src / csv_file
    if not path.is_file():
        raise ManifestError(f"{path} not found; pass --option csv_file=NAME (e.g. icml_face_data.csv)")
    # FERPlus's own generator names images by their row in this file; writing the same names lets the
    # ferplus adapter (with fer2013new.csv beside them) read this folder, with the same sample ids.
    out = Path(images) if images else src
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [c.strip() for c in reader.fieldnames or []]  # icml_face_data.csv has " Usage"
        if not {"emotion", "pixels", "Usage"} <= set(reader.fieldnames):
            raise ManifestError(f"{path}: expected columns emotion, pixels, Usage; found {reader.fieldnames}")
        for i, r in enumerate(reader):
            where = f"{path}:{i + 2}"
            if r["Usage"].strip() not in FERPLUS_USAGE:
                raise ManifestError(f"{where}: Usage {r['Usage']!r} is not one of {sorted(FERPLUS_USAGE)}")
            split = FERPLUS_USAGE[r["Usage"].strip()]
            name = f"fer{i:07d}.png"
            img = out / FERPLUS_FOLDERS[split] / name
            if not r["emotion"].strip().isdigit():
                raise ManifestError(f"{where}: emotion {r['emotion']!r} is not a FER2013 code (0-6)")
            label = L.from_native("fer2013", int(r["emotion"]), f"{where}: ")
            pixels = _fer2013_pixels(r["pixels"], where)
            # Written once; a re-run checks each image against its row, so a PNG from another csv is never reused.
            if not img.is_file() or not np.array_equal(np.asarray(Image.open(img)), pixels):
                img.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(img)  # 2-D uint8: grey "L", lossless
            rows.append(_row(f"{split}/{img.stem}", img, label, split, subject=img.stem))
    return rows


@register_adapter("rafdb")
def rafdb(src: Path, list_file: str = "EmoLabel/list_patition_label.txt") -> list[dict]:
    """RAF-DB basic: `train_00001.jpg 5` lines; images at `Image/aligned/<name>_aligned.jpg`."""
    rows, path = [], _annotation(src, list_file, "rafdb", "list_file=PATH")
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            where = f"{path}:{i + 1}: "
            if len(line.split()) != 2:
                raise ManifestError(f"{where}expected `<image name> <label 1-7>`, got {line.strip()[:60]!r}")
            name, code = line.split()
            label = L.from_native("rafdb", _integer(code, where), where)
            stem = Path(name).stem
            img = src / "Image" / "aligned" / f"{stem}_aligned.jpg"
            rows.append(_row(stem, img, label, _split(stem.split("_")[0], where.removesuffix(": ")), subject=stem))
    return rows


@register_adapter("affectnet")
def affectnet(src: Path, train: str = "training.csv", test: str = "validation.csv",
              images: str = "Manually_Annotated_Images", classes: int = 8) -> list[dict]:
    """AffectNet csv (`subDirectory_filePath`, `expression`); 8 none / 9 uncertain / 10 no-face dropped.

    AffectNet's validation set is its de-facto test set; fercache carves its own val split from train.
    `classes=7` also drops contempt (code 7): the 7-class protocol most cross-dataset papers report.
    """
    last = _affectnet_classes(classes) - 1  # the highest expression code kept
    rows = []
    for split, name in (("train", train), ("test", test)):
        path = _annotation(src, name, "affectnet", f"{split}=PATH")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            lacking = {"subDirectory_filePath", "expression"} - set(reader.fieldnames or [])
            if lacking:
                raise ManifestError(f"{path}: no column {', '.join(sorted(lacking))}; AffectNet's csv has "
                                    f"subDirectory_filePath and expression (header: {(reader.fieldnames or [])[:8]})")
            for i, r in enumerate(reader):
                code = _integer(r["expression"], f"{path}:{i + 2}: ", "expression")
                if code > last:
                    continue
                label = L.from_native("affectnet", code, f"{path}:{i + 2}: ")
                rel = r["subDirectory_filePath"]
                rows.append(_row(Path(rel).with_suffix("").as_posix(), src / images / rel, label, split, subject=rel))
    return rows


@register_adapter("expw")
def expw(src: Path, label_file: str = "label/label.lst", images: str = "image/origin",
         test_fraction: float = 0.2) -> list[dict]:
    """ExpW `label.lst`: `name face_id top left right bottom confidence label`; the face box becomes `bbox`."""
    rows, path, test_fraction = [], _annotation(src, label_file, "expw", "label_file=PATH"), _fraction(test_fraction)
    with open(path) as f:
        for i, line in enumerate(f):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 8:
                raise ManifestError(f"{path}:{i + 1}: expected 8 fields, got {len(parts)}")
            name, face, top, left, right, bottom, _conf, code = parts
            label = L.from_native("expw", _integer(code, f"{path}:{i + 1}: "), f"{path}:{i + 1}: ")
            stem = Path(name).stem
            rows.append(_row(f"{stem}_{face}", src / images / name, label, _subject_split(stem, test_fraction),
                             subject=stem, bbox=f"{left} {top} {right} {bottom}"))
    return rows


def _affwild2_frames(frames_dir: Path, video: str, values: list[str]) -> Iterable[tuple[int, Path, str]]:
    for idx, value in enumerate(values, start=1):
        img = frames_dir / video / f"{idx:05d}.jpg"
        if img.is_file():  # Aff-Wild2 has no crop for frames without a detected face
            yield idx, img, value


@register_adapter("affwild2")
def affwild2(src: Path, task: str = "expr", annotations: str | None = None,
             frames: str = "cropped_aligned") -> list[dict]:
    """Aff-Wild2 (ABAW) per-video annotation files (`task=expr` or `task=au`); -1 = not annotated.

    Train_Set -> train; Validation_Set -> test (ABAW's test labels are not public; val is carved from train by video).
    """
    task = _task(task)
    default = "EXPR_Classification_Challenge" if task == "expr" else "AU_Detection_Challenge"
    ann_root = annotations or f"annotations/{default}"
    _annotation(src, ann_root, "affwild2", "annotations=PATH", kind="folder")  # holds Train_Set/, Validation_Set/
    rows = []
    for set_name, split in (("Train_Set", "train"), ("Validation_Set", "test")):
        for ann in sorted((src / ann_root / set_name).glob("*.txt")):
            lines = ann.read_text().split()
            if not lines:
                raise ManifestError(f"{ann}: empty; expected a header line, then one line per frame")
            header, values = lines[0], lines[1:]
            rows += _affwild2_rows(ann, header, values, split, src / frames, task)
    return rows


def _affwild2_rows(ann: Path, header: str, values: list[str], split: str, frames_dir: Path, task: str) -> list[dict]:
    video = ann.stem
    expected = "AU1,AU2,AU4" if task == "au" else "Neutral,Anger"
    if not header.startswith(expected):
        raise ManifestError(f"{ann}:1: expected a header starting {expected!r}, got {header[:40]!r}")
    rows = []
    for idx, img, value in _affwild2_frames(frames_dir, video, values):
        common = dict(clip_id=video, frame_idx=str(idx))
        if task == "expr":
            code = _integer(value, f"{ann}:{idx + 1}: ")
            if code == -1:
                continue
            label = L.from_native("affwild2", code, f"{ann}:{idx + 1}: ")
            rows.append(_row(f"{video}/{idx:05d}", img, label, split, video, **common))
        else:
            aus = value.split(",")
            if all(a == "-1" for a in aus):
                continue
            au_cols = {f"AU{n}": a for n, a in zip(L.AFFWILD2_AUS, aus)}
            rows.append(_row(f"{video}/{idx:05d}", img, "", split, video, **common, **au_cols))
    return rows


def _clip_list(path: Path) -> list[tuple[str, int, str]]:
    """(clip name, native label, where) from a csv or whitespace list; a header line is skipped."""
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if not parts[-1].lstrip("-").isdigit():
            if i == 0:
                continue
            raise ManifestError(f"{path}:{i + 1}: last field must be an integer label, got {parts[-1]!r}")
        out.append((parts[0], int(parts[-1]), f"{path}:{i + 1}: "))
    return out


def _video_rows(src: Path, dataset: str, lists: dict[str, str], frames: str, pad: int = 0,
                option: str = "{split}=PATH") -> list[dict]:
    """`option`: how the --option that moves a split's list file is written (`{split}` filled in)."""
    rows = []
    for split, list_name in lists.items():
        if not list_name:
            continue
        for clip, code, where in _clip_list(_annotation(src, list_name, dataset, option.format(split=split))):
            label = L.from_native(dataset, code, where)
            clip = clip.zfill(pad) if clip.isdigit() else clip
            clip_dir = src / frames / clip
            if not clip_dir.is_dir():
                raise ManifestError(f"{where}frame folder {clip_dir} does not exist")
            for idx, img in enumerate(_images(clip_dir)):
                rows.append(_row(f"{clip}/{img.stem}", img, label, split, clip, clip_id=clip, frame_idx=str(idx)))
    # Rows in clip order, not list order: every fold of a dataset then lists the same frames in the same
    # order, so all folds share one manifest hash and one feature store (labels and splits may differ).
    return sorted(rows, key=lambda r: (r["clip_id"], int(r["frame_idx"])))


@register_adapter("dfew")
def dfew(src: Path, fold: int = 1, frames: str = "clip_224x224") -> list[dict]:
    """DFEW: `annotation/set_<fold>/{train,test}.csv` (`video_name,label`, 1-7) + frame folders `<frames>/<00001>/`."""
    fold = _fold(fold)
    lists = {s: f"annotation/set_{fold}/{s}.csv" for s in ("train", "test")}
    return _video_rows(src, "dfew", lists, frames, pad=5, option=f"this is fold {fold} of 1-5 (--option fold=N)")


@register_adapter("ferv39k")
def ferv39k(src: Path, train: str = "train_All.txt", test: str = "test_All.txt",
            frames: str = "2_ClipsforFaceCrop") -> list[dict]:
    """FERV39k: list files of `<clip path> <label 0-6>` + frame folders under `<frames>/<clip path>/`."""
    return _video_rows(src, "ferv39k", {"train": train, "test": test}, frames)


@register_adapter("mafw")
def mafw(src: Path, fold: int = 1, frames: str = "frames") -> list[dict]:
    """MAFW single-label: `single/set_<fold>/{train,test}.txt` (`<clip> <label 1-11>`) + frame folders."""
    fold = _fold(fold)
    lists = {s: f"single/set_{fold}/{s}.txt" for s in ("train", "test")}
    return _video_rows(src, "mafw", lists, frames, option=f"this is fold {fold} of 1-5 (--option fold=N)")
