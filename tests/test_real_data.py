"""Real FER2013 and CK+48 from ../shared/data: committed manifests, and full extraction (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from fercache.adapters import build
from fercache.manifests import read_manifest

from .conftest import REPO, SHARED_DATA, needs_shared_data

pytestmark = needs_shared_data()


@pytest.mark.parametrize("name,fmt,src", [("fer2013.csv.gz", "imagefolder", "fer2013"), ("ckplus48.csv", "ckplus", "ckplus48")])
def test_committed_manifests_match_the_data(name, fmt, src):
    committed = read_manifest(REPO / "data_manifests" / name)
    fresh = build(fmt, SHARED_DATA / src, data_root=SHARED_DATA)
    assert committed.rows == fresh.rows


def test_real_label_counts():
    fer = read_manifest(REPO / "data_manifests" / "fer2013.csv.gz")
    assert len(fer) == 17178
    # README of the data: angry 1392/467/491 (train/val/test), disgust 152/56/55
    for split, n in (("train", 1392), ("val", 467), ("test", 491)):
        assert sum(r["label"] == "anger" and r["split"] == split for r in fer.rows) == n
    assert sum(r["label"] == "disgust" for r in fer.rows) == 152 + 56 + 55
    ck = read_manifest(REPO / "data_manifests" / "ckplus48.csv")
    assert len(ck) == 981 and "neutral" not in ck.column("label")
    assert sum(r["label"] == "contempt" for r in ck.rows) == 54
    # no subject straddles train and test
    split_of = {}
    for r in ck.rows:
        assert split_of.setdefault(r["subject"], r["split"]) == r["split"]
    # AU25 is the most frequent AU: 181 sequences x 3 frames
    assert sum(r["AU25"] == "1" for r in ck.rows) == 181 * 3


@pytest.mark.slow
def test_full_fer2013_extraction_with_stand_in(tmp_path):
    from fercache.extract import extract
    from fercache.store import open_store

    r = extract(REPO / "data_manifests" / "fer2013.csv.gz", "torchvision:mobilenet_v2", tmp_path / "fer.zarr",
                image_size=64, root=SHARED_DATA, progress=False)
    assert (r.rows, r.n_ok, r.n_failed) == (17178, 17178, 0)
    feats = open_store(tmp_path / "fer.zarr").features()
    assert feats.shape == (17178, 1280) and np.isfinite(feats).all()
