"""fercache preprocesses exactly as open_clip does for each checkpoint: tags, hf-hub:/local-dir: models, local files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch

from fercache import encoders as E
from fercache.errors import EncoderError, StoreError
from fercache.preprocess import CLIP_MEAN, IMAGENET_MEAN, IMAGENET_STD, Preprocess, reference_transform

open_clip = pytest.importorskip("open_clip")


def _needs_transformers(arch: str) -> bool:
    """open_clip builds these text towers with `transformers` from a hub config: not buildable offline."""
    return "text_cfg" in (cfg := open_clip.get_model_config(arch) or {}) and "hf_model_name" in cfg["text_cfg"]


def test_every_pretrained_tag_is_preprocessed_as_open_clip_builds_it(monkeypatch):
    """For every entry of open_clip.list_pretrained(): fercache's preprocessing, resolved from configs without
    weights, equals the eval transform open_clip.create_model_and_transforms builds (its downloads stubbed out,
    the model on the meta device so nothing is allocated)."""
    import open_clip.factory as factory
    from open_clip.factory import merge_preprocess_dict
    from open_clip.transform import PreprocessCfg, image_transform_v2

    monkeypatch.setattr(factory, "download_pretrained", lambda cfg, cache_dir=None: "")
    logging.disable(logging.WARNING)
    checked, by_config, differ = 0, [], 0
    try:
        for arch, tag in open_clip.list_pretrained():
            ours = E.open_clip_preprocess(arch, tag)
            if _needs_transformers(arch):  # oracle: open_clip's own merge of its defaults and the tag's config
                cfg = merge_preprocess_dict(asdict(PreprocessCfg()), open_clip.get_pretrained_cfg(arch, tag))
                cfg["size"] = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
                theirs, want = cfg, image_transform_v2(PreprocessCfg(**cfg), is_train=False)
                by_config.append(f"{arch}/{tag}")
            else:
                with torch.device("meta"), warnings.catch_warnings():  # QuickGELU mismatches: not read here
                    warnings.simplefilter("ignore")
                    model, _, want = open_clip.create_model_and_transforms(arch, pretrained=tag, load_weights=False,
                                                                           device="meta")
                theirs = model.visual.preprocess_cfg
            size = theirs["size"][0] if isinstance(theirs["size"], (tuple, list)) else theirs["size"]
            assert (ours.size, ours.mean, ours.std, ours.interpolation, ours.resize_mode, ours.fill) == (
                size, tuple(theirs["mean"]), tuple(theirs["std"]), theirs["interpolation"], theirs["resize_mode"],
                theirs["fill_color"]), f"{arch}/{tag}"
            assert repr(reference_transform(ours)) == repr(want), f"{arch}/{tag}"
            differ += ours != Preprocess(size=ours.size, mean=CLIP_MEAN, std=E.NORMALIZE["clip"][1])
            checked += 1
    finally:
        logging.disable(logging.NOTSET)
    assert checked == len(open_clip.list_pretrained()) >= 150
    assert len(by_config) <= 12, by_config  # the multilingual text towers only
    assert differ >= 50  # the tags the old code preprocessed as OpenAI's defaults


# --- through extract, offline: a tag registered in the test, its "download" a local file ---------------------


@pytest.fixture()
def tagged_tiny(tiny_vit_config, tmp_path, monkeypatch):
    """The tiny test ViT with a pretrained tag `squashed` (bilinear, squash, ImageNet stats), whose file is local."""
    import open_clip.pretrained as P

    name = tiny_vit_config.stem
    open_clip.add_model_config(tiny_vit_config)
    torch.manual_seed(1)
    weights = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model(name).state_dict(), weights)
    cfg = {"file": str(weights), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear",
           "resize_mode": "squash"}
    monkeypatch.setitem(P._PRETRAINED, name, {"squashed": P._pcfg(**cfg) if hasattr(P, "_pcfg") else cfg})
    return name, weights


def test_a_tag_extracts_with_its_own_preprocessing_and_an_old_store_reads_as_other_inputs(
        tagged_tiny, tiny_manifest, tiny_dataset, tmp_path, caplog):
    from fercache.extract import extract
    from fercache.store import open_store

    name, weights = tagged_tiny
    out = tmp_path / "tag.zarr"
    extract(tiny_manifest, f"open_clip:{name}", out, pretrained="squashed", root=tiny_dataset, workers=0,
            progress=False)
    pre = open_store(out).fingerprint["encoder"]["preprocess"]
    assert (pre["resize"], pre["interpolation"], pre["mean"]) == ("squash", "bilinear", list(IMAGENET_MEAN))
    # the same file as a local path: the model's default preprocessing, said to differ from the tag's
    with caplog.at_level("WARNING", logger="fercache.encoders"):
        enc = E.load_encoder(f"open_clip:{name}", pretrained=str(weights))
    assert enc.preprocess.resize_mode == "shortest" and "pass --preprocess-tag TAG" in caplog.text
    # what the old code built for the tag: a store of it is other inputs now
    with pytest.raises(StoreError, match="built from other inputs"):
        extract(tiny_manifest, f"open_clip:{name}", out, pretrained=str(weights), root=tiny_dataset, workers=0,
                progress=False)
    # naming the tag the file is a copy of gives the tag's store: the same store, found complete
    res = extract(tiny_manifest, f"open_clip:{name}", out, pretrained=str(weights), preprocess_tag="squashed",
                  root=tiny_dataset, workers=0, progress=False)
    assert res.already_complete
    # and rebuilding the encoder from the store (predict, zero-shot) gives the same preprocessing
    assert E.encoder_of(open_store(out).meta).preprocess == E.open_clip_preprocess(name, "squashed")


def test_local_dir_models_use_their_configs_preprocessing(tiny_vit_config, tiny_manifest, tiny_dataset, tmp_path):
    from fercache.extract import extract
    from fercache.store import open_store

    folder = tmp_path / "my-clip"
    folder.mkdir()
    config = {"model_cfg": json.loads(tiny_vit_config.read_text()),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                                 "resize_mode": "longest", "fill_color": 0}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    open_clip.add_model_config(tiny_vit_config)
    torch.manual_seed(2)
    torch.save(open_clip.create_model(tiny_vit_config.stem).state_dict(), folder / "open_clip_pytorch_model.bin")
    spec = f"open_clip:local-dir:{folder}"
    out = tmp_path / "dir.zarr"
    extract(tiny_manifest, spec, out, root=tiny_dataset, workers=0, progress=False)
    fp = open_store(out).fingerprint["encoder"]
    assert fp["preprocess"]["resize"] == "longer-side" and fp["preprocess"]["mean"] == [0.5] * 3
    assert fp["weights_sha256"] == E.sha256_file(folder / "open_clip_pytorch_model.bin")
    with pytest.raises(EncoderError, match="holds no open_clip_config.json"):
        E.check_encoder_name(f"open_clip:local-dir:{tmp_path}")


def test_normalize_replaces_the_statistics_and_is_fingerprinted(tiny_manifest, tiny_dataset, tiny_encoder_spec,
                                                                tiny_store, tmp_path):
    from fercache.errors import ConfigError
    from fercache.extract import extract
    from fercache.store import open_store

    out = tmp_path / "imagenet.zarr"
    extract(tiny_manifest, tiny_encoder_spec, out, pretrained="none", normalize="imagenet", root=tiny_dataset,
            chunk_rows=16, workers=0, progress=False)
    a, b = open_store(tiny_store), open_store(out)
    assert b.fingerprint["encoder"]["preprocess"]["mean"] == list(IMAGENET_MEAN)
    assert a.fingerprint["key"] != b.fingerprint["key"]
    assert not np.allclose(a.features(), b.features())
    assert E.encoder_of(b.meta).preprocess.mean == IMAGENET_MEAN
    with pytest.raises(ConfigError, match="--normalize imagenot: checkpoint, clip, imagenet"):
        extract(tiny_manifest, tiny_encoder_spec, tmp_path / "x.zarr", normalize="imagenot", root=tiny_dataset)


def test_a_vit_without_the_pooled_path_is_refused_never_stored_without_pooled(tiny_vit_config):
    open_clip.add_model_config(tiny_vit_config)
    visual = open_clip.create_model(tiny_vit_config.stem).visual

    class Older(type(visual)):  # a VisionTransformer built as open_clip 2.x built it: no _embeds
        @property
        def _embeds(self):
            raise AttributeError("_embeds")

    visual.__class__ = Older
    with pytest.raises(EncoderError, match="VisionTransformer has no _embeds, which fercache reads for the pooled"):
        E.ClipImage(visual)


@pytest.mark.parametrize("value", ["1", "on", "YES", "true"])
def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(value, tmp_path):
    code = ("from fercache import encoders as E\n"
            "E._cached_open_clip_file = lambda cfg: None\n"
            "try: E.resolve_open_clip_weights('ViT-B-32', 'laion2b_s34b_b79k')\n"
            "except Exception as e: print(type(e).__name__, e)")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": value, "HF_HOME": str(tmp_path),
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert out.startswith("EncoderError HF_HUB_OFFLINE is set"), out


def test_an_unsafe_pickle_as_weights_is_a_clear_error(tmp_path, tiny_vit_config):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(EncoderError, match="evil.pt is not a plain weights file: torch refused to load it safely"):
        E.load_encoder("torchvision:mobilenet_v2", pretrained=str(bad))
    with pytest.raises(EncoderError, match="evil.pt is not a plain weights file"):
        E.load_encoder(f"open_clip:{tiny_vit_config}", pretrained=str(bad))


def test_hf_hub_models_load_offline_from_the_cache_with_their_configs_preprocessing(tiny_vit_config, tiny_manifest,
                                                                                    tiny_dataset, tmp_path):
    """`open_clip:hf-hub:ORG/REPO` with HF_HUB_OFFLINE=1 and the repo in the Hugging Face cache, as a machine that
    downloaded it once has it: open_clip's own loader reads config and weights; the store takes the config's
    preprocessing and the weights file's sha256."""
    snapshot = tmp_path / "hub" / "models--fercache-test--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    config = {"model_cfg": json.loads(tiny_vit_config.read_text()),
              "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                                 "resize_mode": "squash"}}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    open_clip.add_model_config(tiny_vit_config)
    torch.manual_seed(3)
    torch.save(open_clip.create_model(tiny_vit_config.stem).state_dict(), snapshot / "open_clip_pytorch_model.bin")
    code = ("import sys, json; from fercache.extract import extract; from fercache.store import open_store\n"
            "extract(sys.argv[1], 'open_clip:hf-hub:fercache-test/tiny', sys.argv[2], root=sys.argv[3], workers=0,"
            " progress=False)\n"
            "print(json.dumps(open_store(sys.argv[2]).fingerprint['encoder']))")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", code, str(tiny_manifest), str(tmp_path / "hub.zarr"),
                           str(tiny_dataset)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    enc = json.loads(done.stdout.splitlines()[-1])
    assert (enc["preprocess"]["resize"], enc["preprocess"]["mean"]) == ("squash", [0.5] * 3)
    assert enc["weights_sha256"] == E.sha256_file(snapshot / "open_clip_pytorch_model.bin")
