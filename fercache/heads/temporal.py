"""Temporal model with learnable text prompts (DFER-CLIP), on cached per-frame features.

Documented variant: the image encoder stays frozen (the paper fine-tunes it at lr 1e-5), and frames
come from the cache, so every epoch resamples T segment frames from each clip's cached frames.

- Frames: a clip is cut into T equal segments, one frame from each (random position while
  training, the middle while evaluating).
- Temporal model: learnable class token + T+1 position embeddings, one transformer encoder layer
  (width 512, 8 heads, MLP 1024); the class token's output is the video feature v.
- Classifier `prompts`: per class, M learnable context vectors followed by the tokens of a
  description of the face (resources/class_descriptions.json), encoded by the store's own frozen
  CLIP text tower to t_c; logits = cos(v, t_c) / 0.01. Classifier `linear`: a linear layer on v,
  for encoders without a text tower (the ablation baseline, and the offline stand-in).
- `pool="mean"` replaces the transformer by the average of the sampled frames: the paper's
  "linear probe on averaged frame features" baseline.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import has_text_tower, text_tower
from ..errors import ConfigError, EncoderError
from ._registry import BASE_RECIPE, Head, HeadContext, feature_scale, register_head
from .zeroshot import text_classifier

log = logging.getLogger(__name__)


def class_descriptions(path: str | Path | None = None) -> dict[str, str]:
    """Class -> description of the face: the bundled file, or a user's JSON file of the same shape."""
    text = (Path(path).read_text() if path
            else (resources.files("fercache") / "resources" / "class_descriptions.json").read_text())
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def segment_indices(lengths: torch.Tensor, t: int, train: bool) -> torch.Tensor:
    """[B, t] frame indices: clip i cut into t equal segments of its lengths[i] frames, one index per segment.

    Training takes a uniformly random position in each segment, evaluation the middle; a clip shorter
    than t repeats frames, as the published sampler does.
    """
    k = torch.arange(t, device=lengths.device, dtype=torch.float32)[None]
    offset = torch.rand(len(lengths), t, device=lengths.device) if train else torch.full((1, t), 0.5,
                                                                                         device=lengths.device)
    n = lengths.to(torch.float32)[:, None]
    return torch.minimum(((k + offset) * n / t).floor().long(), lengths[:, None] - 1)


class PromptText(nn.Module):
    """Text features t_c of `M learnable vectors + description` prompts through a frozen open_clip text tower.

    The context vectors are spliced in by a forward hook on the tower's token embedding, so the tower runs
    its own code path (positional embedding, causal mask, EOT pooling, projection) unchanged.
    """

    def __init__(self, clip_model=None, tokenizer=None, descriptions: list[str] | None = None, n_ctx: int = 8,
                 position: str = "end", shared: bool = False):
        super().__init__()
        self.n_ctx = n_ctx
        object.__setattr__(self, "clip", clip_model)  # frozen and not a submodule: not trained, not saved
        if clip_model is None:  # restoring a saved head: shapes come from the saved state (see _load_from_state_dict)
            self.ctx = None  # forward() needs the tower, which a restored head does not have
            self.register_buffer("tokens", None)
            return
        object.__setattr__(self, "embedding", _token_embedding(clip_model))  # the tower's own: not saved here
        tokens = tokenizer([_with_placeholders(d, n_ctx, position) for d in descriptions])
        # where each prompt's context vectors go: the placeholder tokens, wherever the description left them
        self.register_buffer("slots", _placeholder_slots(tokens, tokenizer, n_ctx), persistent=False)
        if (tokens[:, -1] != 0).any():
            longest = int((tokens != 0).sum(1).max())
            raise ConfigError(f"a prompt of {n_ctx} context vectors + description fills the "
                              f"text tower's {tokens.shape[1]} tokens (longest needs "
                              f"{longest}+); shorten the description or lower n_ctx")
        self.register_buffer("tokens", tokens)
        width = self.embedding.weight.shape[1]
        # class-specific context (the paper's), or one context every class shares (CoOp's unified context)
        self.ctx = nn.Parameter(torch.randn(1 if shared else len(descriptions), n_ctx, width) * 0.02)  # CoOp's init
        for p in clip_model.parameters():
            p.requires_grad_(False)
        clip_model.eval()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.ctx is None:  # a restored head: take the saved shapes
            self.ctx = nn.Parameter(torch.empty_like(state_dict[prefix + "ctx"]))
            self.tokens = torch.empty_like(state_dict[prefix + "tokens"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self) -> torch.Tensor:
        if self.clip is None:
            raise EncoderError("this temporal head was restored without its CLIP text tower; it predicts from the "
                               "text features saved at training time")
        if next(self.clip.parameters()).device != self.ctx.device:
            self.clip.to(self.ctx.device)
        rows = torch.arange(len(self.tokens), device=self.slots.device)[:, None]

        def splice(module, inputs, out):
            out = out.clone()
            out[rows, self.slots] = self.ctx.to(out.dtype).expand(len(out), -1, -1)
            return out

        handle = self.embedding.register_forward_hook(splice)
        try:
            return self.clip.encode_text(self.tokens)
        finally:
            handle.remove()


#: Where the description sits in the prompt, around the learnable context ("end": after it, as published).
POSITIONS = ("end", "middle", "front")


def _with_placeholders(description: str, n_ctx: int, position: str) -> str:
    """The prompt text with one placeholder word per context vector, the description at `position`."""
    half = n_ctx // 2
    words = {"end": (n_ctx, 0), "middle": (half, n_ctx - half), "front": (0, n_ctx)}[position]
    return " ".join(["X"] * words[0] + [description] + ["X"] * words[1])


def _placeholder_slots(tokens: torch.Tensor, tokenizer, n_ctx: int) -> torch.Tensor:
    """[C, n_ctx] token positions of each prompt's placeholders; refused unless 'X' is one token found exactly
    n_ctx times in every prompt (a description using the word 'x' would take a context vector's place)."""
    plain = tokenizer(["X"])[0]
    marker = plain[(plain != 0)][1] if int((plain != 0).sum()) == 3 else None  # start, X, end
    hits = tokens == marker if marker is not None else torch.zeros_like(tokens, dtype=torch.bool)
    if marker is None or not (hits.sum(1) == n_ctx).all():
        raise ConfigError("could not place the prompt context: this tokenizer does not make 'X' one token, or a "
                          "description contains the word 'x'")
    return hits.nonzero()[:, 1].reshape(len(tokens), n_ctx)


def _token_embedding(clip_model) -> nn.Embedding:
    text = getattr(clip_model, "text", None)  # the tower of a model whose text side is a module of its own
    emb = getattr(clip_model, "token_embedding", None) or getattr(text, "token_embedding", None)
    if not isinstance(emb, nn.Embedding):
        raise EncoderError("learnable prompts need an open_clip text transformer with a token embedding; "
                           "this model's text tower has none. Use --hp classifier=linear")
    return emb


#: The published two-rate recipe; `max_frames` caps the cached frames a clip is resampled from.
TEMPORAL_RECIPE = {**BASE_RECIPE, "optimizer": "sgd", "momentum": 0.9, "lr": 1e-2, "prompt_lr": 1e-3,
                   "weight_decay": 1e-4, "epochs": 50, "scheduler": "multistep", "milestones": [30, 40], "gamma": 0.1,
                   "batch_size": 48, "max_frames": 64}


class TemporalHead(Head):
    """Clip-level head: x is [B, F, D] cached frame features with `lengths` valid frames per clip."""


    def __init__(self, in_dim: int, out_dim: int, *, segments: int, width: int, heads: int, mlp: int, pool: str,
                 classifier: str, prompt: PromptText | None, text: torch.Tensor | None, scale: float,
                 standardize: bool, layers: int = 1):
        super().__init__()
        self.segments, self.pool, self.scale, self.standardize = segments, pool, scale, standardize
        # As in the linear probe: a frozen standardiser (train statistics) makes one lr fit every encoder's scale.
        self.register_buffer("mu", torch.zeros(in_dim))
        self.register_buffer("sigma", torch.ones(in_dim))
        feat = in_dim
        if pool == "transformer":
            self.proj_in = nn.Linear(in_dim, width) if width != in_dim else nn.Identity()
            self.cls = nn.Parameter(torch.zeros(1, 1, width))
            self.pos = nn.Parameter(torch.randn(1, segments + 1, width) * 0.02)
            layer = lambda: nn.TransformerEncoderLayer(width, heads, mlp, dropout=0.0,  # noqa: E731
                                                       activation="gelu", batch_first=True, norm_first=True)
            # one layer as published (and as runs saved before `layers` existed hold it); more for the depth ablation
            self.encoder = layer() if layers == 1 else nn.Sequential(*[layer() for _ in range(layers)])
            self.norm = nn.LayerNorm(width)
            feat = width
        self.classifier, self.prompt = classifier, prompt
        if classifier == "linear":
            self.fc = nn.Linear(feat, out_dim)
        else:  # v must live in the CLIP joint space, where the store's embeddings are
            self.proj_out = nn.Linear(feat, in_dim) if feat != in_dim else nn.Identity()
            # t_c: fixed (handwritten), or the learned prompts' as of the last evaluation; saved with the head either
            # way
            self.register_buffer("text", torch.zeros(out_dim, in_dim) if text is None else text)

    def fit_stats(self, batch: dict) -> None:
        """Per-channel mean and std over the valid training frames (padding excluded)."""
        if self.standardize:
            x, lengths = batch["x"], batch["lengths"]
            frames = x[torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]].float()
            self.mu.copy_(frames.mean(0))
            self.sigma.copy_(feature_scale(frames))

    def video_feature(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        idx = segment_indices(lengths, self.segments, self.training)
        frames = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1])).float()  # [B, T, D]
        frames = (frames - self.mu) / self.sigma
        if self.pool == "mean":
            return frames.mean(1)
        h = self.proj_in(frames)
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1) + self.pos
        return self.norm(self.encoder(h))[:, 0]

    def text_features(self) -> torch.Tensor:
        """t_c: recomputed through the text tower when it is attached (training, and the evaluations that select)."""
        if self.prompt is not None and self.prompt.clip is not None:
            t = self.prompt()
            if not self.training:
                self.text.copy_(t.detach())
            return t
        return self.text

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3:
            raise ConfigError(f"the temporal head takes clips [B, frames, D]; got a tensor of shape {tuple(x.shape)}")
        if lengths is None:
            lengths = torch.full((len(x),), x.shape[1], device=x.device, dtype=torch.long)
        v = self.video_feature(x, lengths)
        if self.classifier == "linear":
            return self.fc(v)
        v = F.normalize(self.proj_out(v), dim=-1)
        return self.scale * v @ F.normalize(self.text_features(), dim=-1).T

    def logits(self, batch: dict) -> torch.Tensor:
        return self(batch["x"], None, batch.get("lengths"))

    def solve(self, train: dict, val_score, recipe: dict) -> dict | None:
        """Nothing to train (mean pooling against fixed hand-written prompts: clip-level zero-shot): no epochs run."""
        if any(p.requires_grad for p in self.parameters()):
            return None
        return {"method": "nothing trained: averaged frame features against fixed text prompts (clip-level "
                          "zero-shot)"}

    def param_groups(self, recipe: dict) -> list[dict]:
        """The temporal model at lr, the prompt context at prompt_lr (the published two-rate recipe)."""
        prompt = [p for n, p in self.named_parameters() if n.startswith("prompt.")]
        rest = [p for n, p in self.named_parameters() if not n.startswith("prompt.")]
        return [{"params": rest,
                 "lr": recipe["lr"]}] + ([{"params": prompt, "lr": recipe["prompt_lr"]}] if prompt else [])


def _prompt_text(ctx: HeadContext, n_ctx: int, descriptions: str | None, position: str, shared: bool) -> PromptText:
    table = class_descriptions(descriptions)
    missing = [c for c in ctx.class_names if c not in table]
    if missing:
        raise ConfigError(f"no description for class(es) {missing} in {descriptions or 'the bundled descriptions'}")
    model, tokenizer = text_tower(ctx.store_meta)
    with torch.no_grad():
        text_dim = model.encode_text(tokenizer(["a face"])).shape[-1]
    if text_dim != ctx.in_dim:
        raise ConfigError(f"prompts compare the video feature with {text_dim}-d text features, but the store's "
                          f"features are {ctx.in_dim}-d; train on the store's 'embedding' output (--output embedding)")
    return PromptText(model, tokenizer, [table[c] for c in ctx.class_names], n_ctx, position, shared)


@register_head("temporal", level="clip", recipe=TEMPORAL_RECIPE)
def temporal(ctx: HeadContext, *, classifier: str = "auto", pool: str = "transformer", segments: int = 16,
             width: int = 512, heads: int = 8, mlp: int = 1024, n_ctx: int = 8, scale: float = 100.0,
             descriptions: str | None = None, standardize: bool | None = None, layers: int = 1,
             position: str = "end", shared_ctx: bool = False) -> TemporalHead:
    """Clip-level temporal model with learnable prompts (DFER-CLIP, frozen encoder).

    classifier: `prompts` (learnable context + descriptions; needs a CLIP store), `handwritten` (fixed
    "a photo of a <class> face." prompts: the paper's ablation), `linear`, or `auto` (prompts when the
    store has a text tower, else linear). pool: `transformer`, or `mean` (the averaged-frames baseline;
    with `handwritten`, nothing is trained: clip-level zero-shot). Ablations: `layers` (transformer depth,
    published 1), `position` of the description after (`end`, published), around (`middle`) or before
    (`front`) the n_ctx context vectors, `shared_ctx` (one context for all classes; published: per class).
    """
    if classifier not in ("auto", "prompts", "handwritten", "linear") or pool not in ("transformer", "mean"):
        raise ConfigError("classifier must be auto|prompts|handwritten|linear and pool transformer|mean; "
                          f"got {classifier!r}, {pool!r}")
    if position not in POSITIONS or layers < 1 or n_ctx < 1:
        raise ConfigError(f"position must be {'|'.join(POSITIONS)}, layers and n_ctx at least 1; got {position!r}, "
                          f"{layers}, {n_ctx}")
    if classifier == "auto" and not ctx.restore:
        classifier = "prompts" if has_text_tower(ctx.store_meta) else "linear"
        if classifier == "linear":
            log.info("temporal head: the store's encoder has no text tower; using a linear classifier")
    if classifier in ("prompts", "handwritten") and not ctx.restore and not has_text_tower(ctx.store_meta):
        raise EncoderError(f"the {classifier} classifier needs a CLIP text tower; this store was built with "
                           f"{ctx.store_meta['fingerprint']['encoder']['name'] if ctx.store_meta else 'no store'}. "
                           "Use --hp classifier=linear")
    prompt, text = None, None
    if classifier == "prompts":
        prompt = PromptText(n_ctx=n_ctx) if ctx.restore else _prompt_text(ctx, n_ctx, descriptions, position,
                                                                           shared_ctx)
    if classifier == "handwritten" and not ctx.restore:
        text = text_classifier(ctx.store_meta, ctx.class_names, templates=("a photo of a {} face.",))
    if standardize is None:  # prompts compare with CLIP text features: keep the frames in CLIP's own space
        standardize = classifier == "linear"
    head = TemporalHead(ctx.in_dim, ctx.out_dim, segments=segments, width=width, heads=heads, mlp=mlp, pool=pool,
                        classifier=classifier, prompt=prompt, text=text, scale=scale, standardize=standardize,
                        layers=layers)
    # saved with the run, so a restore rebuilds the same head
    head.resolved_hp = {"classifier": classifier, "standardize": standardize}
    return head

