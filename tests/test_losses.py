"""Losses vs hand formulas, masking semantics and a literal implementation of CLIP eqs. (1)-(3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from abawfeat.data.batches import Batch
from abawfeat.errors import ConfigError
from abawfeat.losses import (
    CLIP_LOGIT_SCALE_INIT,
    LogitScale,
    attention_diversity_loss,
    au_bce_loss,
    ccc_loss,
    class_weights_from_counts,
    clip_contrastive_loss,
    contrastive_logits,
    expr_ce_loss,
    pos_weight_from_labels,
)
from abawfeat.metrics import ccc
from abawfeat.train.objectives import LossWeights, build_objective

# float() on a loss that is still in the graph is intended here (comparing values).
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _grad(loss_fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    loss_fn(x).backward()
    return x.grad


# ---------------------------------------------------------------------------------------------- CCC


def test_ccc_loss_equals_one_minus_metric_over_masked_frames() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 20, 2, generator=g, dtype=torch.float64)
    target = torch.rand(3, 20, 2, generator=g, dtype=torch.float64) * 2 - 1
    mask = torch.rand(3, 20, generator=g) > 0.3
    loss = ccc_loss(pred, target, mask)
    p, t = pred[mask].numpy(), target[mask].numpy()
    expected = 1 - (ccc(p[:, 0], t[:, 0]) + ccc(p[:, 1], t[:, 1])) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_ccc_loss_masked_frames_change_neither_loss_nor_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 10, 2, generator=g)
    target = torch.randn(2, 10, 2, generator=g)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 7:] = False
    other_target = target.clone()
    other_target[~mask] = float("nan")  # whatever sits in masked targets must not leak
    other_pred = pred.clone()
    other_pred[~mask] = 123.0
    a = ccc_loss(pred, target, mask)
    b = ccc_loss(other_pred, other_target, mask)
    assert torch.isfinite(b) and float(a) == pytest.approx(float(b), abs=1e-6)
    grad = _grad(lambda x: ccc_loss(x, other_target, mask), pred)
    assert torch.all(grad[~mask] == 0) and torch.isfinite(grad).all()
    assert grad[mask].abs().sum() > 0


def test_all_masked_batches_return_zero_with_grad_fn() -> None:
    pred = torch.randn(4, 2, requires_grad=True)
    logits8 = torch.randn(4, 8, requires_grad=True)
    logits12 = torch.randn(4, 12, requires_grad=True)
    none = torch.zeros(4, dtype=torch.bool)
    losses = [
        ccc_loss(pred, torch.full((4, 2), -5.0), none),
        expr_ce_loss(logits8, torch.full((4,), -1), none),
        au_bce_loss(logits12, torch.full((4, 12), -1.0), none),
        clip_contrastive_loss(
            torch.randn(4, 5, requires_grad=True), torch.randn(8, 5), torch.full((4,), -1), 0.0, none
        ),
    ]
    for loss in losses:
        assert float(loss.detach()) == 0.0 and loss.grad_fn is not None
    sum(losses).backward()
    assert torch.all(pred.grad == 0)


# ---------------------------------------------------------------------------------------------- EXPR


def test_expr_ce_loss_masking_weights_and_smoothing() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 8, generator=g)
    target = torch.randint(0, 8, (2, 6), generator=g)
    mask = torch.rand(2, 6, generator=g) > 0.4
    target_with_invalid = torch.where(mask, target, torch.full_like(target, -1))
    loss = expr_ce_loss(logits, target_with_invalid, mask)
    # Hand formula: mean over labelled frames of -log softmax at the true class.
    logp = torch.log_softmax(logits[mask], dim=-1)
    assert float(loss) == pytest.approx(float(-logp[torch.arange(mask.sum()), target[mask]].mean()), abs=1e-6)
    w = torch.arange(1, 9, dtype=torch.float32)
    weighted = expr_ce_loss(logits, target_with_invalid, mask, class_weight=w)
    wy = w[target[mask]]
    nll = -logp[torch.arange(mask.sum()), target[mask]]
    assert float(weighted) == pytest.approx(float((wy * nll).sum() / wy.sum()), abs=1e-6)
    smoothed = expr_ce_loss(logits, target_with_invalid, mask, label_smoothing=0.1)
    soft = torch.full_like(logp, 0.1 / 8)
    soft[torch.arange(mask.sum()), target[mask]] += 0.9
    assert float(smoothed) == pytest.approx(float(-(soft * logp).sum(-1).mean()), abs=1e-6)
    grad = _grad(lambda x: expr_ce_loss(x, target_with_invalid, mask), logits)
    assert torch.all(grad[~mask] == 0)


def test_class_weights_from_counts() -> None:
    counts = np.array([177, 17, 11, 9, 95, 79, 32, 166]) * 1000
    y = np.repeat(np.arange(8), counts // 1000)
    inv = class_weights_from_counts(counts, "inverse")
    assert np.allclose(inv.numpy(), compute_class_weight("balanced", classes=np.arange(8), y=y), rtol=1e-5)
    for scheme in ("sqrt_inverse", "effective"):
        w = class_weights_from_counts(counts // 1000, scheme).numpy().astype(np.float64)
        assert np.dot(w, counts // 1000) == pytest.approx(
            counts.sum() // 1000, rel=1e-5
        )  # frame-weighted mean 1
        assert np.all(np.diff(w[np.argsort(counts)]) < 0)  # rarer class, larger weight
    sq = class_weights_from_counts(counts, "sqrt_inverse").numpy()
    assert sq[3] / sq[0] == pytest.approx(math.sqrt(177 / 9), rel=1e-5)
    eff = class_weights_from_counts([10, 1000], "effective", beta=0.99).numpy()
    assert eff[0] / eff[1] == pytest.approx((1 - 0.99**1000) / (1 - 0.99**10), rel=1e-5)
    assert class_weights_from_counts([5, 0, 5]).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ConfigError):
        class_weights_from_counts(counts, "bogus")


# ---------------------------------------------------------------------------------------------- AU


def test_au_bce_loss_hand_formula_pos_weight_and_masks() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 12, generator=g)
    target = (torch.rand(5, 12, generator=g) > 0.6).float()
    frame_mask = torch.tensor([True, True, False, True, False])
    pw = torch.linspace(0.5, 3.0, 12)
    loss = au_bce_loss(logits, target, frame_mask, pos_weight=pw)
    x, y = logits[frame_mask], target[frame_mask]
    s = torch.sigmoid(x)
    hand = -(pw * y * torch.log(s) + (1 - y) * torch.log(1 - s)).mean()
    assert float(loss) == pytest.approx(float(hand), abs=1e-5)
    # Per-entry mask: one unknown AU in an otherwise labelled frame.
    entry_mask = torch.ones(5, 12, dtype=torch.bool)
    entry_mask[0, 3] = False
    target_bad = target.clone()
    target_bad[0, 3] = -1
    loss_e = au_bce_loss(logits, target_bad, entry_mask, pos_weight=pw)
    s_all = torch.sigmoid(logits)
    terms = -(pw * target * torch.log(s_all) + (1 - target) * torch.log(1 - s_all))
    assert float(loss_e) == pytest.approx(float(terms[entry_mask].mean()), abs=1e-5)
    with pytest.raises(ValueError, match="0 or 1"):
        au_bce_loss(logits, target_bad, frame_mask.new_ones(5))


def test_pos_weight_from_labels() -> None:
    label = np.zeros((10, 12), dtype=np.int8)
    label[:2, 0] = 1  # 2 pos, 8 neg -> 4
    label[:5, 1] = 1  # 5 / 5 -> 1
    label[9, :] = -1  # invalid frame, excluded
    valid = (label >= 0).all(axis=1)
    w = pos_weight_from_labels(label, valid)
    assert w[0] == pytest.approx(7 / 2)  # 9 valid frames: 2 pos, 7 neg
    assert w[1] == pytest.approx(4 / 5)
    assert w[2] == 1.0  # no positive
    assert pos_weight_from_labels(label, valid, max_weight=2.0)[0] == 2.0


# ---------------------------------------------------------------------------------------------- CLIP


def _literal_eqs_1_to_3(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    """Eqs. (1)-(3) written out term by term: txt[i] is the caption of image i."""
    n = img.shape[0]
    cos = lambda a, b: float(torch.dot(a, b) / (a.norm() * b.norm()))  # noqa: E731
    l_img = 0.0
    l_text = 0.0
    for i in range(n):
        num = math.exp(scale * cos(img[i], txt[i]))
        l_img -= math.log(num / sum(math.exp(scale * cos(img[i], txt[j])) for j in range(n)))
        l_text -= math.log(num / sum(math.exp(scale * cos(txt[i], img[j])) for j in range(n)))
    return torch.tensor((l_img / n + l_text / n) / 2)


def test_clip_loss_matches_literal_equations_with_distinct_captions() -> None:
    g = torch.Generator().manual_seed(4)
    img = torch.randn(5, 16, generator=g, dtype=torch.float64)
    prompts = torch.randn(8, 16, generator=g, dtype=torch.float64)
    target = torch.tensor([3, 0, 7, 5, 1])  # five different classes: five distinct captions
    log_scale = torch.tensor(math.log(10.0))
    expected = _literal_eqs_1_to_3(img, prompts[target], 10.0)
    for side in ("multi_positive", "literal"):
        got = clip_contrastive_loss(img, prompts, target, log_scale, text_side=side)
        assert float(got) == pytest.approx(float(expected), abs=1e-5)


def test_clip_loss_duplicate_captions_hand_computed() -> None:
    # 2-D embeddings on the unit circle, scale 1 (log_scale 0), three images, classes (0, 0, 1).
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    prompts = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised to e1, e2
    target = torch.tensor([0, 0, 1])
    r = 1 / math.sqrt(2)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [r, r]])  # s[i, c] = cos(image i, prompt c)
    # multi_positive: image side over the distinct captions {0, 1}:
    l_img = -(torch.log_softmax(s, 1)[[0, 1, 2], [0, 0, 1]]).mean()
    # text side: caption of class 0 over the 3 images, positives {0, 1} averaged; class 1 positive {2}.
    lp0 = torch.log_softmax(s[:, 0], 0)
    lp1 = torch.log_softmax(s[:, 1], 0)
    term0 = -(lp0[0] + lp0[1]) / 2 - math.log(2)  # KL to the uniform target over 2 positives
    term1 = -lp1[2]
    l_text = (2 * term0 + term1) / 3  # averaged over the N = 3 captions, as eq. (2)
    expected_mp = (l_img + l_text) / 2
    got_mp = clip_contrastive_loss(img, prompts, target, 0.0, text_side="multi_positive")
    assert float(got_mp) == pytest.approx(float(expected_mp), abs=1e-6)
    # literal: the N x N matrix with caption 0 twice; a copy of one's own caption is a negative.
    expected_lit = _literal_eqs_1_to_3(img.double(), prompts[target].double(), 1.0)
    got_lit = clip_contrastive_loss(img, prompts, target, 0.0, text_side="literal")
    assert float(got_lit) == pytest.approx(float(expected_lit), abs=1e-6)
    assert abs(float(got_lit) - float(got_mp)) > 1e-3


def test_clip_loss_at_perfect_alignment_duplicates_are_not_penalised() -> None:
    # Images exactly on their prompt with a large scale: multi_positive -> ~0 loss; the literal loss cannot
    # go below the log of the duplicate count (here 2 copies of each caption), which is why it is not default.
    prompts = torch.eye(4)
    target = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    img = prompts[target]
    log_scale = math.log(100.0)
    assert float(clip_contrastive_loss(img, prompts, target, log_scale)) < 1e-3
    assert float(
        clip_contrastive_loss(img, prompts, target, log_scale, text_side="literal")
    ) == pytest.approx(math.log(2), abs=1e-3)


def test_contrastive_logits_and_logit_scale() -> None:
    img = torch.tensor([[3.0, 0.0], [0.0, -2.0]])
    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    ls = LogitScale()
    assert float(ls.log_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    assert float(ls.log_scale.detach()) == pytest.approx(CLIP_LOGIT_SCALE_INIT)
    logits = contrastive_logits(img, prompts, ls.log_scale)
    assert torch.equal(logits, contrastive_logits(img, prompts, ls))  # the module itself is accepted
    assert torch.allclose(logits, torch.tensor([[1.0, 0.0, -1.0], [0.0, -1.0, 0.0]]) / 0.07, atol=1e-4)
    # The scale is capped at 100 (CLIP's clamp), and the parameter receives gradients below the cap.
    capped = contrastive_logits(img, prompts, torch.tensor(10.0))
    assert float(capped.max()) == pytest.approx(100.0)
    loss = clip_contrastive_loss(torch.randn(6, 2), prompts, torch.tensor([0, 1, 2, 0, 1, 2]), ls.log_scale)
    loss.backward()
    assert ls.log_scale.grad is not None and float(ls.log_scale.grad) != 0.0
    assert float(ls().detach()) == pytest.approx(1 / 0.07)


def test_clip_loss_mask_selects_frames() -> None:
    g = torch.Generator().manual_seed(5)
    img = torch.randn(2, 4, 8, generator=g)
    prompts = torch.randn(8, 8, generator=g)
    target = torch.randint(0, 8, (2, 4), generator=g)
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    bad_target = torch.where(mask, target, torch.full_like(target, -1))
    got = clip_contrastive_loss(img, prompts, bad_target, 1.0, mask)
    assert float(got) == pytest.approx(float(clip_contrastive_loss(img[mask], prompts, target[mask], 1.0)))


# ---------------------------------------------------------------------------------------------- DDAMFN


def test_attention_diversity_loss_hand_formula() -> None:
    g = torch.Generator().manual_seed(6)
    heads = [torch.rand(2, 3, 4, 4, generator=g) for _ in range(3)]
    pair_mse = sum(float(((heads[i] - heads[j]) ** 2).mean()) for i, j in [(0, 1), (0, 2), (1, 2)])
    assert float(attention_diversity_loss(heads)) == pytest.approx(3 / (pair_mse + 1e-8), rel=1e-5)
    assert float(attention_diversity_loss(torch.stack(heads))) == pytest.approx(
        3 / (pair_mse + 1e-8), rel=1e-5
    )
    # Identical heads are maximally penalised; more diverse heads lower the loss.
    same = attention_diversity_loss([heads[0], heads[0].clone()], eps=1e-3)
    assert float(same) == pytest.approx(1000.0)
    assert float(attention_diversity_loss([heads[0], heads[0] + 1.0])) == pytest.approx(1.0, rel=1e-5)
    single = attention_diversity_loss([heads[0].requires_grad_(True)])
    assert float(single.detach()) == 0.0 and single.grad_fn is not None


# ------------------------------------------------------------------------------ MTL (the objective)


def test_the_mtl_objective_sums_each_task_over_its_own_labelled_frames() -> None:
    g = torch.Generator().manual_seed(7)
    b, t = 2, 5
    outputs = {
        "va": torch.randn(b, t, 2, generator=g, requires_grad=True),
        "expr": torch.randn(b, t, 8, generator=g, requires_grad=True),
        "au": torch.randn(b, t, 12, generator=g, requires_grad=True),
        "expr_embedding": torch.randn(b, t, 4, generator=g),  # extra outputs are ignored
    }
    targets = {
        "va": torch.rand(b, t, 2, generator=g) * 2 - 1,
        "expr": torch.randint(0, 8, (b, t), generator=g),
        "au": (torch.rand(b, t, 12, generator=g) > 0.5).float(),
    }
    valid = {
        "va": torch.ones(b, t, dtype=torch.bool),
        "expr": torch.zeros(b, t, dtype=torch.bool),  # no expression label in this batch
        "au": torch.tensor([[True, True, False, False, True], [False, True, True, True, True]]),
    }
    batch = Batch(torch.zeros(b, t, 3), torch.ones(b, t, dtype=torch.bool), targets, valid,
                  np.zeros((b, t), dtype=np.int64))
    pos = torch.full((12,), 2.0)
    objective = build_objective("mtl", torch.nn.Identity(), ("va", "expr", "au"),
                                LossWeights(pos_weight={"au": pos}))
    total, parts = objective(outputs, batch)
    expected = ccc_loss(outputs["va"], targets["va"]) + au_bce_loss(
        outputs["au"], targets["au"], valid["au"], pos_weight=pos
    )
    assert float(total) == pytest.approx(float(expected), abs=1e-6)
    assert parts["expr"] == 0.0 and set(parts) == {"va", "expr", "au"}
    total.backward()
    assert torch.all(outputs["expr"].grad == 0)
    assert torch.all(outputs["au"].grad[~valid["au"]] == 0) and outputs["va"].grad.abs().sum() > 0

    valid["expr"] = torch.ones(b, t, dtype=torch.bool)
    _, parts = objective(outputs, batch)
    assert parts["expr"] == pytest.approx(
        float(F.cross_entropy(outputs["expr"].reshape(-1, 8), targets["expr"].reshape(-1)))
    )
    with pytest.raises(ConfigError, match="one task at a time"):
        build_objective("bce", torch.nn.Identity(), ("va", "au"))
