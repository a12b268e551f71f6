"""Leakage audit of a manifest: subjects and identical images shared by splits, identical images with two labels.

Published FER splits leak: the FER2013 copy in ../shared/data holds 227 groups of byte-identical images
spanning train, val and test (a test image scored against its own training copy), and 16 groups whose
copies carry different labels. A score on such a split measures memory as well as recognition. The audit
finds them by content (sha1 of the file bytes and the face box) and `without_leaks` writes a manifest
where the leaking val/test units are unlabelled: the same rows and paths, so the store is reused as it is
(relabelling never forces re-extraction) and heads simply do not score those units.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .manifests import SPLITS, Manifest

ORDER = {s: i for i, s in enumerate(SPLITS)}  # train < val < test: the earlier split keeps a shared image


@dataclass
class Audit:
    """What leaks. Units are rows, or whole clips in a video manifest (a clip cannot be half unlabelled)."""

    unit: str  # "image" or "clip"
    subjects_across_splits: dict[str, list[str]]  # subject -> its splits, for subjects in more than one
    duplicate_groups: list[list[int]] = field(default_factory=list)  # row indices of identical images, >1 unit
    label_conflicts: list[list[int]] = field(default_factory=list)  # groups whose copies carry different labels
    leaking: list[str] = field(default_factory=list)  # val/test units to unlabel, see `leaking_units`

    def pairs(self, manifest: Manifest) -> Counter:
        """How many duplicate groups span each pair of splits ("test & train": 120)."""
        out: Counter = Counter()
        for g in self.duplicate_groups:
            splits = sorted({manifest.rows[i]["split"] for i in g}, key=ORDER.get)
            if len(splits) > 1:
                out[" & ".join(reversed(splits))] += 1
        return out

    @property
    def clean(self) -> bool:
        return not (self.subjects_across_splits or self.leaking)


def _unit(row: dict) -> str:
    return row.get("clip_id") or row["sample_id"]


def content_key(path: Path, bbox: str) -> str:
    """Identity of what the encoder sees: the file's bytes and the box cut from it."""
    return hashlib.sha1(path.read_bytes()).hexdigest() + "|" + bbox.strip()


def _subjects_across_splits(m: Manifest) -> dict[str, list[str]]:
    splits: dict[str, set] = defaultdict(set)
    for r in m.rows:
        if r["subject"] and r["subject"] != r["sample_id"]:  # a per-image subject says "unknown", not "a person"
            splits[r["subject"]].add(r["split"])
    return {s: sorted(v, key=ORDER.get) for s, v in splits.items() if len(v) > 1}


def leaking_units(m: Manifest, groups: list[list[int]]) -> list[str]:
    """Val/test units holding an image that an earlier split (or an earlier unit of the same split) holds too.

    Train copies are always kept (a duplicate in training only weighs an image twice); of the evaluation
    copies, only the first in train < val < test, file order, survives.
    """
    out: dict[str, None] = {}
    aus = m.au_columns
    scored = lambda r: r["label"] or any(r.get(a) in ("0", "1") for a in aus)  # noqa: E731  (unlabelled: cannot leak)
    for g in groups:
        ranked = sorted((i for i in g if scored(m.rows[i])), key=lambda i: (ORDER[m.rows[i]["split"]], i))
        if not ranked:
            continue
        first = _unit(m.rows[ranked[0]])
        for i in ranked[1:]:
            r = m.rows[i]
            if r["split"] != "train" and _unit(r) != first:
                out[_unit(r)] = None
    return list(out)


def audit(m: Manifest, paths: list[Path], progress: bool = False) -> Audit:
    """Hash every image once (a few seconds for 20k faces) and collect what leaks across splits."""
    from tqdm.auto import tqdm

    by_key: dict[str, list[int]] = defaultdict(list)
    for i, (r, p) in enumerate(tqdm(list(zip(m.rows, paths)), desc="hash", unit="img", disable=not progress)):
        by_key[content_key(p, r.get("bbox", ""))].append(i)
    # Identical frames inside one clip (a still face) are not a leak: a group must span two units.
    groups = [g for g in by_key.values() if len({_unit(m.rows[i]) for i in g}) > 1]
    conflicts = [g for g in groups if len({m.rows[i]["label"] for i in g if m.rows[i]["label"]}) > 1]
    return Audit("clip" if "clip_id" in m.columns else "image", _subjects_across_splits(m),
                 groups, conflicts, leaking_units(m, groups))


def without_leaks(m: Manifest, units: list[str]) -> Manifest:
    """The manifest with `units` unlabelled (label empty, AUs -1): same rows and paths, so the same store."""
    drop, aus = set(units), m.au_columns
    rows = [dict(r, label="", **{a: "-1" for a in aus}) if _unit(r) in drop else r for r in m.rows]
    return Manifest(rows=rows, source=m.source, columns=m.columns)


def label_table(m: Manifest) -> str:
    """Rows per label and split, with totals: the class balance at a glance."""
    counts = Counter((r["label"] or "(none)", r["split"]) for r in m.rows)
    labels = sorted({lbl for lbl, _ in counts}, key=lambda lbl: (lbl == "(none)", lbl))
    splits = [s for s in SPLITS if any(sp == s for _, sp in counts)]
    lines = [f"  {'label':<16}" + "".join(f"{s:>8}" for s in splits) + f"{'total':>8}"]
    for lbl in labels:
        row = [counts[(lbl, s)] for s in splits]
        lines.append(f"  {lbl:<16}" + "".join(f"{v:>8}" for v in row) + f"{sum(row):>8}")
    totals = [sum(counts[(lbl, s)] for lbl in labels) for s in splits]
    lines.append(f"  {'total':<16}" + "".join(f"{v:>8}" for v in totals) + f"{sum(totals):>8}")
    return "\n".join(lines)


def _name(m: Manifest, i: int) -> str:
    r = m.rows[i]
    return f"{r['sample_id']} [{r['split']}, {r['label'] or 'no label'}]"


def _examples(m: Manifest, groups: list[list[int]], k: int = 3) -> str:
    """A few groups, those spanning splits first, each listed train -> val -> test."""
    spanning = sorted(groups, key=lambda g: len({m.rows[i]["split"] for i in g}) == 1)
    ranked = [sorted(g, key=lambda i: (ORDER[m.rows[i]["split"]], i)) for g in spanning[:k]]
    return "".join(f"\n    {' = '.join(_name(m, i) for i in g[:3])}{' ...' if len(g) > 3 else ''}" for g in ranked)


def summarize(m: Manifest, a: Audit | None) -> str:
    """The leakage findings in words, with a few examples of each."""
    shared = f"subjects in more than one split: {len(a.subjects_across_splits) if a else 0}"
    if a is None:
        return shared + "\nimages not hashed (--no-hash): copies shared by splits not checked"
    lines = [shared + "".join(f"\n    {s}: {', '.join(sp)}" for s, sp in list(a.subjects_across_splits.items())[:5])]
    pairs = a.pairs(m)
    what = "byte-identical images" if a.unit == "image" else "identical frames in different clips"
    across = f" ({', '.join(f'{k} {v}' for k, v in pairs.most_common())})" if pairs else ""
    lines.append(f"groups of {what}: {len(a.duplicate_groups)}, {sum(pairs.values())} of them across splits{across}"
                 + _examples(m, a.duplicate_groups))
    lines.append(f"  with different labels: {len(a.label_conflicts)}" + _examples(m, a.label_conflicts))
    if a.leaking:
        what = "are copies of" if a.unit == "image" else "hold a frame identical to"
        lines.append(f"{len(a.leaking)} val/test {a.unit}s {what} an image in an earlier "
                     "split (or earlier in their own): `--without-leaks OUT.csv` writes "
                     "the manifest with them unlabelled (same images: the store is reused)")
    else:
        lines.append(f"no val/test {a.unit} repeats an image of an earlier split")
    return "\n".join(lines)


def check(manifest: str | Path, root: str | Path | None = None, hash_images: bool = True,
          without_leaks_to: str | Path | None = None, progress: bool = False) -> tuple[Manifest, Audit | None,
                                                                                       Path | None]:
    """Read and validate a manifest, check its files exist, audit it; optionally write it without its leaks."""
    from .manifests import check_derived_path, data_root, read_manifest, resolve_paths, write_manifest

    check_derived_path(without_leaks_to, manifest)  # before hours of hashing, and before any write
    m = read_manifest(manifest)
    paths = resolve_paths(m, data_root(root))
    found = audit(m, paths, progress) if hash_images else None
    written = write_manifest(without_leaks(m, found.leaking), without_leaks_to) if without_leaks_to and found else None
    return m, found, written
