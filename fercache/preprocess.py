"""Image decoding (CPU workers) and resize/crop/normalise (batched torch, on the encoder's device).

Workers ship small uint8 images; the device does the float work in batches.
The same torch code runs on CPU, so it is tested here; :func:`reference_transform`
is the per-image PIL pipeline it must match (see tests/test_preprocess.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

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
    x = (x - mean).div_(std).to(dtype)  # in place on the new tensor: one batch-sized allocation fewer, same values
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def reference_transform(spec: Preprocess):
    """The per-image PIL/torchvision pipeline that published FER repositories use (for tests and the baseline)."""
    from torchvision import transforms as T

    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[spec.interpolation]
    return T.Compose([
        T.Resize(spec.size, interpolation=mode), T.CenterCrop(spec.size), T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


@dataclass(frozen=True)
class View:
    """An augmented view cached beside the plain image: `fn(x, rows, spec)` maps the normalised model input
    [B, 3, S, S] of manifest rows `rows` ([B] int64), preprocessed by `spec`, to the view's input.
    `tta`: evaluation averages it with the plain image (a mirrored face is the same face); a training-only view
    (erasing, noise) is one more draw for training and is never averaged into a prediction."""

    fn: Callable[[torch.Tensor, torch.Tensor, Preprocess], torch.Tensor]
    tta: bool


#: Augmented views (`fercache extract --views flip,erase,noise`). Heads draw one of {image, its views} per image
#: per epoch, so augmentation survives caching; a random view is a fixed draw per manifest row (seeded by the
#: row index), so resuming, sharding over ranks and the batch size never change a stored feature.
VIEWS = Registry("view")


def register_view(name: str, tta: bool):
    """Decorator: register `fn(x, rows, spec)` as view `name`."""
    def wrap(fn):
        VIEWS[name] = View(fn, tta)
        return fn
    return wrap


@register_view("flip", tta=True)
def _hflip(x: torch.Tensor, rows: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """Horizontal mirror: faces are near-symmetric, and every published FER recipe trains with it."""
    return x.flip(-1)


#: torchvision RandomErasing's parameters as the published mask-head recipe uses them (scale 0.02-0.25, ratio
#: 0.3-3.3, value 0 after normalisation: the dataset's mean colour), always applied: the plain image is the
#: other draw.
ERASE_SCALE, ERASE_RATIO, ERASE_SEED = (0.02, 0.25), (0.3, 3.3), 0xE7A5E
#: Gaussian noise, std in [0, 1] pixel units (METHODS.md names no value; ours), added before normalisation.
NOISE_STD, NOISE_SEED, NOISE_BANK = 0.1, 0x6015E, 97


def row_uniforms(seed: int, rows: torch.Tensor, n: int) -> np.ndarray:
    """[B, n] uniforms in [0, 1): draw i of row r is splitmix64 of the counter (seed, r, i), a pure function of
    the row, computed for the whole batch at once (a generator per row would cost the host more than the GPU
    spends on the batch)."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        z = (np.uint64(seed) * golden + (rows.cpu().numpy().astype(np.uint64)[:, None] * np.uint64(n)
                                         + np.arange(1, n + 1, dtype=np.uint64)) * golden)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def erase_boxes(rows: torch.Tensor, size: int, tries: int = 10) -> torch.Tensor:
    """[B, 4] (top, left, h, w) per row, drawn as torchvision's RandomErasing.get_params draws them: the first of
    `tries` (area, aspect) draws whose box fits (h = w = 0, nothing erased, if none does), then its position."""
    u = row_uniforms(ERASE_SEED, rows, 2 * tries + 2)
    area = size * size * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * u[:, :tries])
    lo, hi = np.log(ERASE_RATIO)
    aspect = np.exp(lo + (hi - lo) * u[:, tries:2 * tries])
    h, w = np.rint(np.sqrt(area * aspect)).astype(np.int64), np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (h < size) & (w < size)
    first = fits.argmax(1)
    pick = np.arange(len(first))
    h, w = np.where(fits.any(1), h[pick, first], 0), np.where(fits.any(1), w[pick, first], 0)
    top = np.floor(u[:, -2] * (size - h + 1)).astype(np.int64)
    left = np.floor(u[:, -1] * (size - w + 1)).astype(np.int64)
    return torch.from_numpy(np.stack([top, left, h, w], axis=1))


@register_view("erase", tta=False)
def _erase(x: torch.Tensor, rows: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """Random erasing: one rectangle of 2-25% of the image set to 0 (the mean colour after normalisation)."""
    t, l, h, w = erase_boxes(rows, x.shape[-1]).to(x.device).T[..., None, None]
    ys, xs = torch.arange(x.shape[-2], device=x.device), torch.arange(x.shape[-1], device=x.device)
    inside = (ys[:, None] >= t) & (ys[:, None] < t + h) & (xs >= l) & (xs < l + w)  # [B, S, S]
    return x.masked_fill(inside[:, None], 0)


_BANKS: dict = {}


def _noise_bank(size: int, device) -> torch.Tensor:
    """NOISE_BANK fixed N(0, 1) images [K, 3, S, S], made once per size and device from NOISE_SEED: drawing
    3*S*S normals per row on the host would cost more than a GPU's encoder does."""
    key = (size, str(device))
    if key not in _BANKS:
        gen = torch.Generator().manual_seed(NOISE_SEED)
        _BANKS[key] = torch.randn(NOISE_BANK, 3, size, size, generator=gen).to(device)
    return _BANKS[key]


@register_view("noise", tta=False)
def _noise(x: torch.Tensor, rows: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """Gaussian pixel noise (std NOISE_STD): row r takes bank image r mod K, shifted cyclically by a (dy, dx)
    drawn from r, so neighbouring rows and rows K apart get different noise."""
    s = x.shape[-1]
    shift = torch.from_numpy(np.floor(row_uniforms(NOISE_SEED, rows, 2) * s).astype(np.int64))
    k, dy, dx = (rows % NOISE_BANK).to(x.device), shift[:, 0].to(x.device), shift[:, 1].to(x.device)
    idx = torch.arange(s, device=x.device)
    iy, ix = (idx + dy[:, None]) % s, (idx + dx[:, None]) % s  # [B, S] each
    channels = torch.arange(3, device=x.device)[None, :, None, None]
    noise = _noise_bank(s, x.device)[k[:, None, None, None], channels, iy[:, None, :, None], ix[:, None, None, :]]
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return x + (NOISE_STD * noise / std).to(x.dtype)


def with_views(x: torch.Tensor, views: tuple[str, ...] | list[str], spec: Preprocess, rows: torch.Tensor | None = None):
    """(name, input) for the plain input (name "") and then each named view of it; `rows`: the manifest rows
    of the batch (the random views draw from them; flip needs none)."""
    yield "", x
    for v in views:
        yield v, VIEWS[v].fn(x, rows, spec)


def tta_views(views) -> list[str]:
    """The views evaluation may average with the plain image (flip), in order; erase and noise are training-only."""
    return [v for v in views if VIEWS.lookup(v).tta]
