"""The class-imbalance losses (focal, logit-adjusted) against hand formulas and the plain losses they
generalise, their objectives' weights and priors; and a world with a rare expression class, where they must
beat plain cross-entropy on the rare class."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from worlds import World, build_world, config

from abawfeat.errors import ConfigError
from abawfeat.losses import (
    au_bce_loss,
    au_focal_loss,
    expr_ce_loss,
    expr_focal_loss,
    log_priors_from_counts,
    logit_adjusted_ce_loss,
)
from abawfeat.train import fit
from abawfeat.train.config import validate_config

pytestmark = [pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad"),
              pytest.mark.usefixtures("one_torch_thread")]


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 8, generator=g) * 2
    target = torch.randint(0, 8, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    target = torch.where(mask, target, torch.full_like(target, -1))  # unlabelled frames hold -1
    return logits, target, mask


def test_focal_with_gamma_zero_is_cross_entropy_exactly() -> None:
    logits, target, mask = _case()
    w = torch.rand(8) + 0.2
    for weight in (None, w):
        torch.testing.assert_close(expr_focal_loss(logits, target, mask, weight, gamma=0.0),
                                   expr_ce_loss(logits, target, mask, weight), rtol=0, atol=0)
        # The focal path itself (gamma > 0, vanishing) tends to cross-entropy, weights and masks alike.
        torch.testing.assert_close(expr_focal_loss(logits, target, mask, weight, gamma=1e-7),
                                   expr_ce_loss(logits, target, mask, weight), rtol=1e-5, atol=1e-6)
    x = torch.randn(4, 6, 12)
    y = (torch.rand(4, 6, 12) > 0.7).float()
    entry_mask = torch.rand(4, 6, 12) > 0.2
    pw = torch.rand(12) * 3 + 0.5
    for m in (None, entry_mask, entry_mask[..., 0]):
        for p in (None, pw):
            torch.testing.assert_close(au_focal_loss(x, y, m, p, gamma=0.0), au_bce_loss(x, y, m, p),
                                       rtol=0, atol=0)
            torch.testing.assert_close(au_focal_loss(x, y, m, p, gamma=1e-7), au_bce_loss(x, y, m, p),
                                       rtol=1e-5, atol=1e-6)


def test_focal_losses_equal_the_hand_formula() -> None:
    logits, target, mask = _case(1)
    gamma = 2.5
    w = np.linspace(0.5, 2.0, 8)
    z = logits.double().numpy()[mask.numpy()]
    y = target.numpy()[mask.numpy()]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p = p / p.sum(axis=1, keepdims=True)
    py = p[np.arange(len(y)), y]
    per = -((1 - py) ** gamma) * np.log(py)
    expected = (w[y] * per).sum() / w[y].sum()
    got = expr_focal_loss(logits, target, mask, torch.tensor(w, dtype=torch.float32), gamma=gamma)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # Binary: one entry by hand. logit 0.4, label 1, pos_weight 3; logit -1.2, label 0.
    x = torch.tensor([[0.4, -1.2]])
    t = torch.tensor([[1.0, 0.0]])
    s1, s2 = 1 / (1 + math.exp(-0.4)), 1 / (1 + math.exp(1.2))
    hand = (-3.0 * (1 - s1) ** 2 * math.log(s1) - s2**2 * math.log(1 - s2)) / 2
    got = au_focal_loss(x, t, None, torch.tensor([3.0, 1.0]), gamma=2.0)
    assert float(got) == pytest.approx(hand, rel=1e-6)
    # Focusing lowers the loss of confident, right frames most: gamma > 0 is below CE everywhere.
    assert float(expr_focal_loss(logits, target, mask, gamma=2.0)) < float(expr_ce_loss(logits, target, mask))


def test_logit_adjusted_loss_is_cross_entropy_of_shifted_logits() -> None:
    counts = np.array([50, 5, 0, 20, 100, 3, 7, 15])
    log_prior = log_priors_from_counts(counts)
    n = np.maximum(counts, 1)
    np.testing.assert_allclose(log_prior.numpy(), np.log(n / n.sum()), rtol=1e-6)  # an unseen class: 1 frame
    logits, target, mask = _case(2)
    tau = 1.5
    expected = F.cross_entropy(logits[mask] + tau * log_prior, target[mask])
    torch.testing.assert_close(logit_adjusted_ce_loss(logits, target, log_prior, mask, tau=tau), expected)
    torch.testing.assert_close(logit_adjusted_ce_loss(logits, target, log_prior, mask, tau=0.0),
                               expr_ce_loss(logits, target, mask))
    w = torch.rand(8) + 0.1
    torch.testing.assert_close(logit_adjusted_ce_loss(logits, target, log_prior, mask, tau, w),
                               F.cross_entropy(logits[mask] + tau * log_prior, target[mask], weight=w))
    with pytest.raises(ConfigError, match="tau"):
        logit_adjusted_ce_loss(logits, target, log_prior, mask, tau=-1.0)
    with pytest.raises(ConfigError, match="gamma"):
        expr_focal_loss(logits, target, mask, gamma=-0.5)


# -------------------------------------------------------------------------------- a rare class world


RARE = 3  # the class that is rare in the rare-class world (Aff-Wild2's Fear is as rare)


@pytest.fixture(scope="module")
def rare_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    # Features wider than the signal (22 columns), noisy enough that classes overlap: a head trained by plain
    # cross-entropy then rarely predicts the rare class, since the prior argues against it.
    return build_world(tmp_path_factory.mktemp("rare"), n_train=12, n_val=6, n_test=1, n_frames=200,
                       noise=1.25, dim=32, rare_class=RARE)


def _rare_f1(run: Path) -> tuple[float, float]:
    out = np.load(run / "val_outputs.npz")
    ok = out["expr_valid"]
    pred = out["expr_prob"][ok].argmax(axis=1)
    label = out["expr_label"][ok]
    return (float(f1_score(label, pred, labels=[RARE], average="macro", zero_division=0)),
            float(f1_score(label, pred, labels=list(range(8)), average="macro", zero_division=0)))


@pytest.fixture(scope="module")
def plain_ce(rare_world: World, tmp_path_factory: pytest.TempPathFactory) -> tuple[float, float, dict]:
    run = tmp_path_factory.mktemp("ce") / "run"
    metrics = fit(config(rare_world, run, task="expr", epochs=6)).metrics
    return (*_rare_f1(run), metrics)


def test_the_rare_class_is_rare_and_plain_ce_misses_it(rare_world: World, plain_ce: tuple) -> None:
    from abawfeat.data import AffWild2

    data = AffWild2(rare_world.root)
    anns = [data.annotation("expr", "train", v) for v in data.videos("expr", "train")]
    labels = np.concatenate([a.labels[a.valid] for a in anns])
    share = float(np.mean(labels == RARE))
    assert 0.01 < share < 0.06, share
    assert plain_ce[0] < 0.35, plain_ce  # what makes the world a test of the imbalance losses


@pytest.mark.parametrize("objective, options", [("focal", {"focal_gamma": 2.0}),
                                                ("logit-adjusted", {"logit_tau": 1.0})])
def test_imbalance_losses_find_the_rare_class_that_cross_entropy_misses(
    rare_world: World, plain_ce: tuple, tmp_path: Path, objective: str, options: dict
) -> None:
    run = tmp_path / objective
    metrics = fit(config(rare_world, run, task="expr", epochs=6, objective=objective, **options)).metrics
    rare, macro = _rare_f1(run)
    assert rare > plain_ce[0] + 0.1, (objective, rare, plain_ce)
    assert metrics["f1_expr"] >= plain_ce[2]["f1_expr"] - 0.01  # and the macro F1 does not pay for it
    record = (run / "config.json").read_text()
    assert f'"{next(iter(options))}": {float(next(iter(options.values())))}' in record


@pytest.mark.parametrize("bad, message", [
    ({"objective": "focal", "task": "va"}, "trains task"),
    ({"objective": "logit-adjusted", "task": "au"}, "trains task"),
    ({"objective": "focal", "task": "au", "class_weights": "inverse"}, "single-label task"),
    ({"objective": "logit-adjusted", "task": "expr", "pos_weight": True}, "--pos-weight applies"),
    ({"objective": "ce", "task": "expr", "focal_gamma": 1.0}, "--focal-gamma applies to --objective focal"),
    ({"objective": "focal", "task": "expr", "logit_tau": 0.5}, "--logit-tau applies"),
    ({"objective": "focal", "task": "expr", "focal_gamma": -1.0}, "must be >= 0"),
    ({"objective": "focal", "task": "va", "class_weights": "inverse"}, "trains task"),
])
def test_imbalance_settings_are_refused_where_they_do_not_apply(bad: dict, message: str,
                                                               tmp_path: Path) -> None:
    from abawfeat.train import TrainConfig

    with pytest.raises(ConfigError, match=message):
        validate_config(TrainConfig(data="d", out=str(tmp_path / "r"), **bad))


def test_multitask_imbalance_runs_weight_each_task_with_its_own_objective(tmp_path: Path) -> None:
    from abawfeat.train import TrainConfig
    from abawfeat.train.objectives import OBJECTIVES

    # logit-adjusted on mtl: EXPR adjusted, AU plain BCE, so --pos-weight applies (to AU) and is accepted.
    validate_config(TrainConfig(data="d", out=str(tmp_path / "r"), task="mtl", objective="logit-adjusted",
                                pos_weight=True, class_weights="sqrt_inverse"))
    assert OBJECTIVES.get("logit-adjusted").per_task(("va", "expr", "au")) == {
        "va": "ccc", "expr": "logit-adjusted", "au": "bce"}
    assert OBJECTIVES.get("focal").per_task(("va", "expr", "au")) == {"va": "ccc", "expr": "focal",
                                                                      "au": "focal"}
