"""Image decoding (CPU workers) and resize/crop/normalise (batched torch, on the encoder's device).

Workers ship small uint8 images; the device does the float work in batches.
The same torch code runs on CPU, so it is tested here; :func:`reference_transform`
is the per-image PIL pipeline it must match (tests/test_encoders.py, tests/test_open_clip_preprocess.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


PREPROCESS_REVISION = 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's training statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: --normalize: which statistics scale the pixels. `checkpoint` keeps the ones the weights were trained with; the
#: others replace them, as a published recipe may (the feature-mask recipe feeds CLIP ImageNet-normalised input).
NORMALIZE = {"checkpoint": None, "clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


@dataclass(frozen=True)
class Preprocess:
    """Resize to `size` as `resize_mode` says, scale to [0, 1], normalise. The modes are open_clip's:
    `shortest` resizes the shorter side to `size` and centre-crops a square; `squash` resizes to a square,
    ignoring the aspect ratio; `longest` resizes the longer side to `size` and pads the rest with `fill`."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill: int = 0

    def __post_init__(self):
        RESIZES.lookup(self.resize_mode)

    def to_dict(self) -> dict:
        """JSON-friendly form, part of the store fingerprint. `revision` 2: resizing matches PIL's (the long side
        and crop offset as torchvision computes them, bicubic in two clipped passes); revision 1 (no key) was up to
        7/255 per pixel off when upscaling, so its stores read as other inputs."""
        d = {"size": self.size, "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
             "revision": PREPROCESS_REVISION}
        if self.resize_mode == "shortest":
            return {**d, "resize": "shorter-side", "crop": "center"}
        if self.resize_mode == "squash":
            return {**d, "resize": "squash", "crop": "none"}
        return {**d, "resize": "longer-side", "crop": "pad", "fill": self.fill}

    def normalized(self, how: str) -> "Preprocess":
        """The same resizing with other normalisation statistics (`how`: a key of NORMALIZE)."""
        stats = NORMALIZE[how]
        return self if stats is None else replace(self, mean=stats[0], std=stats[1])


#: The most pixels one image may decode to (after a JPEG's reduced decode): 2^25, 33.5 MP, above any camera photo
#: a face is cut from. A file's header can claim any size (a 32 KB PNG of 12000x12000 1-bit pixels), and
#: decoding, converting and resizing it would cost gigabytes; past the limit the row fails, named, and nothing
#: is decoded. With it, one image costs at most 100 MB as uint8 RGB.
MAX_PIXELS = 1 << 25
#: The longest side may be at most this many times the shortest: resizing the shortest side to the model's size
#: scales the other by as much (a 1x60000 strip at 64 px is 64x3.8M pixels).
MAX_ASPECT = 16
#: 16-bit modes: scaled to 8 bits by 255/65535, as an image viewer shows them (PIL's convert saturates them).
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ORIENTATION = 0x0112  # the EXIF tag a camera records how it was held in


def parse_box(bbox: str, width: int, height: int) -> tuple[int, int, int, int]:
    """`x0 y0 x1 y1` in pixels, clipped to the image. A box that is not four numbers, or has no area inside the
    image, raises ValueError: its row fails, and the rest of the chunk is encoded."""
    try:
        x0, y0, x1, y1 = (float(v) for v in bbox.split())
    except ValueError:
        raise ValueError(f"bbox {bbox!r} is not four numbers x0 y0 x1 y1") from None
    box = (max(0, int(x0)), max(0, int(y0)), min(width, int(x1)), min(height, int(y1)))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"bbox {bbox!r} has no area inside the {width}x{height} image")
    return box


def _check_extent(width: int, height: int) -> None:
    """Refuse an image whose size would cost memory out of proportion to a face (see MAX_PIXELS, MAX_ASPECT)."""
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width}x{height} pixels is over the limit of {MAX_PIXELS:,} per image; crop or shrink it "
                         "(or give a bbox)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ValueError(f"{width}x{height} is longer than {MAX_ASPECT}:1; crop the face out (give a bbox)")


def _to_rgb(img: Image.Image) -> np.ndarray:
    """uint8 RGB pixels. 16-bit grey is scaled to 8 bits; 32-bit integer and float pixels have no range an 8-bit
    encoder could assume (0-1? 0-255? 0-65535?), so they are refused rather than saturated or turned black."""
    if img.mode in WIDE_MODES:
        grey = np.asarray(img, dtype=np.uint32)
        return np.repeat(((grey * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode in ("I", "F"):
        what = "32-bit integer" if img.mode == "I" else "floating-point"
        raise ValueError(f"{what} pixels (mode {img.mode}) have no defined 8-bit range; convert the image to 8 or "
                         "16 bits per channel")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(path, bbox: str = "", size: int | None = None) -> np.ndarray:
    """Decode to uint8 RGB HxWx3, upright as its EXIF orientation says, cropped to `bbox` ("x0 y0 x1 y1", in
    the upright image's pixels, clipped to it). Large JPEGs are decoded at reduced scale; images past MAX_PIXELS
    or MAX_ASPECT raise ValueError before their pixels are decoded."""
    from PIL import ImageOps

    with Image.open(path) as img:
        if size and img.format == "JPEG" and not bbox:
            img.draft("RGB", (2 * size, 2 * size))  # DCT-domain downscale: never below 2x the target side
        _check_extent(*img.size)
        if img.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image: only when turned
            img = ImageOps.exif_transpose(img)
        if bbox:
            img = img.crop(parse_box(bbox, *img.size))
        _check_extent(*img.size)
        return _to_rgb(img)


def _resize_shorter(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """torchvision's Resize(size): the shorter side to `size`, the longer one to int(size * long / short)."""
    h, w = x.shape[-2:]
    if h <= w:
        return _resize_to(x, size, max(size, int(size * w / h)), mode)
    return _resize_to(x, max(size, int(size * h / w)), size, mode)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop: the offset rounded (half to even), not floored."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def _resize_to(x: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    """Resize as PIL does. Bicubic: the width first, then the height, each pass rounded and clipped to uint8 values,
    since PIL clips the first pass's overshoot before the second (one 2-D pass is 4-7/255 off when upscaling).
    Bilinear cannot overshoot: one pass, rounded once, is closer to PIL's fixed-point result."""
    if (h, w) == tuple(x.shape[-2:]):
        return x
    if mode != "bicubic":
        return _interpolate(x, h, w, mode)
    if w != x.shape[-1]:
        x = _interpolate(x, x.shape[-2], w, mode)
    return _interpolate(x, h, w, mode) if h != x.shape[-2] else x


def _interpolate(x: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    """One antialiased resize, rounded and clipped to uint8 values as PIL stores them."""
    return F.interpolate(x, size=(h, w), mode=mode, antialias=True, align_corners=False).clamp_(0, 255).round_()


#: How each resize mode makes a [B, 3, S, S] batch from uint8-valued float images of one size.
RESIZES = Registry("resize mode")


@RESIZES.register("shortest")
def _shortest(x: torch.Tensor, spec: "Preprocess") -> torch.Tensor:
    return _center_crop(_resize_shorter(x, spec.size, spec.interpolation), spec.size)


@RESIZES.register("squash")
def _squash(x: torch.Tensor, spec: "Preprocess") -> torch.Tensor:
    return _resize_to(x, spec.size, spec.size, spec.interpolation)


@RESIZES.register("longest")
def _longest(x: torch.Tensor, spec: "Preprocess") -> torch.Tensor:
    """open_clip's ResizeKeepRatio(longest=1) then CenterCropOrPad: the whole image, padded to a square."""
    h, w = x.shape[-2:]
    ratio = max(h / spec.size, w / spec.size)
    x = _resize_to(x, round(h / ratio), round(w / ratio), spec.interpolation)
    h, w = x.shape[-2:]
    pad_w, pad_h = max(spec.size - w, 0), max(spec.size - h, 0)
    x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=float(spec.fill))
    return _center_crop(x, spec.size)


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
    x = RESIZES[spec.resize_mode](x, spec)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1) * 255
    x = (x - mean).div_(std).to(dtype)  # in place on the new tensor: one batch-sized allocation fewer, same values
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def reference_transform(spec: Preprocess):
    """The per-image PIL pipeline open_clip builds for this preprocessing (for `shortest`, the torchvision
    Resize + CenterCrop that published FER repositories use): what the batched device path must match."""
    from open_clip.transform import image_transform

    return image_transform(spec.size, is_train=False, mean=spec.mean, std=spec.std, resize_mode=spec.resize_mode,
                           interpolation=spec.interpolation, fill_color=spec.fill)


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
#: Gaussian noise, std in [0, 1] pixel units (no published value; this one is ours), added before normalisation.
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
    top, left, h, w = erase_boxes(rows, x.shape[-1]).to(x.device).T[..., None, None]
    ys, xs = torch.arange(x.shape[-2], device=x.device), torch.arange(x.shape[-1], device=x.device)
    inside = (ys[:, None] >= top) & (ys[:, None] < top + h) & (xs >= left) & (xs < left + w)  # [B, S, S]
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
