"""Model-only images/s of an encoder under the ways it could run in bf16, to see what autocast costs on a GPU.

    python tools/model_speed.py [ENCODER] [DEVICE]      (default open_clip:ViT-B-16 cuda)

Exploration for a later change, not a fercache feature: `fercache extract` runs the fp32 weights under autocast
(the same weights serve fp32, fp16 and bf16); casting the weights instead skips autocast's per-op casts.
Each line is measured on device-resident random batches, as `fercache bench extract`'s (a).
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext

import torch

from fercache.bench import forward_img_s, model_only, speed_weights
from fercache.encoders import load_encoder


def cast_weights(enc, dev: torch.device, x_dtype: torch.dtype, batch_size: int, seconds: float) -> float:
    """Images/s with the weights themselves in x_dtype, no autocast."""
    x = torch.randn(batch_size, 3, enc.preprocess.size, enc.preprocess.size, device=dev, dtype=x_dtype)
    return forward_img_s(enc.model, x, nullcontext(), seconds)


def main() -> None:
    spec = sys.argv[1] if len(sys.argv) > 1 else "open_clip:ViT-B-16"
    dev = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda")
    enc = load_encoder(spec, pretrained=speed_weights(spec, None))
    enc.model.to(dev).to(memory_format=torch.channels_last)
    for bs in (256, 512, 1024):
        print(f"autocast bf16, channels-last, batch {bs}: {model_only(enc, dev, bs, torch.bfloat16, 3.0):,.0f} img/s")
    enc.model.to(memory_format=torch.contiguous_format)
    print(f"autocast bf16, contiguous, batch 512: {model_only(enc, dev, 512, torch.bfloat16, 3.0):,.0f} img/s")
    enc.model.to(torch.bfloat16)
    for bs in (512, 1024):
        print(f"bf16 weights, no autocast, batch {bs}: {cast_weights(enc, dev, torch.bfloat16, bs, 3.0):,.0f} img/s")
    t = time.perf_counter()
    enc.model = torch.compile(enc.model)
    cast_weights(enc, dev, torch.bfloat16, 512, 0.1)
    print(f"torch.compile: {time.perf_counter() - t:.0f} s to compile")
    print(f"bf16 weights, compiled, batch 512: {cast_weights(enc, dev, torch.bfloat16, 512, 3.0):,.0f} img/s")


if __name__ == "__main__":
    main()
