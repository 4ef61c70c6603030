"""Official metrics checked against hand-computed cases, an independent NumPy formula and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from abawfeat.constants import AU_NAMES, EXPR_CLASSES
from abawfeat.metrics import (
    au_metrics,
    au_metrics_tuned,
    ccc,
    expr_metrics,
    masked,
    mtl_score,
    tune_au_thresholds,
    va_metrics,
)

# ---------------------------------------------------------------------------------------------- CCC


def _ccc_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Textbook formula with np.var / np.cov (ddof=0): independent of the implementation's centred sums."""
    cov = np.cov(x, y, bias=True)[0, 1]
    return 2 * cov / (np.var(x) + np.var(y) + (np.mean(x) - np.mean(y)) ** 2)


def test_ccc_hand_computed_four_points() -> None:
    # x = 1,2,3,4 ; y = 2,2,3,5: mean x 2.5, mean y 3; var x 1.25; var y (1+1+0+4)/4 = 1.5;
    # cov = (-1.5*-1 + -0.5*-1 + 0.5*0 + 1.5*2)/4 = 5/4 = 1.25
    # CCC = 2.5 / (1.25 + 1.5 + 0.25) = 2.5 / 3 = 0.8333...
    assert ccc(np.array([1, 2, 3, 4.0]), np.array([2, 2, 3, 5.0])) == pytest.approx(5 / 6, abs=1e-12)


def test_ccc_matches_reference_formula_and_is_not_pearson() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=1000)
    y = 0.5 * x + rng.normal(scale=0.5, size=1000) + 0.3
    assert ccc(x, y) == pytest.approx(_ccc_reference(x, y), abs=1e-12)
    # Sample (ddof=1) moments or Pearson would give a different number: guard against both.
    assert abs(ccc(x, y) - np.corrcoef(x, y)[0, 1]) > 0.05
    # Bias and scale are penalised: a shifted copy is not perfect.
    assert ccc(x, x + 1.0) < 0.7
    assert ccc(x, x) == pytest.approx(1.0)
    xc = x - x.mean()
    assert ccc(xc, -xc) == pytest.approx(-1.0)  # only a zero-mean series mirrors to exactly -1


def test_ccc_edge_cases_never_nan() -> None:
    y = np.array([0.1, 0.5, -0.2, 0.3])
    assert ccc(np.zeros(4), y) == 0.0  # constant prediction
    assert ccc(np.full(3, 0.2), np.full(3, 0.2)) == 1.0  # both constant, equal: perfect agreement
    assert ccc(np.full(3, 0.2), np.full(3, 0.4)) == 0.0  # both constant, different
    # 0.1 is not representable: a naive mean leaves ~1e-17 residues whose ratio is arbitrary.
    assert ccc(np.full(7, 0.1), np.full(7, 0.1)) == 1.0
    assert ccc(np.full(7, 0.1), y[[0, 1, 2, 3, 0, 1, 2]]) == 0.0
    with pytest.raises(ValueError, match="no frames"):
        ccc(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        ccc(np.array([0.1, np.nan]), np.array([0.1, 0.2]))


def test_va_metrics_pools_frames_and_honours_valid() -> None:
    rng = np.random.default_rng(1)
    label = rng.uniform(-1, 1, size=(200, 2))
    pred = label + rng.normal(scale=0.3, size=(200, 2))
    label_with_invalid = label.copy()
    label_with_invalid[::7] = -5.0
    valid = np.ones(200, dtype=bool)
    valid[::7] = False
    m = va_metrics(pred, label_with_invalid, valid=valid)
    assert m["ccc_valence"] == pytest.approx(_ccc_reference(pred[valid, 0], label[valid, 0]))
    assert m["ccc_arousal"] == pytest.approx(_ccc_reference(pred[valid, 1], label[valid, 1]))
    assert m["ccc_va"] == pytest.approx((m["ccc_valence"] + m["ccc_arousal"]) / 2)
    assert all(type(v) is float for v in m.values())
    # Including the -5 rows would change the score: the mask is really used.
    assert va_metrics(pred, label_with_invalid)["ccc_va"] != pytest.approx(m["ccc_va"])


def test_masked_helper() -> None:
    a, b = masked(np.array([True, False, True]), np.arange(3), np.arange(3) * 10)
    assert a.tolist() == [0, 2] and b.tolist() == [0, 20]
    with pytest.raises(ValueError):
        masked(np.array([True, False]), np.arange(3))


# ---------------------------------------------------------------------------------------------- EXPR


def test_expr_macro_f1_matches_sklearn_with_absent_class() -> None:
    rng = np.random.default_rng(2)
    # Class 3 (Fear) never occurs in labels or predictions: it must count as F1 0 in the mean over 8.
    classes = np.array([0, 1, 2, 4, 5, 6, 7])
    label = rng.choice(classes, size=500)
    pred = np.where(rng.random(500) < 0.6, label, rng.choice(classes, size=500))
    m = expr_metrics(pred, label)
    ref = f1_score(label, pred, labels=range(8), average="macro", zero_division=0)
    assert m["f1_expr"] == pytest.approx(ref, abs=1e-12)
    # Not sklearn's default (which drops the absent class and divides by 7).
    assert m["f1_expr"] != pytest.approx(f1_score(label, pred, average="macro"))
    assert m["f1_expr_per_class"]["Fear"] == 0.0
    per = f1_score(label, pred, labels=range(8), average=None, zero_division=0)
    assert list(m["f1_expr_per_class"]) == list(EXPR_CLASSES)
    assert np.allclose(list(m["f1_expr_per_class"].values()), per)


def test_expr_constant_prediction_and_valid_mask() -> None:
    label = np.array([0, 0, 4, 4, 7, 7, -1, -1])
    valid = label >= 0
    pred = np.zeros(8, dtype=int)
    m = expr_metrics(pred, label, valid=valid)
    # Neutral: TP 2, FP 4, FN 0 -> F1 = 4 / 8 = 0.5; all others 0 -> macro = 0.5 / 8
    assert m["f1_expr"] == pytest.approx(0.5 / 8)
    assert m["f1_expr_per_class"]["Neutral"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outside"):
        expr_metrics(pred, label)  # -1 labels without a mask
    with pytest.raises(ValueError, match="no frames"):
        expr_metrics(np.array([], dtype=int), np.array([], dtype=int))
    with pytest.raises(ValueError, match="1-D"):
        expr_metrics(np.zeros((4, 8)), np.zeros(4, dtype=int))


# ---------------------------------------------------------------------------------------------- AU


def test_au_f1_matches_sklearn_per_au_including_degenerate_columns() -> None:
    rng = np.random.default_rng(3)
    label = (rng.random((300, 12)) < 0.3).astype(np.int8)
    pred = (rng.random((300, 12)) < 0.4).astype(np.int8)
    label[:, 0] = 0  # AU absent from labels, predicted sometimes -> F1 0
    label[:, 1] = 0
    pred[:, 1] = 0  # absent from both -> F1 0 (zero_division=0)
    pred[:, 2] = 1  # constant positive prediction
    m = au_metrics(pred, label)
    per = [f1_score(label[:, j], pred[:, j], zero_division=0) for j in range(12)]
    assert np.allclose([m["f1_au_per_au"][a] for a in AU_NAMES], per)
    assert m["f1_au"] == pytest.approx(np.mean(per))
    assert m["f1_au_per_au"]["AU2"] == 0.0
    # Constant positive: precision = prevalence, recall 1.
    prev = label[:, 2].mean()
    assert m["f1_au_per_au"]["AU4"] == pytest.approx(2 * prev / (prev + 1))


def test_au_metrics_valid_mask_and_errors() -> None:
    label = np.array([[1] * 12, [-1] + [0] * 11, [0] * 12])
    pred = np.array([[1] * 12, [1] * 12, [0] * 12])
    m = au_metrics(pred, label, valid=(label >= 0).all(axis=1))
    assert m["f1_au"] == 1.0
    with pytest.raises(ValueError, match="0 or 1"):
        au_metrics(pred, label)
    with pytest.raises(ValueError, match="no frames"):
        au_metrics(np.zeros((0, 12)), np.zeros((0, 12)))


def _f1_at(prob: np.ndarray, y: np.ndarray, t: float) -> float:
    """F1 of one AU at threshold t by direct counting (checked once against sklearn below)."""
    p = prob >= t
    tp = np.sum(p & (y == 1))
    fp = np.sum(p & (y == 0))
    fn = np.sum(~p & (y == 1))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def test_direct_count_f1_agrees_with_sklearn() -> None:
    rng = np.random.default_rng(7)
    prob, y = rng.random(200), (rng.random(200) < 0.3).astype(int)
    for t in (0.0, 0.3, 0.5, 0.99, 1.5):
        assert _f1_at(prob, y, t) == pytest.approx(f1_score(y, (prob >= t).astype(int), zero_division=0))


def test_tuned_thresholds_beat_every_grid_threshold_and_equal_exact_best() -> None:
    rng = np.random.default_rng(4)
    n = 400
    label = (rng.random((n, 12)) < rng.uniform(0.05, 0.5, size=12)).astype(np.int8)
    # Informative but miscalibrated scores, rounded so that ties occur.
    prob = np.clip(0.25 * label + rng.normal(0.3, 0.15, size=(n, 12)), 0, 1).round(2)
    th = tune_au_thresholds(prob, label)
    grid = np.linspace(0, 1, 101)
    for j in range(12):
        tuned = _f1_at(prob[:, j], label[:, j], th[j])
        # Brute force over every distinct score (the exact optimum) and a fine grid.
        exact_best = max(_f1_at(prob[:, j], label[:, j], t) for t in np.unique(prob[:, j]))
        assert tuned == pytest.approx(exact_best, abs=1e-12)
        assert all(tuned >= _f1_at(prob[:, j], label[:, j], t) - 1e-12 for t in grid)
    res = au_metrics_tuned(prob, label, th)
    assert res["f1_au_opt"] >= au_metrics((prob >= 0.5).astype(int), label)["f1_au"]
    assert res["au_thresholds"]["AU1"] == th[0]
    assert res["f1_au_opt"] == pytest.approx(
        np.mean([_f1_at(prob[:, j], label[:, j], th[j]) for j in range(12)])
    )


def test_threshold_tie_breaking_is_closest_to_half() -> None:
    label = np.zeros((4, 12), dtype=np.int8)
    label[:2, :] = 1
    prob = np.tile(np.array([[0.9], [0.8], [0.2], [0.1]]), (1, 12))
    th = tune_au_thresholds(prob, label)
    # Any threshold in (0.2, 0.8] separates perfectly; 0.5 is inside, so 0.5 is kept.
    assert np.all(th == 0.5)
    # Perfect separation only in (0.7, 0.8]: 0.5 is outside, the midpoint 0.75 is chosen.
    prob2 = np.tile(np.array([[0.9], [0.8], [0.7], [0.6]]), (1, 12))
    assert np.allclose(tune_au_thresholds(prob2, label), 0.75)
    # An AU with no positive anywhere: every threshold scores 0, keep 0.5.
    assert np.all(tune_au_thresholds(prob, np.zeros_like(label)) == 0.5)


def test_threshold_grid_search_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    label = (rng.random((300, 12)) < 0.3).astype(np.int8)
    prob = np.clip(0.3 * label + rng.random((300, 12)) * 0.7, 0, 1)
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    th = tune_au_thresholds(prob, label, grid=grid)
    for j in range(12):
        scores = np.array([_f1_at(prob[:, j], label[:, j], t) for t in grid])
        best = grid[scores == scores.max()]
        assert th[j] == best[np.argmin(np.abs(best - 0.5))]


def test_threshold_tuning_at_scale_beats_fixed_thresholds() -> None:
    # Speed is a benchmark matter; here: on many frames the tuned thresholds are never worse than 0.5
    # or any grid threshold, checked with scikit-learn's F1.
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(6)
    prob = rng.random((40_000, 12)).astype(np.float32)
    label = (rng.random((40_000, 12)) < prob * 0.6).astype(np.int8)
    th = tune_au_thresholds(prob, label)
    for j in range(12):
        tuned = f1_score(label[:, j], prob[:, j] >= th[j], zero_division=0)
        for t in (0.3, 0.5, 0.7):
            assert tuned >= f1_score(label[:, j], prob[:, j] >= t, zero_division=0) - 1e-12


# ---------------------------------------------------------------------------------------------- MTL


def test_mtl_score_sums_the_three_task_metrics() -> None:
    assert mtl_score({"ccc_va": 0.4}, {"f1_expr": 0.3}, {"f1_au": 0.5, "f1_au_opt": 0.6}) == pytest.approx(
        1.2
    )
    assert mtl_score(0.4, 0.3, 0.6) == pytest.approx(1.3)
    with pytest.raises(KeyError):
        mtl_score({"ccc_valence": 0.4}, 0.3, 0.5)
