"""What the paper protocols add to the protocols: the published numbers beside fercache's, a mask source per
store in the cross matrix, and backbones as an axis."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

from fercache.backbones import backbones
from fercache.errors import ConfigError, StoreError
from fercache.manifests import read_manifest, write_manifest
from fercache.protocols import cross_matrix
from fercache.published import paper, papers

QUICK = {"epochs": 3, "batch_size": 16}


def _dataset(tiny_manifest, tmp_path, name: str):
    """The tiny images as another dataset: own sample ids, so its store is its own."""
    m = read_manifest(tiny_manifest)
    rows = [dict(r, sample_id=f"{name}/{r['sample_id']}") for r in m.rows]
    return write_manifest(type(m)(rows=rows, source=name), tmp_path / f"{name}.csv")


@pytest.fixture(scope="module")
def two_datasets(tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path_factory):
    """rafdb and sfew (the same tiny images under other ids) from the tiny ViT, and each one's mask source from a
    second encoder (null:), in vit/ and null/."""
    from fercache.extract import extract

    tmp = tmp_path_factory.mktemp("papers")
    stores = {}
    for name in ("rafdb", "sfew"):
        m = _dataset(tiny_manifest, tmp, name)
        for encoder, kw in (("vit", {"chunk_rows": 16}), ("null", {"image_size": 16})):
            spec = tiny_encoder_spec if encoder == "vit" else "null:"
            out = tmp / encoder / f"{name}.zarr"
            extract(m, spec, out, root=tiny_dataset, workers=0, progress=False, **kw)
            stores[encoder, name] = str(out)
    return stores


def test_every_paper_entry_is_complete_and_its_numbers_are_the_published_ones():
    known = papers()
    assert set(known) == {"cafe", "dfer_clip", "abaw"}
    assert known["cafe"].cross["rafdb -> rafdb"] == 88.72 and known["cafe"].cross["affectnet -> mma"] == 49.65
    assert len(known["cafe"].cross) == 15  # 3 training sets x 5 test sets
    assert known["dfer_clip"].folds["dfew"] == {"uar": 59.61, "war": 71.25}
    assert all(p.source and p.differs and p.heads and p.metrics for p in known.values())
    with pytest.raises(ConfigError, match=r"published='cafx' \(did you mean 'cafe'\?\)"):
        paper("cafx")


def test_cross_matrix_sets_the_published_numbers_beside_its_own(two_datasets, tmp_path):
    stores = [two_datasets["vit", "rafdb"], two_datasets["vit", "sfew"]]
    r = cross_matrix(stores, ["linear", "mask", "mask@none"], tmp_path / "c", seeds=(0, 1),
                     hp={"mask@none": {"use_sigmoid": False}}, recipe={h: QUICK for h in ("linear", "mask",
                                                                                         "mask@none")},
                     published="cafe")
    rows = r.published.rows
    # CAFE publishes rafdb -> rafdb and rafdb -> sfew; sfew as a training set has no published row
    assert {(x["label"], x["cell"]) for x in rows} == {(h, c) for h in ("mask", "mask@none")
                                                        for c in ("rafdb -> rafdb", "rafdb -> sfew")}
    for x in rows:
        assert x["fercache"] == pytest.approx(r.tables[x["label"]].cells[x["cell"]]["mean"])
        assert x["published"] == {"rafdb -> rafdb": 88.72, "rafdb -> sfew": 52.86}[x["cell"]]
        assert x["difference"] == pytest.approx(x["fercache"] - x["published"])
        assert "by design: mask from an MLP" in x["note"]
        assert x["note"].startswith("variant 'mask@none'") == (x["label"] == "mask@none")
    md = (tmp_path / "c" / "cross-published.md").read_text()
    assert "| mask | rafdb -> sfew | accuracy |" in md and "52.86" in md and md in r.markdown
    assert (tmp_path / "c" / "cross-published.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "c" / "cross-published.json").read_text())
    assert saved["paper"] == "cafe" and len(saved["rows"]) == 4


def test_a_paper_that_compares_none_of_the_heads_or_metrics_is_refused_before_training(two_datasets, tmp_path):
    stores = [two_datasets["vit", "rafdb"]]
    with pytest.raises(ConfigError, match=r"compares head 'mask' \(and its variants\), which none of the heads"):
        cross_matrix(stores, ["linear"], tmp_path / "c", published="cafe")
    with pytest.raises(ConfigError, match="its numbers are accuracy; report 'accuracy' too"):
        cross_matrix(stores, ["mask"], tmp_path / "c", published="cafe", metric="uar")
    assert not (tmp_path / "c").exists()


def test_cross_matrix_reads_each_stores_own_mask_source(two_datasets, tmp_path):
    """CAFE's second network across datasets: trained on rafdb with rafdb's second-encoder features, tested on
    sfew with sfew's; the cell is the accuracy of the run's logits on those joined features (recomputed here)."""
    from fercache.data import load_features
    from fercache.rundir import load_run

    stores = [two_datasets["vit", "rafdb"], two_datasets["vit", "sfew"]]
    sources = {"mask@two": {"rafdb": two_datasets["null", "rafdb"], "sfew": two_datasets["null", "sfew"]}}
    r = cross_matrix(stores, ["mask", "mask@two"], tmp_path / "c", recipe={"mask": QUICK, "mask@two": QUICK},
                     mask_source=sources)
    run = tmp_path / "c" / "runs" / "rafdb-mask@two" / "seed0"
    model, cfg, _ = load_run(run)
    assert cfg.mask_source == two_datasets["null", "rafdb"] and model.mask_net[0].in_features == 3
    assert load_run(tmp_path / "c" / "runs" / "rafdb-mask" / "seed0")[1].mask_source is None
    fs = load_features(stores[1], None, cfg.output, two_datasets["null", "sfew"]).rows("test")
    model.eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(fs.x), torch.as_tensor(fs.z)).argmax(1).numpy()
    truth = [cfg.classes.index(label) for label in fs.label]
    want = 100 * accuracy_score(truth, pred)
    assert r.tables["mask@two"].cells["rafdb -> sfew"]["mean"] == pytest.approx(want)


def test_a_mask_source_missing_for_a_store_is_refused_before_training(two_datasets, tmp_path):
    from fercache.scoring import evaluate_run
    from fercache.train import fit

    stores = [two_datasets["vit", "rafdb"], two_datasets["vit", "sfew"]]
    with pytest.raises(ConfigError, match=r"mask_source.mask gives no mask source for sfew"):
        cross_matrix(stores, ["mask"], tmp_path / "c", mask_source={"mask": {"rafdb": two_datasets["null", "rafdb"]}})
    with pytest.raises(ConfigError, match=r"mask_source has entries for 'maks'"):
        cross_matrix(stores, ["mask"], tmp_path / "c", mask_source={"maks": {}})
    assert not (tmp_path / "c").exists()
    from fercache.pipeline import check_pipeline

    p = tmp_path / "p.toml"  # a pipeline says so before its first step
    p.write_text(f'[[step]]\nrun = "cross"\nstores = ["{stores[0]}", "{stores[1]}"]\nheads = ["mask"]\n'
                 f'mask_source = {{ mask = {{ rafdb = "{two_datasets["null", "rafdb"]}" }} }}\nout = "{tmp_path}/c"\n')
    with pytest.raises(ConfigError, match=r"step 1 \(cross\): mask_source.mask gives no mask source for sfew"):
        check_pipeline(p)
    run = fit(stores[0], "mask", mask_source=two_datasets["null", "rafdb"], out_dir=tmp_path, recipe=QUICK).run_dir
    with pytest.raises(ConfigError, match="give that store's mask source"):
        evaluate_run(run, stores[1])
    with pytest.raises(StoreError, match="extracted differently"):  # the mask MLP reads the null encoder's features
        evaluate_run(run, stores[1], mask_source=two_datasets["vit", "sfew"])


def test_backbones_tabulate_each_encoders_matrix_by_dataset(two_datasets, tmp_path):
    stores = {"vit": [two_datasets["vit", "rafdb"], two_datasets["vit", "sfew"]],
              "null": [two_datasets["null", "sfew"], two_datasets["null", "rafdb"]]}  # order does not matter
    r = backbones(stores, ["linear"], tmp_path / "b", seeds=(0, 1), recipe={"linear": QUICK})
    inside, unseen = r.tables["linear"], r.tables["linear-unseen"]
    for b in stores:
        cells = r.matrices[b].tables["linear"].cells
        for d, other in (("rafdb", "sfew"), ("sfew", "rafdb")):
            assert inside.cells[b][d]["mean"] == pytest.approx(cells[f"{d} -> {d}"]["mean"])
            assert unseen.cells[b][d]["mean"] == pytest.approx(cells[f"{d} -> {other}"]["mean"])
            assert inside.cells[b][d]["seeds"] == pytest.approx(cells[f"{d} -> {d}"]["seeds"])
    assert (tmp_path / "b" / "vit" / "cross-linear.md").exists() and (tmp_path / "b" / "null" / "cross-linear.md")
    md = (tmp_path / "b" / "backbones-linear.md").read_text()
    assert md.splitlines()[2].startswith("| backbone \\ dataset | rafdb | sfew | mean |")
    assert (tmp_path / "b" / "backbones-linear.png").stat().st_size > 1000
    csv = (tmp_path / "b" / "backbones-linear-unseen.csv").read_text().splitlines()
    assert csv[0] == "backbone,rafdb_mean,sfew_mean,rafdb_std,sfew_std" and len(csv) == 3
    assert np.isclose(float(csv[1].split(",")[1]), unseen.cells["vit"]["rafdb"]["mean"], atol=0.006)


def test_backbones_with_other_datasets_or_one_backbone_are_refused_before_training(two_datasets, tmp_path):
    with pytest.raises(ConfigError, match="every backbone needs the same datasets"):
        backbones({"vit": [two_datasets["vit", "rafdb"]], "null": [two_datasets["null", "sfew"]]}, ["linear"],
                  tmp_path / "b")
    with pytest.raises(ConfigError, match="give two encoders' stores or more, got 1"):
        backbones({"vit": [two_datasets["vit", "rafdb"]]}, ["linear"], tmp_path / "b")
    from fercache.pipeline import check_pipeline

    p = tmp_path / "p.toml"  # the pipeline step says so in --check
    vit, null = two_datasets["vit", "rafdb"], two_datasets["null", "sfew"]
    p.write_text(f'[[step]]\nrun = "backbones"\nheads = ["linear"]\nout = "{tmp_path}/b"\n'
                 f'stores = {{ vit = ["{vit}"], null = ["{null}"] }}\n')
    with pytest.raises(ConfigError, match=r"step 1 \(backbones\): backbone 'null' has stores sfew, another rafdb"):
        check_pipeline(p)
    p.write_text(f'[[step]]\nrun = "backbones"\nheads = ["linear"]\nout = "{tmp_path}/b"\nstores = ["{vit}"]\n')
    with pytest.raises(ConfigError, match=r"stores is a table \{ BACKBONE = \[STORE, ...\] \}"):
        check_pipeline(p)
    assert not (tmp_path / "b").exists()


def test_folds_set_the_published_uar_and_war_beside_their_own(video_store, tmp_path):
    """A store named after its dataset (dfew) compares with DFER-CLIP's DFEW numbers; the temporal variants'
    rows say they are variants, the linear head is no published head and gets no row."""
    import shutil

    from fercache.protocols import manifest_folds

    store, root = video_store
    dfew = tmp_path / "dfew.zarr"
    shutil.copytree(store, dfew)
    manifest = str(root / "clips.csv")
    hp = {"temporal@mean": {"pool": "mean", "classifier": "linear"}}
    recipe = {"temporal@mean": {"epochs": 2}, "temporal": {"epochs": 2}}
    t = manifest_folds(str(dfew), [manifest], ["temporal", "temporal@mean"], tmp_path / "f", hp=hp,
                       recipe=recipe, published="dfer_clip")
    rows = t["published"].rows
    assert [(x["label"], x["metric"]) for x in rows] == [("temporal", "UAR"), ("temporal", "WAR"),
                                                          ("temporal@mean", "UAR"), ("temporal@mean", "WAR")]
    res = t["results"]["temporal"]
    assert rows[0]["fercache"] == pytest.approx(100 * np.mean([x["uar"] for x in res]))
    assert rows[1]["fercache"] == pytest.approx(100 * np.mean([x["accuracy"] for x in res]))
    assert [x["published"] for x in rows[:2]] == [59.61, 71.25]
    assert "fine-tunes it at lr 1e-5" in rows[0]["note"] and "Beside the published numbers" in t["markdown"]
    with pytest.raises(ConfigError, match="has UAR/WAR for stores named dfew, ferv39k, mafw; this store is 'clips'"):
        manifest_folds(store, [manifest], ["temporal"], tmp_path / "g", published="dfer_clip")
