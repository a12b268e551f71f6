"""Benchmarks that print figures and ratios measured in one run on one device (never timed unit tests).

- `bench_extract`: model-only vs end-to-end extraction vs a plain PIL/DataLoader baseline vs the input
  pipeline alone (null encoder), with peak host RSS and device memory.
- `bench_memory`: peak RSS of whole extract runs at several dataset sizes (subprocesses), to show it is flat.
- `bench_head`: seconds per epoch of the mask head from the cache vs re-encoding every image each epoch.
- `bench_sweep`: one grid trained one run after another and as stacks, configurations per minute of each.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from .devices import torch_device
from .encoders import Encoder, check_encoder_name, load_encoder
from .errors import FercacheError
from .extract import amp_dtype, check_options, compute_in, extract, ready, weights_dtype
from .manifests import Manifest, data_root, read_manifest, resolve_paths, write_manifest


def _subset(manifest: str | Path, n: int | None, out: Path) -> Path:
    """The first n rows (repeating the manifest with new ids when n exceeds it), written to `out`."""
    m = read_manifest(manifest)
    if not n or n == len(m):
        return Path(manifest)
    rows = [dict(m.rows[i % len(m)], sample_id=f"{m.rows[i % len(m)]['sample_id']}#{i // len(m)}") for i in range(n)]
    return write_manifest(Manifest(rows=rows, source=f"{manifest}[:{n}]", columns=m.columns), out)


def rss_mib() -> float:
    """Resident set size of this process now (shared-memory batches received from workers included)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakMemory:
    """Peak host RSS and device memory over one phase of a benchmark, `with PeakMemory(dev) as m: ...`.

    The process-lifetime peak (ru_maxrss) would charge fercache's extract with the baseline loop's memory:
    its workers ship float32 224x224 batches (14 workers x 2 prefetched x 512 images = 8.6 GB, seen on an
    H200 run), so RSS is sampled every 20 ms in a thread for each phase on its own instead.
    """

    def __init__(self, device: torch.device, every_s: float = 0.02):
        self.device, self.every_s = device, every_s
        self.host_mib, self.device_mib = 0.0, None
        self._done = threading.Event()

    def _watch(self) -> None:
        while not self._done.wait(self.every_s):
            self.host_mib = max(self.host_mib, rss_mib())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.host_mib = rss_mib()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.host_mib = max(self.host_mib, rss_mib())
        if self.device.type == "cuda":
            self.device_mib = torch.cuda.max_memory_allocated(self.device) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(enc: Encoder, device: torch.device, batch_size: int, dtype: torch.dtype, seconds: float = 5.0) -> float:
    """Images/s of the encoder alone on device-resident random batches (same dtype, batch size, layout)."""
    x = torch.randn(batch_size, 3, enc.preprocess.size, enc.preprocess.size, device=device, dtype=dtype)
    if enc.channels_last or device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return forward_img_s(enc.model, x, compute_in(enc.model, device, dtype), seconds)


def forward_img_s(model: torch.nn.Module, x: torch.Tensor, ctx, seconds: float) -> float:
    """Images/s of `model(x)` repeated for `seconds` (at least twice) inside `ctx`, after two warm-up calls."""
    with torch.inference_mode(), ctx:
        model(x)  # warm-up (kernel selection, allocator)
        model(x)
        _sync(x.device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            model(x)
            n += 1
        _sync(x.device)
    return n * len(x) / (time.perf_counter() - t0)


class _PILFolder(torch.utils.data.Dataset):
    """The published repositories' input pipeline: PIL open + torchvision transforms per image."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


def baseline_loop(enc: Encoder, paths: list[Path], device: torch.device, batch_size: int, workers: int,
                  dtype: torch.dtype) -> float:
    """Images/s of ImageFolder-style PIL transforms + DataLoader + encode + collect (no store)."""
    from .preprocess import reference_transform

    loader = torch.utils.data.DataLoader(_PILFolder(paths, reference_transform(enc.preprocess)), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    weights = weights_dtype(enc.model)  # the PIL transforms give fp32: bf16 weights need bf16 inputs
    feats, t0 = [], time.perf_counter()
    with torch.inference_mode(), compute_in(enc.model, device, dtype):
        for x in loader:
            feats.append(enc.model(x.to(device, weights, non_blocking=True))[enc.default_output].float().cpu())
    return len(paths) / (time.perf_counter() - t0)


def speed_weights(encoder: str, pretrained: str | None) -> str | None:
    """Weights do not change the speed: an open_clip model benchmarks at random init unless weights are named."""
    return "none" if pretrained is None and encoder.startswith("open_clip:") else pretrained


def bench_extract(manifest: str | Path, encoder: str, *, pretrained: str | None = None, image_size: int | None = None,
                  root=None, device: str = "cpu", batch_size: int = 256, workers: int | None = None,
                  n_images: int | None = None, precision: str = "auto", model_seconds: float = 5.0) -> dict:
    """All figures of `fercache bench extract` (see the module docstring), measured in this process."""
    dev = torch_device(device)
    check_options(batch_size, workers, 1, precision, image_size)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    enc = ready(load_encoder(encoder, pretrained=speed_weights(encoder, pretrained), image_size=image_size), (), dev,
                 precision)  # as extract readies it: every path below measures the same model
    dtype = amp_dtype(dev, precision)
    with tempfile.TemporaryDirectory() as tmp:
        m = _subset(manifest, n_images, Path(tmp) / "subset.csv")
        paths = resolve_paths(read_manifest(m), data_root(root))  # one per row
        n = len(paths)
        a = model_only(enc, dev, batch_size, dtype, model_seconds)
        with PeakMemory(dev) as mem_b:
            e2e = extract(m, encoder, Path(tmp) / "e2e.zarr", root=root, device=device, batch_size=batch_size,
                          workers=workers, precision=precision, progress=False, encoder_obj=enc)
        with PeakMemory(dev) as mem_d:
            d = baseline_loop(enc, paths, dev, batch_size, workers, dtype)
        null = load_encoder("null:", image_size=enc.preprocess.size)
        e = extract(m, "null:", Path(tmp) / "null.zarr", root=root, device=device, batch_size=batch_size,
                    workers=workers, progress=False, encoder_obj=null)
        e1 = extract(m, "null:", Path(tmp) / "null1.zarr", root=root, device=device, batch_size=batch_size,
                     workers=1, progress=False, encoder_obj=null)
    return {
        "device": device_label(dev),
        "encoder": enc.name, "weights": enc.pretrained, "image_size": enc.preprocess.size,
        "precision": precision, "dtype": str(dtype).replace("torch.", ""),
        "batch_size": batch_size, "workers": workers, "images": n,
        "a_model_only_img_s": a, "b_end_to_end_img_s": e2e.images_per_s, "c_ratio_b_over_a": e2e.images_per_s / a,
        "d_baseline_img_s": d, "ratio_b_over_d": e2e.images_per_s / d,
        "e_null_total_img_s": e.images_per_s, "e_null_1_worker_img_s": e1.images_per_s,
        "e_worker_capacity_img_s": e.images / e.decode_worker_seconds if e.decode_worker_seconds else float("nan"),
        "f_peak_host_rss_mib": mem_b.host_mib, "f_peak_device_mib": mem_b.device_mib,  # during (b) alone
        "f_baseline_peak_host_rss_mib": mem_d.host_mib, "f_baseline_peak_device_mib": mem_d.device_mib,  # during (d)
    }


def verdict(r: dict, enough: float = 0.9) -> str:
    """What `bench extract`'s figures say, in one line: how close extraction comes to the model's own speed and,
    short of `enough` of it, which side holds it back (the input pipeline's capacity against the model's speed)."""
    a, b, cap = r["a_model_only_img_s"], r["b_end_to_end_img_s"], r["e_null_total_img_s"]
    line = (f"end-to-end extract runs at {b / a:.0%} of the model alone and {r['ratio_b_over_d']:.2f}x the PIL + "
            "DataLoader baseline")
    if b / a >= enough:
        line += f"; the input pipeline alone does {cap:,.0f} img/s, {cap / a:.1f}x what the model needs"
    elif cap < 1.1 * a:
        line += (f"; the input pipeline is the bottleneck: alone it does {cap:,.0f} img/s against the model's "
                 f"{a:,.0f} (with {r['workers']} workers): more --workers, if there are cores for them")
    else:
        line += (f"; the input pipeline alone does {cap:,.0f} img/s, so what holds extraction back is elsewhere "
                 "(store writes, host-device copies, the main process): profile `fercache extract`")
    return line + f". Peak host RSS {r['f_peak_host_rss_mib']:,.0f} MiB while extracting."


# The peak alone misleads: RSS climbs for the first ~20k images (allocator pools, shared-memory batches in
# flight) and then holds, so a 10k run ends before the plateau a 100k run sits on. RSS is also sampled every
# 0.2 s, and the median over the second half of the run (steady state) is reported beside the peak.
MEMORY_CHILD = """
import json, resource, statistics, sys, threading, time
from fercache.bench import rss_mib as rss
from fercache.extract import extract
a = json.loads(sys.argv[1])
samples, done = [], threading.Event()
def watch():
    while not done.wait(0.2):
        samples.append(rss())
threading.Thread(target=watch, daemon=True).start()
t = time.perf_counter()
r = extract(a["manifest"], a["encoder"], a["out"], pretrained=a["pretrained"], image_size=a["image_size"],
            root=a["root"], device=a["device"], batch_size=a["batch_size"], workers=a["workers"], progress=False)
done.set()
samples.append(rss())  # a short run too
import torch
late = samples[len(samples) // 2:]
print(json.dumps({"rows": r.rows, "img_s": r.images_per_s, "seconds": time.perf_counter() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "late_median_rss_mib": statistics.median(late),
                  "peak_worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "peak_device_mib": torch.cuda.max_memory_allocated() / 2**20 if a["device"].startswith("cuda")
                  else None}))
"""


def device_label(dev: torch.device) -> str:
    """Which device a benchmark ran on, with the thread count its figures depend on (`--threads`)."""
    cpu = f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{torch.cuda.get_device_name(dev)} ({cpu} on the host)" if dev.type == "cuda" else f"CPU ({cpu})"


def bench_memory(manifest: str | Path, sizes: list[int], encoder: str = "null:", image_size: int = 224, root=None,
                 device: str = "cpu", batch_size: int = 256, workers: int | None = None) -> list[dict]:
    """Peak host RSS (main process, and the largest worker) and device memory of whole extracts at each size."""
    out, _ = [], torch_device(device)  # refused here, not in the first child: so are the names and files below
    check_encoder_name(encoder)
    resolve_paths(read_manifest(manifest), data_root(root))
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            m = _subset(manifest, n, Path(tmp) / f"m{n}.csv")
            args = {"manifest": str(m), "encoder": encoder, "pretrained": speed_weights(encoder, None),
                    "out": str(Path(tmp) / f"s{n}.zarr"), "image_size": image_size,
                    "root": str(data_root(root)), "device": device, "batch_size": batch_size, "workers": workers}
            proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, json.dumps(args)], capture_output=True,
                                  text=True)
            if proc.returncode:  # its last line is the exception; the traceback above it is the child's own
                raise FercacheError(f"the memory benchmark's extract of {n} images failed: "
                                    f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
            out.append({"images": n, **json.loads(proc.stdout.strip().splitlines()[-1])})
    return out


def memory_growth(rows: list[dict]) -> dict:
    """Largest-size run over smallest-size run, whatever order --sizes gave them in: peak RSS, steady-state RSS
    (median over each run's second half) and the worker peak, with the ratio of their sizes."""
    small, large = min(rows, key=lambda r: r["images"]), max(rows, key=lambda r: r["images"])
    return {"images": large["images"] / small["images"],
            **{k: large[k] / small[k] for k in ("peak_rss_mib", "late_median_rss_mib", "peak_worker_rss_mib")}}


def _mask_epoch(head, x: torch.Tensor, y: torch.Tensor, batch_size: int, opt) -> None:
    head.train()
    for i in range(0, len(x), batch_size):
        loss = head.loss({"x": x[i:i + batch_size], "y": y[i:i + batch_size]})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _mask_head(ctx, dev):
    from .heads import build_head

    torch.manual_seed(0)
    head = build_head("mask", ctx).to(dev)
    return head, torch.optim.Adam(head.parameters(), lr=2e-4, weight_decay=1e-4)


def _reencode_epoch_s(enc, out_name: str, loader, y: torch.Tensor, batch_size: int, ctx, dev) -> float:
    """One epoch of the published recipe: every step decodes, transforms and encodes its images again."""
    head, opt = _mask_head(ctx, dev)
    t0 = time.perf_counter()
    for k, xb in enumerate(loader):
        with torch.no_grad():
            f = enc.model(xb.to(dev))[out_name].float()
        head.train()
        head.loss({"x": f, "y": y[k * batch_size:(k + 1) * batch_size]}).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(dev)
    return time.perf_counter() - t0


def _cached_epoch_s(x: torch.Tensor, y: torch.Tensor, batch_size: int, ctx, dev) -> float:
    """Seconds per epoch of the same head from cached features (after a warm-up; at least 2 s of epochs)."""
    head, opt = _mask_head(ctx, dev)
    _mask_epoch(head, x, y, batch_size, opt)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0 or reps < 3:
        _mask_epoch(head, x, y, batch_size, opt)
        reps += 1
    _sync(dev)
    return (time.perf_counter() - t0) / reps


def bench_head(manifest: str | Path, encoder: str = "open_clip:ViT-B-16", *, pretrained: str | None = None, root=None,
               n_images: int = 128, batch_size: int = 32, device: str = "cpu", workers: int = 0,
               output: str | None = None) -> dict:
    """Seconds per epoch of the mask head: from cached features vs re-encoding every image (published recipe)."""
    from .heads import HeadContext
    from .preprocess import reference_transform

    dev = torch_device(device)
    enc = load_encoder(encoder, pretrained=speed_weights(encoder, pretrained))
    enc.model.to(dev)
    out_name = output or enc.default_output
    m = read_manifest(manifest)
    rows = [r for r in m.rows if r["label"]][:n_images]
    paths = resolve_paths(Manifest(rows=rows, source=m.source, columns=m.columns), data_root(root))
    classes = sorted({r["label"] for r in rows})
    y = torch.tensor([classes.index(r["label"]) for r in rows], device=dev)
    ctx = HeadContext(enc.outputs[out_name], len(classes), classes)
    loader = torch.utils.data.DataLoader(_PILFolder(paths, reference_transform(enc.preprocess)), batch_size=batch_size,
                                         num_workers=workers)

    reencode = _reencode_epoch_s(enc, out_name, loader, y, batch_size, ctx, dev)

    with tempfile.TemporaryDirectory() as tmp:
        sub = write_manifest(Manifest(rows=rows, source="bench", columns=m.columns), Path(tmp) / "m.csv")
        t0 = time.perf_counter()
        extract(sub, encoder, Path(tmp) / "s.zarr", root=root, device=device, batch_size=batch_size, workers=workers,
                progress=False, encoder_obj=enc)
        extract_s = time.perf_counter() - t0
        from .store import open_store
        x = torch.as_tensor(open_store(Path(tmp) / "s.zarr").features(out_name), device=dev)
    cached = _cached_epoch_s(x, y, batch_size, ctx, dev)
    return {
        "device": device_label(dev),
        "encoder": enc.name, "pretrained": enc.pretrained, "images": len(rows), "batch_size": batch_size,
        "reencode_s_per_epoch": reencode, "cached_s_per_epoch": cached, "ratio": reencode / cached,
        "one_time_extract_s": extract_s,
        "break_even_epochs": extract_s / max(reencode - cached, 1e-9),
    }


#: The grid `bench sweep` trains unless given one: 32 points of recipe keys every trained head has.
SWEEP_GRID = {"lr": [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2], "weight_decay": [0.0, 1e-5, 1e-4, 1e-3]}


def _timed_sweep(store: str, head: str, grid: dict, out: Path, dev: torch.device, **kw):
    from .sweeps import sweep

    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        result = sweep(store, head, grid, out, device=str(dev), reuse=False, **kw)
        seconds = time.perf_counter() - t0
    return result, seconds, mem


def bench_sweep(store: str, head: str, grid: dict | None = None, *, seeds=(0,), recipe: dict | None = None,
                hp: dict | None = None, manifest=None, device: str = "cpu",
                max_batch_configs: int | None = None) -> dict:
    """The same sweep trained one run after another (`max_batch_configs=1`, the sequential path) and as stacks,
    on one device in one process: configurations per minute of each, peak host and device memory, the largest
    stack, whether both rank the points alike, and the speedup (stacked over sequential)."""
    from . import stacked
    from .data import load_features

    dev, grid = torch_device(device), grid or SWEEP_GRID
    load_features(store, manifest)  # read once untimed: both paths start from a warm page cache
    kw = {"seeds": seeds, "base_recipe": recipe, "base_hp": hp, "manifest": manifest}
    with tempfile.TemporaryDirectory() as tmp:
        seq, t_seq, m_seq = _timed_sweep(store, head, grid, Path(tmp) / "sequential", dev, max_batch_configs=1, **kw)
        stacked.SIZES.clear()
        stk, t_stk, m_stk = _timed_sweep(store, head, grid, Path(tmp) / "stacked", dev,
                                         max_batch_configs=max_batch_configs, **kw)
    n, key = seq.runs, lambda r: tuple(r[a] for a in seq.axes)
    diff = max(abs(a["mean"] - b["mean"]) for a, b in zip(sorted(seq.rows, key=key), sorted(stk.rows, key=key)))
    out = {"device": device_label(dev), "head": head, "configurations": n,
           "sequential configs/min": 60 * n / t_seq, "stacked configs/min": 60 * n / t_stk,
           "largest stack": max(stacked.SIZES, default=1),
           "peak host MiB sequential": m_seq.host_mib, "peak host MiB stacked": m_stk.host_mib}
    if dev.type == "cuda":
        out |= {"peak device MiB sequential": m_seq.device_mib, "peak device MiB stacked": m_stk.device_mib}
    same = [key(r) for r in seq.rows] == [key(r) for r in stk.rows]
    return out | {"same ranking": "yes" if same else "no", "largest val difference (points)": 100 * diff,
                  "speedup": t_seq / t_stk}
