"""Zero-shot CLIP: cosine between the image embedding and each class's text embedding, averaged over prompts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..encoders import text_tower
from ._registry import BASE_RECIPE, Head, HeadContext, register_head

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


def text_classifier(store_meta: dict, class_names: list[str], templates=TEMPLATES) -> torch.Tensor:
    """[C, E] unit text embeddings of the store's own CLIP model, averaged over templates."""
    model, tokenizer = text_tower(store_meta)
    rows = []
    with torch.no_grad():
        for name in class_names:
            emb = model.encode_text(tokenizer([t.format(CLASS_WORDS[name]) for t in templates]))
            rows.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


class ZeroShot(Head):
    def __init__(self, text: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("text", text)
        self.scale = scale

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=-1) @ self.text.T


# compares the image embedding with text embeddings: the store's `embedding` output and its text tower
@register_head("zeroshot", recipe={**BASE_RECIPE, "epochs": 0}, feature_output="embedding", text_tower=True,
               trainable=False)
def zeroshot(ctx: HeadContext, *, scale: float = 100.0) -> ZeroShot:
    """CLIP zero-shot classifier from prompt templates; refused for encoders without a text tower."""
    if ctx.restore:
        return ZeroShot(torch.zeros(ctx.out_dim, ctx.in_dim), scale)
    return ZeroShot(text_classifier(ctx.store_meta, ctx.class_names), scale)
