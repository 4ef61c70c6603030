"""The encoder contract and its registry.

An encoder is a frozen image network that turns normalised face crops into one feature vector per frame
(and, for classifiers such as DDAMFN, logits). Like open_clip, weights and their preprocessing travel
together: every encoder owns its ``transform`` and reports it in ``provenance()``, so a cache can never pair
features with the wrong normalisation. Like timm, encoders are registered by name with a decorator and one
parametrised test covers every registered encoder (see tests/test_encoders.py).

Contract (docs/architecture.md), with compatible extensions marked *:
    name, feature_dim, input_size, mean, std, logit_names
    forward(x [B, 3, S, S] normalised) -> (features [B, D], logits [B, C] | None)
    embed(x) -> features [B, D]
    transform: picklable ImageTransform, PIL image -> normalised [3, S, S] float32
    provenance() -> JSON-ready dict
    text_embeddings() -> (prompts, [C, D]) | None
    calibrate(images [N, 3, S, S]) -> None          (random-init encoders only)
    describe() -> EncoderInfo *                      (defaults, without building or loading weights)
    smoke_options() -> dict *                        (a fast, offline build for the test-suite)
    modality *                                       ("face" here; "audio": speech encoders, whose own
                                                      contract is in encoders/speech.py)
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from abawfeat.errors import ConfigError
from abawfeat.utils.configs import to_dict
from abawfeat.utils.registry import Registry

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
RANDOM_INIT = "random-init"
# Bumped when the meaning of a provenance field changes, so stage two can refuse what it cannot compare.
PROVENANCE_VERSION = 1

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

    def as_dict(self) -> dict[str, Any]:
        return to_dict(self)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hash of a tensor's float32 values and shape (used to identify calibration frames)."""
    data = tensor.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


class Encoder(nn.Module):
    """Base class of every registered encoder; subclasses set the attributes in ``__init__``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[Any]]
    summary: ClassVar[str] = ""
    # Whether extraction compiles this encoder by default on large runs (ExtractConfig.compile = None):
    # only where it was measured to pay (DDAMFN: 1.4-1.7x its eager speed on CPU). CLIP ran slower compiled.
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

    def calibrate(self, images: torch.Tensor) -> None:
        raise ConfigError(f"encoder {self.name!r} has no calibration (only random-init DDAMFN needs one)")

    def provenance(self) -> dict[str, Any]:
        """Everything a cache must record so that stage two can check it was made by this very encoder."""
        return {
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


# Every stage-one encoder, by name: ``@ENCODERS.register("name")`` on an Encoder subclass.
ENCODERS: Registry[type[Encoder]] = Registry("encoder", _check_encoder)


def make_config(name: str, **options: Any) -> Any:
    """The encoder's config dataclass from keyword options; unknown options are a ConfigError."""
    cls = ENCODERS.get(name)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"encoder {name!r} has no option {', '.join(unknown)} (options: {', '.join(sorted(fields))})"
        )
    return cls.config_class(**options)


def build_encoder(name: str, **options: Any) -> Encoder:
    """Build a registered encoder in eval mode. Options are passed verbatim to its config dataclass, so
    callers (the CLI) pass only the options a user actually set."""
    cls = ENCODERS.get(name)
    encoder = cls.from_config(make_config(name, **options))
    return encoder.eval()


def list_encoders() -> list[EncoderInfo]:
    """One row per registered encoder with its default options; builds nothing and downloads nothing."""
    return [cls.describe() for _, cls in ENCODERS.items()]
