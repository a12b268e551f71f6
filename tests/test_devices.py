"""--device is checked once, before any data is read, with a message naming what this machine has."""

from __future__ import annotations

import pytest
import torch

from fercache.devices import torch_device
from fercache.errors import ConfigError

from .test_cli import invoke

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_cpu_is_a_device_and_a_device_passes_through():
    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name, says", [("gpu", "is not a device name"), ("cuda:x", "is not a device name"),
                                        ("meta", "fercache runs on cpu, cuda, mps")])
def test_names_torch_does_not_run_fercache_on_are_refused(name, says):
    with pytest.raises(ConfigError, match=says) as e:
        torch_device(name)
    assert "this machine has: cpu" in str(e.value)


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_says_so_and_what_to_use(name):
    with pytest.raises(ConfigError, match="CUDA is not available here.*use --device cpu"):
        torch_device(name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_index_past_the_last_gpu_is_refused():
    with pytest.raises(ConfigError, match=f"there are {torch.cuda.device_count()} CUDA devices"):
        torch_device(f"cuda:{torch.cuda.device_count()}")


def test_train_head_refuses_a_bad_device_before_reading_the_store(tmp_path):
    # The store does not exist: the device error coming first shows nothing was read before the check.
    r = invoke("train-head", tmp_path / "missing.zarr", "--head", "linear", "--device", "gpu", "--out",
               tmp_path / "runs")
    assert r.exit_code == 2 and "--device 'gpu' is not a device name" in r.output
    assert not (tmp_path / "runs").exists()


@no_cuda
def test_extract_on_cuda_without_cuda_fails_before_creating_the_store(tiny_manifest, tiny_dataset, tmp_path):
    out = tmp_path / "s.zarr"
    r = invoke("extract", tiny_manifest, "--encoder", "null:", "--out", out, "--data-root", tiny_dataset, "--device",
               "cuda")
    assert r.exit_code == 2 and "CUDA is not available here" in r.output
    assert not out.exists()


def test_evaluate_and_predict_check_the_device_too(tiny_store, tmp_path):
    r = invoke("train-head", tiny_store, "--head", "linear", "--recipe", "epochs=1", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    run = next(tmp_path.glob("*/seed0"))
    for cmd in (["evaluate", run], ["predict", run, tmp_path]):
        r = invoke(*cmd, "--device", "tpu")
        assert r.exit_code == 2 and "--device 'tpu' is not a device name" in r.output, (cmd, r.output)
