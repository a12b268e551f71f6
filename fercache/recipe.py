"""A training recipe and the seeds a run trains with: what each key accepts, checked before any work.

A head's published recipe (its registration) with a user's overrides is one `Recipe`, validated once; a head
may read keys of its own (the temporal head's `max_frames`), which take values of its published default's kind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, did_you_mean, repeated
from .heads import HEADS

#: The validation metric that chooses the epoch, per task (recipe key `select` picks another of SELECTABLE).
SELECT_METRIC = {"expr": "accuracy", "au": "macro_f1_at_0.5"}
SELECTABLE = {"expr": ("accuracy", "uar", "macro_f1"), "au": ("macro_f1_at_0.5",)}

#: Recipe keys the trainer reads for every head; a head's own recipe may add keys (the temporal head's max_frames).
TRAINER_KEYS = frozenset({"optimizer", "lr", "weight_decay", "epochs", "batch_size", "scheduler", "sam_rho", "gamma",
                          "eta_min", "milestones", "momentum", "balance", "select", "shots", "fraction", "views"})

#: Recipe key `balance`: each training row is drawn with probability proportional to count(its class) ** -power,
#: with replacement, as many draws per epoch as rows. "class" gives every class the same share of the batches
#: (what UAR rewards on skewed sets such as FER2013's disgust, 1.5% of it); "sqrt" goes half way.
BALANCE = {"none": 0.0, "sqrt": 0.5, "class": 1.0}


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = (None, "exponential", "cosine", "cosine_quarter", "multistep")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: What each trainer key accepts. A value outside it would crash mid-run (lr="abc" in the optimiser) or, worse,
#: train something else than asked without a word (an unknown scheduler name would be no schedule at all).
RECIPE_VALUES = {
    "optimizer": (lambda v: v in OPTIMIZERS, "adam, adamw or sgd"),
    "lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "epochs": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    "batch_size": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "scheduler": (lambda v: v in SCHEDULERS, "null, " + ", ".join(SCHEDULERS[1:])),
    "sam_rho": (lambda v: _number(v) and v >= 0, "a number >= 0 (0: plain steps, no SAM)"),
    "gamma": (lambda v: _number(v) and v > 0, "a number > 0"),
    "eta_min": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "milestones": (lambda v: isinstance(v, list) and all(_whole(e) and e >= 1 for e in v), "a list of epochs, "
                                                                                           "e.g. [30, 40]"),
    # a view named twice trained as once, while the saved recipe (and a sweep point's key) said twice
    "views": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v) and not repeated(v),
              'a list of the store\'s views, each once, e.g. ["flip", "erase"]'),
    "momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
}


def _like_default(default) -> tuple:
    """A head's own recipe key (max_frames, prompt_lr, max_iter) takes a value of its published default's kind."""
    if _whole(default):
        return lambda v: _whole(v) and v >= 1, f"a whole number >= 1 (published: {default})"
    if _number(default):
        return lambda v: _number(v) and v > 0, f"a number > 0 (published: {default})"
    return lambda v: True, ""


def _check_values(head: str, r: dict) -> None:
    published = HEADS.lookup(head).recipe
    for key, value in r.items():
        ok, what = RECIPE_VALUES.get(key) or _like_default(published.get(key))
        if not ok(value):
            raise ConfigError(f"recipe {key}={value!r}: {what}")
    if published.get("epochs") and r.get("epochs") == 0:
        raise ConfigError(f"epochs=0: head {head!r} is trained by epochs, and 0 would save it untrained")


def recipe_keys(head: str) -> frozenset[str]:
    """Every recipe key `head` trains with: the trainer's and its own."""
    return TRAINER_KEYS | set(HEADS.lookup(head).recipe)


def check_recipe(head: str, r: dict, task: str) -> None:
    """Refuse what training would otherwise ignore or misread: a misspelt key, an unknown balance or metric."""
    known = recipe_keys(head)
    unknown = sorted(set(r) - known)
    if unknown:
        hints = [f"{k!r}{did_you_mean(k, known)}" for k in unknown]
        raise ConfigError(f"head {head!r} has no recipe key {', '.join(hints)}; it reads: {', '.join(sorted(known))}")
    _check_values(head, r)
    if r.get("balance", "none") not in BALANCE:
        raise ConfigError(f"balance={r['balance']!r}: choose from {', '.join(BALANCE)}")
    if r.get("balance", "none") != "none" and task != "expr":
        raise ConfigError("balance samples rows by their class: expression heads only (an AU row has many labels)")
    if r.get("select", SELECT_METRIC[task]) not in SELECTABLE[task]:
        raise ConfigError(f"select={r['select']!r}: an {task} head is selected on {', '.join(SELECTABLE[task])}")
    _check_subset(r, task)


def _check_subset(r: dict, task: str) -> None:
    """Recipe keys `shots` (training units per class) and `fraction` (of the training units): data-efficiency
    curves are a sweep axis (`--axis shots=1,4,16,64`)."""
    shots, fraction = r.get("shots"), r.get("fraction")
    if shots is not None and fraction is not None:
        raise ConfigError("give shots (units per class) or fraction (of the training units), not both")
    if shots is not None and (task != "expr" or not _whole(shots) or shots < 1):
        raise ConfigError(f"shots={shots!r}: a whole number >= 1 of training units per class, for expression heads "
                          "(AU heads: fraction)")
    if fraction is not None and (not _number(fraction) or not 0 < fraction <= 1):
        raise ConfigError(f"fraction={fraction!r}: a number in (0, 1]")


#: torch seeds its generators with an unsigned 64-bit number, and JSON readers keep 2**63 - 1 exactly.
MAX_SEED = 2**63 - 1


def check_seeds(seeds) -> None:
    """Seeds are distinct whole numbers >= 0. A repeated seed would train into its own folder (seed<N>/) again and
    count twice in the mean, its std shrunk by a copy of itself: '2 seeds' that are one run."""
    seeds = list(seeds)
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ConfigError(f"seeds {seeds}: give one or more whole numbers >= 0")
    if big := [s for s in seeds if s > MAX_SEED]:
        raise ConfigError(f"seed {big[0]} is over {MAX_SEED} (2**63 - 1), the largest seed fercache records")
    if twice := repeated(seeds):
        raise ConfigError(f"seeds {seeds} repeat {', '.join(map(str, twice))}: each seed is one run, in its own "
                          "folder seed<N>/; give distinct seeds")


@dataclass(frozen=True, eq=False)
class Recipe(Mapping):
    """A head's published recipe with a user's overrides, validated once (`Recipe.of`). The trainer's keys read
    as attributes; every key, a head's own ones included (the temporal head's `max_frames` and `prompt_lr`,
    logreg's `max_iter`), reads as in the dict it is saved as (`recipe["max_frames"]`)."""

    head: str
    task: str
    values: dict

    @classmethod
    def of(cls, head: str, overrides: Mapping | None = None) -> Recipe:
        """`head`'s published recipe updated with `overrides`, checked (ConfigError) before any work."""
        if isinstance(overrides, Recipe) and overrides.head == head:
            return overrides
        spec = HEADS.lookup(head)
        values = {**spec.recipe, **(overrides or {})}
        check_recipe(head, values, spec.task)
        return cls(head, spec.task, values)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __iter__(self):
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def to_dict(self) -> dict:
        """As config.json saves it."""
        return dict(self.values)

    @property
    def epochs(self) -> int:
        return self.values["epochs"]

    @property
    def batch_size(self) -> int:
        return self.values["batch_size"]

    @property
    def sam_rho(self) -> float:
        return self.values.get("sam_rho") or 0.0

    @property
    def balance(self) -> str:
        return self.values.get("balance", "none")

    @property
    def select(self) -> str:
        """The validation metric that chooses the epoch (and logreg's l2)."""
        return self.values.get("select", SELECT_METRIC[self.task])

    @property
    def views(self) -> list[str] | None:
        """The store's cached views to train with; None: all it holds."""
        return self.values.get("views")

    @property
    def shots(self) -> int | None:
        return self.values.get("shots")

    @property
    def fraction(self) -> float | None:
        return self.values.get("fraction")
