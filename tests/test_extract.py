"""Extraction into stores: layout, fingerprint, resume after SIGKILL, refusal of foreign stores, corrupt images."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from fercache import store as S
from fercache.errors import StoreError
from fercache.extract import extract
from fercache.manifests import Manifest, read_manifest, write_manifest


def _arrays(location) -> dict[str, np.ndarray]:
    st = S.open_store(location)
    out = {f"features/{k}": st.group[f"features/{k}"][:] for k in st.outputs}
    out.update(ok=st.ok(), sample_id=st.sample_ids(), done=st.group["done"][:])
    return out


def _assert_same_store(a, b):
    xa, xb = _arrays(a), _arrays(b)
    assert xa.keys() == xb.keys()
    for k in xa:
        assert np.array_equal(xa[k], xb[k], equal_nan=k.startswith("features")), k
    ma, mb = S.open_store(a).meta, S.open_store(b).meta
    assert ma["fingerprint"]["key"] == mb["fingerprint"]["key"] and ma["complete"] and mb["complete"]


def test_store_layout_and_fingerprint(tiny_store, tiny_manifest):
    st = S.open_store(tiny_store).require_complete()
    m = read_manifest(tiny_manifest)
    assert st.n_rows == len(m) == 72 and st.n_chunks == 5
    assert set(st.outputs) == {"pooled", "embedding"} and st.outputs["embedding"] == 32 and st.outputs["pooled"] == 64
    assert list(st.sample_ids()) == m.column("sample_id")
    emb = st.features("embedding")
    assert emb.shape == (72, 32) and np.isfinite(emb).all()
    assert st.group["features/embedding"].dtype == np.float16
    # raw, not L2-normalised
    assert not np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-2)
    fp = st.fingerprint
    assert fp["schema_version"] == S.SCHEMA_VERSION and len(fp["manifest_sha256"]) == 64
    assert fp["encoder"]["name"] == "open_clip:fercache-tiny-vit" and fp["encoder"]["preprocess"]["size"] == 32
    assert {"torch", "zarr", "open_clip_torch"} <= set(fp["versions"])


def test_pooled_projects_to_embedding(tiny_store, tiny_encoder_spec):
    """The stored embedding is the stored pooled feature times the CLIP projection (raw, pre-normalisation)."""
    from fercache.encoders import load_encoder

    st = S.open_store(tiny_store)
    proj = load_encoder(tiny_encoder_spec).model.visual.proj.detach().numpy()
    np.testing.assert_allclose(st.features("pooled") @ proj, st.features("embedding"), rtol=0.02, atol=0.02)


def test_complete_store_is_a_no_op(tiny_store, tiny_manifest, tiny_dataset, tiny_encoder_spec):
    r = extract(tiny_manifest, tiny_encoder_spec, tiny_store, root=tiny_dataset, chunk_rows=16, workers=0,
                progress=False)
    assert r.already_complete and r.chunks_computed == 0


def test_foreign_manifest_is_refused(tiny_store, tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path):
    m = read_manifest(tiny_manifest)
    m.rows = m.rows[:-1]
    other = write_manifest(m, tmp_path / "other.csv")
    with pytest.raises(StoreError, match=r"manifest sha256 .* --overwrite"):
        extract(other, tiny_encoder_spec, tiny_store, root=tiny_dataset, chunk_rows=16, workers=0, progress=False)


def test_foreign_encoder_is_refused_and_overwrite_rebuilds(tiny_store, tiny_manifest, tiny_dataset, tiny_encoder_spec,
                                                           tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    with pytest.raises(StoreError, match=r"encoder open_clip:fercache-tiny-vit .* size 32\) vs .*size 48"):
        extract(tiny_manifest, tiny_encoder_spec, copy, image_size=48, root=tiny_dataset, chunk_rows=16, workers=0,
                progress=False)
    r = extract(tiny_manifest, tiny_encoder_spec, copy, image_size=48, root=tiny_dataset, chunk_rows=16, workers=0,
                progress=False, overwrite=True)
    assert r.n_ok == 72 and S.open_store(copy).fingerprint["encoder"]["preprocess"]["size"] == 48


def test_relabelling_does_not_invalidate(tiny_store, tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path):
    m = read_manifest(tiny_manifest)
    for r in m.rows:
        r["label"] = "neutral"
    relabelled = write_manifest(m, tmp_path / "relabelled.csv")
    r = extract(relabelled, tiny_encoder_spec, tiny_store, root=tiny_dataset, chunk_rows=16, workers=0, progress=False)
    assert r.already_complete


def test_corrupt_image_is_recorded_not_fatal(tiny_dataset, tiny_manifest, tiny_encoder_spec, tmp_path, caplog):
    root = tmp_path / "root"
    shutil.copytree(tiny_dataset, root)
    bad = root / "faces" / "train" / "happy" / "train_happy_002.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" + os.urandom(64))
    with caplog.at_level("WARNING", logger="fercache.extract"):
        r = extract(tiny_manifest, tiny_encoder_spec, tmp_path / "s.zarr", root=root, chunk_rows=16, workers=2,
                    progress=False)
    assert (r.n_ok, r.n_failed) == (71, 1)
    # said once, as a warning (it shows under --quiet): a row missing from every head's training and scoring
    (said,) = [m for m in caplog.messages if "could not be read" in m]
    assert said.startswith("1 of 72 images could not be read (e.g. train/happy/train_happy_002: ")
    assert said.endswith(f"left out of training and scoring; `fercache info {tmp_path / 's.zarr'}` lists them")
    st = S.open_store(tmp_path / "s.zarr")
    errors = st.errors()
    assert (list(errors) == ["train/happy/train_happy_002"]
            and errors["train/happy/train_happy_002"].split(":")[0] in ("UnidentifiedImageError", "OSError"))
    i = list(st.sample_ids()).index("train/happy/train_happy_002")
    assert np.isnan(st.features()[i]).all() and np.isfinite(np.delete(st.features(), i, axis=0)).all()


def test_workers_do_not_change_features(tiny_store, tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path):
    extract(tiny_manifest, tiny_encoder_spec, tmp_path / "w2.zarr", root=tiny_dataset, chunk_rows=16, batch_size=8,
            workers=2, progress=False)
    _assert_same_store(tiny_store, tmp_path / "w2.zarr")


def test_bf16_weights_run_every_op_in_bf16_and_autocast_only_fp32_weights(tiny_manifest, tiny_dataset,
                                                                          tiny_encoder_spec, tmp_path):
    """bf16-weights is no relabelled autocast: its weights are bf16 (no autocast then), its store differs from
    bf16's, and both stay close to fp32's."""
    import torch

    from fercache.encoders import load_encoder
    from fercache.extract import compute_in, ready

    cpu = torch.device("cpu")
    enc = ready(load_encoder(tiny_encoder_spec), (), cpu, "bf16-weights")
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    assert compute_in(enc.model, cpu, torch.bfloat16).__class__.__name__ == "nullcontext"
    fp32 = ready(load_encoder(tiny_encoder_spec), (), cpu, "bf16")
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert isinstance(compute_in(fp32.model, cpu, torch.bfloat16), torch.autocast)
    stores = {}
    for precision in ("bf16", "bf16-weights"):
        stores[precision] = tmp_path / f"{precision}.zarr"
        extract(tiny_manifest, tiny_encoder_spec, stores[precision], root=tiny_dataset, chunk_rows=16, batch_size=8,
                workers=0, precision=precision, progress=False)
    a, b = (S.open_store(stores[p]).features("embedding") for p in stores)
    assert not np.array_equal(a, b)


def _reopen_chunk(location, chunk: int, drop_precisions: bool = False) -> None:
    """As if the run that wrote `location` had died before writing `chunk`."""
    st = S.open_store(location, mode="r+")
    st.group["done"][chunk] = False
    meta = {k: v for k, v in st.meta.items() if not (drop_precisions and k == "precisions")}
    st.group.attrs["fercache"] = {**meta, "complete": False}


def test_store_records_its_precision_and_a_resume_in_another_says_so(tiny_manifest, tiny_dataset, tiny_encoder_spec,
                                                                     tmp_path, caplog):
    from tests.test_cli import invoke

    out = tmp_path / "p.zarr"
    kw = dict(root=tiny_dataset, chunk_rows=16, batch_size=8, workers=0, progress=False)
    extract(tiny_manifest, tiny_encoder_spec, out, **kw)  # auto on CPU: fp32
    assert S.open_store(out).meta["precisions"] == ["fp32"]
    extract(tiny_manifest, tiny_encoder_spec, out, precision="bf16", **kw)  # complete: nothing computed, nothing noted
    assert S.open_store(out).meta["precisions"] == ["fp32"]
    _reopen_chunk(out, 2)
    with caplog.at_level("WARNING", logger="fercache.extract"):
        r = extract(tiny_manifest, tiny_encoder_spec, out, precision="bf16", **kw)
    assert r.chunks_computed == 1 and S.open_store(out).meta["precisions"] == ["fp32", "bf16"]
    assert "was extracted in fp32 so far and is continued in bf16" in caplog.text and "--precision fp32" in caplog.text
    shown = invoke("info", out)
    assert shown.exit_code == 0 and "precision  fp32 then bf16 (a resume mixed them)" in shown.output


def test_precision_of_a_store_from_before_it_was_recorded(tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path,
                                                          caplog):
    out = tmp_path / "old.zarr"
    kw = dict(root=tiny_dataset, chunk_rows=16, batch_size=8, workers=0, progress=False)
    extract(tiny_manifest, tiny_encoder_spec, out, **kw)
    _reopen_chunk(out, 0, drop_precisions=True)
    with caplog.at_level("WARNING", logger="fercache.extract"):
        extract(tiny_manifest, tiny_encoder_spec, out, **kw)
    assert S.open_store(out).meta["precisions"] == ["not recorded", "fp32"]
    assert "so far and is continued" not in caplog.text  # what the older chunks were computed in is not known
    for chunk in range(S.open_store(out).n_chunks):  # a run that died before its first chunk: its record is moot
        _reopen_chunk(out, chunk)
    extract(tiny_manifest, tiny_encoder_spec, out, precision="bf16", **kw)
    assert S.open_store(out).meta["precisions"] == ["bf16"]


def test_workers_started_by_forkserver_give_the_same_store(tiny_store, tiny_manifest, tiny_dataset, tiny_encoder_spec,
                                                             tmp_path):
    """Python 3.14 starts processes with forkserver on Linux (fork before): everything a decode worker gets must
    pickle, and the workers must not rely on inheriting the parent's memory."""
    script = ("import multiprocessing, sys; multiprocessing.set_start_method('forkserver', force=True); "
              "from fercache.extract import extract; "
              "extract(sys.argv[1], sys.argv[2], sys.argv[3], root=sys.argv[4], chunk_rows=16, batch_size=8, "
              "workers=2, progress=False)")
    out = tmp_path / "fs.zarr"
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_manifest), tiny_encoder_spec, str(out),
                           str(tiny_dataset)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_store(tiny_store, out)


def min_cosine(a, b, output: str = "embedding") -> float:
    """The lowest per-row cosine between two stores' features (float32 maths on the float16 features)."""
    x, y = (S.open_store(s).features(output).astype(np.float32) for s in (a, b))
    return float(((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)).min())


@pytest.mark.parametrize("precision", ["bf16", "fp16", "bf16-weights"])
def test_half_precision_extract_matches_fp32(tiny_store, tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path,
                                             precision):
    """bf16 is the CUDA default; under bf16 autocast, joining a piece's float16 outputs raised
    'Unexpected floating ScalarType in at::autocast::prioritize' (the same autocast rule on CPU and CUDA).
    bf16-weights casts the weights instead of autocasting."""
    r = extract(tiny_manifest, tiny_encoder_spec, tmp_path / "half.zarr", root=tiny_dataset, chunk_rows=16,
                batch_size=8, workers=0, precision=precision, progress=False)
    assert r.n_ok == 72
    assert min_cosine(tiny_store, tmp_path / "half.zarr") > 0.99
    assert not np.array_equal(S.open_store(tiny_store).features("embedding"),
                              S.open_store(tmp_path / "half.zarr").features("embedding"))  # half precision ran


KILLER = textwrap.dedent("""
    import os, signal, sys, time
    from fercache import store as S
    from fercache.encoders import load_encoder
    from fercache.extract import extract
    enc = load_encoder(sys.argv[2])
    forward, calls = enc.model.forward, [0]
    def dying_forward(x):
        calls[0] += 1
        if calls[0] == int(sys.argv[5]):
            deadline = time.time() + 20  # let the writer thread land two chunks, then die mid-run
            while S.open_store(sys.argv[3]).group["done"][:].sum() < 2 and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: like a preempted node
        return forward(x)
    enc.model.forward = dying_forward
    read = int(sys.argv[6]) if len(sys.argv) > 6 else None
    extract(sys.argv[1], sys.argv[2], sys.argv[3], root=sys.argv[4], chunk_rows=16, batch_size=8, workers=0,
            progress=False, encoder_obj=enc, read_chunk_rows=read)
""")


@pytest.mark.parametrize("read_chunk_rows", [None, 8])
def test_resume_after_sigkill_equals_clean_run(tiny_store, tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path,
                                               read_chunk_rows):
    out = tmp_path / "killed.zarr"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tiny_manifest), tiny_encoder_spec, str(out),
                           str(tiny_dataset), "6"] + ([str(read_chunk_rows)] if read_chunk_rows else []),
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    st = S.open_store(out)
    assert not st.complete and 0 < len(st.pending_chunks()) < st.n_chunks
    assert st.info().writer == ""  # the killed writer's lock died with it: `fercache info` says resume
    assert "rows       72  (ok/failed: when complete)" in st.info().lines()  # not "ok None failed None"
    with pytest.raises(StoreError, match="incomplete .* re-run"):
        st.require_complete()
    r = extract(tiny_manifest, tiny_encoder_spec, out, root=tiny_dataset, chunk_rows=16, batch_size=8, workers=0,
                progress=False, read_chunk_rows=read_chunk_rows)
    assert 0 < r.chunks_computed < st.n_chunks
    if read_chunk_rows:  # another fingerprint key (sharded), the same features
        _assert_same_arrays(tiny_store, out)
    else:
        _assert_same_store(tiny_store, out)


CTRL_C = textwrap.dedent("""
    import os, signal, sys, time
    from fercache import extract as E, store as S
    from fercache.cli import main
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores SIGINT)
    manifest, out, root, sent = sys.argv[1:]
    encode, calls = E.encode_chunk, [0]
    def interrupted(*a, **k):
        calls[0] += 1
        if calls[0] == 4:
            while S.open_store(out).group["done"][:].sum() < 2:
                time.sleep(0.05)
            time.sleep(2)  # the workers fill their prefetch queue, as they do behind an encoder slower than them
            open(sent, "w").write(repr(time.time()))
            os.killpg(0, signal.SIGINT)  # Ctrl-C in a terminal: the main process and its decode workers
            time.sleep(1)
        return encode(*a, **k)
    E.encode_chunk = interrupted
    sys.argv = ["fercache", "-q", "extract", manifest, "--encoder", "null:", "--out", out, "--data-root", root,
                "--image-size", "8", "--workers", "2", "--chunk-rows", "2048"]
    try:
        main()  # as the console script
    finally:  # the DataLoader shuts its workers down when collected, at a time that varies: make it now
        import gc
        gc.collect()
""")



def test_ctrl_c_stops_at_once_keeps_the_written_chunks_and_says_how_to_resume(tiny_manifest, tiny_dataset, tmp_path):
    # Ctrl-C reaches the decode workers too. A worker stopped by it waited, on exit, for its queued results to reach
    # the main process, which no longer read them, and the DataLoader killed it after 5 s: in about half the runs of
    # this test, depending on where the signal caught the worker (test_decode_workers_... checks the cause).
    m = read_manifest(tiny_manifest)
    rows = [{**r, "sample_id": f"{r['sample_id']}#{k}"} for k in range(342) for r in m.rows][:12 * 2048]
    big = write_manifest(Manifest(rows=rows, source="repeated", columns=m.columns), tmp_path / "big.csv")
    out, sent = tmp_path / "interrupted.zarr", tmp_path / "sigint-at"
    proc = subprocess.run([sys.executable, "-c", CTRL_C, str(big), str(out), str(tiny_dataset), str(sent)],
                          capture_output=True, text=True, start_new_session=True)
    stopped = time.time() - float(sent.read_text())
    assert proc.returncode == 130 and "the same command resumes" in proc.stderr, proc.stderr
    assert stopped < 4, f"{stopped:.1f} s from Ctrl-C to exit"
    saved = int(re.search(r"interrupted: (\d+) of 12 chunks", proc.stderr).group(1))
    assert saved >= 2 and saved == 12 - len(S.open_store(out).pending_chunks())
    r = extract(big, "null:", out, root=tiny_dataset, image_size=8, chunk_rows=2048, progress=False)
    assert r.chunks_computed == 12 - saved and r.n_ok == 12 * 2048 and S.open_store(out).complete


PAUSED = textwrap.dedent("""
    import os, sys, time
    from fercache import extract as E
    manifest, out, root, go = sys.argv[1:]
    encode = E.encode_chunk
    def paused(*a, **k):
        while not os.path.exists(go):  # the test tries a second extract of the store meanwhile
            time.sleep(0.05)
        return encode(*a, **k)
    E.encode_chunk = paused
    E.extract(manifest, "null:", out, root=root, image_size=8, chunk_rows=16, workers=0, progress=False)
""")


def test_a_second_extract_of_a_store_being_written_fails_at_once_and_touches_nothing(tiny_manifest, tiny_dataset,
                                                                                      tmp_path):
    """Two extracts of one new store used to both create it (zarr mode "w" empties the location), or the second
    said 'a zarr group but not a fercache store; pass --overwrite', which would wipe the first one's chunks."""
    out, go = tmp_path / "s.zarr", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", PAUSED, str(tiny_manifest), str(out), str(tiny_dataset), str(go)],
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not S.exists(out) and time.time() < deadline:  # created: it is encoding its first chunk
            time.sleep(0.05)
        for overwrite in (False, True):
            with pytest.raises(StoreError, match=rf"s.zarr is being written by another extract \(pid {first.pid} "):
                extract(tiny_manifest, "null:", out, root=tiny_dataset, image_size=8, chunk_rows=16, workers=0,
                        progress=False, overwrite=overwrite)
        assert S.open_store(out).info().writer.startswith(f"pid {first.pid} on ")  # `fercache info` says who
    finally:
        go.write_text("")
        assert first.wait(120) == 0, first.stderr.read()
    assert S.open_store(out).complete and S.writer(out) == ""  # the lock went with the first process
    assert extract(tiny_manifest, "null:", out, root=tiny_dataset, image_size=8, chunk_rows=16, workers=0,
                   progress=False).already_complete


def test_a_complete_store_in_a_folder_where_no_lock_can_be_made_still_reads_as_complete(tiny_store, tiny_manifest,
                                                                                        tiny_dataset, tiny_encoder_spec,
                                                                                        monkeypatch):
    """A team's read-only folder of finished stores: a pipeline's extract step must still find them complete."""
    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(S, "open", read_only, raising=False)  # the lock file's open(); zarr's own I/O is untouched
    r = extract(tiny_manifest, tiny_encoder_spec, tiny_store, root=tiny_dataset, chunk_rows=16, progress=False)
    assert r.already_complete and r.n_ok == 72


def test_stores_on_fsspec_urls_extract_resume_train_and_score_like_local_ones(tiny_store, tiny_manifest, tiny_dataset,
                                                                               tiny_encoder_spec, tmp_path):
    """memory:// stands in for an object store (no folders, no locks); file:// failed: zarr's fsspec store does not
    create the store's folders, so the first write of zarr.json raised FileNotFoundError."""
    import uuid

    from fercache.scoring import evaluate_run
    from fercache.train import fit

    kw = dict(root=tiny_dataset, chunk_rows=16, batch_size=8, workers=0, progress=False)
    url = f"memory://bucket/{uuid.uuid4().hex}/faces.zarr"
    extract(tiny_manifest, tiny_encoder_spec, url, **kw)
    S.open_store(url, mode="r+").group["done"][1] = False  # as if a rank died before finishing chunk 1
    S.open_store(url, mode="r+").group.attrs["fercache"] = {**S.open_store(url).meta, "complete": False}
    assert extract(tiny_manifest, tiny_encoder_spec, url, **kw).chunks_computed == 1
    _assert_same_store(tiny_store, url)
    run = fit(url, "linear", out_dir=tmp_path / "runs", recipe={"epochs": 2}).run_dir
    assert evaluate_run(run, write=False)["n"] == 24

    assert extract(tiny_manifest, tiny_encoder_spec, f"file://{tmp_path}/f.zarr", **kw).n_ok == 72
    _assert_same_store(tiny_store, tmp_path / "f.zarr")


def test_decode_workers_leave_ctrl_c_to_the_main_process(tiny_manifest, tiny_dataset, tmp_path, monkeypatch):
    """Left running, a worker exits at once when the main process shuts the DataLoader down after Ctrl-C."""
    import signal

    from fercache import extract as E

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when CI ignores it
    read, encode, seen = E.ChunkReader.__getitem__, E.encode_chunk, []
    monkeypatch.setattr(E.ChunkReader, "__getitem__", lambda self, k: {**read(self, k),
                                                                       "sigint": signal.getsignal(signal.SIGINT)})
    monkeypatch.setattr(E, "encode_chunk", lambda item, *a: seen.append(item["sigint"]) or encode(item, *a))
    try:
        extract(tiny_manifest, "null:", tmp_path / "s.zarr", root=tiny_dataset, chunk_rows=16, workers=2,
                progress=False)
        assert seen == [signal.SIG_IGN] * 5 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def _assert_same_arrays(a, b):
    xa, xb = _arrays(a), _arrays(b)
    for k in xa:
        assert np.array_equal(xa[k], xb[k], equal_nan=k.startswith("features")), k


def test_sharded_store_writes_one_object_per_shard_and_equals_unsharded(tiny_store, tiny_manifest, tiny_dataset,
                                                                        tiny_encoder_spec, tmp_path):
    out = tmp_path / "sharded.zarr"
    r = extract(tiny_manifest, tiny_encoder_spec, out, root=tiny_dataset, chunk_rows=32, read_chunk_rows=8,
                batch_size=8,
                workers=2, progress=False)
    assert r.n_ok == 72 and r.chunks_computed == 3
    st = S.open_store(out)
    arr = st.group["features/embedding"]
    assert arr.shards == (32, 32) and arr.chunks == (8, 32) and st.fingerprint["read_chunk_rows"] == 8
    assert st.info().layout == {"chunk_rows": 32, "read_chunk_rows": 8, "sharded": True}
    objects = [p for p in (out / "features" / "embedding" / "c").rglob("*") if p.is_file()]
    assert len(objects) == 3  # 72 rows in 32-row shards: 3 objects, not 9 inner chunks
    a, b = S.open_store(tiny_store), st
    assert np.array_equal(a.features("embedding"), b.features("embedding"))
    assert np.array_equal(a.group["features/embedding"][10:13], arr[10:13])  # random access reads inner chunks
    with pytest.raises(StoreError, match="--read-chunk-rows 5 must divide --chunk-rows 32"):
        extract(tiny_manifest, tiny_encoder_spec, tmp_path / "bad.zarr", root=tiny_dataset, chunk_rows=32,
                read_chunk_rows=5, workers=0, progress=False)


def test_export_h5(tiny_store, tmp_path):
    st = S.open_store(tiny_store)
    assert st.n_chunks > 1  # copied chunk by chunk
    path = S.export_h5(tiny_store, tmp_path / "f.h5")
    with h5py.File(path) as f:
        for name in st.outputs:
            np.testing.assert_array_equal(f[f"features/{name}"][:], st.group[f"features/{name}"][:])
        assert [s.decode() for s in f["sample_id"][:]] == list(st.sample_ids())
        assert '"complete": true' in f.attrs["fercache"] and "clip_id" not in f


def test_export_replaces_only_its_own_earlier_export(tiny_store, video_store, tmp_path):
    """Re-exporting a store is safe; an unrelated file, or another store's export, is kept unless --overwrite."""
    path = S.export_h5(tiny_store, tmp_path / "f.h5")
    assert S.export_h5(tiny_store, path) == path
    other = S.export_h5(video_store[0], tmp_path / "v.h5")
    with h5py.File(other) as f:  # a video store keeps which frames make each clip
        st = S.open_store(video_store[0])
        assert [s.decode() for s in f["clip_id"][:]] == [str(c) for c in st.group["clip_id"][:]]
        np.testing.assert_array_equal(f["frame_idx"][:], st.group["frame_idx"][:])
    with pytest.raises(StoreError, match="an export of another store.*--overwrite"):
        S.export_h5(tiny_store, other)
    notes = tmp_path / "notes.h5"
    notes.write_text("my results")
    with pytest.raises(StoreError, match="not a fercache export"):
        S.export_h5(tiny_store, notes)
    assert notes.read_text() == "my results"
    S.export_h5(tiny_store, notes, overwrite=True)
    with h5py.File(notes) as f:
        assert f["ok"].shape == (S.open_store(tiny_store).n_rows,)


def test_export_to_a_folder_is_refused_and_a_failed_export_leaves_no_file(tiny_store, tmp_path, monkeypatch):
    """--to DIR --overwrite wrote everything, then failed to rename over the folder (the store itself, even),
    leaving DIR.tmp behind; an interrupted export left its .tmp file too."""
    for folder in (tmp_path, Path(tiny_store)):
        with pytest.raises(StoreError, match=rf"^--to {folder} is a folder; --to names the HDF5 file to write, "
                                             rf"e.g. {folder.resolve()}/\S+\.h5$"):
            S.export_h5(tiny_store, folder, overwrite=True)
    assert S.open_store(tiny_store).complete and not list(tmp_path.glob("*.tmp"))

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(S.FeatureStore, "sample_ids", interrupted)  # read after the features are written
    with pytest.raises(KeyboardInterrupt):
        S.export_h5(tiny_store, tmp_path / "f.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_incomplete_store_cannot_be_exported(tmp_path, tiny_manifest, tiny_encoder_spec):
    from fercache.encoders import load_encoder
    from fercache.manifests import content_sha256

    enc = load_encoder(tiny_encoder_spec)
    m = read_manifest(tiny_manifest)
    fp = S.make_fingerprint(enc.identity(), content_sha256(m), len(m), 16)
    S.create(tmp_path / "half.zarr", fp, m.column("sample_id"), "embedding")
    with pytest.raises(StoreError, match="incomplete"):
        S.export_h5(tmp_path / "half.zarr", tmp_path / "x.h5")
    with pytest.raises(StoreError, match="already exists"):
        S.create(tmp_path / "half.zarr", fp, m.column("sample_id"), "embedding")


def test_packed_paths_round_trip_without_python_objects(tmp_path):
    import os

    from fercache.extract import packed

    names = [tmp_path / "été" / "a b.jpg", tmp_path / "x.png", ""]
    arr = packed(names)
    assert arr.dtype.kind == "S" and arr.dtype != object  # one buffer: no per-row refcount for workers to copy
    assert [os.fsdecode(v) for v in arr] == [str(n) for n in names]


def test_a_store_is_never_created_over_files_that_are_not_a_store(tiny_manifest, tiny_dataset, tiny_encoder_spec,
                                                                  tmp_path):
    """zarr creates a group by emptying its folder: `--out` naming a data folder by mistake used to wipe it."""
    import zarr

    run = dict(root=tiny_dataset, workers=0, progress=False)
    photos = tmp_path / "photos"
    (photos / "2024").mkdir(parents=True)
    (photos / "2024" / "a.jpg").write_bytes(b"jpeg")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not a feature store .*would delete them"):
            extract(tiny_manifest, tiny_encoder_spec, photos, overwrite=overwrite, **run)
    assert (photos / "2024" / "a.jpg").read_bytes() == b"jpeg"
    other = tmp_path / "other.zarr"
    zarr.open_group(other, mode="w").create_array("x", shape=(3,), dtype="int8")
    with pytest.raises(StoreError, match="zarr group but not a fercache store.*--overwrite"):
        extract(tiny_manifest, tiny_encoder_spec, other, **run)
    assert extract(tiny_manifest, tiny_encoder_spec, other, overwrite=True, **run).n_ok == 72
    (tmp_path / "empty").mkdir()
    assert extract(tiny_manifest, tiny_encoder_spec, tmp_path / "empty", **run).n_ok == 72
    with open(f"{tmp_path}/notes.txt", "w") as fh:
        fh.write("x")
    with pytest.raises(StoreError, match="1 entries, e.g. notes.txt"):
        S.check_location(str(tmp_path / "notes.txt"), overwrite=True)
    import fsspec

    with fsspec.open("memory://bucket/feats/readme.md", "w") as fh:
        fh.write("mine")
    with pytest.raises(StoreError, match="e.g. readme.md"):
        S.check_location("memory://bucket/feats", overwrite=False)
    S.check_location("memory://bucket/new.zarr", overwrite=False)  # nothing there: fine


def test_freed_batch_memory_is_handed_back_with_glibc_and_skipped_without(monkeypatch):
    """extract trims glibc's heaps after every piece (the flat-memory benchmark's fix); elsewhere it must not fail."""
    import ctypes

    from fercache.extract import _malloc_trim

    assert _malloc_trim()(0) in (0, 1)  # glibc: 1 when it released memory, 0 when there was none to release

    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert _malloc_trim()(0) is None


def test_progress_moves_per_batch_not_per_chunk(tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path, monkeypatch):
    """A 1,024-row chunk held the bar at 0% for minutes on a CPU: it now moves with every encoded batch."""
    from fercache import extract as E

    calls, real = [], E.encode_chunk

    def recording(item, encoder, device, batch_size, dtype, on_batch=None):
        return real(item, encoder, device, batch_size, dtype, lambda n: (calls.append(n), on_batch(n)))

    monkeypatch.setattr(E, "encode_chunk", recording)
    E.extract(tiny_manifest, tiny_encoder_spec, tmp_path / "s.zarr", root=tiny_dataset, chunk_rows=72, batch_size=8,
              workers=0, progress=False)
    assert calls == [8] * 9  # one chunk of 72 rows: nine updates of one batch each
