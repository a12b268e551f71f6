"""fercache frames: video files -> the frame folders the video adapters read."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fercache import cli
from fercache.errors import ConfigError, FercacheError

av = pytest.importorskip("av")

from fercache.video import videos_to_frames  # noqa: E402

N_FRAMES = 30


def write_video(path, n=N_FRAMES, size=(64, 48), rate=25):
    """n grey frames of level 8 * index (0-based): a decoded frame says which one it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        s.bit_rate = 20_000_000  # near-lossless: each frame keeps its own grey level
        for i in range(n):
            a = np.full((size[1], size[0], 3), 8 * i, np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def _level(path) -> float:
    return float(np.asarray(Image.open(path)).mean())


@pytest.fixture
def videos(tmp_path):
    src = tmp_path / "videos"
    write_video(src / "00001.mp4")
    write_video(src / "sub" / "clip b.avi", n=12)
    (src / "notes.txt").write_text("not a video")
    return src


def test_every_frame_of_every_video_lands_in_its_clip_folder_in_order(videos, tmp_path):
    r = videos_to_frames(videos, tmp_path / "frames", workers=0, progress=False)
    assert (r.clips, r.decoded, r.frames, r.already, r.failed) == (2, 2, N_FRAMES + 12, 0, [])
    a, b = tmp_path / "frames" / "00001", tmp_path / "frames" / "sub" / "clip b"
    assert sorted(p.name for p in a.iterdir()) == [f"{i:05d}.jpg" for i in range(1, N_FRAMES + 1)]
    assert len(list(b.iterdir())) == 12
    # frame k of the file is frame k of the video: grey level 8 * (k - 1), through mpeg4 and JPEG
    assert [round(_level(a / f"{k:05d}.jpg") / 8) for k in (1, 2, 15, 30)] == [0, 1, 14, 29]
    assert Image.open(a / "00001.jpg").size == (64, 48)


def test_every_nth_frame_keeps_its_index_and_short_side_resizes(videos, tmp_path):
    r = videos_to_frames(videos / "00001.mp4", tmp_path / "f", every=7, short_side=24, workers=0, progress=False)
    kept = sorted(p.name for p in (tmp_path / "f" / "00001").iterdir())
    assert r.frames == 5 and kept == ["00001.jpg", "00008.jpg", "00015.jpg", "00022.jpg", "00029.jpg"]
    assert round(_level(tmp_path / "f" / "00001" / "00015.jpg") / 8) == 14
    assert Image.open(tmp_path / "f" / "00001" / "00008.jpg").size == (32, 24)


def test_a_video_filmed_in_portrait_is_turned_upright(tmp_path):
    """A phone stores portrait video as sideways frames plus a display rotation: frames were written sideways."""
    from fercache.video import iter_frames

    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt, s.bit_rate = 64, 48, "yuv420p", 20_000_000
        s.set_display_rotation(90)  # shown turned 90 degrees counter-clockwise
        for _ in range(2):
            a = np.zeros((48, 64, 3), np.uint8)
            a[:, :16] = 255  # a white band on the left of the stored frame
            for packet in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    (_, _, image), _ = iter_frames(path)
    shown = np.asarray(image.convert("L"))
    assert shown.shape == (64, 48)  # upright: taller than wide
    assert shown[-16:].mean() > 200 and shown[:40].mean() < 30  # left turned counter-clockwise is the bottom
    r = videos_to_frames(path, tmp_path / "f", workers=0, progress=False)
    assert r.frames == 2 and Image.open(tmp_path / "f" / "phone" / "00001.jpg").size == (48, 64)


def test_run_again_it_skips_complete_clips_and_redoes_an_interrupted_one(videos, tmp_path):
    out = tmp_path / "frames"
    videos_to_frames(videos, out, workers=0, progress=False)
    kept = (out / "00001" / "00001.jpg").stat().st_mtime_ns
    # an interrupted clip: its .partial folder, never the clip's own name
    (out / "sub" / "clip b").rename(out / "sub" / "clip b.partial")
    (out / "sub" / "clip b.partial" / "00003.jpg").unlink()
    r = videos_to_frames(videos, out, workers=0, progress=False)
    assert (r.decoded, r.already, r.frames) == (1, 1, 12)
    assert (out / "00001" / "00001.jpg").stat().st_mtime_ns == kept
    assert len(list((out / "sub" / "clip b").iterdir())) == 12 and not (out / "sub" / "clip b.partial").exists()
    # other settings would mix clips of every frame with clips of every other frame: refused
    with pytest.raises(ConfigError, match=r"frames holds frames decoded with every=1, short_side=None, detect=False; "
                                          r"pass those, or another --out for every=2, short_side=None, detect=False"):
        videos_to_frames(videos, out, every=2, workers=0, progress=False)


def test_a_broken_video_is_said_and_the_others_are_written(videos, tmp_path, caplog):
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00 ftypisom" + b"x" * 500)
    with caplog.at_level(logging.WARNING, logger="fercache.video"):
        r = videos_to_frames(videos, tmp_path / "frames", workers=2, progress=False)
    assert r.decoded == 2 and [v for v, _ in r.failed] == [str(videos / "broken.mp4")]
    assert "1 of 3 video(s) gave no frames (e.g. " in caplog.text
    assert not (tmp_path / "frames" / "broken").exists() and not (tmp_path / "frames" / "broken.partial").exists()
    # decoded in two processes: the same frames as in this one
    one = videos_to_frames(videos / "00001.mp4", tmp_path / "one", workers=0, progress=False)
    assert one.frames == N_FRAMES and all(
        np.array_equal(np.asarray(Image.open(tmp_path / "one" / "00001" / f.name)), np.asarray(Image.open(f)))
        for f in (tmp_path / "frames" / "00001").iterdir())
    with pytest.raises(FercacheError, match=r"no video under .* gave frames, e.g. .*broken.mp4"):
        videos_to_frames(videos / "broken.mp4", tmp_path / "none", workers=0, progress=False)


def test_detect_leaves_out_frames_without_a_face_and_a_clip_with_none_is_said(videos, tmp_path):
    pytest.importorskip("facenet_pytorch")
    with pytest.raises(FercacheError, match=r"no video under \S+ gave frames, e.g. \S+: no face found in any of its "
                                            r"(30|12) frames"):
        videos_to_frames(videos, tmp_path / "faces", detect=True, workers=0, progress=False)  # grey frames: no face
    assert not any((tmp_path / "faces").rglob("*.jpg"))


def test_what_it_cannot_do_is_said_before_decoding(videos, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FercacheError, match=r"no video files under .*frames need no decoding"):
        videos_to_frames(tmp_path / "empty", tmp_path / "o")
    with pytest.raises(FercacheError, match=r"videos/notes.txt is not a video file \(endings read: .avi, "):
        videos_to_frames(videos / "notes.txt", tmp_path / "o")
    with pytest.raises(FercacheError, match=r"vidoes does not exist \(did you mean '\S+/videos'\?\)"):
        videos_to_frames(tmp_path / "vidoes", tmp_path / "o")
    write_video(videos / "00001.mkv", n=2)
    with pytest.raises(FercacheError, match=r"00001.mkv and \S+/00001.mp4 would both be decoded into \S+/o/00001"):
        videos_to_frames(videos, tmp_path / "o")
    for kw, says in (({"every": 0}, "--every must be a whole number >= 1"), ({"short_side": 2}, "--short-side must be"),
                     ({"workers": -1}, "--workers must be a whole number >= 0")):
        with pytest.raises(ConfigError, match=says):
            videos_to_frames(videos, tmp_path / "o", **kw)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"--out \S+/file/o: \S+/file is a file"):
        videos_to_frames(videos, tmp_path / "file" / "o")
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # PyAV not installed
    with pytest.raises(ConfigError, match=r"decoding videos needs PyAV: pip install 'fercache\[video\]'"):
        videos_to_frames(videos, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_frames_command_and_a_dfew_pipeline_from_its_videos(videos, tmp_path, monkeypatch):
    """DFEW ships its clips as videos too: frames, then the dfew adapter with `frames` pointing at them."""
    from fercache.manifests import read_manifest
    from fercache.pipeline import check_pipeline, run_pipeline

    r = CliRunner().invoke(cli.app, ["-q", "frames", str(videos / "sub"), "-o", str(tmp_path / "f"), "--every", "2"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"{tmp_path / 'f'}: 1 video(s); 1 decoded into 6 frames"
    dfew = tmp_path / "DFEW"
    write_video(dfew / "Clip" / "original" / "00001.mp4", n=5)
    write_video(dfew / "Clip" / "original" / "00002.mp4", n=4)
    for split, line in (("train", "00001,1"), ("test", "00002,7")):
        (dfew / "annotation" / "set_1").mkdir(parents=True, exist_ok=True)
        (dfew / "annotation" / "set_1" / f"{split}.csv").write_text(f"video_name,label\n{line}\n")
    p = tmp_path / "p.toml"
    p.write_text(f'[vars]\ndfew = "{dfew}"\n'
                 '[[step]]\nrun = "frames"\nsrc = "{dfew}/Clip/original"\nout = "{dfew}/frames"\n'
                 '[[step]]\nrun = "manifest"\nformat = "dfew"\nsrc = "{dfew}"\nout = "{dfew}/set_1.csv"\n'
                 '[step.options]\nframes = "frames"\n')
    assert check_pipeline(p) == 2
    run_pipeline(p, progress=False)
    m = read_manifest(dfew / "set_1.csv")
    assert len(m) == 9 and {(r["clip_id"], r["label"], r["split"]) for r in m.rows} == {
        ("00001", "happy", "train"), ("00002", "fear", "test")}
    assert [r["path"] for r in m.rows][:2] == ["frames/00001/00001.jpg", "frames/00001/00002.jpg"]
    bad = p.read_text().replace('run = "frames"\n', 'run = "frames"\nevery = 0\n')
    p.write_text(bad)
    with pytest.raises(ConfigError, match=r"step 1 \(frames\): --every must be a whole number >= 1"):
        check_pipeline(p)


def test_predict_reads_a_video_frame_by_frame_as_it_reads_images(tiny_store, tiny_dataset, tmp_path):
    """`fercache predict RUN clip.mp4` with a frame-level run: one row per frame, as the frames' own images give."""
    from fercache.predict import predict
    from fercache.train import fit

    from .conftest import write_lossless_video

    run = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 2}).run_dir
    images = sorted((tiny_dataset / "faces" / "test" / "happy").iterdir())[:3] + \
        sorted((tiny_dataset / "faces" / "test" / "sad").iterdir())[:2]
    video = write_lossless_video(tmp_path / "clips" / "mine.mkv", [np.asarray(Image.open(p).convert("RGB"))
                                                                    for p in images])
    (tmp_path / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00 ftypisom" + b"x" * 500)
    by_image = predict(run, images)
    rows = predict(run, [tmp_path / "clips"], batch_size=2)  # a folder: its videos too
    frames = [r for r in rows if r["path"] == str(video)]
    assert [r["frame"] for r in frames] == [1, 2, 3, 4, 5]
    for f, i in zip(frames, by_image):
        assert f["prediction"] == i["prediction"]
        assert np.allclose(list(f["probabilities"].values()), list(i["probabilities"].values()), atol=1e-5)
    (broken,) = [r for r in rows if r["path"].endswith("broken.mp4")]
    assert broken["frame"] is None and "InvalidDataError" in broken["error"] and "prediction" not in broken
    assert [r["frame"] for r in predict(run, [video], every=2)] == [1, 3, 5]
    r = CliRunner().invoke(cli.app, ["-q", "predict", str(run), str(video), str(images[0]), "--every", "2",
                                     "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].startswith("path,frame,time,prediction,") and len(lines) == 5
    # the image has no frame index; the video was written at 10 frames/s
    assert [line.split(",")[1:3] for line in lines[1:]] == [["1", "0.0"], ["3", "0.2"], ["5", "0.4"], ["", ""]]
    # and a plot of its class probabilities over time, beside the CSV
    png = tmp_path / "p-mine.png"
    assert f"  over time -> {png}\n" in r.stdout and Image.open(png).size[0] > 600
    with pytest.raises(ConfigError, match="--every must be a whole number >= 1"):
        predict(run, [video], every=0)


def test_timelines_draw_one_plot_per_video_stacked_for_classes_lines_for_aus(tmp_path):
    from fercache.predict import timelines

    rows = [{"path": "a.mp4", "frame": i + 1, "time": i / 30, "probabilities": {"AU1": 0.1 * i, "AU12": 0.9},
             "active": ["AU12"]} for i in range(5)]
    rows += [{"path": "b.mp4", "frame": None, "error": "broken"}, {"path": "x.jpg", "probabilities": {"AU1": 1.0}}]
    rows += [{**r, "path": "other/a.mp4"} for r in rows[:3]]  # the same name in another folder: its own plot
    pngs = timelines(rows, tmp_path / "out.json")
    assert pngs == [tmp_path / "out-a.png", tmp_path / "out-a-1.png"] and all(p.stat().st_size > 5000 for p in pngs)
    assert timelines(rows[5:7], tmp_path / "o.csv") == []  # no video frame predicted: no plot
    # windows of a folder of frames: no times, so the plot runs over frame indices
    windows = [{"path": "clipdir", "frame": 1 + 2 * k, "time": None, "frames": 4,
                "probabilities": {"happy": 0.2 * k, "sad": 1 - 0.2 * k}, "prediction": "sad"} for k in range(4)]
    (png,) = timelines(windows, tmp_path / "w.csv")
    assert png == tmp_path / "w-clipdir.png" and png.stat().st_size > 5000


def _afew_like(tmp_path, frames_per_clip=6):
    """AFEW's layout: <split>_AFEW/<Class>/<clip>.avi."""
    src = tmp_path / "AFEW"
    for rel in ("Train_AFEW/Angry/001.avi", "Train_AFEW/Angry/002.avi", "Train_AFEW/Happy/003.avi",
                "Val_AFEW/Angry/004.avi", "Val_AFEW/Happy/005.avi"):
        write_video(src / rel, n=frames_per_clip)
    return src


def test_clipfolder_reads_the_frames_of_class_folders_of_videos(tmp_path, tiny_encoder_spec):
    """`fercache frames` of <class>/<clip>.mp4 gives <class>/<clip>/NNNNN.jpg, which no adapter read as clips."""
    from fercache.adapters import build
    from fercache.extract import extract
    from fercache.manifests import write_manifest
    from fercache.store import open_store

    frames = tmp_path / "frames"
    videos_to_frames(_afew_like(tmp_path), frames, every=2, workers=0, progress=False)
    m = build("clipfolder", frames, val="test")
    clips = {r["clip_id"]: (r["label"], r["split"], r["subject"]) for r in m.rows}
    assert clips == {"Train_AFEW/Angry/001": ("anger", "train", "Train_AFEW/Angry/001"),
                     "Train_AFEW/Angry/002": ("anger", "train", "Train_AFEW/Angry/002"),
                     "Train_AFEW/Happy/003": ("happy", "train", "Train_AFEW/Happy/003"),
                     "Val_AFEW/Angry/004": ("anger", "test", "Val_AFEW/Angry/004"),
                     "Val_AFEW/Happy/005": ("happy", "test", "Val_AFEW/Happy/005")}
    first = [r for r in m.rows if r["clip_id"] == "Train_AFEW/Angry/001"]
    assert [(r["sample_id"], r["frame_idx"]) for r in first] == [
        ("Train_AFEW/Angry/001/00001", "0"), ("Train_AFEW/Angry/001/00003", "1"), ("Train_AFEW/Angry/001/00005", "2")]
    assert {r["split"] for r in build("clipfolder", frames).rows} == {"train", "val"}  # val stays val by default
    store = tmp_path / "afew.zarr"
    extract(write_manifest(m, tmp_path / "afew.csv"), tiny_encoder_spec, store, root=frames, progress=False)
    assert open_store(store).info().clips == 5 and open_store(store).n_rows == 15


def test_clipfolder_without_split_folders_puts_whole_clips_in_test_and_says_what_it_cannot_read(tmp_path):
    from fercache.adapters import build
    from fercache.pipeline import check_pipeline

    src = tmp_path / "mine"
    for label in ("happy", "sad"):
        for k in range(8):
            clip = src / label / f"take{k}"
            clip.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (10 * k, i, 0)).save(clip / f"{i:05d}.jpg")
    rows = build("clipfolder", src, test_fraction=0.5).rows
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["clip_id"], r["split"]) == r["split"]  # a clip never straddles splits
    assert set(split_of.values()) == {"train", "test"} and len(split_of) == 16 and len(rows) == 48
    assert {r["split"] for r in build("clipfolder", src).rows} == {"train"}
    # take<k> of happy and of sad are one person's: with a subject pattern they share a subject and a split
    rows = build("clipfolder", src, test_fraction=0.5, subject=r"^take(\d+)$").rows
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["subject"], r["split"]) == r["split"]
    assert sorted(split_of) == [str(k) for k in range(8)] and set(split_of.values()) == {"train", "test"}
    with pytest.raises(FercacheError, match=r"--option subject=\(: not a regular expression"):
        build("clipfolder", src, subject="(")
    with pytest.raises(FercacheError,
                       match=re.escape("happy/take0: --option subject=^S\\d+ finds no subject in 'take0'")):
        build("clipfolder", src, subject=r"^S\d+")
    with pytest.raises(FercacheError, match=r"--option val=train: 'val' \(the val folder selects epochs\) or 'test'"):
        build("clipfolder", src, val="train")
    Image.new("RGB", (8, 8)).save(src / "sad" / "loose.jpg")
    with pytest.raises(FercacheError, match=r"mine/sad holds images, not clip folders: for one image per sample use "
                                            r"--format imagefolder"):
        build("clipfolder", src)
    p = tmp_path / "p.toml"
    p.write_text(f'[[step]]\nrun = "manifest"\nformat = "clipfolder"\nsrc = "{src}"\nout = "m.csv"\n'
                 '[step.options]\nval = "tset"\n')
    with pytest.raises(FercacheError, match=r"^step 1 \(manifest\): --option val=tset"):
        check_pipeline(p)
