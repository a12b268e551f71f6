"""Calibration: ECE by hand, its bootstrap form, temperature fitting, and the run carrying its temperature."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from fercache import metrics
from fercache.errors import ConfigError
from fercache.protocols import cross_matrix
from fercache.rundir import load_run
from fercache.scoring import evaluate_run
from fercache.train import fit


def _draw(n, k=5, t_true=1.0, scale=3.0, seed=0):
    """Logits, and labels drawn from softmax(logits / t_true): calibrated at exactly T = t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * scale
    p = np.exp(metrics.log_softmax(z / t_true))
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z, y


def test_ece_by_hand():
    # Two predictions at 0.9 (one right), two at 0.6 (both right): |0.5 - 0.9| / 2 + |1.0 - 0.6| / 2 = 0.4.
    prob = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    assert metrics.ece(prob, y) == pytest.approx(0.4)
    rel = metrics.reliability(prob, y)
    assert sum(rel["n"]) == 4 and rel["n"][13] == 2 and rel["n"][9] == 2  # 0.9 -> bin [0.867, 0.933)
    assert rel["accuracy"][13] == 0.5 and rel["confidence"][9] == pytest.approx(0.6)
    assert metrics.ece(np.array([[1.0, 0.0]]), np.array([0])) == 0.0  # confidence 1 joins the top bin


def test_weighted_ece_equals_ece_of_each_resample():
    z, y = _draw(400, seed=1)
    prob = np.exp(metrics.log_softmax(z))
    groups = np.arange(len(y)) // 3
    w = next(metrics.bootstrap_weights(groups, n_boot=4, seed=2))
    for row, ece_w in zip(w, metrics.weighted_ece(w, prob, y)):
        rows = np.repeat(np.arange(len(y)), row.astype(int))
        assert ece_w == pytest.approx(metrics.ece(prob[rows], y[rows]), abs=1e-12)


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_fit_temperature_finds_the_generating_temperature(t_true):
    z, y = _draw(20000, t_true=t_true, seed=3)
    t = metrics.fit_temperature(z, y)
    assert t == pytest.approx(t_true, rel=0.08)
    # ... and it is the minimum of the NLL over a dense grid
    grid = np.linspace(0.3, 4, 200)
    best = grid[np.argmin([metrics._nll(z / g, y) for g in grid])]
    assert abs(t - best) <= grid[1] - grid[0]


def test_temperature_from_validation_repairs_an_overconfident_test_split():
    zv, yv = _draw(5000, t_true=3.0, seed=4)  # the head's logits are 3x too sharp
    zt, yt = _draw(5000, t_true=3.0, seed=5)
    cal = metrics.calibration(zt, yt, metrics.fit_temperature(zv, yv))
    assert cal["ece"] > 0.15 and cal["ece_ts"] < 0.03 and cal["nll_ts"] < cal["nll"]
    assert cal["brier_ts"] < cal["brier"] and cal["temperature"] == pytest.approx(3.0, rel=0.1)
    assert metrics.calibration(zt[:0], yt[:0], 1.0) == {}


def test_a_temperature_at_its_upper_bound_tells_a_clueless_head_from_a_far_over_confident_one():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 7, 400)
    clueless = rng.normal(size=(400, 7))  # logits that know nothing of y: the best T is infinite
    t = metrics.fit_temperature(clueless, y)
    assert t == pytest.approx(metrics.T_RANGE[1], rel=0.01)
    assert "confidence tells nothing on validation" in metrics.temperature_at_bound(clueless, y, t)
    # Right 80% of the time with logits 100x too sharp (a learning rate too high for the head): also at the bound,
    # but softmax(z / 20) is still far from uniform: over-confident, not clueless (the old warning said clueless)
    sharp = rng.normal(size=(400, 7)) * 100
    sharp[np.arange(400), y] += np.where(rng.random(400) < 0.8, 300, 0)
    t = metrics.fit_temperature(sharp, y)
    note = metrics.temperature_at_bound(sharp, y, t)
    assert t == pytest.approx(metrics.T_RANGE[1], rel=0.01) and "over-confident on validation" in note, note
    assert f"accuracy {(sharp.argmax(1) == y).mean():.1%}" in note and "tells nothing" not in note
    z, y = _draw(2000, t_true=3.0, seed=6)
    assert metrics.temperature_at_bound(z, y, metrics.fit_temperature(z, y)) is None  # inside the range: nothing to say


def test_runs_carry_a_validation_temperature_that_evaluate_and_predict_use(tiny_store, tiny_dataset, tmp_path, caplog):
    from fercache.predict import predict

    with caplog.at_level(logging.WARNING, logger="fercache.train"):
        r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 30, "batch_size": 8})
    val = json.loads((r.run_dir / "metrics.json").read_text())["val"]
    # The tiny validation split is separated perfectly: the NLL-optimal T is 0, so it stops at its bound, said
    assert val["accuracy"] == 1.0 and val["temperature"] == pytest.approx(metrics.T_RANGE[0], rel=0.01)
    assert "temperature hit its bound (T = 0.05): the head separates every validation sample" in caplog.text
    model, cfg, fitted = load_run(r.run_dir)
    assert fitted.temperature == pytest.approx(val["temperature"]) and fitted.thresholds is None
    assert val["nll_ts"] <= val["nll"] + 1e-9  # T minimises the validation NLL; T = 1 is one of its candidates
    res = evaluate_run(r.run_dir)
    assert res["temperature"] == pytest.approx(val["temperature"])
    assert 0 <= res["ece"] <= 1 and 0 <= res["ece_ts"] <= 1
    assert res["ci95"]["ece"][0] <= res["ece"] <= res["ci95"]["ece"][1]
    assert (r.run_dir / "eval-faces-test" / "reliability.png").stat().st_size > 5000
    # predict: calibrated probabilities are the raw ones at temperature T; the decision does not move
    folder = tiny_dataset / "faces" / "test" / "happy"
    raw, cal = predict(r.run_dir, [folder], calibrated=False), predict(r.run_dir, [folder])
    assert [a["prediction"] for a in raw] == [b["prediction"] for b in cal]
    p_raw = torch.tensor([list(a["probabilities"].values()) for a in raw], dtype=torch.float64)
    p_cal = np.array([list(b["probabilities"].values()) for b in cal])
    np.testing.assert_allclose(torch.softmax(p_raw.log() / fitted.temperature, 1).numpy(), p_cal, atol=1e-5)


def test_cross_matrix_reports_calibration_per_metric(tiny_store, tmp_path):
    tables = cross_matrix([str(tiny_store)], ["linear"], tmp_path / "cross",
                          recipe={"linear": {"epochs": 4, "batch_size": 16}},
                          metric=["accuracy", "ece_ts"])
    assert set(tables.tables) == {"linear", "linear-ece_ts"}
    assert "ece_ts (%, lower is better)" in tables.tables["linear-ece_ts"].markdown
    run = tmp_path / "cross" / "runs" / "faces-linear" / "seed0"
    res = json.loads((run / "eval-faces-test" / "metrics.json").read_text())
    assert tables.tables["linear-ece_ts"].cells["faces -> faces"]["mean"] == pytest.approx(100 * res["ece_ts"])
    assert (tmp_path / "cross" / "cross-linear-ece_ts.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="choose from accuracy"):
        cross_matrix([str(tiny_store)], ["linear"], tmp_path / "c2", metric="nll")


def test_runs_saved_before_temperatures_still_evaluate(tiny_store, tmp_path):
    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 2, "batch_size": 8})
    saved = torch.load(r.run_dir / "head.pt", weights_only=True)
    del saved["temperature"]  # the head.pt of an older fercache
    torch.save(saved, r.run_dir / "head.pt")
    assert load_run(r.run_dir)[2].temperature is None
    res = evaluate_run(r.run_dir)
    assert "ece" in res and "ece_ts" not in res and "temperature" not in res
