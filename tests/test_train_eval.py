"""train-head / evaluate / cross matrix / predict on a tiny real store, and the no-test-in-selection guarantee."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fercache import store as S
from fercache.errors import ConfigError, EncoderError, StaleRunError
from fercache.heads import HEADS
from fercache.heads.mask import group_widths
from fercache.manifests import read_manifest, write_manifest
from fercache.protocols import cross_matrix
from fercache.rundir import load_run
from fercache.scoring import evaluate, evaluate_run
from fercache.train import fit, fit_seeds

QUICK = {"epochs": 4, "batch_size": 16}
#: Every registered expression head on images: a head added to the registry is tested here without a line changed.
IMAGE_HEADS = sorted(name for name, spec in HEADS.items() if spec.task == "expr" and spec.level == "frame")


@pytest.mark.parametrize("head", IMAGE_HEADS)
def test_train_head_writes_run(tiny_store, head, tmp_path):
    r = fit(str(tiny_store), head, out_dir=tmp_path, recipe=QUICK, hp={"hidden": 16} if head == "cvar_mlp" else None)
    files = {p.name for p in r.run_dir.iterdir()}
    assert {"head.pt", "config.json", "metrics.json"} <= files
    m = json.loads((r.run_dir / "metrics.json").read_text())
    assert m["selection"]["split"] == "val" and m["selection"]["val_source"] == "manifest val split"
    assert m["selection"]["test_split_used"] is False
    assert m["config"]["store_fingerprint"]["key"] == S.open_store(tiny_store).fingerprint["key"]
    assert m["config"]["classes"] == ["neutral", "happy", "sad", "anger"]  # canonical order, not folder order
    assert m["n_train"] == 24 and m["n_val"] == 24 and 0 <= m["val"]["accuracy"] <= 1
    model, cfg, _ = load_run(r.run_dir)
    assert cfg.head == head and sum(p.numel() for p in model.state_dict().values()) > 0
    if head == "logreg":  # no epochs: the l2 path, the kept point the best on val
        solver = m["selection"]["solver"]
        assert len(solver["path"]) == 8 and solver["l2"] == max(solver["path"], key=lambda p: p["val"])["l2"]
        assert m["val"]["accuracy"] == pytest.approx(max(p["val"] for p in solver["path"]))


def test_zeroshot_refused_without_text_tower(tiny_manifest, tiny_dataset, tmp_path):
    from fercache.extract import extract

    extract(tiny_manifest, "null:", tmp_path / "null.zarr", root=tiny_dataset, image_size=16, workers=0, progress=False)
    with pytest.raises(EncoderError, match="zeroshot needs a CLIP text tower.*null:"):
        fit(str(tmp_path / "null.zarr"), "zeroshot", out_dir=tmp_path)


def _poison_test_rows(src, dst, manifest):
    shutil.copytree(src, dst)
    st = S.open_store(dst, mode="r+")
    test = np.array([r["split"] == "test" for r in read_manifest(manifest).rows])
    scrambled = {}
    for name in st.outputs:
        values = st.group[f"features/{name}"][:]
        values[test] = 1e4 * np.sign(np.random.default_rng(0).normal(size=values[test].shape))
        scrambled[name] = values
    for i in range(st.n_chunks):  # written as extract writes chunks: with their checksums
        rows = st.chunk_slice(i)
        st.write_chunk(i, {k: v[rows] for k, v in scrambled.items()}, st.group["ok"][rows],
                       st.group["error"][rows].tolist())
    return test


@pytest.mark.parametrize("head", IMAGE_HEADS)
def test_selection_never_reads_the_test_split(tiny_store, tiny_manifest, tmp_path, head):
    """Scrambled test features and labels change nothing about training or the selected epoch."""
    test = _poison_test_rows(tiny_store, tmp_path / "poisoned.zarr", tiny_manifest)
    m = read_manifest(tiny_manifest)
    for r, is_test in zip(m.rows, test):
        if is_test:
            r["label"] = "contempt"
    relabelled = write_manifest(m, tmp_path / "relabelled.csv")
    hp = {"hidden": 16} if head == "cvar_mlp" else None
    a = fit(str(tiny_store), head, out_dir=tmp_path / "a", recipe=QUICK, hp=hp)
    b = fit(str(tmp_path / "poisoned.zarr"), head, manifest=relabelled, out_dir=tmp_path / "b", recipe=QUICK, hp=hp)
    assert a.metrics["selection"]["best_epoch"] == b.metrics["selection"]["best_epoch"]
    assert [h["val_accuracy"] for h in a.metrics["history"]] == [h["val_accuracy"] for h in b.metrics["history"]]
    assert a.metrics["selection"].get("solver") == b.metrics["selection"].get("solver")  # logreg's l2 path
    sa, sb = torch.load(a.run_dir / "head.pt")["state_dict"], torch.load(b.run_dir / "head.pt")["state_dict"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_val_is_carved_by_subject_when_missing(tiny_store, tiny_manifest, tmp_path, caplog, monkeypatch):
    from fercache import data

    monkeypatch.setattr(data, "_CARVE_SAID", set())
    m = read_manifest(tiny_manifest)
    for r in m.rows:
        if r["split"] == "val":
            r["split"] = "train"
        r["subject"] = r["sample_id"][-3:]  # 6 "subjects", shared across classes
    path = write_manifest(m, tmp_path / "noval.csv")
    with caplog.at_level(logging.INFO, logger="fercache.data"):
        for seed in (0, 0, 1):  # a sweep's points: the same carve is said once
            r = fit(str(tiny_store), "linear", manifest=path, out_dir=tmp_path, seed=seed, recipe=QUICK)
    assert [m.split("; ")[1] for m in caplog.messages if m.startswith("no val split")] == [
        "carved from train: 1 of 6 subjects (15%), seed 0", "carved from train: 1 of 6 subjects (15%), seed 1"]
    assert r.metrics["selection"]["val_source"].startswith("carved from train: 1 of 6 subjects")
    assert r.metrics["n_val"] == 8 and r.metrics["n_train"] == 40
    # --split val scores the split the run selected on: carved again the same way (it said "no 'val' rows")
    res = evaluate_run(r.run_dir, split="val", write=False)
    assert res["n"] == 8 and res["accuracy"] == pytest.approx(r.metrics["val"]["accuracy"])


def test_evaluate_writes_metrics_confusion_and_plot(tiny_store, tmp_path):
    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 30, "batch_size": 8})
    res = evaluate(r.run_dir)["runs"][0]
    assert res["split"] == "test" and res["n"] == 24
    assert set(res) >= {"accuracy", "uar", "macro_f1", "per_class_recall", "confusion"}
    assert np.array(res["confusion"]).sum() == 24
    assert res["accuracy"] > 0.5  # the classes differ by brightness pattern: learnable even from a random ViT
    out = r.run_dir / "eval-faces-test"
    assert (out / "confusion.png").stat().st_size > 1000
    assert (out / "confusion.csv").read_text().startswith("true \\ predicted,neutral,happy,sad,anger")
    # One row per test image: its decision and probabilities reproduce the headline metric.
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 24 and list(rows[0])[:5] == ["sample_id", "subject", "label", "prediction", "correct"]
    assert abs(np.mean([int(r["correct"]) for r in rows]) - res["accuracy"]) < 1e-9
    assert all(r["correct"] == str(int(r["label"] == r["prediction"])) for r in rows)
    assert all(abs(sum(float(r[f"p_{c}"]) for c in res["classes"]) - 1) < 1e-3 for r in rows)
    for k in ("accuracy", "uar", "macro_f1"):
        lo, hi = res["ci95"][k]
        assert 0 <= lo <= res[k] <= hi <= 1 and hi > lo
    assert res["ci_method"].startswith("percentile bootstrap, 1000 resamples of the ")
    assert json.loads((out / "metrics.json").read_text())["ci95"] == res["ci95"]


def test_evaluate_draws_the_surest_mistakes(tiny_store, tiny_dataset, tmp_path):
    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 2, "batch_size": 8})
    res = evaluate_run(r.run_dir, errors=4, root=tiny_dataset)
    png = r.run_dir / "eval-faces-test" / "errors.png"
    assert res["errors_png"] == str(png) and png.stat().st_size > 5000
    assert res["errors_shown"] == min(4, round(res["n"] * (1 - res["accuracy"]))) > 0
    with pytest.raises(ConfigError, match="does not exist; pass --data-root"):
        evaluate_run(r.run_dir, errors=4, root=tmp_path)
    # Two seeds under a wrong data root: seed0's evaluation was written, then the error, seed1 never scored
    from fercache.scoring import evaluate

    fit_seeds(str(tiny_store), "linear", seeds=(0, 1), out_dir=tmp_path / "two", recipe={"epochs": 2, "batch_size": 8})
    with pytest.raises(ConfigError, match="does not exist; pass --data-root"):
        evaluate(tmp_path / "two" / "faces-linear", errors=4, root=tmp_path)
    assert not list((tmp_path / "two").rglob("eval-*"))
    # the manifest's paths start with faces/: a root one folder too low is answered with the right one
    with pytest.raises(ConfigError, match=f"does not exist; it is under {tiny_dataset}: "
                                          f"pass --data-root {tiny_dataset}$"):
        evaluate_run(r.run_dir, errors=4, root=tiny_dataset / "faces")


def test_a_store_remembers_its_data_root_so_its_images_are_found_from_any_folder(tiny_store, tiny_dataset, tmp_path,
                                                                                  monkeypatch):
    """`evaluate --errors` from another folder needed `--data-root` again, though `extract` had been told it."""
    from fercache.data import unit_images
    from tests.test_cli import invoke

    monkeypatch.delenv("FERCACHE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert S.open_store(tiny_store).meta["data_root"] == str(tiny_dataset.resolve())
    assert f"data root  {tiny_dataset.resolve()}\n" in invoke("info", tiny_store).output
    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 2, "batch_size": 8})
    res = evaluate_run(r.run_dir, errors=4)
    assert res["errors_shown"] > 0 and Path(res["errors_png"]).stat().st_size > 5000
    # $FERCACHE_DATA (like --data-root) still comes first: a wrong one is said, not overridden
    monkeypatch.setenv("FERCACHE_DATA", str(tmp_path))
    with pytest.raises(ConfigError, match=f"cannot draw the images: {tmp_path}/faces/.* does not exist; pass"):
        evaluate_run(r.run_dir, errors=4)
    monkeypatch.delenv("FERCACHE_DATA")
    # the data moved away since: the current folder, as for a store that records none, and the error says how
    moved = tmp_path / "moved.zarr"
    shutil.copytree(tiny_store, moved)
    st = S.open_store(moved, mode="r+")
    st.group.attrs["fercache"] = {**st.meta, "data_root": str(tmp_path / "gone")}
    assert f"data root  {tmp_path / 'gone'} (not there now)\n" in invoke("info", moved).output
    with pytest.raises(ConfigError, match=f"cannot draw the images: {tmp_path}/faces/.* "
                                          "does not exist; pass --data-root"):
        unit_images(str(moved), [str(st.sample_ids()[0])], None)
    monkeypatch.chdir(tiny_dataset)
    assert unit_images(str(moved), [str(st.sample_ids()[0])], None)[0].ndim == 3


def test_a_run_appears_only_once_saved_whole_and_a_retrained_one_drops_the_old_evaluations(tiny_store, tmp_path,
                                                                                             monkeypatch):
    from fercache import train as T

    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 2, "batch_size": 8}, name="run")
    evaluate_run(r.run_dir)
    assert (r.run_dir / "eval-faces-test" / "metrics.json").is_file()
    # Killed while writing the weights: the folder no longer holds a run (the old head.pt went first), not a
    # new config.json beside the old weights, and not a head.pt beside no metrics.json
    monkeypatch.setattr(T.torch, "save", lambda obj, f: (open(f, "wb").write(b"half"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 3, "batch_size": 8}, name="run")
    assert not (r.run_dir / "head.pt").exists() and sorted(p.name for p in r.run_dir.iterdir()) == [
        "config.json", "head.pt.partial", "metrics.json", "training.png"]
    monkeypatch.undo()
    # Retrained whole: the evaluation of the weights it replaced is gone with them
    fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 3, "batch_size": 8}, name="run")
    assert sorted(p.name for p in r.run_dir.iterdir()) == ["config.json", "head.pt", "metrics.json", "training.png"]
    assert load_run(r.run_dir)[1].recipe["epochs"] == 3


def test_damaged_files_are_named_not_a_traceback(tiny_store, tmp_path):
    """A head.pt cut short, a store chunk cut short (a full disk, a bad copy): said as what is damaged and what to
    do, where they were a torch RuntimeError and a numpy reshape ValueError from inside zarr."""
    import shutil

    from fercache.errors import StoreError

    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 1, "batch_size": 8}, name="run")
    weights = r.run_dir / "head.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError,
                       match=r"head.pt cannot be read \(RuntimeError: PytorchStreamReader failed reading zip "
                             r"archive: failed finding central directory\); the run's weights are damaged"):
        load_run(r.run_dir)
    store = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, store)
    chunk = next(p for p in sorted((store / "features").rglob("*")) if p.is_file() and "/c/" in str(p))
    chunk.write_bytes(chunk.read_bytes()[:50])
    with pytest.raises(StoreError,
                       match=rf"copy.zarr: its array 'features/{chunk.relative_to(store / 'features').parts[0]}' "
                             r"cannot be read \(ValueError: .*\); if the store is damaged \(a file cut short, a bad "
                             r"copy\), extract it again"):
        fit(str(store), "linear", out_dir=tmp_path, recipe={"epochs": 1, "batch_size": 8})


def test_labels_from_a_mistyped_manifest_name_the_near_one(tiny_store, tiny_manifest, tmp_path):
    """--manifest / --labels given and missing was "cannot find the manifest of STORE; pass --manifest": the
    option the user had just passed."""
    from fercache.errors import ManifestError

    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 1, "batch_size": 8})
    typo = tiny_manifest.with_name("face.csv")
    with pytest.raises(ManifestError, match=rf"manifest {typo} does not exist \(did you mean '{tiny_manifest}'\?\)"):
        evaluate_run(r.run_dir, manifest=typo)


@pytest.mark.parametrize("aus,error", [
    ("12,12", r"--aus names AU12 twice; each AU once"), (["AU15", "AU12", "AU15"], r"--aus names AU15 twice"),
    ("topx", r"--aus 'topx': write topK with K >= 1"), ("top0", r"--aus 'top0': write topK with K >= 1"),
    (",", r"--aus ',' names no AU"), ("12,99", r"AU\(s\) AU99 not in .*au.csv; it has AU12, AU15$")])
def test_au_choices_that_would_train_a_wrong_head_are_refused_before_training(tiny_store, tiny_manifest, tmp_path,
                                                                             monkeypatch, aus, error):
    """--aus 12,12 trained AU12 twice as two outputs (macro-F1 counted it twice); topx crashed with a ValueError;
    top0 saved a head of no AU with a val macro-F1 of nan."""
    import fercache.train as T
    from fercache.protocols import _fixed_aus

    path = _au_manifest(tiny_manifest, tmp_path)
    monkeypatch.setattr(T, "_fit_model", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(ConfigError, match=error):
        fit(str(tiny_store), "au", manifest=path, out_dir=tmp_path / "r", aus=aus)
    with pytest.raises(ConfigError, match=error):  # au-cv's choice, made before any fold manifest is written
        _fixed_aus(read_manifest(path), aus)
    assert not (tmp_path / "r").exists()


def test_aus_are_named_by_number_or_name_with_spaces_or_any_case(tiny_store, tiny_manifest, tmp_path):
    from fercache.aus import choose_aus

    have, pos = ["AU12", "AU15"], {"AU12": 5, "AU15": 9}
    assert choose_aus(" 15, au12 ", have, pos, "m") == ["AU15", "AU12"]
    assert choose_aus("top1", have, pos, "m") == ["AU15"] and choose_aus("top5", have, pos, "m") == ["AU12", "AU15"]


def _au_manifest(tiny_manifest, tmp_path):
    """The tiny manifest with AU12 (~happy) and AU15 (~sad; unknown for some neutral rows)."""
    m = read_manifest(tiny_manifest)
    for r in m.rows:
        r["AU12"] = "1" if r["label"] == "happy" else "0"
        r["AU15"] = "1" if r["label"] == "sad" else ("-1" if r["label"] == "neutral" else "0")
    m.columns = m.columns + ["AU12", "AU15"]
    return write_manifest(m, tmp_path / "au.csv")


def test_au_head_on_manifest_au_columns(tiny_store, tiny_manifest, tmp_path):
    path = _au_manifest(tiny_manifest, tmp_path)
    r = fit(str(tiny_store), "au", manifest=path, out_dir=tmp_path, recipe={"epochs": 30, "batch_size": 8}, aus="12,15",
            hp={"hidden": 32, "auc_weight": 0.2})
    assert r.metrics["config"]["classes"] == ["AU12", "AU15"]
    assert set(r.metrics["val"]["thresholds"]) == {"AU12", "AU15"}
    res = evaluate_run(r.run_dir, manifest=path)
    assert res["n"] == 24 and set(res["per_au_f1_at_0.5"]) == {"AU12", "AU15"}
    assert res["macro_f1_tuned"] > res["macro_f1_always_positive"]
    assert set(res["ci95"]) == {"macro_f1_at_0.5", "macro_f1_tuned"}
    rows = list(csv.DictReader(open(r.run_dir / "eval-faces-test" / "predictions.csv")))
    assert len(rows) == 24 and {"AU12_true", "AU12_pred", "AU12_p", "AU15_true"} <= set(rows[0])
    assert {r["AU15_true"] for r in rows} == {"-1", "0", "1"}  # not annotated is kept as -1, not scored as 0


def test_cross_matrix_counts_excluded_labels(tiny_store, tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path):
    from fercache.extract import extract

    # A second "dataset": same images, but anger relabelled contempt (a class the first never saw).
    m = read_manifest(tiny_manifest)
    rows = [dict(r, sample_id="b/" + r["sample_id"],
                 label="contempt" if r["label"] == "anger" else r["label"]) for r in m.rows]
    m2 = write_manifest(type(m)(rows=rows, source="b"), tmp_path / "b.csv")
    extract(m2, tiny_encoder_spec, tmp_path / "b.zarr", root=tiny_dataset, chunk_rows=16, workers=0, progress=False)
    tables = cross_matrix([str(tiny_store), str(tmp_path / "b.zarr")], ["linear"], tmp_path / "cross", seeds=(0, 1),
                          recipe={"linear": QUICK})
    cells = tables.tables["linear"].cells
    assert cells["faces -> b"]["excluded"] == {"n": 6, "by_label": {"contempt": 6}}
    assert cells["b -> faces"]["excluded"] == {"n": 6, "by_label": {"anger": 6}}
    assert cells["faces -> faces"]["excluded"]["n"] == 0 and len(cells["faces -> faces"]["seeds"]) == 2
    assert "mean unseen" in tables.markdown and "[excl. 6]" in tables.tables["linear"].markdown
    assert (tmp_path / "cross" / "cross-linear.png").stat().st_size > 1000
    assert (tmp_path / "cross" / "cross-linear.csv").read_text().startswith("trained_on,faces_mean,b_mean")


def test_a_one_store_matrix_has_no_unseen_mean_and_repeated_seeds_are_refused(tiny_store, tmp_path, monkeypatch):
    """'mean unseen' was nan with one store; --seeds 0,0 trained seed0 twice into one folder and reported
    'mean ± std over 2 seed(s)' of one run, std 0."""
    import fercache.train as T
    from fercache.pipeline import check_pipeline
    from fercache.sweeps import sweep

    table = cross_matrix([str(tiny_store)], ["linear"], tmp_path / "one", recipe={"linear": QUICK}).tables["linear"]
    assert "nan" not in table.markdown and table.markdown.split("\n")[4].endswith("| - |")
    # one seed has no spread: the cell was "70.0 ± 0.0 (in-domain)" under "mean ± std over 1 seed(s)"
    assert "on the test split, one seed (no ± std)" in table.markdown and "±" not in table.markdown.split("\n")[4]
    assert (tmp_path / "one" / "cross-linear.csv").read_text().splitlines()[1].endswith(",0,")
    monkeypatch.setattr(T, "_fit_model", lambda *a, **k: pytest.fail("trained before the seeds check"))
    message = r"^seeds \[0, 2, 0\] repeat 0: each seed is one run, in its own folder seed<N>/; give distinct seeds$"
    for call in (lambda: cross_matrix([str(tiny_store)], ["linear"], tmp_path / "c", seeds=[0, 2, 0]),
                 lambda: T.fit_seeds(str(tiny_store), "linear", seeds=[0, 2, 0], out_dir=tmp_path / "r"),
                 lambda: sweep(str(tiny_store), "linear", {"lr": [1e-3]}, tmp_path / "s", seeds=[0, 2, 0])):
        with pytest.raises(ConfigError, match=message):
            call()
    p = tmp_path / "p.toml"
    p.write_text(f'[[step]]\nrun = "train"\nstore = "{tiny_store}"\nhead = "linear"\nseeds = [0, 2, 0]\n')
    with pytest.raises(ConfigError, match=r"seeds \[0, 2, 0\] repeat 0"):  # before step 1 runs
        check_pipeline(p)
    from fercache import recipe as R

    with pytest.raises(ConfigError, match=r"^seeds \[\]: give one or more whole numbers >= 0$"):
        R.check_seeds([])
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_one_fold_manifest_and_one_seed_print_no_spread(tiny_store, tiny_manifest, tmp_path):
    """The folds table printed `70.00 ± 0.00` for one fold and one seed, read as a perfectly stable result."""
    from fercache.protocols import manifest_folds

    md = manifest_folds(str(tiny_store), [str(tiny_manifest)], ["linear"], tmp_path / "f",
                        recipe={"linear": QUICK})["markdown"]
    row = next(line for line in md.splitlines() if line.startswith("| linear |"))
    assert "±" not in row and "1 fold(s) x 1 seed(s), test split of each fold (no ± std)" in md
    assert (tmp_path / "f" / "folds.md").read_text() == md
    md = manifest_folds(str(tiny_store), [str(tiny_manifest)], ["linear"], tmp_path / "f2", seeds=(0, 1),
                        recipe={"linear": QUICK})["markdown"]
    row = next(line for line in md.splitlines() if line.startswith("| linear |"))
    assert row.count("±") == 3 and "(mean ± std over folds x seeds)" in md


def test_a_cross_matrix_of_stores_from_two_encoders_is_refused_before_training(tiny_store, tiny_manifest, tiny_dataset,
                                                                                tmp_path, monkeypatch):
    """A ViT store beside a MobileNetV2 one trained the first row's heads, then failed scoring them on the other."""
    import fercache.train as T
    from fercache.extract import extract
    from fercache.store import StoreError

    other = tmp_path / "null.zarr"
    extract(tiny_manifest, "null:", other, root=tiny_dataset, image_size=16, workers=0, progress=False)
    monkeypatch.setattr(T, "_fit_model", lambda *a, **k: pytest.fail("trained before the encoder check"))
    message = rf"^{tiny_store} \(.+\) and {other} \(null: \(none, .+\)\) were extracted differently; their features"
    for kw in ({"stores": [str(tiny_store), str(other)]}, {"stores": [str(tiny_store)], "test_stores": [str(other)]}):
        with pytest.raises(StoreError, match=message):
            cross_matrix(heads=["linear"], out_dir=tmp_path / "c", **kw)
    assert not (tmp_path / "c").exists()


def test_a_store_or_fold_manifest_named_twice_is_refused_before_training(tiny_store, tiny_manifest, tmp_path,
                                                                         monkeypatch):
    """Two identical matrix rows; a 2-fold mean over one fold counted twice."""
    import fercache.train as T
    from fercache.pipeline import check_pipeline
    from fercache.protocols import manifest_folds

    monkeypatch.setattr(T, "_fit_model", lambda *a, **k: pytest.fail("trained before the check"))
    other = tiny_store.parent / ".." / tiny_store.parent.name / tiny_store.name  # the same store, spelt otherwise
    with pytest.raises(ConfigError,
                       match=rf"^training store {other} is given twice \(as {tiny_store}\); each training store once$"):
        cross_matrix([str(tiny_store), str(other)], ["linear"], tmp_path / "c")
    with pytest.raises(ConfigError, match=r"^test store .* is given twice"):
        cross_matrix([str(tiny_store)], ["linear"], tmp_path / "c", test_stores=[str(tiny_store)] * 2)
    with pytest.raises(ConfigError, match=rf"^fold manifest {tiny_manifest} is given twice; each fold manifest once$"):
        manifest_folds(str(tiny_store), [tiny_manifest, tiny_manifest], ["linear"], tmp_path / "f")
    p = tmp_path / "p.toml"
    p.write_text(f'[[step]]\nrun = "folds"\nstore = "{tiny_store}"\nmanifests = ["{tiny_manifest}", '
                 f'"{tiny_manifest}"]\nheads = ["linear"]\nout = "{tmp_path}/f"\n')
    with pytest.raises(ConfigError, match="fold manifest .* is given twice"):
        check_pipeline(p)
    assert not (tmp_path / "c").exists() and not (tmp_path / "f").exists()


def test_a_head_or_metric_named_twice_is_refused_before_training(tiny_store, tiny_manifest, tmp_path, monkeypatch):
    """--heads linear,linear trained linear's runs twice into one folder and wrote its table twice over."""
    import fercache.train as T
    from fercache.pipeline import check_pipeline
    from fercache.protocols import manifest_folds

    monkeypatch.setattr(T, "_fit_model", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(ConfigError, match=r"^head 'linear' is given twice; each head once \(HEAD@NAME"):
        cross_matrix([str(tiny_store)], ["linear", "mask", "linear"], tmp_path / "c")
    with pytest.raises(ConfigError, match=r"^head 'linear' is given twice"):
        manifest_folds(str(tiny_store), [tiny_manifest], ["linear", "linear"], tmp_path / "f")
    with pytest.raises(ConfigError, match=r"^cross-matrix metric ece is given twice; each metric once$"):
        cross_matrix([str(tiny_store)], ["linear"], tmp_path / "c", metric=["ece", "accuracy", "ece"])
    p = tmp_path / "p.toml"
    p.write_text(f'[[step]]\nrun = "cross"\nstores = ["{tiny_store}"]\nheads = ["mask", "mask"]\nout = '
                 f'"{tmp_path}/c"\n')
    with pytest.raises(ConfigError, match=r"step 1 \(cross\): head 'mask' is given twice"):
        check_pipeline(p)
    assert not (tmp_path / "c").exists() and not (tmp_path / "f").exists()
    from fercache.protocols import check_tables
    check_tables(["linear", "linear@b"], {"linear@b": {}}, None)  # a variant label is not a repeat: no error


def test_cross_matrix_refuses_other_encoders(tiny_store, tiny_manifest, tiny_dataset, tmp_path):
    from fercache.errors import StoreError
    from fercache.extract import extract

    extract(tiny_manifest, "null:", tmp_path / "null.zarr", root=tiny_dataset, image_size=16, workers=0, progress=False)
    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe=QUICK)
    with pytest.raises(StoreError, match="not comparable"):
        evaluate_run(r.run_dir, str(tmp_path / "null.zarr"))


def test_a_mistyped_store_or_run_folder_is_named_with_what_is_there(tiny_store, tiny_manifest, tmp_path):
    from fercache.errors import StoreError
    from fercache.scoring import run_dirs

    typo = tiny_store.with_name(tiny_store.stem + "s.zarr")
    with pytest.raises(StoreError, match=rf"no fercache store at .*s\.zarr \(did you mean '{tiny_store}'\?\)"):
        S.open_store(typo)
    r = fit(str(tiny_store), "linear", out_dir=tmp_path / "cross" / "runs" / "faces-linear", recipe=QUICK)
    with pytest.raises(ConfigError, match=r"faces-lineer or its subfolders \(did you mean '.*/faces-linear'\?\)"):
        run_dirs(tmp_path / "cross" / "runs" / "faces-lineer")
    # a protocol's output folder holds its runs two levels down: say so, and how to list them
    with pytest.raises(ConfigError,
                       match=rf"runs lie deeper, e.g. {r.run_dir.parent}: .*`fercache runs {tmp_path / 'cross'}`"):
        run_dirs(tmp_path / "cross")
    # where a store's path is wanted, a folder inside one, a run or a manifest is named as what it is
    store = S.canonical(str(tiny_store))
    for where, said in [(tiny_store / "features", f": it lies inside the store {store}$"),
                        (r.run_dir, f": it is a run trained on the store {store}$"),
                        (r.run_dir.parent, f": it holds runs trained on the store {store}$"),
                        (tiny_manifest, r": it is a manifest: `fercache extract \S+faces.csv --encoder"),
                        (S.export_h5(tiny_store, tmp_path / "faces.h5"),
                         r": it is an HDF5 file, as `fercache export` writes for other tools; fercache reads "
                         r"the store"),
                        (tiny_store.parent,
                         rf": it is a folder of stores \(.*{tiny_store.name}.*\): pass one of them$"),
                        (tmp_path, "; create one with `fercache extract`$")]:
        with pytest.raises(StoreError, match=rf"^no fercache store at {where}{said}"):
            S.open_store(where)
    assert run_dirs(r.run_dir.parent) == [r.run_dir]


def test_predict_collects_images_of_folders_and_names_the_near_path_of_a_typo(tmp_path):
    from fercache.predict import collect_images

    (tmp_path / "happy" / "more").mkdir(parents=True)
    for name in ("happy/b.png", "happy/more/a.JPG", "happy/notes.txt", "one.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert collect_images([tmp_path / "happy", tmp_path / "one.jpg"]) == [
        tmp_path / "happy" / "b.png", tmp_path / "happy" / "more" / "a.JPG", tmp_path / "one.jpg"]
    with pytest.raises(ConfigError, match=r"hapy is neither an image file nor a folder \(did you mean '.*/happy'\?\)"):
        collect_images([tmp_path / "hapy"])


def test_predict_uses_the_runs_encoder(tiny_store, tiny_dataset, tmp_path, monkeypatch):
    from fercache.predict import predict, write_predictions

    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 30, "batch_size": 8})
    folder = tiny_dataset / "faces" / "test" / "happy"
    rows = predict(r.run_dir, [folder])
    assert len(rows) == 6
    for row in rows:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["prediction"] in ("neutral", "happy", "sad", "anger")
    # Same features as the store: predictions equal the store-based evaluation's for these images.
    st = S.open_store(tiny_store)
    ids = list(st.sample_ids())
    model, cfg, _ = load_run(r.run_dir)
    feats = torch.as_tensor(st.features(cfg.output)[[ids.index(f"test/happy/test_happy_{k:03d}") for k in range(6)]])
    want = [cfg.classes[i] for i in model(feats).argmax(1).tolist()]
    assert [row["prediction"] for row in rows] == want
    out = write_predictions(rows, tmp_path / "p.csv")
    assert out.read_text().splitlines()[0] == "path,prediction,face_detected,error,neutral,happy,sad,anger"
    (tmp_path / "notes.txt").write_text("not an image")
    mixed = predict(r.run_dir, [folder / "test_happy_000.jpg", tmp_path / "notes.txt"])  # one bad file loses nothing
    assert "prediction" in mixed[0] and mixed[1]["error"].startswith("UnidentifiedImageError")
    with pytest.raises(ConfigError, match="none of the 1 file"):
        predict(r.run_dir, [tmp_path / "notes.txt"])
    # a mistyped folder is said before the encoder is built (the real encoders take seconds), not after
    monkeypatch.setattr("fercache.predict.encoder_of", lambda *a: pytest.fail("encoder built before the inputs"))
    with pytest.raises(ConfigError, match=r"hapy is neither an image file nor a folder \(did you mean '.*/happy'"):
        predict(r.run_dir, [folder, folder.parent / "hapy"])


def test_predict_on_a_folder_of_seeds_averages_their_probabilities(tiny_store, tiny_manifest, tiny_dataset, tmp_path):
    from fercache.extract import extract
    from fercache.predict import predict

    runs = [fit(str(tiny_store), "linear", out_dir=tmp_path, seed=s, recipe=QUICK).run_dir for s in (0, 1)]
    folder = tiny_dataset / "faces" / "test" / "happy"
    each = [np.array([list(r["probabilities"].values()) for r in predict(run, [folder])]) for run in runs]
    assert not np.allclose(each[0], each[1])  # two seeds, two heads
    both = predict(runs[0].parent, [folder])
    np.testing.assert_allclose([list(r["probabilities"].values()) for r in both], (each[0] + each[1]) / 2, atol=1e-6)
    classes = list(both[0]["probabilities"])
    assert [r["prediction"] for r in both] == [classes[i] for i in ((each[0] + each[1]) / 2).argmax(1)]

    extract(tiny_manifest, "null:", tmp_path / "null.zarr", root=tiny_dataset, image_size=16, workers=0, progress=False)
    other = fit(str(tmp_path / "null.zarr"), "linear", out_dir=tmp_path, recipe=QUICK).run_dir
    shutil.copytree(other, runs[0].parent / "seed9")
    with pytest.raises(ConfigError,
                       match=r"seed9 and .*seed0 differ in encoder, output: an ensemble's runs must share"):
        predict(runs[0].parent, [folder])


def test_mask_head_with_a_second_mask_source_store(tiny_store, tiny_manifest, tiny_dataset, tmp_path):
    from fercache.extract import extract

    extract(tiny_manifest, "null:", tmp_path / "null.zarr", root=tiny_dataset, image_size=16, workers=0, progress=False)
    r = fit(str(tiny_store), "mask", mask_source=str(tmp_path / "null.zarr"), out_dir=tmp_path, recipe=QUICK)
    model, cfg, _ = load_run(r.run_dir)
    assert cfg.z_dim == 3 and model.mask_net[0].in_features == 3 and cfg.mask_source.endswith("null.zarr")
    res = evaluate_run(r.run_dir)
    assert res["n"] == 24


def test_mask_budgets_from_class_counts_are_saved_and_restored(tiny_store, tiny_manifest, tmp_path):
    m = read_manifest(tiny_manifest)
    train = [r for r in m.rows if r["split"] == "train"]
    rare = train[0]["label"]
    common = next(r["label"] for r in train if r["label"] != rare)
    for r in [r for r in train if r["label"] == rare][:4]:  # 6 per class -> 2, 6, 6, 10
        r["label"] = common
    skewed = write_manifest(m, tmp_path / "skewed.csv")
    r = fit(str(tiny_store), "mask", manifest=skewed, out_dir=tmp_path, recipe=QUICK, hp={"budgets": "freq"})
    model, cfg, _ = load_run(r.run_dir)
    counts = [sum(row["label"] == c for row in train) for c in cfg.classes]
    assert sorted(counts) == [2, 6, 6, 10] and cfg.hp["budgets"] == counts
    assert model.widths == group_widths(cfg.in_dim, 4, counts) and len(set(model.widths)) == 3
    torch.testing.assert_close(model.fc.weight, torch.load(r.run_dir / "head.pt")["state_dict"]["fc.weight"])


def test_evaluate_refuses_a_run_whose_manifest_changed_since_training(tiny_store, tiny_manifest, tmp_path):
    copy = write_manifest(read_manifest(tiny_manifest), tmp_path / "labels.csv")
    r = fit(str(tiny_store), "linear", manifest=copy, out_dir=tmp_path, recipe=QUICK)
    assert evaluate_run(r.run_dir)["n"] == 24  # unchanged: fine
    m = read_manifest(copy)
    moved = next(row for row in m.rows if row["split"] == "train")
    moved["split"] = "test"  # a training image now sits in the test split
    write_manifest(m, copy)
    with pytest.raises(StaleRunError, match=r"run .*: .*labels.csv changed since it was trained"):
        evaluate_run(r.run_dir)
    assert evaluate_run(r.run_dir, manifest=copy)["n"] == 25  # on purpose, with --manifest


def test_evaluate_refuses_a_run_whose_store_was_re_extracted(tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path):
    from fercache.extract import extract
    from fercache.manifests import Manifest

    m = read_manifest(tiny_manifest)
    fewer = write_manifest(Manifest(rows=m.rows[:-6], source="x", columns=m.columns), tmp_path / "fewer.csv")
    store = tmp_path / "s.zarr"
    kw = dict(root=tiny_dataset, batch_size=16, workers=0, progress=False)
    extract(fewer, tiny_encoder_spec, store, **kw)
    r = fit(str(store), "linear", out_dir=tmp_path, recipe=QUICK)
    extract(tiny_manifest, tiny_encoder_spec, store, overwrite=True, **kw)
    with pytest.raises(StaleRunError,
                       match=r"re-extracted from other images since it was trained \(66 rows.*; 72 rows"):
        evaluate_run(r.run_dir)


def test_predict_tallies_classes_and_active_aus_most_frequent_first():
    from fercache.predict import tally

    assert tally([{"prediction": "sad"}, {"prediction": "happy"}, {"prediction": "happy"}, {"error": "x"}]) == \
        "happy 2, sad 1"
    assert tally([{"active": ["AU1", "AU12"]}, {"active": ["AU12"]}, {"active": []}]) == "AU12 2, AU1 1"
    assert tally([{"error": "x"}]) == ""


def test_predict_with_face_detection_keeps_images_without_faces(tiny_store, tiny_dataset, tmp_path):
    pytest.importorskip("facenet_pytorch")
    from fercache.predict import predict

    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe=QUICK)
    rows = predict(r.run_dir, [tiny_dataset / "faces" / "test" / "sad"], detect=True)
    # gradients are not faces: MTCNN finds none, and the whole image is classified instead
    assert len(rows) == 6 and all(row["face_detected"] is False and "prediction" in row for row in rows)


def test_sweep_ranks_on_validation(tiny_store, tmp_path):
    from fercache.sweeps import sweep

    r = sweep(str(tiny_store), "linear", {"normalize": [False, True], "lr": [1e-6, 1e-2]}, tmp_path,
              base_recipe={"batch_size": 8, "epochs": 20})
    assert len(r.rows) == 4
    means = [row["mean"] for row in r.rows]
    assert means == sorted(means, reverse=True) and r.best["lr"] == 1e-2 and means[0] > means[-1]
    saved = json.loads((tmp_path / "point000" / "seed0" / "config.json").read_text())
    assert saved["hp"] == {"normalize": False} and saved["recipe"]["lr"] == 1e-6 and saved["recipe"]["batch_size"] == 8
    assert (tmp_path / "sweep.md").read_text().count("\n|") == 6  # header, rule, 4 points
    best = r.markdown.split("\n")[4]  # one seed: the mean alone, where it was "x ± 0.00"
    assert best.endswith(f"| {100 * means[0]:.2f} |") and "±" not in r.markdown
    # the plots: the sweep ranking with its best point in blue, and each run's training curves
    blue = (31, 119, 180)  # matplotlib tab:blue
    for png in (tmp_path / "sweep.png", tmp_path / "point000" / "seed0" / "training.png"):
        img = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
        assert img.shape[0] > 300 * 200 and (np.abs(img.astype(int) - blue).sum(1) < 30).sum() > 20, png


def test_a_sweep_run_again_reuses_the_runs_it_finished_and_trains_the_rest(tiny_store, tmp_path, caplog):
    from fercache.sweeps import sweep

    grid, base = {"lr": [1e-3, 1e-2, 1e-1]}, {"batch_size": 8, "epochs": 3}
    first = sweep(str(tiny_store), "linear", grid, tmp_path, base_recipe=base)
    assert first.reused == 0 and first.runs == 3
    runs = [tmp_path / f"point{i:03d}" / "seed0" for i in range(3)]
    (runs[2] / "head.pt").unlink()  # interrupted while saving its last point: head.pt is written last
    cfg = json.loads((runs[1] / "config.json").read_text())
    assert cfg["trained_with"]["fercache"] and cfg["trained_with"]["torch"] == torch.__version__
    cfg["trained_with"]["fercache"] = "0.0.1"  # trained by another version: not this code's result
    (runs[1] / "config.json").write_text(json.dumps(cfg))
    stamps = [(r / "head.pt").stat().st_mtime_ns for r in runs[:2]]
    with caplog.at_level(logging.INFO, logger="fercache"):
        again = sweep(str(tiny_store), "linear", grid, tmp_path, base_recipe=base)
    assert again.reused == 1 and "1 of 3 runs were found finished" in caplog.text
    assert ((runs[0] / "head.pt").stat().st_mtime_ns == stamps[0]
            and (runs[1] / "head.pt").stat().st_mtime_ns != stamps[1])
    assert (runs[2] / "head.pt").is_file()
    assert json.loads((runs[1] / "config.json").read_text())["trained_with"]["fercache"] != "0.0.1"
    assert [r["mean"] for r in again.rows] == [r["mean"] for r in first.rows]  # same seeds, same scores
    (runs[0] / "head.pt").write_bytes((runs[0] / "head.pt").read_bytes()[:100])  # damaged: trained again, not reused
    assert sweep(str(tiny_store), "linear", grid, tmp_path, base_recipe=base).reused == 2
    load_run(runs[0])
    # other settings (a recipe key) or --retrain: nothing is taken from the folder
    assert sweep(str(tiny_store), "linear", grid, tmp_path, base_recipe={**base, "epochs": 2}).reused == 0
    assert sweep(str(tiny_store), "linear", grid, tmp_path, base_recipe={**base, "epochs": 2}).reused == 3
    assert sweep(str(tiny_store), "linear", grid, tmp_path, base_recipe={**base, "epochs": 2}, reuse=False).reused == 0


def test_a_sweep_or_protocol_of_another_head_or_store_never_replaces_the_runs_in_its_folder(tiny_store, tiny_manifest,
                                                                                            tiny_dataset, tmp_path):
    """`fercache sweep A -H linear ...` then `fercache sweep A -H mask ...` (both into the default runs/sweep): the
    second trained mask over point000 and deleted point001 of the first, said only at INFO. Refused now, before
    any training; the same sweep again reuses its runs, and its store moved elsewhere is no other store."""
    import shutil

    from fercache.extract import extract
    from fercache.protocols import manifest_folds
    from fercache.sweeps import sweep

    grid, base, out = {"lr": [1e-3, 1e-2]}, {"batch_size": 8, "epochs": 1}, tmp_path / "sweep"
    sweep(str(tiny_store), "linear", grid, out, base_recipe=base)
    heads = {p: p.read_bytes() for p in out.glob("point*/seed0/head.pt")}
    other = tmp_path / "other.zarr"
    extract(tiny_manifest, "null:", other, root=tiny_dataset, image_size=16, workers=0, progress=False)
    for args, says in [(("mask", tiny_store), "runs of linear on faces, which this sweep of mask on faces would"),
                       (("linear", other), "runs of linear on faces, which this sweep of linear on other would")]:
        with pytest.raises(ConfigError, match=f"^{out} holds {says} replace or remove; pass another --out, or remove"):
            sweep(str(args[1]), args[0], {"lr": [1e-3]}, out, base_recipe=base)
    assert {p: p.read_bytes() for p in out.glob("point*/seed0/head.pt")} == heads  # both points, untouched
    moved = tmp_path / "moved" / "faces.zarr"
    shutil.copytree(tiny_store, moved)  # the same store elsewhere: its fingerprint matches
    assert sweep(str(tiny_store), "linear", grid, out, base_recipe=base).reused == 2
    assert len(sweep(str(moved), "linear", grid, out, base_recipe=base).rows) == 2  # not refused
    manifest_folds(str(tiny_store), [str(tiny_manifest)], ["linear"], tmp_path / "f", recipe={"linear": base})
    with pytest.raises(ConfigError, match="holds runs of linear on faces, which this folds protocol of other would"):
        manifest_folds(str(other), [str(tiny_manifest)], ["linear"], tmp_path / "f", recipe={"linear": base})


def test_a_value_added_inside_a_sweep_grid_renumbers_the_finished_points_instead_of_training_them_again(tiny_store,
                                                                                                       tmp_path,
                                                                                                        caplog):
    """The points after an inserted value changed number, so each was compared with another point's settings and
    trained again: a sweep widened from 2 to 3 learning rates trained 3 points, not 1."""
    from fercache.sweeps import sweep

    base = {"batch_size": 8, "epochs": 3}

    def run(lrs, **kw):
        out = sweep(str(tiny_store), "linear", {"lr": lrs}, tmp_path, base_recipe=base, **kw)
        heads = {json.loads((tmp_path / f"point{i:03d}" / "point.json").read_text())["point"]["lr"]:
                 (tmp_path / f"point{i:03d}" / "seed0" / "head.pt").stat().st_mtime_ns for i in range(len(lrs))}
        return out, heads
    first, stamps = run([1e-3, 1e-1])
    with caplog.at_level(logging.INFO, logger="fercache"):
        wider, after = run([1e-3, 1e-2, 1e-1])
    assert wider.reused == 2 and "1 point folder(s) renumbered" in caplog.text
    assert after[1e-3] == stamps[1e-3] and after[1e-1] == stamps[1e-1] and after[1e-2] not in stamps.values()
    assert json.loads((tmp_path / "point002" / "seed0" / "config.json").read_text())["recipe"]["lr"] == 1e-1
    assert {r["lr"]: r["mean"] for r in wider.rows}[1e-1] == {r["lr"]: r["mean"] for r in first.rows}[1e-1]
    reordered, now = run([1e-1, 1e-2, 1e-3])  # the two ends swap numbers
    assert reordered.reused == 3 and now == after
    # cut short between setting folders aside and putting them in place: found again by their settings
    (tmp_path / "point000").rename(tmp_path / ".moving-0123")
    shutil.copytree(tmp_path / "point001", tmp_path / ".moving-4567")  # a copy of a point's folder: one is kept
    (tmp_path / ".moving-89ab").mkdir()  # no settings: nothing of this plan, removed
    again, now2 = run([1e-1, 1e-2, 1e-3])
    assert again.reused == 3 and now2 == after and not list(tmp_path.glob(".moving-*"))
    assert sorted(p.name for p in tmp_path.glob("point*")) == ["point000", "point001", "point002"]
    assert run([1e-1, 1e-2, 1e-3], reuse=False)[0].reused == 0
    # another head's sweep is refused before anything is moved or trained (it trained over these points)
    with pytest.raises(ConfigError, match="holds runs of linear on faces, which this sweep of mask on faces"):
        sweep(str(tiny_store), "mask", {"lr": [1e-3, 1e-1]}, tmp_path, base_recipe=base)
    assert sorted(p.name for p in tmp_path.glob("point*")) == ["point000", "point001", "point002"]


def test_protocols_reuse_finished_runs_only_for_the_same_code(tiny_store, tmp_path, monkeypatch):
    """What a pipeline run again does: the cross matrix scores its finished runs as they are, unless fercache's
    own source changed since (a head edited in a checkout keeps its version number)."""
    import fercache.train as T

    def matrix():
        return cross_matrix([str(tiny_store)], ["linear"], tmp_path, recipe={"linear": QUICK}, reuse=True)
    first = matrix()
    head = tmp_path / "runs" / "faces-linear" / "seed0" / "head.pt"
    saved = json.loads((head.parent / "config.json").read_text())["trained_with"]
    from fercache import rundir as D

    assert saved["code_sha256"] == D.code_sha256() and len(saved["code_sha256"]) == 64
    stamp = head.stat().st_mtime_ns
    assert matrix().tables["linear"].cells == first.tables["linear"].cells and head.stat().st_mtime_ns == stamp
    monkeypatch.setattr(T, "code_sha256", lambda: "0" * 64)
    matrix()
    assert head.stat().st_mtime_ns != stamp
    assert json.loads((head.parent / "config.json").read_text())["trained_with"]["code_sha256"] == "0" * 64


def test_a_protocol_or_sweep_run_again_with_fewer_seeds_or_points_leaves_none_of_the_old_ones(tiny_store, tmp_path):
    """Left behind, they were averaged in by `evaluate FOLDER` (every seed run under it) and ranked by the ledger."""
    from fercache.sweeps import sweep

    runs = tmp_path / "cross" / "runs" / "faces-linear"
    cross_matrix([str(tiny_store)], ["linear"], tmp_path / "cross", seeds=(0, 1, 2), recipe={"linear": QUICK})
    assert sorted(d.name for d in runs.iterdir()) == ["seed0", "seed1", "seed2"]
    cross_matrix([str(tiny_store)], ["linear"], tmp_path / "cross", seeds=(2, 0), recipe={"linear": QUICK})
    assert sorted(d.name for d in runs.iterdir()) == ["seed0", "seed2"] and len(evaluate(runs)["runs"]) == 2
    grid, base = {"lr": [1e-3, 1e-2, 1e-1]}, {"batch_size": 8, "epochs": 2}
    sweep(str(tiny_store), "linear", grid, tmp_path / "sweep", base_recipe=base, seeds=(0, 1))
    sweep(str(tiny_store), "linear", {"lr": [1e-3, 1e-2]}, tmp_path / "sweep", base_recipe=base, seeds=(0,))
    assert sorted(str(p.parent.relative_to(tmp_path / "sweep")) for p in (tmp_path / "sweep").rglob("head.pt")) == \
        ["point000/seed0", "point001/seed0"]


def test_an_out_that_is_a_file_is_refused_before_training(tiny_store, tmp_path, monkeypatch):
    """It was an OSError (Not a directory) when saving, after the training."""
    import fercache.train as T

    (tmp_path / "notes").write_text("mine")
    monkeypatch.setattr(T, "_fit_model", lambda *a, **k: pytest.fail("trained before the --out check"))
    for out in (tmp_path / "notes", tmp_path / "notes" / "runs"):
        with pytest.raises(ConfigError, match=rf"^--out {out}: {tmp_path / 'notes'} is a file, not a folder"):
            fit(str(tiny_store), "linear", out_dir=out, recipe=QUICK)
    assert (tmp_path / "notes").read_text() == "mine"


def test_every_folder_output_that_is_a_file_is_refused_before_the_work(tiny_store, tmp_path, monkeypatch):
    """near-dups and au-cv were the OS's one-line 'File exists'; cross and folds named OUT/runs, not the --out given."""
    import fercache.train as T
    from fercache.neighbours import near_duplicates
    from fercache.protocols import au_crossval, manifest_folds
    from fercache.sweeps import sweep

    (tmp_path / "notes").write_text("mine")
    monkeypatch.setattr(T, "_fit_model", lambda *a, **k: pytest.fail("trained before the --out check"))
    out, store = tmp_path / "notes", str(tiny_store)
    calls = {"near-dups.csv and the plots": lambda: near_duplicates(store, out),
             "the AU table and its runs": lambda: au_crossval(store, out),
             "the matrix and its runs": lambda: cross_matrix([store], ["linear"], out),
             "the folds' table and runs": lambda: manifest_folds(store, [tiny_store.parent / "m.csv"], ["linear"], out),
             "the sweep's runs and tables": lambda: sweep(store, "linear", {"lr": [1e-3]}, out)}
    for what, call in calls.items():
        with pytest.raises(ConfigError,
                           match=rf"^--out {out}: {out} is a file, not a folder; pass a folder for {what}$"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"] and out.read_text() == "mine"


def test_features_memo_reads_a_store_once_and_changes_no_result(tiny_store, tmp_path):
    from fercache.data import features_memo, load_features

    assert load_features(str(tiny_store)) is not load_features(str(tiny_store))
    plain = [fit(str(tiny_store), h, out_dir=tmp_path / "plain", recipe=QUICK) for h in ("linear", "mask")]
    with features_memo():
        fs = load_features(str(tiny_store))
        assert load_features(str(tiny_store)) is fs and load_features(str(tiny_store), output="pooled") is not fs
        x = fs.x.copy()
        shared = [fit(str(tiny_store), h, out_dir=tmp_path / "memo", recipe=QUICK) for h in ("linear", "mask")]
        np.testing.assert_array_equal(fs.x, x)  # training never wrote into the shared arrays
    for a, b in zip(plain, shared):
        def drop_time(run):
            return [{k: v for k, v in h.items() if k != "seconds"} for h in run.metrics["history"]]

        assert drop_time(a) == drop_time(b) and a.metrics["val"] == b.metrics["val"]


def test_logreg_is_the_same_for_every_seed(tiny_store, tmp_path):
    a, b = (fit(str(tiny_store), "logreg", out_dir=tmp_path, seed=s) for s in (0, 1))
    sa, sb = (torch.load(r.run_dir / "head.pt")["state_dict"] for r in (a, b))
    for k in sa:  # a convex problem solved from zeros: the seed changes nothing
        torch.testing.assert_close(sa[k], sb[k])
    subset = fit(str(tiny_store), "logreg", out_dir=tmp_path / "s", seed=1, recipe={"shots": 2})
    assert subset.metrics["n_train"] == 8  # ... unless it draws a training subset


class _TwoFaces:
    """MTCNN's detect as it answers for a picture of two faces: the larger first, the surer second (boxes for a
    150 x 100 picture, scaled to the one given)."""

    def detect(self, image):
        w, h = image.size
        boxes = np.array([[10.0, 10.0, 90.0, 90.0], [100.0, 20.0, 140.0, 60.0]]) * [w / 150, h / 100, w / 150, h / 100]
        return boxes, np.array([0.91, 0.999])


def test_the_face_cropped_is_the_most_confident_one_grown_by_the_margin(monkeypatch):
    from fercache import faces

    monkeypatch.setattr(faces, "mtcnn_class", lambda: lambda **kw: _TwoFaces())
    image = np.zeros((100, 150, 3), dtype=np.uint8)
    crop, face = faces.FaceCropper()(image)
    assert face.box == (100, 20, 140, 60) and face.p == 0.999 and crop.shape == (40, 40, 3)  # not the largest
    crop, face = faces.FaceCropper(margin=0.25)(image)
    assert face.box == (90, 10, 150, 70) and crop.shape == (60, 60, 3)  # 10 px more on each side
    with pytest.raises(ConfigError, match="--face-margin -0.1: a fraction"):
        faces.FaceCropper(margin=-0.1)


def test_predict_records_the_crop_of_each_image(tiny_store, tiny_dataset, tmp_path, monkeypatch):
    from fercache import faces
    from fercache.predict import predict, write_predictions

    monkeypatch.setattr(faces, "mtcnn_class", lambda: lambda **kw: _TwoFaces())
    r = fit(str(tiny_store), "linear", out_dir=tmp_path, recipe={"epochs": 1, "batch_size": 8})
    rows = predict(r.run_dir, [tiny_dataset / "faces" / "test" / "sad"], detect=True, face_margin=0.1)
    assert len(rows) == 6 and {(tuple(row["face_box"]), row["face_p"], row["face_margin"]) for row in rows} == {
        ((26, 6, 38, 26), 0.999, 0.1)}  # the surer face (27-37 x 8-24 of a 40 px image), 10% more each side
    header = write_predictions(rows, tmp_path / "p.csv").read_text().splitlines()[0]
    assert header.startswith("path,prediction,face_detected,face_box,face_p,face_margin,error,")
