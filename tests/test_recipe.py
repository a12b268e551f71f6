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
