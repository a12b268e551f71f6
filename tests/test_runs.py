"""The run ledger: grouping seeds, ranking on validation, showing what a sweep varied, flagging stale runs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fercache.errors import ConfigError
from fercache.manifests import read_manifest, write_manifest
from fercache.runs import Status, ledger
from fercache.scoring import evaluate_run
from fercache.train import fit
from tests.test_cli import invoke

QUICK = {"epochs": 4, "batch_size": 16}


@pytest.fixture()
def runs_dir(tiny_store, tiny_manifest, tmp_path):
    """Two settings of linear x 2 seeds, one mask run, on a manifest copy the test may edit; one evaluation."""
    labels = write_manifest(read_manifest(tiny_manifest), tmp_path / "labels.csv")
    root = tmp_path / "runs"
    for lr in (1e-6, 1e-2):
        for seed in (0, 1):
            fit(str(tiny_store), "linear", manifest=labels, out_dir=root, seed=seed, recipe={**QUICK, "lr": lr},
                name=f"linear-lr{lr}/seed{{seed}}")
    m = fit(str(tiny_store), "mask", manifest=labels, out_dir=root, recipe=QUICK, name="mask/seed0")
    evaluate_run(m.run_dir)
    return root, labels


def test_ledger_groups_seeds_ranks_on_val_and_shows_what_varied(runs_dir):
    root, _ = runs_dir
    r = ledger(root)
    (table,) = r.tables.values()
    assert len(r.records) == 5 and r.stale == []
    vals = {}
    for rec in r.records:
        vals.setdefault((rec["head"], rec["recipe"]["lr"]), []).append(rec["val"])
    by_mean = sorted(vals, key=lambda k: -sum(vals[k]) / len(vals[k]))
    assert [(row.head, row.count) for row in table.rows] == [(h, "2" if h == "linear" else "1") for h, _ in by_mean]
    settings = {row.runs: row.settings for row in table.rows}
    assert settings == {"linear-lr1e-06": "lr=1e-06", "linear-lr0.01": "lr=0.01", "mask/seed0": ""}
    mask_row = next(row for row in table.rows if row.head == "mask")
    test_acc = json.loads((root / "mask" / "seed0" / "eval-faces-test" / "metrics.json").read_text())["accuracy"]
    # no "± 0.00"
    assert table.header[5] == "faces test (%)" and mask_row.evals["faces test"] == f"{100 * test_acc:.2f}"
    assert all(row.evals["faces test"] == "" for row in table.rows if row.head == "linear")  # never evaluated: blank


def test_ledger_flags_runs_whose_manifest_changed(runs_dir):
    root, labels = runs_dir
    m = read_manifest(labels)
    next(row for row in m.rows if row["split"] == "train")["split"] = "test"
    write_manifest(m, labels)
    r = ledger(root)
    assert len(r.stale) == 5 and {row.status for row in next(iter(r.tables.values())).rows} == {
        "STALE: manifest changed"}
    res = invoke("runs", root, "--strict", "--csv", root / "ledger.csv")
    assert res.exit_code == 1 and "STALE: manifest changed" in res.output
    with open(root / "ledger.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and rows[0]["table"] == "faces (expr)" and {r["status"] for r in rows} == {"STALE: manifest "
                                                                                                     "changed"}


def test_a_half_saved_run_is_left_out_of_the_ledger_and_named(runs_dir):
    """head.pt without metrics.json (a save killed by an earlier version; a file deleted by hand) was a
    FileNotFoundError traceback that hid every other run."""
    root, _ = runs_dir
    (root / "linear-lr0.01" / "seed1" / "metrics.json").unlink()
    (root / "mask" / "seed0" / "config.json").write_text("{")
    r = ledger(root)
    assert len(r.records) == 3 and r.stale == []
    assert r.incomplete == [f"{root}/linear-lr0.01/seed1 (no metrics.json)",
                               f"{root}/mask/seed0 (JSONDecodeError: Expecting property name enclosed in double "
                               "quotes: line 1 column 2 (char 1))"]
    res = invoke("runs", root, "--strict")
    assert (res.exit_code == 1 and "2 folder(s) hold head.pt but not a whole run, left out (retrain "
                                   "them): " in res.output)
    assert "| linear | lr=0.01 | 1 |" in res.output  # the other seed of that setting is still there
    with pytest.raises(ConfigError, match=r"no complete run under \S+/mask: \S+/mask/seed0 \(JSONDecodeError"):
        ledger(root / "mask")


def test_ledger_pools_the_folds_of_a_protocol_like_seeds(tiny_store, tiny_manifest, tmp_path):
    from fercache.protocols import manifest_folds

    m = read_manifest(tiny_manifest)
    folds = []
    for k in (1, 2):  # two "official folds": the same rows, a different half of train moved to val each time
        rows = [dict(r, split="val" if r["split"] == "train" and i % 2 == k - 1 else r["split"]) for i,
                r in enumerate(m.rows)]
        folds.append(write_manifest(type(m)(rows=rows, source=f"fold{k}"), tmp_path / f"fold{k}.csv"))
    manifest_folds(str(tiny_store), folds, ["linear"], tmp_path / "folds", seeds=(0, 1), recipe={"linear": QUICK})
    r = ledger(tmp_path / "folds")
    (table,) = r.tables.values()
    assert len(r.records) == 4 and {rec["fold"] for rec in r.records} == {1, 2}
    (row,) = table.rows  # one setting: 2 seeds x 2 folds in one row, not four ranked against each other
    assert row.count == "2 x 2" and row.runs == "runs/linear"
    vals = [rec["val"] for rec in r.records]
    assert row.val == f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals):.2f}"


def test_ledger_of_an_empty_folder_says_so(tmp_path):
    with pytest.raises(ConfigError, match=r"no trained run \(head.pt\) under \S+$"):
        ledger(tmp_path)
    (tmp_path / "quickstart").mkdir()
    with pytest.raises(ConfigError, match=r"under \S+/quikstart \(did you mean '\S+/quickstart'\?\)$"):
        ledger(tmp_path / "quikstart")


def test_a_moved_store_is_reported_missing_not_stale_and_evaluate_says_how_to_score_it(tiny_store, tmp_path):
    """Moving a store is not a reason to retrain: the ledger says MISSING and evaluate names --store."""
    import shutil

    from fercache.errors import StoreError
    from fercache.scoring import evaluate
    from fercache.train import fit

    store = tmp_path / "faces.zarr"
    shutil.copytree(tiny_store, store)
    run = fit(str(store), "linear", out_dir=tmp_path / "runs", recipe=QUICK).run_dir
    assert ledger(tmp_path / "runs").records[0]["status"].status is Status.OK
    store.rename(tmp_path / "moved.zarr")
    r = ledger(tmp_path / "runs")
    assert str(r.records[0]["status"]) == "MISSING: store" and r.stale == [] and r.unchecked == [str(run)]
    res = invoke("runs", tmp_path / "runs", "--strict")
    assert res.exit_code == 1 and "could not be checked" in res.output and "STALE" not in res.output
    with pytest.raises(StoreError, match="which is gone .*--store NEW_LOCATION"):
        evaluate(run)
    assert evaluate(run, str(tmp_path / "moved.zarr"))["runs"][0]["n"] == 24


def test_runs_record_their_data_so_any_working_directory_and_any_spelling_finds_it(tiny_store, tiny_manifest,
                                                                                  tmp_path, monkeypatch):
    """A run trained on `faces.zarr` from one folder is checked and scored from another, and `./faces.zarr/` is
    the same store: staleness is checked and the run's own manifest is used, not the store's."""
    import shutil

    from fercache.errors import StaleRunError

    shutil.copytree(tiny_store, tmp_path / "faces.zarr")
    write_manifest(read_manifest(tiny_manifest), tmp_path / "labels.csv")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    run = fit("faces.zarr", "linear", manifest="labels.csv", out_dir="runs", recipe=QUICK).run_dir
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["store"], cfg["manifest"]) == (str(tmp_path / "faces.zarr"), str(tmp_path / "labels.csv"))
    fit("./faces.zarr/", "linear", manifest="./labels.csv", out_dir="runs", recipe=QUICK, overwrite=False)  # same run

    monkeypatch.chdir(tmp_path / "elsewhere")
    assert ledger(tmp_path / "runs").records[0]["status"].status is Status.OK
    assert evaluate_run(tmp_path / "runs" / run.relative_to("runs"))["n"] == 24
    m = read_manifest(tmp_path / "labels.csv")
    next(row for row in m.rows if row["split"] == "train")["split"] = "test"
    write_manifest(m, tmp_path / "labels.csv")
    with pytest.raises(StaleRunError, match="labels.csv changed since it was trained"):
        evaluate_run(tmp_path / "runs" / run.relative_to("runs"), store="../faces.zarr/")


def test_runs_export_to_mlflow_and_tensorboard_read_back_with_their_own_readers(runs_dir, tmp_path, monkeypatch):
    """Every run of the ledger in MLflow (a file store, read back with MLflow's client) and in TensorBoard event
    files (read back with TensorBoard's EventAccumulator); a second export leaves them as they are."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = runs_dir
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store for those who ask
    uri = (tmp_path / "mlruns").as_uri()
    r = invoke("runs", root, "--to", "mlflow", uri)
    assert r.exit_code == 0 and "5 run(s) exported" in r.output, r.output
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(root.name)
    runs = {x.data.tags["fercache.run"]: x for x in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"linear-lr1e-06/seed0", "linear-lr1e-06/seed1", "linear-lr0.01/seed0",
                         "linear-lr0.01/seed1", "mask/seed0"}
    mask = runs["mask/seed0"]
    saved = json.loads((root / "mask" / "seed0" / "metrics.json").read_text())
    assert mask.data.params["head"] == "mask" and mask.data.params["recipe.epochs"] == str(QUICK["epochs"])
    assert mask.data.metrics["val/accuracy"] == pytest.approx(saved["val"]["accuracy"])
    test_acc = json.loads((root / "mask/seed0/eval-faces-test/metrics.json").read_text())["accuracy"]
    assert mask.data.metrics["faces-test/accuracy"] == pytest.approx(test_acc)
    history = client.get_metric_history(mask.info.run_id, "train/loss")
    assert [m.step for m in history] == [h["epoch"] for h in saved["history"]]
    assert {a.path for a in client.list_artifacts(mask.info.run_id)} >= {"training.png", "config.json",
                                                                         "metrics.json", "eval-faces-test"}
    again = invoke("runs", root, "--to", "mlflow", uri)
    assert "0 run(s) exported, 5 exported before" in again.output and len(client.search_runs([exp.experiment_id])) == 5

    logdir = tmp_path / "tb"
    assert invoke("runs", root, "--to", "tensorboard", logdir).exit_code == 0
    events = EventAccumulator(str(logdir / "mask" / "seed0"), size_guidance={"images": 0, "scalars": 0}).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([h["loss"] for h in saved["history"]], rel=1e-6)
    assert events.Scalars("val/accuracy")[0].value == pytest.approx(saved["val"]["accuracy"], rel=1e-6)
    assert "training" in events.Tags()["images"]
    r = invoke("runs", root, "--to", "wandb", "x")
    assert r.exit_code == 2 and "--to wandb: one of mlflow, tensorboard" in " ".join(r.output.split())
