"""The run ledger exported to the experiment trackers labs already run: MLflow (a tracking URI: a server, a database,
or a file store) and TensorBoard (event files). Each fercache run becomes one tracked run with its settings as
parameters, its per-epoch history and validation and test metrics as metrics, and its plots and files as
artifacts. Both are optional dependencies, imported only here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ConfigError
from .runs import find_runs


@dataclass(frozen=True)
class Exported:
    """What an export did: runs written, and runs found there already (exported before) and left as they were."""

    target: str
    written: list[str]
    skipped: list[str]


def _numbers(prefix: str, d: dict) -> dict[str, float]:
    """The scalar metrics of a metrics dict, flattened one level (`val/accuracy`), booleans and lists left out."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def _params(cfg: dict) -> dict[str, str]:
    """A run's settings as flat string parameters: head, store, seed, every hyperparameter and recipe key."""
    flat = {k: cfg.get(k) for k in ("head", "store", "output", "manifest", "seed", "fold", "task", "level")}
    flat |= {f"hp.{k}": v for k, v in (cfg.get("hp") or {}).items()}
    flat |= {f"recipe.{k}": v for k, v in (cfg.get("recipe") or {}).items()}
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flat.items() if v is not None}


@dataclass(frozen=True)
class _Run:
    """One fercache run as a tracker sees it."""

    name: str  # the folder, relative to the exported root
    folder: Path
    params: dict[str, str]
    history: list[dict]  # per epoch: loss, val_<metric>
    metrics: dict[str, float]  # val/..., and <evaluation>/... for each eval-*/ beside it
    files: list[Path]  # plots and JSON files


def _runs(root: Path) -> list[_Run]:
    out = []
    for folder in find_runs(root):
        try:
            cfg = json.loads((folder / "config.json").read_text())
            met = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):  # the ledger names such folders; a tracker gets whole runs only
            continue
        metrics = _numbers("val/", met.get("val", {}))
        files = sorted(p for p in folder.glob("*") if p.suffix in (".png", ".json"))
        for ev in sorted(folder.glob("eval-*/metrics.json")):
            try:
                metrics |= _numbers(f"{ev.parent.name.removeprefix('eval-')}/", json.loads(ev.read_text()))
            except (OSError, ValueError):
                continue
            files += sorted(p for p in ev.parent.glob("*.png"))
        out.append(_Run(folder.relative_to(root).as_posix(), folder, _params(cfg), met.get("history", []),
                        metrics, files))
    return out


def to_mlflow(root: str | Path, uri: str, experiment: str | None = None) -> Exported:
    """Every run under `root` as an MLflow run in `experiment` (default: the root folder's name) at tracking `uri`.
    A run exported before (same folder, tag `fercache.run`) is left as it is."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("--to mlflow needs MLflow: pip install 'fercache[tracking]'") from None
    root = Path(root).resolve()
    client = MlflowClient(tracking_uri=uri)
    name = experiment or root.name
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    done = {r.data.tags.get("fercache.run") for r in client.search_runs([exp_id], max_results=50000)}
    written, skipped = [], []
    for run in _runs(root):
        if run.name in done:
            skipped.append(run.name)
            continue
        _mlflow_run(client, exp_id, run)
        written.append(run.name)
    return Exported(f"mlflow {uri} (experiment {name})", written, skipped)


def _mlflow_run(client, exp_id: str, run: _Run) -> None:
    tracked = client.create_run(exp_id, run_name=run.name, tags={"fercache.run": run.name,
                                                                   "fercache.folder": str(run.folder)})
    rid = tracked.info.run_id
    for k, v in run.params.items():
        client.log_param(rid, k, v[:6000])  # MLflow's limit on a parameter's value
    for epoch in run.history:
        for k, v in _numbers("", epoch).items():
            if k != "epoch":
                client.log_metric(rid, f"train/{k}", v, step=int(epoch["epoch"]))
    for k, v in run.metrics.items():
        client.log_metric(rid, k.replace("@", "at_"), v)
    for f in run.files:
        client.log_artifact(rid, str(f), artifact_path=None if f.parent == run.folder else f.parent.name)
    client.set_terminated(rid)


def to_tensorboard(root: str | Path, logdir: str | Path) -> Exported:
    """Every run under `root` as TensorBoard event files under `logdir/<run folder>`: its settings as text, the
    per-epoch history as scalars over epochs, the validation and test metrics, the plots as images. A run whose
    folder under `logdir` holds events already is left as it is."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--to tensorboard needs TensorBoard: pip install 'fercache[tracking]'") from None
    root, logdir = Path(root).resolve(), Path(logdir)
    written, skipped = [], []
    for run in _runs(root):
        there = logdir / run.name
        if any(there.glob("events.out.tfevents.*")):
            skipped.append(run.name)
            continue
        with SummaryWriter(log_dir=str(there)) as w:
            _tensorboard_run(w, run)
        written.append(run.name)
    return Exported(f"tensorboard {logdir}", written, skipped)


def _tensorboard_run(w, run: _Run) -> None:
    import numpy as np
    from PIL import Image

    w.add_text("settings", "\n".join(f"    {k} = {v}" for k, v in run.params.items()))
    for epoch in run.history:
        for k, v in _numbers("", epoch).items():
            if k != "epoch":
                w.add_scalar(f"train/{k}", v, int(epoch["epoch"]))
    for k, v in run.metrics.items():
        w.add_scalar(k, v, 0)
    for f in (p for p in run.files if p.suffix == ".png"):
        tag = f.stem if f.parent == run.folder else f"{f.parent.name}/{f.stem}"
        w.add_image(tag, np.asarray(Image.open(f).convert("RGB")), 0, dataformats="HWC")


#: `fercache runs DIR --to KIND TARGET`.
EXPORTERS: dict[str, Callable[[Path, str], Exported]] = {"mlflow": to_mlflow, "tensorboard": to_tensorboard}
