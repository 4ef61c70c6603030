"""CLIP image encoder through open_clip, plus the text embeddings of expression prompts.

Stage one caches the *unnormalised* ``encode_image`` output (heads may normalise; the norm is information a
cache should not throw away) and, once per cache, the encoded prompts ``prompt_template.format(emotion=w)``
for the eight Aff-Wild2 expressions, so that stage two (zero-shot or contrastive heads) never loads CLIP.

Weights (``clip_pretrained``):
- an open_clip tag such as ``openai`` -> the file in the user cache
  (``$ABAWFEAT_HOME/weights/open_clip/<model>/<tag>/<file>``), downloaded there when online. The tag also
  fixes preprocessing and QuickGELU, exactly as open_clip pairs them;
- a path to a checkpoint file -> loaded strictly, with the model config's own preprocessing;
- ``None`` / ``"random"`` (or ``random_init=True``) -> seeded random weights, for tests and demos.

open_clip is imported only when a CLIP encoder is described or built.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from abawfeat.constants import EXPR_CLASSES
from abawfeat.encoders.base import (
    ENCODERS,
    RANDOM_INIT,
    Encoder,
    EncoderInfo,
    ImageTransform,
)
from abawfeat.encoders.weights import download, file_sha256, looks_like_path, offline, weights_dir
from abawfeat.errors import CheckpointError, ConfigError

# Lower-case wording of EXPR_CLASSES (same order) that reads well after "a face showing ...".
DEFAULT_PROMPT_WORDS: tuple[str, ...] = (
    "a neutral expression", "anger", "disgust", "fear",
    "happiness", "sadness", "surprise", "some other emotion",
)
DEFAULT_TEMPLATE = "a face showing {emotion}"
_RANDOM_SPECS = ("", "none", "random", RANDOM_INIT)
_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's own preference


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


def tag_sources(model: str, tag: str) -> tuple[Path, list[tuple[str, Path]]]:
    """Cache folder for ``model``/``tag`` and the (url, target file) pairs to try, best first."""
    oc = _open_clip()
    cfg = oc.get_pretrained_cfg(model, tag)
    folder = weights_dir() / "open_clip" / model / tag
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        repo, filename = os.path.split(hf_hub)
        names = [filename] if filename else list(_HF_FILES)
        return folder, [(f"https://huggingface.co/{repo}/resolve/main/{n}", folder / n) for n in names]
    url = cfg.get("url", "")
    return folder, [(url, folder / os.path.basename(url))] if url else []


def resolve_clip_weights(model: str, spec: str) -> tuple[Path, dict[str, Any], str]:
    """(checkpoint file, open_clip pretrained cfg or {}, source description) for a tag or a path."""
    oc = _open_clip()
    path = Path(spec).expanduser()
    if path.is_file():
        return path, {}, f"file:{path.name}"
    cfg = oc.get_pretrained_cfg(model, spec)
    if not cfg:
        if looks_like_path(spec):
            raise CheckpointError(f"{spec}: no such CLIP checkpoint file")
        tags = ", ".join(oc.list_pretrained_tags_by_model(model)) or "none"
        raise CheckpointError(f"clip_pretrained {spec!r} is neither a file nor an open_clip tag of {model} "
                              f"(tags: {tags})")
    folder, sources = tag_sources(model, spec)
    for _, target in sources:
        if target.is_file():
            return target, cfg, f"open_clip:{model}:{spec}"
    if not sources:
        raise CheckpointError(f"open_clip has no download address for {model}:{spec}; pass a checkpoint path")
    url, target = sources[0]
    manual = (f"put the file at {target} (source: {url}), or pass clip_pretrained=<path to a checkpoint "
              f"file>")
    if offline():
        raise CheckpointError(f"CLIP weights {model}:{spec} cannot be downloaded here "
                              f"(ABAWFEAT_OFFLINE is set): {manual}")
    last: BaseException | None = None
    for url_i, target_i in sources:
        try:
            download(url_i, target_i)
            return target_i, cfg, f"open_clip:{model}:{spec}"
        except OSError as exc:  # includes HTTP 404 for a missing alternative file name
            last = exc
    reason = getattr(last, "reason", None) or last
    raise CheckpointError(f"CLIP weights {model}:{spec} cannot be downloaded here ({reason}): {manual}")


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
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = oc.create_model(config.clip_model, pretrained=None)
            self.weights_source = RANDOM_INIT
            self.weights_sha256 = RANDOM_INIT
        else:
            assert config.clip_pretrained is not None
            path, tag_cfg, source = resolve_clip_weights(config.clip_model, config.clip_pretrained)
            # A tag fixes how its weights were trained: QuickGELU and preprocessing travel with them.
            keys = ("mean", "std", "interpolation", "resize_mode")
            preprocess = {k: tag_cfg[k] for k in keys if k in tag_cfg}
            try:
                model = oc.create_model(
                    config.clip_model,
                    pretrained=str(path),
                    force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                    force_preprocess_cfg=preprocess or None,
                )
            except Exception as exc:  # noqa: BLE001 - open_clip raises RuntimeError/KeyError/... for bad files
                msg = str(exc).strip().splitlines()
                raise CheckpointError(f"{path}: not a {config.clip_model} checkpoint "
                                      f"({type(exc).__name__}: {msg[0] if msg else ''})") from None
            self.weights_source = source
            self.weights_sha256 = file_sha256(path)
        self.model = model.eval()
        self.transform = _preprocessing(model, f"clip {config.clip_model}")
        self.feature_dim = int(model.visual.output_dim)
        self.logit_names = None
        self._text: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.model.encode_image(x), None

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
