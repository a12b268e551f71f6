"""Shared fixtures: a tiny random-init open_clip ViT from a JSON config, tiny image datasets, real-data paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FERCACHE_SHARED_DATA", REPO.parent / "shared" / "data"))

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# The tiny test CLIP with the full 77-token text context that 8 context vectors + a description need.
TINY_CLIP_77 = {**TINY_VIT, "text_cfg": {**TINY_VIT["text_cfg"], "context_length": 77}}
CLASSES = ("angry", "happy", "neutral", "sad")


def write_lossless_video(path: Path, frames: list[np.ndarray], rate: int = 10) -> Path:
    """A video of these RGB frames, exactly (FFV1 in Matroska): its decoded frames equal the arrays."""
    av = pytest.importorskip("av")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=rate)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "bgr0"
        for a in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def needs_shared_data():
    """Skip unless ../shared/data (the real FER2013 and CK+48 copies) is present."""
    return pytest.mark.skipif(not (SHARED_DATA / "fer2013").is_dir(), reason=f"real data not found at {SHARED_DATA}")


@pytest.fixture(scope="session")
def tiny_vit_config(tmp_path_factory) -> Path:
    """Path of an open_clip model config for a 2-layer 32 px ViT (random init, no download)."""
    path = tmp_path_factory.mktemp("models") / "fercache-tiny-vit.json"
    path.write_text(json.dumps(TINY_VIT))
    return path


@pytest.fixture(scope="session")
def tiny_encoder_spec(tiny_vit_config) -> str:
    return f"open_clip:{tiny_vit_config}"


def class_image(label_idx: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A face-sized image whose brightness pattern depends on the class, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = [xx, yy, 1 - xx, (xx + yy) / 2][label_idx % 4] * 200
    img = np.clip(base[..., None] + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def write_imagefolder(root: Path, per_class: int = 6, splits=("train", "val", "test"), seed: int = 0) -> Path:
    """`root/<split>/<class>/*.jpg`, the FER2013 layout."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for ci, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                class_image(ci, rng).save(d / f"{split}_{cls}_{k:03d}.jpg", quality=95)
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A data root with `faces/<split>/<class>/*.jpg` (72 images)."""
    root = tmp_path_factory.mktemp("data")
    write_imagefolder(root / "faces")
    return root


@pytest.fixture(scope="session")
def tiny_manifest(tiny_dataset, tmp_path_factory) -> Path:
    from fercache.adapters import build
    from fercache.manifests import write_manifest

    out = tmp_path_factory.mktemp("manifests") / "faces.csv"
    return write_manifest(build("imagefolder", tiny_dataset / "faces", data_root=tiny_dataset), out)


@pytest.fixture(scope="session")
def tiny_store(tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path_factory) -> Path:
    """A complete store of the tiny dataset through the real `extract()`."""
    from fercache.extract import extract

    out = tmp_path_factory.mktemp("stores") / "faces.zarr"
    extract(tiny_manifest, tiny_encoder_spec, out, root=tiny_dataset, chunk_rows=16, batch_size=8, workers=0,
            progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_clip77(tmp_path_factory):
    import open_clip
    import torch

    path = tmp_path_factory.mktemp("models") / "fercache-tiny-clip77.json"
    path.write_text(json.dumps(TINY_CLIP_77))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return path, open_clip.create_model(path.stem), open_clip.get_tokenizer(path.stem)


@pytest.fixture(scope="session")
def video_store(tmp_path_factory, tiny_clip77):
    """Frames of 4-class synthetic clips (train/val/test) extracted with the tiny 77-token CLIP."""
    import csv

    from fercache.extract import extract

    root = tmp_path_factory.mktemp("video")
    rng = np.random.default_rng(0)
    classes = ["anger", "happy", "neutral", "sad"]
    rows = []
    for split, n_per_class in (("train", 6), ("val", 3), ("test", 3)):
        for ci, label in enumerate(classes):
            for k in range(n_per_class):
                clip = f"{split}_{label}_{k}"
                (root / "clips" / clip).mkdir(parents=True)
                for f in range(int(rng.integers(3, 7))):
                    class_image(ci, rng).save(root / "clips" / clip / f"{f:03d}.jpg")
                    rows.append([f"{clip}/{f:03d}", f"clips/{clip}/{f:03d}.jpg", label, split, clip, clip, f])
    manifest = root / "clips.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["sample_id", "path", "label", "split", "subject", "clip_id", "frame_idx"]] + rows)
    out = root / "clips.zarr"
    extract(manifest, f"open_clip:{tiny_clip77[0]}", out, root=root, chunk_rows=32, batch_size=16, workers=0,
            progress=False)
    return str(out), root
