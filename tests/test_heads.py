"""Heads: every registered head on separable toy data, and the published specifications checked term by term."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fercache.errors import ConfigError
from fercache.heads import HEADS, HeadContext, build_head
from fercache.heads.au import auc_margin, masked_bce
from fercache.heads.cvar_mlp import cvar
from fercache.heads.mask import drop_pattern, group_max, group_size, group_widths, resolve_budgets
from fercache.loop import FrozenBN, sam_step, train_loop

CLASSES = ["neutral", "happy", "sad"]


def toy(n=96, d=24, c=3, seed=0, au=False):
    y = torch.arange(n) % c
    centers = torch.randn(c, d, generator=torch.Generator().manual_seed(0)) * 3  # same classes for every seed
    x = centers[y] + torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1))
    if au:  # AU a active iff class a; one unknown label per row to exercise the -1 mask
        yy = F.one_hot(y, c)
        yy[torch.arange(n), (y + 1) % c] = -1
        return {"x": x, "y": yy}
    return {"x": x, "y": y}


def as_clips(batch, frames=5, seed=0):
    """Clip-level toy data: each row becomes a clip of noisy copies, with varying valid lengths and zero padding."""
    g = torch.Generator().manual_seed(seed)
    n, d = batch["x"].shape
    x = batch["x"][:, None] + 0.3 * torch.randn(n, frames, d, generator=g)
    lengths = torch.randint(1, frames + 1, (n,), generator=g)
    x[torch.arange(frames)[None] >= lengths[:, None]] = 0.0
    return {**batch, "x": x, "lengths": lengths}


def shaped(head, batch, seed=0):
    return as_clips(batch, seed=seed) if head.spec.level == "clip" else batch


def make(name, d=24, c=3, **hp):
    if name == "zeroshot":
        return build_head(name, HeadContext(d, c, CLASSES[:c], restore=True), **hp)
    return build_head(name, HeadContext(d, c, CLASSES[:c]), **hp)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_shapes_and_finite_loss(name):
    head = make(name)
    batch = shaped(head, toy(au=HEADS[name].task == "au"))
    out = head.logits(batch)
    assert out.shape == (96, 3) and torch.isfinite(out).all()
    if head.spec.trainable:
        loss = head.loss(batch)
        assert loss.ndim == 0 and torch.isfinite(loss)


# logreg: solve(), below
@pytest.mark.parametrize("name", [n for n in sorted(HEADS) if n not in ("zeroshot", "logreg")])
def test_every_trainable_head_learns_separable_data(name):
    torch.manual_seed(0)
    # Dropout 0.6 needs some width: the MLP heads get 64 hidden units on 24-d toy data.
    head = make(name, hidden=64) if name in ("au", "cvar_mlp") else make(name)
    is_au = name == "au"
    train, val = shaped(head, toy(au=is_au)), shaped(head, toy(seed=1, au=is_au), seed=1)
    if hasattr(head, "fit_stats"):
        head.fit_stats(train)
    before = head.loss(train).item()
    recipe = {**head.spec.recipe, "epochs": 20, "batch_size": 16, "lr": 3e-3}
    state, history, best = train_loop(head, train, val, recipe, "au" if is_au else "expr", CLASSES, seed=0)
    head.load_state_dict(state)
    head.eval()
    assert history[-1]["loss"] < before
    key = "val_macro_f1_at_0.5" if is_au else "val_accuracy"
    assert max(h[key] for h in history) > 0.9, history[-1]


def test_cvar_is_mean_of_top_ceil_alpha_n():
    losses = torch.tensor([0.1, 5.0, 2.0, 0.3, 4.0, 1.0, 3.0])
    for alpha in (0.5, 0.3, 1.0, 0.01):
        k = math.ceil(alpha * 7)
        assert cvar(losses, alpha).item() == pytest.approx(sorted(losses.tolist(), reverse=True)[:k] and
                                                           sum(sorted(losses.tolist(), reverse=True)[:k]) / k)
    # ... and equals the Rockafellar-Uryasev form min_t t + mean(relu(l - t)) / alpha when alpha*n is whole
    l4 = torch.tensor([1.0, 2.0, 3.0, 10.0])
    ts = torch.linspace(0, 10, 10001)
    ru = min((t + F.relu(l4 - t).mean() / 0.5).item() for t in ts)
    assert cvar(l4, 0.5).item() == pytest.approx(ru, abs=1e-3)


def test_mask_groups_follow_the_paper_for_512_and_7():
    assert group_size(512, 7) == 73
    h = torch.zeros(2, 512)
    h[0, 73 * 3 + 5] = 9.0  # inside group 3
    h[1, 511] = 9.0  # the leftover channel belongs to no group
    g = group_max(h, 7)
    assert g.shape == (2, 7) and g[0, 3] == 9.0 and g[0].sum() == 9.0 and g[1].sum() == 0.0


def test_drop_pattern_counts():
    for _ in range(5):
        p = drop_pattern(512, 7, 10)
        groups = [p[c * 73:(c + 1) * 73] for c in range(6)] + [p[6 * 73:]]
        assert [int((g == 0).sum()) for g in groups] == [10] * 7
        assert len(groups[-1]) == 74
    p = drop_pattern(1280, 7, 25)  # generalised: k = 182, last group 188
    assert int((p == 0).sum()) == 7 * 25 and int((p[6 * 182:] == 0).sum()) == 25


def test_mask_loss_is_ce_plus_weighted_sep_and_div():
    torch.manual_seed(0)
    head = make("mask", d=512, c=7)
    batch = {"x": torch.randn(8, 512), "y": torch.arange(8) % 7}
    torch.manual_seed(1)
    terms = head.loss_terms(batch)
    torch.manual_seed(1)
    total = head.loss(batch)
    assert total.item() == pytest.approx((terms["ce"] + 1.5 * terms["sep"] + 5 * terms["div"]).item(), rel=1e-5)
    h = head.masked(batch["x"], None)
    assert terms["div"].item() == pytest.approx(1 - group_max(h, 7).mean().item() / 73, rel=1e-5)
    # the mask is a sigmoid: h is between 0 and f, with f's sign
    assert ((h.abs() <= batch["x"].abs() + 1e-6) & (h * batch["x"] >= 0)).all()
    assert head.n_drop == 10 and head.w_sep == 1.5 and head.w_div == 5.0
    # only o is used at test time
    torch.testing.assert_close(head(batch["x"]), head.fc(h))


def test_mask_unequal_budgets_share_the_same_grouped_channels():
    widths = group_widths(512, 7, [2, 1, 1, 1, 1, 1, 1])
    assert widths == [127] + [63] * 6  # 511 * 2/8 and 511 * 1/8, floored; 7 leftovers join no group
    h = torch.randn(3, 512)
    starts = [0, 127, 190, 253, 316, 379, 442]
    manual = torch.stack([h[:, s:s + w].amax(-1) for s, w in zip(starts, widths)], -1)
    torch.testing.assert_close(group_max(h, widths), manual)
    p = drop_pattern(512, widths, 10)
    # drop counts scale with the width (10 per 73): 17 in the wide group, 9 in the others
    assert int((p[:127] == 0).sum()) == 17 and all(int((p[s:s + 63] == 0).sum()) == 9 for s in starts[1:6])
    assert int((p[442:] == 0).sum()) == 9 and len(p) == 512
    head = make("mask", d=512, c=7, budgets=[2, 1, 1, 1, 1, 1, 1])
    batch = {"x": torch.randn(8, 512), "y": torch.arange(8) % 7}
    h = head.masked(batch["x"], None)
    expected = 1 - (group_max(h, widths) / torch.tensor(widths, dtype=torch.float32)).mean()
    assert head.loss_terms(batch)["div"].item() == pytest.approx(expected.item(), rel=1e-5)
    for bad in ([1, 1], [1, 1, 0], [1, -1, 1], ["a", 1, 1]):
        with pytest.raises(ConfigError, match="budgets"):
            make("mask", budgets=bad)


def test_budgets_from_training_class_counts():
    counts = [100, 400, 25]
    assert resolve_budgets("freq", counts) == [100, 400, 25]
    assert resolve_budgets("sqrt_freq", counts) == [10.0, 20.0, 5.0]
    assert resolve_budgets("inv_freq", counts) == [0.01, 0.0025, 0.04]
    assert resolve_budgets("equal", counts) is None and resolve_budgets([1, 2, 3], None) == [1, 2, 3]
    head = build_head("mask", HeadContext(300, 3, CLASSES, class_counts=counts), budgets="sqrt_freq")
    assert head.widths == [85, 171, 42] and head.resolved_hp == {"budgets": [10.0, 20.0, 5.0]}
    with pytest.raises(ConfigError, match="class counts"):
        make("mask", budgets="freq")  # no counts: e.g. an AU task
    with pytest.raises(ConfigError, match="list of C weights"):
        make("mask", budgets="rare")
    with pytest.raises(ConfigError, match="budgets=3; give a string or a list"):  # the annotation's check, first
        make("mask", budgets=3)


def test_per_class_masks_give_each_class_its_own_feature():
    torch.manual_seed(0)
    head = make("mask", d=21, c=3, mask="class")
    with torch.no_grad():
        head.class_mask.normal_()
    x, y = torch.randn(5, 21), torch.tensor([0, 1, 2, 0, 1])
    m = torch.sigmoid(head.class_mask)
    manual = torch.stack([(m[c] * x) @ head.fc.weight[c] + head.fc.bias[c] for c in range(3)], -1)
    torch.testing.assert_close(head(x), manual)
    # class c's separation score is the max of ITS group of ITS masked feature
    h = head.masked(x, None)
    assert h.shape == (5, 3, 21)
    torch.testing.assert_close(head.group_scores(h)[:, 2], (m[2] * x)[:, 14:21].amax(-1))
    head.loss({"x": x, "y": y}).backward()
    assert head.class_mask.grad.abs().sum() > 0 and not hasattr(head, "mask_net")
    with pytest.raises(ConfigError, match="mask-source"):
        build_head("mask", HeadContext(16, 3, CLASSES, z_dim=5), mask="class")
    with pytest.raises(ConfigError, match="sample, class, none"):
        make("mask", mask="pixel")


def test_no_mask_ablation_is_the_plain_feature():
    head = make("mask", mask="none")
    x = torch.randn(4, 24)
    assert head.masked(x, None) is x and not hasattr(head, "mask_net") and not hasattr(head, "class_mask")
    torch.testing.assert_close(head(x), head.fc(x))


@pytest.mark.parametrize("hp", [{"mask": "class"}, {"mask": "none"}, {"budgets": [3, 1, 1]}, {"use_sigmoid": False}])
def test_mask_variants_learn_separable_data(hp):
    torch.manual_seed(0)
    head = make("mask", **hp)
    train, val = toy(), toy(seed=1)
    recipe = {**head.spec.recipe, "epochs": 20, "batch_size": 16, "lr": 3e-3}
    _, history, _ = train_loop(head, train, val, recipe, "expr", CLASSES, seed=0)
    assert max(h["val_accuracy"] for h in history) > 0.9, history[-1]


def test_mask_reads_a_second_source():
    head = build_head("mask", HeadContext(16, 3, CLASSES, z_dim=5))
    x, z = torch.randn(4, 16), torch.randn(4, 5)
    assert head(x, z).shape == (4, 3)
    with pytest.raises(RuntimeError):
        head(x, torch.randn(4, 16 + 1))


def test_sam_freezes_batchnorm_statistics_on_second_pass():
    torch.manual_seed(0)
    head = make("cvar_mlp")
    batch = toy()
    bn = next(m for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d))
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    # What one ordinary forward pass does to the running mean:
    ref = make("cvar_mlp")
    ref.load_state_dict(head.state_dict())
    ref.train()
    ref.loss(batch)
    ref_bn = next(m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm1d))
    sam_step(head, opt, batch, rho=0.5)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)  # exactly one update, not two
    assert int(bn.num_batches_tracked) == 1
    with FrozenBN(head):
        head.loss(batch)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)


def test_sam_moves_weights_differently_from_plain_step():
    torch.manual_seed(0)
    a = make("linear")
    b = make("linear")
    b.load_state_dict(a.state_dict())
    batch = toy()
    sam_step(a, torch.optim.SGD(a.parameters(), lr=0.1), batch, rho=0.5)
    loss = b.loss(batch)
    loss.backward()
    torch.optim.SGD(b.parameters(), lr=0.1).step()
    assert not torch.allclose(a.fc.weight, b.fc.weight)


def test_au_losses_ignore_unknown_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    y = torch.tensor([[1, -1], [-1, 0]])
    per = masked_bce(logits, y)
    assert per[0].item() == pytest.approx(F.softplus(torch.tensor(-2.0)).item())
    assert per[1].item() == pytest.approx(F.softplus(torch.tensor(0.5)).item())
    # AUC margin: AU0 has one positive (row 0) and no negative -> skipped; AU1 has no positive -> zero loss
    assert auc_margin(logits, y).item() == 0.0
    y2 = torch.tensor([[1, 1], [0, 0]])
    s = torch.sigmoid(logits)
    want = ((F.relu(0.6 - (s[0, 0] - s[1, 0])) ** 2) + (F.relu(0.6 - (s[0, 1] - s[1, 1])) ** 2)) / 2
    assert auc_margin(logits, y2).item() == pytest.approx(want.item())


def test_au_head_reads_the_auc_margin_terms_margin_and_power():
    """The AUC-margin term's margin and p are hyperparameters (sweep axes): the head's loss is the CVaR/AUC mix
    with the term computed at exactly those values."""
    from fercache.errors import ConfigError
    from fercache.heads.cvar_mlp import cvar

    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16, 3))
    head = build_head("au", HeadContext(8, 3, ["AU1", "AU2", "AU4"]), dropout=0.0, auc_weight=0.2, auc_margin=1.0,
                      auc_p=3)
    logits = head(x)
    want = 0.8 * cvar(masked_bce(logits, y), 0.5) + 0.2 * auc_margin(logits, y, 1.0, 3)
    torch.testing.assert_close(head.loss({"x": x, "y": y}), want)
    assert auc_margin(logits, y, 1.0, 3) != auc_margin(logits, y)  # the defaults (0.6, 2) would give another value
    with pytest.raises(ConfigError, match="auc_p=0"):
        build_head("au", HeadContext(8, 3, ["AU1", "AU2", "AU4"]), auc_p=0)


@pytest.mark.parametrize("name", ["linear", "logreg", "temporal"])
def test_a_feature_dead_in_training_cannot_swamp_the_logits_at_test_time(name):
    """A ReLU channel that is zero on every training image and not on a test image was divided by 1e-6: one such
    value decided the prediction. Every standardising head now bounds it at 100x a typical feature."""
    head = make(name, standardize=True) if name == "temporal" else make(name)
    train = shaped(head, toy(d=24))
    train["x"][..., 0] = 0.0  # dead on every training row (every frame)
    head.fit_stats(train)
    test = shaped(head, toy(d=24, seed=5))
    test["x"][..., 0] = 0.0
    plain = head.logits(test).detach()
    test["x"][..., 0] = 1.0  # the dead channel fires, well within the scale of the live ones (std ~3)
    moved = (head.logits(test).detach() - plain).abs().max()
    assert float(head.sigma[0]) == pytest.approx(0.01 * float(head.sigma.median()), rel=1e-6)
    assert moved < 100  # it was ~1e5: (1 - 0) / 1e-6 times an untrained weight


def test_unknown_hyperparameter_is_an_error():
    from fercache.errors import ConfigError

    with pytest.raises(ConfigError, match="hiddn"):
        build_head("cvar_mlp", HeadContext(8, 3, CLASSES), hiddn=4)


def test_logreg_matches_sklearn_at_the_same_regularisation():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 10)).astype(np.float32) * rng.uniform(0.5, 5, 10).astype(np.float32)
    y = (x @ rng.normal(size=(10, 3)) + rng.normal(size=(300, 3)) * 2).argmax(1)
    C = 0.05  # sklearn: C * sum CE + |W|^2 / 2  ==  n C (mean CE + |W|^2 / (2 n C))
    head = make("logreg", d=10, c=3, l2=[1 / (2 * len(y) * C)])
    train = {"x": torch.as_tensor(x), "y": torch.as_tensor(y)}
    head.fit_stats(train)
    out = head.solve(train, lambda m: 0.0, {"max_iter": 500})
    assert [p["l2"] for p in out["path"]] == [pytest.approx(1 / (2 * len(y) * C))]
    xs = ((torch.as_tensor(x) - head.mu) / head.sigma).numpy()
    ref = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(xs, y)
    with torch.no_grad():
        ours = torch.softmax(head(torch.as_tensor(x)), 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(xs), atol=2e-4)


def test_logreg_chooses_the_regularisation_on_validation():
    head = make("logreg")
    train, val = toy(), toy(seed=1)
    head.fit_stats(train)
    seen = []

    def val_score(m):
        m.eval()
        with torch.no_grad():
            acc = (m.logits(val).argmax(1) == val["y"]).float().mean().item()
        seen.append(acc)
        return acc

    out = head.solve(train, val_score, {"max_iter": 100})
    assert [p["l2"] for p in out["path"]] == sorted((p["l2"] for p in out["path"]), reverse=True) and len(seen) == 8
    best = max(out["path"], key=lambda p: p["val"])
    assert out["l2"] == best["l2"] and val_score(head) == best["val"] > 0.9  # the kept weights are the best's
    assert out["path"][0]["loss"] > out["path"][-1]["loss"]  # weaker penalty, lower training objective


@pytest.mark.parametrize("name", sorted(HEADS))
def test_a_built_head_carries_the_spec_it_was_registered_with(name):
    # fit() reads the recipe from the registration before building the head, and the head built is that one
    head = make(name)
    assert head.spec is HEADS[name] and head.name == name
    assert HEADS[name].to_dict()["recipe"] == head.spec.recipe and HEADS[name].to_dict()["task"] == head.spec.task
