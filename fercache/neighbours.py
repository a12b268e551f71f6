"""Near-duplicates across splits, found in the cached features: the copies byte hashing misses.

FER2013 also holds the same photo re-cropped, re-encoded or contrast-stretched in train and test; their files
differ, so `manifest check` cannot see them, but an encoder maps them to nearly the same feature. With the
features cached, comparing every val/test image with every earlier-split image (and its mirrored view, where
the store has one) is one matrix product per chunk: seconds, no image read. The threshold is the user's call,
so every run also prints the counts at several thresholds, draws the distribution, and shows the least
similar pairs above the threshold (with the ImageNet stand-in on FER2013, pairs at 0.95 are still one photo
re-cropped or re-encoded: 471 of 7,178 val/test images, against 280 byte-identical). A video store is compared clip by
clip (the mean of each clip's frames).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import report
from .audit import ORDER, without_leaks
from .data import FeatureSet, clip_means, load_features, manifest_for, store_views, unit_images
from .devices import torch_device
from .errors import ConfigError, check_out_dir
from .manifests import check_derived_path, write_manifest
from .preprocess import tta_views
from .store import check_same_encoder, open_store, store_name

log = logging.getLogger(__name__)

THRESHOLDS = (0.999, 0.99, 0.98, 0.97, 0.95, 0.9)  # printed every run, whatever the threshold


@dataclass
class Neighbours:
    """For each query (a labelled val/test row), its nearest row of an earlier split and their cosine."""

    fs: FeatureSet
    query: np.ndarray  # row indices into fs
    ref: np.ndarray  # row indices into ref_fs, one per query
    cos: np.ndarray
    mirrored: np.ndarray  # the match was the reference's mirrored view
    ref_fs: FeatureSet | None = None  # another store's rows (--against); None: fs itself

    @property
    def refs(self) -> FeatureSet:
        return self.fs if self.ref_fs is None else self.ref_fs

    def above(self, threshold: float) -> np.ndarray:
        """Positions (into query) at or above `threshold`, most similar first."""
        hit = np.flatnonzero(self.cos >= threshold)
        return hit[np.argsort(-self.cos[hit], kind="stable")]

    def units(self, threshold: float) -> list[str]:
        """The val/test units (clips in a video store) holding a near-duplicate of an earlier split."""
        ids = self.fs.clip_id if self.fs.clip_id is not None else self.fs.sample_id
        return list(dict.fromkeys(str(ids[self.query[i]]) for i in self.above(threshold)))


def _normalised(a: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a, dtype=np.float32))
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _scored(fs: FeatureSet) -> np.ndarray:
    """Rows a head would score: an expression label, or at least one annotated AU."""
    has_au = (fs.au >= 0).any(1) if fs.au is not None else np.zeros(len(fs), bool)
    return (fs.label != "") | has_au


def _nearest(q: torch.Tensor, banks: list[torch.Tensor], ref_chunk: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """Best cosine of each query row over every bank (the references, then their views), chunk by chunk so a
    million references never make a million-column matrix; returns (cosine, reference index, bank index)."""
    best = torch.full((len(q),), -float("inf"), device=q.device)
    idx = torch.zeros(len(q), dtype=torch.long, device=q.device)
    bank_of = torch.zeros_like(idx)
    for v, bank in enumerate(banks):
        for b in range(0, len(bank), ref_chunk):
            s, i = (q @ bank[b:b + ref_chunk].T).max(1)
            better = s > best  # strictly: on a tie the unmirrored reference wins
            best, idx = torch.where(better, s, best), torch.where(better, i + b, idx)
            bank_of = torch.where(better, v, bank_of)
    return best, idx, bank_of


def _banks(fs: FeatureSet, rows: np.ndarray, device: str) -> list[torch.Tensor]:
    """Normalised features of `rows`, then of each of their cached views (mirrored images)."""
    views = [fs.xv[:, v] for v in range(fs.xv.shape[1])] if fs.xv is not None else []
    return [_normalised(a[rows]).to(device) for a in [fs.x] + views]


def _search(fs: FeatureSet, q: np.ndarray, ref_fs: FeatureSet, r: np.ndarray, chunk: int, ref_chunk: int,
            device: str) -> list[tuple[np.ndarray, ...]]:
    """(queries, reference rows, cosines, mirrored) for query rows `q` of fs against rows `r` of ref_fs, in chunks."""
    if not len(q) or not len(r):
        return []
    x, banks, out = _normalised(fs.x[q]).to(device), _banks(ref_fs, r, device), []
    for a in range(0, len(q), chunk):
        best, idx, bank_of = _nearest(x[a:a + chunk], banks, ref_chunk)
        out.append((q[a:a + chunk], r[idx.cpu().numpy()], best.cpu().numpy(), bank_of.cpu().numpy() > 0))
    return out


def _neighbours(fs: FeatureSet, parts: list[tuple[np.ndarray, ...]], ref_fs: FeatureSet | None = None) -> Neighbours:
    cols = [np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, t)
            for k, t in enumerate((np.int64, np.int64, np.float32, bool))]
    return Neighbours(fs, *cols, ref_fs=ref_fs)


def nearest_earlier(fs: FeatureSet, chunk: int = 2048, ref_chunk: int = 65536, device: str = "cpu") -> Neighbours:
    """Nearest earlier-split neighbour of every labelled val/test row: val against train, test against train + val."""
    order = np.array([ORDER[s] for s in fs.split])
    parts = []
    for split in ("val", "test"):
        q = np.flatnonzero((fs.split == split) & _scored(fs))
        parts += _search(fs, q, fs, np.flatnonzero(order < ORDER[split]), chunk, ref_chunk, device)
    return _neighbours(fs, parts)


def nearest_in(fs: FeatureSet, other: FeatureSet, chunk: int = 2048, ref_chunk: int = 65536,
               device: str = "cpu") -> Neighbours:
    """Nearest neighbour in another dataset's train and val rows (what its heads learn from and select on) of every
    labelled val/test row of fs: the images a train-on-B / test-on-A cell would score from memory."""
    q = np.flatnonzero(np.isin(fs.split, ("val", "test")) & _scored(fs))
    r = np.flatnonzero(np.isin(other.split, ("train", "val")))
    return _neighbours(fs, _search(fs, q, other, r, chunk, ref_chunk, device), ref_fs=other)


def counts(nb: Neighbours, thresholds=THRESHOLDS) -> dict[float, dict[str, int]]:
    """How many val and test queries reach each threshold."""
    split = nb.fs.split[nb.query]
    return {t: {s: int(((nb.cos >= t) & (split == s)).sum()) for s in ("val", "test")} for t in thresholds}


def pairs_png(path: Path, nb: Neighbours, threshold: float, k: int, stores: tuple[str, str], manifest, root,
              title: str) -> Path:
    """The k LEAST similar pairs still above the threshold, each val/test image beside its neighbour: exact copies
    tell nothing, the borderline pairs show whether the threshold is safe. `stores`: (queries', references')."""
    shown = nb.above(threshold)[::-1][:k]
    q_ids = [str(nb.fs.sample_id[nb.query[i]]) for i in shown]
    r_ids = [str(nb.refs.sample_id[nb.ref[i]]) for i in shown]
    q_img = unit_images(stores[0], q_ids, root, manifest)
    r_img = unit_images(stores[1], r_ids, root, manifest if stores[1] == stores[0] else None)
    images, captions = [], []
    for j, i in enumerate(shown):
        q, r = nb.query[i], nb.ref[i]
        images += [q_img[j], r_img[j]]
        captions += [f"{nb.fs.split[q]} {nb.fs.label[q]}\n{q_ids[j].rsplit('/', 1)[-1][-20:]}",
                     f"{nb.refs.split[r]} {nb.refs.label[r]} {nb.cos[i]:.3f}" + (" "
                                                                                 "(mirrored)" if nb.mirrored[i] else "")
                     + f"\n{r_ids[j].rsplit('/', 1)[-1][-20:]}"]
    return report.gallery_png(path, images, captions, title)


def _units_of(store: str, manifest, output: str | None, views: bool = True) -> FeatureSet:
    """A store's features (with its cached views when it serves as reference); a video store as one mean feature
    per clip (a clip is copied or not, and millions of frames against millions would never finish)."""
    # mirrors, not noise
    fs = load_features(store, manifest, output, views=tta_views(store_views(store)) if views else ())
    return clip_means(fs) if fs.clip_id is not None else fs


def _unit(fs: FeatureSet) -> str:
    """What one compared row is: a video store's rows are clips, counted as such."""
    return "clip" if fs.clip_id is not None else "image"


PAIRS_HEADER = ["sample_id", "split", "label", "neighbour", "neighbour_split", "neighbour_label", "cosine", "mirrored"]


def near_duplicates(store: str, out_dir: str | Path, manifest: str | Path | None = None, output: str | None = None,
                    threshold: float = 0.95, without_leaks_to: str | Path | None = None, pairs: int = 0,
                    root: str | Path | None = None, device: str = "cpu", against: str | None = None) -> dict:
    """Find, count, draw and list val/test images whose nearest earlier-split image (or, `against` another store,
    nearest image of its train and val splits) is at least `threshold` similar; optionally write the manifest
    with their units unlabelled (the same store serves it)."""
    out_dir, device = Path(out_dir), torch_device(device)
    check_out_dir(out_dir, "near-dups.csv and the plots")
    check_derived_path(without_leaks_to, manifest or open_store(store).meta.get("manifest"))
    if against:
        check_same_encoder([store, against])  # before any folder is made or feature read
    out_dir.mkdir(parents=True, exist_ok=True)
    fs = _units_of(store, manifest, output, views=not against)  # queries are compared as they are, never mirrored
    nb = nearest_in(fs, _units_of(against, None, output), device=device) if against else nearest_earlier(fs,
                                                                                                         device=device)
    refs, hits = nb.refs, nb.above(threshold)
    where = f"{store_name(against)} train/val" if against else "earlier-split"
    unit, ref_unit = _unit(fs), _unit(refs)
    name = store_name(store) + (f" vs {store_name(against)}" if against else "")
    rows = [[fs.sample_id[nb.query[i]], fs.split[nb.query[i]], fs.label[nb.query[i]], refs.sample_id[nb.ref[i]],
             refs.split[nb.ref[i]], refs.label[nb.ref[i]], f"{nb.cos[i]:.4f}", int(nb.mirrored[i])] for i in hits]
    hist = report.hist_png(out_dir / "near-dups-hist.png",
                           {s: nb.cos[fs.split[nb.query] == s] for s in ("val", "test")},
                           threshold, f"cosine to the nearest {where} {ref_unit}"
                           + ("" if against else " (train; train + val for test)"),
                           f"{name}: {len(hits)} of {len(nb.query)} val/test {unit}s at cosine ≥ {threshold}")
    result = {"store": store, "against": against, "where": where, "threshold": threshold, "queries": int(len(nb.query)),
              "unit": unit, "ref_unit": ref_unit, "counts": counts(nb), "units": nb.units(threshold),
              "label_differs": int(sum(r[2] != r[5] for r in rows)),
              "csv": str(report.write_csv(out_dir / "near-dups.csv", PAIRS_HEADER, rows)), "hist_png": str(hist)}
    if without_leaks_to:
        m = manifest_for(open_store(store), manifest)
        result["manifest"] = str(write_manifest(without_leaks(m, result["units"]), without_leaks_to))
    if pairs and len(hits):
        try:
            title = (f"{name}: the {min(pairs, len(hits))} least similar pairs at cosine ≥ {threshold} (if these "
                     "are one photo, so is everything above)")
            result["pairs_png"] = str(pairs_png(out_dir / "near-dups-pairs.png", nb, threshold, pairs,
                                                (store, against or store), manifest, root, title))
        except ConfigError as e:  # the images are not here (a store copied without them): the figure is an extra
            log.warning("near-dups-pairs.png not drawn: %s (--pairs 0 skips it)", e)
    return result


def summarize(result: dict) -> str:
    """Counts at each threshold, what was found at the chosen one, and where the outputs went."""
    unit, ref_unit = result["unit"], result["ref_unit"]
    lines = [f"{result['store']}: {result['queries']} labelled val/test {unit}s against every {result['where']} "
             f"{ref_unit} (and its mirrored view where that store has one)"
             + ("; a clip is the mean of its frames' features" if "clip" in (unit, ref_unit) else ""),
             f"  {'cosine ≥':>9} {'val':>6} {'test':>6}"]
    lines += [f"  {t:>9} {c['val']:>6} {c['test']:>6}" + ("  <- threshold" if t == result["threshold"] else "")
              for t, c in result["counts"].items()]
    lines.append(f"at {result['threshold']}: {len(result['units'])} val/test {unit}(s), "
                 f"{result['label_differs']} of the pairs labelled differently -> {result['csv']}, {result['hist_png']}"
                 + (f", {result['pairs_png']}" if "pairs_png" in result else ""))
    if "manifest" in result:
        lines.append(f"{result['manifest']}: the manifest with them unlabelled (the same store serves it)")
    return "\n".join(lines)
