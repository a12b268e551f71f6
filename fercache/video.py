"""Video files -> folders of frames, the layout the video adapters (dfew, ferv39k, mafw, affwild2) read.

Each video `SRC/<rel>/<clip>.mp4` becomes `OUT/<rel>/<clip>/00001.jpg, 00002.jpg, ...`, numbered by the frame's
1-based index in the video (kept with `every > 1` too, so per-frame annotations such as Aff-Wild2's line up).
A clip is decoded into `<clip>.partial/` and renamed when whole: a folder without that suffix is complete, so an
interrupted run resumes by skipping those, and never leaves a half-decoded clip that looks done. OUT records the
`every`, `short_side` and `detect` its frames were decoded with; a run with others is refused rather than mixed in.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ConfigError, FercacheError, check_out_dir, check_whole, near_path
from .faces import FaceCropper, mtcnn_class

log = logging.getLogger(__name__)

VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v", ".flv", ".wmv"}
PARTIAL = ".partial"
SETTINGS = ".fercache-frames.json"  # in OUT: the settings its frames were decoded with


@dataclass
class FramesResult:
    out: str
    clips: int  # videos found
    decoded: int  # decoded by this call
    frames: int  # frames written by this call
    already: int  # complete before this call
    failed: list[tuple[str, str]] = field(default_factory=list)  # (video, why)
    no_face: int = 0  # frames skipped by --detect: no face found in them


def _av():
    try:
        import av
    except ImportError:
        raise ConfigError("decoding videos needs PyAV: pip install 'fercache[video]' (or pip install av)") from None
    return av


def find_videos(src: Path) -> list[Path]:
    """The video files under `src` (or `src` itself), sorted; none is an error that names the endings looked for."""
    if not src.exists():
        raise FercacheError(f"{src} does not exist{near_path(src, Path.exists)}")
    if src.is_file():
        if not is_video(src):
            raise FercacheError(f"{src} is not a video file (endings read: {', '.join(sorted(VIDEO_EXTS))})")
        return [src]
    videos = sorted(p for p in src.rglob("*") if is_video(p) and p.is_file())
    if not videos:
        raise FercacheError(f"no video files under {src} (endings read: {', '.join(sorted(VIDEO_EXTS))}); "
                            "folders of frames need no decoding: point the adapter's `frames` option at them")
    return videos


def clip_folder(video: Path, src: Path, out: Path) -> Path:
    """Where a video's frames go: its path under `src`, without the ending, under `out`."""
    rel = video.relative_to(src) if src.is_dir() else Path(video.name)
    return out / rel.with_suffix("")


def _clip_folders(videos: list[Path], src: Path, out: Path) -> dict[Path, Path]:
    """Each video's frame folder; two videos that differ only in their ending (a.mp4, a.avi) would share one."""
    owner: dict[Path, Path] = {}
    for v in videos:
        f = clip_folder(v, src, out)
        if f in owner:
            raise FercacheError(f"{owner[f]} and {v} would both be decoded into {f}: keep one of them")
        owner[f] = v
    return {v: f for f, v in owner.items()}


def _resized(image, short_side: int | None):
    if not short_side or min(image.size) == short_side:
        return image
    w, h = image.size
    scale = short_side / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample=Image.BICUBIC)


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTS


def iter_frames(video: Path, every: int = 1):
    """(1-based index in the video, its time in seconds, PIL RGB image) of every `every`-th frame, decoded as they
    are read: a long video never sits in memory whole. The time is the frame's presentation time (index / 25 when
    the container gives none). A frame is turned upright by the rotation its container records (a phone filming
    in portrait stores sideways frames and a display rotation; a face on its side is no expression to a head)."""
    av = _av()
    with av.open(str(video)) as container:
        if not container.streams.video:
            raise FercacheError(f"{video} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # ffmpeg's own threads: decoding is the slow part
        for i, frame in enumerate(container.decode(stream), start=1):
            if (i - 1) % every == 0:
                yield i, (float(frame.time) if frame.time is not None else (i - 1) / 25), _upright(frame)


def _upright(frame) -> Image.Image:
    """The frame as displayed: PyAV's `rotation` is counter-clockwise, as PIL's `rotate`."""
    image = frame.to_image()
    return image.rotate(frame.rotation, expand=True) if frame.rotation else image


@functools.lru_cache(maxsize=1)
def _cropper() -> FaceCropper:
    """One face detector per process, built on first use (each worker builds its own)."""
    return FaceCropper("cpu")


def _face(image: Image.Image) -> Image.Image | None:
    """The image cropped to its most confident face (the crop `predict --detect` makes), or None without one."""
    crop, found = _cropper()(np.asarray(image))
    return Image.fromarray(crop) if found else None


def decode_clip(video: Path, folder: Path, every: int = 1, short_side: int | None = None, quality: int = 95,
                detect: bool = False) -> tuple[int, int]:
    """Write every `every`-th frame of `video` as `folder/<index:05d>.jpg` (with `detect`, its face, and nothing
    for a frame without one); returns (frames written, frames without a face). Writes into `<folder>.partial`
    and renames it when whole, so `folder` existing means complete."""
    partial = folder.with_name(folder.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)  # a clip interrupted last time starts again
    partial.mkdir(parents=True)
    n = no_face = 0
    try:
        for i, _, image in iter_frames(video, every):
            if detect and (image := _face(image)) is None:
                no_face += 1
                continue
            _resized(image, short_side).save(partial / f"{i:05d}.jpg", quality=quality)
            n += 1
        if n == 0:
            raise FercacheError(f"no face found in any of its {no_face} frames" if no_face else "no frames decoded")
        partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return n, no_face


def _decode_one(args: tuple) -> tuple[str, tuple[int, int], str | None]:
    """Worker: one clip, its error as text (a corrupt file must not stop the others)."""
    video, folder, every, short_side, detect = args
    try:
        return str(video), decode_clip(video, folder, every, short_side, detect=detect), None
    except FercacheError as e:
        return str(video), (0, 0), str(e)
    except Exception as e:  # PyAV's InvalidDataError and kin: whatever ffmpeg makes of a broken file
        return str(video), (0, 0), f"{type(e).__name__}: {e}"


def check_frames_options(every: int, short_side: int | None, workers: int | None) -> None:
    check_whole("every", every, 1, "1 keeps every frame")
    check_whole("short-side", short_side, 8, "pixels", optional=True)
    check_whole("workers", workers, 0, "0: decode in this process", optional=True)


def videos_to_frames(src: str | Path, out: str | Path, every: int = 1, short_side: int | None = None,
                     workers: int | None = None, progress: bool = True, detect: bool = False) -> FramesResult:
    """Decode every video under `src` into frame folders under `out` (module docstring); clips already complete
    are skipped. `workers` processes decode clips side by side (default: up to 4). `detect`: each frame is cropped
    to its face (MTCNN, as `predict --detect`), and a frame without one is left out."""
    from tqdm.auto import tqdm

    check_frames_options(every, short_side, workers)
    _av()  # before walking a large tree: missing PyAV is said first
    if detect:
        mtcnn_class()  # missing facenet-pytorch is said before any video is read
    src, out = Path(src).resolve(), Path(out).resolve()
    check_out_dir(out, "the frame folders")
    videos = find_videos(src)
    folders = _clip_folders(videos, src, out)
    _same_settings(out, {"every": every, "short_side": short_side, "detect": detect})
    todo = [(v, f, every, short_side, detect) for v, f in folders.items() if not f.is_dir()]
    result = FramesResult(str(out), len(videos), 0, 0, len(videos) - len(todo))
    n_workers = min(4, os.cpu_count() or 1) if workers is None else workers
    with tqdm(total=len(todo), unit="clip", desc="frames", disable=not progress) as bar:
        if n_workers <= 1 or len(todo) <= 1:
            _collect(map(_decode_one, todo), result, bar)
        else:
            with ProcessPoolExecutor(n_workers) as pool:
                _collect(pool.map(_decode_one, todo), result, bar)
    if result.failed:
        video, why = result.failed[0]
        log.warning("%d of %d video(s) gave no frames (e.g. %s: %s); the others are written",
                    len(result.failed), len(todo), video, why)
    if todo and len(result.failed) == len(todo):
        raise FercacheError(f"no video under {src} gave frames, e.g. {video}: {why}")
    return result


def _same_settings(out: Path, settings: dict) -> None:
    """Clips decoded with one `every`/`short_side`/`detect` and others with another would mix unseen (a complete
    clip is skipped): the settings are recorded in OUT/SETTINGS and a run with others is refused."""
    record = out / SETTINGS
    if record.is_file():
        before = json.loads(record.read_text())
        if before != settings:
            said = ", ".join(f"{k}={v}" for k, v in before.items())
            raise ConfigError(f"{out} holds frames decoded with {said}; pass those, or another --out for "
                              f"{', '.join(f'{k}={v}' for k, v in settings.items())}")
        return
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings) + "\n")


def _collect(done, result: FramesResult, bar) -> None:
    for video, (n, no_face), why in done:
        if why is None:
            result.decoded, result.frames, result.no_face = (result.decoded
                                                             + 1), result.frames + n, result.no_face + no_face
        else:
            result.failed.append((video, why))
        bar.update(1)


def summarize(r: FramesResult) -> str:
    """The one line `fercache frames` and the pipeline step print."""
    line = f"{r.out}: {r.clips} video(s); {r.decoded} decoded into {r.frames:,} frames"
    if r.no_face:
        line += f" ({r.no_face:,} frames without a face left out)"
    if r.already:
        line += f", {r.already} already there"
    if r.failed:
        line += f", {len(r.failed)} failed (e.g. {r.failed[0][0]}: {r.failed[0][1]})"
    return line
