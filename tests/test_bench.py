"""The benchmarks run on CPU and report every figure they promise (values are measured, so only their
consistency is asserted here: timings belong to the benchmark's output, never to a test)."""

from __future__ import annotations

import math
import re
import resource
import time

import numpy as np
import torch

from fercache.bench import PeakMemory, bench_extract, bench_head, verdict
from tests.test_cli import invoke


def test_bench_extract_reports_a_to_f_on_a_subset(tiny_manifest, tiny_dataset, tiny_encoder_spec):
    r = bench_extract(tiny_manifest, tiny_encoder_spec, root=tiny_dataset, batch_size=16, workers=1, n_images=40,
                      model_seconds=0.3)
    assert r["images"] == 40 and r["workers"] == 1 and r["dtype"] == "float32" and r["device"].startswith("CPU")
    # speed does not depend on weights: an open_clip model runs at random init unless named
    assert r["weights"] == "none"
    for key in ("a_model_only_img_s", "b_end_to_end_img_s", "d_baseline_img_s", "e_null_total_img_s",
                "e_null_1_worker_img_s", "e_worker_capacity_img_s"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert r["c_ratio_b_over_a"] == r["b_end_to_end_img_s"] / r["a_model_only_img_s"]
    assert r["ratio_b_over_d"] == r["b_end_to_end_img_s"] / r["d_baseline_img_s"]
    assert r["f_peak_host_rss_mib"] > 100 and r["f_peak_device_mib"] is None
    assert r["f_baseline_peak_host_rss_mib"] > 100 and r["f_baseline_peak_device_mib"] is None


def test_bench_extract_measures_bf16_weights_in_every_path(tiny_manifest, tiny_dataset, tiny_encoder_spec):
    """(a), (b) and (d) all run the bf16 weights: the baseline's PIL transforms give fp32 images, which bf16 weights
    refuse unless cast."""
    r = bench_extract(tiny_manifest, tiny_encoder_spec, root=tiny_dataset, batch_size=16, workers=0, n_images=24,
                      model_seconds=0.2, precision="bf16-weights")
    assert r["precision"] == "bf16-weights" and r["dtype"] == "bfloat16"
    assert all(r[k] > 0 for k in ("a_model_only_img_s", "b_end_to_end_img_s", "d_baseline_img_s"))


def _figures(a, b, d, cap, workers=14, rss=2307.5):
    return {"a_model_only_img_s": a, "b_end_to_end_img_s": b, "ratio_b_over_d": b / d, "e_null_total_img_s": cap,
            "workers": workers, "f_peak_host_rss_mib": rss}


def test_verdict_says_how_close_extraction_comes_and_what_holds_it_back():
    h200 = verdict(_figures(7241.36, 6792.91, 4488.53, 69321.60))  # the H200 run of 2026-11-30
    assert h200 == ("end-to-end extract runs at 94% of the model alone and 1.51x the PIL + DataLoader baseline; "
                    "the input pipeline alone does 69,322 img/s, 9.6x what the model needs. "
                    "Peak host RSS 2,308 MiB while extracting.")
    starved = verdict(_figures(10000, 3000, 2000, 3200, workers=2))
    assert "at 30% of the model" in starved
    assert "the input pipeline is the bottleneck: alone it does 3,200 img/s against the model's 10,000 (with 2 " \
           "workers): more --workers" in starved
    stalled = verdict(_figures(10000, 6000, 2000, 50000))
    assert "at 60% of the model" in stalled and "50,000 img/s, so what holds extraction back is elsewhere" in stalled


def test_bench_extract_cli_prints_the_figures_and_the_verdict(tiny_manifest, tiny_dataset, tiny_encoder_spec):
    r = invoke("bench", "extract", tiny_manifest, "--data-root", tiny_dataset, "--encoder", tiny_encoder_spec,
               "--n-images", "24", "--workers", "1", "--batch-size", "8")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    figures = dict(ln.split(None, 1) for ln in lines[:-1] if ln.split(None, 1)[0].startswith(("a_", "b_", "c_")))
    pct = re.match(r"end-to-end extract runs at (\d+)% of the model alone", lines[-1])
    assert pct and abs(int(pct.group(1)) - 100 * float(figures["c_ratio_b_over_a"])) <= 1  # c, printed to 2 places
    assert lines[-1].endswith("MiB while extracting.")


def test_peak_memory_is_the_peak_of_its_own_phase_not_of_the_process():
    """(f) is measured per phase: the baseline loop's float32 batches (8.6 GB on an H200 run) must not be charged
    to fercache's extract, as the process-lifetime peak (ru_maxrss) would."""
    cpu = torch.device("cpu")
    with PeakMemory(cpu) as big:
        x = np.ones(400 * 2**20 // 8)  # 400 MiB, touched, then freed before the phase ends
        time.sleep(0.1)
        del x
    with PeakMemory(cpu) as after:
        time.sleep(0.1)
    assert big.host_mib - after.host_mib > 300 and after.host_mib > 50
    assert after.host_mib < resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - 300
    assert big.device_mib is None


def test_bench_memory_cli_repeats_the_manifest_to_reach_each_size(tiny_manifest, tiny_dataset):
    r = invoke("bench", "memory", tiny_manifest, "--data-root", tiny_dataset, "--sizes", "30,150", "--image-size", "32",
               "--workers", "1", "--batch-size", "16")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("images=30  rows=30") and lines[1].startswith("images=150  rows=150")  # 150 > 72 rows
    rss = [float(re.search(r"peak_rss_mib=([\d,.]+)", ln).group(1).replace(",", "")) for ln in lines[:2]]
    late = [float(re.search(r"late_median_rss_mib=([\d,.]+)", ln).group(1).replace(",", "")) for ln in lines[:2]]
    assert all(v > 100 for v in rss) and all(100 < v <= p + 1 for v, p in zip(late, rss))  # a median is below the peak
    ratio, steady = map(float, re.search(r"largest/smallest: ([\d.]+), steady-state .* ([\d.]+), largest worker "
                                         r"[\d.]+, for 5x the images", lines[2]).groups())
    assert math.isclose(ratio, rss[1] / rss[0], abs_tol=1e-3) and math.isclose(steady, late[1] / late[0], abs_tol=2e-3)


def test_memory_growth_compares_the_largest_size_with_the_smallest_in_any_order():
    from fercache.bench import memory_growth

    rows = [{"images": 200, "peak_rss_mib": 300.0, "late_median_rss_mib": 240.0, "peak_worker_rss_mib": 50.0},
            {"images": 50, "peak_rss_mib": 200.0, "late_median_rss_mib": 200.0, "peak_worker_rss_mib": 40.0},
            {"images": 100, "peak_rss_mib": 900.0, "late_median_rss_mib": 900.0, "peak_worker_rss_mib": 90.0}]
    assert memory_growth(rows) == {"images": 4.0, "peak_rss_mib": 1.5, "late_median_rss_mib": 1.2,
                                   "peak_worker_rss_mib": 1.25}


def test_bench_head_times_both_recipes_on_the_same_images(tiny_manifest, tiny_dataset, tiny_encoder_spec):
    r = bench_head(tiny_manifest, tiny_encoder_spec, root=tiny_dataset, n_images=24, batch_size=8)
    assert r["images"] == 24 and r["batch_size"] == 8
    assert r["reencode_s_per_epoch"] > 0 and r["cached_s_per_epoch"] > 0 and r["one_time_extract_s"] > 0
    assert r["ratio"] == r["reencode_s_per_epoch"] / r["cached_s_per_epoch"]
    gain = r["reencode_s_per_epoch"] - r["cached_s_per_epoch"]
    assert gain <= 0 or math.isclose(r["break_even_epochs"], r["one_time_extract_s"] / gain)


def test_bench_memory_refuses_bad_input_before_its_first_child_and_names_a_child_failure(tiny_manifest, tiny_dataset,
                                                                                        monkeypatch, tmp_path):
    """Its extracts run in child processes, whose errors surfaced as a RuntimeError holding a child's traceback."""
    import subprocess
    from types import SimpleNamespace

    import pytest

    from fercache import bench
    from fercache.errors import FercacheError, ManifestError, UnknownNameError

    children = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: children.append(a) or SimpleNamespace(
        returncode=1, stdout="", stderr="Traceback (most recent call last):\n  ...\nMemoryError: out of memory\n"))
    with pytest.raises(ManifestError, match="do not exist under data root"):
        bench.bench_memory(tiny_manifest, [8], root=tmp_path)
    with pytest.raises(UnknownNameError, match="unknown encoder family 'nul'"):
        bench.bench_memory(tiny_manifest, [8], encoder="nul:", root=tiny_dataset)
    assert children == []
    with pytest.raises(FercacheError, match=r"^the memory benchmark's extract of 8 images failed: MemoryError: out of "
                                            r"memory$"):
        bench.bench_memory(tiny_manifest, [8], root=tiny_dataset)
    assert len(children) == 1


def test_threads_are_set_by_the_command_line_and_stated_by_benchmarks():
    import torch

    from fercache.bench import device_label
    from tests.test_cli import invoke

    before = torch.get_num_threads()
    try:
        assert invoke("--threads", "1", "heads", "linear").exit_code == 0 and torch.get_num_threads() == 1
        assert device_label(torch.device("cpu")).endswith(", 1 torch threads)")
        assert invoke("--threads", "0", "heads").exit_code == 2  # at least one
    finally:
        torch.set_num_threads(before)
