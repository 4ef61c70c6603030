"""Stage-two heads: small networks that map cached per-frame features to task outputs.

Every head follows one contract (docs/architecture.md, "Heads"):

- it is built from a small dataclass config (``Head.Config``) and nothing else, so that a checkpoint that
  stores ``{"name": ..., "config": {...}}`` rebuilds it without the command line (``head_from_dict``);
- ``forward(features [B, T, D], mask [B, T]) -> {task: Tensor [B, T, K]}`` with ``K`` = 2 (va: valence and
  arousal, already squashed into [-1, 1]), 8 (expr: logits in ``EXPR_CLASSES`` order) or 12 (au: logits in
  ``AU_NAMES`` order). ``mask`` marks real frames; padding is only ever at the end of a sequence (windows
  at the end of a video), outputs at padded positions are zero and real positions never depend on them.
  Keys that are not task names are auxiliary (the contrastive head adds ``expr_embedding``).

Heads register themselves by name with ``@register_head("name")``; ``tests/test_heads.py`` is parametrised
over the registry, so a new head is one new file here plus its import below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from abawfeat.constants import AU_NAMES, EXPR_CLASSES, VA_NAMES
from abawfeat.errors import CheckpointError, ConfigError

# Output width per task, in the release's column order.
OUTPUT_DIMS: dict[str, int] = {"va": len(VA_NAMES), "expr": len(EXPR_CLASSES), "au": len(AU_NAMES)}


@dataclasses.dataclass
class HeadConfig:
    """Fields every head has. Subclasses add their own, each with a comment saying why it exists."""

    in_dim: int = 512  # D of the cache's features; set from the cache, checked again at load time
    tasks: tuple[str, ...] = ("va",)  # which outputs to produce (one task, or all three for multi-task)
    dropout: float = 0.0  # on the head's input and hidden states; 0 reproduces the paper's plain heads
    normalize: bool = True  # standardise features with training-set mean/std (buffers, saved in checkpoints)


class Head(nn.Module):
    """Base class: input standardisation buffers and the shared masking rule."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[HeadConfig]] = HeadConfig
    temporal: ClassVar[bool] = False  # True: outputs depend on neighbouring frames (trained on windows)

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        for task in config.tasks:
            if task not in OUTPUT_DIMS:
                raise ConfigError(f"head {self.name!r}: unknown task {task!r} (use {', '.join(OUTPUT_DIMS)})")
        self.config = config
        # Buffers (not parameters): they travel in the state dict, so a loaded head standardises exactly as
        # it did in training without needing the training data.
        self.register_buffer("in_mean", torch.zeros(config.in_dim))
        self.register_buffer("in_std", torch.ones(config.in_dim))

    def is_temporal(self) -> bool:
        """Whether outputs depend on other frames (then training uses windows, inference overlapping ones)."""
        return self.temporal

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.config.tasks)

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Record the training features' per-dimension mean and std (used when ``config.normalize``)."""
        self.in_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        # A dimension that never varies would divide by zero; leave it unscaled.
        std = torch.as_tensor(std, dtype=torch.float32)
        self.in_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def prepare(self, features: Tensor) -> Tensor:
        if features.shape[-1] != self.config.in_dim:
            raise ConfigError(
                f"head {self.name!r} expects {self.config.in_dim}-d features, got {features.shape[-1]}-d"
            )
        # Features arrive in the cache's dtype (fp16): one converting copy, then in-place scale and shift
        # (the hot path of a frame-wise epoch; autocast, if on, picks the matmul precision afterwards).
        x = features.to(torch.float32, copy=True)
        if self.config.normalize:
            scale = 1.0 / self.in_std
            x.mul_(scale).add_(-self.in_mean * scale)
        return x

    @staticmethod
    def apply_mask(outputs: dict[str, Tensor], mask: Tensor | None) -> dict[str, Tensor]:
        """Zero every output at padded positions, so padding can never be mistaken for a prediction."""
        if mask is None:
            return outputs
        m = mask.unsqueeze(-1)
        return {k: v * m.to(v.dtype) for k, v in outputs.items()}

    def forward(self, features: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError


class TaskOutputs(nn.Module):
    """One linear layer per task on top of a shared representation; VA goes through tanh into [-1, 1]."""

    def __init__(self, in_features: int, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({t: nn.Linear(in_features, OUTPUT_DIMS[t]) for t in tasks})

    def forward(self, h: Tensor) -> dict[str, Tensor]:
        out = {}
        for task, layer in self.layers.items():
            y = layer(h)
            # tanh keeps VA in the labels' range without clipping, so the CCC loss still has gradients there.
            out[task] = torch.tanh(y) if task == "va" else y
        return out


# ---------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Head]] = {}
H = TypeVar("H", bound=type[Head])


def register_head(name: str) -> Callable[[H], H]:
    """Class decorator: make a head buildable by ``name`` (and covered by the parametrised tests)."""

    def decorate(cls: H) -> H:
        if name in _REGISTRY:
            raise ValueError(f"head {name!r} is registered twice")
        if not (dataclasses.is_dataclass(cls.Config) and issubclass(cls.Config, HeadConfig)):
            raise TypeError(f"head {name!r}: Config must be a HeadConfig dataclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_heads() -> list[str]:
    return sorted(_REGISTRY)


def head_class(name: str) -> type[Head]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown head {name!r}; registered heads: {', '.join(list_heads())}") from None


def build_head(name: str, config: HeadConfig | None = None, **fields: Any) -> Head:
    """Build a registered head from its config (or from config fields given as keywords)."""
    cls = head_class(name)
    if config is None:
        known = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(
                f"head {name!r} has no option(s) {', '.join(unknown)}; it has {', '.join(sorted(known))}"
            )
        if "tasks" in fields:
            fields["tasks"] = tuple(fields["tasks"])
        config = cls.Config(**fields)
    elif not isinstance(config, cls.Config):
        raise ConfigError(f"head {name!r} needs a {cls.Config.__name__}, got {type(config).__name__}")
    return cls(config)


def head_to_dict(head: Head) -> dict[str, Any]:
    """What a checkpoint stores to rebuild ``head`` (the weights go separately, in its state dict)."""
    from abawfeat.utils.configs import to_dict

    return {"name": head.name, "config": to_dict(head.config)}


def head_from_dict(data: dict[str, Any], where: str = "checkpoint") -> Head:
    """Rebuild a head (untrained weights) from ``head_to_dict`` output."""
    from abawfeat.utils.configs import from_dict

    if not isinstance(data, dict) or "name" not in data or "config" not in data:
        raise CheckpointError(f"{where}: no head description (expected {{'name', 'config'}})")
    cls = head_class(str(data["name"]))
    return cls(from_dict(cls.Config, dict(data["config"])))


def describe_heads() -> list[dict[str, Any]]:
    """Rows for ``abawfeat heads``: name, one-line description, temporal or not, config fields + defaults."""
    rows = []
    for name in list_heads():
        cls = _REGISTRY[name]
        doc = (cls.__doc__ or "").strip().splitlines()
        fields = {f.name: _default(f) for f in dataclasses.fields(cls.Config)}
        # Heads with a ``trunk`` option are temporal exactly when that trunk is an LSTM.
        temporal = "with trunk=lstm" if "trunk" in fields else ("yes" if cls.temporal else "no")
        rows.append({"name": name, "description": doc[0] if doc else "", "temporal": temporal,
                     "config": fields})
    return rows


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


# Importing the modules registers the heads (order does not matter).
from abawfeat.heads import contrastive, fc, lstm, multitask  # noqa: E402, F401

__all__ = [
    "OUTPUT_DIMS",
    "Head",
    "HeadConfig",
    "TaskOutputs",
    "build_head",
    "describe_heads",
    "head_class",
    "head_from_dict",
    "head_to_dict",
    "list_heads",
    "register_head",
]
