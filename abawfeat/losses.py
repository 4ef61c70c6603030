"""Training losses (API stub; implementation in progress)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
CLIP_LOGIT_SCALE_MAX = 100.0


def ccc_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    raise NotImplementedError


def expr_ce_loss(
    logits: Tensor, target: Tensor, mask: Tensor | None = None, class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    raise NotImplementedError


def class_weights_from_counts(counts, scheme: str = "inverse", beta: float = 0.999) -> Tensor:
    raise NotImplementedError


def au_bce_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None, pos_weight: Tensor | None = None) -> Tensor:
    raise NotImplementedError


def pos_weight_from_labels(label, valid=None, max_weight: float | None = None) -> Tensor:
    raise NotImplementedError


def contrastive_logits(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    raise NotImplementedError


def clip_contrastive_loss(
    image_emb: Tensor, text_emb: Tensor, target: Tensor, logit_scale: Tensor | float,
    mask: Tensor | None = None, text_side: str = "multi_positive",
) -> Tensor:
    raise NotImplementedError


def attention_diversity_loss(head_maps: Sequence[Tensor] | Tensor, eps: float = 1e-8) -> Tensor:
    raise NotImplementedError


def mtl_loss(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], masks: Mapping[str, Tensor],
             weights: Mapping[str, float] | None = None, **task_kwargs) -> tuple[Tensor, dict[str, float]]:
    raise NotImplementedError


class LogitScale(torch.nn.Module):
    """Learnable CLIP temperature."""


class MultiTaskLoss(torch.nn.Module):
    pass
