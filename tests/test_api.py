"""The Python API: docs/python.md executed as written, and its results checked against the command line's."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import fercache
from fercache.errors import ConfigError
from fercache.scoring import evaluate_run

DOC = Path(__file__).parent.parent / "docs" / "python.md"


def test_the_notebook_walk_through_runs_as_written(tiny_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S):
        exec(block.replace("stores/faces.zarr", str(tiny_store)), ns)
    assert ns["proba"].shape == (24, 4) and np.allclose(ns["proba"].sum(1), 1, atol=1e-5)
    assert set(ns["labels"]) <= {"neutral", "happy", "sad", "anger"} and len(ns["head"].models) == 2
    assert ns["on_arrays"].score(ns["X"], ns["y"])["accuracy"] == 1.0  # separable blobs
    assert (tmp_path / "runs/faces-mask/seed0/head.pt").is_file() and len(ns["scores"].runs) == 1
    assert set(ns["matrix"].to_frame()["head"]) == {"linear", "mask"} and "### linear" in ns["matrix"]._repr_markdown_()
    assert ns["grid"].best == ns["grid"].rows[0] and len(ns["grid"].to_frame()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # the in-memory fits wrote nothing


def test_a_head_fitted_from_python_scores_as_evaluate_does(tiny_store, tmp_path):
    head = fercache.fit(tiny_store, head="linear", out_dir=tmp_path, recipe={"epochs": 3, "batch_size": 8})
    x, y = fercache.load(tiny_store).split_of("test")
    run = tmp_path / "faces-linear" / "seed0"
    assert head.score(x, y)["accuracy"] == pytest.approx(evaluate_run(run, write=False)["accuracy"])
    saved = head.save(tmp_path / "again")  # the run folder train-head writes
    assert evaluate_run(saved[0], write=False)["accuracy"] == pytest.approx(head.score(x, y)["accuracy"])


def test_arrays_with_names_fercache_does_not_know_are_refused():
    with pytest.raises(ConfigError, match=r"labels \['joy'\] are not fercache's class names"):
        fercache.fit(np.zeros((4, 2)), y=["joy", "sad", "sad", "joy"])
    with pytest.raises(ConfigError, match="no store to record"):
        fercache.fit(np.eye(40)[:, :8] + 1, y=["happy", "sad"] * 20).save("x")
