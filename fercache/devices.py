"""Which torch device a command runs on: checked once, up front, with a message that says what this machine has.

Without this, `--device cuda` on a machine without a driver fails deep inside torch's lazy CUDA init (after
the manifest and store are read), and a typo such as `--device gpu` surfaces as torch's list of twenty
backend names.
"""

from __future__ import annotations

import os

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


def dist_rank_world() -> tuple[int, int]:
    """(rank, world) from torchrun's environment, initialising the process group once (gloo without CUDA, or with
    FERCACHE_BACKEND=gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available()
                                and os.environ.get("FERCACHE_BACKEND") != "gloo" else "gloo")
    return dist.get_rank(), world


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def rank_device(device: str, rank: int, world: int) -> torch.device:
    """The device this rank runs on: `cuda` under torchrun is each rank's own GPU (LOCAL_RANK)."""
    if world > 1 and device.startswith("cuda:"):  # every rank would share that one GPU, each at 1/world speed
        raise ConfigError(f"--device {device} under torchrun ({world} ranks): use --device cuda, and each rank "
                          "takes cuda:LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES)")
    if device == "cuda" and world > 1:
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}")
        torch.cuda.set_device(dev)  # NCCL collectives (the barriers) run on the current device: make it this rank's
        return dev
    return torch_device(device)
