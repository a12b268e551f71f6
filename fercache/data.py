"""Cached features joined with manifest labels by sample_id: what heads train and evaluate on."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import ConfigError, StoreError
from .manifests import Manifest, content_sha256, read_manifest, rows_sha256
from .preprocess import tta_views
from .store import FeatureStore, open_store

log = logging.getLogger(__name__)
_CARVE_SAID: set[tuple] = set()  # the carved val splits this process has logged


@dataclass
class FeatureSet:
    """Rows that decoded fine, with their labels. `au` is [N, A] with -1 for not annotated."""

    sample_id: np.ndarray
    x: np.ndarray
    label: np.ndarray  # canonical names ("" where none)
    split: np.ndarray
    subject: np.ndarray
    au: np.ndarray | None = None
    au_names: list[str] = field(default_factory=list)
    z: np.ndarray | None = None
    notes: dict = field(default_factory=dict)
    clip_id: np.ndarray | None = None  # video frames only
    frame_idx: np.ndarray | None = None
    lengths: np.ndarray | None = None  # clip level only: x is [N, F, D], frames past lengths[i] are padding
    xv: np.ndarray | None = None  # cached augmented views [N, V, D] (see preprocess.VIEWS), in `views` order
    views: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sample_id)

    def take(self, idx: np.ndarray) -> "FeatureSet":
        """Rows `idx` (a boolean mask or indices)."""
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return replace(self, sample_id=self.sample_id[idx], x=self.x[idx], label=self.label[idx], split=self.split[idx],
                       subject=self.subject[idx], au=pick(self.au), z=pick(self.z),
                       clip_id=pick(self.clip_id), frame_idx=pick(self.frame_idx), lengths=pick(self.lengths),
                       xv=pick(self.xv))

    def rows(self, split: str) -> "FeatureSet":
        return self.take(self.split == split)

    def tta_only(self) -> "FeatureSet":
        """Only the cached views evaluation averages (flip), not the training-only draws (erase, noise)."""
        tta = tta_views(self.views)
        keep = [i for i, v in enumerate(self.views) if v in tta]
        if len(keep) == len(self.views):
            return self
        return replace(self, xv=self.xv[:, keep] if keep else None, views=[self.views[i] for i in keep])


def manifest_for(store: FeatureStore, manifest: str | Path | None) -> Manifest:
    """The manifest to take labels from (default: the one the store was built from), checked against the store."""
    path = manifest or store.meta.get("manifest")
    if manifest is None and (not path or not Path(path).is_file()):  # one given is read_manifest's to name
        raise ConfigError(f"cannot find the manifest {store.location} was built from ({path!r}); pass --manifest")
    m = read_manifest(path)
    if content_sha256(m) != store.fingerprint["manifest_sha256"]:
        raise StoreError(f"manifest {path} lists other images than store {store.location} was built from; "
                         "pass the manifest it was built from (labels may differ, sample_id/path may not)")
    return m


def image_rows(m: Manifest) -> dict[str, dict]:
    """sample_id -> manifest row, and clip_id -> its middle frame's row: where to find the image of a scored unit."""
    rows = {r["sample_id"]: r for r in m.rows}
    clips: dict[str, list[dict]] = {}
    for r in m.rows:
        if r.get("clip_id"):
            clips.setdefault(r["clip_id"], []).append(r)
    for clip, frames in clips.items():
        frames.sort(key=lambda r: int(r.get("frame_idx") or -1))
        rows.setdefault(clip, frames[len(frames) // 2])
    return rows


def _joined_features(store: FeatureStore, source: str, output: str | None) -> np.ndarray:
    other = open_store(source).require_complete()
    if list(other.sample_ids()) != list(store.sample_ids()):
        # Different row order is fine as long as every sample_id is there.
        index = {s: i for i, s in enumerate(other.sample_ids())}
        missing = [s for s in store.sample_ids() if s not in index]
        if missing:
            raise StoreError(f"mask-source store {source} lacks {len(missing)} "
                             f"sample ids of {store.location}, e.g. {missing[:3]}")
        return other.features(output)[[index[s] for s in store.sample_ids()]]
    return other.features(output)


def _refuse_non_finite(store: FeatureStore, x: np.ndarray, ok: np.ndarray, output: str) -> None:
    """Rows marked ok must hold finite features: extraction fails NaN/Inf rows, so any here were damaged or
    written by something else, and would poison every loss and metric."""
    bad = np.flatnonzero(ok & ~np.isfinite(x).all(axis=1))
    if len(bad):
        raise StoreError(f"{store.location}: {len(bad)} row(s) marked ok hold NaN or Inf in {output!r} "
                         f"(e.g. {store.sample_ids()[bad[0]]!r}, chunk {bad[0] // store.chunk_rows}); "
                         f"the store is damaged: `fercache verify {store.location}` names its chunks, "
                         "and `fercache extract ... --overwrite` rebuilds it")


def store_views(store_path: str) -> list[str]:
    """The augmented views a store holds (`extract --views`), in extraction order."""
    return list(open_store(store_path).fingerprint["encoder"].get("views", []))


_MEMO: dict | None = None


@contextmanager
def features_memo():
    """Within this block, `load_features` with the same arguments returns the same FeatureSet: a sweep, a cross
    matrix or a fold protocol reads each store once, not once per head, point and seed. Callers never modify a
    FeatureSet in place (`take` copies), which is what makes sharing it safe."""
    global _MEMO
    outer, _MEMO = _MEMO, {} if _MEMO is None else _MEMO
    try:
        yield
    finally:
        _MEMO = outer


def load_features(store_path: str, manifest: str | Path | None = None, output: str | None = None,
                  mask_source: str | None = None, views: list[str] = ()) -> FeatureSet:
    """Features of a complete store joined with a manifest's labels, splits, subjects and AUs.

    `views`: cached augmented views to load too (as `xv`), each of which the store must hold.
    """
    if _MEMO is None:
        return _load_features(store_path, manifest, output, mask_source, views)
    key = (str(store_path), str(manifest), output, mask_source, tuple(views))
    if key not in _MEMO:
        _MEMO[key] = _load_features(store_path, manifest, output, mask_source, views)
    return _MEMO[key]


def _load_features(store_path: str, manifest: str | Path | None, output: str | None, mask_source: str | None,
                   views) -> FeatureSet:
    store = open_store(store_path).require_complete()
    m = manifest_for(store, manifest)
    name = output or store.default_output
    base, _, view = name.rpartition(".")
    if views and base in store.outputs:  # asked for pooled.flip: its views would be pooled.flip.flip
        raise ConfigError(f"output {name!r} is the cached {view!r} view of {base!r}: pass --output {base}, whose views "
                          f"({', '.join(views)}) training uses by itself (recipe views=[] trains on {base!r} alone)")
    x = store.features(output)
    xv = np.stack([store.features(f"{name}.{v}") for v in views], axis=1) if views else None
    z = _joined_features(store, mask_source, None) if mask_source else None
    ok = store.ok()
    _refuse_non_finite(store, x, ok, name)
    if z is not None:
        ok &= np.isfinite(z).all(1)
    col = lambda c: np.array(m.column(c), dtype=object)  # noqa: E731
    aus = m.au_columns
    au = np.array([[int(r[a] or -1) for a in aus] for r in m.rows], dtype=np.int64) if aus else None
    video = {}
    if "clip_id" in m.columns:
        video = {"clip_id": col("clip_id"),
                 "frame_idx": np.array([int(v or -1) for v in m.column("frame_idx")], dtype=np.int64)}
    fs = FeatureSet(col("sample_id"), x, col("label"), col("split"), col("subject"), au, aus, z, **video,
                    xv=xv, views=list(views), notes={"store": store_path, "manifest": m.source,
                                                     "manifest_rows_sha256": rows_sha256(m),
                                                     "failed_rows_skipped": int((~ok).sum())})
    return fs.take(ok)


def carve_val(fs: FeatureSet, fraction: float = 0.15, seed: int = 0) -> FeatureSet:
    """If there is no `val` split, move a subject-grouped `fraction` of train subjects to val (recorded in notes)."""
    if (fs.split == "val").any():
        return replace(fs, notes={**fs.notes, "val_source": "manifest val split"})
    train = fs.split == "train"
    subjects = np.unique(fs.subject[train])
    if len(subjects) < 2:
        raise ConfigError("cannot carve a validation split: fewer than 2 training subjects")
    rng = np.random.default_rng(seed)
    n_val = max(1, round(fraction * len(subjects)))
    val_subjects = set(rng.choice(subjects, size=n_val, replace=False))
    split = fs.split.copy()
    split[train & np.isin(fs.subject, list(val_subjects))] = "val"
    note = f"carved from train: {n_val} of {len(subjects)} subjects ({fraction:.0%}), seed {seed}"
    # a sweep: once, not per point
    if (said := (fs.notes.get("store"), fs.notes.get("manifest"), note)) not in _CARVE_SAID:
        _CARVE_SAID.add(said)
        log.info("no val split in the manifest; %s", note)
    return replace(fs, split=split, notes={**fs.notes, "val_source": note})


def subset_train(fs: FeatureSet, shots: int | None = None, fraction: float | None = None, seed: int = 0,
                 stratify: bool = True) -> FeatureSet:
    """Keep `shots` training units per class, or a `fraction` of them (per class with `stratify`); val and test
    untouched. A unit is a clip where rows are video frames (its frames stay together), else a row. Seeded:
    each seed of a run draws its own subset, so the spread over seeds includes the luck of the draw."""
    if shots is None and fraction is None:
        return fs
    unit = fs.clip_id if fs.clip_id is not None else fs.sample_id
    train = fs.split == "train"
    units, first = np.unique(unit[train], return_index=True)
    strata = fs.label[train][first] if stratify else np.zeros(len(units), dtype=object)
    rng = np.random.default_rng(seed)
    keep = []
    for s in sorted(set(strata)):
        members = rng.permutation(units[strata == s])
        keep.extend(members[:shots] if shots is not None else members[:max(1, int(np.ceil(fraction * len(members))))])
    kept = ~train | np.isin(unit, keep)
    note = f"shots={shots}" if shots is not None else f"fraction={fraction}"
    what = "clips" if fs.clip_id is not None else "rows"
    log.info("training on a subset (%s, seed %d): %d of %d training %s", note, seed, len(keep), len(units), what)
    counts = {s: int((strata == s).sum()) for s in sorted(set(strata))}
    short = {s: n for s, n in counts.items() if shots is not None and n < shots}
    if short:  # a data-efficiency curve's point would read as `shots` per class without it
        log.warning("shots=%d: %d of %d classes have fewer training %s (%s): those train on all they have, not %d",
                    shots, len(short), len(set(strata)), what, ", ".join(f"{s} {n}" for s, n in short.items()), shots)
    return fs.take(kept)


def require_clips(fs: FeatureSet) -> None:
    """Raise unless the rows are video frames (a manifest with clip_id and frame_idx)."""
    if fs.clip_id is None:
        raise ConfigError(f"{fs.notes.get('manifest')} has no clip_id/frame_idx columns; a clip-level head needs "
                          "a manifest of video frames (e.g. the dfew, ferv39k, mafw or ckplus adapters)")


def unit_images(store: str, units: list[str], root: str | Path | None,
                manifest: str | Path | None = None) -> list[np.ndarray]:
    """The images of scored units (sample ids, or clip ids: their middle frame), read under data root `root`, else
    the one the store records (stores before 0.2.2 record none)."""
    from .manifests import data_root, root_holding
    from .preprocess import decode_image

    fs = open_store(store)
    rows, base = image_rows(manifest_for(fs, manifest)), data_root(root, fs.meta.get("data_root"))
    images = []
    for unit in units:
        file = base / rows[unit]["path"]
        if not file.is_file():
            there = root_holding([rows[unit]["path"]], base)
            fix = (f"it is under {there}: pass --data-root {there}" if there else
                   "pass --data-root (or set FERCACHE_DATA) to the folder the manifest paths are relative to")
            raise ConfigError(f"cannot draw the images: {file} does not exist; {fix}")
        images.append(decode_image(file, rows[unit].get("bbox") or ""))
    return images


def clip_means(fs: FeatureSet) -> FeatureSet:
    """One row per clip: the mean of its frames' features (label, split and subject of its first frame)."""
    import torch

    require_clips(fs)
    clips, first, inverse = np.unique(fs.clip_id.astype(str), return_index=True, return_inverse=True)
    sums = torch.zeros((len(clips), fs.x.shape[1]), dtype=torch.float32)
    sums.index_add_(0, torch.as_tensor(inverse), torch.as_tensor(np.asarray(fs.x, dtype=np.float32)))
    x = (sums / torch.as_tensor(np.bincount(inverse), dtype=torch.float32)[:, None]).numpy()
    pick = lambda a: None if a is None else a[first]  # noqa: E731
    return FeatureSet(clips.astype(object), x, fs.label[first], fs.split[first], fs.subject[first], pick(fs.au),
                      fs.au_names, notes={**fs.notes, "level": "clip (mean of its frames)"},
                      clip_id=clips.astype(object))


def clip_level(fs: FeatureSet, max_frames: int = 64) -> FeatureSet:
    """Group frame rows into clips: x becomes [N_clips, F, D] (frames in frame_idx order, zero-padded), with lengths.

    A clip longer than `max_frames` keeps `max_frames` frames at an even stride (a dense stride, so a
    clip-level head can still resample segments every epoch). Every frame of a clip must carry the
    same label, split and subject.
    """
    require_clips(fs)
    order = np.lexsort((fs.frame_idx, fs.clip_id))
    clips, starts = np.unique(fs.clip_id[order], return_index=True)
    bounds = list(starts) + [len(order)]
    width = min(max_frames, max(b - a for a, b in zip(bounds[:-1], bounds[1:])) if len(clips) else 1)
    # float16, the store's own precision (lossless): clip tensors are the largest thing a head holds in memory.
    x = np.zeros((len(clips), width, fs.x.shape[-1]), dtype=np.float16)
    lengths, first = np.zeros(len(clips), dtype=np.int64), np.zeros(len(clips), dtype=np.int64)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = order[a:b]
        for name in ("label", "split", "subject"):
            values = set(getattr(fs, name)[rows])
            if len(values) > 1:
                raise ConfigError(f"clip {clips[i]!r} has frames with different {name}s {sorted(values)}; "
                                  "a clip-level head needs one per clip")
        if len(rows) > width:
            rows = rows[np.linspace(0, len(rows) - 1, width).round().astype(int)]
        x[i, :len(rows)], lengths[i], first[i] = fs.x[rows], len(rows), rows[0]
    pick = lambda a: None if a is None else a[first]  # noqa: E731
    return FeatureSet(clips.astype(object), x, fs.label[first], fs.split[first], fs.subject[first], pick(fs.au),
                      fs.au_names, None, notes={**fs.notes, "level": f"clip (at most {width} frames each)"},
                      clip_id=clips.astype(object), lengths=lengths)
