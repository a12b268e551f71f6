"""Peak memory of an extract over decompression bombs against the same extract without them, in one run.

    .venv/bin/python tools/bomb_rss.py [--images 512] [--encoder torchvision:mobilenet_v2] [--image-size 112]

Writes N ordinary 48x48 faces (and, for the second manifest, the same N plus a 12000x12000 1-bit PNG of 32 KB
and a 1x60000 strip, each repeated 4 times) to a temporary folder, extracts each manifest in a fresh process
(OMP_NUM_THREADS=1, torch threads 1, 2 decode workers) and prints both peak RSS figures (main process and its
workers, summed peaks) and their ratio.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

RUN = """
import resource, sys, torch
torch.set_num_threads(1)
from fercache.extract import extract
r = extract(sys.argv[1], sys.argv[2], sys.argv[3], root=sys.argv[4], image_size=int(sys.argv[5]), workers=2,
            chunk_rows=256, batch_size=64, progress=False)
self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(r.n_ok, r.n_failed, self, kids)
"""


def write(root: Path, n: int, bombs: bool) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"face{i:05d}.png"
        if not (root / name).exists():
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / name)
        rows.append([f"f{i}", name, "happy", "train", f"s{i}"])
    if bombs:
        Image.new("1", (12000, 12000)).save(root / "bomb.png")
        Image.new("L", (1, 60000)).save(root / "strip.png")
        rows += [[f"b{k}", "bomb.png", "sad", "train", "b"] for k in range(4)]
        rows += [[f"s{k}", "strip.png", "sad", "train", "s"] for k in range(4)]
    manifest = root / ("bombs.csv" if bombs else "plain.csv")
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["sample_id", "path", "label", "split", "subject"], *rows])
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--encoder", default="torchvision:mobilenet_v2")
    ap.add_argument("--image-size", type=int, default=112)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        peaks = {}
        for bombs in (False, True):
            m = write(root, a.images, bombs)
            out = subprocess.run([sys.executable, "-c", RUN, str(m), a.encoder, str(root / f"{m.stem}.zarr"), str(root),
                                  str(a.image_size)], capture_output=True, text=True, env=env, check=True).stdout
            n_ok, n_failed, main_kb, kids_kb = map(int, out.split())
            peaks[bombs] = (main_kb + kids_kb) / 1024
            print(f"{'with bombs' if bombs else 'plain':12s} rows ok {n_ok:5d} failed {n_failed:2d}  peak RSS main "
                  f"{main_kb / 1024:7.1f} MiB + largest worker {kids_kb / 1024:7.1f} MiB = {peaks[bombs]:7.1f} MiB")
        print(f"ratio with/without bombs {peaks[True] / peaks[False]:.2f}")


if __name__ == "__main__":
    main()
