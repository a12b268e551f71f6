"""Miniature copies of the papers' datasets in their native layouts, written by the tests.

Four classes (anger, happy, neutral, sad), each drawn with its own brightness pattern (`class_image`), coded as
each dataset codes them, so an adapter reading the wrong column or code order yields labels the images disagree
with. Sizes are tiny: the point is that every pipeline step meets the layout it will meet on the real data.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .conftest import class_image

#: (canonical class, pattern index for class_image)
CLASSES = (("anger", 0), ("happy", 1), ("neutral", 2), ("sad", 3))
FOLDER_NAMES = {"anger": "Angry", "happy": "Happy", "neutral": "Neutral", "sad": "Sad"}


def _save(path: Path, pattern: int, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    class_image(pattern, rng).save(path)


def _items(per_class: dict[str, int]):
    """(split, k, class, pattern) for per_class[split] images of every class."""
    for split, n in per_class.items():
        for label, pattern in CLASSES:
            for k in range(n):
                yield split, k, label, pattern


SIZES = {"train": 6, "test": 3}


def rafdb(root: Path, seed: int = 0) -> Path:
    code = {"surprise": 1, "fear": 2, "disgust": 3, "happy": 4, "sad": 5, "anger": 6, "neutral": 7}
    rng, lines = np.random.default_rng(seed), []
    for i, (split, _, label, pattern) in enumerate(_items(SIZES)):
        stem = f"{split}_{i:05d}"
        _save(root / "Image" / "aligned" / f"{stem}_aligned.jpg", pattern, rng)
        lines.append(f"{stem}.jpg {code[label]}")
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return root


def ferplus(root: Path, seed: int = 1) -> Path:
    order = ["neutral", "happy", "surprise", "sad", "anger", "disgust", "fear", "contempt", "unknown", "NF"]
    usage = {"train": ("Training", "FER2013Train"), "test": ("PrivateTest", "FER2013Test")}
    rng, rows = np.random.default_rng(seed), []
    for i, (split, _, label, pattern) in enumerate(_items(SIZES)):
        name = f"fer{i:07d}.png"
        _save(root / usage[split][1] / name, pattern, rng)
        rows.append([usage[split][0], name] + [10 if c == label else 0 for c in order])
    with open(root / "fer2013new.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Usage", "Image name"] + order] + rows)
    return root


def affectnet(root: Path, seed: int = 2) -> Path:
    code = {"neutral": 0, "happy": 1, "sad": 2, "anger": 6}
    rng = np.random.default_rng(seed)
    files = {"train": "training.csv", "test": "validation.csv"}
    rows: dict[str, list] = {s: [] for s in files}
    for i, (split, _, label, pattern) in enumerate(_items(SIZES)):
        rel = f"{i % 3}/{i:05d}.jpg"
        _save(root / "Manually_Annotated_Images" / rel, pattern, rng)
        rows[split].append([rel, 0, code[label]])
    rows["train"].append(["0/contempt.jpg", 0, 7])  # contempt: dropped by the 7-class protocol, never read
    for split, name in files.items():
        with open(root / name, "w", newline="") as f:
            csv.writer(f).writerows([["subDirectory_filePath", "face_x", "expression"]] + rows[split])
    return root


def class_folders(root: Path, splits: dict[str, str], capitalised: bool, seed: int) -> Path:
    """SFEW 2.0 (Train/ Val/, capitalised class folders) and MMA (train/ valid/ test/)."""
    rng = np.random.default_rng(seed)
    sizes = {folder: SIZES["train" if split == "train" else "test"] for folder, split in splits.items()}
    for folder, k, label, pattern in _items(sizes):
        name = FOLDER_NAMES[label] if capitalised else FOLDER_NAMES[label].lower()
        _save(root / folder / name / f"{folder}_{name}_{k:03d}.png", pattern, rng)
    return root


def sfew(root: Path) -> Path:
    return class_folders(root, {"Train": "train", "Val": "test"}, capitalised=True, seed=3)


def mma(root: Path) -> Path:
    return class_folders(root, {"train": "train", "valid": "val", "test": "test"}, capitalised=False, seed=4)


def affwild2(root: Path, seed: int = 5, frames: int = 6) -> Path:
    """Videos of one expression each (Train_Set: 2 per class, Validation_Set: 1), expression and AU files; a few
    frames unannotated (-1). AU12 is on in happy videos, AU4 in angry ones, AU15 in sad ones."""
    expr_code = {"neutral": 0, "anger": 1, "happy": 4, "sad": 5}
    aus = ["AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25", "AU26"]
    on = {"anger": "AU4", "happy": "AU12", "sad": "AU15", "neutral": None}
    rng = np.random.default_rng(seed)
    sets = {"Train_Set": 2, "Validation_Set": 1}
    for set_name, n in sets.items():
        for label, pattern in CLASSES:
            for k in range(n):
                video = f"{set_name[:5].lower()}-{label}-{k}"
                for f in range(1, frames + 1):
                    _save(root / "cropped_aligned" / video / f"{f:05d}.jpg", pattern, rng)
                expr = [str(expr_code[label])] * frames
                expr[0] = "-1"
                au_rows = [",".join("1" if a == on[label] else "0" for a in aus)] * frames
                au_rows[-1] = ",".join(["-1"] * len(aus))
                for folder, header, values in (
                        ("EXPR_Classification_Challenge", "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other",
                         expr),
                        ("AU_Detection_Challenge", ",".join(aus), au_rows)):
                    d = root / "annotations" / folder / set_name
                    d.mkdir(parents=True, exist_ok=True)
                    (d / f"{video}.txt").write_text("\n".join([header] + values) + "\n")
    return root


def _clips(root: Path, frames_dir: str, names: list[str], seed: int, frames: int = 4) -> list[tuple[str, str]]:
    """(clip name, class) for each name, frames written under frames_dir/<name>/, classes in turn."""
    rng, out = np.random.default_rng(seed), []
    for i, name in enumerate(names):
        label, pattern = CLASSES[i % len(CLASSES)]
        for f in range(frames):
            _save(root / frames_dir / name / f"{f:03d}.jpg", pattern, rng)
        out.append((name, label))
    return out


def _folds(clips: list, k: int = 5) -> list[tuple[list, list]]:
    """(train, test) of each of k folds: fold i tests on every k-th clip from i."""
    return [([c for j, c in enumerate(clips) if j % k != i], [c for j, c in enumerate(clips) if j % k == i])
            for i in range(k)]


def dfew(root: Path, n_clips: int = 20) -> Path:
    code = {"happy": 1, "sad": 2, "neutral": 3, "anger": 4}
    clips = _clips(root, "clip_224x224", [f"{i:05d}" for i in range(1, n_clips + 1)], seed=6)
    for fold, (train, test) in enumerate(_folds(clips), 1):
        d = root / "annotation" / f"set_{fold}"
        d.mkdir(parents=True, exist_ok=True)
        for name, part in (("train", train), ("test", test)):
            (d / f"{name}.csv").write_text("video_name,label\n" + "".join(f"{int(c)},{code[lbl]}\n" for c, lbl in part))
    return root


def ferv39k(root: Path, n_clips: int = 16) -> Path:
    code = {"anger": 0, "happy": 3, "neutral": 4, "sad": 5}
    clips = _clips(root, "2_ClipsforFaceCrop", [f"Scene{i % 2}/clip{i:03d}" for i in range(n_clips)], seed=7)
    train, test = clips[: n_clips * 3 // 4], clips[n_clips * 3 // 4:]
    for name, part in (("train_All.txt", train), ("test_All.txt", test)):
        (root / name).write_text("".join(f"{c} {code[lbl]}\n" for c, lbl in part))
    return root


def mafw(root: Path, n_clips: int = 20) -> Path:
    code = {"anger": 1, "happy": 4, "neutral": 5, "sad": 6}
    clips = _clips(root, "frames", [f"{i:05d}" for i in range(n_clips)], seed=8)
    for fold, (train, test) in enumerate(_folds(clips), 1):
        d = root / "single" / f"set_{fold}"
        d.mkdir(parents=True, exist_ok=True)
        for name, part in (("train.txt", train), ("test.txt", test)):
            (d / name).write_text("".join(f"{c} {code[lbl]}\n" for c, lbl in part))
    return root
