"""Resumable extraction: read (worker processes) -> encode (device) -> write (a writer thread), per chunk.

A chunk of the store is the unit of work, of resume and of distribution: a
chunk is either fully written and flagged done, or recomputed. Under
torchrun each rank takes every WORLD_SIZE-th pending chunk of one store that
rank 0 created, so the result equals a single-process run.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import store as S
from .devices import barrier, dist_rank_world, rank_device
from .encoders import Encoder, check_encoder_name, load_encoder, missing_weights
from .errors import ConfigError, EncoderError, StoreError, repeated
from .manifests import Manifest, content_sha256, data_root, read_manifest, resolve_paths
from .preprocess import NORMALIZE, VIEWS, decode_image, to_model_input, with_views

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    """What one `extract` call did."""

    store: str
    rows: int
    chunks_computed: int
    n_ok: int | None
    n_failed: int | None
    seconds: float
    images_per_s: float
    already_complete: bool = False
    images: int = 0
    decode_worker_seconds: float = 0.0  # summed busy time of the decode workers (input-pipeline capacity)


def pieces(chunks: list[int], chunk_rows: int, read_rows: int, n_rows: int) -> list[tuple[int, range]]:
    """(chunk, rows) work items: each chunk cut into read_rows pieces (a sharded store's inner chunks)."""
    out = []
    for c in chunks:
        end = min((c + 1) * chunk_rows, n_rows)
        out += [(c, range(a, min(a + read_rows, end))) for a in range(c * chunk_rows, end, read_rows)]
    return out


def packed(values) -> np.ndarray:
    """Strings as one fixed-width bytes array. Forked decode workers index it without touching a per-row
    refcount, so its pages stay shared with the main process: a list of N Path/str objects is copied page by
    page into every worker as it is read (refcounts are writes), growing each worker's memory with the dataset."""
    return np.array([os.fsencode(str(v)) for v in values], dtype=bytes)


class ChunkReader(Dataset):
    """Item k = rows of piece `items[k]` decoded to uint8: a stacked [n,H,W,3] tensor when sizes agree, else a list.

    A piece is a whole chunk, or one inner chunk of a sharded chunk; `last` marks a chunk's final piece.
    `paths` and `bboxes` are `packed` arrays.
    """

    def __init__(self, paths: np.ndarray, bboxes: np.ndarray, items: list[tuple[int, range]], size: int):
        self.paths, self.bboxes, self.items, self.size = paths, bboxes, items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict:
        t0 = time.perf_counter()
        c, rows = self.items[k]
        last = k + 1 == len(self.items) or self.items[k + 1][0] != c
        images, ok, error = [], [], []
        for r in rows:
            try:
                images.append(decode_image(os.fsdecode(self.paths[r]), os.fsdecode(self.bboxes[r]), self.size))
                ok.append(True)
                error.append("")
            except Exception as e:  # any decode failure is recorded for that row, never fatal
                images.append(None)
                ok.append(False)
                error.append(f"{type(e).__name__}: {e}"[:300])
        good = [im for im in images if im is not None]
        if good and all(im.shape == good[0].shape for im in good):
            good = torch.from_numpy(np.stack(good))  # one shared-memory tensor: cheap to ship between processes
        # worker_s: this worker's busy time for the chunk, so benchmarks can report per-worker capacity.
        return {"chunk": c, "last": last, "images": good, "ok": np.array(ok, dtype=bool), "error": error,
                "rows": np.arange(rows.start, rows.stop),
                "worker_s": time.perf_counter() - t0}


def _as_is(item):
    """Collate that keeps numpy arrays as they are (the default turns them into tensors)."""
    return item


def _start_worker(_worker_id: int) -> None:
    """A decode worker leaves Ctrl-C to the main process: Ctrl-C reaches the whole process group, and a worker that
    stopped on it left its queue's feeder thread blocked on a pipe nobody read (the DataLoader waited 5 s per worker
    before killing it); left running, workers see the loader's shutdown and exit at once. It also closes its copy
    of the store's lock file, so workers outliving a killed extract do not keep the store locked."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    S.close_inherited_locks()


def resolved_precision(device: torch.device, precision: str) -> str:
    """`auto` made definite: bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def amp_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype the encoder computes in."""
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
            "bf16-weights": torch.bfloat16}[resolved_precision(device, precision)]


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters()), torch.float32)  # the null encoder has none


def compute_in(model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    """The context a forward pass runs in: autocast to `dtype` for fp32 weights (`bf16`, `fp16`: matrix products
    in half precision, layer norms and softmax kept in fp32), nothing when the weights are in `dtype` already
    (`fp32`, or `bf16-weights`: every op in bf16, 1.45x autocast's speed for ViT-B/16 on an H200)."""
    if dtype == torch.float32 or weights_dtype(model) == dtype:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def open_or_create(out: str, encoder: Encoder, manifest: Manifest, chunk_rows: int, overwrite: bool,
                   rank: int = 0, world: int = 1, manifest_path: str = "", encoder_args: dict | None = None,
                   read_chunk_rows: int | None = None, data_root: str = "") -> S.FeatureStore:
    """The store to fill: a new one, or an existing one with the same fingerprint (resume / no-op)."""
    fp = S.make_fingerprint(encoder.identity(), content_sha256(manifest), len(manifest), chunk_rows, read_chunk_rows)
    if rank == 0:
        if S.exists(out) and not overwrite:
            store = S.open_store(out, mode="r+")
            S.check_compatible(store, fp)
        else:
            video = {c: manifest.column(c) for c in ("clip_id", "frame_idx") if c in manifest.columns}
            if "frame_idx" in video:
                video["frame_idx"] = [int(v or -1) for v in video["frame_idx"]]
            store = S.create(out, fp, manifest.column("sample_id"), encoder.default_output,
                             manifest_name=manifest_path, video=video, overwrite=overwrite, encoder_args=encoder_args,
                             data_root=data_root)
    barrier(world)
    return store if rank == 0 else S.open_store(out, mode="r+")


def encode_chunk(item: dict, encoder: Encoder, device: torch.device, batch_size: int, dtype: torch.dtype,
                 on_batch: Callable[[int], object] | None = None) -> Callable[[], dict[str, np.ndarray]]:
    """Encode the decoded images of one piece in batches; returns `finish()` -> features (failed rows NaN).
    `on_batch(n)` after each batch of n images: progress that moves within a chunk of a thousand rows.

    Outputs stay on the device until the piece is done: one device->host copy per piece, not per batch.
    On CUDA that copy goes non-blocking into pinned memory behind an event, and `finish()` (called by the
    writer thread) waits for it, so the main thread goes straight on to queue the next piece's kernels.
    """
    ok, images = item["ok"], item["images"]
    good = np.flatnonzero(ok)
    rows = torch.as_tensor(item["rows"][good])  # manifest rows: what the random views are seeded by
    autocast = compute_in(encoder.model, device, dtype)
    channels_last = encoder.channels_last or device.type == "cuda"
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in encoder.stored_outputs()}
    with torch.inference_mode():
        with autocast:
            for start in range(0, len(good), batch_size):
                x = to_model_input(images[start:start + batch_size], encoder.preprocess, device, dtype, channels_last)
                for view, xi in with_views(x, encoder.views, encoder.preprocess, rows[start:start + batch_size]):
                    for k, v in encoder.model(xi).items():
                        parts[f"{k}.{view}" if view else k].append(v.to(torch.float16))
                if on_batch:
                    on_batch(len(x))
        # Outside autocast: it casts cat's inputs to its own dtype, and under bf16 (the CUDA default) float16
        # inputs are neither that nor float32, so cat raised "Unexpected floating ScalarType".
        staged = {k: _to_host(torch.cat(v), device) if v else None for k, v in parts.items()}
    event = None
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record()

    def finish() -> dict[str, np.ndarray]:
        if event is not None:
            event.synchronize()
        feats = {}
        for k, d in encoder.stored_outputs().items():
            out = np.full((len(ok), d), np.nan, dtype=np.float16)
            if staged[k] is not None:
                out[good] = staged[k].numpy()
            feats[k] = out
        fail_non_finite(feats, ok, item["error"])
        return feats

    return finish


def fail_non_finite(feats: dict[str, np.ndarray], ok: np.ndarray, error: list[str]) -> None:
    """Mark rows whose features hold NaN or Inf as failed, in place: a model that overflowed (float16's largest
    value is 65504) or a broken input gives numbers no head can learn from, and stored `ok` they poisoned training."""
    bad = np.zeros(len(ok), dtype=bool)
    for name, f in feats.items():
        bad_here = ok & ~bad & ~np.isfinite(f).all(axis=1)
        for i in np.flatnonzero(bad_here):
            error[i] = (f"non-finite features (NaN or Inf) in output {name!r}: the encoder overflowed on this image "
                        "(in fp16/bf16, try --precision fp32)")
        bad |= bad_here
    ok &= ~bad


def _to_host(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t.cpu()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # from torch's caching host allocator
    return host.copy_(t, non_blocking=True)


class _Writer(threading.Thread):
    """Writes finished chunks while the next ones are encoded; re-raises its error on `close()`."""

    def __init__(self, store: S.FeatureStore):
        super().__init__(daemon=True)
        self.store, self.q, self.error = store, queue.Queue(maxsize=4), None

    def run(self) -> None:
        while (job := self.q.get()) is not None:
            try:
                if self.error is None:
                    chunk, pieces = job
                    self.store.write_chunk(chunk, *_join([(finish(), ok, err) for finish, ok, err in pieces]))
            except BaseException as e:  # surfaced in the main thread by close()
                self.error = e

    def put(self, job) -> None:
        if self.error:
            raise self.error
        self.q.put(job)

    def close(self) -> None:
        self.q.put(None)
        self.join()
        if self.error:
            raise self.error


def _malloc_trim() -> Callable[[int], object]:
    """glibc's malloc_trim, or a no-op elsewhere (macOS, musl)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda *_: None


def run_chunks(store: S.FeatureStore, encoder: Encoder, paths: np.ndarray, bboxes: np.ndarray, chunks: list[int],
               device: torch.device, batch_size: int, workers: int, dtype: torch.dtype, progress: bool) -> tuple[int,
                                                                                                                 float]:
    """Decode, encode and write `chunks`; returns (images processed, summed decode-worker busy seconds)."""
    from tqdm.auto import tqdm

    reader = ChunkReader(paths, bboxes, pieces(chunks, store.chunk_rows, store.read_chunk_rows, store.n_rows),
                         encoder.preprocess.size)
    loader = DataLoader(reader, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                        persistent_workers=False, worker_init_fn=_start_worker if workers else None)
    total = sum(store.chunk_slice(c).stop - store.chunk_slice(c).start for c in chunks)
    writer = _Writer(store)
    writer.start()
    done, worker_s, parts, trim = 0, 0.0, [], _malloc_trim()
    with tqdm(total=total, unit="img", desc="extract", disable=not progress, smoothing=0.1) as bar:
        try:
            for item in loader:  # in order: the pieces of a chunk arrive one after another
                encoded = encode_chunk(item, encoder, device, batch_size, dtype, bar.update)
                parts.append((encoded, item["ok"], item["error"]))
                # Hand the batch tensors' freed memory back to the OS: glibc keeps blocks below its (self-raising,
                # up to 32 MiB) mmap threshold in heaps it seldom shrinks, so without this the main process grew
                # with the run (steady-state RSS 885 -> 1,199 MiB from 30k to 200k images). ~8 ms per 1,024 rows.
                trim(0)
                if item["last"]:  # the chunk (a whole shard, when sharded) is complete: write it as one unit
                    writer.put((item["chunk"], parts))
                    parts = []
                done += len(item["ok"])
                worker_s += item["worker_s"]
                bar.update(len(item["ok"]) - int(np.count_nonzero(item["ok"])))  # its failed rows
        finally:
            writer.close()
    return done, worker_s


def _join(parts: list[tuple[dict, np.ndarray, list[str]]]) -> tuple[dict, np.ndarray, list[str]]:
    """One chunk's (features, ok, error) from its pieces."""
    if len(parts) == 1:
        return parts[0]
    feats = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    return feats, np.concatenate([p[1] for p in parts]), [e for p in parts for e in p[2]]


def _check_root(store: S.FeatureStore, base: Path, out) -> None:
    """A resume reads images under the root the written chunks were read from. Another root that exists would
    mix two folders' images in one store (a FER2013 subset beside the full set, say), so it is refused; one that
    is gone is a dataset moved, taken with a warning, and recorded beside the first."""
    roots = store.meta.get("data_roots") or [r for r in [store.meta.get("data_root")] if r]
    done = store.n_chunks - len(store.pending_chunks())
    if not done or not roots or str(base) == roots[-1]:
        return
    if Path(roots[-1]).is_dir():
        raise StoreError(f"{out}: its {done} written chunk(s) were read under --data-root {roots[-1]}; resuming under "
                         f"{base} would mix images of two folders in one store. Pass --data-root {roots[-1]}, or "
                         "--overwrite to start again under the new root")
    log.warning("%s: its %d written chunk(s) were read under %s, which is gone; the rest are read under %s (a moved "
                "dataset must hold the same files)", out, done, roots[-1], base)
    store.group.attrs["fercache"] = {**store.meta, "data_root": str(base), "data_roots": [*roots, str(base)]}


def _note_precision(store: S.FeatureStore, precision: str, out) -> None:
    """Record the precision in the store; a resume in another one is said (e.g. begun on a CPU, where `auto` is
    fp32, and resumed on a GPU, where it is bf16), since its chunks then mix the two."""
    known = [p for p in store.note_precision(precision) if p != "not recorded"]  # an older store's: unknown
    if known and precision not in known:
        log.warning("%s was extracted in %s so far and is continued in %s: its features mix the two (within "
                    "tolerance of each other); `--precision %s` keeps one, `--overwrite` starts again",
                    out, " and ".join(known), precision, known[-1])


def ready(enc: Encoder, views, dev: torch.device, precision: str = "auto") -> Encoder:
    """The encoder on `dev` (channels-last on CUDA or where the encoder asks for it; its weights in bf16 for
    `bf16-weights`), with `views` to extract."""
    enc.views = tuple(views)
    enc.model.to(dev, torch.bfloat16 if precision == "bf16-weights" else None)
    if enc.channels_last or dev.type == "cuda":
        enc.model.to(memory_format=torch.channels_last)
    return enc


PRECISIONS = ("auto", "fp32", "fp16", "bf16", "bf16-weights")


def check_options(batch_size: int, workers: int | None, chunk_rows: int, precision: str, image_size: int | None,
                  views=(), normalize: str = "checkpoint") -> None:
    """Refuse, before anything is read or created, what would otherwise fail mid-run inside range(), the
    DataLoader or a dict lookup, or mean something else than asked (image_size=0 read as the model's default; a view
    given twice fails the first chunk's write after the store exists)."""
    for v in views:
        VIEWS.lookup(v)  # an unknown view, named with the known ones
    twice = repeated(list(views))
    wrong = [f"--{name} {value}: {what}" for name, value, ok, what in [
        ("batch-size", batch_size, batch_size >= 1, "at least 1 image per forward pass"),
        ("workers", workers, workers is None or workers >= 0, "0 (decode in this process) or more worker processes"),
        ("chunk-rows", chunk_rows, chunk_rows >= 1, "at least 1 row per store chunk"),
        ("precision", precision, precision in PRECISIONS, ", ".join(PRECISIONS)),
        ("image-size", image_size, image_size is None or image_size >= 1, "leave it out for the model's own size, "
                                                                          "or give pixels >= 1"),
        ("views", ",".join(views), not twice, f"{', '.join(twice)} given twice; each view is cached once"),
        ("normalize", normalize, normalize in NORMALIZE, ", ".join(NORMALIZE)),
    ] if not ok]
    if wrong:
        raise ConfigError("; ".join(wrong))


def _say_failures(store, out) -> None:
    """Rows whose image could not be read are kept as failed (never silently dropped): said once, with an example,
    since every one of them is missing from training and scoring; all of them failing is a wrong input, not bad luck."""
    failed = store.errors()
    if failed:
        sid, why = next(iter(failed.items()))
        log.warning("%d of %d images could not be read (e.g. %s: %s); their rows are marked failed and left out of "
                    "training and scoring%s; `fercache info %s` lists them", len(failed), store.n_rows, sid, why,
                    ": every row failed" if len(failed) == store.n_rows else "", out)


def extract(manifest_path: str | Path, encoder: str, out: str | Path, *, pretrained: str | None = None,
            image_size: int | None = None, root: str | Path | None = None, device: str = "cpu",
            batch_size: int = 256, workers: int | None = None, chunk_rows: int = 1024, precision: str = "auto",
            overwrite: bool = False, progress: bool = True, encoder_obj: Encoder | None = None,
            read_chunk_rows: int | None = None, views: list[str] | tuple[str, ...] = (),
            preprocess_tag: str | None = None, normalize: str = "checkpoint") -> ExtractResult:
    """Encode every manifest row once into a fingerprinted store at `out`; resumes an interrupted one.

    `views` (e.g. ["flip"]) also stores each output of each augmented view, as "<output>.<view>".
    `preprocess_tag`: for a local open_clip weights file, the pretrained tag whose preprocessing it needs.
    `normalize`: the checkpoint's own pixel statistics, or `clip`/`imagenet` ones (a published recipe's choice).
    """
    t0 = time.perf_counter()
    check_options(batch_size, workers, chunk_rows, precision, image_size, views, normalize)
    rank, world = dist_rank_world()
    dev = rank_device(device, rank, world)  # before any reading: a wrong --device fails in a second
    if encoder_obj is None:  # likewise: a misspelt model or missing weights, before a 10M-row manifest is read
        check_encoder_name(encoder)
        if why := missing_weights(encoder, pretrained):
            raise EncoderError(why)
    with S.writing(out) if world == 1 else nullcontext():  # torchrun ranks share one store by design
        if rank == 0:
            S.check_location(str(out), overwrite)  # before the encoder loads: never create a store over someone's files
        manifest = read_manifest(manifest_path)
        base = data_root(root)
        paths, bboxes = packed(resolve_paths(manifest, base)), packed(manifest.column("bbox"))
        built = encoder_obj or load_encoder(encoder, pretrained=pretrained, image_size=image_size,
                                            preprocess_tag=preprocess_tag, normalize=normalize)
        enc = ready(built, views, dev, precision)
        args = {"spec": encoder, "pretrained": pretrained, "image_size": image_size}
        args |= {k: v for k, v in (("preprocess_tag", preprocess_tag), ("normalize", normalize))
                 if v not in (None, "checkpoint")}  # rebuilt by encoders.encoder_of
        store = open_or_create(str(out), enc, manifest, chunk_rows, overwrite, rank, world,
                               manifest_path=str(Path(manifest_path).resolve()), encoder_args=args,
                               read_chunk_rows=read_chunk_rows, data_root=str(base))
        del manifest  # its rows (~0.6 KB each as dicts) are not needed past the fingerprint and the store's ids
        if store.complete:
            log.info("%s is complete and matches; nothing to do", out)
            return ExtractResult(str(out), store.n_rows, 0, store.meta.get("n_ok"), store.meta.get("n_failed"),
                                 time.perf_counter() - t0, 0.0, already_complete=True)
        if rank == 0:  # rank 0 owns the metadata
            _check_root(store, base, out)
            _note_precision(store, resolved_precision(dev, precision), out)
        mine = [c for c in store.pending_chunks() if c % world == rank]
        n_workers = min(4, os.cpu_count() or 1) if workers is None else workers
        t1 = time.perf_counter()
        try:
            done, worker_s = run_chunks(store, enc, paths, bboxes, mine, dev, batch_size, n_workers,
                                        amp_dtype(dev, precision), progress and rank == 0)
        except KeyboardInterrupt:
            saved = store.n_chunks - len(store.pending_chunks())
            log.warning("interrupted: %d of %d chunks of %s are written and kept; the same command resumes from there",
                        saved, store.n_chunks, out)
            raise
        seconds = time.perf_counter() - t1
        barrier(world)
        n_ok = None
        if rank == 0:
            n_ok = int(store.ok().sum())
            store.mark_complete(n_ok)
            _say_failures(store, out)
        return ExtractResult(str(out), store.n_rows, len(mine), n_ok, None if n_ok is None else store.n_rows - n_ok,
                             time.perf_counter() - t0, done / seconds if seconds > 0 else 0.0, images=done,
                             decode_worker_seconds=worker_s)
