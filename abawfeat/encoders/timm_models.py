"""Any ``timm`` image model as an encoder (``--backbone timm --encoder-opt model=NAME``).

Features are the model's pooled pre-logits features (``forward_head(forward_features(x), pre_logits=True)``,
what replacing the classifier by an identity gives); when the model has a classifier (``num_classes`` > 0),
its outputs are kept as the cache's logits, as DDAMFN's are. HSEmotion / EmotiEffLib's EmotiEffNet models
(``abawfeat weights import hsemotion``, encoders/hsemotion.py) are such models: their 8 expression scores (and
valence and arousal for the ``_va_mtl`` ones) become the logits.

Weights (``--weights``), through the one resolver, never unpickling objects:
- a file written by ``save_weights`` or by ``abawfeat weights import``: the state dict plus the timm model
  name, the number of outputs, their names and the preprocessing the weights were trained with, all of which
  it then supplies (an explicit ``model=`` must agree);
- a plain state dict (``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``, or
  ``.safetensors``), e.g. a timm hub checkpoint's ``pytorch_model.bin``, with ``model=NAME``;
- a timm training checkpoint (``train.py``'s ``{"arch", "state_dict", "state_dict_ema", "args", ...}``): its
  ``state_dict`` (``ema=true``: ``state_dict_ema``), ``module.`` prefixes removed, ``arch`` as the model name;
- ``random_init=True``: timm's own initialisation from ``seed``; batch norms, where the model has them, are
  then recalibrated on dataset frames (``calibrate``) or every image would get the same features.
The number of classifier outputs comes from the weights (``num_classes`` overrides it; random init: 0).

Preprocessing comes from the model's own pretrained configuration (``timm.data.resolve_model_data_config``):
input size, interpolation, mean and std; the weights file's recorded preprocessing replaces it, and
``image_size`` / ``interpolation`` override both. The crop is the face, so it is resized (squashed) to the
input size without timm's centre crop; the provenance records the ``crop_pct`` and ``crop_mode`` that were
left out.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abawfeat.encoders.base import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM_INIT,
    Block,
    Encoder,
    EncoderInfo,
    ImageTransform,
    recalibrate_batchnorm,
)
from abawfeat.errors import CheckpointError, ConfigError
from abawfeat.utils.io import torch_save

META_KEY = "abawfeat_timm"
META_FORMAT = "abawfeat-timm-weights"
# Containers of a model's repeated stages: one fine-tuning block per element.
_STAGE_CONTAINERS = ("blocks", "stages", "layers", "features")
_PREPROCESS_KEYS = ("size", "interpolation", "mean", "std")


@dataclass
class TimmConfig:
    # A timm model name (timm.list_models()); None = the one the weights file records.
    model: str | None = None
    # A weights file (see the module docstring); required unless random_init.
    weights: str | None = None
    # Seeded random weights (tests, demos), batch norms recalibrated on dataset frames.
    random_init: bool = False
    seed: int = 0
    # Classifier outputs kept as logits (0 = none); None = as many as the weights have (random init: 0).
    num_classes: int | None = None
    # Input side in pixels and resize filter; None = the weights file's, else the pretrained config's.
    image_size: int | None = None
    interpolation: str | None = None
    # timm training checkpoints: take the EMA weights (state_dict_ema) rather than state_dict.
    ema: bool = False
    # Frames per train-mode pass in calibrate(); fixed so that calibration is reproducible.
    calibration_chunk: int = 64


def timm_module() -> Any:
    import timm

    return timm


def create_model(name: str, num_classes: int | None = None, *, meta: bool = False) -> nn.Module:
    """``timm.create_model(name)`` without pretrained weights; an unknown name is one ConfigError line."""
    timm = timm_module()
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        if meta:  # structure only (names, shapes, pretrained config), no memory for the weights
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, **kwargs)
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        close = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:8]
        raise ConfigError(f"unknown timm model {name!r} (e.g. {', '.join(close) or 'efficientnet_b0'}; "
                          "timm.list_models() has them all)") from None


def classifier_name(model: nn.Module) -> str | None:
    """The qualified name of the model's classifier module, from its pretrained config (timm's own record)."""
    name = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if isinstance(name, (tuple, list)):
        name = name[0] if name else None
    return name if isinstance(name, str) and name else None


def infer_num_classes(model_name: str, state: Mapping[str, torch.Tensor]) -> int:
    """How many outputs the classifier in ``state`` has (0 when it holds none)."""
    clf = classifier_name(create_model(model_name, meta=True))
    weight = state.get(f"{clf}.weight") if clf else None
    return int(weight.shape[0]) if weight is not None else 0


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, model_name: str) -> None:
    """``load_state_dict(strict=True)``; a mismatch is one line naming the file and a few keys."""
    try:
        result = model.load_state_dict(dict(state), strict=False)
    except RuntimeError as exc:  # shapes that differ
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "")
        raise CheckpointError(f"{path}: not {model_name} weights ({detail.split(':')[0]}: other shapes); "
                              "give the model they were trained as with --encoder-opt model=NAME") from None
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing, e.g. {result.missing_keys[0]}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[0]}")
    if problems:
        raise CheckpointError(f"{path}: not {model_name} weights ({'; '.join(problems)}); give the model "
                              "they were trained as with --encoder-opt model=NAME")


def save_timm_weights(path: str | Path, *, model: str, state: Mapping[str, torch.Tensor], num_classes: int,
                      logit_names: Sequence[str] | None, preprocess: Mapping[str, Any], step: int = 0,
                      source: Mapping[str, Any] | None = None) -> Path:
    """The one file format that ``--backbone timm --weights PATH`` reads without being told anything else:
    the state dict plus what rebuilding the encoder needs (model name, outputs, preprocessing). Tensors and
    plain values only, so it loads with ``weights_only=True``. Atomic."""
    meta = {
        "format": META_FORMAT, "version": 1, "model": model, "num_classes": int(num_classes),
        "logit_names": list(logit_names) if logit_names is not None else None,
        "preprocess": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in preprocess.items()},
        "step": int(step), "source": dict(source or {}),
    }
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    return torch_save(path, {META_KEY: meta, "state_dict": tensors})


def read_weights(path: Path, *, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None,
                                                             str | None]:
    """(state dict, our metadata or None, the architecture a timm training checkpoint names or None).
    Never unpickles objects: ``weights_only=True``, which admits ``argparse.Namespace`` only (the ``args`` of
    timm's training checkpoints)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), None, None
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path}: not a safetensors file ({type(exc).__name__})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError for objects, RuntimeError for non-torch files
        text = str(exc).strip().splitlines()
        hint = ""
        if "Unsupported global" in str(exc) or "weights_only" in str(exc):
            hint = ("; a whole pickled model such as HSEmotion's is converted first with `abawfeat weights "
                    "import hsemotion FILE --out NEW.pt`")
        raise CheckpointError(f"{path}: not a weights file that loads without running code "
                              f"({type(exc).__name__}: {text[0][:120] if text else ''}){hint}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    meta = obj.get(META_KEY)
    if isinstance(meta, dict) and meta.get("format") == META_FORMAT:
        return dict(obj["state_dict"]), meta, None
    arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    key = "state_dict_ema" if ema else "state_dict"
    if ema and key not in obj:
        raise CheckpointError(f"{path}: has no state_dict_ema (ema=true asks for the EMA weights)")
    for candidate in (key, "model"):
        if isinstance(obj.get(candidate), dict):
            obj = obj[candidate]
            break
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path}: holds no tensors (expected a state dict or a timm checkpoint)")
    return state, None, arch


def _square(size: Any, where: str) -> int:
    if isinstance(size, (tuple, list)):
        dims = tuple(size[-2:])
        if len(set(dims)) != 1:
            raise ConfigError(f"{where}: input size {dims} is not square; give --encoder-opt image_size=N")
        size = dims[0]
    return int(size)


@ENCODERS.register("timm")
class TimmEncoder(Encoder):
    """A timm model: pooled pre-logits features, and the classifier's outputs as logits when it has one."""

    config_class = TimmConfig
    summary = "any timm model (--encoder-opt model=NAME): pre-logits features + classifier logits"
    # Random weights of BN models (EfficientNet, ResNet) give one embedding for every image until their batch
    # norms are recalibrated; models without batch norms record that there was nothing to do.
    needs_calibration = True

    def __init__(self, config: TimmConfig) -> None:
        if config.random_init and config.weights is not None:
            raise ConfigError("--random-init and --weights exclude each other")
        if config.num_classes is not None and config.num_classes < 0:
            raise ConfigError(f"num_classes {config.num_classes}: use 0 (no logits) or more")
        if config.calibration_chunk < 2:
            raise ConfigError("calibration_chunk must be at least 2 (batch norm needs two frames per pass)")
        super().__init__(config)
        meta: dict[str, Any] | None = None
        if config.random_init:
            if not config.model:
                raise ConfigError("--backbone timm needs --encoder-opt model=NAME (a timm model name)")
            num_classes = config.num_classes or 0
            with torch.random.fork_rng(devices=[]):  # the seed makes the weights, nothing else moves
                torch.manual_seed(config.seed)
                model = create_model(config.model, num_classes)
            model_name = config.model
        else:
            if config.weights is None:
                raise ConfigError("--backbone timm needs --weights FILE (a state dict, a timm checkpoint or "
                                  "an imported HSEmotion file) or --random-init")
            resolved = self.resolve_weights(config.weights, what="timm")
            state, meta, arch = read_weights(resolved.path, ema=config.ema)
            recorded = meta["model"] if meta else arch
            if config.model and recorded and config.model != recorded and meta:
                raise CheckpointError(f"{resolved.path}: holds {recorded} weights, not {config.model}; drop "
                                      f"--encoder-opt model or set model={recorded}")
            model_name = config.model or recorded
            if not model_name:
                raise ConfigError(f"{resolved.path}: a plain state dict does not say which model it is; give "
                                  "--encoder-opt model=NAME")
            held = int(meta["num_classes"]) if meta else infer_num_classes(model_name, state)
            num_classes = held if config.num_classes is None else config.num_classes
            if num_classes not in (held, 0):
                raise CheckpointError(f"{resolved.path}: its classifier has {held} outputs, not num_classes="
                                      f"{num_classes} (0 leaves the classifier out)")
            model = create_model(model_name, num_classes)
            if num_classes == 0 and held:  # e.g. an ImageNet head, of no use for affect: no logits
                clf = classifier_name(model)
                state = {k: v for k, v in state.items() if not (clf and k.startswith(clf + "."))}
                meta = dict(meta, logit_names=None) if meta else None
            load_strict(model, state, resolved.path, model_name)
            self.weights_source, self.weights_sha256 = resolved.source, resolved.sha256
        self.model = model.eval()
        self.model_name = model_name
        self.config = dataclasses.replace(config, model=model_name, num_classes=num_classes)
        self.transform, self.left_out = self._preprocessing(meta)
        self.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        self.num_classes = num_classes
        names = meta.get("logit_names") if meta else None
        if num_classes and not (isinstance(names, list) and len(names) == num_classes):
            names = [f"output{i}" for i in range(num_classes)]
        self.logit_names = tuple(names) if num_classes else None

    def _preprocessing(self, meta: dict[str, Any] | None) -> tuple[ImageTransform, dict[str, Any]]:
        """The model's pretrained config, the weights file's recorded preprocessing over it, the options over
        both; and what of timm's evaluation transform was left out (its centre crop)."""
        timm = timm_module()
        data = timm.data.resolve_model_data_config(self.model)
        where = f"timm {self.model_name}"
        size = _square(data.get("input_size", (3, 224, 224)), where)
        pre = {"size": size, "interpolation": data.get("interpolation", "bicubic"),
               "mean": tuple(data.get("mean", IMAGENET_MEAN)), "std": tuple(data.get("std", IMAGENET_STD))}
        left_out = {"crop_pct": data.get("crop_pct"), "crop_mode": data.get("crop_mode")}
        if meta and isinstance(meta.get("preprocess"), dict):
            pre.update({k: v for k, v in meta["preprocess"].items() if k in _PREPROCESS_KEYS})
            left_out = {"recorded_with_the_weights": True}
        if self.config.image_size is not None:
            pre["size"] = int(self.config.image_size)
        if self.config.interpolation is not None:
            pre["interpolation"] = self.config.interpolation
        if pre["size"] < 8:
            raise ConfigError(f"{where}: image_size {pre['size']} is too small")
        fixed = bool(getattr(self.model, "pretrained_cfg", {}).get("fixed_input_size", False))
        if fixed and int(pre["size"]) != size:
            raise ConfigError(f"{where} takes {size} x {size} inputs only (its position embeddings are "
                              f"fixed); drop image_size={pre['size']}")
        transform = ImageTransform(int(pre["size"]), tuple(float(v) for v in pre["mean"]),  # type: ignore[arg-type]
                                   tuple(float(v) for v in pre["std"]),  # type: ignore[arg-type]
                                   str(pre["interpolation"]), "squash")
        return transform, left_out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        maps = self.model.forward_features(x)
        features = self.model.forward_head(maps, pre_logits=True)
        # The library's own head on the same maps (in eval mode its dropout is the identity).
        logits = self.model.forward_head(maps) if self.num_classes else None
        return features, logits

    def forward_train(
        self, x: torch.Tensor, outputs: Sequence[str] = ()
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if outputs:
            raise ConfigError(f"encoder 'timm' has no auxiliary output {', '.join(outputs)}")
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True), {}

    # -- random init --------------------------------------------------------------------------------
    def calibrate(self, images: torch.Tensor) -> None:
        """Recompute the batch-norm statistics of random-init weights from ``images`` (normalised)."""
        if self.weights_sha256 != RANDOM_INIT:
            raise ConfigError("calibrate() recomputes batch-norm statistics of random-init weights only; "
                              f"these are {self.weights_source}")
        size = self.input_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size) or images.shape[0] < 2:
            raise ConfigError(f"calibrate() needs at least 2 frames of shape [3, {size}, {size}], got "
                              f"{tuple(images.shape)}")
        self.calibration = recalibrate_batchnorm(self.model, images, self.config.calibration_chunk)

    # -- fine-tuning --------------------------------------------------------------------------------
    def blocks(self) -> list[Block]:
        """The model's top-level modules in order, its stage containers (``blocks``, ``stages``, ...) split
        into one block per stage; top-level parameters (a ViT's class token and position embedding) join the
        first block. The classifier is in no block: it stays frozen, as DDAMFN's does."""
        clf = classifier_name(self.model)
        out: list[Block] = []

        def has_params(m: nn.Module) -> bool:
            return any(True for _ in m.parameters())

        for name, child in self.model.named_children():
            if not has_params(child) or name == clf:
                continue
            if clf and clf.startswith(name + "."):  # a head module holding the classifier: the rest of it
                members = tuple(f"model.{name}.{n}" for n, m in child.named_children()
                                if f"{name}.{n}" != clf and has_params(m))
                if members:
                    out.append(Block(name, members))
            elif name in _STAGE_CONTAINERS and isinstance(child, (nn.Sequential, nn.ModuleList)):
                out += [Block(f"{name}.{i}", (f"model.{name}.{i}",)) for i, m in enumerate(child)
                        if has_params(m)]
            else:
                out.append(Block(name, (f"model.{name}",)))
        loose = tuple(f"model.{n}" for n, _ in self.model.named_parameters(recurse=False))
        if loose and out:
            out[0] = Block(out[0].name, (*out[0].members, *loose))
        return out

    def save_weights(self, path: str | Path, *, step: int = 0) -> Path:
        """The whole model with its name, outputs and preprocessing (``save_timm_weights``): ``--weights
        PATH`` rebuilds this very encoder."""
        return save_timm_weights(
            path, model=self.model_name, state=self.model.state_dict(), num_classes=self.num_classes,
            logit_names=self.logit_names, step=step,
            preprocess={k: v for k, v in self.transform.as_dict().items() if k in _PREPROCESS_KEYS})

    # -- provenance ---------------------------------------------------------------------------------
    def provenance_config(self) -> dict[str, Any]:
        config = super().provenance_config()
        # Paths say where the weights were; weights_sha256 says what they are.
        if config["weights"] is not None:
            config["weights"] = self.weights_source
        # What the input became, whichever of the pretrained config, the file and the options said it: the
        # same computation is then the same provenance (a fine-tuned file extracted with or without options).
        config["image_size"] = self.transform.size
        config["interpolation"] = self.transform.interpolation
        if not self.config.random_init:
            config.pop("calibration_chunk", None)  # calibration is for random weights only
        return config

    def provenance(self) -> dict[str, Any]:
        out = super().provenance()
        out["timm_model"] = self.model_name
        out["timm_version"] = timm_module().__version__
        out["preprocessing_left_out"] = dict(self.left_out)
        return out

    @classmethod
    def describe(cls) -> EncoderInfo:
        return EncoderInfo(
            name=cls.name,
            feature_dim=1280,  # efficientnet_b0 (EmotiEffNet-B0); every model says its own
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            interpolation="model's",
            weights="a file: state dict, timm checkpoint or `weights import hsemotion` output",
            logit_names=None,
            summary=cls.summary,
        )

    @classmethod
    def smoke_options(cls) -> dict[str, Any]:
        # timm's smallest EfficientNet (0.1 M parameters, 160 px); 8 outputs exercise the logits.
        return {"model": "test_efficientnet", "random_init": True, "num_classes": 8, "image_size": 64}
