"""Stacked training: G configurations trained as one model equal each configuration trained alone.

The trainer-level tests run in float64. In float32 a head with BatchNorm after a Linear layer (cvar_mlp, au) does
not reproduce itself even alone: that Linear's bias has a true gradient of zero, its computed gradient is rounding
noise, and Adam turns noise into steps of about a tenth of the lr. The same sequential run on 1 and on 2 torch
threads picks another epoch. In float64 the noise is 1e-17 and the steps it causes vanish, so any difference left
would be the stacked trainer's own."""

from __future__ import annotations

import copy
import json
import logging
import subprocess

import numpy as np
import pytest
import torch

from fercache import metrics, stacked
from fercache.heads import HeadContext, Streams, build_head
from fercache.loop import train_loop
from fercache.recipe import Recipe
from fercache.sweeps import sweep
from fercache.train import Point, fit_many, fit_seeds

from .test_distributed import TORCHRUN, _env
from .test_views import augmented  # noqa: F401  (a store with flip, erase and noise views)

CLASSES = ["anger", "happy", "sad", "surprise"]
AUS = ["AU1", "AU2", "AU4", "AU6", "AU12"]


def _data(task: str, seed: int = 0, dim: int = 24) -> tuple[dict, dict]:
    """Separable-ish float64 features: train 120 rows, val 60 (labels: classes, or AUs with some unannotated)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(len(CLASSES), dim, generator=g, dtype=torch.float64) * 1.5

    def split(n):
        y = torch.randint(0, len(CLASSES), (n,), generator=g)
        x = means[y] + torch.randn(n, dim, generator=g, dtype=torch.float64)
        if task == "au":
            y = (x[:, :len(AUS)] > 0.5).long()
            y[torch.rand(n, len(AUS), generator=g) < 0.1] = -1
        return {"x": x, "y": y}

    return split(120), split(60)


def _built(head: str, hp: dict, seed: int, train: dict, task: str):
    """The head as `fit` builds it for `seed`, in float64, and the global random state its build left."""
    ctx = HeadContext(in_dim=train["x"].shape[1], out_dim=len(AUS if task == "au" else CLASSES),
                      class_names=AUS if task == "au" else CLASSES, class_counts=[30] * len(CLASSES))
    torch.manual_seed(seed)
    model = build_head(head, ctx, **hp).double()
    rng = torch.get_rng_state()
    model.fit_stats(train)
    return model, rng


def _alone_and_stacked(head: str, points: list[tuple[int, dict, dict]], task: str = "expr"):
    """Each (seed, hp, recipe) trained alone by `train_loop` and all of them by `train_stack`."""
    train, val = _data(task)
    alone, configs = [], []
    for seed, hp, recipe in points:
        model, rng = _built(head, hp, seed, train, task)
        r = Recipe.of(head, recipe)
        twin = copy.deepcopy(model)
        torch.set_rng_state(rng)
        alone.append(train_loop(model, train, val, r, task, CLASSES, seed))
        gen = torch.Generator()
        gen.set_state(rng)
        configs.append(stacked.Config(twin, r, seed, Streams(gen)))
    return alone, stacked.train_stack(configs, train, val, task)


def _assert_same(alone, together):
    for (state, hist, best), (s_state, s_hist, s_best) in zip(alone, together, strict=True):
        assert s_best == best
        key = [k for k in hist[0] if k.startswith("val_")][0]
        assert [h[key] for h in s_hist] == [h[key] for h in hist]
        np.testing.assert_allclose([h["loss"] for h in s_hist], [h["loss"] for h in hist], rtol=1e-9)
        assert s_state.keys() == state.keys()
        for k in state:
            torch.testing.assert_close(s_state[k], state[k], rtol=1e-8, atol=1e-10, msg=k)


POINTS = {
    # one seed: the batch is drawn once and broadcast; lr, weight decay, schedule and balance differ per point
    "linear": [(0, {}, {"epochs": 5, "lr": 1e-3}), (0, {}, {"epochs": 5, "lr": 1e-2, "weight_decay": 0.0}),
               (0, {}, {"epochs": 5, "lr": 3e-3, "scheduler": "exponential"}),
               (0, {}, {"epochs": 5, "balance": "class"})],
    # n_drop, w_sep and w_div differ within the stack; seeds 0 and 1 draw their own batches
    "mask": [(0, {"n_drop": 1}, {"epochs": 4, "batch_size": 16}), (1, {"n_drop": 2, "w_sep": 1.0},
                                                                   {"epochs": 4, "batch_size": 16, "lr": 1e-3}),
             (2, {"n_drop": 1, "w_div": 2.0}, {"epochs": 4, "batch_size": 16})],
    # SAM (BatchNorm frozen on its second pass), dropout drawn per configuration, the quarter cosine schedule
    "cvar_mlp": [(0, {"dropout": 0.6}, {"epochs": 4}), (0, {"dropout": 0.3}, {"epochs": 4, "sam_rho": 0.1}),
                 (0, {"dropout": 0.6}, {"epochs": 4, "lr": 3e-3})],
    "au": [(3, {"auc_weight": 0.2}, {"epochs": 4}), (4, {"auc_weight": 0.2, "dropout": 0.2}, {"epochs": 4}),
           (5, {"auc_weight": 0.2}, {"epochs": 4, "lr": 2e-3})],
}


@pytest.mark.parametrize("head", list(POINTS))
def test_a_stack_trains_each_configuration_as_it_trains_alone(head):
    task = "au" if head == "au" else "expr"
    alone, together = _alone_and_stacked(head, POINTS[head], task)
    _assert_same(alone, together)


def test_mask_with_sam_and_class_masks_stacks_too():
    pts = [(0, {"mask": "class", "n_drop": 1}, {"epochs": 3, "batch_size": 16, "sam_rho": 0.05}),
           (1, {"mask": "class", "n_drop": 2}, {"epochs": 3, "batch_size": 16, "sam_rho": 0.2})]
    _assert_same(*_alone_and_stacked("mask", pts))


@pytest.mark.parametrize("kind,extra", [("adam", {"weight_decay": 1e-2}), ("adamw", {}), ("sgd", {"momentum": 0.9}),
                                        ("sgd", {"weight_decay": 1e-3})])
@pytest.mark.parametrize("n", [3, 6], ids=["few-lrs", "many-lrs"])  # one fused call per lr; whole-stack columns
def test_the_stacked_optimiser_steps_as_torchs_own(kind, extra, n):
    """Bit for bit: each configuration's slice of the stack equals torch's optimiser on that configuration alone."""
    g = torch.Generator().manual_seed(0)
    init = torch.randn(n, 5, 4, generator=g)
    lrs = [1e-3, 1e-2, 1e-3] if n == 3 else [1e-3 * (k + 1) for k in range(n)]
    wds = [extra.get("weight_decay", 1e-4)] * (n - 1) + [0.0]
    moms = [extra.get("momentum", 0.0) if k % 2 else 0.5 for k in range(n)] if kind == "sgd" else [0.0] * n
    p = init.clone().requires_grad_()
    opt = stacked.StackedOptimizer([p], kind, wds, moms)
    alone = [init[k].clone().requires_grad_() for k in range(n)]
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[kind]
    ref = [cls([a], lr=lrs[k], weight_decay=wds[k], **({"momentum": moms[k]} if kind == "sgd" else {}))
           for k, a in enumerate(alone)]
    for _ in range(6):
        grad = torch.randn(n, 5, 4, generator=g)
        p.grad = grad.clone()
        opt.step(lrs)
        for k, (a, o) in enumerate(zip(alone, ref)):
            a.grad = grad[k].clone()
            o.step()
    for k in range(n):
        assert torch.equal(p[k], alone[k]), k


def test_selection_scores_from_counts_equal_the_label_metrics():
    rng = np.random.default_rng(1)
    for _ in range(300):
        c, n = rng.integers(2, 8), rng.integers(1, 200)
        y, p = rng.integers(0, c - 1 if rng.random() < 0.3 else c, n), rng.integers(0, c, n)
        conf = np.zeros((c, c), int)
        np.add.at(conf, (y, p), 1)
        want = metrics.classification(y, p, [str(i) for i in range(c)])
        assert metrics.from_confusion(conf) == {k: want[k] for k in ("accuracy", "uar", "macro_f1")}
        y, p = rng.integers(-1, 2, (n, 4)), rng.integers(0, 2, (n, 4))
        counts = [((p == 1) & (y == 1)).sum(0), ((p == 1) & (y == 0)).sum(0), ((p == 0) & (y == 1)).sum(0)]
        got = metrics.au_from_counts(*counts, (y >= 0).sum(0))
        want = metrics.au(y, p * 0.6 + 0.2, list("abcd"))["macro_f1_at_0.5"]
        assert got == want or (np.isnan(got) and np.isnan(want))


def test_plan_broadcasts_shared_batch_orders_and_pools_the_rest():
    keys = ["a", "a", "a", "a", None, "b", "a"]
    streams = [(0, "none"), (0, "none"), (1, "none"), (2, "none"), (0, "none"), (0, "none"), (0, "none")]
    assert stacked.plan(keys, streams, None) == [[0, 1, 6], [2, 3], [4], [5]]
    assert stacked.plan(keys, streams, 2) == [[0, 1], [6], [2, 3], [4], [5]]
    assert stacked.plan(keys, streams, 1) == [[i] for i in [0, 1, 6, 2, 3, 4, 5]]


def _runs_equal(a, b, atol=1e-5):
    for x, y in zip(a, b, strict=True):
        sx = torch.load(x.run_dir / "head.pt", weights_only=True)
        sy = torch.load(y.run_dir / "head.pt", weights_only=True)
        assert sx["config"] == sy["config"]
        for k in sx["state_dict"]:
            torch.testing.assert_close(sy["state_dict"][k], sx["state_dict"][k], atol=atol, rtol=1e-4)
        assert x.metrics["selection"] == y.metrics["selection"]
        assert x.metrics["val"]["accuracy"] == y.metrics["val"]["accuracy"]
        assert sorted(p.name for p in x.run_dir.iterdir()) == sorted(p.name for p in y.run_dir.iterdir())


@pytest.mark.parametrize("head", ["linear", "mask"])
def test_runs_trained_in_a_stack_are_the_runs_trained_alone(tiny_store, tmp_path, head):
    """Through fit_many on a real store (float32): same files, selection, validation scores, weights to 1e-5."""
    pts = [Point(0, {}, {"epochs": 3, "lr": lr}, f"p{i}/seed{{seed}}") for i, lr in enumerate([1e-3, 1e-2])]
    pts += [Point(s, {}, {"epochs": 3}, "seeds/seed{seed}") for s in (1, 2)]
    alone = fit_many(str(tiny_store), head, pts, out_dir=tmp_path / "alone", max_batch_configs=1)
    together = fit_many(str(tiny_store), head, pts, out_dir=tmp_path / "stacked")
    _runs_equal(alone, together)


def test_stacks_train_on_cached_views_and_select_on_their_average_as_runs_alone_do(augmented, tmp_path):  # noqa: F811
    """Each batch order draws its own views (erase, noise, flip) as the loop does; validation averages the flip."""
    store = augmented
    pts = [Point(s, {}, {"epochs": 3, "lr": lr}, f"p{i}/seed{{seed}}") for i, (s, lr) in
           enumerate([(0, 1e-3), (0, 1e-2), (1, 1e-3), (2, 1e-3)])]
    alone = fit_many(str(store), "mask", pts, out_dir=tmp_path / "alone", max_batch_configs=1)
    together = fit_many(str(store), "mask", pts, out_dir=tmp_path / "stacked")
    assert together[0].metrics["config"]["views"] == ["flip", "erase", "noise"]
    _runs_equal(alone, together)


def test_a_head_that_does_not_stack_trains_alone_and_says_so_once(video_store, tmp_path, caplog):
    store, _ = video_store
    with caplog.at_level(logging.INFO, logger="fercache.train"):
        runs = fit_seeds(str(store), "temporal", seeds=[0, 1], out_dir=tmp_path, recipe={"epochs": 1},
                         hp={"classifier": "linear"})
    assert len(runs) == 2 and all((r.run_dir / "head.pt").is_file() for r in runs)
    assert sum("trains one run at a time" in m for m in caplog.messages) == 1


def test_a_sweep_cut_short_in_its_second_stack_resumes_there(tiny_store, tmp_path, monkeypatch):
    grid = {"lr": [1e-3, 3e-3, 1e-2, 3e-2]}
    real, calls = stacked.train_stack, []

    def dies_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(stacked, "train_stack", dies_second)
    with pytest.raises(KeyboardInterrupt):
        sweep(str(tiny_store), "linear", grid, tmp_path / "sw", base_recipe={"epochs": 2}, max_batch_configs=2)
    saved = sorted(p.parent.parent.name for p in (tmp_path / "sw").glob("point*/seed0/head.pt"))
    assert saved == ["point000", "point001"]
    monkeypatch.setattr(stacked, "train_stack", real)
    r = sweep(str(tiny_store), "linear", grid, tmp_path / "sw", base_recipe={"epochs": 2}, max_batch_configs=2)
    once = sweep(str(tiny_store), "linear", grid, tmp_path / "once", base_recipe={"epochs": 2}, max_batch_configs=2)
    assert r.reused == 2 and r.runs == 4
    assert [(row["lr"], row["mean"]) for row in r.rows] == [(row["lr"], row["mean"]) for row in once.rows]


def test_a_two_process_torchrun_sweep_equals_a_one_process_sweep(tiny_store, tmp_path):
    """Each rank trains whole stacks (one thread each, as the one-process reference): the same runs, bit for bit."""
    args = ["--head", "linear", "--axis", "lr=0.001,0.003,0.01", "--seeds", "0,1", "--recipe", "epochs=2",
            "--max-batch-configs", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = sweep(str(tiny_store), "linear", {"lr": [0.001, 0.003, 0.01]}, tmp_path / "one", seeds=(0, 1),
                    base_recipe={"epochs": 2}, max_batch_configs=2)
    finally:
        torch.set_num_threads(threads)
    proc = subprocess.run(TORCHRUN + ["--nproc-per-node=2", "-m", "fercache", "-q", "sweep", str(tiny_store), *args,
                                      "--out", str(tmp_path / "two")], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| rank | lr |") == 1  # rank 0 reports
    two = json.loads((tmp_path / "two" / "sweep.json").read_text())
    assert [(r["lr"], r["mean"], r["std"]) for r in two] == [(r["lr"], r["mean"], r["std"]) for r in one.rows]
    for p in sorted((tmp_path / "one").glob("point*/seed*/head.pt")):
        theirs = tmp_path / "two" / p.relative_to(tmp_path / "one")
        a, b = (torch.load(f, weights_only=True)["state_dict"] for f in (p, theirs))
        assert all(torch.equal(a[k], b[k]) for k in a), p


def test_bench_sweep_ends_with_the_speedup(tiny_store, tmp_path):
    from typer.testing import CliRunner

    from fercache import cli

    r = CliRunner().invoke(cli.app, ["bench", "sweep", str(tiny_store), "--head", "linear", "--axis",
                                     "lr=0.001,0.01", "--axis", "weight_decay=0,0.0001", "--recipe", "epochs=2"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("speedup ") and lines[-1].endswith("x") and float(lines[-1][8:-1]) > 0
    assert any(line.startswith("same ranking") and "yes" in line for line in lines)
    assert "torch threads" in r.output
