"""CUDA paths (run on the lent GPU machine with `pytest -m gpu`; skipped elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fercache import store as S
from fercache.heads import HEADS

from .test_extract import min_cosine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_device_preprocessing_matches_cpu():
    from fercache.preprocess import Preprocess, to_model_input

    imgs = torch.randint(0, 256, (8, 48, 48, 3), dtype=torch.uint8)
    spec = Preprocess(size=224)
    cpu = to_model_input(imgs, spec)
    gpu = to_model_input(imgs.pin_memory(), spec, device="cuda").cpu()
    assert (cpu - gpu).abs().max().item() < 0.02


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "bf16-weights"])
def test_cuda_extract_matches_cpu(tiny_store, tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path, precision):
    from fercache.extract import extract

    r = extract(tiny_manifest, tiny_encoder_spec, tmp_path / "g.zarr", root=tiny_dataset, device="cuda", chunk_rows=16,
                batch_size=8, workers=2, precision=precision, progress=False)
    assert r.n_ok == 72
    assert min_cosine(tiny_store, tmp_path / "g.zarr") > (0.999 if precision == "fp32" else 0.99)


@pytest.mark.parametrize("head", sorted(n for n, s in HEADS.items() if s.task == "expr" and s.level == "frame"))
def test_heads_train_on_cuda(tiny_store, tmp_path, head):
    from fercache.scoring import evaluate_run
    from fercache.train import fit

    r = fit(str(tiny_store), head, out_dir=tmp_path, device="cuda", recipe={"epochs": 3, "batch_size": 16},
            hp={"hidden": 16} if head == "cvar_mlp" else None)
    assert evaluate_run(r.run_dir, device="cuda")["n"] == 24


def test_bench_extract_on_cuda(tiny_manifest, tiny_dataset, tiny_encoder_spec):
    from fercache.bench import bench_extract

    r = bench_extract(tiny_manifest, tiny_encoder_spec, root=tiny_dataset, device="cuda", batch_size=16, workers=2,
                      model_seconds=1.0)
    assert r["a_model_only_img_s"] > 0 and r["f_peak_device_mib"] > 0 and r["f_baseline_peak_device_mib"] > 0


@pytest.mark.parametrize("classifier", ["prompts", "linear"])
def test_temporal_head_on_cuda(video_store, tmp_path, classifier):
    """Clip batches, segment sampling and the prompt path through the (lazily moved) text tower, all on CUDA."""
    from fercache.predict import predict
    from fercache.scoring import evaluate_run
    from fercache.train import fit

    store, root = video_store
    r = fit(store, "temporal", out_dir=tmp_path, device="cuda", recipe={"epochs": 3},
            hp={"classifier": classifier, "width": 32, "heads": 4, "mlp": 64})
    res = evaluate_run(r.run_dir, device="cuda")
    assert res["n"] == 12 and res["accuracy"] >= 0
    out = predict(r.run_dir, [root / "clips" / "test_happy_0"], device="cuda")
    assert abs(sum(out[0]["probabilities"].values()) - 1) < 1e-4


def test_cuda_views_and_sharded_pieces_match_cpu(tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path):
    """The views (the random ones drawn per row on the device too) and sharded pieces through the async
    device-to-host path equal the CPU store."""
    from fercache.extract import extract

    kw = dict(root=tiny_dataset, chunk_rows=32, read_chunk_rows=8, batch_size=8, views=["flip", "erase", "noise"],
              progress=False)
    extract(tiny_manifest, tiny_encoder_spec, tmp_path / "c.zarr", device="cpu", workers=0, **kw)
    extract(tiny_manifest, tiny_encoder_spec, tmp_path / "g.zarr", device="cuda", workers=2, precision="fp32", **kw)
    for out in ("embedding", "embedding.flip", "embedding.erase", "embedding.noise"):
        a, b = S.open_store(tmp_path / "c.zarr").features(out), S.open_store(tmp_path / "g.zarr").features(out)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 0.999, out


@pytest.mark.parametrize("head", ["linear", "mask", "cvar_mlp"])
def test_stacks_train_on_cuda_as_runs_alone_do(tiny_store, tmp_path, head):
    """Stacked on the GPU against one run at a time on the GPU (each run's noise from that device's generator):
    the same selection, and weights close (cvar_mlp: the same files and a finite, selected run; see
    tests/test_stacked.py for why its float32 weights drift)."""
    from fercache.train import Point, fit_many

    pts = [Point(s, {}, {"epochs": 3, "lr": lr}, f"p{i}/seed{{seed}}") for i, (s, lr) in
           enumerate([(0, 1e-3), (0, 1e-2), (1, 1e-3), (2, 1e-3)])]
    alone = fit_many(str(tiny_store), head, pts, out_dir=tmp_path / "alone", device="cuda", max_batch_configs=1)
    together = fit_many(str(tiny_store), head, pts, out_dir=tmp_path / "stacked", device="cuda")
    for a, b in zip(alone, together):
        assert sorted(p.name for p in a.run_dir.iterdir()) == sorted(p.name for p in b.run_dir.iterdir())
        assert np.isfinite(b.metrics["val"]["accuracy"]) and b.metrics["selection"]["best_epoch"] >= 1
        if head != "cvar_mlp":
            assert a.metrics["selection"] == b.metrics["selection"]
            sa, sb = (torch.load(r.run_dir / "head.pt", weights_only=True)["state_dict"] for r in (a, b))
            for k in sa:
                torch.testing.assert_close(sb[k], sa[k], atol=1e-4, rtol=1e-3)
