"""CLIP image encoder through open_clip, plus the text embeddings of expression prompts.

Stage one caches the *unnormalised* ``encode_image`` output (heads may normalise; the norm is information a
cache should not throw away) and, once per cache, the encoded prompts ``prompt_template.format(emotion=w)``
for the eight Aff-Wild2 expressions, so that stage two (zero-shot or contrastive heads) never loads CLIP.

Weights (``clip_pretrained``, what ``--weights`` sets), through the one resolver (encoders/weights.py):
- an open_clip tag such as ``openai`` (``named_weights``: the tags open_clip knows for the model) -> the file
  in the user cache (``$ABAWFEAT_HOME/weights/open_clip/<model>/<tag>/<file>``), downloaded there when
  online. The tag also fixes preprocessing and QuickGELU, exactly as open_clip pairs them;
- a path to a checkpoint file -> loaded strictly; a file written by ``save_weights`` (fine-tuning) carries
  its model name, QuickGELU and preprocessing, and is rebuilt with them; any other file gets the model
  config's own preprocessing;
- ``None`` / ``"random"`` (or ``random_init=True``) -> seeded random weights, for tests and demos.

Fine-tuning trains the image tower only (``blocks``: embedding, each transformer block, final norm and
projection); the text tower, which only encodes the prompts, stays frozen.

open_clip is imported only when a CLIP encoder is described or built.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from abawfeat.constants import EXPR_CLASSES
from abawfeat.encoders.base import (
    ENCODERS,
    RANDOM_INIT,
    Block,
    Encoder,
    EncoderInfo,
    ImageTransform,
)
from abawfeat.encoders.weights import NamedWeights
from abawfeat.errors import CheckpointError, ConfigError
from abawfeat.utils.io import torch_save

# Lower-case wording of EXPR_CLASSES (same order) that reads well after "a face showing ...".
DEFAULT_PROMPT_WORDS: tuple[str, ...] = (
    "a neutral expression", "anger", "disgust", "fear",
    "happiness", "sadness", "surprise", "some other emotion",
)
DEFAULT_TEMPLATE = "a face showing {emotion}"
_RANDOM_SPECS = ("", "none", "random", RANDOM_INIT)
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's own preference
# Key of what ``save_weights`` stores beside open_clip's ``state_dict`` (open_clip ignores other keys).
_META_KEY = "abawfeat_clip"
_META_FORMAT = "abawfeat-clip-weights"
# Members of open_clip's VisionTransformer that run before its transformer blocks; the rest run after.
_VIT_STEM = ("conv1", "class_embedding", "positional_embedding", "patch_dropout", "ln_pre")


@dataclass
class CLIPConfig:
    # open_clip model config name (see open_clip.list_models()); ViT-B-32 is the paper's CLIP.
    clip_model: str = "ViT-B-32"
    # An open_clip pretrained tag for that model, a path to a checkpoint file, or None/"random".
    clip_pretrained: str | None = "openai"
    # Seeded random weights instead of any pretrained ones (tests, demos).
    random_init: bool = False
    seed: int = 0
    # Prompts encoded for text_embeddings(): template.format(emotion=word), one per EXPR_CLASSES entry.
    prompt_template: str = DEFAULT_TEMPLATE
    prompt_words: tuple[str, ...] = DEFAULT_PROMPT_WORDS


def _open_clip() -> Any:
    import open_clip

    return open_clip


def _check_model_name(name: str) -> None:
    oc = _open_clip()
    if ":" in name:
        raise ConfigError(f"clip_model {name!r}: use a built-in open_clip model name "
                          "and clip_pretrained=<file>")
    if name not in oc.list_models():
        close = [m for m in oc.list_models() if name.lower().split("-")[0] in m.lower()][:8]
        raise ConfigError(f"unknown clip_model {name!r} (e.g. {', '.join(close) or 'ViT-B-32, ViT-B-16'})")


def tag_weights(model: str, tag: str) -> NamedWeights:
    """An open_clip pretrained tag of ``model`` as named weights: its address (Hugging Face, where open_clip
    publishes one, with its two possible file names; else the direct URL), its cache folder
    ``open_clip/<model>/<tag>``, and its pretrained config (QuickGELU, preprocessing) in ``extra``."""
    cfg = dict(_open_clip().get_pretrained_cfg(model, tag))
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        repo, filename = os.path.split(hf_hub)
        names = [filename] if filename else list(_HF_FILES)
        pairs = [(f"https://huggingface.co/{repo}/resolve/main/{n}", n) for n in names]
    elif cfg.get("url"):
        pairs = [(cfg["url"], os.path.basename(cfg["url"]))]
    else:
        pairs = [("", _HF_FILES[1])]
    (url, filename), *rest = pairs
    return NamedWeights(
        name=tag, encoder="clip", filename=filename, url=url, folder=f"open_clip/{model}/{tag}",
        description=f"open_clip {model} pretrained '{tag}'", alternatives=tuple(rest),
        extra={"model": model, "pretrained_cfg": cfg},
    )


def _saved_meta(path: Path) -> dict[str, Any] | None:
    """What ``CLIPEncoder.save_weights`` recorded in ``path``, or None for any other checkpoint file."""
    if path.suffix in (".safetensors", ".npz", ".npy"):
        return None
    try:
        # mmap: the tensors are not read, only the small dict around them.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not ours (TorchScript archives, legacy formats): open_clip decides
        return None
    meta = obj.get(_META_KEY) if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) and meta.get("format") == _META_FORMAT else None


def _preprocessing(model: Any, where: str) -> ImageTransform:
    oc = _open_clip()
    cfg = oc.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ConfigError(f"{where}: non-square input size {tuple(size)} is not supported")
        size = size[0]
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "squash"):
        raise ConfigError(f"{where}: open_clip resize mode {resize_mode!r} is not supported "
                          "(shortest, squash)")
    return ImageTransform(
        size=int(size),
        mean=tuple(float(v) for v in cfg.get("mean")),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg.get("std")),  # type: ignore[arg-type]
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=resize_mode,
    )


@ENCODERS.register("clip")
class CLIPEncoder(Encoder):
    """open_clip image tower; features are ``encode_image`` output, unnormalised; no logits."""

    config_class = CLIPConfig
    summary = "CLIP image encoder (open_clip): unnormalised image embedding + expression-prompt embeddings"
    weights_field = "clip_pretrained"  # --weights TAG_OR_FILE; the historical name, which caches record

    def __init__(self, config: CLIPConfig) -> None:
        if config.clip_pretrained is None or str(config.clip_pretrained).lower() in _RANDOM_SPECS:
            config = dataclasses.replace(config, random_init=True, clip_pretrained=None)
        elif config.random_init:
            config = dataclasses.replace(config, clip_pretrained=None)
        config = dataclasses.replace(config, prompt_words=tuple(config.prompt_words))
        super().__init__(config)
        if len(config.prompt_words) != len(EXPR_CLASSES):
            raise ConfigError(f"prompt_words needs {len(EXPR_CLASSES)} entries, one per class of "
                              f"{', '.join(EXPR_CLASSES)}")
        if "{emotion}" not in config.prompt_template:
            raise ConfigError(f"prompt_template {config.prompt_template!r} must contain {{emotion}}")
        _check_model_name(config.clip_model)
        oc = _open_clip()
        if config.random_init:
            # open_clip logs "No pretrained weights loaded ... initialized randomly" on the root logger; our
            # own loud --random-init warning has already said so (and that it is for tests and demos).
            quiet = logging.Filter()
            quiet.filter = lambda record: "No pretrained weights loaded" not in record.getMessage()  # type: ignore[method-assign]
            logging.getLogger().addFilter(quiet)
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(config.seed)
                    model = oc.create_model(config.clip_model, pretrained=None)
            finally:
                logging.getLogger().removeFilter(quiet)
            self.weights_source = RANDOM_INIT
            self.weights_sha256 = RANDOM_INIT
            self.quick_gelu = False
        else:
            assert config.clip_pretrained is not None
            resolved = self.resolve_weights(config.clip_pretrained, what=f"clip {config.clip_model}")
            if resolved.named is not None:
                # A tag fixes how its weights were trained: QuickGELU and preprocessing travel with them.
                tag_cfg = resolved.named.extra["pretrained_cfg"]
                quick_gelu = bool(tag_cfg.get("quick_gelu", False))
                preprocess = {k: tag_cfg[k] for k in _PREPROCESS_KEYS if k in tag_cfg}
                source = f"open_clip:{config.clip_model}:{config.clip_pretrained}"
            else:
                meta = _saved_meta(resolved.path)
                if meta is not None and meta.get("clip_model") != config.clip_model:
                    held = meta.get("clip_model")
                    raise CheckpointError(f"{resolved.path}: holds CLIP {held} weights, not "
                                          f"{config.clip_model}; add --encoder-opt clip_model={held}")
                # Our own fine-tuned file says how its weights compute; any other file gets the model's.
                quick_gelu = bool(meta["quick_gelu"]) if meta else False
                preprocess = dict(meta["preprocess"]) if meta else {}
                source = resolved.source
            path = resolved.path
            try:
                model = oc.create_model(
                    config.clip_model,
                    pretrained=str(path),
                    force_quick_gelu=quick_gelu,
                    force_preprocess_cfg=preprocess or None,
                )
            except Exception as exc:  # noqa: BLE001 - open_clip raises RuntimeError/KeyError/... for bad files
                msg = str(exc).strip().splitlines()
                raise CheckpointError(f"{path}: not a {config.clip_model} checkpoint "
                                      f"({type(exc).__name__}: {msg[0] if msg else ''})") from None
            self.quick_gelu = quick_gelu
            self.weights_source = source
            self.weights_sha256 = resolved.sha256
        self.model = model.eval()
        self.transform = _preprocessing(model, f"clip {config.clip_model}")
        self.feature_dim = int(model.visual.output_dim)
        self.logit_names = None
        self._text: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.model.encode_image(x), None

    # -- fine-tuning --------------------------------------------------------------------------------
    def blocks(self) -> list[Block]:
        """The image tower in forward order: ``embed`` (patch embedding, class and positional embeddings,
        pre-norm), ``block0`` ... one per transformer block, ``head`` (final norm, pooling, projection).
        A tower of another kind (ResNet, timm) is one block, ``visual``."""
        visual = self.model.visual
        blocks_of = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks_of is None:
            return [Block("visual", ("model.visual",))]
        members = [n for n, m in visual.named_children() if any(True for _ in m.parameters())]
        members += [n for n, _ in visual.named_parameters(recurse=False)]
        stem = tuple(f"model.visual.{n}" for n in members if n in _VIT_STEM)
        head = tuple(f"model.visual.{n}" for n in members if n not in _VIT_STEM and n != "transformer")
        out = [Block("embed", stem)] if stem else []
        out += [Block(f"block{i}", (f"model.visual.transformer.resblocks.{i}",))
                for i in range(len(blocks_of))]
        return out + ([Block("head", head)] if head else [])

    def save_weights(self, path: str | Path, *, step: int = 0) -> Path:
        """The whole CLIP as a state dict open_clip loads (``{"state_dict": ...}``), plus what rebuilding
        it needs and a path cannot say: the model name, QuickGELU and preprocessing (see ``__init__``)."""
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.model.state_dict().items()}
        meta = {
            "format": _META_FORMAT, "version": 1, "clip_model": self.config.clip_model,
            "quick_gelu": bool(self.quick_gelu), "step": int(step),
            "preprocess": {k: v for k, v in self.transform.as_dict().items() if k in _PREPROCESS_KEYS},
        }
        return torch_save(path, {"state_dict": state, _META_KEY: meta})

    @classmethod
    def named_weights(cls, config: Any | None = None) -> dict[str, NamedWeights]:
        """open_clip's pretrained tags for the configured model (default ViT-B-32)."""
        model = (config or CLIPConfig()).clip_model
        return {tag: tag_weights(model, tag) for tag in _open_clip().list_pretrained_tags_by_model(model)}

    def prompts(self) -> list[str]:
        return [self.config.prompt_template.format(emotion=w) for w in self.config.prompt_words]

    @torch.no_grad()
    def text_embeddings(self) -> tuple[list[str], torch.Tensor]:
        """The prompts (EXPR_CLASSES order) and their unnormalised ``encode_text`` output [8, D], float32."""
        if self._text is None:
            oc = _open_clip()
            tokens = oc.get_tokenizer(self.config.clip_model)(self.prompts())
            device = next(self.model.parameters()).device
            with torch.autocast(device_type=device.type, enabled=False):
                self._text = self.model.encode_text(tokens.to(device)).float().cpu()
        return self.prompts(), self._text.clone()

    def provenance_config(self) -> dict[str, Any]:
        config = super().provenance_config()
        # A tag names weights; a path only says where they are (weights_sha256 says what they are).
        if config["clip_pretrained"] is not None and self.weights_source.startswith("file:"):
            config["clip_pretrained"] = self.weights_source
        return config

    def provenance(self) -> dict[str, Any]:
        out = super().provenance()
        out["prompts"] = self.prompts()
        out["prompt_classes"] = list(EXPR_CLASSES)
        out["open_clip_version"] = _open_clip().__version__
        return out

    @classmethod
    def describe(cls) -> EncoderInfo:
        oc = _open_clip()
        defaults = CLIPConfig()
        model_cfg = oc.get_model_config(defaults.clip_model)
        tag_cfg = oc.get_pretrained_cfg(defaults.clip_model, str(defaults.clip_pretrained))
        return EncoderInfo(
            name=cls.name,
            feature_dim=int(model_cfg["embed_dim"]),
            input_size=int(model_cfg["vision_cfg"]["image_size"]),
            mean=tuple(tag_cfg["mean"]),
            std=tuple(tag_cfg["std"]),
            interpolation=tag_cfg.get("interpolation", "bicubic"),
            weights=f"{defaults.clip_model} {defaults.clip_pretrained} (open_clip tag or a path)",
            logit_names=None,
            summary=cls.summary,
        )

    @classmethod
    def smoke_options(cls) -> dict[str, Any]:
        # The smallest built-in ViT config keeps the parametrised tests fast.
        return {"clip_model": "ViT-S-32-alt", "random_init": True}
