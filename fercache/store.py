"""FeatureStore: the versioned Zarr layout that holds one (manifest, encoder) pair's features.

Layout, schema version 1 (specified in docs/store-format.md):

    STORE.zarr/                 group; attrs["fercache"] holds the metadata below
      sample_id   [N] str       manifest order; labels stay in the manifest, joined by sample_id
      features/<output> [N, D]  float16, raw (not L2-normalised), row chunks; NaN where ok is False.
                                With --read-chunk-rows M each chunk is a zarr v3 *shard* of M-row
                                inner chunks: one object per chunk, M-row random reads.
      ok          [N] bool      the image decoded and was encoded
      error       [N] str       failure reason ("" where ok)
      done        [n_chunks]    per-chunk completion flags, one object each, written after the chunk
      checksums   [n_chunks]    per chunk, JSON {array: digest}, written with it (from 0.4; optional)
      clip_id, frame_idx [N]    only for manifests of video frames

attrs["fercache"]["precisions"] lists the precisions its chunks were computed in (fp32, bf16, fp16, bf16-weights;
from 0.3.1; optional, not fingerprinted): two entries mean a resume in another precision mixed them.

``complete`` is set last, after every ``done`` flag is true, so a half-written
store never looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import StoreError, check_out_file, near_path

SCHEMA_VERSION = 1
FORMAT = "fercache.features"


def library_versions() -> dict[str, str]:
    """Versions that can change features bit-for-bit; recorded, compared with a warning only."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("fercache", "torch", "torchvision", "open_clip_torch", "timm", "numpy", "pillow", "zarr"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def store_name(location) -> str:
    """A store's short name for tables and run folders: `out/fer2013.zarr/` -> `fer2013`."""
    return Path(str(location).rstrip("/")).stem


def _plain(location: str | Path) -> str:
    """`file:///x/s.zarr` is the local path /x/s.zarr (zarr's fsspec store would not create its folders)."""
    location = str(location)
    return location[len("file://"):] if location.startswith("file://") else location


def canonical(location: str | Path) -> str:
    """One spelling per store location: an absolute local path, or the URL without a trailing slash. Runs record
    it, so a run finds its store from any working directory, and `s.zarr`, `./s.zarr/` and `/abs/s.zarr` are one
    store when evaluate decides whether it scores a run on its own training store."""
    location = _plain(location)
    if "://" in location:
        return location.rstrip("/")
    return os.path.abspath(os.path.expanduser(location))


def same_location(a: str | Path | None, b: str | Path | None) -> bool:
    return a is not None and b is not None and canonical(a) == canonical(b)


def encoder_key(encoder: dict) -> dict:
    """What makes two stores' features comparable: the same model, weights and preprocessing (not views or outputs),
    and for BatchNorm models the same encoder revision."""
    return {k: encoder.get(k) for k in ("name", "weights_sha256", "preprocess", "revision")}


def check_same_encoder(stores: list[str]) -> None:
    """Refuse stores whose features are not comparable (their `encoder_key`s differ): a head trained on one cannot
    read another, and nearest neighbours across them mean nothing."""
    first = open_store(stores[0]).fingerprint["encoder"]
    for other in stores[1:]:
        here = open_store(other).fingerprint["encoder"]
        if encoder_key(here) != encoder_key(first):
            raise StoreError(f"{stores[0]} ({encoder_label(first)}) and {other} ({encoder_label(here)}) were extracted "
                             "differently; their features are not comparable (extract both with one --encoder, "
                             "--pretrained and --image-size)")


def encoder_label(encoder: dict) -> str:
    """An encoder identity in one line, for errors that compare two."""
    revision = f", revision {encoder['revision']}" if encoder.get("revision") else ""
    return (f"{encoder['name']} ({encoder['pretrained']}, sha {encoder['weights_sha256'][:12]}, "
            f"size {encoder['preprocess']['size']}{revision})")


def make_fingerprint(encoder_identity: dict, manifest_sha256: str, n_rows: int, chunk_rows: int,
                     read_chunk_rows: int | None = None) -> dict:
    """The fingerprint stored in a store's attributes; `key` is what must match to resume or reuse it.

    `read_chunk_rows` (sharded stores only) is left out when None, so unsharded keys stay as they were.
    """
    if read_chunk_rows is not None and (read_chunk_rows < 1 or chunk_rows % read_chunk_rows):
        raise StoreError(f"--read-chunk-rows {read_chunk_rows} must divide --chunk-rows {chunk_rows}")
    ident = {"schema_version": SCHEMA_VERSION, "encoder": encoder_identity, "manifest_sha256": manifest_sha256,
             "n_rows": n_rows, "chunk_rows": chunk_rows, "dtype": "float16"}
    if read_chunk_rows is not None and read_chunk_rows != chunk_rows:
        ident["read_chunk_rows"] = read_chunk_rows
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return {**ident, "key": key, "versions": library_versions()}


def outdated(fingerprint: dict, spec: str | None = None) -> str | None:
    """Why a store with this fingerprint holds features its encoder no longer computes, or None: a BatchNorm model
    fingerprinted by fercache 0.1.0 (no revision). Later versions' stores say so themselves, so only 0.1.0's
    build the architecture (random init, no weights) to look for BatchNorm; `spec` is the store's encoder_args spec."""
    enc = fingerprint["encoder"]
    if enc.get("revision") or fingerprint.get("versions", {}).get("fercache") not in (None, "0.1.0"):
        return None
    from .encoders import BATCHNORM_REVISION, arch_has_batchnorm, revision_note  # torch only for 0.1.0 stores

    if not arch_has_batchnorm(spec or enc["name"]):
        return None
    return revision_note(enc, {**enc, "revision": BATCHNORM_REVISION})


def _diff(old: dict, new: dict) -> str:
    from .encoders import revision_note  # here, not at the top: `fercache info` needs no torch

    parts, a, b = [], old["encoder"], new["encoder"]
    if why := revision_note(a, b):
        parts.append(why)
    elif encoder_key(a) != encoder_key(b) and _without(a, "preprocess") == _without(b, "preprocess"):
        pa, pb = a["preprocess"], b["preprocess"]
        keys = [k for k in {**pa, **pb} if pa.get(k) != pb.get(k)]
        parts.append("preprocessing " + ", ".join(f"{k} {pa.get(k)} vs {pb.get(k)}" for k in keys)
                     + (" (fercache 0.4 resizes exactly as PIL does)" if "revision" in keys else ""))
    elif encoder_key(a) != encoder_key(b):
        parts.append(f"encoder {encoder_label(a)} vs {encoder_label(b)}")
    if a.get("views") != b.get("views"):  # same model, other cached views (and so other outputs): say which
        parts.append(f"views {', '.join(a.get('views') or ['none'])} vs {', '.join(b.get('views') or ['none'])}")
    if old["manifest_sha256"] != new["manifest_sha256"]:
        parts.append(f"manifest sha256 {old['manifest_sha256'][:12]} vs {new['manifest_sha256'][:12]}")
    for k in ("schema_version", "n_rows", "chunk_rows", "read_chunk_rows"):
        if old.get(k) != new.get(k):
            parts.append(f"{k} {old.get(k)} vs {new.get(k)}")
    return "; ".join(parts) or "fingerprint key differs"


def _without(encoder: dict, key: str) -> dict:
    return {k: v for k, v in encoder_key(encoder).items() if k != key}


@dataclass
class FeatureStore:
    """An open store. Create with :func:`create`, open with :func:`open_store`."""

    location: str
    group: object  # zarr.Group

    @property
    def meta(self) -> dict:
        return dict(self.group.attrs.get("fercache", {}))

    @property
    def fingerprint(self) -> dict:
        return self.meta["fingerprint"]

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def n_rows(self) -> int:
        return int(self.meta["fingerprint"]["n_rows"])

    @property
    def chunk_rows(self) -> int:
        return int(self.meta["fingerprint"]["chunk_rows"])

    @property
    def read_chunk_rows(self) -> int:
        """Rows per inner chunk of a sharded store (= chunk_rows when unsharded): the unit of decode and encode."""
        return int(self.meta["fingerprint"].get("read_chunk_rows", self.chunk_rows))

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    @property
    def outputs(self) -> dict[str, int]:
        return dict(self.fingerprint["encoder"]["outputs"])

    @property
    def default_output(self) -> str:
        return self.meta["default_output"]

    def chunk_slice(self, i: int) -> slice:
        """Rows of chunk i."""
        return slice(i * self.chunk_rows, min((i + 1) * self.chunk_rows, self.n_rows))

    def pending_chunks(self) -> list[int]:
        """Chunks not yet written (what a resumed extract computes)."""
        return [int(i) for i in np.flatnonzero(~self.read("done"))]

    def write_chunk(self, i: int, features: dict[str, np.ndarray], ok: np.ndarray, error: list[str]) -> None:
        """Write one whole chunk, then its checksums, then its `done` flag: an interrupted write is redone on
        resume, and a chunk damaged or swapped later no longer matches its checksums."""
        rows = self.chunk_slice(i)
        written = {f"features/{name}": arr.astype(np.float16, copy=False) for name, arr in features.items()}
        written |= {"ok": np.asarray(ok, dtype=bool), "error": np.asarray(error, dtype=str)}
        for key, arr in written.items():
            self.group[key][rows] = arr
        if CHECKSUMS in self.group:  # stores from before 0.4 have none; their chunks stay unchecked
            written["sample_id"] = self.group["sample_id"][rows]
            self.group[CHECKSUMS][i] = json.dumps({k: chunk_digest(k, i, a) for k, a in sorted(written.items())})
        self.group["done"][i] = True

    def note_precision(self, precision: str) -> list[str]:
        """Record that chunks are now computed in `precision` ("fp32", "bf16", ...); returns those recorded before.
        Not fingerprinted (fp32 and bf16 features agree within tolerance), but a store resumed in another precision
        mixes the two, and `info` says so. A store from before 0.3.1 with chunks done recorded none: "not recorded"."""
        computed = len(self.pending_chunks()) < self.n_chunks  # with none yet, an earlier record is moot
        had = (list(self.meta.get("precisions") or []) or ["not recorded"]) if computed else []
        if precision not in had:
            self.group.attrs["fercache"] = {**self.meta, "precisions": had + [precision]}
        return had

    def mark_complete(self, n_ok: int) -> None:
        """Set `complete` once every chunk is done."""
        pending = self.pending_chunks()
        if pending:
            raise StoreError(f"{self.location}: {len(pending)} chunk(s) still pending; cannot mark complete")
        self.group.attrs["fercache"] = {**self.meta, "complete": True, "n_ok": n_ok, "n_failed": self.n_rows - n_ok}

    # --- reading ---------------------------------------------------------------------------------

    def require_complete(self) -> "FeatureStore":
        """Raise unless the store finished extraction."""
        if not self.complete:
            done = self.n_chunks - len(self.pending_chunks())
            raise StoreError(f"{self.location} is incomplete ({done}/{self.n_chunks} chunks); re-run the same "
                             "`fercache extract` command to finish it")
        return self

    def read(self, key: str, verify: bool = True) -> np.ndarray:
        """One whole array, its chunks checked against their checksums (`verify`). A chunk that cannot be decoded
        (a file cut short by a full disk, a bad copy), or that was deleted, edited or swapped (zarr reads a deleted
        chunk as its fill value: NaN features, ok False), is a StoreError naming the chunks, not wrong numbers."""
        try:
            arr = self.group[key][:]
        except Exception as e:  # zarr's codecs raise ValueError, RuntimeError, ... depending on the damage
            raise StoreError(f"{self.location}: its array {key!r} cannot be read ({type(e).__name__}: {e}); if the "
                             "store is damaged (a file cut short, a bad copy), extract it again with --overwrite, or "
                             f"`fercache verify {self.location} --repair` to redo only its damaged chunks") from None
        if verify and (bad := self._mismatched(key, arr)):
            raise StoreError(f"{self.location}: {key!r} of chunk(s) {_listed(bad)} does not match its checksum (a "
                             f"chunk file deleted, edited or swapped); `fercache verify {self.location} --repair` "
                             "marks them for the same extract command to redo")
        return arr

    def checksums(self) -> list[dict]:
        """Per chunk: {array: digest} as written with the chunk ({} where none: not done, or made before 0.4)."""
        if CHECKSUMS not in self.group:
            return [{} for _ in range(self.n_chunks)]
        return [json.loads(v) if v else {} for v in self.group[CHECKSUMS][:].tolist()]

    def _mismatched(self, key: str, arr: np.ndarray, sums: list[dict] | None = None) -> list[int]:
        """Chunks of array `key` (read whole as `arr`) whose digest differs from the one written with them."""
        if key not in CHECKED and not key.startswith("features/"):
            return []
        sums = self.checksums() if sums is None else sums
        return [i for i, d in enumerate(sums) if key in d and chunk_digest(key, i, arr[self.chunk_slice(i)]) != d[key]]

    def verify(self) -> "Verification":
        """Every array's every chunk against its checksums: what `fercache verify` reports."""
        sums = self.checksums()
        bad: dict[int, list[str]] = {}
        for i, digests in enumerate(sums):  # chunk by chunk: a file that cannot be decoded is named, not its array
            for key in digests:
                try:
                    if chunk_digest(key, i, self.group[key][self.chunk_slice(i)]) != digests[key]:
                        bad.setdefault(i, []).append(key)
                except Exception:  # zarr's codecs raise ValueError, RuntimeError, ... depending on the damage
                    bad.setdefault(i, []).append(f"{key} (unreadable)")
        done = self.read("done", verify=False)
        unchecked = [i for i, d in enumerate(sums) if done[i] and not d]
        return Verification(self.location, self.n_chunks, dict(sorted(bad.items())), unchecked,
                            {i: (self.chunk_slice(i).start, self.chunk_slice(i).stop) for i in bad})

    def repair(self, chunks: list[int]) -> None:
        """Mark `chunks` not done (and the store incomplete), so the same extract command encodes them again."""
        for i in chunks:
            self.group["done"][i] = False
            if CHECKSUMS in self.group:
                self.group[CHECKSUMS][i] = ""
        if chunks:
            self.group.attrs["fercache"] = {**self.meta, "complete": False}

    def features(self, output: str | None = None) -> np.ndarray:
        """All rows of one output as float32 [N, D]."""
        name = output or self.default_output
        if name not in self.outputs:
            raise StoreError(f"{self.location} has no output {name!r}; it has {sorted(self.outputs)}")
        return self.read(f"features/{name}").astype(np.float32)

    def sample_ids(self) -> np.ndarray:
        return _strings(self.read("sample_id"))

    def ok(self) -> np.ndarray:
        return self.read("ok")

    def errors(self) -> dict[str, str]:
        """sample_id -> failure reason, for rows that failed."""
        bad = np.flatnonzero(~self.ok())
        ids, errs = self.sample_ids(), _strings(self.read("error"))
        return {str(ids[i]): str(errs[i]) for i in bad}

    def info(self) -> StoreInfo:
        """What `fercache info` shows."""
        meta = self.meta
        try:
            failures = self.errors() if self.complete else {}
        except StoreError as e:  # info describes a damaged store rather than refusing it
            failures = {"(store damaged)": str(e)}
        return StoreInfo(
            location=self.location, format=meta.get("format"), schema_version=meta.get("schema_version"),
            complete=self.complete, rows=self.n_rows, chunks_done=self.n_chunks - len(self.pending_chunks()),
            chunks_total=self.n_chunks, outputs=self.outputs, default_output=self.default_output,
            n_ok=meta.get("n_ok"), n_failed=meta.get("n_failed"), failures=failures, fingerprint=self.fingerprint,
            manifest=meta.get("manifest"), data_root=meta.get("data_root"), precisions=meta.get("precisions"),
            outdated=outdated(self.fingerprint, (meta.get("encoder_args") or {}).get("spec")),
            writer=None if self.complete else writer(self.location),
            clips=int(len(np.unique(_strings(self.read("clip_id"))))) if "clip_id" in self.group else None,
            layout={"chunk_rows": self.chunk_rows, "read_chunk_rows": self.read_chunk_rows,
                    "sharded": self.read_chunk_rows != self.chunk_rows})


@dataclass(frozen=True)
class StoreInfo:
    """A store described: shape, completeness, outputs, failures, fingerprint and where it came from."""

    location: str
    format: str | None
    schema_version: int | None
    complete: bool
    rows: int
    chunks_done: int
    chunks_total: int
    outputs: dict[str, int]
    default_output: str
    n_ok: int | None
    n_failed: int | None
    failures: dict[str, str]  # sample_id -> why
    fingerprint: dict
    manifest: str | None
    data_root: str | None  # stores before 0.2.2 do not record it
    precisions: list[str] | None  # stores before 0.3.1 do not record it
    outdated: str | None  # why the store must be re-extracted, if it must
    writer: str | None  # an unfinished store: who writes it now ("" nobody; None this platform cannot tell)
    clips: int | None  # video stores: how many clips
    layout: dict

    def lines(self) -> list[str]:
        """As `fercache info` prints it."""
        fp, lay = self.fingerprint, self.layout
        enc = fp["encoder"]
        out = [f"store      {self.location} (schema {self.schema_version})",
               f"complete   {self.complete} ({self.chunks_done}/{self.chunks_total} chunks)"]
        if not self.complete and self.writer is not None:
            out.append(f"writer     {self.writer}: an extract is running" if self.writer else
                       "writer     none on this machine: re-run the same "
                       "extract command to resume from the written chunks")
        counts = f"ok {self.n_ok}  failed {self.n_failed}" if self.n_ok is not None else "(ok/failed: when complete)"
        clips = f"  ({self.clips} video clips)" if self.clips is not None else ""
        out.append(f"rows       {self.rows}  {counts}{clips}")
        out.append(f"chunks     {lay['chunk_rows']} rows" + (f", sharded: inner chunks of {lay['read_chunk_rows']} rows"
                                                         if lay["sharded"] else ""))
        out.append("outputs    " + ", ".join(f"{k}[{v}]" for k, v in self.outputs.items())
                   + f" (default {self.default_output})")
        out.append(f"encoder    {enc['name']} pretrained={enc['pretrained']} sha256={enc['weights_sha256'][:16]}"
                   + (f" revision={enc['revision']}" if enc.get("revision") else ""))
        if self.outdated:
            out.append(f"OUTDATED   {self.outdated}: re-extract it (`fercache "
                       "extract ... --overwrite`) and retrain its runs")
        out.append(f"preprocess {json.dumps(enc['preprocess'])}")
        out.append(f"manifest   {self.manifest} sha256={fp['manifest_sha256'][:16]}")
        if self.data_root:
            out.append(f"data root  {self.data_root}" + ("" if Path(self.data_root).is_dir() else " (not there now)"))
        if self.precisions:
            out.append(f"precision  {' then '.join(self.precisions)}"
                       + (" (a resume mixed them)" if len(self.precisions) > 1 else ""))
        out.append(f"key        {fp['key']}")
        return out + [f"failed     {sid}: {why}" for sid, why in list(self.failures.items())[:20]]


#: Optional array (from 0.4; schema 1 unchanged): per chunk, JSON {array: digest} written with the chunk.
CHECKSUMS = "checksums"
#: Arrays whose chunks are checksummed besides every features/<output>.
CHECKED = ("sample_id", "ok", "error")


def chunk_digest(key: str, chunk: int, arr: np.ndarray) -> str:
    """blake2b of one chunk of one array, salted with the array's name and the chunk's index (a chunk file moved
    to another index, or to another array, does not match there)."""
    h = hashlib.blake2b(f"{key}\0{chunk}\0".encode(), digest_size=16)
    if arr.dtype.kind in "OUT":  # strings: their text, NUL-separated (ids cannot hold NUL)
        h.update("\0".join(map(str, arr.tolist())).encode("utf-8", "surrogatepass"))
    else:
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _listed(chunks: list[int]) -> str:
    return ", ".join(map(str, chunks[:10])) + (f" and {len(chunks) - 10} more" if len(chunks) > 10 else "")


@dataclass
class Verification:
    """What `fercache verify` found: damaged chunks with their arrays and rows, and chunks without checksums."""

    location: str
    n_chunks: int
    bad: dict[int, list[str]]
    unchecked: list[int]
    rows: dict[int, tuple[int, int]]

    @property
    def ok(self) -> bool:
        return not self.bad


def _strings(arr: np.ndarray) -> np.ndarray:
    """zarr 3 returns numpy StringDType; callers get a plain object array of str."""
    return np.asarray(arr.tolist(), dtype=object)


def _zarr():
    import zarr
    return zarr


def exists(location: str | Path) -> bool:
    """True when a fercache store (complete or not) is at `location`."""
    try:
        g = _zarr().open_group(_plain(location), mode="r")
    except Exception:  # zarr raises FileNotFoundError / GroupNotFoundError depending on the backend
        return False
    return "fercache" in g.attrs


def _what_is_there(location: str | Path) -> str | None:
    """What `location` is when it is no store but a folder inside one, a folder of stores, a run (which names the
    store it trained on) or a manifest: the paths a user is likely to hold when they reach for a store's."""
    if "://" in str(location) or not Path(location).exists():
        return None
    path = Path(location).resolve()
    if inside := next((p for p in path.parents if exists(p)), None):
        return f"it lies inside the store {inside}"
    if path.is_file() and path.name.endswith((".csv", ".csv.gz")):
        return f"it is a manifest: `fercache extract {location} --encoder ... --out STORE.zarr` makes a store of it"
    if path.is_file() and path.suffix in (".h5", ".hdf5"):
        return ("it is an HDF5 file, as `fercache export` writes for other "
                "tools; fercache reads the store (.zarr) itself")
    if path.is_dir() and (stores := sorted(p.name for p in path.iterdir() if (p / "zarr.json").is_file()
                                           and exists(p))):
        return ("it is a folder of stores "
                f"({', '.join(stores[:5])}{', ...' if len(stores) > 5 else ''}): pass one of them")
    configs = [path / "config.json"] if (path / "head.pt").is_file() else sorted(path.glob("*/config.json"))[:1]
    try:
        trained_on = json.loads(configs[0].read_text())["store"] if configs else None
    except (OSError, ValueError, KeyError):
        return None
    if trained_on:
        return f"it {'is a run' if configs[0].parent == path else 'holds runs'} trained on the store {trained_on}"
    return None


def open_store(location: str | Path, mode: str = "r") -> FeatureStore:
    """Open an existing store, checking its format and schema version."""
    if not exists(location):
        if what := _what_is_there(location):
            raise StoreError(f"no fercache store at {location}: {what}")
        hint = near_path(location, lambda p: p.is_dir() and p.name.endswith(".zarr"))
        raise StoreError(f"no fercache store at {location}{hint}; create one with `fercache extract`")
    g = _zarr().open_group(_plain(location), mode=mode)
    meta = g.attrs["fercache"]
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{location} has store schema {meta.get('schema_version')}, this fercache reads "
                         f"{SCHEMA_VERSION}; re-extract with `fercache extract ... --overwrite`")
    _check_fingerprint(location, meta)
    return FeatureStore(str(location), g)


FINGERPRINT_KEYS = ("schema_version", "encoder", "manifest_sha256", "n_rows", "chunk_rows", "dtype", "key")
ENCODER_KEYS = ("name", "pretrained", "weights_sha256", "preprocess", "outputs")


def _check_fingerprint(location, meta: dict) -> None:
    """A fingerprint with a key missing, or edited so that its `key` no longer hashes what it says, describes
    no store fercache wrote: refused here, not a KeyError later or a store taken for another."""
    fp = meta.get("fingerprint")
    missing = [k for k in FINGERPRINT_KEYS if not isinstance(fp, dict) or k not in fp]
    if not missing:
        enc = fp["encoder"]
        missing = [f"encoder.{k}" for k in ENCODER_KEYS if not isinstance(enc, dict) or k not in enc]
    if not missing and "default_output" not in meta:
        missing = ["default_output"]
    if missing:
        raise StoreError(f"{location}: its metadata lacks {', '.join(missing)}; it is damaged or was not written by "
                         "fercache: extract it again with --overwrite")
    ident = {k: v for k, v in fp.items() if k not in ("key", "versions")}
    if hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest() != fp["key"]:
        raise StoreError(f"{location}: its fingerprint was edited (its key no longer matches its contents), so what "
                         "the features were made from cannot be trusted: extract it again with --overwrite")


def _without_weights_name(fp: dict) -> dict:
    return {**{k: v for k, v in fp.items() if k not in ("key", "versions")},
            "encoder": {k: v for k, v in fp["encoder"].items() if k != "pretrained"}}


def check_compatible(store: FeatureStore, fingerprint: dict) -> None:
    """Refuse to resume or reuse a store built from other inputs. The name the weights go by is not an input: the
    same file renamed, or a hub tag and a local copy of its file (the same sha256), encode the same features."""
    if store.fingerprint["key"] != fingerprint["key"] and (
            _without_weights_name(store.fingerprint) != _without_weights_name(fingerprint)):
        raise StoreError(
            f"{store.location} was built from other inputs "
            f"({_diff(store.fingerprint, fingerprint)}). Rebuild it with `fercache extract ... "
            "--overwrite` (in a pipeline step: `overwrite = true`), or write to a new --out path."
        )


def _entries(location: str) -> list[str]:
    """Names at `location` (a local path, or an fsspec URL); [] when nothing is there."""
    location = _plain(location)
    if "://" in location:
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return [str(e).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)] if fs.exists(path) else []
    path = Path(location)
    return [c.name for c in path.iterdir()] if path.is_dir() else [path.name] if path.exists() else []


#: What `create` makes before it writes the metadata (last): a group holding only these, without metadata, is a
#: creation that was killed, and creating again replaces it without --overwrite (nothing but empty arrays is lost).
STORE_ARRAYS = {"sample_id", "features", "ok", "error", "done", CHECKSUMS, "clip_id", "frame_idx"}


def _creation_cut_short(location: str) -> bool:
    try:
        g = _zarr().open_group(_plain(location), mode="r")
        return not dict(g.attrs) and set(g.keys()) <= STORE_ARRAYS
    except Exception:  # not a zarr group at all
        return False


def check_location(location: str, overwrite: bool) -> None:
    """A store is created by emptying its location (zarr mode "w"): refuse when that would delete anything but a
    fercache store; another zarr group (or a store whose creation died before its metadata) only with --overwrite."""
    if "://" not in location:
        check_out_file(location, folder_ok=True)
    entries = _entries(location)
    if not entries or exists(location) or ("zarr.json" in entries and overwrite) or _creation_cut_short(location):
        return
    if "zarr.json" in entries:
        raise StoreError(f"{location} is a zarr group but not a fercache store; pass --overwrite to replace it")
    raise StoreError(f"{location} exists and is not a feature store ({len(entries)} entries, e.g. "
                     f"{', '.join(sorted(entries)[:3])}); creating a store there would delete them: choose another "
                     "--out (a new folder, e.g. STORE.zarr)")


STORE_BUSY = ("{location} is being written by another extract ({holder}); wait for it (the same command then finds "
              "the store complete), or stop it (its chunks are kept, and the same command resumes them)")


@contextlib.contextmanager
def writing(location: str | Path, busy: str = STORE_BUSY, lock_file: Path | None = None, transient: bool = False):
    """Hold a lock while this process writes the local store (or run folder) at `location`, so a second `extract`
    of it fails at once instead of wiping the store it is creating (zarr mode "w") or encoding the same chunks
    twice. The lock is `.NAME.lock` beside it, on its real path (a symlinked spelling shares it), released by the
    OS when the process ends, however it ends; the file stays (deleting it could let two processes lock two
    files). `busy`: the error, formatted with {location} and {holder}; `lock_file`: another lock file (a run
    folder's own `.lock`); `transient`: remove it before releasing it, so a finished run folder holds only the
    run (a process opening it in the instant between the two could lock the removed file)."""
    lock = _lock(_plain(location), busy, lock_file)
    try:
        yield
    finally:
        if lock is not None:
            _HELD.remove(lock)
            if transient:
                Path(lock.name).unlink(missing_ok=True)
            lock.close()


#: Lock files this process holds. A forked child (a decode worker) closes its copies at start: a flock belongs to
#: the open file, so orphaned workers of a killed extract would otherwise keep the store locked.
_HELD: list = []


def close_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock files (the parent's locks stay held)."""
    for f in _HELD:
        f.close()
    _HELD.clear()


def _lock_path(location: str) -> Path:
    path = Path(os.path.realpath(location))
    return path.parent / f".{path.name}.lock"


def writer(location: str | Path) -> str | None:
    """Who is writing the local store at `location` now ("pid N on HOST, since T"); "" when no extract on this
    machine is; None when that cannot be told (a URL, no /proc/locks). Read from /proc/locks, never by taking the
    lock, so it cannot get in a starting writer's way."""
    location = _plain(location)
    if "://" in location:
        return None
    lock = _lock_path(location)
    try:
        held = Path("/proc/locks").read_text()
    except OSError:
        return None
    try:
        st = lock.stat()
    except OSError:
        return ""  # never locked: written before locks, or by torchrun ranks
    key = f" {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    if not any("FLOCK" in line and key in line for line in held.splitlines()):
        return ""
    return lock.read_text().strip() or "unknown process"


def _lock(location: str, busy: str = STORE_BUSY, lock_file: Path | None = None):
    """The open, locked lock file of a local store, or None where no lock can be had: fsspec URLs, platforms
    without flock, a read-only folder of finished stores, filesystems without locks (some NFS mounts)."""
    try:
        import fcntl
    except ImportError:
        return None
    if "://" in location:
        return None
    path = lock_file or _lock_path(location)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown process"
        f.close()
        raise StoreError(busy.format(location=location, holder=holder)) from None
    except OSError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _HELD.append(f)
    return f


def create(location: str | Path, fingerprint: dict, sample_ids: list[str], default_output: str,
           manifest_name: str = "", video: dict[str, list] | None = None, overwrite: bool = False,
           encoder_args: dict | None = None, data_root: str = "") -> FeatureStore:
    """Pre-allocate a store for all rows; refuses to replace an existing one unless `overwrite`."""
    zarr = _zarr()
    location = _plain(location)
    if exists(location) and not overwrite:
        raise StoreError(f"{location} already exists; pass --overwrite to replace it")
    check_location(location, overwrite)
    if overwrite and Path(location).exists():
        shutil.rmtree(location)
    g = zarr.open_group(location, mode="w")  # empties the location: check_location made sure it holds no one's files
    n, rows = fingerprint["n_rows"], fingerprint["chunk_rows"]
    inner = fingerprint.get("read_chunk_rows")
    # A zarr chunk never spans more rows than the store has: zarr allocates and writes whole chunks, so --chunk-rows
    # 10M over 72 rows cost gigabytes of fill values. The fingerprint keeps chunk_rows, so chunks are numbered as ever.
    rows = min(rows, n) if not inner else min(rows, -(-n // inner) * inner)
    g.create_array("sample_id", shape=(n,), dtype=str, chunks=(rows,))[:] = np.asarray(sample_ids, dtype=str)
    for name, dim in fingerprint["encoder"]["outputs"].items():
        # float16 features barely compress; skipping the codec keeps reads and writes cheap. A sharded
        # store writes each chunk as one shard object: a rank always writes whole shards, never part of one.
        layout = {"chunks": (inner, dim), "shards": (rows, dim)} if inner else {"chunks": (rows, dim)}
        g.create_array(f"features/{name}", shape=(n, dim), dtype="float16", fill_value=np.nan, compressors=None,
                       **layout)
    g.create_array("ok", shape=(n,), dtype=bool, chunks=(rows,), fill_value=False)
    g.create_array("error", shape=(n,), dtype=str, chunks=(rows,))
    n_chunks = -(-n // fingerprint["chunk_rows"])
    g.create_array("done", shape=(n_chunks,), dtype=bool, chunks=(1,), fill_value=False)
    g.create_array(CHECKSUMS, shape=(n_chunks,), dtype=str, chunks=(1,))
    for name, values in (video or {}).items():
        dtype = "int64" if name == "frame_idx" else str
        g.create_array(name, shape=(n,), dtype=dtype, chunks=(rows,))[:] = np.asarray(values, dtype=dtype)
    g.attrs["fercache"] = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "complete": False, "fingerprint": fingerprint,
        "default_output": default_output, "manifest": manifest_name,
        # How to rebuild the encoder (text tower, predict): the arguments as given (a config path, a weights file).
        "encoder_args": encoder_args or {},
        # Where the images were read (not fingerprinted: a moved dataset is the same data), so drawing a store's
        # images later (evaluate --errors, near-dups' pairs) needs no --data-root from another folder.
        "data_root": data_root,
    }
    return FeatureStore(location, g)


def export_h5(location: str | Path, to: str | Path, overwrite: bool = False, progress: bool = False) -> Path:
    """Copy a complete store's arrays and fingerprint to one HDF5 file (for tools that read HDF5).

    Features are copied one store chunk at a time, so memory does not grow with the store. An existing file is
    replaced only when it is an earlier export of this same store, or with `overwrite`.
    """
    store = open_store(location).require_complete()
    to = Path(to)
    if to.is_dir():  # --overwrite cannot mean "replace this folder" (the store itself, a results folder) by a file
        raise StoreError(f"--to {to} is a folder; --to names the HDF5 file to write, e.g. "
                         f"{to.resolve() / (store_name(location) + '.h5')}")
    check_out_file(to, "--to")
    if to.exists() and not overwrite:
        _refuse_other_file(to, store.fingerprint)
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.with_name(to.name + ".tmp")
    try:
        _write_h5(store, tmp, progress)
    except BaseException:  # a failed or interrupted export leaves no half file behind
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(to)
    return to


def _write_h5(store: FeatureStore, tmp: Path, progress: bool) -> None:
    import h5py
    from tqdm.auto import tqdm

    bar = tqdm(total=store.n_chunks * len(store.outputs), desc="export", unit="chunk", disable=not progress)
    with h5py.File(tmp, "w") as f, bar:
        for name, dim in store.outputs.items():
            src = store.group[f"features/{name}"]
            dst = f.create_dataset(f"features/{name}", shape=(store.n_rows, dim), dtype=np.float16, chunks=True)
            for i in range(store.n_chunks):
                dst[store.chunk_slice(i)] = src[store.chunk_slice(i)]
                bar.update()
        f.create_dataset("sample_id", data=store.sample_ids(), dtype=h5py.string_dtype())
        f.create_dataset("ok", data=store.ok())
        f.create_dataset("error", data=_strings(store.read("error")), dtype=h5py.string_dtype())
        if "clip_id" in store.group:  # a video store: which frames make a clip, in order
            f.create_dataset("clip_id", data=_strings(store.read("clip_id")), dtype=h5py.string_dtype())
            f.create_dataset("frame_idx", data=store.read("frame_idx"))
        f.attrs["fercache"] = json.dumps(store.meta)


def _refuse_other_file(path: Path, fingerprint: dict) -> None:
    """Raise unless `path` is an HDF5 export of the store with this fingerprint (derived data, safe to redo)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            theirs = json.loads(f.attrs["fercache"]).get("fingerprint")
    except (OSError, KeyError, ValueError):
        theirs = "not an export"
    if theirs != fingerprint:
        what = "an export of another store" if isinstance(theirs, dict) else "not a fercache export"
        raise StoreError(f"{path} exists and is {what}; choose another --to, or pass --overwrite to replace it")
