"""DINOv2 (and DINOv2 with registers) image encoders through ``transformers``.

Weights (``weights``, what ``--weights`` sets), through the one resolver (encoders/weights.py) and the shared
Hugging Face layout (encoders/huggingface.py):
- a local checkpoint folder (``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``), e.g. a copy
  of ``facebook/dinov2-small|base|large|giant`` or a fine-tuned one (a ``Dinov2ForImageClassification``
  folder too: its backbone is taken, its classifier left out); its weights file's sha256 identifies it;
- a Hugging Face name such as ``facebook/dinov2-large`` -> the folder
  ``$ABAWFEAT_HOME/weights/huggingface/<org>--<name>/``, downloaded there when online; offline, one line
  says which files to put there;
- a ``.pth`` file written by ``save_weights`` (fine-tuning), which carries its model config;
- ``random_init=True`` -> a seeded random model of a named size (``tiny`` for tests; ``small``, ``base``,
  ``large``, ``giant`` are the published architectures). Layer norms only, so no calibration is needed; its
  features mean nothing about affect.

Preprocessing: the crop is the face, so it is resized (squashed) straight from its stored resolution to
``image_size`` x ``image_size`` (224 by default, a multiple of the patch size) with bicubic interpolation and
ImageNet normalisation (or the mean and std of the checkpoint's ``preprocessor_config.json``), without the
centre crop of transformers' image processor. Larger stored crops are therefore resized down once, never
upsampled first. The position embeddings are interpolated to the grid by the model itself, as transformers
does.

Features: ``pool`` over the final layer-normed tokens: ``cls`` (transformers' ``pooler_output``, the
default), ``mean`` (the patch tokens, registers left out) or ``cls_mean`` (both, concatenated: what DINOv2's
linear probes and ``Dinov2ForImageClassification`` read). ``layer`` N takes the tokens after block N instead
(0 = the patch embeddings, L = the last block, the default; negative N counts from the end), through the same
final layer norm, as DINOv2's own ``get_intermediate_layers(norm=True)``; blocks after N are dropped, so they
cost nothing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abawfeat.encoders.base import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Block,
    Encoder,
    EncoderInfo,
    ImageTransform,
)
from abawfeat.encoders.huggingface import (
    CHECKPOINT,
    CONFIG,
    PREPROCESSOR,
    config_summary,
    hub_named_weights,
    load_pretrained,
    read_json,
    transformers,
)
from abawfeat.encoders.weights import NamedWeights
from abawfeat.errors import CheckpointError, ConfigError
from abawfeat.utils.io import torch_save

DEFAULT_WEIGHTS = "facebook/dinov2-base"
KNOWN_WEIGHTS = tuple(f"facebook/dinov2-{s}" for s in ("small", "base", "large", "giant")) + tuple(
    f"facebook/dinov2-with-registers-{s}" for s in ("small", "base", "large", "giant"))
POOLS = ("cls", "mean", "cls_mean")
# model_type in config.json -> (config class, model class) in transformers.
_FAMILIES = {
    "dinov2": ("Dinov2Config", "Dinov2Model"),
    "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel"),
}
# The published architectures (their config.json), and a tiny one for tests. Position embeddings for 518 x 518
# inputs, as published; they are interpolated to the grid of `image_size`.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
}
_RANDOM_IMAGE_SIZE = 518
# A checkpoint folder, or one .pth file of our own (save_weights), which carries its config.
FOLDER = dataclasses.replace(CHECKPOINT, files=(".pth",))
_META_FORMAT = "abawfeat-dinov2-weights"


@dataclass
class DINOv2Config:
    # A local checkpoint folder, a Hugging Face name (facebook/dinov2-large) or a fine-tuned .pth; None =
    # facebook/dinov2-base.
    weights: str | None = None
    # Seeded random weights of architecture `size` instead of a checkpoint (tests, demos).
    random_init: bool = False
    seed: int = 0
    size: str = "base"  # random-init only: tiny | small | base | large | giant
    # Side of the square input, in pixels; a multiple of the patch size (14).
    image_size: int = 224
    # cls (the pooler output) | mean (patch tokens) | cls_mean (both, concatenated).
    pool: str = "cls"
    # Tokens after block N (0 = patch embeddings .. L = last block); None = the last block.
    layer: int | None = None


def _family(model_type: Any, where: Path) -> tuple[Any, Any]:
    if model_type not in _FAMILIES:
        raise CheckpointError(f"{where}: holds a {model_type!r} model, not a DINOv2 one "
                              f"({' or '.join(_FAMILIES)}); use the matching --backbone")
    tf = transformers()
    config_name, model_name = _FAMILIES[model_type]
    return getattr(tf, config_name), getattr(tf, model_name)


@ENCODERS.register("dinov2")
class DINOv2Encoder(Encoder):
    """DINOv2 ViT (transformers); features are the pooled final layer-normed tokens; no logits."""

    config_class = DINOv2Config
    summary = "DINOv2 ViT (transformers): layer-normed CLS token (or mean / cls_mean), any layer"
    weights_folder = FOLDER
    # Compiled, the layer norms, GELU and residual adds fuse with the casts around the matrix products, which
    # eager bf16 runs as separate passes over the activations (benchmarks/vit.py, docs/performance.md).
    compile_by_default = True

    def __init__(self, config: DINOv2Config) -> None:
        if config.size not in SIZES:
            raise ConfigError(f"encoder 'dinov2' option size={config.size!r} (--encoder-opt): use one of "
                              f"{', '.join(SIZES)}")
        if config.pool not in POOLS:
            raise ConfigError(f"encoder 'dinov2' option pool={config.pool!r} (--encoder-opt): use one of "
                              f"{', '.join(POOLS)}")
        if config.random_init and config.weights is not None:
            raise ConfigError("--random-init and --weights exclude each other")
        super().__init__(config)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if config.random_init:
            config_cls, model_cls = _family("dinov2", Path("random-init"))
            model_config = config_cls(image_size=_RANDOM_IMAGE_SIZE, **SIZES[config.size])
            with torch.random.fork_rng(devices=[]):  # the seed makes the weights, nothing else moves
                torch.manual_seed(config.seed)
                model = model_cls(model_config)
        else:
            resolved = self.resolve_weights(config.weights or DEFAULT_WEIGHTS, what="dinov2")
            if resolved.path.suffix in FOLDER.files and resolved.path.name not in FOLDER.names:
                model = _load_saved(resolved.path)
            else:
                folder = resolved.path.parent
                _, model_cls = _family(read_json(folder / CONFIG).get("model_type"), folder)
                model = load_pretrained(model_cls, folder, "dinov2", optional=("mask_token",))
                if (folder / PREPROCESSOR).is_file():
                    pre = read_json(folder / PREPROCESSOR)
                    mean = tuple(float(v) for v in pre.get("image_mean", mean))  # type: ignore[assignment]
                    std = tuple(float(v) for v in pre.get("image_std", std))  # type: ignore[assignment]
            self.weights_source, self.weights_sha256 = resolved.source, resolved.sha256
        model_config = model.config
        patch = model_config.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        if config.image_size < patch or config.image_size % patch:
            raise ConfigError(f"encoder 'dinov2' option image_size={config.image_size}: use a multiple of "
                              f"the patch size {patch}")
        self.n_layers = int(model_config.num_hidden_layers)
        layer = self.n_layers if config.layer is None else int(config.layer)
        if layer < 0:
            layer += self.n_layers + 1
        if not 0 <= layer <= self.n_layers:
            raise ConfigError(f"encoder 'dinov2' option layer={config.layer}: this model's layers are "
                              f"0..{self.n_layers} (negative counts from the end)")
        self.layer = layer
        self.n_registers = int(getattr(model_config, "num_register_tokens", 0) or 0)
        self._model_config = config_summary(model_config)
        # Blocks after the one asked for never run: dropped, so that the final layer norm reads block `layer`.
        model.encoder.layer = model.encoder.layer[:layer]
        self.model = model.eval()
        self.transform = ImageTransform(config.image_size, mean, std, "bicubic", "squash")
        width = int(model_config.hidden_size)
        self.feature_dim = 2 * width if config.pool == "cls_mean" else width
        self.logit_names = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        tokens = self.model(pixel_values=x).last_hidden_state  # [B, 1 + registers + patches, D], normed
        cls = tokens[:, 0]
        if self.config.pool == "cls":
            return cls, None
        patches = tokens[:, 1 + self.n_registers:].mean(dim=1)
        return (patches if self.config.pool == "mean" else torch.cat([cls, patches], dim=1)), None

    # -- fine-tuning --------------------------------------------------------------------------------
    def blocks(self) -> list[Block]:
        """``embed`` (patch and position embeddings, CLS and register tokens), ``block0`` ... one per
        transformer block kept, ``norm`` (the final layer norm)."""
        kept = len(self.model.encoder.layer)
        return ([Block("embed", ("model.embeddings",))]
                + [Block(f"block{i}", (f"model.encoder.layer.{i}",)) for i in range(kept)]
                + [Block("norm", ("model.layernorm",))])

    def save_weights(self, path: str | Path, *, step: int = 0) -> Path:
        """The model's state dict and its transformers config (with the blocks kept) in one file, which
        ``--weights PATH`` builds back into this very encoder (with the same ``--encoder-opt``)."""
        config = dict(json.loads(self.model.config.to_json_string()),
                      num_hidden_layers=len(self.model.encoder.layer))
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.model.state_dict().items()}
        meta = {"format": _META_FORMAT, "version": 1, "step": int(step), "config_json": json.dumps(config)}
        return torch_save(path, {"abawfeat_dinov2": meta, "state_dict": state})

    # -- provenance ---------------------------------------------------------------------------------
    def provenance_config(self) -> dict[str, Any]:
        config = super().provenance_config()
        # A path says where the weights were that day; weights_sha256 says what they are.
        if config["weights"] is not None and self.weights_source.startswith(("dir:", "file:")):
            config["weights"] = self.weights_source
        if not self.config.random_init:
            config.pop("size", None)  # the architecture is the checkpoint's (model_config in the provenance)
        return config

    def provenance(self) -> dict[str, Any]:
        out = super().provenance()
        out["layer"] = self.layer
        out["model_config"] = self._model_config
        out["transformers_version"] = transformers().__version__
        return out

    # -- registry hooks -----------------------------------------------------------------------------
    @classmethod
    def named_weights(cls, config: Any | None = None) -> dict[str, NamedWeights]:
        """The published DINOv2 checkpoints on the hub, and any other ``org/name`` the config gives."""
        return hub_named_weights(KNOWN_WEIGHTS, getattr(config, "weights", None), cls.name)

    @classmethod
    def describe(cls) -> EncoderInfo:
        return EncoderInfo(
            name=cls.name,
            feature_dim=SIZES["base"]["hidden_size"],
            input_size=DINOv2Config().image_size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            interpolation="bicubic",
            weights=f"{DEFAULT_WEIGHTS} (Hugging Face name or folder, or a fine-tuned .pth)",
            logit_names=None,
            summary=cls.summary,
        )

    @classmethod
    def smoke_options(cls) -> dict[str, Any]:
        return {"random_init": True, "size": "tiny", "image_size": 56}


def _load_saved(path: Path) -> nn.Module:
    """A DINOv2 written by ``DINOv2Encoder.save_weights``, loaded strictly."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for foreign or broken files
        raise CheckpointError(f"{path}: not a DINOv2 weights file ({type(exc).__name__})") from None
    meta = obj.get("abawfeat_dinov2") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
        raise CheckpointError(f"{path}: not a DINOv2 file written by fine-tuning; give a Hugging Face "
                              "checkpoint folder (config.json and model.safetensors) instead")
    config = json.loads(meta["config_json"])
    config_cls, model_cls = _family(config.get("model_type"), path)
    model = model_cls(config_cls.from_dict(config))
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit their own config "
                              f"({str(exc).splitlines()[0][:200]})") from None
    return model.eval()
