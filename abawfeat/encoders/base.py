"""The encoder contract and its registry: everything encoder-specific lives behind it.

An encoder is an image network that turns normalised face crops into one feature vector per frame (and, for
classifiers such as DDAMFN, logits); a speech encoder does the same from the video's sound (``modality``).
Like open_clip, weights and their preprocessing travel together: every encoder owns its ``transform`` and
reports it in ``provenance()``, so a cache can never pair features with the wrong normalisation. Like timm,
encoders are registered by name with a decorator and one parametrised test covers every registered encoder
(tests/test_encoders.py). Nothing outside an encoder's own module knows which encoder it is: extraction,
fine-tuning and the CLI go through this contract only, so a new encoder is one file plus its import
(docs/encoders.md).

Contract:
    config_class: a dataclass with at least ``random_init``, ``seed`` and the field named by
        ``weights_field``; its other fields are the encoder's options (``--encoder-opt key=value``)
    name, feature_dim, input_size, mean, std, logit_names
    forward(x [B, 3, S, S] normalised) -> (features [B, D], logits [B, C] | None); embed(x) -> [B, D]
    transform: picklable ImageTransform, PIL image -> normalised [3, S, S] float32     (preprocessing)
    named_weights(config) -> {name: NamedWeights}; resolve_weights(spec)               (weights)
    weights_folder: CheckpointFolder | None (weights that are folders of files, e.g. Hugging Face's)
    needs_calibration, calibrate(images [N, 3, S, S])                                 (random init)
    blocks() -> [Block] in forward order; forward_train(x, outputs); save_weights(path) (fine-tuning)
    auxiliary_outputs: names forward_train can return besides the features (DDAMFN: attention maps)
    provenance() -> JSON-ready dict; text_embeddings() -> (prompts, [C, D]) | None
    describe() -> EncoderInfo (defaults, without building or loading weights)
    smoke_options() -> dict (a fast, offline build for the test suite)
    modality: "face" (all of the above) or "audio": speech encoders read 16 kHz audio instead of crops, and
        extraction runs the audio loop for them (their side of the contract: abawfeat/encoders/speech.py)
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from abawfeat.encoders.weights import CheckpointFolder, NamedWeights, ResolvedWeights, resolve_weights
from abawfeat.errors import ConfigError
from abawfeat.utils.configs import to_dict
from abawfeat.utils.registry import Registry

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
RANDOM_INIT = "random-init"
# Bumped when the meaning of a provenance field changes, so stage two can refuse what it cannot compare.
PROVENANCE_VERSION = 1
# Auxiliary output of encoders with attention heads (``forward_train``): the heads' maps stacked
# [heads, N, C, H, W], what fine-tuning's attention-diversity loss reads.
ATTENTION_MAPS = "attention_maps"
# Config fields every encoder has; they are set by generic options (--random-init, --seed), together with the
# encoder's ``weights_field`` (--weights), never by --encoder-opt.
GENERIC_FIELDS = ("random_init", "seed")

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_RESIZE_MODES = ("squash", "shortest")


@dataclass(frozen=True)
class ImageTransform:
    """PIL image (or HxWx3 uint8 array) -> normalised float32 tensor [3, size, size].

    A frozen dataclass defined at module level, so it pickles into DataLoader workers. The arithmetic is
    the one of torchvision's ``Resize`` + ``ToTensor`` + ``Normalize`` on PIL images (PIL resampling, then
    ``/255``, then ``(x - mean) / std``), so it reproduces published preprocessing bit for bit.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # PIL filter used for resizing; DDAMFN was trained with bilinear, CLIP with bicubic.
    interpolation: str = "bilinear"
    # "squash": resize both sides to `size` (DDAMFN); "shortest": shorter side to `size`, then centre crop
    # (open_clip's default).
    resize_mode: str = "squash"

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ConfigError(f"interpolation {self.interpolation!r}: use one of {', '.join(_RESAMPLE)}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ConfigError(f"resize mode {self.resize_mode!r}: use one of {', '.join(_RESIZE_MODES)}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("mean and std need one value per RGB channel")

    def resize(self, image: Image.Image) -> Image.Image:
        """Resize (and crop) to ``size`` x ``size`` RGB, as torchvision does for PIL images."""
        image = image.convert("RGB")
        resample = _RESAMPLE[self.interpolation]
        if self.resize_mode == "squash":
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), resample)
            return image
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)  # torchvision truncates, so do we
        new_size = (self.size, new_long) if width <= height else (new_long, self.size)
        if new_size != image.size:
            image = image.resize(new_size, resample)
        width, height = image.size
        top = int(round((height - self.size) / 2.0))
        left = int(round((width - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        pixels = torch.from_numpy(np.asarray(self.resize(image), dtype=np.uint8).copy())
        return self.normalize(pixels.permute(2, 0, 1))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [..., 3, H, W] (already resized) -> normalised float32, same layout."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return pixels.contiguous().to(torch.float32).div(255).sub_(mean).div_(std)

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }


class PixelInput(nn.Module):
    """An encoder that takes uint8 pixels: its transform's normalisation runs here, on the whole batch.

    Extraction's decoding workers then send resized uint8 crops (a quarter of the bytes of float32) and do
    no float work. Pixels arrive as [B, H, W, 3], whose NCHW view is already channels_last, so no layout
    copy is made; compiled, the normalisation fuses into the first layer's input read. The arithmetic is
    ``ImageTransform.normalize``'s (``/255``, ``-mean``, ``/std`` in float32), element for element.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        t = encoder.transform
        self.register_buffer("mean", torch.tensor(t.mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(t.std, dtype=torch.float32).view(1, 3, 1, 1), False)

    def forward(self, pixels: torch.Tensor) -> Any:
        """``pixels`` uint8 [B, 3, H, W] in any memory layout -> the encoder's outputs."""
        return self.encoder(pixels.to(torch.float32).div(255).sub(self.mean).div(self.std))


@dataclass(frozen=True)
class Block:
    """One unit of fine-tuning: the encoder's parameters (and modules) under these qualified names, e.g.
    ``net.features.0`` (a module) or ``model.visual.proj`` (a bare parameter). ``--unfreeze-from NAME``
    trains this block and every later one."""

    name: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class EncoderInfo:
    """What ``abawfeat encoders`` shows for one registered encoder, with its default options."""

    name: str
    feature_dim: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    weights: str  # default weights and where they come from
    logit_names: tuple[str, ...] | None
    summary: str
    modality: str = "face"  # what the encoder reads: "face" crops or the "audio" track
    # The encoder's own options (--encoder-opt key=value; not the generic random_init, seed and weights), as
    # "type = default"; filled by list_encoders.
    options: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return to_dict(self)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hash of a tensor's float32 values and shape (used to identify calibration frames)."""
    data = tensor.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, images: torch.Tensor, chunk: int) -> dict[str, Any]:
    """Recompute every batch-norm running statistic of ``net`` from ``images`` (normalised [N, 3, S, S]) and
    return the calibration record for the provenance; ``net`` is left in the mode it was in.

    Why: with default initialisation, in eval mode, the signal of a deep BN network dies and every image gets
    the same embedding. Train-mode passes with ``momentum=None`` set each BN's running mean and variance to
    the average over the passes of the batch statistics, which brings the features to life. Deterministic:
    statistics are reset first, chunks have a fixed size (a last chunk of one frame joins the previous one,
    since BN needs two), and the result depends only on the weights and frames.
    """
    if chunk < 2:
        raise ConfigError("calibration_chunk must be at least 2 (batch norm needs two frames per pass)")
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    param = next(iter(net.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    images = images.to(device=device, dtype=torch.float32)
    starts = list(range(0, images.shape[0], chunk))
    if images.shape[0] - starts[-1] < 2 and len(starts) > 1:
        starts.pop()
    bounds = list(zip(starts, starts[1:] + [images.shape[0]], strict=True))
    momenta = [m.momentum for m in norms]
    was_training = net.training
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes
        net.train()
        # Statistics in fp32 whatever autocast the caller runs under: they are part of the weights.
        with torch.autocast(device_type=device.type, enabled=False):
            for lo, hi in bounds:
                net(images[lo:hi])
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        net.train(was_training)
    return {
        "method": "batchnorm-recalibration",
        "frames": int(images.shape[0]),
        "frames_sha256": tensor_sha256(images),
        "chunk": chunk,
        "batch_norms": len(norms),
    }


class Encoder(nn.Module):
    """Base class of every registered encoder; subclasses set the attributes in ``__init__``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[Any]]
    summary: ClassVar[str] = ""
    # The config field that ``--weights`` sets: a weights file or one of ``named_weights``. DDAMFN's is
    # ``weights``; CLIP's keeps its historical name ``clip_pretrained`` (caches record it).
    weights_field: ClassVar[str] = "weights"
    # Set when the weights are a folder of files (a Hugging Face checkpoint) rather than one file: its layout,
    # which the one resolver then uses for local folders and named checkpoints alike (speech encoders).
    weights_folder: ClassVar[CheckpointFolder | None] = None
    # Whether random-init weights need ``calibrate`` on dataset frames before their features mean anything
    # (DDAMFN's batch norms do; CLIP's layer norms do not). Extraction and fine-tuning calibrate when it is
    # declared, and the registry refuses a class whose declaration and ``calibrate`` disagree.
    needs_calibration: ClassVar[bool] = False
    # Names of the extra outputs ``forward_train`` can return (e.g. ATTENTION_MAPS); fine-tuning options that
    # need one are refused for encoders that do not declare it.
    auxiliary_outputs: ClassVar[tuple[str, ...]] = ()
    # Whether extraction compiles this encoder by default on large runs (ExtractConfig.compile = None):
    # only where it was measured to pay (DDAMFN, docs/performance.md). CLIP ran slower compiled.
    compile_by_default: ClassVar[bool] = False
    # What the encoder reads, and so which stage-one loop runs it: "face" crops (abawfeat/extract.py) or the
    # "audio" track of the source videos (abawfeat/audio/extract.py).
    modality: ClassVar[str] = "face"

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.feature_dim: int = 0
        self.logit_names: tuple[str, ...] | None = None
        self.transform: ImageTransform = ImageTransform(224, IMAGENET_MEAN, IMAGENET_STD)
        # Where the weights came from (a named download, a path, or "random-init") and their file hash.
        self.weights_source: str = RANDOM_INIT
        self.weights_sha256: str = RANDOM_INIT
        self.calibration: dict[str, Any] | None = None
        # One-line remarks about unusual weights (each also printed as a warning when the encoder is built);
        # recorded in the provenance when there are any.
        self.notes: list[str] = []

    # -- the contract -------------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.transform.size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.transform.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.transform.std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features only, [B, D]."""
        return self(x)[0]

    def text_embeddings(self) -> tuple[list[str], torch.Tensor] | None:
        return None

    # -- weights ------------------------------------------------------------------------------------
    @classmethod
    def named_weights(cls, config: Any | None = None) -> dict[str, NamedWeights]:
        """The published weights ``--weights NAME`` may name, for ``config`` (default: the default config);
        none by default."""
        return {}

    def resolve_weights(self, spec: str, *, verify: Any = None, what: str | None = None) -> ResolvedWeights:
        """``spec`` (a file or one of ``named_weights(self.config)``) as a local file: the one resolver
        (abawfeat/encoders/weights.py) with its user cache, checksums, downloads and offline message."""
        return resolve_weights(spec, self.name, type(self).named_weights(self.config), verify=verify,
                               what=what, folder=type(self).weights_folder)

    def note(self, message: str) -> None:
        """Say something unusual about these weights once (a warning line) and keep it for the provenance."""
        from abawfeat.utils.progress import warn

        warn(message)
        self.notes.append(message)

    # -- random init --------------------------------------------------------------------------------
    def calibrate(self, images: torch.Tensor) -> None:
        raise ConfigError(f"encoder {self.name!r} has no calibration (it declares needs_calibration=False)")

    # -- fine-tuning --------------------------------------------------------------------------------
    def blocks(self) -> list[Block]:
        """The blocks fine-tuning may unfreeze, in forward order (empty: this encoder cannot be fine-tuned).
        Parameters in no block stay frozen."""
        return []

    def forward_train(
        self, x: torch.Tensor, outputs: Sequence[str] = ()
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Features [B, D] with gradients, plus the requested ``auxiliary_outputs`` by name."""
        unknown = [o for o in outputs if o not in self.auxiliary_outputs]
        if unknown:
            raise ConfigError(f"encoder {self.name!r} has no auxiliary output {', '.join(unknown)}")
        return self.embed(x), {}

    def save_weights(self, path: str | Path, *, step: int = 0) -> Path:
        """Write the (fine-tuned) weights so that ``weights=<path>`` (``--weights PATH``) builds this very
        encoder again; ``step`` is the number of training steps, for formats that record it. Atomic."""
        raise ConfigError(f"encoder {self.name!r} cannot save its weights (it declares no trainable blocks)")

    @classmethod
    def weights_filename(cls) -> str:
        """File name of the fine-tuned weights in a run directory."""
        return f"{cls.name}_finetuned.pth"

    # -- provenance ---------------------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        """Everything a cache must record so that stage two can check it was made by this very encoder."""
        out = {
            "provenance_version": PROVENANCE_VERSION,
            "name": self.name,
            "config": self.provenance_config(),
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "calibration": self.calibration,
            "preprocessing": self.transform.as_dict(),
            "feature_dim": self.feature_dim,
            "logit_names": list(self.logit_names) if self.logit_names is not None else None,
        }
        if self.notes:  # only when there is something to say, so ordinary provenances keep their keys
            out["notes"] = list(self.notes)
        return out

    def provenance_config(self) -> dict[str, Any]:
        """The config as provenance records it. Encoders drop what names a place rather than a computation
        (file paths, loading policy): the weights' identity is ``weights_sha256``, and a cache must still
        match when the same weights sit elsewhere on another machine."""
        return to_dict(self.config)

    # -- registry hooks -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any) -> Encoder:
        return cls(config)

    @classmethod
    def describe(cls) -> EncoderInfo:
        raise NotImplementedError

    @classmethod
    def smoke_options(cls) -> dict[str, Any]:
        """Options for a fast build that needs no downloaded weights (the parametrised tests use it)."""
        return {"random_init": True}


def _check_encoder(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Encoder)):
        raise TypeError(f"encoder {name!r}: the registry holds Encoder subclasses, got {cls!r}")
    if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
        raise TypeError(f"encoder {name!r} needs a dataclass `config_class`")
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    missing = [f for f in (*GENERIC_FIELDS, cls.weights_field) if f not in fields]
    if missing:
        raise TypeError(f"encoder {name!r}: config_class lacks the generic field(s) {', '.join(missing)}")
    overrides = cls.calibrate is not Encoder.calibrate
    if bool(cls.needs_calibration) != overrides:
        raise TypeError(f"encoder {name!r}: needs_calibration={cls.needs_calibration} but calibrate() is "
                        f"{'' if overrides else 'not '}overridden")


# Every stage-one encoder, by name: ``@ENCODERS.register("name")`` on an Encoder subclass.
ENCODERS: Registry[type[Encoder]] = Registry("encoder", _check_encoder)


# ----------------------------------------------------------------------------------------------- options

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def option_types(name: str) -> dict[str, Any]:
    """The encoder's config fields and their types (resolved annotations), in declaration order."""
    cls = ENCODERS.get(name).config_class
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def describe_type(hint: Any) -> str:
    """How an option of this type is written on the command line."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = " or ".join(describe_type(a) for a in args if a is not type(None))
        return f"{inner} or none" if type(None) in args else inner
    if hint is bool:
        return "true/false"
    if origin in (tuple, list):
        return f"comma-separated {describe_type(args[0]) if args else 'str'} list"
    return getattr(hint, "__name__", str(hint))


def coerce(text: str, hint: Any) -> Any:
    """``text`` (as typed after ``key=``) as a value of type ``hint``; ValueError when it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(text, arg)
            except ValueError:
                continue
        raise ValueError(text)
    if hint is bool:
        low = text.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ValueError(text)
    if hint in (int, float):
        return hint(text.strip())
    if hint in (str, Any):
        return text
    if hint is Path:
        return Path(text)
    if origin in (tuple, list):
        element = args[0] if args else str
        items = tuple(coerce(t.strip(), element) for t in text.split(",")) if text.strip() else ()
        return items if origin is tuple else list(items)
    raise ValueError(f"options of type {hint} cannot be given as text")


def _option_list(types_: Mapping[str, Any]) -> str:
    return ", ".join(types_)


def make_config(name: str, **options: Any) -> Any:
    """The encoder's config dataclass from keyword options. Text values (``--encoder-opt key=value``) are
    converted to the field's type; unknown options and bad values are a ConfigError naming the option and
    listing the encoder's options."""
    cls = ENCODERS.get(name)
    types_ = option_types(name)
    unknown = sorted(set(options) - set(types_))
    if unknown:
        raise ConfigError(
            f"encoder {name!r} has no option {', '.join(unknown)} (options: {_option_list(types_)})"
        )
    values = {}
    for key, value in options.items():
        hint = types_[key]
        if isinstance(value, str) and hint not in (str, Any):
            try:
                value = coerce(value, hint)
            except ValueError:
                raise ConfigError(f"encoder {name!r} option {key}={value!r}: expected {describe_type(hint)} "
                                  f"(options: {_option_list(types_)})") from None
        values[key] = value
    return cls.config_class(**values)


def parse_options(items: Sequence[str]) -> dict[str, str]:
    """``["key=value", ...]`` (repeated ``--encoder-opt``) as a dict of texts; ``make_config`` types them."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--encoder-opt {item!r}: expected key=value")
        if key in out:
            raise ConfigError(f"--encoder-opt {key} given twice")
        out[key] = value
    return out


def encoder_options(
    name: str,
    *,
    weights: str | None = None,
    random_init: bool = False,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword options for ``build_encoder(name, ...)`` from the generic choices (--weights, --random-init,
    --seed) and the encoder's own options (--encoder-opt). Only what was set is passed, so each encoder keeps
    its defaults; the seed only matters for (and is only recorded with) random weights."""
    cls = ENCODERS.get(name)
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if key in GENERIC_FIELDS:
            # Random weights change what extraction does (calibration, warnings), so only the flags set them.
            raise ConfigError(f"--encoder-opt {key}: set it with --{key.replace('_', '-')}")
        if key == cls.weights_field:  # the same as --weights (CLIP's old --clip-pretrained comes this way)
            if weights is not None:
                raise ConfigError(f"--weights and --encoder-opt {key} both name the weights; give --weights "
                                  "only")
            weights = None if value is None else str(value)
            continue
        out[key] = value
    if weights is not None and random_init:
        raise ConfigError("--random-init and --weights exclude each other")
    if weights is not None:
        out[cls.weights_field] = weights
    if random_init:
        out["random_init"] = True
        out["seed"] = seed  # the seed is what makes a random-init encoder rebuildable
    return out


def build_encoder(name: str, **options: Any) -> Encoder:
    """Build a registered encoder in eval mode. Options are passed to its config dataclass (text values are
    typed), so callers (the CLI) pass only the options a user actually set."""
    cls = ENCODERS.get(name)
    encoder = cls.from_config(make_config(name, **options))
    return encoder.eval()


def list_encoders() -> list[EncoderInfo]:
    """One row per registered encoder with its default options; builds nothing and downloads nothing."""
    infos = []
    for name, cls in ENCODERS.items():
        defaults = {f.name: f for f in dataclasses.fields(cls.config_class)}
        options = {}
        for key, hint in option_types(name).items():
            if key in GENERIC_FIELDS or key == cls.weights_field:  # set by --random-init, --seed, --weights
                continue
            f = defaults[key]
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            options[key] = f"{describe_type(hint)} = {default!r}"
        infos.append(dataclasses.replace(cls.describe(), options=options))
    return infos


def list_named_weights() -> list[NamedWeights]:
    """Every encoder's declared named weights (for its default config), encoder by encoder."""
    return [w for _, cls in ENCODERS.items() for w in cls.named_weights().values()]
