"""Trunks: the temporal (or frame-wise) models every stage-two head is built on.

A trunk maps standardised features ``[B, T, D]`` and a mask ``[B, T]`` (real frames; padding only at the end
of a sequence) to a representation ``[B, T, out_dim]``, from a small dataclass config alone. It declares its
temporal **context** (``Context``): frame-wise, causal or bidirectional, and its receptive field where it is
finite. Everything that depends on time follows from that declaration and nothing else: whether training
uses windows, how overlapping inference windows are weighted, the default precision, the order in which a
grid queues its cells. The plain, multi-task and contrastive heads all take any registered trunk, so
``--head NAME`` accepts every trunk for every task and objective.

Adding a trunk is one file here with a ``Trunk`` subclass decorated ``@TRUNKS.register("name")``, plus its
import at the bottom of this file (docs/architecture.md, "Add a trunk"); the tests are parametrised over
``TRUNKS``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from abawfeat.errors import ConfigError
from abawfeat.utils.registry import Registry

CONTEXT_KINDS = ("frame", "causal", "bidirectional")


@dataclass(frozen=True)
class Context:
    """What a trunk's output at one position may depend on.

    ``kind``: ``frame`` (that frame only), ``causal`` (that frame and earlier ones) or ``bidirectional``
    (earlier and later ones). ``receptive_field``: how many frames in all one output can see (for a
    bidirectional trunk, centred on the frame), or None when it sees its whole input window.
    """

    kind: str
    receptive_field: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in CONTEXT_KINDS:
            raise ValueError(f"context kind {self.kind!r}: use one of {', '.join(CONTEXT_KINDS)}")
        if self.receptive_field is not None and self.receptive_field < 1:
            raise ValueError(f"receptive field must be >= 1 frame, got {self.receptive_field}")

    @property
    def temporal(self) -> bool:
        """Outputs depend on other frames: training uses windows, inference overlapping ones."""
        return self.kind != "frame"

    def reach(self) -> tuple[float, float]:
        """Frames seen before and after the current one (inf = up to the window's edge)."""
        if self.kind == "frame":
            return 0.0, 0.0
        rf = np.inf if self.receptive_field is None else float(self.receptive_field - 1)
        if self.kind == "causal":
            return rf, 0.0
        return rf / 2.0, rf / 2.0

    def position_weights(self, length: int) -> np.ndarray | None:
        """Weight of each position of an inference window when overlapping windows are averaged: the
        context the trunk had there, 1 + the frames it could see on its more limited side.

        A causal trunk at position p has seen min(p, reach) earlier frames, so late positions count more
        until the receptive field is full; a bidirectional one is limited by the nearer window edge, so the
        middle counts most. Every weight is positive: a frame at a video's start still gets a prediction.
        None for frame-wise trunks (every window gives the same output).
        """
        if not self.temporal:
            return None
        p = np.arange(length, dtype=np.float64)
        back, ahead = self.reach()
        seen_back = np.minimum(p, back)
        if self.kind == "causal":
            return seen_back + 1.0
        seen_ahead = np.minimum(length - 1 - p, ahead)
        return np.minimum(seen_back, seen_ahead) + 1.0

    def describe(self) -> str:
        if self.kind == "frame":
            return "frame-wise"
        field = "whole window" if self.receptive_field is None else f"{self.receptive_field} frames"
        return f"{self.kind}, receptive field {field}"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "receptive_field": self.receptive_field}


@dataclass
class TrunkConfig:
    """Fields every trunk has; subclasses add their own, each with a comment saying why it exists."""

    dropout: float = 0.0  # on the trunk's input and output; 0 reproduces the paper's plain heads


class Trunk(nn.Module):
    """Base class: ``forward(x [B, T, D], mask [B, T] | None) -> [B, T, out_dim]``; ``context()``."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # how tables and reports name it, e.g. "LSTM" (the paper's "DDAMFN+LSTM")
    Config: ClassVar[type[TrunkConfig]] = TrunkConfig
    # True where a CPU bf16 pass needs the CPU's own bf16 kernels (AVX-512 BF16 or AMX): oneDNN has no
    # emulated bf16 path for some primitives, and asking for one ends in a primitive-descriptor error.
    bf16_needs_native: ClassVar[bool] = False

    def __init__(self, in_dim: int, config: TrunkConfig) -> None:
        super().__init__()
        if in_dim < 1:
            raise ConfigError(f"trunk {self.name!r}: input size must be >= 1, got {in_dim}")
        if not 0.0 <= config.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {config.dropout}")
        self.in_dim = in_dim
        self.config = config
        self.out_dim = in_dim

    def context(self) -> Context:
        raise NotImplementedError

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError


def _check_trunk(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Trunk)):
        raise TypeError(f"trunk {name!r}: the registry holds Trunk subclasses, got {cls!r}")
    if not (dataclasses.is_dataclass(cls.Config) and issubclass(cls.Config, TrunkConfig)):
        raise TypeError(f"trunk {name!r}: Config must be a TrunkConfig dataclass")


# Every trunk, by name: what ``--head NAME`` chooses.
TRUNKS: Registry[type[Trunk]] = Registry("trunk", _check_trunk)


def trunk_fields(name: str) -> dict[str, Any]:
    """The config fields of trunk ``name`` with their defaults."""
    cls = TRUNKS.get(name)
    return {f.name: _default(f) for f in dataclasses.fields(cls.Config)}


def make_trunk_config(name: str, options: dict[str, Any], where: str = "") -> TrunkConfig:
    """The trunk's config from option values; unknown options name the trunk's options."""
    cls = TRUNKS.get(name)
    fields = trunk_fields(name)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}trunk {name!r} has no option {', '.join(unknown)}; its options are "
                          f"{', '.join(sorted(fields))}")
    values = dict(options)
    for key, value in values.items():
        default = fields[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"trunk {name!r}: option {key} must be true or false, got {value!r}")
        elif isinstance(default, int) and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"trunk {name!r}: option {key} must be an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"trunk {name!r}: option {key} must be a number, got {value!r}")
            values[key] = float(value)
    return cls.Config(**values)


def build_trunk(name: str, in_dim: int, options: dict[str, Any] | None = None) -> Trunk:
    """Build trunk ``name`` on ``in_dim``-d inputs from its config fields."""
    cls = TRUNKS.get(name)
    return cls(in_dim, make_trunk_config(name, dict(options or {})))


def describe_trunks() -> list[dict[str, Any]]:
    """Rows for ``abawfeat heads``: name, label, one-line description, default context, options."""
    rows = []
    for name, cls in TRUNKS.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        default = cls(8, cls.Config())
        rows.append({"name": name, "label": cls.label, "description": doc[0] if doc else "",
                     "context": default.context().describe(), "options": trunk_fields(name)})
    return rows


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def prefix_mask(mask: Tensor) -> Tensor:
    """Lengths [B] of a prefix mask (padding only at the end); refuses a mask with holes, which would
    silently mix frames in any sequence model."""
    lengths = mask.sum(dim=1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not bool((expected == mask.bool()).all()):
        raise ValueError("trunk mask must be a prefix mask (padding only at the end of each sequence)")
    return lengths


# Importing the modules registers the trunks (order does not matter).
from abawfeat.trunks import fc, gru, lstm, mamba, tcn, transformer  # noqa: E402, F401

__all__ = ["CONTEXT_KINDS", "TRUNKS", "Context", "Trunk", "TrunkConfig", "build_trunk", "describe_trunks",
           "make_trunk_config", "prefix_mask", "trunk_fields"]
