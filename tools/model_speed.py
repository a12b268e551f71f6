"""Model-only images/s of an encoder under the ways it could run in bf16, to see what autocast costs on a GPU.

    python tools/model_speed.py [ENCODER] [DEVICE]      (default open_clip:ViT-B-16 cuda)

It measured, on an H200, what became `--precision bf16-weights`: `--precision bf16` runs the fp32 weights under
autocast (layer norms and softmax in fp32); casting the weights runs every op in bf16.
Each line is measured on device-resident random batches, as `fercache bench extract`'s (a).
"""

from __future__ import annotations

import sys
import time

import torch

from fercache.bench import model_only, speed_weights
from fercache.encoders import load_encoder


def main() -> None:
    spec = sys.argv[1] if len(sys.argv) > 1 else "open_clip:ViT-B-16"
    dev = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda")
    enc = load_encoder(spec, pretrained=speed_weights(spec, None))
    enc.model.to(dev).to(memory_format=torch.channels_last)
    for bs in (256, 512, 1024):
        print(f"autocast bf16, channels-last, batch {bs}: {model_only(enc, dev, bs, torch.bfloat16, 3.0):,.0f} img/s")
    enc.model.to(memory_format=torch.contiguous_format)
    print(f"autocast bf16, contiguous, batch 512: {model_only(enc, dev, 512, torch.bfloat16, 3.0):,.0f} img/s")
    enc.model.to(torch.bfloat16)  # as --precision bf16-weights: model_only then runs it without autocast
    for bs in (512, 1024):
        print(f"bf16 weights, no autocast, batch {bs}: {model_only(enc, dev, bs, torch.bfloat16, 3.0):,.0f} img/s")
    t = time.perf_counter()
    enc.model = torch.compile(enc.model)
    model_only(enc, dev, 512, torch.bfloat16, 0.1)
    print(f"torch.compile: {time.perf_counter() - t:.0f} s to compile")
    print(f"bf16 weights, compiled, batch 512: {model_only(enc, dev, 512, torch.bfloat16, 3.0):,.0f} img/s")


if __name__ == "__main__":
    main()
