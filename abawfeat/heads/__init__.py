"""Stage-two heads: a registered trunk (abawfeat/trunks) between standardised features and task outputs.

Every head follows one contract (docs/architecture.md, "Heads"):

- it is built from a small dataclass config (``Head.Config``) and nothing else, so that a checkpoint that
  stores ``{"name": ..., "config": {...}}`` rebuilds it without the command line (``head_from_dict``); the
  config names the trunk and holds the trunk's own config;
- ``forward(features [B, T, D], mask [B, T]) -> {task: Tensor [B, T, K]}`` with ``K`` the task's width
  (``abawfeat.tasks``), after the task's activation (VA squashed into [-1, 1]; EXPR and AU logits). ``mask``
  marks real frames; padding is only ever at the end of a sequence, outputs at padded positions are zero and
  real positions never depend on them. Keys that are not task names are auxiliary (the contrastive head adds
  ``expr_embedding``).

Two kinds of head exist: ``tasks`` (one linear output per task on the trunk: the paper's Fc / LSTM heads, and
seed 003's multi-task head when it has the three tasks) and ``contrastive`` (the paper's CLIP projection
scored against prompt embeddings). The objective picks the kind; ``--head`` picks the trunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from abawfeat.errors import CheckpointError, ConfigError
from abawfeat.tasks import single
from abawfeat.trunks import TRUNKS, Context, Trunk, build_trunk
from abawfeat.utils.registry import Registry


@dataclass
class HeadConfig:
    """Fields every head has. Subclasses add their own, each with a comment saying why it exists."""

    in_dim: int = 512  # D of the cache's features; set from the cache, checked again at load time
    tasks: tuple[str, ...] = ("va",)  # which outputs to produce (one task, or all three for multi-task)
    trunk: str = "fc"  # registered trunk (abawfeat.trunks.TRUNKS): what --head chooses
    trunk_config: dict[str, Any] = field(default_factory=dict)  # the trunk's config fields (its defaults
    # where absent), so a checkpoint rebuilds exactly the trunk it was trained with
    normalize: bool = True  # standardise features with training-set mean/std (buffers, saved in checkpoints)
    # Fused caches (abawfeat.data.sequences): each cache's feature size; their columns come first, then one
    # availability column per cache. () = one cache.
    groups: tuple[int, ...] = ()
    fusion: str = "early"  # early: one trunk on all columns; late: one trunk per cache, outputs gated;
    # attention: each cache attends to the others (masked by availability), then one trunk (FUSIONS)


class Head(nn.Module):
    """Base class: input standardisation buffers, the trunk, and the shared masking rule."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[HeadConfig]] = HeadConfig

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        for t in config.tasks:
            single(t)  # a ConfigError naming the tasks for an unknown one
        if config.fusion not in FUSIONS:
            raise ConfigError(f"--fusion {config.fusion!r}: choose one of {', '.join(FUSIONS)}")
        if config.groups and sum(config.groups) + len(config.groups) != config.in_dim:
            raise ConfigError(f"head: caches of {list(config.groups)} features and their availability "
                              f"columns do not make {config.in_dim} inputs")
        if len(config.groups) > 1:
            fuse = FUSIONS.get(config.fusion)
            self.trunk: Trunk | nn.Module = fuse(config.in_dim, config.groups, config.trunk,
                                                 config.trunk_config)
        else:
            self.trunk = build_trunk(config.trunk, config.in_dim, config.trunk_config)
        # The trunk's whole config (its defaults filled in), so a checkpoint never depends on defaults that
        # a later version might change.
        from abawfeat.utils.configs import to_dict

        self.config = dataclasses.replace(config, trunk_config=to_dict(self.trunk.config))
        # Buffers (not parameters): they travel in the state dict, so a loaded head standardises exactly as
        # it did in training without needing the training data.
        self.register_buffer("in_mean", torch.zeros(config.in_dim))
        self.register_buffer("in_std", torch.ones(config.in_dim))

    def context(self) -> Context:
        """The trunk's temporal context: what an output may depend on (abawfeat.trunks.Context)."""
        return self.trunk.context()

    def is_temporal(self) -> bool:
        """Whether outputs depend on other frames (then training uses windows, inference overlapping ones)."""
        return self.context().temporal

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
        groups = self.config.groups
        if groups:
            # A cache that lacks a frame contributes its training mean (0 after standardising), and its
            # availability column says so: the trunk sees the mask, never a silent zero feature.
            n = sum(groups)
            start = 0
            for c, width in enumerate(groups):  # in place, group by group: no mask as wide as the features
                x[..., start : start + width].mul_(x[..., n + c : n + c + 1])
                start += width
        return x

    def represent(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """Standardised features through the trunk: [B, T, trunk.out_dim]."""
        return self.trunk(self.prepare(features), mask)

    @staticmethod
    def apply_mask(outputs: dict[str, Tensor], mask: Tensor | None) -> dict[str, Tensor]:
        """Zero every output at padded positions, so padding can never be mistaken for a prediction."""
        if mask is None:
            return outputs
        m = mask.unsqueeze(-1)
        return {k: v * m.to(v.dtype) for k, v in outputs.items()}

    def forward(self, features: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError


# How fused caches meet a trunk, by name (what --fusion chooses): a builder (in_dim, groups, trunk name,
# trunk options) -> a module with the trunk's interface (forward(x, mask), context(), out_dim, config).
FUSIONS: Registry[Callable[[int, tuple[int, ...], str, dict[str, Any]], nn.Module]] = Registry("fusion")


class LateFusion(nn.Module):
    """One trunk per fused cache, their outputs combined per frame by learned gates.

    Branches of different widths are projected to the widest one. The gates are a softmax over the caches
    for every output dimension, from all branches' outputs (as in gated multimodal units), so a dimension
    can come from the cache that carries it; a cache that lacks the frame gets no weight there (its logits
    are masked), so the combination uses only the caches that saw the frame. Declares the branches'
    (shared) temporal context.
    """

    def __init__(self, groups: tuple[int, ...], trunk: str, options: dict[str, Any]) -> None:
        super().__init__()
        self.groups = tuple(groups)
        self.branches = nn.ModuleList(build_trunk(trunk, g, options) for g in groups)
        self.config = self.branches[0].config
        widths = [b.out_dim for b in self.branches]
        self.out_dim = max(widths)
        self.project = nn.ModuleList(nn.Identity() if w == self.out_dim else nn.Linear(w, self.out_dim)
                                     for w in widths)
        self.gate = nn.Linear(sum(widths), len(groups) * self.out_dim)

    def context(self) -> Context:
        return self.branches[0].context()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        n = sum(self.groups)
        present = x[..., n:]
        bounds = torch.tensor([0, *self.groups]).cumsum(0).tolist()
        hs = [branch(x[..., bounds[c] : bounds[c + 1]], mask) for c, branch in enumerate(self.branches)]
        logits = self.gate(torch.cat(hs, dim=-1)).float().unflatten(-1, (len(self.groups), self.out_dim))
        absent = (present <= 0.5).unsqueeze(-1)  # [..., C, 1]
        logits = logits.masked_fill(absent, float("-inf"))
        # A frame no cache has cannot be a row; guard anyway so padding never produces NaN.
        logits = torch.where(absent.all(dim=-2, keepdim=True), torch.zeros_like(logits), logits)
        weights = torch.softmax(logits, dim=-2)
        values = torch.stack([proj(h).float() for h, proj in zip(hs, self.project, strict=True)], dim=-2)
        return (weights * values).sum(dim=-2).to(hs[0].dtype)


FUSIONS.add("early", lambda in_dim, groups, trunk, options: build_trunk(trunk, in_dim, options))
FUSIONS.add("late", lambda in_dim, groups, trunk, options: LateFusion(groups, trunk, options))


def _check_head(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Head)):
        raise TypeError(f"head {name!r}: the registry holds Head subclasses, got {cls!r}")
    if not (dataclasses.is_dataclass(cls.Config) and issubclass(cls.Config, HeadConfig)):
        raise TypeError(f"head {name!r}: Config must be a HeadConfig dataclass")


# The kinds of head (what sits on the trunk): chosen by the objective, not by --head.
HEADS: Registry[type[Head]] = Registry("head", _check_head)


def build_head(name: str, config: HeadConfig | None = None, **fields: Any) -> Head:
    """Build a registered head from its config (or from config fields given as keywords)."""
    cls = HEADS.get(name)
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


def head_from_dict(data: Mapping[str, Any], where: str = "checkpoint") -> Head:
    """Rebuild a head (untrained weights) from ``head_to_dict`` output."""
    from abawfeat.utils.configs import from_dict

    if not isinstance(data, Mapping) or "name" not in data or "config" not in data:
        raise CheckpointError(f"{where}: no head description (expected {{'name', 'config'}})")
    name = str(data["name"])
    if name not in HEADS:
        known = ", ".join(HEADS.names())
        raise CheckpointError(f"{where}: unknown head {name!r} (this abawfeat has {known})")
    cls = HEADS.get(name)
    config = from_dict(cls.Config, dict(data["config"]))
    if config.trunk not in TRUNKS:
        raise CheckpointError(f"{where}: unknown trunk {config.trunk!r} "
                              f"(this abawfeat has {', '.join(TRUNKS.names())})")
    try:
        return cls(config)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def upgrade_v1(
    head: Mapping[str, Any], state: Mapping[str, Tensor]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A version-1 checkpoint's head description and weights in today's terms.

    Version 1 registered one head per architecture (``fc``, ``lstm``, ``mtl``, ``contrastive``) with the
    trunk's fields inline; today a head names a trunk. The weights keep their names except the recurrent
    trunk's module (``trunk.lstm.*`` is now ``trunk.rnn.*``).
    """
    name, old = str(head.get("name")), dict(head.get("config") or {})
    common = {k: old[k] for k in ("in_dim", "tasks", "normalize") if k in old}
    trunk_name = {"fc": "fc", "lstm": "lstm"}.get(name, old.get("trunk", "fc"))
    trunk: dict[str, Any] = {"dropout": float(old.get("dropout", 0.0))}
    hidden = old.get("hidden")
    if trunk_name == "lstm":
        trunk.update(layers=int(old.get("layers", 1)), bidirectional=bool(old.get("bidirectional", False)))
    if name == "fc":
        trunk["hidden"] = int(hidden or 0)
    elif name == "mtl":
        trunk["hidden"] = max(int(256 if hidden is None else hidden), 1)
    elif name == "contrastive":
        trunk["hidden"] = int(hidden or (512 if trunk_name == "fc" else 256))
    else:
        trunk["hidden"] = int(256 if hidden is None else hidden)
    config: dict[str, Any] = {**common, "trunk": trunk_name, "trunk_config": trunk}
    kind = "tasks"
    if name == "contrastive":
        kind = "contrastive"
        config.update({k: old[k] for k in ("embed_dim", "class_names", "logit_scale_init", "learn_scale")
                       if k in old})
    weights = {k.replace("trunk.lstm.", "trunk.rnn.", 1): v for k, v in state.items()}
    return {"name": kind, "config": config}, weights


def describe_heads() -> list[dict[str, Any]]:
    """Rows for ``abawfeat heads``: the head kinds, with their own config fields and defaults."""
    base = {f.name for f in dataclasses.fields(HeadConfig)}
    rows = []
    for name, cls in HEADS.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        own = {f.name: _default(f) for f in dataclasses.fields(cls.Config) if f.name not in base}
        rows.append({"name": name, "description": doc[0] if doc else "", "config": own})
    return rows


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


# Importing the modules registers the head kinds.
from abawfeat.heads import attention_fusion, contrastive, moe, task_outputs  # noqa: E402, F401

__all__ = ["FUSIONS", "HEADS", "Head", "HeadConfig", "build_head", "describe_heads", "head_from_dict",
           "head_to_dict", "upgrade_v1"]
