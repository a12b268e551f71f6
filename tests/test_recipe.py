"""Recipe keys: class-balanced sampling, the selection metric, and misspelt keys refused before training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fercache import train as T
from fercache.errors import ConfigError
from fercache.runs import ledger
from fercache.train import epoch_batches, fit, recipe_keys, sampling_weights

QUICK = {"epochs": 3, "batch_size": 8}


def _class_shares(y: torch.Tensor, balance: str, epochs: int = 40) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([torch.cat(epoch_batches(len(y), 64, gen, sampling_weights(y, balance))) for _ in range(epochs)])
    return np.bincount(y[drawn].numpy(), minlength=3) / len(drawn)


def test_balanced_sampling_draws_each_class_equally_often():
    y = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    np.testing.assert_allclose(_class_shares(y, "class"), [1 / 3] * 3, atol=0.02)
    root = np.sqrt([900, 90, 10])
    np.testing.assert_allclose(_class_shares(y, "sqrt"), root / root.sum(), atol=0.02)
    np.testing.assert_allclose(_class_shares(y, "none"), [0.9, 0.09, 0.01], atol=1e-9)  # a permutation: exact
    assert sampling_weights(y, "none") is None


def test_balance_and_select_reach_training(tiny_store, tmp_path, monkeypatch):
    seen = []
    real = T.epoch_batches
    monkeypatch.setattr(T, "epoch_batches", lambda n, bs, gen, w=None: seen.append(w) or real(n, bs, gen, w))
    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={**QUICK, "balance": "class", "select": "uar"})
    assert len(seen) == 3 and all(w is not None and len(w) == r.metrics["n_train"] for w in seen)
    assert r.metrics["selection"]["metric"] == "uar" and "val_uar" in r.metrics["history"][0]
    best = max(r.metrics["history"], key=lambda h: h["val_uar"])["epoch"]
    assert r.metrics["selection"]["best_epoch"] == best
    saved = json.loads((r.run_dir / "config.json").read_text())["recipe"]
    assert saved["balance"] == "class" and saved["select"] == "uar"
    # The ledger ranks runs selected on UAR in a table of their own, on val UAR.
    fit(str(tiny_store), "linear", out_dir=tmp_path, recipe=QUICK, name="plain/seed{seed}")
    titles = [t["markdown"].splitlines()[0] for t in ledger(tmp_path)["tables"].values()]
    assert sorted(titles) == ["### runs trained on faces (expr), ranked on validation accuracy",
                              "### runs trained on faces (expr), ranked on validation uar"]


@pytest.mark.parametrize("recipe, message", [
    ({"epohcs": 3}, "no recipe key 'epohcs' (did you mean 'epochs'?)"),
    ({"balance": "inverse"}, "balance='inverse': choose from none, sqrt, class"),
    ({"select": "loss"}, "select='loss': an expr head is selected on accuracy, uar, macro_f1"),
])
def test_bad_recipes_are_refused_before_training(tiny_store, tmp_path, recipe, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        fit(str(tiny_store), "linear", out_dir=tmp_path, recipe=recipe)
    assert not list(tmp_path.iterdir())  # nothing written


def test_recipe_keys_include_the_heads_own():
    assert "max_frames" in recipe_keys("temporal") and "prompt_lr" in recipe_keys("temporal")
    assert "max_frames" not in recipe_keys("linear") and "balance" in recipe_keys("linear")


def test_au_heads_refuse_class_balance_and_expression_metrics():
    with pytest.raises(ConfigError, match="expression heads only"):
        T.check_recipe("au", {"balance": "class"}, "au")
    with pytest.raises(ConfigError, match="an au head is selected on macro_f1_at_0.5"):
        T.check_recipe("au", {"select": "uar"}, "au")
    T.check_recipe("au", {"balance": "none", "select": "macro_f1_at_0.5", "epochs": 2}, "au")  # accepted


def test_shots_and_fraction_subsample_training_units_per_class(tiny_store, tmp_path):
    from fercache.data import load_features, subset_train

    fs = load_features(str(tiny_store))  # 4 classes x 6 images per split
    few = subset_train(fs, shots=2, seed=0)
    train = few.split == "train"
    assert sorted(np.unique(few.label[train], return_counts=True)[1].tolist()) == [2, 2, 2, 2]
    assert ((few.split == "val").sum(), (few.split == "test").sum()) == ((fs.split == "val").sum(), (fs.split == "test").sum())
    other = subset_train(fs, shots=2, seed=1)
    assert set(few.sample_id[train]) != set(other.sample_id[other.split == "train"])  # each seed draws its own
    assert list(subset_train(fs, shots=2, seed=0).sample_id) == list(few.sample_id)  # ... reproducibly
    half = subset_train(fs, fraction=0.5, seed=0)
    assert np.unique(half.label[half.split == "train"], return_counts=True)[1].tolist() == [3, 3, 3, 3]
    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={**QUICK, "shots": 1})
    assert r.metrics["n_train"] == 4 and r.metrics["n_val"] == (fs.split == "val").sum()


def test_subsets_of_video_keep_whole_clips(video_store):
    from fercache.data import load_features, subset_train

    fs = load_features(video_store[0])
    few = subset_train(fs, shots=1, seed=0)
    train = few.split == "train"
    clips = np.unique(few.clip_id[train])
    assert len(clips) == len(np.unique(fs.label[fs.split == "train"]))  # one clip per class
    for c in clips:  # every frame of a kept clip is kept
        assert (few.clip_id == c).sum() == (fs.clip_id == c).sum()


@pytest.mark.parametrize("recipe, message", [
    ({"shots": 2, "fraction": 0.5}, "not both"),
    ({"shots": 0}, "shots=0: a whole number >= 1"),
    ({"shots": 2.5}, "shots=2.5"),
    ({"fraction": 1.5}, r"fraction=1.5: a number in \(0, 1\]"),
])
def test_bad_subsets_are_refused(recipe, message):
    with pytest.raises(ConfigError, match=message):
        T.check_recipe("linear", recipe, "expr")


def test_a_numeric_sweep_axis_draws_a_curve(tiny_store, tmp_path):
    from PIL import Image

    from fercache.sweep import sweep

    r = sweep(str(tiny_store), "linear", {"shots": [1, 2, 4]}, tmp_path, base_recipe=QUICK)
    assert [json.loads((tmp_path / f"point{i:03d}" / "seed0" / "metrics.json").read_text())["n_train"] for i in range(3)] == [4, 8, 16]
    png = tmp_path / "sweep-curve.png"
    assert r["curve_png"] == str(png) and Image.open(png).size[0] > 500
    assert "curve_png" not in sweep(str(tiny_store), "linear", {"balance": ["none", "class"]}, tmp_path / "b", base_recipe=QUICK)
