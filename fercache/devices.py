"""Which torch device a command runs on: checked once, up front, with a message that says what this machine has.

Without this, `--device cuda` on a machine without a driver fails deep inside torch's lazy CUDA init (after
the manifest and store are read), and a typo such as `--device gpu` surfaces as torch's list of twenty
backend names.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

SUPPORTED = ("cpu", "cuda", "mps")


def available() -> str:
    """What this machine offers, for error messages: `cpu, cuda:0 (NVIDIA H100 ...)`."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names)


def torch_device(name: str | torch.device) -> torch.device:
    """`name` as a torch.device this machine has, or ConfigError naming the devices it does have."""
    if isinstance(name, torch.device):
        return name
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r} is not a device name: use cpu, cuda, cuda:N or mps "
                          f"(this machine has: {available()})") from None
    if dev.type not in SUPPORTED:
        raise ConfigError(f"--device {name!r}: fercache runs on "
                          f"{', '.join(SUPPORTED)} (this machine has: {available()})")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here (no GPU or no driver; this machine has: "
                          f"{available()}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices here ({available()})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: Apple MPS is not available here "
                          f"(this machine has: {available()}); use --device cpu")
    return dev
