"""Image decoding (CPU workers) and resize/crop/normalise (batched torch, on the encoder's device).

Workers ship small uint8 images; the device does the float work in batches.
The same torch code runs on CPU, so it is tested here; :func:`reference_transform`
is the per-image PIL pipeline it must match (see tests/test_preprocess.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `size`, centre-crop `size` x `size`, scale to [0, 1], normalise."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        """JSON-friendly form, part of the store fingerprint."""
        d = asdict(self)
        d.update(mean=list(self.mean), std=list(self.std), resize="shorter-side", crop="center")
        return d


def decode_image(path, bbox: str = "", size: int | None = None) -> np.ndarray:
    """Decode to uint8 RGB HxWx3, cropping `bbox` ("x0 y0 x1 y1"); large JPEGs are decoded at reduced scale."""
    with Image.open(path) as img:
        if size and img.format == "JPEG" and not bbox:
            img.draft("RGB", (2 * size, 2 * size))  # DCT-domain downscale: never below 2x the target side
        img = img.convert("RGB")
        if bbox:
            x0, y0, x1, y1 = (int(float(v)) for v in bbox.split())
            img = img.crop((x0, y0, x1, y1))
        return np.asarray(img, dtype=np.uint8)


def _resize_shorter(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) == (h, w):
        return x
    x = F.interpolate(x, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
    # PIL works in uint8: clamp and round so the device path matches it to within float error.
    return x.clamp_(0, 255).round_()


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def to_model_input(images: torch.Tensor | list, spec: Preprocess, device="cpu",
                   dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """uint8 images ([B,H,W,3] tensor, or a list of HxWx3 arrays of mixed sizes) -> normalised [B,3,S,S]."""
    if isinstance(images, torch.Tensor):
        return _batch_to_input(images, spec, device, dtype, channels_last)
    out = torch.empty((len(images), 3, spec.size, spec.size), device=device, dtype=dtype)
    by_shape: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(img.shape, []).append(i)
    for idx in by_shape.values():
        group = torch.from_numpy(np.stack([images[i] for i in idx]))
        out[idx] = _batch_to_input(group, spec, device, dtype, False)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _batch_to_input(batch: torch.Tensor, spec: Preprocess, device, dtype, channels_last: bool) -> torch.Tensor:
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    x = _center_crop(_resize_shorter(x, spec.size, spec.interpolation), spec.size)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1) * 255
    x = ((x - mean) / std).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def reference_transform(spec: Preprocess):
    """The per-image PIL/torchvision pipeline that published FER repositories use (for tests and the baseline)."""
    from torchvision import transforms as T

    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[spec.interpolation]
    return T.Compose([
        T.Resize(spec.size, interpolation=mode), T.CenterCrop(spec.size), T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


#: Augmented views cached beside the plain image (`fercache extract --views flip`): functions of the
#: normalised model input [B, 3, S, S]. Heads sample one view per image per epoch, and evaluation
#: averages their logits, so augmentation survives caching.
VIEWS = Registry("view")


@VIEWS.register("flip")
def _hflip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal mirror: faces are near-symmetric, and every published FER recipe trains with it."""
    return x.flip(-1)


def with_views(x: torch.Tensor, views: tuple[str, ...] | list[str]):
    """(name, input) for the plain input (name "") and then each named view of it."""
    yield "", x
    for v in views:
        yield v, VIEWS[v](x)
