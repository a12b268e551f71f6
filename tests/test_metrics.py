"""Bootstrap intervals: the weighted metrics equal the plain ones on the resampled rows, and clusters are resampled
whole."""

from __future__ import annotations

import numpy as np

from fercache import metrics


def _example(n=300, k=5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
    return y, pred


def _resample_rows(groups, w_row):
    """The rows a bootstrap weight vector stands for, repeated as often as their cluster was drawn."""
    return np.repeat(np.arange(len(groups)), w_row.astype(int))


def test_weighted_classification_equals_classification_of_each_resample():
    y, pred = _example()
    names = [f"c{i}" for i in range(5)]
    ones = metrics.weighted_classification(np.ones((1, len(y))), y, pred, 5)
    plain = metrics.classification(y, pred, names)
    for k in ("accuracy", "uar", "macro_f1"):
        assert abs(ones[k][0] - plain[k]) < 1e-12
    groups = np.arange(len(y)) // 4  # clusters of four rows
    w = next(metrics.bootstrap_weights(groups, n_boot=3, seed=1))
    got = metrics.weighted_classification(w, y, pred, 5)
    for b in range(3):
        rows = _resample_rows(groups, w[b])
        want = metrics.classification(y[rows], pred[rows], names)
        for k in ("accuracy", "uar", "macro_f1"):
            assert abs(got[k][b] - want[k]) < 1e-12, (k, b)


def test_weighted_au_f1_equals_au_of_each_resample():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (200, 4))
    y[rng.random((200, 4)) < 0.2] = -1  # not annotated
    y[:, 3] = -1
    y[:5, 3] = 1  # an AU annotated on five rows only: some resamples miss it, then it is left out of the mean
    prob = np.clip(y + rng.normal(0, 0.6, y.shape), 0, 1)
    pred = (prob >= 0.5).astype(int)
    groups = np.arange(200)
    w = next(metrics.bootstrap_weights(groups, n_boot=20, seed=3))
    got = metrics.weighted_au_f1(w, y, pred)
    for b in range(20):
        rows = _resample_rows(groups, w[b])
        assert abs(got[b] - metrics.au(y[rows], prob[rows], list("abcd"))["macro_f1_at_0.5"]) < 1e-12, b


def test_clusters_are_drawn_whole_and_each_resample_has_as_many_clusters():
    groups = np.array(["s1", "s1", "s2", "s3", "s3", "s3"])
    for w in metrics.bootstrap_weights(groups, n_boot=50, seed=0, budget=30):  # budget forces several chunks
        assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 4]).all() and (w[:, 4] == w[:, 5]).all()
        # three clusters drawn per resample: weights of the first row of each cluster sum to 3
        assert (w[:, [0, 2, 3]].sum(1) == 3).all()
    assert sum(len(w) for w in metrics.bootstrap_weights(groups, n_boot=50, seed=0, budget=30)) == 50


def test_near_duplicate_frames_do_not_narrow_the_interval_when_resampled_by_subject():
    """Three copies of each image (CK+'s three frames per sequence) carry no more evidence than one."""
    y, pred = _example(n=400)
    stats = lambda y3, p3: lambda w: metrics.weighted_classification(w, y3, p3, 5)  # noqa: E731
    one = metrics.bootstrap_ci(stats(y, pred), np.arange(len(y)))["accuracy"]
    y3, p3 = np.repeat(y, 3), np.repeat(pred, 3)
    by_subject = metrics.bootstrap_ci(stats(y3, p3), np.repeat(np.arange(len(y)), 3))["accuracy"]
    by_row = metrics.bootstrap_ci(stats(y3, p3), np.arange(len(y3)))["accuracy"]
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert abs(width(by_subject) - width(one)) < 0.2 * width(one)
    assert width(by_row) < 0.7 * width(one)  # ~1/sqrt(3): the overconfident interval the clusters avoid
    assert one[0] < (y == pred).mean() < one[1]


def test_intervals_are_seeded():
    y, pred = _example()
    stats = lambda w: metrics.weighted_classification(w, y, pred, 5)  # noqa: E731
    assert metrics.bootstrap_ci(stats, np.arange(len(y))) == metrics.bootstrap_ci(stats, np.arange(len(y)))
    assert metrics.bootstrap_ci(stats, np.arange(len(y)), seed=1) != metrics.bootstrap_ci(stats, np.arange(len(y)))


def _scored(y, pred, k=5, subject=None):
    from fercache.scoring import Scored

    prob = np.full((len(y), k), 0.1 / (k - 1))
    prob[np.arange(len(y)), pred] = 0.9
    ids = np.array([f"s{i}" for i in range(len(y))], dtype=object)
    subject = ids if subject is None else subject
    return Scored(ids, subject, np.array([""] * len(y), dtype=object), y, prob, [f"c{i}" for i in range(k)], "expr")


def test_paired_difference_of_a_run_with_itself_is_zero():
    from fercache.compare import paired

    y, pred = _example()
    res = paired([_scored(y, pred)], [_scored(y, pred)])
    for m in res.values():
        assert m["diff"] == 0 and m["ci95"] == [0.0, 0.0] and m["p"] == 1.0


def test_paired_interval_finds_a_real_gain_and_is_narrower_than_separate_ones():
    from fercache.compare import paired

    y, pred = _example(n=400)
    better = pred.copy()
    wrong = np.flatnonzero(pred != y)
    better[wrong[: len(wrong) // 10]] = y[wrong[: len(wrong) // 10]]  # B fixes a tenth of A's errors, breaks nothing
    res = paired([_scored(y, pred)], [_scored(y, better)])["accuracy"]
    assert abs(res["diff"] - (len(wrong) // 10) / 400) < 1e-12
    assert 0 < res["ci95"][0] < res["diff"] < res["ci95"][1] and res["p"] < 0.01
    alone = metrics.bootstrap_ci(lambda w: metrics.weighted_classification(w, y, pred, 5), np.arange(400))["accuracy"]
    assert res["ci95"][1] - res["ci95"][0] < 0.5 * (alone[1] - alone[0])  # shared samples cancel out


def test_paired_seed_group_scores_the_mean_of_its_seeds():
    from fercache.compare import paired

    y, pred = _example(n=200)
    other = np.where(np.arange(200) < 50, y, pred)  # right on the first 50 rows
    res = paired([_scored(y, pred)], [_scored(y, pred), _scored(y, other)])["accuracy"]
    assert abs(res["b"] - ((pred == y).mean() + (other == y).mean()) / 2) < 1e-12


def test_compare_refuses_runs_of_different_stores_without_store(tmp_path):
    import json
    import os

    import pytest

    from fercache.compare import _test_store
    from fercache.errors import ConfigError

    for name, store in (("a", "x.zarr"), ("b", "y.zarr"), ("c", "./x.zarr/")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "head.pt").write_bytes(b"")
        (tmp_path / name / "config.json").write_text(json.dumps({"store": store}))
    with pytest.raises(ConfigError, match=r"different stores \(/\S*/x.zarr, /\S*/y.zarr\); pass --store"):
        _test_store(tmp_path / "a", tmp_path / "b", None)
    assert _test_store(tmp_path / "a", tmp_path / "b", "z.zarr") == "z.zarr"
    assert _test_store(tmp_path / "a", tmp_path / "a", None) == os.path.abspath("x.zarr")
    assert _test_store(tmp_path / "a", tmp_path / "c", None) == os.path.abspath("x.zarr")  # one store, two spellings


def test_confident_errors_are_the_surest_mistakes_first():
    from fercache.scoring import confident_errors

    y = np.array([0, 1, 2, 0, 1])
    s = _scored(y, np.array([0, 2, 0, 1, 1]), k=3)
    s.prob[1, 2], s.prob[2, 0], s.prob[3, 1] = 0.6, 0.95, 0.7  # three mistakes of known confidence
    got = confident_errors(s, 2)
    assert got == [("s2", "c2", "c0", 0.95), ("s3", "c0", "c1", 0.7)]
    assert [e[0] for e in confident_errors(s, 10)] == ["s2", "s3", "s1"]  # never a correct row
