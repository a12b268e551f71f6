"""Each adapter reads a fixture written in its dataset's native format and maps native labels to canonical ones."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fercache import labels as L
from fercache.adapters import ADAPTERS, build
from fercache.errors import ManifestError, UnknownNameError
from fercache.manifests import read_manifest, write_manifest

from .conftest import write_imagefolder


def _img(path: Path, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(path)
    return path


def _by_id(manifest) -> dict:
    return {r["sample_id"]: r for r in manifest.rows}


def test_native_tables_cover_methods_md():
    # The datasets' published orders, spot checks of each: the first and last code of each dataset.
    assert L.NATIVE["fer2013"][0] == "anger" and L.NATIVE["fer2013"][6] == "neutral"
    assert L.NATIVE["rafdb"][1] == "surprise" and L.NATIVE["rafdb"][7] == "neutral"
    assert L.NATIVE["affectnet"][0] == "neutral" and L.NATIVE["affectnet"][7] == "contempt"
    assert L.NATIVE["ckplus"][2] == "contempt" and L.NATIVE["ckplus"][7] == "surprise"
    assert L.NATIVE["dfew"][3] == "neutral" and L.NATIVE["dfew"][7] == "fear"
    assert L.NATIVE["ferv39k"][4] == "neutral"
    assert L.NATIVE["mafw"][11] == "disappointment"
    for table in L.NATIVE.values():
        assert set(table.values()) <= set(L.CANONICAL)


def test_imagefolder_fer2013_layout(tmp_path):
    write_imagefolder(tmp_path / "fer", per_class=2)
    m = build("imagefolder", tmp_path / "fer", data_root=tmp_path)
    rows = _by_id(m)
    assert len(m) == 2 * 4 * 3
    r = rows["val/angry/val_angry_000"]
    assert (r["label"], r["split"], r["path"]) == ("anger", "val", "fer/val/angry/val_angry_000.jpg")


def test_imagefolder_sfew_val_folder_as_the_test_split(tmp_path):
    """SFEW 2.0: Train/ and Val/ with capitalised class folders; its Val is the split papers report."""
    for split in ("Train", "Val"):
        for cls in ("Angry", "Happy"):
            _img(tmp_path / "sfew" / split / cls / f"{split}_{cls}.png")
    m = build("imagefolder", tmp_path / "sfew", data_root=tmp_path, val="test")
    assert {(r["sample_id"], r["label"], r["split"]) for r in m.rows} == {
        ("Train/Angry/Train_Angry", "anger", "train"), ("Train/Happy/Train_Happy", "happy", "train"),
        ("Val/Angry/Val_Angry", "anger", "test"), ("Val/Happy/Val_Happy", "happy", "test")}
    assert {r["split"] for r in build("imagefolder", tmp_path / "sfew").rows} == {"train", "val"}
    with pytest.raises(ManifestError, match="--option val=dev"):
        build("imagefolder", tmp_path / "sfew", val="dev")


def test_imagefolder_unknown_class_names_the_folder(tmp_path):
    _img(tmp_path / "train" / "bored" / "a.png")
    with pytest.raises(ManifestError, match="bored"):
        build("imagefolder", tmp_path)


def _ckplus_fixture(root: Path) -> Path:
    _img(root / "CK+48" / "sadness" / "S010_002_00000014.png")
    _img(root / "CK+48" / "contempt" / "S011_001_00000009.png")
    with open(root / "ckplus_facs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "video", "number.aus", "AU.combination", "emotion", "valence"])
        w.writerow(["S010", "S010_002", 3, "1_4_15", "sadness", "negative"])
        w.writerow(["S011", "S011_001", 2, "12_1.4", "contempt", ""])
    return root


def test_ckplus_aus_subject_and_clip(tmp_path):
    m = build("ckplus", _ckplus_fixture(tmp_path))
    rows = _by_id(m)
    sad = rows["S010_002_00000014"]
    assert sad["label"] == "sad" and sad["subject"] == "S010" and sad["clip_id"] == "S010_002"
    assert sad["frame_idx"] == "14"
    assert (sad["AU1"], sad["AU4"], sad["AU15"], sad["AU12"]) == ("1", "1", "1", "0")
    con = rows["S011_001_00000009"]
    # An unreadable code ("1.4") means unlisted AUs are unknown, not absent.
    assert con["label"] == "contempt" and con["AU12"] == "1" and con["AU1"] == "-1"
    assert m.au_columns == ["AU1", "AU4", "AU12", "AU15"]


def _ckplus_release_fixture(root: Path) -> Path:
    """The CK+ release's three folders: S005/001 disgust (code 3) and S010/002 surprise (7), both FACS-coded,
    S010's label files naming its 4th of 5 frames; S011/001 FACS-coded without an emotion; S012/003 neither."""
    for seq, n in (("S005/001", 5), ("S010/002", 5), ("S011/001", 3), ("S012/003", 4)):  # S010's 5th: past its peak
        for i in range(1, n + 1):
            _img(root / "cohn-kanade-images" / seq / f"{seq.replace('/', '_')}_{i:08d}.png")
    for seq, last, code in (("S005/001", 5, "   3.0000000e+00\n"), ("S010/002", 4, "   7.0000000e+00\n")):
        (root / "Emotion" / seq).mkdir(parents=True)
        (root / "Emotion" / seq / f"{seq.replace('/', '_')}_{last:08d}_emotion.txt").write_text(code)
    for seq, last, aus in (("S005/001", 5, [(9, 0), (17, 2)]), ("S010/002", 4, [(1, 3), (2, 3), (5, 1), (27, 4)]),
                           ("S011/001", 3, [(12, 0)])):
        (root / "FACS" / seq).mkdir(parents=True)
        lines = "".join(f"   {au:.7e}   {i:.7e}\n" for au, i in aus)
        (root / "FACS" / seq / f"{seq.replace('/', '_')}_{last:08d}_facs.txt").write_text(lines)
    return root


def test_ckplus_release_labels_the_peak_frames_from_its_emotion_codes_and_facs_files(tmp_path):
    src = _ckplus_release_fixture(tmp_path)
    m = build("ckplus_release", src)
    rows = _by_id(m)
    # the last 3 frames of each sequence with an emotion file, its native code mapped explicitly (3 disgust, 7 surprise)
    assert sorted(rows) == ["S005_001_00000003", "S005_001_00000004", "S005_001_00000005",
                            "S010_002_00000002", "S010_002_00000003", "S010_002_00000004"]
    peak = rows["S005_001_00000005"]
    assert (peak["label"], peak["subject"], peak["clip_id"], peak["frame_idx"]) == ("disgust", "S005", "S005_001", "5")
    assert peak["path"] == "cohn-kanade-images/S005/001/S005_001_00000005.png"
    assert {rows[f"S010_002_0000000{i}"]["label"] for i in (2, 3, 4)} == {"surprise"}
    assert m.au_columns == ["AU1", "AU2", "AU5", "AU9", "AU12", "AU17", "AU27"]  # every coded AU, S011's 12 too
    assert [peak[a] for a in m.au_columns] == ["0", "0", "0", "1", "0", "1", "0"]  # intensity 0: present, uncoded
    # the 8-class protocol: the first frame of each sequence neutral, its AUs not coded; never a peak frame
    rows = _by_id(build("ckplus_release", src, neutral_frames="2", peak_frames="2"))
    first = rows["S005_001_00000001"]
    assert (first["label"], first["clip_id"], first["AU9"]) == ("neutral", "S005_001_neutral", "-1")
    assert sorted(i for i in rows if i.startswith("S010")) == [f"S010_002_0000000{i}" for i in (1, 2, 3, 4)]
    assert [rows[f"S010_002_0000000{i}"]["label"] for i in (1, 2, 3, 4)] == ["neutral", "neutral", "surprise",
                                                                             "surprise"]
    # AU work: the FACS-coded sequence without an emotion too, unlabelled; S012 (neither) never
    rows = _by_id(build("ckplus_release", src, unlabelled="true"))
    assert rows["S011_001_00000003"]["label"] == "" and rows["S011_001_00000003"]["AU12"] == "1"
    assert not any(i.startswith("S012") for i in rows) and len(rows) == 9
    # a pipeline's [step] gives the options as TOML numbers and booleans, not text
    assert _by_id(build("ckplus_release", src, unlabelled=True, peak_frames=1, test_fraction=0.0)).keys() == {
        "S005_001_00000005", "S010_002_00000004", "S011_001_00000003"}


def test_ckplus_release_refuses_what_it_cannot_read(tmp_path):
    src = _ckplus_release_fixture(tmp_path)
    for options, says in (({"peak_frames": "0"}, "--option peak_frames=0: a whole number >= 1"),
                          ({"neutral_frames": "x"}, "--option neutral_frames=x: a whole number >= 0"),
                          ({"unlabelled": "maybe"}, "--option unlabelled=maybe: true or false"),
                          ({"test_fraction": "abc"},
                           "--option test_fraction=abc: a fraction of the subjects in [0, 1)"),
                          ({"emotion": "Emotions"}, "ckplus_release annotation folder ")):
        with pytest.raises(ManifestError, match=re.escape(says)):
            build("ckplus_release", src, **options)
    (src / "Emotion/S005/001/S005_001_00000005_emotion.txt").write_text("   9.0000000e+00\n")
    with pytest.raises(ManifestError, match=r"S005_001_00000005_emotion.txt: label 9 is not a ckplus code"):
        build("ckplus_release", src)
    (src / "Emotion/S005/001/S005_001_00000005_emotion.txt").write_text("   3.5000000e+00\n")
    with pytest.raises(ManifestError, match=r"expected one emotion code 0-7"):
        build("ckplus_release", src)
    (src / "Emotion/S005/001/S005_001_00000005_emotion.txt").unlink()
    (src / "Emotion/S005/001/S005_001_00000009_emotion.txt").write_text("   3.0000000e+00\n")
    with pytest.raises(ManifestError, match=r"S005_001_00000009_emotion.txt labels frame 9, but .*cohn-kanade-images/"
                                            r"S005/001 has no image of that frame"):
        build("ckplus_release", src)


def test_ckplus_release_crops_each_frame_to_the_face_its_landmarks_outline(tmp_path, caplog):
    """The release's frames are 640x490 with the face a small part: encoded whole, CLIP sees mostly background."""
    from fercache.preprocess import decode_image

    src = _ckplus_release_fixture(tmp_path)
    with caplog.at_level("WARNING", logger="fercache.adapters"):
        m = build("ckplus_release", src)
    assert "bbox" not in m.columns and "has no Landmarks/ folder: whole frames are encoded" in caplog.text
    # 68 points spanning x 100-200, y 150-230: a square of the larger extent (100) grown by 15% on every side
    points = "".join(f"   {100 + (i % 2) * 100:.7e}   {150 + (i % 3 == 0) * 80:.7e}\n" for i in range(68))
    for seq, frames in (("S005/001", range(1, 6)), ("S010/002", range(1, 4))):  # S010's 4th (its peak) has none
        for i in frames:
            file = src / "Landmarks" / seq / f"{seq.replace('/', '_')}_{i:08d}_landmarks.txt"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(points)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fercache.adapters"):
        rows = _by_id(build("ckplus_release", src))
    assert (rows["S005_001_00000005"]["bbox"] == "85 125 215 255"
            and rows["S010_002_00000003"]["bbox"] == "85 125 215 255")
    assert rows["S010_002_00000004"]["bbox"] == ""  # encoded whole, and said
    assert caplog.messages == [f"1 frame(s) have no landmarks file (e.g. {src}/Landmarks/S010/002/"
                               "S010_002_00000004_landmarks.txt): encoded whole"]
    # the fixture's frames are 24x24, so this box lies wholly outside them: that row fails, never a black crop
    with pytest.raises(ValueError, match="no area inside the 24x24 image"):
        decode_image(src / rows["S005_001_00000005"]["path"], rows["S005_001_00000005"]["bbox"])
    assert _by_id(build("ckplus_release", src, face_margin="0"))["S005_001_00000005"]["bbox"] == "100 140 200 240"
    assert "bbox" not in build("ckplus_release", src, landmarks="none").columns
    with pytest.raises(ManifestError, match="ckplus_release annotation folder .*/LM not found"):
        build("ckplus_release", src, landmarks="LM")
    (src / "Landmarks/S005/001/S005_001_00000005_landmarks.txt").write_text("   1.0e+02   x\n")
    with pytest.raises(ManifestError, match=r"S005_001_00000005_landmarks.txt: expected CK\+ landmarks"):
        build("ckplus_release", src)


def test_a_test_fraction_that_is_no_fraction_is_said_not_a_traceback(tmp_path):
    """`--option test_fraction=abc` was a ValueError traceback; 1.5 put every subject in test."""
    for bad in ("abc", "1.5", "-0.1"):
        with pytest.raises(ManifestError, match=re.escape(f"--option test_fraction={bad}: a fraction")):
            build("ckplus", _ckplus_fixture(tmp_path), test_fraction=bad)


def test_jaffe_codes(tmp_path):
    _img(tmp_path / "KA.AN1.39.tiff")
    _img(tmp_path / "YM.NE2.50.tiff")
    rows = _by_id(build("jaffe", tmp_path))
    assert rows["KA.AN1.39"]["label"] == "anger" and rows["KA.AN1.39"]["subject"] == "KA"
    assert rows["YM.NE2.50"]["label"] == "neutral"


def test_ferplus_majority_and_drops(tmp_path):
    header = ["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
              "contempt", "unknown", "NF"]
    rows = [
        ["Training", "fer0000000.png", 4, 0, 0, 1, 3, 2, 0, 0, 0, 0],   # no strict majority (4/10) -> dropped
        ["Training", "fer0000001.png", 0, 0, 0, 0, 0, 0, 0, 6, 4, 0],   # contempt majority
        ["PublicTest", "fer0000002.png", 0, 0, 9, 0, 0, 0, 0, 0, 1, 0],  # surprise
        ["PrivateTest", "fer0000003.png", 0, 0, 0, 0, 0, 0, 0, 0, 0, 10],  # not a face -> dropped
        ["Training", "", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # removed image
    ]
    with open(tmp_path / "fer2013new.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    got = _by_id(build("ferplus", tmp_path))
    assert set(got) == {"train/fer0000001", "val/fer0000002"}
    assert got["train/fer0000001"]["label"] == "contempt"
    assert (got["val/fer0000002"]["label"] == "surprise"
            and got["val/fer0000002"]["path"].endswith("FER2013Valid/fer0000002.png"))


def _fer2013_csv(path: Path, rows: list[tuple[int, np.ndarray | str, str]],
                 header=("emotion", "pixels", "Usage")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for emotion, pixels, usage in rows:
            blob = pixels if isinstance(pixels, str) else " ".join(map(str, pixels.ravel()))
            w.writerow([emotion, blob, usage] if header[1].strip() == "pixels" else [emotion, usage, blob])
    return path


def test_fer2013_csv_writes_ferplus_named_pngs_with_native_labels(tmp_path):
    rng = np.random.default_rng(0)
    faces = [rng.integers(0, 256, (48, 48), dtype=np.uint8) for _ in range(4)]
    usage = ["Training", "Training", "PublicTest", "PrivateTest"]
    _fer2013_csv(tmp_path / "fer2013.csv", [(c, f, u) for c, f, u in zip((0, 6, 3, 5), faces, usage)])
    m = build("fer2013csv", tmp_path)
    got = _by_id(m)
    assert [(r["sample_id"], r["label"], r["split"]) for r in m.rows] == [
        ("train/fer0000000", "anger", "train"), ("train/fer0000001", "neutral", "train"),
        ("val/fer0000002", "happy", "val"), ("test/fer0000003", "surprise", "test")]
    assert got["test/fer0000003"]["path"] == "FER2013Test/fer0000003.png"
    for face, r in zip(faces, m.rows):  # lossless: the pixels of the csv, exactly
        assert np.array_equal(np.asarray(Image.open(tmp_path / r["path"])), face)
    # The same folder, with FERPlus's vote file beside it, builds a FERPlus manifest with the same ids.
    votes = [[u, f"fer{i:07d}.png", 10, 0, 0, 0, 0, 0, 0, 0, 0, 0] for i, u in enumerate(usage)]
    with open(tmp_path / "fer2013new.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Usage", "Image name"] + list(L.FERPLUS_VOTES)] + votes)
    plus = build("ferplus", tmp_path)
    assert [r["sample_id"] for r in plus.rows] == [r["sample_id"] for r in m.rows]
    assert all((tmp_path / r["path"]).is_file() for r in plus.rows)


def test_fer2013_csv_icml_header_rerun_and_errors(tmp_path):
    face = np.full((48, 48), 7, np.uint8)
    _fer2013_csv(tmp_path / "icml_face_data.csv", [(2, face, "Training")], header=("emotion", " Usage", " pixels"))
    m = build("fer2013csv", tmp_path, data_root=tmp_path, csv_file="icml_face_data.csv", images=str(tmp_path / "png"))
    assert m.rows[0]["label"] == "fear" and m.rows[0]["path"] == "png/FER2013Train/fer0000000.png"
    png = tmp_path / "png" / "FER2013Train" / "fer0000000.png"
    before = png.stat().st_mtime_ns
    build("fer2013csv", tmp_path, data_root=tmp_path, csv_file="icml_face_data.csv", images=str(tmp_path / "png"))
    assert png.stat().st_mtime_ns == before  # a re-run leaves matching images alone...
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(png)
    build("fer2013csv", tmp_path, data_root=tmp_path, csv_file="icml_face_data.csv", images=str(tmp_path / "png"))
    assert np.array_equal(np.asarray(Image.open(png)), face)  # ...and rewrites one that is not its row's
    _fer2013_csv(tmp_path / "short.csv", [(0, "1 2 3", "Training")])
    with pytest.raises(ManifestError, match=r"short.csv:2: `pixels` has 3 values"):
        build("fer2013csv", tmp_path, csv_file="short.csv")
    _fer2013_csv(tmp_path / "empty.csv", [(0, "", "Training")])
    with pytest.raises(ManifestError, match=r"empty.csv:2: `pixels` has 0 values;"):
        build("fer2013csv", tmp_path, csv_file="empty.csv")
    _fer2013_csv(tmp_path / "code.csv", [(7, face, "Training")])
    with pytest.raises(ManifestError, match=r"code.csv:2: label 7 is not a fer2013 code"):
        build("fer2013csv", tmp_path, csv_file="code.csv")
    with pytest.raises(ManifestError, match="csv_file=NAME"):
        build("fer2013csv", tmp_path, csv_file="missing.csv")


def test_rafdb_list(tmp_path):
    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 5\ntest_0001.jpg 1\n")
    rows = _by_id(build("rafdb", tmp_path))
    assert rows["train_00001"]["label"] == "sad" and rows["train_00001"]["split"] == "train"
    assert rows["test_0001"]["label"] == "surprise" and rows["test_0001"]["split"] == "test"
    assert rows["test_0001"]["path"].endswith("Image/aligned/test_0001_aligned.jpg")


def test_rafdb_bad_code_names_file_and_line(tmp_path):
    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 5\ntrain_00002.jpg 9\n")
    with pytest.raises(ManifestError, match=r"list_patition_label.txt:2: .*label 9"):
        build("rafdb", tmp_path)


def test_affectnet_codes_and_dropped_classes(tmp_path):
    for name, rows in (("training.csv", [("1/a.jpg", 6), ("1/b.jpg", 9)]), ("validation.csv", [("2/c.jpg", 7)])):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["subDirectory_filePath", "face_x", "expression"])
            w.writerows([(p, 0, e) for p, e in rows])
    got = _by_id(build("affectnet", tmp_path))
    assert set(got) == {"1/a", "2/c"}
    assert got["1/a"]["label"] == "anger" and got["2/c"]["label"] == "contempt" and got["2/c"]["split"] == "test"
    assert set(_by_id(build("affectnet", tmp_path, classes=7))) == {"1/a"}  # the 7-class protocol drops contempt
    with pytest.raises(ManifestError, match="--option classes=6: 8 .with contempt. or 7"):
        build("affectnet", tmp_path, classes=6)


def test_expw_bbox(tmp_path):
    (tmp_path / "label").mkdir()
    (tmp_path / "label" / "label.lst").write_text("afraid_1.jpg 0 10 20 110 120 50.0 0\nhappy_9.jpg 1 5 6 7 8 40.1 6\n")
    got = _by_id(build("expw", tmp_path))
    assert got["afraid_1_0"]["label"] == "anger" and got["afraid_1_0"]["bbox"] == "20 10 110 120"
    assert got["happy_9_1"]["label"] == "neutral"


def test_affwild2_expr_and_au(tmp_path):
    for i in (1, 2, 3):
        _img(tmp_path / "cropped_aligned" / "vid1" / f"{i:05d}.jpg")
    expr = tmp_path / "annotations" / "EXPR_Classification_Challenge" / "Train_Set"
    expr.mkdir(parents=True)
    (expr / "vid1.txt").write_text("Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n4\n-1\n7\n5\n")
    got = _by_id(build("affwild2", tmp_path))
    assert got["vid1/00001"]["label"] == "happy" and got["vid1/00003"]["label"] == "other"
    assert "vid1/00002" not in got and "vid1/00004" not in got  # -1 unlabelled; frame 4 has no image
    au = tmp_path / "annotations" / "AU_Detection_Challenge" / "Validation_Set"
    au.mkdir(parents=True)
    (au / "vid1.txt").write_text("AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26\n"
                                 "1,0,0,0,0,0,1,0,0,0,0,0\n" + ",".join(["-1"] * 12) + "\n1,-1,0,0,0,0,0,0,0,0,0,1\n")
    got = _by_id(build("affwild2", tmp_path, task="au"))
    assert got["vid1/00001"]["AU12"] == "1" and got["vid1/00001"]["split"] == "test"
    assert "vid1/00002" not in got
    assert got["vid1/00003"]["AU2"] == "-1" and got["vid1/00003"]["AU26"] == "1"


@pytest.mark.parametrize("fmt,list_path,line,native,expected", [
    ("dfew", "annotation/set_1/train.csv", "video_name,label\n12,3\n", 3, "neutral"),
    ("ferv39k", "train_All.txt", "Scene/clipA 4\n", 4, "neutral"),
    ("mafw", "single/set_1/train.txt", "clipA 9\n", 9, "anxiety"),
])
def test_video_frame_folders(tmp_path, fmt, list_path, line, native, expected):
    frames = {"dfew": "clip_224x224/00012", "ferv39k": "2_ClipsforFaceCrop/Scene/clipA", "mafw": "frames/clipA"}[fmt]
    for i in range(3):
        _img(tmp_path / frames / f"{i:03d}.jpg")
    (tmp_path / list_path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / list_path).write_text(line)
    kw = {"test": ""} if fmt == "ferv39k" else {}
    if fmt in ("dfew", "mafw"):
        test_list = list_path.replace("train", "test")
        (tmp_path / test_list).write_text("")
    m = build(fmt, tmp_path, **kw)
    assert len(m) == 3 and {r["label"] for r in m.rows} == {expected}
    assert [r["frame_idx"] for r in m.rows] == ["0", "1", "2"] and len({r["clip_id"] for r in m.rows}) == 1


def test_every_adapter_has_a_docstring():
    for name, fn in ADAPTERS.items():
        assert fn.__doc__, name


def test_unknown_format():
    with pytest.raises(UnknownNameError, match="imagefolder") as e:
        build("nope", ".")
    assert "did you mean" not in str(e.value)  # nothing close: no guess
    with pytest.raises(UnknownNameError, match=r"unknown manifest format 'ferplsu' \(did you mean 'ferplus'\?\)"):
        build("ferplsu", ".")


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["sample_id", "path", "label", "split", "subject"]] + rows)
    return path


@pytest.mark.parametrize("rows,match", [
    ([["a", "x.jpg", "happy", "train", "s"], ["a", "y.jpg", "sad", "train", "s"]],
     r":3: duplicate sample_id 'a' \(first on line 2\)"),
    ([["a", "x.jpg", "joyful", "train", "s"]], r":2: unknown label 'joyful'"),
    ([["a", "../x.jpg", "happy", "train", "s"]], r":2: path '../x.jpg' escapes the data root"),
    ([["a", "/etc/passwd", "happy", "train", "s"]], r":2: path '/etc/passwd' escapes"),
    ([["a", "x.jpg", "happy", "holdout", "s"]], r":2: unknown split 'holdout'"),
    ([["a", "x.jpg", "happy", "train", "s"], ["b", "y", " z.jpg", "happy", "train", "s"]],
     r":3: 6 fields, the header has 5; a value holding a comma must be quoted"),
    ([["a", "x.jpg", "happy", "train"]], r":2: 4 fields, the header has 5; an empty value is still a field"),
])
def test_bad_manifest_rows_name_file_and_line(tmp_path, rows, match):
    path = _write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(ManifestError, match=match) as e:
        read_manifest(path)
    assert "m.csv" in str(e.value)


def test_a_manifest_saved_by_a_spreadsheet_reads_and_an_unreadable_one_is_named(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a byte-order mark, which made `sample_id` a missing column; a
    cut .csv.gz was click's bare "Aborted." (an EOFError), a binary file a UnicodeDecodeError traceback."""
    rows = [["a", "x.jpg", "happy", "train", "s"]]
    plain = _write_csv(tmp_path / "m.csv", rows)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_manifest(bom).rows == read_manifest(plain).rows and read_manifest(bom).columns[0] == "sample_id"
    gz = write_manifest(read_manifest(plain), tmp_path / "m.csv.gz")
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(gz.read_bytes()[:30])
    with pytest.raises(ManifestError, match=r"cut.csv.gz is not a readable manifest \(EOFError: .*\); a manifest is a "
                                            r"UTF-8 CSV file, gzipped when it ends in .gz$"):
        read_manifest(cut)
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ManifestError, match=r"bin.csv is not a readable manifest \(UnicodeDecodeError"):
        read_manifest(tmp_path / "bin.csv")
    (tmp_path / "empty.csv").write_text("sample_id,path,label,split,subject\n")
    with pytest.raises(ManifestError, match=r"empty.csv has a header but no rows$"):
        read_manifest(tmp_path / "empty.csv")


def test_missing_file_names_line(tmp_path):
    from fercache.manifests import resolve_paths

    _img(tmp_path / "x.jpg")
    m = read_manifest(_write_csv(tmp_path / "m.csv",
                                 [["a", "x.jpg", "happy", "train", "s"], ["b", "y.jpg", "sad", "test", "s"]]))
    with pytest.raises(ManifestError, match=r"m.csv:3: .*y.jpg"):
        resolve_paths(m, tmp_path)


def test_gzip_manifest_round_trip_is_byte_stable(tmp_path):
    write_imagefolder(tmp_path / "fer", per_class=1)
    m = build("imagefolder", tmp_path / "fer")
    a = write_manifest(m, tmp_path / "a.csv.gz").read_bytes()
    b = write_manifest(m, tmp_path / "a.csv.gz").read_bytes()
    assert a == b and read_manifest(tmp_path / "a.csv.gz").rows == m.rows


def test_a_missing_manifest_names_the_one_beside_it(tmp_path):
    # data_manifests/ has ckplus48.csv and fer2013.csv.gz: asking for the other ending is an easy slip
    for name in ("ck.csv", "fer2013.csv.gz", "notes.txt"):
        (tmp_path / name).write_text("")
    for asked, meant in (("ck.csv.gz", "ck.csv"), ("fer2013.csv", "fer2013.csv.gz"),
                         ("fer2031.csv.gz", "fer2013.csv.gz")):
        with pytest.raises(ManifestError, match=rf"{asked} does not exist \(did you mean '.*/{meant}'\?\)"):
            read_manifest(tmp_path / asked)
    with pytest.raises(ManifestError, match=r"zzz.csv does not exist; build one"):  # nothing close: no guess
        read_manifest(tmp_path / "zzz.csv")
    with pytest.raises(ManifestError, match=r"m.csv does not exist; build one"):  # no such folder either
        read_manifest(tmp_path / "nope" / "m.csv")


def test_a_folder_or_a_store_given_as_a_manifest_is_named_as_such(tiny_store, tmp_path):
    """Both said 'does not exist'; writing under a file was the OS's bare 'File exists'."""
    (tmp_path / "ck.csv").write_text("")
    with pytest.raises(ManifestError, match=rf"^manifest {tmp_path} is a folder; a manifest is a .csv or .csv.gz file "
                                            r"\(here: ck.csv\)$"):
        read_manifest(tmp_path)
    with pytest.raises(ManifestError, match=rf"^{tiny_store} is a feature store, not a manifest"):
        read_manifest(tiny_store)
    m = build("imagefolder", write_imagefolder(tmp_path / "fer", per_class=1))
    with pytest.raises(ManifestError,
                       match=rf"^cannot write {tmp_path}/ck.csv/m.csv: {tmp_path}/ck.csv is a file, not a "
                                            "folder; choose another -o$"):
        write_manifest(m, tmp_path / "ck.csv" / "m.csv")
    assert (tmp_path / "ck.csv").read_text() == ""


def test_a_missing_dataset_folder_or_data_root_is_one_line_naming_the_near_folder(tmp_path):
    from fercache.manifests import resolve_paths

    write_imagefolder(tmp_path / "data" / "fer2013", per_class=1)
    with pytest.raises(ManifestError, match=r"dataset folder .*fer2031 does not exist \(did you mean '.*fer2013'\?\)"):
        build("imagefolder", tmp_path / "data" / "fer2031")
    m = build("imagefolder", tmp_path / "data" / "fer2013", data_root=tmp_path / "data")
    assert len(resolve_paths(m, tmp_path / "data")) == len(m) > 0
    # a root that is not there: said once, not as every file missing under it
    with pytest.raises(ManifestError,
                       match=r"^data root .*/dat does not exist \(did you mean '.*/data'\?\)\. Pass --data-root"):
        resolve_paths(m, tmp_path / "dat")


def test_a_data_root_one_level_off_is_answered_with_the_right_one(tmp_path):
    """CK+48's paths are relative to ckplus48/, FER2013's to the folder above fer2013/: --data-root one level too
    high or too low is an easy slip, and every file then 'does not exist'."""
    from fercache.manifests import resolve_paths

    data = tmp_path / "data"
    write_imagefolder(data / "fer2013", per_class=1)
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    m = build("imagefolder", data / "fer2013", data_root=data)  # paths: fer2013/<split>/<class>/*.jpg
    n = len(m)
    with pytest.raises(ManifestError,
                       match=rf"^{n} file\(s\) .* under data root .*/data/fer2013: .* and {n - 5} more\. "
                                            rf"They are under {data}: pass --data-root {data}\.$"):
        resolve_paths(m, data / "fer2013")  # one level too low
    with pytest.raises(ManifestError, match=rf"They are under {data}: pass --data-root {data}\.$"):
        resolve_paths(m, tmp_path)  # one level too high: data/ is one of the folders below
    with pytest.raises(ManifestError, match=r"\. Pass --data-root \(or set FERCACHE_DATA\) to the folder"):
        resolve_paths(m, tmp_path / "elsewhere")  # nor above or below this one: no guess


def test_an_option_the_format_does_not_read_is_named_before_reading(tmp_path):
    """--option foo=1 was a TypeError traceback from inside the adapter; a pipeline found it at its manifest step."""
    from fercache.pipeline import check_pipeline

    write_imagefolder(tmp_path / "fer", per_class=1)
    with pytest.raises(ManifestError, match=r"^format 'imagefolder' has no option 'splt' \(did you mean 'split'\?\); "
                                            r"it takes: split='train', val='val'$"):
        build("imagefolder", tmp_path / "fer", splt="val")
    p = tmp_path / "p.toml"
    p.write_text(f'[[step]]\nrun = "manifest"\nformat = "imagefolder"\nsrc = "{tmp_path / "fer"}"\nout = "m.csv"\n'
                 '[step.options]\nfoo = 1\n')
    with pytest.raises(ManifestError, match=r"step 1 \(manifest\): format 'imagefolder' has no option 'foo'"):
        check_pipeline(p)


def test_an_option_value_the_format_refuses_is_found_before_a_pipeline_starts(tmp_path):
    """`test_fraction = 1.5` or `fold = 6` in a pipeline passed --check and failed when its step was reached
    (after an hour of extraction, were it a later step); dfew's fold 6 was a missing annotation file."""
    from fercache.pipeline import check_pipeline

    for fmt, options, says in (("ckplus", "test_fraction = 1.5", "test_fraction=1.5: a fraction of the subjects"),
                               ("ckplus_release", "peak_frames = 0", "peak_frames=0: a whole number >= 1"),
                               ("ckplus_release", "unlabelled = 'maybe'", "unlabelled=maybe: true or false"),
                               ("dfew", "fold = 6", "fold=6: one of the official folds 1-5"),
                               ("mafw", "fold = true", "fold=True: one of the official folds 1-5"),
                               ("affwild2", "task = 'va'", "task=va: 'expr' or 'au'")):
        p = tmp_path / "p.toml"
        p.write_text(f'[[step]]\nrun = "manifest"\nformat = "{fmt}"\nsrc = "{tmp_path}"\nout = "m.csv"\n'
                     f'[step.options]\n{options}\n')
        with pytest.raises(ManifestError, match=rf"^step 1 \(manifest\): --option {re.escape(says)}"):
            check_pipeline(p)
    with pytest.raises(ManifestError, match=r"--option fold=0: one of the official folds 1-5"):
        build("dfew", tmp_path, fold="0")
    p.write_text(f'[[step]]\nrun = "manifest"\nformat = "dfew"\nsrc = "{tmp_path}"\nout = "m.csv"\n'
                 '[step.options]\nfold = 5\n')
    assert check_pipeline(p) == 1  # a good value passes


def test_imagefolder_one_level_too_high_names_the_dataset_folder(tmp_path):
    """ckplus48/ holds CK+48/<class>/: read as one class named 'CK+48' ("unknown expression label")."""
    write_imagefolder(tmp_path / "ckplus48" / "CK+48", per_class=1)
    with pytest.raises(ManifestError, match=r"ckplus48 holds one folder, CK\+48/, which is no split or class: the "
                                            r"dataset is probably \S+/ckplus48/CK\+48$"):
        build("imagefolder", tmp_path / "ckplus48")
    assert len(build("imagefolder", tmp_path / "ckplus48" / "CK+48")) > 0


@pytest.mark.parametrize("fmt,missing,advice", [
    ("rafdb", "EmoLabel/list_patition_label.txt", "pass --option list_file=PATH"),
    ("affectnet", "training.csv", "pass --option train=PATH"),
    ("expw", "label/label.lst", "pass --option label_file=PATH"),
    ("ferv39k", "train_All.txt", "pass --option train=PATH"),
    ("dfew", "annotation/set_1/train.csv", r"this is fold 1 of 1-5 \(--option fold=N\)"),
    ("mafw", "single/set_1/train.txt", r"this is fold 1 of 1-5 \(--option fold=N\)"),
    ("affwild2", "annotations/EXPR_Classification_Challenge", "pass --option annotations=PATH"),
])
def test_a_missing_annotation_file_names_the_layout_and_the_option(tmp_path, fmt, missing, advice):
    """Six formats gave an OSError naming the path alone; affwild2 'found no samples'."""
    kind = "folder" if fmt == "affwild2" else "file"
    with pytest.raises(ManifestError, match=rf"^{fmt} annotation {kind} {tmp_path}/{missing} not found; {advice}.*"
                                            rf"The layout {fmt} reads: "):
        build(fmt, tmp_path)


def test_a_dataset_folder_one_level_off_names_the_folder_holding_the_annotations(tmp_path):
    (tmp_path / "raf" / "basic" / "EmoLabel").mkdir(parents=True)
    (tmp_path / "raf" / "basic" / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 5\n")
    for src in (tmp_path / "raf", tmp_path / "raf" / "basic" / "EmoLabel"):  # one too high, one too low
        with pytest.raises(ManifestError, match=rf"not found \(it is under {tmp_path}/raf/basic: pass that folder as "
                                                r"the dataset folder\)"):
            build("rafdb", src)
    with pytest.raises(ManifestError,
                       match=r"list_partition_label.txt not found \(did you mean '\S+/list_patition_label.txt'\?\)"):
        build("rafdb", tmp_path / "raf" / "basic", list_file="EmoLabel/list_partition_label.txt")


@pytest.mark.parametrize("fmt,path,text,match", [
    ("rafdb", "EmoLabel/list_patition_label.txt", "train_00001.jpg x\n",
     r"list_patition_label.txt:1: label must be an integer, got 'x'"),
    ("rafdb", "EmoLabel/list_patition_label.txt", "train_00001.jpg\n",
     r"list_patition_label.txt:1: expected `<image name> <label 1-7>`"),
    ("rafdb", "EmoLabel/list_patition_label.txt", "foo_00001.jpg 3\n",
     r"list_patition_label.txt:1: unknown split folder 'foo'"),
    ("affectnet", "training.csv", "subDirectory_filePath,expression\na/b.jpg,\n",
     r"training.csv:2: expression must be an integer, got ''"),
    ("affectnet", "training.csv", "subDirectory_filePath,expr\na/b.jpg,1\n", r"training.csv: no column expression"),
    ("expw", "label/label.lst", "a.jpg 0 1 2 3 4 0.9 happy\n", r"label.lst:1: label must be an integer, got 'happy'"),
    ("ferplus", "fer2013new.csv", "Usage,Image name,neutral\nTraining,a.png,1,x\n",
     r"fer2013new.csv:2: a vote count must be an integer, got 'x'"),
    ("ferplus", "fer2013new.csv", "Usage,Image name,neutral\nTrain,a.png,1\n",
     r"fer2013new.csv:2: expected Usage \(Training, PublicTest, PrivateTest\)"),
    ("ferplus", "fer2013new.csv", "Usage,Image name,neutral\nTraining\n", r"fer2013new.csv:2: expected Usage"),
    ("affwild2", "annotations/EXPR_Classification_Challenge/Train_Set/v1.txt", "",
     r"v1.txt: empty; expected a header line"),
    ("affwild2", "annotations/EXPR_Classification_Challenge/Train_Set/v1.txt", "Neutral,Anger\nsad\n",
     r"v1.txt:2: label must be an integer, got 'sad'"),
])
def test_a_malformed_annotation_line_is_named_by_file_and_line(tmp_path, fmt, path, text, match):
    """Each was a ValueError, KeyError or IndexError traceback from inside the adapter."""
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text(text)
    _img(tmp_path / "cropped_aligned" / "v1" / "00001.jpg")
    with pytest.raises(ManifestError, match=match):
        build(fmt, tmp_path)


def test_a_ckplus_image_not_named_subject_sequence_frame_is_named(tmp_path):
    root = _ckplus_fixture(tmp_path)
    _img(root / "CK+48" / "happy" / "S005.png")
    with pytest.raises(ManifestError, match=r"S005.png: expected a CK\+ name like S005_001_00000011.png"):
        build("ckplus", root)
