"""Predict expressions (or AUs) for new images with a trained run: same encoder and preprocessing as its store."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .adapters import IMAGE_EXTS
from .encoders import encoder_of
from .errors import ConfigError, FercacheError
from .preprocess import decode_image, to_model_input, tta_views, with_views
from .train import Fitted, load_run

log = logging.getLogger(__name__)


def collect_images(inputs: list[str | Path]) -> list[Path]:
    """Image files among `inputs`, folders searched recursively."""
    out = []
    for p in map(Path, inputs):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p} is neither an image file nor a folder")
    if not out:
        raise ConfigError(f"no images found in {', '.join(map(str, inputs))}")
    return out


class FaceCropper:
    """MTCNN face detection (facenet-pytorch; its weights ship in the wheel): crop the most confident face."""

    def __init__(self, device: str = "cpu"):
        try:
            from facenet_pytorch import MTCNN
        except ImportError:
            raise ConfigError("--detect needs facenet-pytorch: pip install 'fercache[detect]'") from None
        self.mtcnn = MTCNN(keep_all=False, device=device)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        from PIL import Image

        boxes, _ = self.mtcnn.detect(Image.fromarray(image))
        if boxes is None:
            return image, False
        x0, y0, x1, y1 = (int(round(v)) for v in boxes[0])
        h, w = image.shape[:2]
        return image[max(0, y0):min(h, y1), max(0, x0):min(w, x1)], True


def predict(run: str | Path, inputs: list[str | Path], detect: bool = False, device: str = "cpu",
            batch_size: int = 64, calibrated: bool = True) -> list[dict]:
    """Per-image class probabilities (or AU probabilities and decisions) from a trained run.

    `calibrated`: expression probabilities are softmax(logits / T) with the temperature the run fitted on its
    validation split (so 0.8 means right about 80% of the time there); False gives the raw softmax. The
    predicted class is the same either way.
    """
    model, cfg, fitted = load_run(run, device)
    if not calibrated:
        fitted = replace(fitted, temperature=None)
    if cfg["mask_source"]:
        raise ConfigError("this run's mask reads a second store's features; predict supports single-encoder runs")
    enc = encoder_of({"fingerprint": cfg["store_fingerprint"], "encoder_args": cfg.get("encoder_args")})
    enc.model.to(device)
    cropper = FaceCropper(device) if detect else None
    if model.level == "clip":
        return [_predict_clip(Path(p), enc, model, cfg, fitted, cropper, device, batch_size) for p in inputs]
    paths, results = collect_images(inputs), []
    for start in range(0, len(paths), batch_size):
        results += _predict_batch(paths[start:start + batch_size], enc, model, cfg, fitted, cropper, device)
    if all("error" in r for r in results):  # nothing to report but failures: say so, do not exit 0
        raise ConfigError(f"none of the {len(results)} file(s) could be read as an image, e.g. {results[0]['path']}: "
                          f"{results[0]['error']}")
    return results


def _predict_clip(folder: Path, enc, model, cfg, fitted, cropper, device, batch_size: int) -> dict:
    """One prediction for a folder of a clip's frames (sorted by name); frames that fail to decode are skipped."""
    if not folder.is_dir():
        raise ConfigError(f"a clip-level run ({cfg['head']}) predicts one clip per folder of frames; {folder} is not a folder")
    frames, errors = [], 0
    for p in collect_images([folder]):
        try:
            img = decode_image(p)
            frames.append(cropper(img)[0] if cropper else img)
        except Exception:
            errors += 1
    row = {"path": str(folder), "frames": len(frames), "frames_failed": errors}
    if not frames:
        return {**row, "error": "no frame of the clip could be decoded"}
    with torch.inference_mode():
        feats = torch.cat([enc.model(to_model_input(frames[i:i + batch_size], enc.preprocess, device))[cfg["output"]].float()
                           for i in range(0, len(frames), batch_size)])
        logits = model(feats[None])  # [1, frames, D]: every frame is valid
    _fill([row], logits, cfg, fitted)
    return row


def _predict_batch(paths, enc, model, cfg, fitted, cropper, device) -> list[dict]:
    images, rows = [], []
    for p in paths:
        try:
            img = decode_image(p)
        except Exception as e:  # one bad file must not lose the others' predictions
            rows.append({"path": str(p), "error": f"{type(e).__name__}: {e}"})
            continue
        face = True
        if cropper:
            img, face = cropper(img)
        images.append(img)
        rows.append({"path": str(p), "face_detected": face if cropper else None})
    good = [r for r in rows if "error" not in r]
    if not good:
        return rows
    views = tta_views(cfg.get("views", []))  # the mirror, if the head trained with it: averaged, as evaluate does
    with torch.inference_mode():
        x = to_model_input(images, enc.preprocess, device)
        logits = torch.stack([model(enc.model(xi)[cfg["output"]].float())
                              for _, xi in with_views(x, views, enc.preprocess)]).mean(0)
    _fill(good, logits, cfg, fitted)
    return rows


def _fill(rows: list[dict], logits: torch.Tensor, cfg: dict, fitted: Fitted) -> None:
    classes = cfg["classes"]
    if cfg["task"] == "au":
        prob = torch.sigmoid(logits).cpu().numpy()
        thr = fitted.thresholds if fitted.thresholds is not None else np.full(len(classes), 0.5)
        for r, p in zip(rows, prob):
            r["probabilities"] = {c: float(v) for c, v in zip(classes, p)}
            r["active"] = [c for c, v, t in zip(classes, p, thr) if v >= t]
        return
    prob = torch.softmax(logits / (fitted.temperature or 1.0), dim=1).cpu().numpy()
    for r, p in zip(rows, prob):
        r["probabilities"] = {c: float(v) for c, v in zip(classes, p)}
        r["prediction"] = classes[int(p.argmax())]


def write_predictions(rows: list[dict], out: Path) -> Path:
    """JSON (a list) or CSV (one column per class) by the file suffix."""
    import json

    from .report import write_csv

    if out.suffix == ".json":
        out.write_text(json.dumps(rows, indent=2))
        return out
    if out.suffix != ".csv":
        raise FercacheError(f"--out must end in .json or .csv, got {out.name}")
    classes = next((list(r["probabilities"]) for r in rows if "probabilities" in r), [])
    header = ["path", "prediction", "face_detected", "error"] + classes
    return write_csv(out, header, [[r["path"], r.get("prediction", ";".join(r.get("active", []))), r.get("face_detected"),
                                    r.get("error", "")] + [f"{r.get('probabilities', {}).get(c, float('nan')):.4f}" for c in classes]
                                   for r in rows])
