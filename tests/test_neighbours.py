"""Near-duplicates across splits from cached features: the right neighbour, mirrored views, chunking, the outputs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from fercache.data import FeatureSet
from fercache.neighbours import counts, near_duplicates, nearest_earlier, summarize


def _fs(x, split, label, xv=None, clip_id=None):
    n = len(x)
    ids = np.array([f"r{i}" for i in range(n)], dtype=object)
    return FeatureSet(ids, x, np.array(label, dtype=object), np.array(split, dtype=object), ids.copy(), xv=xv,
                      views=["flip"] if xv is not None else [], clip_id=clip_id)


def _example():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(26, 64)).astype(np.float32)
    flip = rng.normal(size=(26, 1, 64)).astype(np.float32)  # each row's "mirrored view"
    split = ["train"] * 20 + ["val", "val", "test", "test", "test", "test"]
    label = ["happy"] * 24 + ["", "sad"]
    x[20] = x[3] + 0.01 * rng.normal(size=64)  # val: a near copy of train 3
    x[22] = x[21]  # test: an exact copy of a val image (test is compared with train + val)
    x[23] = flip[5, 0]  # test: the mirror of train 5
    x[24] = x[7]  # an unlabelled test copy: nothing to score, not a query
    return _fs(x, split, label, xv=flip)


def test_each_val_and_test_row_finds_its_copy_in_an_earlier_split():
    nb = nearest_earlier(_example())
    got = {int(q): (int(r), round(float(c), 3), bool(m)) for q, r, c, m in zip(nb.query, nb.ref, nb.cos, nb.mirrored)}
    assert set(got) == {20, 21, 22, 23, 25}  # row 24 is unlabelled
    assert got[20][0] == 3 and got[20][1] > 0.99 and not got[20][2]
    assert got[22] == (21, 1.0, False)
    assert got[23][:2] == (5, 1.0) and got[23][2]  # matched train 5's mirrored view
    assert got[21][1] < 0.6 and got[25][1] < 0.6  # unrelated random rows
    assert nb.units(0.99) == ["r22", "r23", "r20"]  # most similar first
    assert counts(nb, (0.99, 0.5)) == {0.99: {"val": 1, "test": 2}, 0.5: {"val": 1, "test": 2}}


def test_chunked_search_equals_one_big_matrix():
    fs = _example()
    a, b = nearest_earlier(fs), nearest_earlier(fs, chunk=2, ref_chunk=3)
    assert (a.query == b.query).all() and (a.ref == b.ref).all() and (a.mirrored == b.mirrored).all()
    np.testing.assert_allclose(a.cos, b.cos, atol=1e-6)


def test_a_video_store_reports_clips():
    fs = _example()
    fs.clip_id = np.array([f"c{i // 2}" for i in range(len(fs))], dtype=object)
    assert nearest_earlier(fs).units(0.99) == ["c11", "c10"]  # rows 22 and 23 are one clip; row 20 is clip 10


def test_near_dups_writes_csv_plots_and_a_manifest_for_the_same_store(tiny_store, tiny_manifest, tiny_dataset,
                                                                      tmp_path):
    from fercache.data import load_features
    from fercache.manifests import content_sha256, read_manifest

    # The tiny images are class patterns plus noise: take the median similarity as threshold, so about half count.
    cos = nearest_earlier(load_features(str(tiny_store))).cos
    threshold = float(np.median(cos))
    r = near_duplicates(str(tiny_store), tmp_path / "nd", threshold=threshold, pairs=4, root=tiny_dataset,
                        without_leaks_to=tmp_path / "clean.csv")
    rows = list(csv.DictReader(open(r["csv"])))
    assert r["queries"] == 48 and len(rows) == len(r["units"]) == int((cos >= threshold).sum()) > 0
    assert all(float(row["cosine"]) >= threshold - 1e-4 and row["split"] in ("val", "test") for row in rows)
    assert all(row["neighbour_split"] == "train" for row in rows if row["split"] == "val")
    assert [float(row["cosine"]) for row in rows] == sorted((float(row["cosine"]) for row in rows), reverse=True)
    assert (tmp_path / "nd" / "near-dups-hist.png").stat().st_size > 5000
    assert (tmp_path / "nd" / "near-dups-pairs.png").stat().st_size > 5000
    clean = read_manifest(r["manifest"])
    assert {x["sample_id"] for x in clean.rows if not x["label"]} == {row["sample_id"] for row in rows}
    assert content_sha256(clean) == content_sha256(read_manifest(tiny_manifest))  # same images: same store
    assert (load_features(str(tiny_store), r["manifest"]).label == "").sum() == len(rows)


def test_near_dups_without_the_images_still_writes_everything_but_the_pairs_figure(tiny_store, tmp_path, caplog):
    """A store travels without its images (that is what it is for): the pairs figure, an extra that needs them,
    failed the whole command, table and --without-leaks manifest included."""
    with caplog.at_level("WARNING", logger="fercache.neighbours"):
        r = near_duplicates(str(tiny_store), tmp_path / "nd", threshold=-1.0, pairs=4, root=tmp_path,
                            without_leaks_to=tmp_path / "clean.csv")
    assert r["units"] and "pairs_png" not in r and Path(r["manifest"]).is_file() and Path(r["csv"]).is_file()
    assert not (tmp_path / "nd" / "near-dups-pairs.png").exists()
    (said,) = caplog.messages
    assert said.startswith("near-dups-pairs.png not drawn: cannot draw the images: ") and said.endswith(
        "(--pairs 0 skips it)")


def test_near_dups_cli_prints_the_threshold_table(tiny_store, tmp_path):
    from .test_cli import invoke

    r = invoke("near-dups", tiny_store, "--threshold", "0.97", "--pairs", "0", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert "48 labelled val/test images" in r.output and "0.97" in r.output and "<- threshold" in r.output
    assert (tmp_path / "near-dups.csv").is_file() and not (tmp_path / "near-dups-pairs.png").exists()


def test_a_video_store_is_compared_clip_by_clip(video_store, tmp_path):
    from fercache.data import clip_means, load_features
    from fercache.manifests import read_manifest

    store, root = video_store
    frames = load_features(store)
    clips = clip_means(frames)
    assert len(clips) == 48 and clips.x.shape == (48, frames.x.shape[1])
    rows = frames.clip_id == clips.clip_id[5]
    np.testing.assert_allclose(clips.x[5], frames.x[rows].astype(np.float32).mean(0), rtol=1e-5, atol=1e-5)
    r = near_duplicates(store, tmp_path / "nd", threshold=-1.0, pairs=2, root=root,
                        without_leaks_to=tmp_path / "clean.csv")
    assert r["queries"] == 24 and len(r["units"]) == 24  # every val/test clip (threshold -1: all of them), once each
    assert set(r["units"]) == {c for c in clips.clip_id if not c.startswith("train")}
    clean = read_manifest(r["manifest"])
    assert {x["clip_id"] for x in clean.rows if not x["label"]} == set(r["units"])  # whole clips, every frame
    assert (tmp_path / "nd" / "near-dups-pairs.png").stat().st_size > 5000  # a clip is drawn by its middle frame
    # said as clips: the 24 val/test clips (of 4 to 6 frames each) were printed as "24 labelled val/test images"
    text = summarize(r)
    assert text.startswith(f"{store}: 24 labelled val/test clips against every earlier-split clip")
    assert "a clip is the mean of its frames' features" in text and "at -1.0: 24 val/test clip(s)" in text


def test_nearest_in_another_dataset_searches_only_its_train_and_val():
    from fercache.neighbours import nearest_in

    a, b = _example(), _example()
    b.split = np.array(["test"] * 26, dtype=object)
    b.split[:3] = "train"
    b.split[3] = "val"
    nb = nearest_in(a, b)
    got = dict(zip(nb.query.tolist(), nb.ref.tolist()))
    assert set(nb.ref.tolist()) <= {0, 1, 2, 3}  # never one of b's test rows
    assert got[20] == 3 and nb.cos[nb.query.tolist().index(20)] > 0.99  # a's val row 20 copies b's row 3 (val)
    assert nb.refs is b and len(nb.query) == 5


def test_near_dups_against_another_store(tiny_store, tiny_manifest, tiny_dataset, tmp_path, monkeypatch):
    from fercache.errors import StoreError
    from fercache.extract import extract
    from fercache.manifests import read_manifest, write_manifest
    from fercache.store import open_store

    from .test_cli import invoke

    # Dataset b: the same images under other ids, same splits, same encoder: a's val images are b's val images.
    m = read_manifest(tiny_manifest)
    b_manifest = write_manifest(type(m)(rows=[dict(r, sample_id="b/" + r["sample_id"]) for r in m.rows], source="b"),
                                tmp_path / "b.csv")
    spec = open_store(tiny_store).meta["encoder_args"]["spec"]
    shutil.copytree(tiny_dataset, tmp_path / "b_data")  # each dataset under its own data root, as FER2013 and CK+48
    extract(b_manifest, spec, tmp_path / "b.zarr", root=tmp_path / "b_data", chunk_rows=16, workers=0, progress=False)
    monkeypatch.delenv("FERCACHE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no --data-root: the pairs' images are found under the root each store records
    r = invoke("near-dups", tiny_store, "--against", tmp_path / "b.zarr", "--threshold", "0.999", "--pairs", "2",
               "--out", tmp_path / "nd")
    assert r.exit_code == 0, r.output
    assert "against every b train/val image" in r.output
    rows = list(csv.DictReader(open(tmp_path / "nd" / "near-dups.csv")))
    val = [row for row in rows if row["split"] == "val"]
    assert len(val) == 24 and all(row["neighbour"] == "b/" + row["sample_id"] for row in val)
    assert all(row["neighbour_split"] in ("train", "val") for row in rows)
    assert (tmp_path / "nd" / "near-dups-pairs.png").stat().st_size > 5000
    extract(tiny_manifest, "null:", tmp_path / "null.zarr", root=tiny_dataset, image_size=16, workers=0, progress=False)
    with pytest.raises(StoreError, match="extracted differently"):
        near_duplicates(str(tiny_store), tmp_path / "nd2", against=str(tmp_path / "null.zarr"))
    assert not (tmp_path / "nd2").exists()  # refused before its folder was made
