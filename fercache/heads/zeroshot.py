"""Zero-shot CLIP (METHODS.md §4): cosine between the image embedding and prompt-averaged class text embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import EncoderError
from ._registry import Head, HeadContext, register_head

TEMPLATES = (
    "a photo of a {} face.",
    "a photo of a person looking {}.",
    "a close-up photo of a face with a {} expression.",
    "a face that looks {}.",
)
#: How each canonical class reads inside a prompt.
CLASS_WORDS = {
    "neutral": "neutral", "happy": "happy", "sad": "sad", "surprise": "surprised", "fear": "fearful",
    "disgust": "disgusted", "anger": "angry", "contempt": "contemptuous", "other": "unusual",
    "anxiety": "anxious", "helplessness": "helpless", "disappointment": "disappointed",
}


def has_text_tower(store_meta: dict) -> bool:
    """True when the store came from an open_clip model (which has a text tower)."""
    return bool(store_meta) and store_meta["fingerprint"]["encoder"]["name"].startswith("open_clip:")


def require_text_tower(store_meta: dict) -> None:
    """Raise unless the store came from an open_clip model (which has a text tower)."""
    name = store_meta["fingerprint"]["encoder"]["name"]
    if not has_text_tower(store_meta):
        raise EncoderError(f"zeroshot needs a CLIP text tower; this store was built with {name}. "
                           "Use a store extracted with --encoder open_clip:<model>.")


def text_classifier(store_meta: dict, class_names: list[str], templates=TEMPLATES) -> torch.Tensor:
    """[C, E] unit text embeddings of the store's own CLIP model, averaged over templates."""
    import open_clip

    from ..encoders import encoder_of

    require_text_tower(store_meta)
    enc = encoder_of(store_meta)
    model = enc.extra["clip_model"]
    tokenizer = open_clip.get_tokenizer(enc.name.split(":", 1)[1])
    rows = []
    with torch.no_grad():
        for name in class_names:
            emb = model.encode_text(tokenizer([t.format(CLASS_WORDS[name]) for t in templates]))
            rows.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


class ZeroShot(Head):
    trainable = False
    feature_output = "embedding"
    recipe = {**Head.recipe, "epochs": 0}

    def __init__(self, text: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("text", text)
        self.scale = scale

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=-1) @ self.text.T


@register_head("zeroshot")
def zeroshot(ctx: HeadContext, *, scale: float = 100.0) -> ZeroShot:
    """CLIP zero-shot classifier from prompt templates; refused for encoders without a text tower."""
    if ctx.restore:
        return ZeroShot(torch.zeros(ctx.out_dim, ctx.in_dim), scale)
    return ZeroShot(text_classifier(ctx.store_meta, ctx.class_names), scale)
