"""A head is one registration: heads defined in a test-only module (an AU head and a clip-level head) train,
evaluate, sweep, reload and predict through the CLI and a pipeline, with no other file of fercache changed."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from fercache.heads import HEADS
from fercache.manifests import read_manifest, write_manifest
from tests.test_cli import invoke

PLUGIN_HEADS = ("test_au_probe", "test_clip_mean")


@pytest.fixture
def plugin_heads():
    """Import the module (its decorators register the heads); forget them afterwards, so the other tests'
    loops over the registry see the package's own heads only."""
    sys.modules.pop("tests.plugin_heads", None)
    module = importlib.import_module("tests.plugin_heads")
    yield module
    for name in PLUGIN_HEADS:
        HEADS.pop(name, None)


@pytest.fixture
def au_store(tiny_manifest, tiny_dataset, tiny_encoder_spec, tmp_path):
    """The tiny faces with two AU columns, extracted into their own store (its manifest carries the AUs)."""
    from fercache.extract import extract

    m = read_manifest(tiny_manifest)
    for r in m.rows:
        r["AU12"] = "1" if r["label"] == "happy" else "0"
        r["AU15"] = "1" if r["label"] == "sad" else ("-1" if r["label"] == "neutral" else "0")
    m.columns = m.columns + ["AU12", "AU15"]
    path = write_manifest(m, tmp_path / "au.csv")
    out = tmp_path / "au.zarr"
    extract(path, tiny_encoder_spec, out, root=tiny_dataset, chunk_rows=16, workers=0, progress=False)
    return out


def _train_evaluate_sweep_predict(store, head, inputs, tmp_path, extra=()):
    r = invoke("train-head", store, "--head", head, "--out", tmp_path / "runs", *extra)
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "runs").glob(f"*-{head}/seed0"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["head"] == head and cfg["task"] == HEADS[head].task and cfg["level"] == HEADS[head].level
    r = invoke("evaluate", run)
    assert r.exit_code == 0, r.output
    assert (run / "eval-" f"{run.parent.name.rsplit('-', 1)[0]}-test" / "metrics.json").is_file()
    r = invoke("sweep", store, "--head", head, "--axis", "lr=0.01,0.1", "--out", tmp_path / "sweep", *extra)
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "sweep" / "sweep.json").read_text())) == 2
    from fercache.rundir import load_run

    model, saved, _ = load_run(run)
    assert model.spec is HEADS[head] and saved.head == head and saved.task == HEADS[head].task
    r = invoke("predict", run, *inputs, "--out", tmp_path / "pred.json")
    assert r.exit_code == 0, r.output
    return run, json.loads((tmp_path / "pred.json").read_text())


def test_a_test_only_au_head_trains_evaluates_sweeps_reloads_and_predicts(plugin_heads, au_store, tiny_dataset,
                                                                           tmp_path):
    images = sorted(tiny_dataset.glob("faces/test/*/*.jpg"))[:3]
    run, pred = _train_evaluate_sweep_predict(au_store, "test_au_probe", images, tmp_path, ("--aus", "12,15"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["selection"]["metric"] == "macro_f1_at_0.5" and set(metrics["val"]["thresholds"]) == {"AU12", "AU15"}
    assert len(pred) == 3 and {"AU12", "AU15"} <= set(json.dumps(pred[0]).replace('"', " ").split())


def test_a_test_only_clip_level_head_trains_evaluates_sweeps_reloads_and_predicts(plugin_heads, video_store, tmp_path):
    store, root = video_store
    clips = [root / "clips" / "test_happy_0", root / "clips" / "test_sad_1"]
    run, pred = _train_evaluate_sweep_predict(store, "test_clip_mean", clips, tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["unit"] == "clips" and metrics["n_train"] == 24
    assert len(pred) == 2


def test_test_only_heads_run_in_a_pipeline(plugin_heads, au_store, video_store, tmp_path):
    from fercache.pipeline import check_pipeline, run_pipeline

    store, _ = video_store
    steps = "".join(
        f'[[step]]\nrun = "train"\nstore = "{s}"\nhead = "{h}"\nout = "{tmp_path}/runs"\n{aus}[[step]]\nrun = '
        f'"evaluate"\nruns = ["{tmp_path}/runs/{name}-{h}/seed0"]\n[[step]]\nrun = "sweep"\nstore = "{s}"\nhead = '
        f'"{h}"\ngrid = {{ lr = [0.01, 0.1] }}\nout = "{tmp_path}/sw-{h}"\n{aus}'
        for s, h, name,
                    aus in ((au_store, "test_au_probe", "au", 'aus = "12,15"\n'),
                            (store, "test_clip_mean", "clips", "")))
    (tmp_path / "p.toml").write_text(steps)
    assert check_pipeline(tmp_path / "p.toml") == 6
    results = run_pipeline(tmp_path / "p.toml", progress=False)
    assert len(results) == 6 and "macro_f1_at_0.5" in results[0] and "n=" in results[4]


def test_a_step_is_one_declaration(tmp_path):
    """A step registered with its function alone is checked and run like the package's own, and a step that
    declares what it reads is refused a missing input before step 1 runs."""
    from fercache.errors import ConfigError
    from fercache.pipeline import STEPS, check_pipeline, register_step, run_pipeline

    @register_step("test_echo", reads=("src",))
    def echo(text: str, src: str | None = None, times: int = 1):
        """Say `text` `times` times (tests only)."""
        return text * times

    try:
        (tmp_path / "p.toml").write_text('[[step]]\nrun = "test_echo"\ntext = "hi"\ntimes = 2\n')
        assert check_pipeline(tmp_path / "p.toml") == 1 and run_pipeline(tmp_path / "p.toml") == ["hihi"]
        (tmp_path / "q.toml").write_text('[[step]]\nrun = "test_echo"\ntext = "hi"\ntiems = 2\n')
        with pytest.raises(ConfigError, match="test_echo takes no argument 'tiems' \\(did you mean 'times'\\?\\)"):
            check_pipeline(tmp_path / "q.toml")
        (tmp_path / "r.toml").write_text(f'[[step]]\nrun = "test_echo"\ntext = "hi"\nsrc = "{tmp_path}/nowhere"\n')
        with pytest.raises(ConfigError, match="step 1 \\(test_echo\\): src .*nowhere does not exist"):
            check_pipeline(tmp_path / "r.toml")
        r = invoke("steps", "test_echo")
        assert r.exit_code == 0 and "times" in r.output
    finally:
        STEPS.pop("test_echo")


def test_the_command_line_loads_a_users_own_heads_from_fercache_plugins(tmp_path):
    """A head in the user's own file, named in $FERCACHE_PLUGINS, is one the command line knows."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    shutil.copy(Path(__file__).parent / "plugin_heads.py", tmp_path / "my_heads.py")
    env = {**os.environ, "FERCACHE_PLUGINS": "my_heads"}
    fercache = Path(sys.executable).parent / "fercache"
    r = subprocess.run([fercache, "heads", "test_clip_mean"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "test_clip_mean expr/clip" in " ".join(r.stdout.split()), r.stderr
    r = subprocess.run([fercache, "heads"], cwd=tmp_path, env={**env, "FERCACHE_PLUGINS": "my_haeds"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "FERCACHE_PLUGINS: cannot import 'my_haeds'" in r.stderr
