"""Augmented views in the cache (`extract --views flip`): stored features, training on random views, averaged
evaluation."""

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
    with pytest.raises(Exception, match=r"other inputs \(views none vs flip\)"):  # a plain store is no flip store
        extract(tiny_manifest, tiny_encoder_spec, tiny_store, root=tiny_dataset, views=["flip"], workers=0,
                chunk_rows=16, progress=False)
    assert "views" not in S.open_store(tiny_store).fingerprint["encoder"]  # plain stores keep their old keys


def test_random_view_draws_each_view_for_whole_rows():
    from fercache.loop import random_view

    x = torch.arange(4000, dtype=torch.float32).reshape(1000, 4)
    batch = {"x": x, "xv": torch.stack([x + 1e5], dim=1), "y": torch.zeros(1000)}
    out = random_view(batch, torch.Generator().manual_seed(0))
    from_view = (out["x"] >= 1e5).all(1)
    assert ((out["x"] == x).all(1) | from_view).all()  # every row is one intact view, never a mix
    assert 400 < int(from_view.sum()) < 600 and "xv" not in out


def test_heads_train_on_views_and_evaluate_on_their_average(mirrored, tmp_path):
    from fercache.data import load_features
    from fercache.loop import predict_logits, to_device
    from fercache.predict import predict
    from fercache.rundir import load_run
    from fercache.scoring import evaluate_run
    from fercache.train import fit, targets

    manifest, root, out = mirrored
    r = fit(str(out), "linear", out_dir=tmp_path, recipe={"epochs": 3})
    assert r.metrics["config"]["views"] == ["flip"]
    res = evaluate_run(r.run_dir, write=False)
    assert res["tta_views"] == ["flip"] and res["n"] == 48
    # the evaluation is the mean of the plain and the flipped logits
    model, cfg, _ = load_run(r.run_dir)
    fs = load_features(str(out), views=["flip"]).rows("test")
    data = to_device(fs, targets(fs, "expr", cfg.classes), "cpu")
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
    extract(tmp_path / "m.csv", tiny_encoder_spec, tmp_path / "v.zarr", root=tmp_path, views=["flip"], workers=0,
            progress=False)
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


def test_row_uniforms_are_uniform_independent_and_a_function_of_seed_row_and_draw():
    from fercache.preprocess import row_uniforms

    u = row_uniforms(7, torch.arange(20000), 3)
    assert u.shape == (20000, 3) and u.min() >= 0 and u.max() < 1
    hist = np.histogram(u, bins=10, range=(0, 1))[0] / u.size
    assert np.abs(hist - 0.1).max() < 0.005  # 60,000 draws: each decile within 5% of its share
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.03 and abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03
    assert np.array_equal(row_uniforms(7, torch.tensor([19999, 5]), 3), u[[19999, 5]])
    assert not np.allclose(row_uniforms(8, torch.arange(5), 3), u[:5])  # another seed, other draws


def test_erase_boxes_follow_random_erasing_and_are_a_function_of_the_row_alone():
    from fercache.preprocess import ERASE_RATIO, ERASE_SCALE, erase_boxes

    rows = torch.arange(1000, 1400)
    boxes = erase_boxes(rows, 112)
    top, left, h, w = boxes.T.double()
    assert (h > 0).all() and (top + h <= 112).all() and (left + w <= 112).all()  # every box fits the image
    frac = h * w / 112**2
    assert frac.min() > ERASE_SCALE[0] * 0.8 and frac.max() < ERASE_SCALE[1] * 1.2  # rounding of h and w only
    assert (h / w).min() > ERASE_RATIO[0] * 0.7 and (h / w).max() < ERASE_RATIO[1] * 1.4
    assert len({tuple(b) for b in boxes.tolist()}) > 390  # rows draw different boxes
    # the same row draws the same box whatever batch it is in: resuming or sharding cannot change a feature
    assert torch.equal(erase_boxes(torch.tensor([1399, 1000]), 112), boxes[[399, 0]])


def test_erase_zeroes_one_box_and_keeps_the_rest():
    from fercache.preprocess import VIEWS, Preprocess, erase_boxes

    x = torch.randn(8, 3, 64, 64) + 5  # no zeros of its own
    rows = torch.arange(8)
    out = VIEWS["erase"].fn(x, rows, Preprocess(size=64))
    for i, (top, left, h, w) in enumerate(erase_boxes(rows, 64).tolist()):
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert (out[i][:, inside] == 0).all() and torch.equal(out[i][:, ~inside], x[i][:, ~inside])


def test_noise_is_gaussian_in_pixel_units_and_a_function_of_the_row_alone():
    from fercache.preprocess import NOISE_BANK, NOISE_STD, VIEWS, Preprocess

    spec = Preprocess(size=48)
    x = torch.zeros(64, 3, 48, 48)
    rows = torch.arange(64)
    pixel = VIEWS["noise"].fn(x, rows, spec) * torch.tensor(spec.std).view(1, 3, 1, 1)  # back to [0, 1] units
    assert abs(pixel.std().item() - NOISE_STD) < 0.003 and abs(pixel.mean().item()) < 0.003
    alone = VIEWS["noise"].fn(x[:1], torch.tensor([37]), spec)
    torch.testing.assert_close(alone[0], VIEWS["noise"].fn(x, rows, spec)[37])  # its batch does not matter
    far = VIEWS["noise"].fn(x[:2], torch.tensor([5, 5 + NOISE_BANK]), spec)  # same bank image, other shift
    assert not torch.allclose(far[0], far[1])


@pytest.fixture(scope="module")
def augmented(tmp_path_factory, tiny_dataset, tiny_manifest, tiny_encoder_spec):
    out = tmp_path_factory.mktemp("aug") / "aug.zarr"
    extract(tiny_manifest, tiny_encoder_spec, out, root=tiny_dataset, views=["flip", "erase", "noise"], chunk_rows=32,
            batch_size=16, workers=0, progress=False)
    return out


def test_random_views_do_not_depend_on_batching(augmented, tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path):
    other = tmp_path / "other.zarr"
    extract(tiny_manifest, tiny_encoder_spec, other, root=tiny_dataset, views=["flip", "erase", "noise"], chunk_rows=24,
            batch_size=5, workers=0, progress=False)
    a, b = S.open_store(augmented), S.open_store(other)
    for out in ("embedding", "embedding.erase", "embedding.noise"):
        np.testing.assert_allclose(a.features(out), b.features(out), atol=2e-3, err_msg=out)
    plain, erased, noisy = (a.features(o).astype(np.float32) for o in ("embedding", "embedding.erase",
                                                                       "embedding.noise"))
    assert np.abs(erased - plain).mean() > 0.01 and np.abs(noisy - plain).mean() > 0.001  # views, not copies


def test_training_only_views_train_but_are_never_averaged_into_a_prediction(augmented, tiny_dataset, tmp_path,
                                                                            monkeypatch):
    from fercache import loop
    from fercache import train as T
    from fercache.scoring import evaluate_run

    seen, real = [], loop.random_view
    monkeypatch.setattr(loop, "random_view", lambda batch, gen: seen.append(batch["xv"].shape[1]) or real(batch, gen))
    r = T.fit(str(augmented), "linear", out_dir=tmp_path, recipe={"epochs": 2})
    assert r.metrics["config"]["views"] == ["flip", "erase", "noise"] and set(seen) == {3}  # trains on all three
    assert evaluate_run(r.run_dir, write=False)["tta_views"] == ["flip"]  # averages the mirror only
    from fercache import predict as P

    asked, real_views = [], P.with_views
    monkeypatch.setattr(P, "with_views", lambda x, views, *a: asked.append(list(views)) or real_views(x, views, *a))
    probs = P.predict(r.run_dir, [tiny_dataset / "faces" / "test" / "happy"])
    assert len(probs) == 6 and asked and all(v == ["flip"] for v in asked)  # predict too
    from fercache.data import load_features

    fs = load_features(str(augmented), views=["flip", "erase", "noise"]).tta_only()
    assert fs.views == ["flip"] and fs.xv.shape[1] == 1


def test_recipe_key_views_picks_which_cached_views_train(augmented, tmp_path):
    from fercache.errors import ConfigError
    from fercache.sweeps import sweep
    from fercache.train import fit

    r = fit(str(augmented), "linear", out_dir=tmp_path, recipe={"epochs": 1, "views": ["erase", "flip"]})
    assert r.metrics["config"]["views"] == ["flip", "erase"]  # in the store's order
    r = fit(str(augmented), "linear", out_dir=tmp_path / "none", recipe={"epochs": 1, "views": []})
    assert r.metrics["config"]["views"] == []
    with pytest.raises(ConfigError,
                       match=r"holds \['flip', 'erase', 'noise'\], not rotate; extract it with --views "
                             r"flip,erase,noise,rotate"):
        fit(str(augmented), "linear", out_dir=tmp_path / "bad", recipe={"views": ["rotate"]})
    with pytest.raises(ConfigError, match="recipe views='flip': a list of the store's views"):
        fit(str(augmented), "linear", out_dir=tmp_path / "bad", recipe={"views": "flip"})
    with pytest.raises(ConfigError, match=r"recipe views=\['flip', 'flip'\]: a list of the store's views, each once"):
        fit(str(augmented), "linear", out_dir=tmp_path / "bad", recipe={"views": ["flip", "flip"]})
    res = sweep(str(augmented), "linear", {"views": [["flip"], ["flip", "erase", "noise"]]}, tmp_path / "sw",
                base_recipe={"epochs": 1})
    assert sorted(len(row["views"]) for row in res.rows) == [1, 3]


def test_a_view_output_passed_as_the_output_is_named_as_a_view(augmented, tmp_path):
    """--output pooled.flip said "has no output 'pooled.flip.flip'" (its views were looked up under it)."""
    from fercache.errors import ConfigError
    from fercache.train import fit

    st = S.open_store(augmented)
    view = f"{st.default_output}.flip"
    assert view in st.outputs
    with pytest.raises(ConfigError, match=rf"^output '{view}' is the cached 'flip' view of '{st.default_output}': "
                                          rf"pass --output {st.default_output}, whose views \(flip, erase, noise\) "
                                          "training"):
        fit(str(augmented), "linear", out_dir=tmp_path, output=view, recipe={"epochs": 1})
    r = fit(str(augmented), "linear", out_dir=tmp_path, output=view, recipe={"epochs": 1, "views": []})
    assert r.metrics["config"]["output"] == view  # without views, a view output trains like any other
