"""Training losses for the three ABAW tasks, the CLIP contrastive loss and DDAMFN's attention-diversity term.

Conventions shared by every loss here:

- Predictions have any leading shape ``[*]`` (``[B]`` frames or ``[B, T]`` sequences) followed by the task's
  channel dimension. ``mask`` has the leading shape ``[*]`` and marks the frames that carry a label for this
  task; it may be boolean or float (any non-zero value counts as labelled). ``mask=None`` means all frames.
- The loss is averaged over the labelled frames only. Masked frames are *selected out* (boolean indexing),
  not multiplied by zero, so whatever sits in their targets (-5, -1, even NaN) can neither change the loss
  nor leak into gradients.
- A batch with no labelled frame returns a zero that is still attached to the prediction's graph, so a
  multi-task sum can call ``backward()`` whichever tasks happen to be labelled in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from abawfeat.errors import ConfigError

# CLIP's temperature: the learnable parameter is log(scale), initialised at log(1 / 0.07); the scale that
# multiplies cosine similarities is capped at 100 so the softmax cannot collapse onto one prompt.
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
CLIP_LOGIT_SCALE_MAX = 100.0

CLASS_WEIGHT_SCHEMES = ("inverse", "sqrt_inverse", "effective")
CLIP_TEXT_SIDES = ("multi_positive", "literal")


# --------------------------------------------------------------------------------------------------------
# helpers


def _frame_mask(mask: Tensor | None, lead_shape: torch.Size, device: torch.device) -> Tensor:
    """Boolean mask of the leading shape; ``None`` selects everything."""
    if mask is None:
        return torch.ones(lead_shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(lead_shape)}")
    return mask.to(device=device) != 0


def _zero_like_graph(t: Tensor) -> Tensor:
    """A scalar 0 that keeps ``t`` in the autograd graph (so ``backward`` works on an all-masked batch)."""
    return t.sum() * 0.0


# --------------------------------------------------------------------------------------------------------
# valence / arousal


def ccc_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """``1 -`` the mean over the last dimension of the CCC, over the labelled frames of the batch: for VA,
    ``1 - (CCC_valence + CCC_arousal) / 2``.

    ``pred`` and ``target`` are ``[*, K]`` (VA: K = 2). CCC uses population moments over all selected frames
    pooled together (the metric pools the whole split, so the batch estimate should pool too, not average
    per sequence). ``eps`` keeps the ratio finite when the selected frames are constant and equal.
    """
    if pred.shape != target.shape or pred.ndim < 2:
        raise ValueError(
            f"ccc_loss: expected pred and target [*, K] of one shape, got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}"
        )
    m = _frame_mask(mask, pred.shape[:-1], pred.device)
    if not bool(m.any()):
        return _zero_like_graph(pred)
    x = pred[m].float()  # [M, K]
    y = target[m].to(x.dtype)
    mx, my = x.mean(dim=0), y.mean(dim=0)
    dx, dy = x - mx, y - my
    cov = (dx * dy).mean(dim=0)
    vx = (dx * dx).mean(dim=0)
    vy = (dy * dy).mean(dim=0)
    ccc = 2.0 * cov / (vx + vy + (mx - my) ** 2 + eps)
    return 1.0 - ccc.mean()


# --------------------------------------------------------------------------------------------------------
# expressions


def expr_ce_loss(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy over the labelled frames. ``logits [*, 8]``, ``target [*]`` class indices.

    With ``class_weight`` the mean is PyTorch's weighted mean, sum(w_y * l) / sum(w_y), so the loss scale does
    not depend on the batch's class mix.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"expr_ce_loss: logits {tuple(logits.shape)} do not match target {tuple(target.shape)}"
        )
    m = _frame_mask(mask, target.shape, logits.device)
    if not bool(m.any()):
        return _zero_like_graph(logits)
    y = target[m].long()
    n_classes = logits.shape[-1]
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"expr_ce_loss: a labelled frame has a class outside 0..{n_classes - 1}")
    if class_weight is not None:
        class_weight = class_weight.to(device=logits.device, dtype=torch.float32)
        if not bool((class_weight[y] > 0).any()):
            # Every frame is of a class weighted 0 (absent from training): PyTorch's weighted mean would be
            # 0 / 0 = NaN. Those frames teach nothing by construction, so the batch's loss is 0.
            return _zero_like_graph(logits)
    return F.cross_entropy(logits[m].float(), y, weight=class_weight, label_smoothing=float(label_smoothing))


def class_weights_from_counts(
    counts: Sequence[int] | np.ndarray | Tensor, scheme: str = "inverse", beta: float = 0.999
) -> Tensor:
    """Per-class loss weights (float32 [C]) from training-set class counts.

    - ``inverse``: w_c ∝ 1 / n_c
    - ``sqrt_inverse``: w_c ∝ 1 / sqrt(n_c) (milder; EXPR's Fear:Neutral ratio is ~1:20)
    - ``effective``: w_c ∝ (1 - beta) / (1 - beta^n_c), the "effective number of samples" weighting

    The weights are scaled so that the frame-weighted average weight is 1 (sum_c n_c w_c = sum_c n_c): the
    loss keeps the magnitude of unweighted CE and learning rates stay comparable. With ``inverse`` this is
    exactly sklearn's ``compute_class_weight("balanced")``. A class with count 0 never appears as a target,
    so its weight is irrelevant; it gets 0.
    """
    if scheme not in CLASS_WEIGHT_SCHEMES:
        raise ConfigError(
            f"unknown class-weight scheme {scheme!r}; choose one of {', '.join(CLASS_WEIGHT_SCHEMES)}"
        )
    n = torch.as_tensor(np.asarray(counts, dtype=np.float64) if not isinstance(counts, Tensor) else counts)
    n = n.to(torch.float64).reshape(-1)
    if n.numel() == 0 or bool((n < 0).any()) or not bool(torch.isfinite(n).all()):
        raise ValueError("class_weights_from_counts: counts must be a non-empty list of non-negative numbers")
    if float(n.sum()) == 0:
        raise ValueError("class_weights_from_counts: every count is zero")
    present = n > 0
    safe = torch.where(present, n, torch.ones_like(n))
    if scheme == "inverse":
        raw = 1.0 / safe
    elif scheme == "sqrt_inverse":
        raw = 1.0 / safe.sqrt()
    else:
        if not 0.0 < beta < 1.0:
            raise ConfigError(f"effective-number weighting needs 0 < beta < 1, got {beta}")
        raw = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), safe))
    raw = torch.where(present, raw, torch.zeros_like(raw))
    w = raw * n.sum() / (n * raw).sum()
    return w.to(torch.float32)


# --------------------------------------------------------------------------------------------------------
# action units


def au_bce_loss(
    logits: Tensor, target: Tensor, mask: Tensor | None = None, pos_weight: Tensor | None = None
) -> Tensor:
    """Binary cross-entropy with logits, averaged over labelled frames × AUs. ``logits``, ``target`` [*, 12].

    ``mask`` is per frame (``[*]``) or per AU entry (``[*, 12]``, e.g. ``target >= 0``); a per-entry mask
    lets a frame with one unknown AU still teach the other eleven. ``pos_weight`` [12] scales the positive
    term.
    """
    if logits.shape != target.shape:
        raise ValueError(f"au_bce_loss: logits {tuple(logits.shape)} vs target {tuple(target.shape)}")
    if mask is not None and mask.shape == logits.shape:
        m = mask.to(logits.device) != 0
        if not bool(m.any()):
            return _zero_like_graph(logits)
        x, y = logits[m].float(), target[m].float()  # flat over entries
        pw = None
        if pos_weight is not None:
            # Each selected entry needs the weight of its own AU column.
            col = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)[m]
            pw = pos_weight.to(device=logits.device, dtype=torch.float32)[col]
    else:
        m = _frame_mask(mask, logits.shape[:-1], logits.device)
        if not bool(m.any()):
            return _zero_like_graph(logits)
        x, y = logits[m].float(), target[m].float()
        pw = None if pos_weight is None else pos_weight.to(device=logits.device, dtype=torch.float32)
    if bool(((y != 0) & (y != 1)).any()):
        raise ValueError("au_bce_loss: a labelled entry is not 0 or 1 (mask out frames labelled -1)")
    return F.binary_cross_entropy_with_logits(x, y, pos_weight=pw)


def pos_weight_from_labels(
    label: np.ndarray | Tensor, valid: np.ndarray | Tensor | None = None, max_weight: float | None = None
) -> Tensor:
    """BCE ``pos_weight`` (float32 [12]) = negatives / positives per AU over the valid frames.

    An AU with no positive frame gets 1.0 (there is no positive term to weight). ``max_weight`` caps rare AUs
    whose ratio would otherwise dominate the loss.
    """
    y = np.asarray(label.cpu() if isinstance(label, Tensor) else label)
    if y.ndim != 2:
        raise ValueError(f"pos_weight_from_labels: expected [N, K] labels, got shape {y.shape}")
    if valid is not None:
        v = np.asarray(valid.cpu() if isinstance(valid, Tensor) else valid).astype(bool)
        y = y[v]
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("pos_weight_from_labels: labels must be 0/1 on valid frames (pass valid=)")
    pos = y.sum(axis=0).astype(np.float64)
    neg = y.shape[0] - pos
    w = np.ones(y.shape[1], dtype=np.float64)
    np.divide(neg, pos, out=w, where=pos > 0)
    if max_weight is not None:
        w = np.minimum(w, max_weight)
    return torch.as_tensor(w, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------
# class imbalance: focal loss (EXPR, AU) and logit-adjusted cross-entropy (EXPR)


def expr_focal_loss(
    logits: Tensor, target: Tensor, mask: Tensor | None = None, class_weight: Tensor | None = None,
    gamma: float = 2.0,
) -> Tensor:
    """Multi-class focal loss (Lin et al. 2017) over the labelled frames: ``-(1 - p_y)^gamma log p_y``.

    Averaged like ``expr_ce_loss``: with ``class_weight`` (the alpha of the paper, per class) the weighted
    mean sum(w_y * l) / sum(w_y). ``gamma = 0`` is exactly ``expr_ce_loss``; a larger gamma shrinks the loss
    of frames the head already gets right, so the rare, hard classes weigh more.
    """
    if gamma < 0:
        raise ConfigError(f"focal loss needs gamma >= 0, got {gamma}")
    if gamma == 0:  # exactly cross-entropy (the same kernel, so the same rounding too)
        return expr_ce_loss(logits, target, mask, class_weight)
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"expr_focal_loss: logits {tuple(logits.shape)} do not match target "
                         f"{tuple(target.shape)}")
    m = _frame_mask(mask, target.shape, logits.device)
    if not bool(m.any()):
        return _zero_like_graph(logits)
    y = target[m].long()
    n_classes = logits.shape[-1]
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"expr_focal_loss: a labelled frame has a class outside 0..{n_classes - 1}")
    log_p = F.log_softmax(logits[m].float(), dim=-1).gather(1, y[:, None])[:, 0]
    per_frame = -((1.0 - log_p.exp()).clamp(min=0.0) ** gamma) * log_p
    if class_weight is None:
        return per_frame.mean()
    w = class_weight.to(device=logits.device, dtype=torch.float32)[y]
    return (w * per_frame).sum() / w.sum()


def au_focal_loss(
    logits: Tensor, target: Tensor, mask: Tensor | None = None, pos_weight: Tensor | None = None,
    gamma: float = 2.0,
) -> Tensor:
    """Binary focal loss per AU, averaged over labelled frames x AUs (masks as ``au_bce_loss``):
    ``-(pos_weight y (1 - p)^gamma log p + (1 - y) p^gamma log(1 - p))``, p = sigmoid(logit).

    ``gamma = 0`` is exactly ``au_bce_loss`` with the same ``pos_weight``.
    """
    if gamma < 0:
        raise ConfigError(f"focal loss needs gamma >= 0, got {gamma}")
    if gamma == 0:  # exactly binary cross-entropy
        return au_bce_loss(logits, target, mask, pos_weight)
    if logits.shape != target.shape:
        raise ValueError(f"au_focal_loss: logits {tuple(logits.shape)} vs target {tuple(target.shape)}")
    if mask is not None and mask.shape == logits.shape:
        m = mask.to(logits.device) != 0
    else:
        m = _frame_mask(mask, logits.shape[:-1], logits.device)[..., None].expand_as(logits)
    if not bool(m.any()):
        return _zero_like_graph(logits)
    x, y = logits[m].float(), target[m].float()
    if bool(((y != 0) & (y != 1)).any()):
        raise ValueError("au_focal_loss: a labelled entry is not 0 or 1 (mask out frames labelled -1)")
    log_p, log_q = F.logsigmoid(x), F.logsigmoid(-x)  # log p, log (1 - p), stable for large |x|
    pos = -log_p * (1.0 - log_p.exp()) ** gamma
    neg = -log_q * log_p.exp() ** gamma
    if pos_weight is not None:
        col = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)[m]
        pos = pos * pos_weight.to(device=logits.device, dtype=torch.float32)[col]
    return (y * pos + (1.0 - y) * neg).mean()


def log_priors_from_counts(counts: Sequence[int] | np.ndarray) -> Tensor:
    """log pi_c (float32 [C]) of the training class counts. A class never seen counts as one frame, so its
    log prior is finite (log 0 would make its adjusted logit -inf and its gradient NaN)."""
    n = np.maximum(np.asarray(counts, dtype=np.float64).reshape(-1), 1.0)
    return torch.as_tensor(np.log(n / n.sum()), dtype=torch.float32)


def logit_adjusted_ce_loss(
    logits: Tensor, target: Tensor, log_prior: Tensor, mask: Tensor | None = None, tau: float = 1.0,
    class_weight: Tensor | None = None,
) -> Tensor:
    """Logit-adjusted cross-entropy (Menon et al. 2021): cross-entropy of ``logits + tau * log pi``.

    Training against the prior-shifted logits leaves the raw logits to model p(y | x) / pi_y, so their argmax
    (what the head predicts; nothing is adjusted at inference) targets the balanced error: rare classes are
    predicted more often. ``tau = 0`` is plain cross-entropy.
    """
    if tau < 0:
        raise ConfigError(f"logit adjustment needs tau >= 0, got {tau}")
    shift = (tau * log_prior.to(device=logits.device, dtype=torch.float32))
    return expr_ce_loss(logits.float() + shift, target, mask, class_weight)


# --------------------------------------------------------------------------------------------------------
# CLIP contrastive (seed paper section 3.2, eqs. (1)-(3))


class LogitScale(torch.nn.Module):
    """CLIP's learnable temperature: holds log(scale), returns the capped scale when called."""

    def __init__(self, init: float = CLIP_LOGIT_SCALE_INIT, learnable: bool = True) -> None:
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(float(init)), requires_grad=learnable)

    def forward(self) -> Tensor:
        return self.log_scale.exp().clamp(max=CLIP_LOGIT_SCALE_MAX)


def _scale(logit_scale: Tensor | float | LogitScale, like: Tensor) -> Tensor:
    """exp(logit_scale) capped at ``CLIP_LOGIT_SCALE_MAX``; a ``LogitScale`` module is used as is."""
    if isinstance(logit_scale, LogitScale):
        return logit_scale().to(device=like.device, dtype=torch.float32)
    ls = logit_scale if isinstance(logit_scale, Tensor) else torch.tensor(float(logit_scale))
    ls = ls.to(device=like.device, dtype=torch.float32)
    return ls.exp().clamp(max=CLIP_LOGIT_SCALE_MAX)


def contrastive_logits(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float | LogitScale
) -> Tensor:
    """Scaled cosine similarities [N, C] between images [N, D] and class prompts [C, D].

    ``logit_scale`` is log(scale) (CLIP's convention) or a ``LogitScale`` module. For prediction, the
    argmax over C is the class whose prompt is most similar; a softmax gives class probabilities.
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            "contrastive_logits: expected [N, D] and [C, D], "
            f"got {tuple(image_emb.shape)}, {tuple(text_emb.shape)}"
        )
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float().to(img.device), dim=-1)
    return _scale(logit_scale, img) * img @ txt.T


def clip_contrastive_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    target: Tensor,
    logit_scale: Tensor | float | LogitScale,
    mask: Tensor | None = None,
    text_side: str = "multi_positive",
) -> Tensor:
    """The symmetric CLIP loss L_CO = (L_img + L_text) / 2 (seed paper eqs. (1)-(3)).

    The batch's N image/caption pairs are (image i, prompt of class ``target[i]``); similarities are cosine
    (both sides L2-normalised) times the capped exp(``logit_scale``). ``image_emb`` [N, D] (or [*, D] with
    ``target`` and ``mask`` [*]), ``text_emb`` [C, D] one prompt per class.

    With 8 prompts, several samples in a batch share a caption, which eqs. (1)-(2) do not anticipate: the
    literal N × N formulation treats a copy of one's own caption as a negative, so the loss cannot fall below
    log(n_c) and gradients push same-class images apart. ``text_side`` chooses:

    - ``"multi_positive"`` (default): duplicates are merged. L_img: softmax of image i over the *distinct*
      captions in the batch, target its own class. L_text: caption i's softmax over the N images has a target
      spread uniformly over all n_c images of its class, scored by KL(target || softmax) (= cross-entropy
      minus log n_c, so 0 is reachable), averaged over i = 1..N as in eq. (2). When all captions are
      distinct this is exactly eqs. (1)-(3).
    - ``"literal"``: eqs. (1)-(3) as printed, on the N × N matrix with duplicated captions.
    """
    if text_side not in CLIP_TEXT_SIDES:
        raise ConfigError(
            f"unknown contrastive text side {text_side!r}; choose one of {', '.join(CLIP_TEXT_SIDES)}"
        )
    if image_emb.shape[:-1] != target.shape:
        raise ValueError(
            f"clip_contrastive_loss: image_emb {tuple(image_emb.shape)} vs target {tuple(target.shape)}"
        )
    m = _frame_mask(mask, target.shape, image_emb.device)
    if not bool(m.any()):
        return _zero_like_graph(image_emb)
    img, y = image_emb[m], target[m].long().to(image_emb.device)
    n_classes = text_emb.shape[0]
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"clip_contrastive_loss: a labelled frame has a class outside 0..{n_classes - 1}")
    logits = contrastive_logits(img, text_emb, logit_scale)  # [N, C]: s(I_i, T_c)
    n = y.numel()
    if text_side == "literal":
        sim = logits[:, y]  # [N, N]: s(I_i, T_{y_j}), caption j = prompt of sample j's class
        diag = torch.arange(n, device=sim.device)
        return (F.cross_entropy(sim, diag) + F.cross_entropy(sim.T, diag)) / 2.0
    present = torch.zeros(n_classes, dtype=torch.bool, device=logits.device)
    present[y] = True
    # Eq. (1) with duplicate captions collapsed: absent classes are not in the batch, so not candidates.
    l_img = F.cross_entropy(logits.masked_fill(~present, float("-inf")), y)
    # Eq. (2) per caption i: log-softmax over images of s(T_{y_i}, I_j), averaged over the images j sharing
    # caption y_i. Terms are identical for samples of one class, so compute per class and weight by n_c.
    log_p = F.log_softmax(logits.T, dim=1)  # [C, N]: class prompt c over the N images
    same = F.one_hot(y, n_classes).T.to(log_p.dtype)  # [C, N]: image j has class c
    n_c = same.sum(dim=1)  # [C]
    # Cross-entropy with the uniform soft target, minus that target's entropy log(n_c) (i.e. the KL
    # divergence): same gradients, but a perfectly aligned batch scores 0 instead of a floor of log(n_c).
    per_class = -(log_p * same).sum(dim=1) / n_c.clamp(min=1) - torch.log(n_c.clamp(min=1))
    per_class = torch.where(n_c > 0, per_class, torch.zeros_like(per_class))  # absent classes: no term
    l_text = (per_class * n_c).sum() / n
    return (l_img + l_text) / 2.0


# --------------------------------------------------------------------------------------------------------
# DDAMFN attention diversity


def attention_diversity_loss(head_maps: Sequence[Tensor] | Tensor, eps: float = 1e-8) -> Tensor:
    """DDAMFN's fine-tuning term ``n_pairs / (sum over head pairs of MSE(map_i, map_j) + eps)``.

    ``head_maps`` is the list of attention-head outputs the network returns (each [B, C, H, W]) or those
    stacked along a new first dimension ([K, B, C, H, W]). MSE is the mean over all elements, batch included.
    The loss is large when heads attend to the same place, so minimising it spreads the heads apart. With a
    single head there is no pair and the loss is 0.
    """
    maps = list(head_maps.unbind(0)) if isinstance(head_maps, Tensor) else list(head_maps)
    if not maps:
        raise ValueError("attention_diversity_loss: no head maps")
    if len(maps) < 2:
        return _zero_like_graph(maps[0])
    total = maps[0].new_zeros(())
    n_pairs = 0
    for i in range(len(maps) - 1):
        for j in range(i + 1, len(maps)):
            total = total + F.mse_loss(maps[i], maps[j])
            n_pairs += 1
    return n_pairs / (total + eps)


__all__ = [
    "CLIP_LOGIT_SCALE_INIT",
    "CLIP_LOGIT_SCALE_MAX",
    "LogitScale",
    "attention_diversity_loss",
    "au_bce_loss",
    "au_focal_loss",
    "ccc_loss",
    "class_weights_from_counts",
    "clip_contrastive_loss",
    "contrastive_logits",
    "expr_ce_loss",
    "expr_focal_loss",
    "log_priors_from_counts",
    "logit_adjusted_ce_loss",
    "pos_weight_from_labels",
]
