"""Leakage audit: subjects and identical images shared by splits, and the unlabelled manifest that serves the same
store."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from fercache.audit import audit, leaking_units, summarize, without_leaks
from fercache.manifests import Manifest, content_sha256, read_manifest, resolve_paths, write_manifest

from .conftest import REPO, SHARED_DATA, class_image, needs_shared_data


@pytest.fixture
def leaky(tmp_path):
    """A tiny imagefolder where test copies a train image, val copies it with another label, train repeats itself."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        split = ("train", "train", "train", "train", "val", "val", "test", "test")[i]
        label = ("happy", "sad", "sad", "anger", "sad", "happy", "sad", "anger")[i]
        path = tmp_path / f"{split}_{i}.png"
        class_image(i % 4, rng).save(path)
        rows.append({"sample_id": f"s{i}", "path": path.name, "label": label, "split": split, "subject": f"p{i}"})
    shutil.copy(tmp_path / "train_0.png", tmp_path / "test_6.png")  # test copy of a training image
    shutil.copy(tmp_path / "train_0.png", tmp_path / "val_4.png")  # ... and a val copy, labelled sad, not happy
    shutil.copy(tmp_path / "train_1.png", tmp_path / "train_2.png")  # a duplicate inside train: not a leak
    rows[7]["subject"] = "p3"  # subject p3 is in train and test
    return Manifest(rows=rows, source="leaky"), tmp_path


def test_audit_finds_shared_subjects_copies_and_label_conflicts(leaky):
    m, root = leaky
    a = audit(m, resolve_paths(m, root))
    assert a.subjects_across_splits == {"p3": ["train", "test"]}
    assert sorted(map(sorted, a.duplicate_groups)) == [[0, 4, 6], [1, 2]]
    assert [sorted(g) for g in a.label_conflicts] == [[0, 4, 6]]
    assert a.leaking == ["s4", "s6"]  # val and test copies; train duplicates kept
    assert dict(a.pairs(m)) == {"test & val & train": 1} and not a.clean
    text = summarize(m, a)
    assert "subjects in more than one split: 1" in text and "2 val/test images are copies" in text
    assert "s0 [train, happy] = s4 [val, sad] = s6 [test, sad]" in text


def test_without_leaks_unlabels_only_the_leaking_units_and_keeps_the_store_fingerprint(leaky, tmp_path):
    m, root = leaky
    m.columns = m.columns + ["AU12"]
    for r in m.rows:
        r["AU12"] = "1"
    clean = without_leaks(m, audit(m, resolve_paths(m, root)).leaking)
    assert [r["label"] for r in clean.rows] == ["happy", "sad", "sad", "anger", "", "happy", "", "anger"]
    assert [r["AU12"] for r in clean.rows] == ["1", "1", "1", "1", "-1", "1", "-1", "1"]
    assert content_sha256(clean) == content_sha256(m)  # the same images: a store of m serves it
    assert [r["label"] for r in m.rows][4] == "sad"  # the input is left as it was
    write_manifest(clean, tmp_path / "clean.csv")


def test_a_video_leak_unlabels_the_whole_clip_and_still_frames_are_no_leak():
    rows = [{"sample_id": f"{c}/{f}", "path": f"{c}/{f}.png", "label": "happy", "split": s, "subject": c, "clip_id": c,
             "frame_idx": str(f)} for c, s in (("a", "train"), ("b", "test"), ("c", "test")) for f in range(3)]
    m = Manifest(rows=rows)
    # a/0 == b/2 (leak); c/0 == c/1 (a still face inside one clip: not a group)
    assert leaking_units(m, [[0, 5]]) == ["b"]
    clean = without_leaks(m, ["b"])
    assert [r["label"] for r in clean.rows] == ["happy"] * 3 + [""] * 3 + ["happy"] * 3


def test_manifest_check_cli_reports_writes_and_fails_strictly(leaky, tmp_path):
    from .test_cli import invoke

    m, root = leaky
    path = write_manifest(m, tmp_path / "m.csv")
    r = invoke("manifest", "check", path, "--data-root", root, "--without-leaks", tmp_path / "clean.csv")
    assert r.exit_code == 0, r.output
    assert "label" in r.output and "total" in r.output and "2 image(s) unlabelled" in r.output
    assert [row["label"] for row in csv.DictReader(open(tmp_path / "clean.csv"))][4] == ""
    r = invoke("manifest", "check", path, "--data-root", root, "--strict")
    assert r.exit_code == 1
    r = invoke("manifest", "check", tmp_path / "clean.csv", "--data-root", root, "--json")
    assert r.exit_code == 0 and '"leaking_units": 0' in r.output  # cleaning is idempotent: nothing leaks now


def test_scoring_on_the_unlabelled_manifest_skips_the_leaks(tiny_store, tiny_manifest, tiny_dataset, tmp_path):
    from fercache.scoring import evaluate_run
    from fercache.train import fit

    m = read_manifest(tiny_manifest)
    test_ids = [r["sample_id"] for r in m.rows if r["split"] == "test"][:5]
    clean = write_manifest(without_leaks(m, test_ids), tmp_path / "faces-noleak.csv")
    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 2, "batch_size": 8})
    full, kept = evaluate_run(r.run_dir), evaluate_run(r.run_dir, manifest=clean)
    assert full["n"] == 24 and kept["n"] == 19
    # Written apart: the evaluation on the run's own labels is still there, and the ledger shows both.
    assert (r.run_dir / "eval-faces-test" / "metrics.json").is_file()
    assert (r.run_dir / "eval-faces-test-@faces-noleak" / "metrics.json").is_file()
    from fercache.runs import run_record

    assert set(run_record(r.run_dir)["evals"]) == {"faces test", "faces test @faces-noleak"}


@needs_shared_data()
def test_fer2013_copy_leaks_test_images_from_train():
    """The real FER2013 copy: byte-identical images across its splits, some with different labels."""
    m = read_manifest(REPO / "data_manifests" / "fer2013.csv.gz")
    a = audit(m, resolve_paths(m, SHARED_DATA))
    by_split = {r["sample_id"]: r["split"] for r in m.rows}
    assert sum(a.pairs(m).values()) > 100 and len(a.label_conflicts) > 0
    assert a.leaking and all(by_split[u] in ("val", "test") for u in a.leaking)
    assert not a.subjects_across_splits  # per-image subjects mean "unknown", never a shared person


def test_a_manifest_without_its_leaks_is_never_written_over_the_manifest_it_comes_from(tmp_path, tiny_store,
                                                                                       tiny_dataset):
    """`--without-leaks M.csv` on M.csv itself used to unlabel the leaking rows of the original, for good."""
    from pathlib import Path

    from fercache.audit import check
    from fercache.errors import ManifestError
    from fercache.neighbours import near_duplicates
    from fercache.store import open_store

    source = open_store(tiny_store).meta["manifest"]
    before = Path(source).read_bytes()
    with pytest.raises(ManifestError, match="is the manifest it is derived from"):
        check(source, tiny_dataset, without_leaks_to=source)
    with pytest.raises(ManifestError, match="original labels would be lost"):
        near_duplicates(str(tiny_store), tmp_path / "nd", without_leaks_to=source)  # the store's own manifest
    assert Path(source).read_bytes() == before and not (tmp_path / "nd").exists()
    written = near_duplicates(str(tiny_store), tmp_path / "nd", without_leaks_to=tmp_path / "clean.csv")["manifest"]
    assert Path(written).is_file()
