"""A run folder: `head.pt` (weights and how to rebuild the head), `config.json` (everything that produced it) and
`metrics.json` (validation metrics, the selecting split and epoch). head.pt is written last, so a folder with it
holds a whole run; a finished run with the same configuration is reused rather than trained again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import pickle
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import report
from .devices import torch_device
from .errors import ConfigError
from .heads import HeadContext, build_head
from .store import canonical, library_versions, open_store, same_location, store_name, writing

log = logging.getLogger(__name__)

#: What a run's config.json says of how its features relate to the published methods.
VARIANT = "cached features of a frozen encoder"


@dataclass(frozen=True)
class RunConfig:
    """What a run's config.json holds: everything that produced the run, read as attributes by evaluate, predict
    and the ledger. Runs saved by older versions lack some keys, which read as their defaults here."""

    head: str
    store: str
    classes: list[str]
    hp: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    output: str | None = None
    mask_source: str | None = None
    manifest: str | None = None
    views: list[str] = field(default_factory=list)
    level: str = "frame"
    seed: int = 0
    fold: int | None = None  # one fold of a protocol (folds, au-cv): the ledger pools folds like seeds
    task: str = "expr"
    device: str = "cpu"
    manifest_rows_sha256: str | None = None  # evaluate refuses the run once its labels change
    trained_with: dict = field(default_factory=dict)  # fercache version and source hash, torch version
    in_dim: int = 0
    z_dim: int | None = None
    store_fingerprint: dict = field(default_factory=dict)  # evaluate refuses the run once its store changes
    encoder_args: dict | None = None  # how to rebuild the encoder for `predict`
    variant: str = VARIANT
    mask_source_fingerprint: str | None = None  # with a mask source only

    def to_dict(self) -> dict:
        """config.json as written (and saved in head.pt and metrics.json)."""
        out = asdict(self)
        if out["mask_source_fingerprint"] is None:
            del out["mask_source_fingerprint"]
        return out

    @classmethod
    def from_dict(cls, saved: dict) -> RunConfig:
        """A config.json read back; keys it no longer has are left out. TypeError when it is not a run's (no head,
        store or classes)."""
        if not isinstance(saved, dict):
            raise TypeError(f"a run's config is a JSON object, not {type(saved).__name__}")
        if missing := [k for k in ("head", "store", "classes") if k not in saved]:
            raise TypeError(f"config.json names no {', '.join(missing)}: not a run's")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    reused: bool = False  # found finished in its folder (`fit(reuse=True)`), not trained by this call


@dataclass
class Fitted:
    """What a run fits on its validation split once trained, to turn logits into decisions and probabilities:
    per-AU thresholds (AU heads) or a softmax temperature (expression heads). Never fitted on test."""

    thresholds: np.ndarray | None = None
    temperature: float | None = None


@functools.cache
def fercache_version() -> str | None:
    return library_versions().get("fercache")  # read once: importlib.metadata takes ~10 ms, a run on the cache less


@functools.cache
def code_sha256() -> str:
    """sha256 over fercache's own source files: a head or training loop edited in a checkout (no new version
    number) is other code, so `finished_run` does not pass off a run trained by the old code as the new code's."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _changed(old, new) -> str:
    """`old -> new`, narrowed to the keys that differ when both are dicts (a recipe, hyperparameters)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in {**old, **new} if old.get(k) != new.get(k)]
        return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
    return f"{old!r} -> {new!r}"


def located(settings: dict) -> dict:
    """`settings` with its store, mask-source store and manifest file as absolute locations: a run's record of
    its data holds from any working directory, and one file spelled two ways is one file."""
    out = dict(settings)
    for k in ("store", "mask_source", "manifest"):
        v = settings.get(k)
        if v and ("://" in str(v) or Path(v).exists()):  # not "<memory>", a manifest built in code
            out[k] = canonical(v)
    return out


def refuse_other_run(run_dir: Path, settings: dict) -> None:
    """A run directory already holding a run with other settings is kept: nothing trained is lost silently."""
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return
    saved = located(json.loads(saved_path.read_text()))  # older runs may hold relative paths
    differ = [k for k,
              v in settings.items() if json.dumps(saved.get(k), sort_keys=True) != json.dumps(v, sort_keys=True)]
    if differ:
        detail = "; ".join(f"{k}: {_changed(saved.get(k), settings[k])}" for k in differ)
        raise ConfigError(f"{run_dir} holds a run trained with other settings ({detail}); "
                          "pass another --out, or --overwrite to replace it")


RUN_BUSY = ("the run folder {location} is being trained into by another process ({holder}); wait for it, or pass "
            "another --out (or --name)")


def run_lock(run_dir: Path):
    """Held while a run is trained into `run_dir` (its `.lock`): a second train-head into the same folder fails at
    once instead of both exiting 0 and the second replacing the first."""
    return writing(run_dir, RUN_BUSY, lock_file=Path(run_dir).resolve() / ".lock", transient=True)


def _what_it_is(config: dict) -> str:
    """A run's configuration as comparable text, without the device: where it trained does not change what it is."""
    return json.dumps({k: v for k, v in config.items() if k != "device"}, sort_keys=True)


def finished_run(run_dir: Path, config: RunConfig) -> RunResult | None:
    """The run saved in `run_dir`, when it is whole (head.pt is written last, and loads) and was trained with
    `config` (settings, seed, fold, store fingerprint, manifest rows, fercache version and source, torch version;
    on any device). None otherwise: nothing there, a run cut short or damaged, or other settings."""
    if not (run_dir / "head.pt").is_file():
        return None
    try:
        saved = located(json.loads((run_dir / "config.json").read_text()))
        result = json.loads((run_dir / "metrics.json").read_text())
        if _what_it_is(saved) != _what_it_is(config.to_dict()):
            return None
        load_run(run_dir)  # what evaluate will do with it: damaged weights are trained again, not reused
    except (OSError, ValueError, ConfigError):
        return None
    return RunResult(run_dir, result, reused=True)


def save_run(run_dir: Path, model: nn.Module, config: RunConfig, result: dict, fitted: Fitted) -> None:
    """head.pt marks a run (evaluate and the ledger look for it), so it is written last and by rename: a save
    killed half-way leaves no half run behind. A run saved here before goes first, with its evaluations: they
    scored weights that no longer exist."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _clear_run(run_dir)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    if result["history"]:
        sel = result["selection"]
        report.training_png(run_dir / "training.png", result["history"], sel["metric"], sel["best_epoch"],
                            f"{config.head} on {store_name(config.store)}, seed {config.seed}")
    torch.save({"state_dict": model.state_dict(), "config": config.to_dict(),
                "thresholds": None if fitted.thresholds is None else torch.as_tensor(fitted.thresholds),
                "temperature": fitted.temperature}, run_dir / "head.pt.partial")
    (run_dir / "head.pt.partial").replace(run_dir / "head.pt")


def _clear_run(run_dir: Path) -> None:
    (run_dir / "head.pt").unlink(missing_ok=True)
    evaluations = sorted(d for d in run_dir.glob("eval-*") if d.is_dir())
    for d in evaluations:
        shutil.rmtree(d)
    if evaluations:
        log.info("%s: replaced the run there, and its %d evaluation(s)", run_dir, len(evaluations))


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, RunConfig, Fitted]:
    """Rebuild a trained head from its run directory: (model, config, what it fitted on validation)."""
    path, device = Path(run_dir) / "head.pt", torch_device(device)
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no head.pt); train one with `fercache train-head`")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        model, cfg, fitted = _rebuilt(saved)
    except (RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, AttributeError) as e:
        # a file cut short or empty, not one torch wrote, or one without what a run saves
        first = (str(e).splitlines() or [""])[0].split(". ")[0]
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {first}); the run's weights are damaged: "
                          "train it again (a sweep or pipeline re-run retrains it by itself)") from None
    return model.to(device).eval(), cfg, fitted


def _rebuilt(saved: dict) -> tuple[nn.Module, RunConfig, Fitted]:
    """The head a head.pt describes, with its weights and what was fitted on validation."""
    cfg = RunConfig.from_dict(saved["config"])
    ctx = HeadContext(in_dim=cfg.in_dim, out_dim=len(cfg.classes), class_names=cfg.classes, z_dim=cfg.z_dim,
                      restore=True)
    model = build_head(cfg.head, ctx, **cfg.hp)
    model.load_state_dict(saved["state_dict"])
    thr = saved.get("thresholds")  # runs saved before temperatures existed have none: raw softmax
    return model, cfg, Fitted(None if thr is None else thr.cpu().numpy(), saved.get("temperature"))


def check_owner(folder: Path, store: str, head: str | None, what: str) -> None:
    """Refuse to train into a folder a sweep or protocol owns while runs of another store (or, for a sweep, of
    another head) lie there: the owner replaces and removes the runs it does not make, so a sweep of mask into
    the default runs/sweep would delete an earlier sweep of linear. A store moved or re-extracted is the same
    store: its path or its fingerprint matches."""
    key, others = open_store(store).fingerprint["key"], set()
    for path in folder.glob("**/config.json"):
        try:
            cfg = RunConfig.from_dict(json.loads(path.read_text()))
            theirs, their_key, their_head = cfg.store, cfg.store_fingerprint["key"], cfg.head
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a run's config
        if (not same_location(theirs, store) and their_key != key) or (head and their_head != head):
            others.add(f"{their_head} on {store_name(theirs)}")
    if others:
        raise ConfigError(f"{folder} holds runs of {', '.join(sorted(others))}, which this {what} of "
                          f"{head + ' on ' if head else ''}{store_name(store)} would replace or remove; pass another "
                          f"--out, or remove {folder} first")


def drop_numbered(parent: Path, prefix: str, keep, what: str) -> list[Path]:
    """Remove the `<prefix><N>` folders under `parent` (seed3, point017) whose N is not in `keep`: what an
    earlier call of a protocol or sweep that owns `parent` left there and this one no longer makes."""
    stale = sorted(d for d in parent.glob(f"{prefix}*") if d.is_dir() and d.name[len(prefix):].isdigit()
                   and int(d.name[len(prefix):]) not in keep)
    for d in stale:
        shutil.rmtree(d)
    if stale:
        log.info("%s: removed %d folder(s) of %s (%s)", parent, len(stale), what, ", ".join(d.name for d in stale[:5]))
    return stale
