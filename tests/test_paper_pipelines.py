"""The papers' pipelines (pipelines/cafe.toml, abaw.toml, dfer_clip.toml) checked and run end to end on miniature
copies of their datasets in the native layouts, with a tiny random-init open_clip model standing in for the named
CLIP (FERCACHE_ENCODER / FERCACHE_PRETRAINED), on CPU, short schedules: every step, every table, and the published
numbers beside fercache's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fercache.errors import ConfigError
from fercache.pipeline import check_pipeline, load_pipeline, run_pipeline

from . import miniature

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("papers-data")
    for name in ("rafdb", "ferplus", "affectnet", "sfew", "mma", "affwild2", "dfew", "ferv39k", "mafw"):
        getattr(miniature, name)(root / name)
    return root


@pytest.fixture
def smoke(monkeypatch, data, tiny_clip77, tmp_path):
    """The variables a user sets for their data, and the stand-ins: the tiny CLIP, CPU, one seed, two epochs."""
    env = {name: str(data / name) for name in ("rafdb", "ferplus", "affectnet", "sfew", "mma", "affwild2", "dfew",
                                                "ferv39k", "mafw")}
    env |= {"encoder": f"open_clip:{tiny_clip77[0]}", "pretrained": "none", "device": "cpu", "size": "32",
            "precision": "fp32", "seeds": "0", "epochs": "2", "mask_epochs": "2", "linear_epochs": "2",
            "out": str(tmp_path / "out")}
    for k, v in env.items():
        monkeypatch.setenv(f"FERCACHE_{k.upper()}", v)
    return tmp_path / "out"


@pytest.mark.parametrize("name", ["cafe", "abaw", "dfer_clip"])
def test_each_paper_pipeline_names_its_published_setup(name, monkeypatch):
    """What the pipeline runs without overrides: the paper's encoder, preprocessing, seeds and schedule."""
    monkeypatch.setenv("FERCACHE_DEVICE", "cpu")
    steps = load_pipeline(PIPELINES / f"{name}.toml")
    extract = [s for s in steps if s["run"] == "extract"]
    encoder = {"cafe": "open_clip:ViT-B-32", "abaw": "open_clip:ViT-L-14", "dfer_clip": "open_clip:ViT-B-32"}[name]
    assert all(s["encoder"] == encoder and s["pretrained"] == "openai" and s["device"] == "cpu" for s in extract)
    protocols = [s for s in steps if s["run"] in ("cross", "folds")]
    assert protocols and all(s["published"] == {"cafe": "cafe", "abaw": "abaw", "dfer_clip": "dfer_clip"}[name]
                             for s in protocols)
    if name == "cafe":
        assert {s["normalize"] for s in extract} == {"imagenet"} and {s["image_size"] for s in extract} == {224}
        (cross,) = protocols
        assert cross["seeds"] == [3407, 3408, 3409] and cross["heads"] == ["mask", "mask@none", "linear", "zeroshot"]
        assert len(cross["stores"]) == 5 and cross["recipe"]["mask"]["epochs"] == 60
        assert next(s for s in steps if s["name"] == "manifest-affectnet")["options"] == {"classes": 7}
    if name == "abaw":
        assert {s["precision"] for s in extract} == {"fp16"}
        expression = next(s for s in protocols if s["name"] == "expression")
        assert expression["recipe"]["cvar_mlp"]["select"] == "macro_f1" and expression["metric"][0] == "macro_f1"
        assert next(s for s in protocols if s["name"] == "au")["hp"]["au@auc"]["auc_weight"] == 0.2
    if name == "dfer_clip":
        assert [len(s["manifests"]) for s in protocols] == [5, 1, 5]
        assert all(s["seeds"] == [0, 1, 2] and s["recipe"]["temporal"]["epochs"] == 50 for s in protocols)


@pytest.mark.parametrize("name", ["cafe", "abaw", "dfer_clip"])
def test_check_passes_on_cpu_with_the_data_in_place_and_names_missing_data(name, smoke, monkeypatch):
    assert check_pipeline(PIPELINES / f"{name}.toml") > 3
    missing = {"cafe": "RAFDB", "abaw": "AFFWILD2", "dfer_clip": "DFEW"}[name]
    monkeypatch.setenv(f"FERCACHE_{missing}", "/nonexistent/dataset")
    with pytest.raises(ConfigError, match=rf"step 1 .*src /nonexistent/dataset does not exist, .* \(from \[vars\] "
                                          rf"{missing.lower()}: set FERCACHE_{missing}=PATH"):
        check_pipeline(PIPELINES / f"{name}.toml")


def test_cafe_runs_end_to_end_with_its_published_column(smoke):
    run_pipeline(PIPELINES / "cafe.toml", progress=False)
    cross = smoke / "cross"
    for key in ("mask", "mask@none", "linear", "zeroshot", "mask-macro_f1"):
        cells = json.loads((cross / f"cross-{key}.json").read_text())
        assert len(cells) == 25 and all(0 <= c["mean"] <= 100 for c in cells.values())
    published = json.loads((cross / "cross-published.json").read_text())
    # CAFE publishes the rows of RAF-DB, FERPlus and AffectNet: 15 cells, for mask and its variant mask@none
    assert {(r["label"], r["cell"]) for r in published["rows"]} == {
        (h, f"{a} -> {b}") for h in ("mask", "mask@none") for a in ("rafdb", "ferplus", "affectnet")
        for b in ("rafdb", "ferplus", "affectnet", "sfew", "mma")}
    row = next(r for r in published["rows"] if r["label"] == "mask" and r["cell"] == "rafdb -> sfew")
    assert row["published"] == 52.86 and row["fercache"] == pytest.approx(
        json.loads((cross / "cross-mask.json").read_text())["rafdb -> sfew"]["mean"])
    manifest = (smoke / "manifests" / "affectnet.csv").read_text()
    assert "contempt" not in manifest and "test" in (smoke / "manifests" / "sfew.csv").read_text()


def test_abaw_runs_end_to_end_with_its_published_row(smoke):
    run_pipeline(PIPELINES / "abaw.toml", progress=False)
    expression = json.loads((smoke / "expression" / "cross-cvar_mlp.json").read_text())
    assert list(expression) == ["affwild2-expr -> affwild2-expr"]
    run = json.loads((smoke / "expression" / "runs" / "affwild2-expr-cvar_mlp" / "seed0" / "metrics.json")
                     .read_text())
    assert run["selection"]["metric"] == "macro_f1"  # the task's metric chooses the epoch, not accuracy
    md = (smoke / "expression" / "cross-published.md").read_text()
    assert "+11 points expression macro-F1" in md
    for key in ("au", "au@auc", "au-macro_f1_at_0.5"):
        cells = json.loads((smoke / "au" / f"cross-{key}.json").read_text())
        assert list(cells) == ["affwild2-au -> affwild2-au"] and 0 <= cells["affwild2-au -> affwild2-au"]["mean"]
    cfg = json.loads((smoke / "au" / "runs" / "affwild2-au-au@auc" / "seed0" / "config.json").read_text())
    assert cfg["hp"]["auc_weight"] == 0.2 and len(cfg["classes"]) == 12


def test_dfer_clip_runs_end_to_end_with_its_published_rows_and_ablations(smoke):
    run_pipeline(PIPELINES / "dfer_clip.toml", progress=False)
    for dataset, folds in (("dfew", 5), ("ferv39k", 1), ("mafw", 5)):
        out = smoke / f"folds-{dataset}"
        results = json.loads((out / "folds.json").read_text())
        assert list(results) == ["temporal", "temporal@handwritten", "temporal@mean-linear", "temporal@zeroshot"]
        assert all(len(runs) == folds for runs in results.values())
        rows = json.loads((out / "folds-published.json").read_text())["rows"]
        assert len(rows) == 8 and {r["metric"] for r in rows} == {"UAR", "WAR"}
        assert rows[0]["published"] == {"dfew": 59.61, "ferv39k": 41.27, "mafw": 39.89}[dataset]
        zeroshot = json.loads((out / "runs" / "temporal@zeroshot" / "fold1" / "seed0" / "metrics.json").read_text())
        assert zeroshot["history"] == []  # nothing trained
    sweep = json.loads((smoke / "ablations-dfew" / "sweep.json").read_text())
    points = {(p["layers"], p["position"], p["shared_ctx"]) for p in sweep}
    assert len(points) == 12 and all(len(p["runs"]) == 1 for p in sweep)
    cfg = json.loads((Path(sweep[-1]["runs"][0]) / "config.json").read_text())
    assert {k: cfg["hp"][k] for k in ("layers", "position", "shared_ctx")} == {k: sweep[-1][k] for k in
                                                                               ("layers", "position", "shared_ctx")}
