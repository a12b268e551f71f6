"""Hostile and odd inputs: each ends as a correct result or a clear error naming the file and the cure."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fercache.errors import ConfigError, ManifestError, StoreError
from fercache.manifests import read_manifest
from fercache.preprocess import MAX_PIXELS, decode_image

HEADER = ["sample_id", "path", "label", "split", "subject"]


def write_rows(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


# --- manifests ----------------------------------------------------------------------------------------------


def test_a_repeated_column_is_refused_not_used_to_relabel_every_row(tmp_path):
    path = write_rows(tmp_path / "m.csv", [*HEADER, "label"], [["a", "a.jpg", "happy", "train", "s1", "sad"]])
    with pytest.raises(ManifestError, match=r"m.csv:1: column\(s\) 'label' appear more than once"):
        read_manifest(path)


def test_only_au_and_a_number_is_an_au_column(tmp_path):
    path = write_rows(tmp_path / "m.csv", [*HEADER, "AUTHOR", "AU12", "AU_note"],
                      [["a", "a.jpg", "happy", "train", "s1", "ekman", "1", "x"]])
    m = read_manifest(path)
    assert m.au_columns == ["AU12"]
    assert "AUTHOR" in m.columns and "AU_note" in m.columns


@pytest.mark.parametrize("sid", ["a\x00b", "a\nb", "a\x1bb", "a\tb"])
def test_a_control_character_in_a_sample_id_is_refused(tmp_path, sid):
    path = write_rows(tmp_path / "m.csv", HEADER, [[sid, "a.jpg", "happy", "train", "s1"]])
    with pytest.raises(ManifestError, match="m.csv:2: sample_id .* control character"):
        read_manifest(path)


def test_a_symlink_out_of_the_data_root_is_refused(tmp_path, tiny_dataset):
    from fercache.manifests import resolve_paths

    outside = tmp_path / "secret.jpg"
    Image.new("RGB", (8, 8)).save(outside)
    root = tmp_path / "root"
    root.mkdir()
    (root / "face.jpg").symlink_to(outside)
    Image.new("RGB", (8, 8)).save(root / "inside.jpg")
    (root / "alias.jpg").symlink_to(root / "inside.jpg")  # a link that stays inside is fine
    m = read_manifest(write_rows(tmp_path / "m.csv", HEADER, [["in", "alias.jpg", "happy", "train", "s"],
                                                              ["out", "face.jpg", "happy", "train", "s"]]))
    with pytest.raises(ManifestError, match=r"m.csv:3: .*face.jpg is a link to .*secret.jpg, outside the data root"):
        resolve_paths(m, root)


# --- CSVs for people ----------------------------------------------------------------------------------------


def test_csv_cells_that_would_run_as_formulas_are_neutralised_numbers_kept(tmp_path):
    from fercache.report import write_csv

    path = write_csv(tmp_path / "t.csv", ["path", "p"], [['=HYPERLINK("http://x")', -0.5], ["+1+cmd", "-0.91"],
                                                        ["@SUM(A1)", "-x"], ["ok.jpg", "0.5"]])
    rows = list(csv.reader(open(path)))
    assert rows[1] == ["'=HYPERLINK(\"http://x\")", "-0.5"]
    assert rows[2] == ["'+1+cmd", "-0.91"]
    assert rows[3] == ["'@SUM(A1)", "'-x"]
    assert rows[4] == ["ok.jpg", "0.5"]


def test_runs_csv_and_predict_out_never_replace_a_manifest(tmp_path, tiny_manifest):
    from fercache.predict import check_out, write_predictions
    from fercache.runs import Ledger, write_ledger

    manifest = tmp_path / "m.csv"
    manifest.write_bytes(tiny_manifest.read_bytes())
    with pytest.raises(ConfigError, match="m.csv exists and is not a file this command wrote"):
        write_ledger(Ledger([]), manifest)
    with pytest.raises(ConfigError, match="m.csv exists and is not a file this command wrote"):
        check_out(manifest)
    with pytest.raises(ConfigError, match="not a file this command wrote"):
        write_predictions([{"path": "a.jpg", "prediction": "happy", "probabilities": {"happy": 1.0}}], manifest)
    assert manifest.read_bytes() == tiny_manifest.read_bytes()
    # its own earlier output is replaced
    row = {"path": "a.jpg", "prediction": "happy", "probabilities": {"happy": 1.0}}
    ours = write_predictions([row], tmp_path / "p.csv")
    write_predictions([{"path": "b.jpg", "prediction": "sad", "probabilities": {"sad": 1.0}}], ours)
    assert "b.jpg" in ours.read_text()
    ledger = write_ledger(Ledger([]), tmp_path / "l.csv")
    write_ledger(Ledger([]), ledger)


# --- images -------------------------------------------------------------------------------------------------


def test_a_zero_area_box_fails_its_row_and_an_out_of_image_box_is_clipped(tmp_path):
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="no area inside the 30x20 image"):
        decode_image(tmp_path / "a.png", "5 5 5 15")
    with pytest.raises(ValueError, match="not four numbers"):
        decode_image(tmp_path / "a.png", "5 5 x 15")
    assert decode_image(tmp_path / "a.png", "-10 10 100 40").shape == (10, 30, 3)  # clipped, not padded black


def test_images_past_the_pixel_or_aspect_limit_fail_before_their_pixels_are_decoded(tmp_path):
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")
    Image.new("L", (1, 60000)).save(tmp_path / "strip.png")
    assert (tmp_path / "bomb.png").stat().st_size < 40_000
    code = ("import resource, sys; from fercache.preprocess import decode_image\n"
            "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "before = peak()\n"
            "for f in sys.argv[1:]:\n"
            "    try: decode_image(f, size=64)\n"
            "    except ValueError as e: print(e)\n"
            "print(peak() - before)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bomb.png"), str(tmp_path / "strip.png")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == (f"12000x12000 pixels is over the limit of {MAX_PIXELS:,} per image; crop or shrink it "
                      "(or give a bbox)")
    assert out[1].startswith("1x60000 is longer than 16:1")
    assert int(out[2]) < 20_000, f"peak RSS grew {int(out[2]) / 1024:.0f} MiB: the pixels were decoded"


def test_16_bit_images_are_scaled_to_8_bits_and_float_or_int32_ones_refused(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    got = decode_image(tmp_path / "g16.png")
    assert got.dtype == np.uint8 and got.shape == (64, 64, 3)
    np.testing.assert_array_equal(got[..., 0], np.round(ramp.astype(float) * 255 / 65535).astype(np.uint8))
    Image.fromarray(np.random.rand(8, 8).astype(np.float32), mode="F").save(tmp_path / "f.tif")
    Image.fromarray((np.random.rand(8, 8) * 70000).astype(np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(ValueError, match="floating-point pixels .* no defined 8-bit range"):
        decode_image(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="32-bit integer pixels"):
        decode_image(tmp_path / "i.tif")


def test_exif_orientation_turns_the_image_upright(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :5] = 255  # a white band on the left of a landscape image
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: shown turned 90 degrees clockwise
    img.save(tmp_path / "turned.jpg", exif=exif.tobytes(), quality=100)
    got = decode_image(tmp_path / "turned.jpg")
    assert got.shape == (20, 10, 3)
    assert got[:5].mean() > 200 and got[-5:].mean() < 50  # the band is now on top


def test_extract_fails_bad_rows_and_keeps_the_rest(tmp_path, tiny_dataset):
    from fercache.extract import extract
    from fercache.store import open_store

    root = tmp_path / "root"
    root.mkdir()
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(root / "ok.png")
    Image.new("1", (12000, 12000)).save(root / "bomb.png")
    Image.new("L", (1, 60000)).save(root / "strip.png")
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)).save(root / "g16.png")
    rows = [["ok", "ok.png", "happy", "train", "s", ""], ["zero", "ok.png", "happy", "train", "s", "3 3 3 9"],
            ["bomb", "bomb.png", "sad", "train", "s", ""], ["strip", "strip.png", "sad", "train", "s", ""],
            ["g16", "g16.png", "sad", "train", "s", ""], ["edge", "ok.png", "sad", "train", "s", "30 30 90 90"]]
    manifest = write_rows(tmp_path / "m.csv", [*HEADER, "bbox"], rows)
    out = tmp_path / "s.zarr"
    res = extract(manifest, "null:", out, pretrained="none", root=root, workers=0, chunk_rows=4, progress=False)
    assert (res.n_ok, res.n_failed) == (3, 3)
    errors = open_store(out).errors()
    assert set(errors) == {"zero", "bomb", "strip"}
    assert "no area" in errors["zero"] and "over the limit" in errors["bomb"] and "16:1" in errors["strip"]
    # a resume of the same store is a no-op, not a crash
    assert extract(manifest, "null:", out, pretrained="none", root=root, workers=0, chunk_rows=4,
                   progress=False).already_complete


# --- non-finite features ------------------------------------------------------------------------------------


def test_non_finite_features_fail_their_row_at_extract():
    from fercache.extract import fail_non_finite

    feats = {"a": np.array([[1, 2], [np.nan, 1], [1, 1], [0, 0]], np.float16),
             "b": np.array([[1, 1], [1, 1], [np.inf, 1], [0, np.nan]], np.float16)}
    ok, error = np.array([True, True, True, False]), ["", "", "", "earlier"]
    fail_non_finite(feats, ok, error)
    assert ok.tolist() == [True, False, False, False]
    assert "output 'a'" in error[1] and "output 'b'" in error[2] and error[3] == "earlier"


def test_a_store_holding_nan_on_ok_rows_is_refused_by_training(tiny_store, tmp_path):
    import shutil

    from fercache.data import load_features
    from fercache.store import open_store

    copy = tmp_path / "nan.zarr"
    shutil.copytree(tiny_store, copy)
    shutil.rmtree(copy / "checksums")  # a store from before checksums: its chunks are not checked on read
    s = open_store(copy, mode="r+")
    arr = s.group[f"features/{s.default_output}"]
    arr[3] = np.full(arr.shape[1], np.nan, np.float16)
    with pytest.raises(StoreError, match=r"1 row\(s\) marked ok hold NaN or Inf .* chunk 0\).*damaged"):
        load_features(str(copy))


# --- metrics ------------------------------------------------------------------------------------------------


def test_macro_f1_is_scikit_learns_when_the_head_predicts_a_class_the_test_set_lacks():
    from sklearn.metrics import f1_score

    from fercache import metrics

    # the cross cell from the issue: 3 true classes, a 4th (neutral) predicted
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 3, 1, 1, 2, 3])
    got = metrics.classification(y, pred, ["happy", "sad", "anger", "neutral"])["macro_f1"]
    assert got == pytest.approx(f1_score(y, pred, average="macro"))
    assert got == pytest.approx((2 / 3 + 1 + 2 / 3 + 0) / 4)
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(2, 8))
        y, pred = rng.integers(0, k - int(rng.integers(0, 2)), 30), rng.integers(0, k, 30)
        res = metrics.classification(y, pred, [str(i) for i in range(k)])
        assert res["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
        w = metrics.weighted_classification(np.ones((1, len(y))), y, pred, k)
        assert w["macro_f1"][0] == pytest.approx(res["macro_f1"])


def test_importing_fercache_and_plotting_leave_the_matplotlib_backend_alone(tmp_path):
    code = ("import matplotlib; matplotlib.use('svg'); import fercache, fercache.cli, fercache.report as r\n"
            "r.confusion_png(__import__('pathlib').Path(r'%s'), [[1, 0], [0, 1]], ['a', 'b'], 't')\n"
            "print(matplotlib.get_backend())" % (tmp_path / "c.png"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_a_store_resized_by_the_older_inexact_path_reads_as_other_inputs(tiny_store, tiny_manifest, tiny_dataset,
                                                                         tiny_encoder_spec, tmp_path):
    import shutil

    from fercache.extract import extract
    from fercache.store import make_fingerprint, open_store

    old = tmp_path / "old.zarr"
    shutil.copytree(tiny_store, old)
    s = open_store(old, mode="r+")
    fp = s.fingerprint
    enc = {**fp["encoder"], "preprocess": {k: v for k, v in fp["encoder"]["preprocess"].items() if k != "revision"}}
    meta = s.meta
    meta["fingerprint"] = make_fingerprint(enc, fp["manifest_sha256"], fp["n_rows"], fp["chunk_rows"])
    s.group.attrs["fercache"] = meta
    with pytest.raises(StoreError, match=r"built from other inputs \(preprocessing revision None vs 2 \(fercache 0.4 "
                                         r"resizes exactly as PIL does\)\)"):
        extract(tiny_manifest, tiny_encoder_spec, old, pretrained="none", root=tiny_dataset, chunk_rows=16,
                workers=0, progress=False)


# --- damaged or tampered stores -----------------------------------------------------------------------------


@pytest.fixture()
def store_copy(tiny_store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    return copy


def _chunk_file(store, array: str, i: int):
    files = sorted((store / array / "c").rglob("*"))
    found = [f for f in files if f.is_file() and f.relative_to(store / array / "c").parts[0] == str(i)]
    assert len(found) == 1, found
    return found[0]


def _default_output(store) -> str:
    from fercache.store import open_store

    return open_store(store).default_output


def test_a_deleted_feature_chunk_is_refused_by_training_and_verify_repairs_it(store_copy, tiny_store, tiny_manifest,
                                                                              tiny_dataset, tiny_encoder_spec):
    from typer.testing import CliRunner

    from fercache.cli import app
    from fercache.data import load_features
    from fercache.extract import extract
    from fercache.store import open_store

    out = _default_output(store_copy)
    _chunk_file(store_copy, f"features/{out}", 1).unlink()
    with pytest.raises(StoreError, match=rf"'features/{out}' of chunk\(s\) 1 does not match its checksum"):
        load_features(str(store_copy))
    r = CliRunner().invoke(app, ["verify", str(store_copy)])
    assert r.exit_code == 1 and f"chunk 1 (rows 16-31): features/{out} damaged" in r.output
    r = CliRunner().invoke(app, ["verify", str(store_copy), "--repair"])
    assert r.exit_code == 1 and "1 chunk(s) marked for re-extraction" in r.output
    res = extract(tiny_manifest, tiny_encoder_spec, store_copy, pretrained="none", root=tiny_dataset, chunk_rows=16,
                  batch_size=8, workers=0, progress=False)
    assert res.chunks_computed == 1
    np.testing.assert_array_equal(open_store(store_copy).features(), open_store(tiny_store).features())
    r = CliRunner().invoke(app, ["verify", str(store_copy)])
    assert r.exit_code == 0 and "5 chunk(s) checked, none damaged" in r.output


def test_a_deleted_ok_chunk_no_longer_drops_rows_silently(store_copy):
    from fercache.data import load_features

    _chunk_file(store_copy, "ok", 2).unlink()  # reads back as all False: 16 rows would leave training unseen
    with pytest.raises(StoreError, match=r"'ok' of chunk\(s\) 2 does not match its checksum"):
        load_features(str(store_copy))


def test_swapped_feature_chunks_are_found(store_copy):
    from fercache.store import open_store

    out = _default_output(store_copy)
    a, b = _chunk_file(store_copy, f"features/{out}", 0), _chunk_file(store_copy, f"features/{out}", 1)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    v = open_store(store_copy).verify()
    assert v.bad == {0: [f"features/{out}"], 1: [f"features/{out}"]} and v.rows[1] == (16, 32)


def test_a_fingerprint_missing_a_key_or_edited_is_a_clear_error(store_copy):
    import json

    from fercache.store import open_store

    meta_file = store_copy / "zarr.json"
    meta = json.loads(meta_file.read_text())
    fp = meta["attributes"]["fercache"]["fingerprint"]
    fp["manifest_sha256"] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="its fingerprint was edited"):
        open_store(store_copy)
    del fp["n_rows"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="its metadata lacks n_rows; it is damaged"):
        open_store(store_copy)


# --- locks ----------------------------------------------------------------------------------------------------


def test_two_trainings_into_one_run_folder_cannot_run_at_once(tiny_store, tmp_path):
    from fercache.rundir import run_lock
    from fercache.train import fit

    run_dir = tmp_path / "runs" / "mine"
    with run_lock(run_dir):  # another train-head holds it
        with pytest.raises(StoreError, match=r"the run folder .*mine is being trained into by another process \(pid"):
            fit(str(tiny_store), "linear", out_dir=tmp_path / "runs", name="mine", recipe={"epochs": 1})
    assert not (run_dir / "head.pt").exists()
    fit(str(tiny_store), "linear", out_dir=tmp_path / "runs", name="mine", recipe={"epochs": 1})  # free again
    assert (run_dir / "head.pt").is_file()


def test_a_store_reached_through_a_symlink_shares_its_lock(tmp_path):
    from fercache.store import writing

    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with writing(tmp_path / "real" / "s.zarr"):
        with pytest.raises(StoreError, match="is being written by another extract"):
            with writing(tmp_path / "alias" / "s.zarr"):
                pass


def _worker_outliving_its_extract(ready, done):
    from fercache.extract import _start_worker

    _start_worker(0)
    ready.set()
    done.wait(30)


def test_decode_workers_do_not_keep_the_store_locked_after_their_extract(tmp_path):
    import multiprocessing as mp

    from fercache.store import writing

    ctx = mp.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    with writing(tmp_path / "s.zarr"):
        worker = ctx.Process(target=_worker_outliving_its_extract, args=(ready, done))
        worker.start()
        assert ready.wait(30)
    try:  # the extract is gone, its forked worker lives on: a resume must get the lock
        with writing(tmp_path / "s.zarr"):
            pass
    finally:
        done.set()
        worker.join(30)


# --- stores cut short, resumed elsewhere ---------------------------------------------------------------------


def test_a_creation_killed_before_its_metadata_is_redone_without_overwrite(tiny_store, tiny_manifest, tiny_dataset,
                                                                           tiny_encoder_spec, tmp_path):
    import zarr

    from fercache.extract import extract
    from fercache.store import open_store

    out = tmp_path / "cut.zarr"
    g = zarr.open_group(str(out), mode="w")  # what create() had written when it was killed: arrays, no metadata
    g.create_array("sample_id", shape=(72,), dtype=str, chunks=(16,))
    g.create_array("ok", shape=(72,), dtype=bool, chunks=(16,))
    res = extract(tiny_manifest, tiny_encoder_spec, out, pretrained="none", root=tiny_dataset, chunk_rows=16,
                  batch_size=8, workers=0, progress=False)
    assert res.n_ok == 72
    np.testing.assert_array_equal(open_store(out).features(), open_store(tiny_store).features())
    other = tmp_path / "other.zarr"  # a zarr group with anything else in it is still refused
    zarr.open_group(str(other), mode="w").create_array("mine", shape=(3,), dtype="int64")
    with pytest.raises(StoreError, match="is a zarr group but not a fercache store; pass --overwrite"):
        extract(tiny_manifest, tiny_encoder_spec, other, pretrained="none", root=tiny_dataset, workers=0,
                progress=False)


def test_resuming_under_another_data_root_is_refused_while_the_first_exists(tiny_manifest, tiny_dataset,
                                                                            tiny_encoder_spec, tmp_path, caplog):
    import shutil

    from fercache.extract import extract
    from fercache.store import open_store

    out = tmp_path / "s.zarr"
    extract(tiny_manifest, tiny_encoder_spec, out, pretrained="none", root=tiny_dataset, chunk_rows=16, workers=0,
            progress=False)
    s = open_store(out, mode="r+")
    s.repair([3, 4])  # as if the extract had been interrupted after 3 chunks
    second = tmp_path / "second"
    shutil.copytree(tiny_dataset, second)
    with pytest.raises(StoreError, match=rf"its 3 written chunk\(s\) were read under --data-root {tiny_dataset}; "
                                         rf"resuming under {second} would mix"):
        extract(tiny_manifest, tiny_encoder_spec, out, pretrained="none", root=second, chunk_rows=16, workers=0,
                progress=False)
    moved = tmp_path / "moved"  # the first root gone: a moved dataset, resumed with a warning and recorded
    shutil.copytree(tiny_dataset, moved)
    s.group.attrs["fercache"] = {**s.meta, "data_root": str(tmp_path / "gone")}
    with caplog.at_level("WARNING", logger="fercache.extract"):
        extract(tiny_manifest, tiny_encoder_spec, out, pretrained="none", root=moved, chunk_rows=16, workers=0,
                progress=False)
    assert "which is gone" in caplog.text
    assert open_store(out).meta["data_roots"] == [str(tmp_path / "gone"), str(moved)]


# --- results that cannot mean anything --------------------------------------------------------------------------


def _manifest_of(tiny_manifest, tmp_path, change) -> str:
    m = read_manifest(tiny_manifest)
    for r in m.rows:
        change(r)
    from fercache.manifests import write_manifest

    return str(write_manifest(m, tmp_path / "relabelled.csv"))


@pytest.mark.parametrize("change,error", [
    (lambda r: r.update(label="happy"), r"the training rows hold 1 class \(happy\); a classifier needs at least 2"),
    (lambda r: r.update(split="test" if r["split"] == "train" else r["split"]), "no training rows with a label"),
    (lambda r: r.update(label="surprise" if r["split"] == "val" else r["label"]),
     r"no validation row of a class seen in training \(24 in val"),
])
def test_data_no_score_can_mean_anything_on_is_refused(tiny_store, tiny_manifest, tmp_path, change, error):
    from fercache.train import fit

    manifest = _manifest_of(tiny_manifest, tmp_path, change)
    with pytest.raises(ConfigError, match=error):
        fit(str(tiny_store), "linear", manifest=manifest, out_dir=tmp_path / "runs", recipe={"epochs": 1})


# --- damaged runs, re-extracted sources, the ledger --------------------------------------------------------------


@pytest.mark.parametrize("damage", [b"", b"not a torch file\n", "missing keys"])
def test_a_damaged_head_pt_is_not_a_finished_run(tiny_store, tmp_path, damage):
    import torch

    from fercache.rundir import load_run
    from fercache.sweeps import sweep

    grid, base = {"lr": [1e-2]}, {"batch_size": 8, "epochs": 2}
    sweep(str(tiny_store), "linear", grid, tmp_path, base_recipe=base)
    head = tmp_path / "point000" / "seed0" / "head.pt"
    if damage == "missing keys":
        torch.save({"state_dict": {}}, head)
    else:
        head.write_bytes(damage)
    with pytest.raises(ConfigError, match=r"head.pt cannot be read .*the run's weights are damaged: train it again"):
        load_run(head.parent)
    assert sweep(str(tiny_store), "linear", grid, tmp_path, base_recipe=base).reused == 0  # trained again
    load_run(head.parent)


def test_a_truncated_evaluation_does_not_hide_its_run_from_the_ledger(tiny_store, tmp_path):
    from fercache.runs import ledger
    from fercache.scoring import evaluate
    from fercache.train import fit

    run = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 2}).run_dir
    evaluate(run)
    metrics = next(run.glob("eval-*/metrics.json"))
    metrics.write_text(metrics.read_text()[:40])
    result = ledger(tmp_path)
    assert [r["run"] for r in result.records] == [run] and not result.incomplete


def test_a_run_whose_mask_source_was_re_extracted_is_stale_and_retrained(tiny_store, tiny_manifest, tiny_dataset,
                                                                         tmp_path):
    from fercache.extract import extract
    from fercache.runs import ledger
    from fercache.train import fit

    source = tmp_path / "null.zarr"
    extract(tiny_manifest, "null:", source, pretrained="none", root=tiny_dataset, workers=0, progress=False)
    kw = {"mask_source": str(source), "out_dir": tmp_path / "runs", "recipe": {"epochs": 1}, "reuse": True}
    first = fit(str(tiny_store), "mask", **kw)
    assert fit(str(tiny_store), "mask", **kw).reused
    extract(tiny_manifest, "null:", source, pretrained="none", image_size=40, root=tiny_dataset, workers=0,
            progress=False, overwrite=True)
    assert str(ledger(tmp_path / "runs").records[0]["status"]) == "STALE: mask source re-extracted"
    again = fit(str(tiny_store), "mask", **kw)
    assert not again.reused and again.run_dir == first.run_dir
    assert str(ledger(tmp_path / "runs").records[0]["status"]) == "ok"


def test_a_train_step_and_a_sweep_point_of_one_setting_count_once_in_the_ledger(tiny_store, tmp_path):
    from fercache.runs import ledger
    from fercache.sweeps import sweep
    from fercache.train import fit

    recipe = {"batch_size": 8, "epochs": 2, "lr": 1e-2}
    fit(str(tiny_store), "linear", out_dir=tmp_path / "a", recipe=recipe)
    sweep(str(tiny_store), "linear", {"lr": [1e-2]}, tmp_path / "b", base_recipe={"batch_size": 8, "epochs": 2})
    result = ledger(tmp_path)
    row = next(iter(result.tables.values())).rows[0]
    assert row.count == "1" and len(result.copies) == 1 and "same settings and seed" in result.copies[0]


def test_a_seed_too_large_for_torch_is_a_clear_error(tiny_store, tmp_path):
    from tests.test_cli import invoke

    r = invoke("train-head", tiny_store, "--seeds", "99999999999999999999", "--out", tmp_path)
    assert r.exit_code == 2 and "error: seed 99999999999999999999 is over 9223372036854775807" in r.output


def test_chunk_rows_past_the_manifest_allocate_only_the_rows_there_are(tiny_manifest, tiny_dataset,
                                                                      tiny_encoder_spec, tiny_store, tmp_path):
    from fercache.extract import extract
    from fercache.store import open_store

    out = tmp_path / "big-chunks.zarr"
    extract(tiny_manifest, tiny_encoder_spec, out, pretrained="none", root=tiny_dataset, chunk_rows=10_000_000,
            workers=0, progress=False)
    s = open_store(out)
    assert s.n_chunks == 1 and s.chunk_rows == 10_000_000
    assert s.group[f"features/{s.default_output}"].chunks[0] == 72 and s.group["ok"].chunks == (72,)
    file = next(p for p in (out / f"features/{s.default_output}" / "c").rglob("*") if p.is_file())
    assert file.stat().st_size == 72 * s.outputs[s.default_output] * 2  # float16, uncompressed: 72 rows only
    np.testing.assert_allclose(s.features(), open_store(tiny_store).features(), atol=1e-3)


# --- pipelines ----------------------------------------------------------------------------------------------


def _pipeline(tmp_path, text):
    p = tmp_path / "p.toml"
    p.write_text(text)
    return p


def test_a_variable_referring_to_another_is_expanded_and_a_circle_refused(tmp_path):
    from fercache.pipeline import load_pipeline

    steps = load_pipeline(_pipeline(tmp_path, '[vars]\nout = "o"\nruns = "{out}/runs"\n[[step]]\nrun = "runs"\n'
                                               'root = "{runs}"\n'))
    assert steps[0]["root"] == "o/runs"
    with pytest.raises(ConfigError, match=r"\[vars\] a -> b -> a: variables refer to each other in a circle"):
        load_pipeline(_pipeline(tmp_path, '[vars]\na = "{b}"\nb = "{a}"\n[[step]]\nrun = "runs"\nroot = "{a}"\n'))


@pytest.mark.parametrize("value", ["abc", "64.0"])
def test_an_environment_override_of_another_type_is_refused_in_check(tmp_path, monkeypatch, value):
    from fercache.pipeline import check_pipeline

    monkeypatch.setenv("FERCACHE_BATCH", value)
    p = _pipeline(tmp_path, '[vars]\nbatch = 64\n[[step]]\nrun = "runs"\nroot = "."\n')
    with pytest.raises(ConfigError, match=rf"FERCACHE_BATCH={value}: \[vars\] batch is a whole number in the file "
                                          r"\(64\); give a whole number"):
        check_pipeline(p)
    monkeypatch.setenv("FERCACHE_BATCH", "32")
    assert check_pipeline(p) == 1


def test_check_refuses_an_out_that_is_a_file_and_two_steps_writing_one_store(tmp_path, tiny_manifest,
                                                                             tiny_encoder_spec):
    from fercache.pipeline import check_pipeline

    (tmp_path / "taken").write_text("mine")
    m2 = tmp_path / "m2.csv"
    m2.write_bytes(tiny_manifest.read_bytes())
    extract = f'[[step]]\nrun = "extract"\nmanifest = "{{m}}"\nencoder = "{tiny_encoder_spec}"\npretrained = "none"\n'
    train = f'[[step]]\nrun = "train"\nstore = "{tmp_path}/s.zarr"\nhead = "linear"\nout = "{tmp_path}/taken"\n'
    with pytest.raises(ConfigError, match=r"step 2 \(train\): it writes the folder .*taken/s-linear, but .*taken is a "
                                          r"file; choose another out"):
        check_pipeline(_pipeline(tmp_path, f'[vars]\nm = "{tiny_manifest}"\n' + extract + f'out = "{tmp_path}/s.zarr"\n'
                                 + train))
    two = (f'[vars]\nm = "{tiny_manifest}"\n' + extract + f'out = "{tmp_path}/s.zarr"\n'
           + extract.replace("{m}", str(m2)) + f'out = "{tmp_path}/s.zarr"\n')
    with pytest.raises(ConfigError, match=r"steps 1 and 2 both write the store .*s.zarr from different inputs "
                                          r"\(manifest differ\)"):
        check_pipeline(_pipeline(tmp_path, two))
    runs = f'[[step]]\nrun = "runs"\nroot = "{tmp_path}"\ncsv = "{m2}"\n'
    with pytest.raises(ConfigError, match=r"step 1 \(runs\): csv .*m2.csv exists and is not a file this command wrote"):
        check_pipeline(_pipeline(tmp_path, runs))


def test_every_classification_and_au_metric_against_scikit_learn_and_torchmetrics():
    """Random cases, including cells where the head predicts classes the test set lacks. UAR is the mean recall
    over the classes in the true labels (scikit-learn's balanced accuracy); torchmetrics' macro recall would count
    a predicted-only class as 0, which is not UAR."""
    import torch
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy, MulticlassF1Score

    from fercache import metrics

    rng = np.random.default_rng(1)
    for _ in range(100):
        k = int(rng.integers(2, 9))
        y = rng.integers(0, max(2, k - int(rng.integers(0, 3))), int(rng.integers(5, 60)))
        pred = rng.integers(0, k, len(y))
        got = metrics.classification(y, pred, [str(i) for i in range(k)])
        t, p = torch.as_tensor(y), torch.as_tensor(pred)
        assert got["macro_f1"] == pytest.approx(MulticlassF1Score(k, average="macro")(p, t).item(), abs=1e-6)
        assert got["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
        assert got["accuracy"] == pytest.approx(MulticlassAccuracy(k, average="micro")(p, t).item(), abs=1e-6)
        assert got["uar"] == pytest.approx(balanced_accuracy_score(y, pred))
    for _ in range(30):  # AU F1 per AU, -1 (not annotated) ignored
        y = rng.integers(-1, 2, (80, 4))
        prob = rng.random((80, 4))
        got = metrics.au(y, prob, list("abcd"))["per_au_f1_at_0.5"]
        for a, name in enumerate("abcd"):
            want = BinaryF1Score(ignore_index=-1)(torch.as_tensor(prob[:, a]), torch.as_tensor(y[:, a])).item()
            assert got[name] == pytest.approx(want, abs=1e-6)
