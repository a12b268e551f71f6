"""Predict expressions (or AUs) for new images with a trained run: same encoder and preprocessing as its store."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .adapters import IMAGE_EXTS
from .encoders import encoder_of
from .errors import ConfigError, FercacheError, check_out_file, check_whole, near_path
from .faces import FaceCropper
from .preprocess import decode_image, to_model_input, tta_views, with_views
from .rundir import Fitted, RunConfig, load_run
from .scoring import run_dirs
from .store import encoder_key
from .video import is_video, iter_frames

log = logging.getLogger(__name__)


def collect_images(inputs: list[str | Path], videos: bool = False) -> list[Path]:
    """Image files (and, `videos`, video files) among `inputs`, folders searched recursively."""
    out = []
    for p in map(Path, inputs):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS or videos and is_video(f))
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p} is neither an image file nor a folder{near_path(p, Path.exists)}")
    if not out:
        raise ConfigError(f"no images{' or videos' if videos else ''} found in {', '.join(map(str, inputs))}")
    return out


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def _frames(paths: list[Path], every: int) -> Iterator[tuple[dict, np.ndarray | str]]:
    """(row, RGB image) for each image and each `every`-th frame of each video, decoded as needed; (row, error
    text) for a file that cannot be read, so one bad file never loses the others' predictions."""
    for p in paths:
        if not is_video(p):
            try:
                yield {"path": str(p)}, decode_image(p)
            except Exception as e:
                yield {"path": str(p)}, _error(e)
            continue
        try:
            for i, t, image in iter_frames(p, every):
                yield {"path": str(p), "frame": i, "time": round(t, 3)}, np.asarray(image.convert("RGB"))
        except Exception as e:  # unreadable, or its tail: the frames read before keep their predictions
            yield {"path": str(p), "frame": None}, _error(e)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class TrainedHead:
    """One trained run, ready to score encoder features."""

    model: torch.nn.Module
    cfg: RunConfig
    fitted: Fitted


def load_heads(run: str | Path, device: str = "cpu", calibrated: bool = True) -> list[TrainedHead]:
    """The run at `run`, or every seed run under it (an ensemble): they must read the same encoder's features the
    same way and predict the same classes."""
    dirs = run_dirs(run)
    heads = []
    for d in dirs:
        model, cfg, fitted = load_run(d, device)
        heads.append(TrainedHead(model, cfg, fitted if calibrated else replace(fitted, temperature=None)))
    first = _shared(heads[0].cfg)
    for d, h in zip(dirs[1:], heads[1:]):
        if differ := [k for k, v in _shared(h.cfg).items() if v != first[k]]:
            raise ConfigError(f"{d} and {dirs[0]} differ in {', '.join(differ)}: an ensemble's runs must share them; "
                              "pass one run directory")
    if any(h.cfg.mask_source for h in heads):
        raise ConfigError("this run's mask reads a second store's features; predict supports single-encoder runs")
    if len(heads) > 1:
        log.info("ensemble of %d runs under %s: their probabilities are averaged", len(heads), run)
    return heads


def _shared(cfg: RunConfig) -> dict:
    """What the runs of an ensemble must share: the features they read and the classes they predict."""
    return {"encoder": encoder_key(cfg.store_fingerprint["encoder"]),
            **{k: getattr(cfg, k) for k in ("task", "classes", "output", "level")}}


def predict(run: str | Path, inputs: list[str | Path], detect: bool = False, device: str = "cpu",
            face_margin: float = 0.0, batch_size: int = 64, calibrated: bool = True, progress: bool = False,
            every: int = 1, window: int | None = None, stride: int | None = None) -> list[dict]:
    """Per-image class probabilities (or AU probabilities and decisions) from a trained run, or the average over
    the seed runs under a folder (AU decisions then at the runs' mean threshold). A video file gives one row per
    `every`-th frame (with its `frame` index) for a frame-level run, one row for a clip-level run, or with
    `window` one row per window of that many frames, every `stride` (default window // 2) frames: a long video
    is no one expression.

    `calibrated`: expression probabilities are softmax(logits / T) with the temperature each run fitted on its
    validation split (so 0.8 means right about 80% of the time there); False gives the raw softmax. A single
    run's predicted class is the same either way. `detect`: each image is cut to its most confident face
    (`faces.FaceCropper`), its box grown by `face_margin`; each row records the box, confidence and margin.
    """
    check_whole("every", every, 1)
    check_whole("window", window, 1, optional=True)
    check_whole("stride", stride, 1, optional=True)
    cropper = FaceCropper(device, face_margin) if detect else None  # a bad margin, or no facenet: said first
    # The inputs are found before the run and its encoder are loaded (seconds), so a typo is said at once
    if known := _saved_config(run):
        paths = _inputs(inputs, known, window, stride)
    heads = load_heads(run, device, calibrated)
    cfg = heads[0].cfg
    if not known:
        paths = _inputs(inputs, cfg, window, stride)
    clips = cfg.level == "clip"
    enc = encoder_of({"fingerprint": cfg.store_fingerprint, "encoder_args": cfg.encoder_args})
    enc.model.to(device)
    from tqdm.auto import tqdm

    if clips:
        windows = (window, stride or max(1, window // 2)) if window else None
        results = [row for p in tqdm(paths, desc="predict", unit="clip", disable=not progress)
                   for row in _predict_clip(p, enc, heads, cropper, device, batch_size, every, windows)]
        return _said_failures(results, "clip(s) had a frame that could be decoded")
    results = []
    # a video's frame count is known only once decoded: then the bar counts without a total
    total = None if any(map(is_video, paths)) else len(paths)
    with tqdm(total=total, desc="predict", unit="img", disable=not progress) as bar:
        for batch in _batched(_frames(paths, every), batch_size):
            results += _predict_batch(batch, enc, heads, cropper, device)
            bar.update(len(batch))
    return _said_failures(results, "file(s) could be read as an image or video")


def _said_failures(results: list[dict], could: str) -> list[dict]:
    """Rows that failed keep their place (with an `error`), and are said: one unreadable file among 10,000 is
    otherwise found only by reading the output's error column. All failed: an error, not an exit 0."""
    failed = [r for r in results if "error" in r]
    if failed and len(failed) == len(results):
        raise ConfigError(f"none of the {len(results)} {could}, e.g. {failed[0]['path']}: {failed[0]['error']}")
    if failed:
        log.warning("%d of %d inputs failed (their rows carry the error, no prediction), e.g. %s: %s",
                    len(failed), len(results), failed[0]["path"], failed[0]["error"])
    return results


def _saved_config(run: str | Path) -> RunConfig | None:
    """The config of the (first seed) run at `run`, read without its weights; None when it cannot be read (then
    loading the run says why)."""
    try:
        return RunConfig.from_dict(json.loads((run_dirs(run)[0] / "config.json").read_text()))
    except (FercacheError, OSError, ValueError, TypeError):
        return None


def _inputs(inputs: list[str | Path], cfg: RunConfig, window: int | None, stride: int | None) -> list[Path]:
    """What a run of `cfg`'s level predicts on: a clip per folder or video, or every image and video."""
    clips = cfg.level == "clip"
    if window is None and stride is not None or window is not None and not clips:
        raise ConfigError("--window and --stride are for clip-level (temporal) runs, --stride with --window; a "
                          "frame-level run predicts every frame already")
    return [_clip_source(Path(p), cfg.head) for p in inputs] if clips else collect_images(inputs, videos=True)


def _clip_source(source: Path, head: str) -> Path:
    if not (source.is_dir() or source.is_file() and is_video(source)):
        raise ConfigError(f"a clip-level run ({head}) predicts one clip per folder of frames or video "
                          f"file; {source} is neither{'' if source.exists() else near_path(source, Path.exists)}")
    return source


def _clip_frames(source: Path, every: int) -> Iterator[tuple[int, float | None, np.ndarray | None]]:
    """(index, time in seconds, image) of a clip's frames: a folder's images sorted by name (no time), or a video's
    every `every`-th frame; image None for one that fails to decode (a video stops there)."""
    if is_video(source):
        try:
            for i, t, image in iter_frames(source, every):
                yield i, round(t, 3), np.asarray(image.convert("RGB"))
        except Exception as e:
            log.warning("%s: decoding stopped (%s)", source, _error(e))
            yield 0, None, None
        return
    for i, p in enumerate(collect_images([source]), start=1):
        try:
            yield i, None, decode_image(p)
        except Exception:
            yield i, None, None


def _predict_clip(source: Path, enc, heads: list[TrainedHead], cropper, device, batch_size: int, every: int = 1,
                  windows: tuple[int, int] | None = None) -> list[dict]:
    """One prediction for a clip (or one per window of `windows` = (frames, stride)), its frames encoded a batch
    at a time (a long video never sits in memory); frames that fail to decode are skipped and counted."""
    row, feats, marks = {"path": str(source), "frames": 0, "frames_failed": 0}, [], []
    for batch in _batched(_decoded(_clip_frames(source, every), row), batch_size):
        images = [cropper(f)[0] if cropper else f for _, _, f in batch]
        feats.append(_encode(enc, images, heads[0].cfg.output, device))
        marks += [(i, t) for i, t, _ in batch]
        row["frames"] += len(batch)
    if not feats:
        return [{**row, "error": "no frame of the clip could be decoded"}]
    feats = torch.cat(feats)
    spans = _spans(len(feats), *windows) if windows else [(0, len(feats))]
    rows = [row] if not windows else [{**row, "frame": marks[a][0], "time": marks[a][1], "frames": b - a}
                                      for a, b in spans]
    with torch.inference_mode():  # each span is one clip: [1, frames, D]
        prob = np.concatenate([np.mean([_probabilities(h, h.model(feats[a:b][None])) for h in heads], axis=0)
                               for a, b in spans])
    _fill(rows, prob, heads)
    return rows


def _spans(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) of windows of `window` frames every `stride`, the last one ending at the clip's end; a clip
    shorter than a window is one span."""
    starts = list(range(0, max(n - window, 0) + 1, stride))
    if starts[-1] + window < n:
        starts.append(n - window)
    return [(a, min(a + window, n)) for a in starts]


def _decoded(frames: Iterable[tuple[int, float | None, np.ndarray | None]], row: dict) -> Iterator[tuple]:
    """The frames that decoded; the others counted in `row`."""
    for f in frames:
        if f[2] is None:
            row["frames_failed"] += 1
        else:
            yield f


def _encode(enc, images: list[np.ndarray], output: str, device) -> torch.Tensor:
    with torch.inference_mode():
        return enc.model(to_model_input(images, enc.preprocess, device))[output].float()


def _predict_batch(items: list[tuple[dict, np.ndarray | str]], enc, heads: list[TrainedHead], cropper,
                   device) -> list[dict]:
    images, rows = [], []
    for row, img in items:
        if isinstance(img, str):  # its decoding error
            rows.append({**row, "error": img})
            continue
        face = None
        if cropper:
            img, face = cropper(img)
        images.append(img)
        rows.append({**row, "face_detected": face is not None if cropper else None, **_face_record(face, cropper)})
    good = [r for r in rows if "error" not in r]
    if not good:
        return rows
    # Each head averages the views it trained with (the mirror: as evaluate does); each view is encoded once.
    views = sorted({v for h in heads for v in tta_views(h.cfg.views)})
    output = heads[0].cfg.output
    with torch.inference_mode():
        x = to_model_input(images, enc.preprocess, device)
        feats = {name: enc.model(xi)[output].float() for name, xi in with_views(x, views, enc.preprocess)}
        prob = np.mean([_probabilities(h, _view_mean(h, feats)) for h in heads], axis=0)
    _fill(good, prob, heads)
    return rows


def _view_mean(head: TrainedHead, feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's logits averaged over the plain image and the test-time views it trained with."""
    return torch.stack([head.model(feats[v]) for v in ["", *tta_views(head.cfg.views)]]).mean(0)


def _probabilities(head: TrainedHead, logits: torch.Tensor) -> np.ndarray:
    if head.cfg.task == "au":
        return torch.sigmoid(logits).cpu().numpy()
    return torch.softmax(logits / (head.fitted.temperature or 1.0), dim=1).cpu().numpy()


def _fill(rows: list[dict], prob: np.ndarray, heads: list[TrainedHead]) -> None:
    classes = heads[0].cfg.classes
    if heads[0].cfg.task == "au":
        thr = np.mean([h.fitted.thresholds if h.fitted.thresholds is not None else np.full(len(classes), 0.5)
                       for h in heads], axis=0)
        for r, p in zip(rows, prob):
            r["probabilities"] = {c: float(v) for c, v in zip(classes, p)}
            r["active"] = [c for c, v, t in zip(classes, p, thr) if v >= t]
        return
    for r, p in zip(rows, prob):
        r["probabilities"] = {c: float(v) for c, v in zip(classes, p)}
        r["prediction"] = classes[int(p.argmax())]


def tally(rows: list[dict]) -> str:
    """How often each class was predicted (each AU found active), most often first: a folder of one expression
    shows at a glance what the run makes of it, without opening the file."""
    from collections import Counter

    counts = Counter(c for r in rows for c in ([r["prediction"]] if "prediction" in r else r.get("active", [])))
    return ", ".join(f"{c} {n}" for c, n in counts.most_common())


def timelines(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per video among the rows, beside `out` (`<out stem>-<video stem>.png`): its class probabilities
    (AU probabilities) over time, what one would rather look at than 1,800 rows of a CSV."""
    from .report import timeline_png

    videos: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("frame") and "probabilities" in r:
            videos.setdefault(r["path"], []).append(r)
    pngs: list[Path] = []
    for video, frames in videos.items():
        classes, au = list(frames[0]["probabilities"]), "active" in frames[0]
        prob = np.array([[r["probabilities"][c] for c in classes] for r in frames])
        timed = all(r.get("time") is not None for r in frames)  # a folder of frames has no times: their index
        x = np.array([r["time"] if timed else r["frame"] for r in frames])
        per = f"window of {frames[0]['frames']} frames" if "frames" in frames[0] else "frame"
        name = f"{out.stem}-{Path(video).stem}"
        png = out.with_name(f"{name}.png")
        if png in pngs:  # a video of the same name in another folder
            png = out.with_name(f"{name}-{len(pngs)}.png")
        pngs.append(timeline_png(png, x, prob, classes, f"{video}: {'AU' if au else 'class'} probabilities per "
                                 f"{per} ({len(frames)})", stacked=not au, xlabel="time (s)" if timed else "frame"))
    return pngs


def _is_predictions(header: list[str]) -> bool:
    """A CSV that predict wrote (of any run: its class columns differ)."""
    return header[:2] == ["path", "prediction"] or header[:4] == ["path", "frame", "time", "prediction"]


def check_out(out: Path | None) -> None:
    """Refuse an --out that write_predictions could not write, before any image is read."""
    if out is not None and out.suffix not in (".json", ".csv"):
        raise FercacheError(f"--out must end in .json or .csv, got {out.name}")
    if out is not None:
        from .report import check_replaceable

        check_out_file(out)
        check_replaceable(out, _is_predictions, "--out")


def _face_record(face, cropper) -> dict:
    """How an image was cropped (with --detect): the face's box and confidence, and the margin added to it."""
    if cropper is None:
        return {}
    return {"face_box": list(face.box) if face else None, "face_p": round(face.p, 4) if face else None,
            "face_margin": cropper.margin}


def write_predictions(rows: list[dict], out: Path) -> Path:
    """JSON (a list) or CSV (one column per class) by the file suffix; its folder is created."""
    import json

    from .report import write_csv

    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        out.write_text(json.dumps(rows, indent=2))
        return out
    classes = next((list(r["probabilities"]) for r in rows if "probabilities" in r), [])
    frame = ["frame", "time"] if any("frame" in r for r in rows) else []  # a video's frame: 1-based index, seconds
    face = ["face_box", "face_p", "face_margin"] if any("face_box" in r for r in rows) else []  # --detect's crop
    header = ["path", *frame, "prediction", "face_detected", *face, "error"] + classes
    return write_csv(out, header, [[r["path"], *[r.get(k) for k in frame],
                                    r.get("prediction", ";".join(r.get("active", []))), r.get("face_detected"),
                                    *[_cell(r.get(k)) for k in face], r.get("error", "")]
                                   + [f"{r.get('probabilities', {}).get(c, float('nan')):.4f}" for c in classes]
                                   for r in rows])


def _cell(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else "" if value is None else str(value)
