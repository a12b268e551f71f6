"""Recipe keys: class-balanced sampling, the selection metric, and misspelt keys refused before training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fercache import loop as L
from fercache import recipe as R
from fercache.errors import ConfigError
from fercache.loop import epoch_batches, sampling_weights
from fercache.recipe import recipe_keys
from fercache.runs import ledger
from fercache.train import fit

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
    real = L.epoch_batches
    monkeypatch.setattr(L, "epoch_batches", lambda n, bs, gen, w=None: seen.append(w) or real(n, bs, gen, w))
    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={**QUICK, "balance": "class", "select": "uar"})
    assert len(seen) == 3 and all(w is not None and len(w) == r.metrics["n_train"] for w in seen)
    assert r.metrics["selection"]["metric"] == "uar" and "val_uar" in r.metrics["history"][0]
    best = max(r.metrics["history"], key=lambda h: h["val_uar"])["epoch"]
    assert r.metrics["selection"]["best_epoch"] == best
    saved = json.loads((r.run_dir / "config.json").read_text())["recipe"]
    assert saved["balance"] == "class" and saved["select"] == "uar"
    # The ledger ranks runs selected on UAR in a table of their own, on val UAR.
    fit(str(tiny_store), "linear", out_dir=tmp_path, recipe=QUICK, name="plain/seed{seed}")
    titles = [t.markdown.splitlines()[0] for t in ledger(tmp_path).tables.values()]
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
        R.check_recipe("au", {"balance": "class"}, "au")
    with pytest.raises(ConfigError, match="an au head is selected on macro_f1_at_0.5"):
        R.check_recipe("au", {"select": "uar"}, "au")
    R.check_recipe("au", {"balance": "none", "select": "macro_f1_at_0.5", "epochs": 2}, "au")  # accepted


def test_shots_and_fraction_subsample_training_units_per_class(tiny_store, tmp_path):
    from fercache.data import load_features, subset_train

    fs = load_features(str(tiny_store))  # 4 classes x 6 images per split
    few = subset_train(fs, shots=2, seed=0)
    train = few.split == "train"
    assert sorted(np.unique(few.label[train], return_counts=True)[1].tolist()) == [2, 2, 2, 2]
    assert ((few.split == "val").sum(), (few.split == "test").sum()) == ((fs.split == "val").sum(),
                                                                         (fs.split == "test").sum())
    other = subset_train(fs, shots=2, seed=1)
    assert set(few.sample_id[train]) != set(other.sample_id[other.split == "train"])  # each seed draws its own
    assert list(subset_train(fs, shots=2, seed=0).sample_id) == list(few.sample_id)  # ... reproducibly
    half = subset_train(fs, fraction=0.5, seed=0)
    assert np.unique(half.label[half.split == "train"], return_counts=True)[1].tolist() == [3, 3, 3, 3]
    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={**QUICK, "shots": 1})
    assert r.metrics["n_train"] == 4 and r.metrics["n_val"] == (fs.split == "val").sum()


def test_more_shots_than_a_class_holds_is_said(tiny_store, caplog):
    """shots=64 on a class of 13 trained on its 13 without a word (INFO only): a data-efficiency curve's point
    read as 64 per class."""
    from fercache.data import load_features, subset_train

    fs = load_features(str(tiny_store))  # 6 training images per class
    fs = fs.take(~((fs.split == "train") & (fs.label == "anger") & (np.arange(len(fs.label)) % 2 == 0)))
    with caplog.at_level("WARNING", logger="fercache.data"):
        few = subset_train(fs, shots=4, seed=0)
    assert caplog.messages == ["shots=4: 1 of 4 classes have fewer training rows (anger 3): those train on all "
                               "they have, not 4"]
    assert np.unique(few.label[few.split == "train"], return_counts=True)[1].tolist() == [3, 4, 4, 4]
    caplog.clear()
    with caplog.at_level("WARNING", logger="fercache.data"):
        subset_train(fs, shots=3, seed=0)
    assert not caplog.messages


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
    ({"fraction": True}, r"fraction=True: a number in \(0, 1\]"),  # a bool is not 1
])
def test_bad_subsets_are_refused(recipe, message):
    with pytest.raises(ConfigError, match=message):
        R.check_recipe("linear", recipe, "expr")


def test_a_numeric_sweep_axis_draws_a_curve(tiny_store, tmp_path):
    from PIL import Image

    from fercache.sweeps import sweep

    r = sweep(str(tiny_store), "linear", {"shots": [1, 2, 4]}, tmp_path, base_recipe=QUICK)
    assert [json.loads((tmp_path / f"point{i:03d}" / "seed0" / "metrics.json").read_text())["n_train"]
            for i in range(3)] == [4, 8, 16]
    png = tmp_path / "sweep-curve.png"
    assert r.curve_png == str(png) and Image.open(png).size[0] > 500
    assert sweep(str(tiny_store), "linear", {"balance": ["none", "class"]}, tmp_path / "b",
                 base_recipe=QUICK).curve_png is None


@pytest.mark.parametrize("recipe, message", [
    ({"epochs": "abc"}, "recipe epochs='abc': a whole number >= 0"),
    ({"epochs": 2.5}, "recipe epochs=2.5: a whole number >= 0"),
    ({"epochs": 0}, "epochs=0: head 'linear' is trained by epochs"),
    ({"lr": 0}, "recipe lr=0: a number > 0"),
    ({"lr": float("nan")}, "recipe lr=nan: a number > 0"),
    ({"batch_size": 0}, "recipe batch_size=0: a whole number >= 1"),
    ({"optimizer": "sgdd"}, "recipe optimizer='sgdd': adam, adamw or sgd"),
    ({"scheduler": "cos"}, "recipe scheduler='cos': null, exponential, cosine"),  # used to mean: no schedule
    ({"milestones": 30}, "recipe milestones=30: a list of epochs"),
    ({"momentum": 1.0}, r"recipe momentum=1.0: a number in \[0, 1\)"),
    ({"sam_rho": -0.1}, "recipe sam_rho=-0.1: a number >= 0"),
    ({"weight_decay": True}, "recipe weight_decay=True: a number >= 0"),
])
def test_recipe_values_of_the_wrong_kind_or_range_are_refused(recipe, message):
    with pytest.raises(ConfigError, match=message):
        R.check_recipe("linear", {**R.HEADS["linear"].recipe, **recipe}, "expr")


def test_a_heads_own_recipe_keys_take_values_like_their_published_default():
    with pytest.raises(ConfigError, match=r"recipe max_frames=0: a whole number >= 1 \(published: 64\)"):
        R.check_recipe("temporal", {"max_frames": 0}, "expr")
    with pytest.raises(ConfigError, match=r"recipe max_iter=1.5: a whole number >= 1 \(published: 200\)"):
        R.check_recipe("logreg", {"max_iter": 1.5}, "expr")
    with pytest.raises(ConfigError, match="recipe prompt_lr='fast': a number > 0"):
        R.check_recipe("temporal", {"prompt_lr": "fast"}, "expr")
    R.check_recipe("logreg", {"epochs": 0, "max_iter": 50}, "expr")  # a solved head trains no epochs: fine
    R.check_recipe("temporal", {"max_frames": 16, "prompt_lr": 1e-4, "scheduler": None}, "expr")


@pytest.mark.parametrize("head", sorted(R.HEADS))
def test_every_heads_published_recipe_and_defaults_pass_its_own_checks(head):
    from fercache.heads import check_hyperparameters
    from fercache.heads._registry import hyperparameters

    spec = R.HEADS[head]
    R.check_recipe(head, spec.recipe, spec.task)
    check_hyperparameters(head, hyperparameters(head))


@pytest.mark.parametrize("head, hp, message", [
    ("mask", {"use_sigmoid": "yes"}, "use_sigmoid='yes'; give true or false"),  # used to be truthy
    ("mask", {"hidden": "wide"}, "hidden='wide'; give a whole number >= 0"),
    ("mask", {"hidden": -3}, "hidden=-3; give a whole number >= 0"),
    ("mask", {"budgets": [1, "a"]}, r"budgets=\[1, 'a'\]; give a string or a list of \(a number >= 0\) or null"),
    ("linear", {"normalize": 1}, "normalize=1; give true or false"),
    ("logreg", {"l2": 0.1}, r"l2=0.1; give a list of \(a number >= 0\) or null"),
    ("cvar_mlp", {"alpha": 2.0}, r"alpha=2.0: a fraction in \(0, 1\]"),  # used to fail mid-training in topk
    ("cvar_mlp", {"alpha": 0.0}, r"alpha=0.0: a fraction in \(0, 1\]"),
    ("cvar_mlp", {"dropout": 1.0}, r"dropout=1.0: a fraction in \[0, 1\)"),
    ("au", {"auc_weight": 1.0}, r"auc_weight=1.0: a fraction in \[0, 1\)"),
    ("mask", {"n_drop": 4}, "n_drop=4: at most 3 of the 4 channels per class group"),
])
def test_hyperparameters_of_the_wrong_kind_or_range_are_refused(head, hp, message):
    from fercache.heads import HeadContext, build_head

    ctx = HeadContext(in_dim=12, out_dim=3, class_names=["a", "b", "c"], class_counts=[5, 5, 5])
    with pytest.raises(ConfigError, match=message):
        build_head(head, ctx, **hp)


def test_hyperparameters_that_fit_their_annotation_build():
    from fercache.heads import HeadContext, build_head

    ctx = HeadContext(in_dim=12, out_dim=3, class_names=["a", "b", "c"], class_counts=[5, 5, 5])
    assert build_head("mask", ctx, budgets="freq", n_drop=3, use_sigmoid=False).n_drop == 3
    assert build_head("mask", ctx, budgets=[1, 2.5, 1], n_drop=None).n_drop == 1
    assert build_head("logreg", ctx, l2=[1, 0.1]).l2 == [1, 0.1]
    assert build_head("cvar_mlp", ctx, alpha=1, dropout=0.0).alpha == 1


def test_a_sweep_checks_every_point_before_training_the_first(tiny_store, tmp_path):
    from fercache.sweeps import sweep

    with pytest.raises(ConfigError, match="recipe lr='fast': a number > 0"):
        sweep(str(tiny_store), "linear", {"lr": [0.01, 0.1, "fast"]}, tmp_path, base_recipe=QUICK)
    with pytest.raises(ConfigError, match="n_drop=\\[3\\]; give a whole number >= 0 or null"):
        sweep(str(tiny_store), "mask", {"n_drop": [1, [3]]}, tmp_path, base_recipe=QUICK)
    # A misspelt recipe key is not "a hyperparameter the head lacks": the message names both kinds, and the near one
    with pytest.raises(ConfigError, match="sweep axis 'lrr' \\(did you mean 'lr'\\?\\): head 'linear' has no such "
                                          "hyperparameter \\(normalize\\) or recipe key \\(balance, "):
        sweep(str(tiny_store), "linear", {"lrr": [0.01]}, tmp_path, base_recipe=QUICK)
    assert not list(tmp_path.iterdir())  # no point was trained


def test_a_sweep_axis_without_values_or_with_a_value_twice_is_refused():
    """lr=[] crashed (IndexError) after the sweep found no point; lr=1e-3,0.001 trained one point twice and ranked it
    against itself; a second --axis lr replaced the first, unsaid."""
    from typer.testing import CliRunner

    from fercache import cli
    from fercache.sweeps import grid_points

    assert grid_points({"lr": [1e-3, 1e-2], "normalize": [True, False]})[3] == {"lr": 1e-2, "normalize": False}
    for grid, message in [({"lr": []}, r"^sweep axis 'lr' has no values \(\[\]\); give a list of one or more$"),
                          ({"lr": 0.1}, r"^sweep axis 'lr' has no values \(0\.1\)"),
                          ({"lr": [1e-3, 0.001]}, r"^sweep axis 'lr' repeats 0\.001: each value once$"),
                          ({"budgets": [None, [3, 1], None]}, r"^sweep axis 'budgets' repeats null: each value once$")]:
        with pytest.raises(ConfigError, match=message):
            grid_points(grid)
    r = CliRunner().invoke(cli.app, ["sweep", "s.zarr", "--head", "linear", "--axis", "lr=1e-3", "--axis", "lr=1e-2"])
    assert r.exit_code == 2 and "--axis lr is given twice" in " ".join(r.output.split())


def test_a_recipe_is_the_published_one_with_the_overrides_checked_once():
    r = R.Recipe.of("mask", {"epochs": 15, "select": "uar"})
    assert r.epochs == 15 and r.batch_size == 32 and r.select == "uar" and r.balance == "none" and r.views is None
    assert r.to_dict() == {**R.HEADS["mask"].recipe, "epochs": 15, "select": "uar"} and r["gamma"] == 0.9
    assert R.Recipe.of("mask", r) is r  # already checked: not again
    assert R.Recipe.of("au").select == "macro_f1_at_0.5" and R.Recipe.of("temporal")["max_frames"] == 64
    with pytest.raises(ConfigError, match="has no recipe key 'epoch' \\(did you mean 'epochs'\\?\\)"):
        R.Recipe.of("mask", {"epoch": 15})
