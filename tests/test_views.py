"""Augmented views in the cache (`extract --views flip`): stored features, training on random views, averaged evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fercache import store as S
from fercache.errors import UnknownNameError
from fercache.extract import extract
from fercache.manifests import read_manifest, write_manifest

from .conftest import class_image


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory, tiny_dataset, tiny_manifest, tiny_encoder_spec):
    """The tiny dataset plus a mirrored copy of every image, extracted with the flip view."""
    root = tmp_path_factory.mktemp("mirror")
    m = read_manifest(tiny_manifest)
    rows = []
    for r in m.rows:
        for kind in ("plain", "mirror"):
            img = Image.open(tiny_dataset / r["path"])
            dst = root / kind / r["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            (img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if kind == "mirror" else img).save(dst.with_suffix(".png"))
            rows.append({**r, "sample_id": f"{kind}/{r['sample_id']}", "path": f"{kind}/{r['path'][:-4]}.png"})
    manifest = write_manifest(type(m)(rows=rows, source="mirror", columns=m.columns), root / "m.csv")
    out = root / "views.zarr"
    extract(manifest, tiny_encoder_spec, out, root=root, views=["flip"], chunk_rows=32, batch_size=16, workers=0,
            progress=False)
    return manifest, root, out


def test_flip_view_is_the_mirrored_image_through_the_same_encoder(mirrored):
    _, _, out = mirrored
    st = S.open_store(out)
    assert set(st.outputs) == {"pooled", "embedding", "pooled.flip", "embedding.flip"}
    assert st.fingerprint["encoder"]["views"] == ["flip"]
    emb, flip = st.features("embedding"), st.features("embedding.flip")
    n = len(emb) // 2  # rows alternate plain, mirror
    plain_flip, mirror = flip[0::2], emb[1::2]
    cos = (plain_flip * mirror).sum(1) / np.linalg.norm(plain_flip, axis=1) / np.linalg.norm(mirror, axis=1)
    assert len(cos) == n and cos.min() > 0.999  # flipping the input tensor == encoding the mirrored file
    assert not np.allclose(emb[0::2], flip[0::2], atol=1e-2)  # and it is a different view than the plain one


def test_views_change_the_fingerprint_and_unknown_views_fail_fast(tiny_store, tiny_manifest, tiny_dataset,
                                                                  tiny_encoder_spec, tmp_path):
    with pytest.raises(UnknownNameError, match="flip"):
        extract(tiny_manifest, tiny_encoder_spec, tmp_path / "x.zarr", root=tiny_dataset, views=["rotate"], workers=0)
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(Exception, match="other inputs"):  # the plain store cannot be resumed as a flip store
        extract(tiny_manifest, tiny_encoder_spec, tiny_store, root=tiny_dataset, views=["flip"], workers=0,
                chunk_rows=16, progress=False)
    assert "views" not in S.open_store(tiny_store).fingerprint["encoder"]  # plain stores keep their old keys


def test_random_view_draws_each_view_for_whole_rows():
    from fercache.train import random_view

    x = torch.arange(4000, dtype=torch.float32).reshape(1000, 4)
    batch = {"x": x, "xv": torch.stack([x + 1e5], dim=1), "y": torch.zeros(1000)}
    out = random_view(batch, torch.Generator().manual_seed(0))
    from_view = (out["x"] >= 1e5).all(1)
    assert ((out["x"] == x).all(1) | from_view).all()  # every row is one intact view, never a mix
    assert 400 < int(from_view.sum()) < 600 and "xv" not in out


def test_heads_train_on_views_and_evaluate_on_their_average(mirrored, tmp_path):
    from fercache.evaluate import evaluate_run
    from fercache.predict import predict
    from fercache.train import _to_device, fit, load_run, predict_logits, targets
    from fercache.data import load_features

    manifest, root, out = mirrored
    r = fit(str(out), "linear", out_dir=tmp_path, recipe={"epochs": 3})
    assert r.metrics["config"]["views"] == ["flip"]
    res = evaluate_run(r.run_dir, write=False)
    assert res["tta_views"] == ["flip"] and res["n"] == 48
    # the evaluation is the mean of the plain and the flipped logits
    model, cfg, _ = load_run(r.run_dir)
    fs = load_features(str(out), views=["flip"]).rows("test")
    data = _to_device(fs, targets(fs, "expr", cfg["classes"]), "cpu")
    with torch.no_grad():
        expected = (model(data["x"]) + model(data["xv"][:, 0])) / 2
    torch.testing.assert_close(predict_logits(model, data), expected)
    off = fit(str(out), "linear", out_dir=tmp_path / "off", recipe={"epochs": 3}, views=False)
    assert off.metrics["config"]["views"] == [] and evaluate_run(off.run_dir, write=False)["tta_views"] == []
    probs = predict(r.run_dir, [root / "plain" / "faces" / "test" / "happy"])
    assert len(probs) == 6 and all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in probs)


def test_clip_level_heads_ignore_views(tmp_path, tiny_encoder_spec):
    """A temporal head resamples frames; a store's views are not mixed into its clips."""
    import csv

    from fercache.train import fit

    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        for ci, label in enumerate(["happy", "sad"]):
            for k in range(n):
                clip = f"{split}{label}{k}"
                (tmp_path / clip).mkdir()
                for f in range(3):
                    class_image(ci, rng).save(tmp_path / clip / f"{f}.png")
                    rows.append([f"{clip}/{f}", f"{clip}/{f}.png", label, split, clip, clip, f])
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["sample_id", "path", "label", "split", "subject", "clip_id", "frame_idx"]] + rows)
    extract(tmp_path / "m.csv", tiny_encoder_spec, tmp_path / "v.zarr", root=tmp_path, views=["flip"], workers=0, progress=False)
    r = fit(str(tmp_path / "v.zarr"), "temporal", out_dir=tmp_path, recipe={"epochs": 1},
            hp={"classifier": "linear", "width": 32, "heads": 4, "mlp": 64})
    assert r.metrics["config"]["views"] == [] and r.metrics["n_train"] == 12


def test_cli_extract_views_and_train_head_no_views(tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path):
    import json

    from .test_cli import invoke

    s = tmp_path / "v.zarr"
    r = invoke("extract", tiny_manifest, "--encoder", tiny_encoder_spec, "--out", s, "--data-root", tiny_dataset,
               "--workers", "0", "--views", "flip")
    assert r.exit_code == 0 and "72 ok" in r.output, r.output
    assert "embedding.flip[32]" in invoke("info", s).output
    r = invoke("train-head", s, "--head", "linear", "--recipe", "epochs=1", "--no-views", "-o", tmp_path / "runs")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "runs" / "v-linear" / "seed0" / "config.json").read_text())["views"] == []
