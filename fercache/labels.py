"""The canonical expression label space and every dataset's native label order.

Datasets disagree on class order (FER2013's 0 is angry, AffectNet's 0 is
neutral). Manifests store canonical *names*, never native integers, so a
label can never be silently reinterpreted in another order.
"""

from __future__ import annotations

from .errors import ManifestError

#: Canonical order (docs/manifests.md), then "other" and MAFW's compound classes.
CANONICAL: tuple[str, ...] = (
    "neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt",
    "other", "anxiety", "helplessness", "disappointment",
)

#: Native integer codes -> canonical names, one table per dataset file format.
NATIVE: dict[str, dict[int, str]] = {
    # FER2013 csv `emotion` column.
    "fer2013": {0: "anger", 1: "disgust", 2: "fear", 3: "happy", 4: "sad", 5: "surprise", 6: "neutral"},
    # RAF-DB basic list_patition_label.txt.
    "rafdb": {1: "surprise", 2: "fear", 3: "disgust", 4: "happy", 5: "sad", 6: "anger", 7: "neutral"},
    # AffectNet `expression`; 8 none, 9 uncertain, 10 no-face are dropped by the adapter.
    "affectnet": {0: "neutral", 1: "happy", 2: "sad", 3: "surprise", 4: "fear", 5: "disgust", 6: "anger",
                  7: "contempt"},
    # ExpW label.lst, last column.
    "expw": {0: "anger", 1: "disgust", 2: "fear", 3: "happy", 4: "sad", 5: "surprise", 6: "neutral"},
    # CK+ Emotion_labels codes.
    "ckplus": {0: "neutral", 1: "anger", 2: "contempt", 3: "disgust", 4: "fear", 5: "happy", 6: "sad", 7: "surprise"},
    # Aff-Wild2 (ABAW) expression files: header order, -1 = not annotated.
    "affwild2": {0: "neutral", 1: "anger", 2: "disgust", 3: "fear", 4: "happy", 5: "sad", 6: "surprise", 7: "other"},
    # DFEW single-label annotations.
    "dfew": {1: "happy", 2: "sad", 3: "neutral", 4: "anger", 5: "surprise", 6: "disgust", 7: "fear"},
    # FERV39k class index order (alphabetical class names).
    "ferv39k": {0: "anger", 1: "disgust", 2: "fear", 3: "happy", 4: "neutral", 5: "sad", 6: "surprise"},
    # MAFW single-label set: 11 classes, 1-based.
    "mafw": {1: "anger", 2: "disgust", 3: "fear", 4: "happy", 5: "neutral", 6: "sad", 7: "surprise",
             8: "contempt", 9: "anxiety", 10: "helplessness", 11: "disappointment"},
}

#: FERPlus vote columns, in file order; the last two are not expressions.
FERPLUS_VOTES: tuple[str, ...] = (
    "neutral", "happy", "surprise", "sad", "anger", "disgust", "fear", "contempt", "unknown", "NF",
)

#: JAFFE file-name codes (`KA.AN1.39.tiff`).
JAFFE_CODES: dict[str, str] = {
    "AN": "anger", "DI": "disgust", "FE": "fear", "HA": "happy", "NE": "neutral", "SA": "sad", "SU": "surprise",
}

#: Aff-Wild2 (ABAW) AU file header order.
AFFWILD2_AUS: tuple[int, ...] = (1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26)

#: Spellings found in folder names and csv headers -> canonical names.
SYNONYMS: dict[str, str] = {
    "angry": "anger", "anger": "anger", "disgust": "disgust", "disgusted": "disgust",
    "fear": "fear", "fearful": "fear", "scared": "fear", "happy": "happy", "happiness": "happy",
    "neutral": "neutral", "sad": "sad", "sadness": "sad", "surprise": "surprise",
    "surprised": "surprise", "contempt": "contempt", "other": "other", "anxiety": "anxiety",
    "helplessness": "helplessness", "disappointment": "disappointment",
}


def canonical_name(raw: str, where: str = "") -> str:
    """Map a class spelling (folder name, header cell) to its canonical name."""
    key = raw.strip().lower()
    if key not in SYNONYMS:
        raise ManifestError(f"{where}unknown expression label {raw!r}; known spellings: {', '.join(sorted(SYNONYMS))}")
    return SYNONYMS[key]


def from_native(dataset: str, code: int, where: str = "") -> str:
    """Map a dataset's native integer code to its canonical name."""
    table = NATIVE[dataset]
    if code not in table:
        raise ManifestError(f"{where}label {code} is not a {dataset} code; expected one of {sorted(table)}")
    return table[code]


def sorted_labels(names) -> list[str]:
    """Distinct names in canonical order (the class order a head predicts in)."""
    return sorted(set(names), key=CANONICAL.index)
