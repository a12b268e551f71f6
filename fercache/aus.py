"""Which AU columns an AU head models: named, the top K by training positives, or those with enough of them."""

from __future__ import annotations

from .data import FeatureSet
from .errors import ConfigError, repeated


def choose_aus(aus: str | list[str], have: list[str], positives: dict[str, int], source) -> list[str]:
    """The AUs `aus` names among the manifest's columns `have`: `topK`, the K with most positives (`positives`,
    AU name -> count), in AU order; or AU numbers or names, comma-separated ("1,2,4", "AU1, AU2") or a list.
    Each AU once: one named twice would be two outputs of one AU, counted twice in every macro-F1. `train-head` and
    `au-cv` both choose here."""
    if isinstance(aus, str) and aus.strip().startswith("top"):
        k = aus.strip()[3:]
        if not k.isdigit() or int(k) < 1:
            raise ConfigError(f"--aus {aus!r}: write topK with K >= 1 (e.g. top8), or AU numbers like 1,2,4")
        return sorted(sorted(positives, key=positives.get, reverse=True)[: int(k)], key=lambda a: int(a[2:]))
    names = [a.strip() for a in (aus if isinstance(aus, list) else str(aus).split(","))]
    chosen = [f"AU{a[2:].strip()}" if a.upper().startswith("AU") else f"AU{a}" for a in names if a]
    if not chosen:
        raise ConfigError(f"--aus {aus!r} names no AU; write AU numbers like 1,2,4, or topK")
    if missing := [a for a in chosen if a not in have]:
        raise ConfigError(f"AU(s) {', '.join(missing)} not in {source}; it has {', '.join(have)}")
    if twice := repeated(chosen):
        raise ConfigError(f"--aus names {', '.join(twice)} twice; each AU once "
                          "(twice, it would count twice in every macro-F1)")
    return chosen


def select_aus(fs: FeatureSet, aus: str | list[str] | None, min_pos: int = 20) -> list[str]:
    """AU columns to model: `choose_aus`, or by default those with >= min_pos train positives."""
    if not fs.au_names:
        raise ConfigError(f"{fs.notes.get('manifest')} has no AU columns; the au head needs them")
    pos = {a: int((fs.au[fs.split == "train", i] == 1).sum()) for i, a in enumerate(fs.au_names)}
    if aus is None or aus == "":
        if chosen := [a for a in fs.au_names if pos[a] >= min_pos]:
            return chosen
        raise ConfigError(f"no AU of {fs.notes.get('manifest')} has {min_pos} training positives, the default's "
                          f"floor ({', '.join(f'{a}: {n}' for a, n in pos.items())}); name the AUs (--aus 1,2,4 or "
                          "topK)")
    return choose_aus(aus, fs.au_names, pos, fs.notes.get("manifest"))
