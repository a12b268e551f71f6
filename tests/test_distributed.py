"""torchrun extraction: ranks encode disjoint chunks of one store; equals a single-process run; resumes after a rank
dies."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fercache import store as S
from fercache.extract import extract

from .test_extract import _assert_same_store

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _env():
    # gloo on CPU; one thread per rank, as torchrun sets by default (the reference run uses the same)
    return {**os.environ, "FERCACHE_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}


def _single(manifest, spec, root, out, extra=()):
    """The reference: one process, in this one (importing torch and open_clip again took ~9 s a test), at one
    thread as each torchrun rank runs, so the floats are summed in the same order."""
    opts = dict(zip(extra[::2], extra[1::2]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(manifest, spec, out, root=root, chunk_rows=16, batch_size=8, workers=0, progress=False,
                read_chunk_rows=int(opts.get("--read-chunk-rows", 0)) or None,
                views=[v for v in opts.get("--views", "").split(",") if v])
    finally:
        torch.set_num_threads(threads)


def _torchrun(nproc, manifest, spec, root, out, extra=()):
    return subprocess.run(TORCHRUN + [f"--nproc-per-node={nproc}", "-m", "fercache", "-q", "extract", str(manifest),
                                      "--encoder", spec, "--out", str(out), "--data-root", str(root),
                                      "--chunk-rows", "16", "--batch-size", "8", "--workers", "0", *extra],
                          env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("nproc,extra",
                         [(2, ()), (3, ()), (2, ("--read-chunk-rows", "4")), (2, ("--views", "erase,noise"))],
                         ids=["2-ranks", "3-ranks", "2-ranks-sharded", "2-ranks-random-views"])
def test_torchrun_equals_single_process(tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path, nproc, extra):
    _single(tiny_manifest, tiny_encoder_spec, tiny_dataset, tmp_path / "one.zarr", extra)
    proc = _torchrun(nproc, tiny_manifest, tiny_encoder_spec, tiny_dataset, tmp_path / "many.zarr", extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "72 rows, 72 ok" in proc.stdout  # only rank 0 reports
    _assert_same_store(tmp_path / "one.zarr", tmp_path / "many.zarr")


RANK_KILLER = textwrap.dedent("""
    import os, signal, sys, time
    from fercache.encoders import load_encoder
    from fercache.extract import extract
    enc = load_encoder(sys.argv[2])
    forward, calls = enc.model.forward, [0]
    def dying_forward(x):
        calls[0] += 1
        if os.environ["RANK"] == "1" and calls[0] == 3:
            time.sleep(1.0)  # let rank 0's writer land some chunks
            os.kill(os.getpid(), signal.SIGKILL)
        return forward(x)
    enc.model.forward = dying_forward
    extract(sys.argv[1], sys.argv[2], sys.argv[3], root=sys.argv[4], chunk_rows=16, batch_size=8, workers=0,
            progress=False, encoder_obj=enc)
""")


def _kill_rank_1(manifest, spec, root, out, tmp_path):
    """Two ranks extract to `out` until rank 1 is SIGKILLed (RANK_KILLER)."""
    script = tmp_path / "killer.py"
    script.write_text(RANK_KILLER)
    return subprocess.run(TORCHRUN + ["--nproc-per-node=2", str(script), str(manifest), spec, str(out), str(root)],
                          env=_env(), capture_output=True, text=True, timeout=300)


def test_resume_after_a_rank_dies(tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path):
    out = tmp_path / "many.zarr"
    proc = _kill_rank_1(tiny_manifest, tiny_encoder_spec, tiny_dataset, out, tmp_path)
    assert proc.returncode != 0
    st = S.open_store(out)
    assert not st.complete and len(st.pending_chunks()) > 0
    proc = _torchrun(2, tiny_manifest, tiny_encoder_spec, tiny_dataset, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _single(tiny_manifest, tiny_encoder_spec, tiny_dataset, tmp_path / "one.zarr")
    _assert_same_store(tmp_path / "one.zarr", out)


def test_one_named_gpu_for_every_rank_is_refused():
    """Under torchrun, --device cuda:0 put every rank on GPU 0 (each at 1/world of its speed); cuda means
    cuda:LOCAL_RANK."""
    from fercache.devices import rank_device
    from fercache.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--device cuda:0 under torchrun \(2 ranks\): use --device cuda"):
        rank_device("cuda:0", 1, 2)
    assert rank_device("cpu", 1, 2).type == "cpu"


@pytest.fixture
def s3_env(monkeypatch):
    """A real S3 endpoint (moto's server, in a thread) and the environment that points s3fs at it."""
    pytest.importorskip("s3fs", reason="s3fs not installed (pip install -e '.[test]')")
    server_mod = pytest.importorskip("moto.server", reason="moto not installed (pip install -e '.[test]')")
    import boto3

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="fer")
    yield env
    server.stop()


def test_torchrun_ranks_share_an_s3_store_resume_on_it_and_equal_a_single_process_run(
        tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path, s3_env):
    """The multi-node recipe: ranks that share nothing but an object store (no folders, no locks, no shared
    memory). Rank 1 dies mid-run; three ranks finish the store; it equals a local single-process store."""
    url = "s3://fer/faces.zarr"
    proc = _kill_rank_1(tiny_manifest, tiny_encoder_spec, tiny_dataset, url, tmp_path)
    assert proc.returncode != 0
    st = S.open_store(url)
    assert not st.complete and 0 < len(st.pending_chunks()) < st.n_chunks, proc.stderr[-3000:]
    proc = _torchrun(3, tiny_manifest, tiny_encoder_spec, tiny_dataset, url)
    assert proc.returncode == 0 and "72 rows, 72 ok" in proc.stdout, proc.stderr[-3000:]
    _single(tiny_manifest, tiny_encoder_spec, tiny_dataset, tmp_path / "one.zarr")  # one thread, as each rank has
    _assert_same_store(tmp_path / "one.zarr", url)
