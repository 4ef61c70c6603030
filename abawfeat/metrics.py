"""Official ABAW metrics: CCC for valence/arousal, macro F1 for expressions, mean per-AU F1 for action units.

Every function takes NumPy arrays of the frames to score and returns plain Python floats (JSON-ready).
Frames without a valid label are dropped either by the caller or through the optional ``valid`` mask that
every metric accepts; scores are computed over all frames of the split concatenated, never averaged per
video, as the organisers do (docs: /work/shared/abaw-data.md, "Metrics").

Edge cases, decided once here so that every caller agrees:

- ``ccc``: population (biased) moments, accumulated in float64. The denominator
  ``var x + var y + (mean x - mean y)^2`` is zero only when both series are constant and equal; that is
  perfect agreement, so the CCC is 1.0. A constant prediction against a varying label has zero covariance,
  so its CCC is 0.0 (not NaN). Non-finite inputs raise ``ValueError`` instead of silently yielding NaN.
- ``expr_metrics``: macro F1 over all 8 classes of ``EXPR_CLASSES``, dividing by 8 as the organisers'
  formula ``P = sum(F1_c) / 8`` does. A class with no true and no predicted frame has F1 0 (sklearn's
  ``f1_score(..., labels=range(8), average="macro", zero_division=0)``). Many teams call ``f1_score`` without
  ``labels``, which silently drops such a class and averages over fewer than 8; on the full validation or
  test set every class occurs so the two agree, but on small subsets ours is the conservative (lower) one.
- ``au_metrics``: per-AU binary F1 = 2TP / (2TP + FP + FN), 0 when an AU has neither true nor predicted
  positives (zero_division=0), averaged over all 12 AUs.
- Empty inputs (no valid frame) raise ``ValueError``: a score of "nothing" is a bug upstream, not a zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from abawfeat.constants import AU_NAMES, EXPR_CLASSES, VA_NAMES

N_EXPR = len(EXPR_CLASSES)
N_AU = len(AU_NAMES)


# --------------------------------------------------------------------------------------------------------
# helpers


def masked(valid: np.ndarray | None, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Return ``arrays`` restricted to the rows where ``valid`` is true (``None`` keeps every row).

    ``valid`` is a boolean (or 0/1) vector with one entry per row; all arrays must have that many rows.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0]) if arrays else 0
    for a in arrays:
        if len(a) != n:
            raise ValueError(f"arrays have different numbers of rows: {[len(x) for x in arrays]}")
    if valid is None:
        return arrays
    valid = np.asarray(valid)
    if valid.ndim != 1 or len(valid) != n:
        raise ValueError(f"valid mask has shape {valid.shape}, expected ({n},)")
    keep = valid.astype(bool)
    return tuple(a[keep] for a in arrays)


def _require_rows(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"{what}: no frames to score (empty input or no valid label)")


def _binary_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN), elementwise, 0 where the denominator is 0 (zero_division=0)."""
    tp = np.asarray(tp, dtype=np.float64)
    denom = 2 * tp + np.asarray(fp, dtype=np.float64) + np.asarray(fn, dtype=np.float64)
    out = np.zeros_like(denom)
    np.divide(2 * tp, denom, out=out, where=denom > 0)
    return out


# --------------------------------------------------------------------------------------------------------
# valence / arousal


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Concordance correlation coefficient of two 1-D series (population moments, float64).

    Symmetric in ``x`` and ``y``. 1.0 when both are constant and equal, 0.0 when exactly one is constant.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"ccc: prediction has {x.size} values, label has {y.size}")
    _require_rows(x.size, "ccc")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("ccc: input contains NaN or infinity")
    # A constant series gets its value as mean and exact zero deviations: the float mean of n copies of
    # 0.1 is not 0.1, and the ~1e-17 residues would otherwise make 0/0 cases return arbitrary numbers.
    mx = x[0] if x.min() == x.max() else x.mean()
    my = y[0] if y.min() == y.max() else y.mean()
    dx, dy = x - mx, y - my
    # Centred sums rather than E[x^2]-E[x]^2: the latter loses digits over ~10^6 frames.
    cov = float(np.dot(dx, dy) / x.size)
    vx = float(np.dot(dx, dx) / x.size)
    vy = float(np.dot(dy, dy) / y.size)
    denom = vx + vy + float(mx - my) ** 2
    if denom == 0.0:
        return 1.0  # both constant and equal: perfect agreement
    return 2.0 * cov / denom


def va_metrics(pred: np.ndarray, label: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
    """``{"ccc_valence", "ccc_arousal", "ccc_va"}`` for predictions and labels of shape [N, 2].

    ``ccc_va`` is P_VA = (CCC_V + CCC_A) / 2. Pass ``valid`` to drop unannotated frames (label -5).
    """
    pred, label = masked(valid, pred, label)
    if pred.ndim != 2 or pred.shape[1] != 2 or pred.shape != label.shape:
        raise ValueError(
            f"va_metrics: expected pred and label of shape [N, 2], got {pred.shape}, {label.shape}"
        )
    _require_rows(len(pred), "va_metrics")
    cv = ccc(pred[:, 0], label[:, 0])
    ca = ccc(pred[:, 1], label[:, 1])
    return {f"ccc_{VA_NAMES[0]}": cv, f"ccc_{VA_NAMES[1]}": ca, "ccc_va": (cv + ca) / 2.0}


# --------------------------------------------------------------------------------------------------------
# expressions


def _as_int_vector(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D vector of class indices, got shape {a.shape}")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{what}: class indices must be integers")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"{what}: class indices must be integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def expr_metrics(
    pred_class: np.ndarray, label: np.ndarray, valid: np.ndarray | None = None
) -> dict[str, Any]:
    """Macro F1 over the 8 expression classes: ``{"f1_expr": float, "f1_expr_per_class": {name: f1}}``.

    ``pred_class`` and ``label`` are class indices [N] in ``EXPR_CLASSES`` order (take the argmax of
    probabilities first). Pass ``valid`` to drop unannotated frames (label -1).
    """
    pred_class, label = masked(valid, pred_class, label)
    pred_class = _as_int_vector(pred_class, "expr_metrics prediction")
    label = _as_int_vector(label, "expr_metrics label")
    if pred_class.shape != label.shape:
        raise ValueError(f"expr_metrics: {pred_class.size} predictions for {label.size} labels")
    _require_rows(label.size, "expr_metrics")
    for arr, what in ((pred_class, "prediction"), (label, "label")):
        if arr.min() < 0 or arr.max() >= N_EXPR:
            raise ValueError(f"expr_metrics: {what} outside 0..{N_EXPR - 1} (pass valid= to drop -1 labels)")
    # Confusion counts via one bincount: index = label * 8 + prediction.
    conf = np.bincount(label * N_EXPR + pred_class, minlength=N_EXPR * N_EXPR).reshape(N_EXPR, N_EXPR)
    tp = np.diag(conf)
    fp = conf.sum(axis=0) - tp
    fn = conf.sum(axis=1) - tp
    f1 = _binary_f1(tp, fp, fn)
    return {
        "f1_expr": float(f1.mean()),
        "f1_expr_per_class": {name: float(v) for name, v in zip(EXPR_CLASSES, f1, strict=True)},
    }


# --------------------------------------------------------------------------------------------------------
# action units


def _as_binary_matrix(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != N_AU:
        raise ValueError(f"{what}: expected shape [N, {N_AU}], got {a.shape}")
    if a.size and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{what}: values must be 0 or 1 (pass valid= to drop frames labelled -1)")
    return a.astype(bool)


def au_metrics(pred_bin: np.ndarray, label: np.ndarray, valid: np.ndarray | None = None) -> dict[str, Any]:
    """Mean over the 12 AUs of binary F1: ``{"f1_au": float, "f1_au_per_au": {AU: f1}}``.

    ``pred_bin`` and ``label`` are 0/1 arrays [N, 12] in ``AU_NAMES`` order. Pass ``valid`` to drop frames
    whose label has a -1.
    """
    pred_bin, label = masked(valid, pred_bin, label)
    p = _as_binary_matrix(pred_bin, "au_metrics prediction")
    y = _as_binary_matrix(label, "au_metrics label")
    if p.shape != y.shape:
        raise ValueError(f"au_metrics: prediction shape {p.shape} != label shape {y.shape}")
    _require_rows(len(y), "au_metrics")
    tp = (p & y).sum(axis=0)
    fp = (p & ~y).sum(axis=0)
    fn = (~p & y).sum(axis=0)
    f1 = _binary_f1(tp, fp, fn)
    return {
        "f1_au": float(f1.mean()),
        "f1_au_per_au": {n: float(v) for n, v in zip(AU_NAMES, f1, strict=True)},
    }


def _check_prob(prob: np.ndarray) -> np.ndarray:
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim != 2 or prob.shape[1] != N_AU:
        raise ValueError(f"AU scores: expected shape [N, {N_AU}], got {prob.shape}")
    if not np.isfinite(prob).all():
        raise ValueError("AU scores contain NaN or infinity")
    return prob


def _closest_to_half(candidates: np.ndarray, f1: np.ndarray) -> float:
    """The candidate with the highest F1; among exact ties, the one closest to 0.5 (then the lower)."""
    best = f1.max()
    tied = candidates[f1 == best]
    dist = np.abs(tied - 0.5)
    return float(tied[dist == dist.min()].min())


def _best_threshold_exact(score: np.ndarray, y: np.ndarray) -> float:
    """Exact F1-maximising threshold for one AU (rule: positive iff score >= threshold), O(N log N).

    Sorting scores in descending order, thresholding just below the k-th distinct score marks the top-k
    frames positive; then TP is a cumulative sum and F1 = 2TP / (k + P). Each distinct outcome corresponds
    to an interval of thresholds; we represent it by 0.5 when 0.5 lies inside it (no reason to move away
    from the default), otherwise by the interval's midpoint (a threshold sitting exactly on a validation
    score generalises worse than one halfway between two scores).
    """
    order = np.argsort(-score, kind="stable")
    s = score[order]
    ys = y[order]
    n = s.size
    n_pos = int(ys.sum())
    # Last index of each run of equal scores: marking positives "up to here" is one achievable outcome.
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    k = ends + 1  # number of positives predicted
    tp = np.cumsum(ys, dtype=np.int64)[ends]
    f1 = np.zeros(k.size, dtype=np.float64)
    denom = k + n_pos
    np.divide(2.0 * tp, denom, out=f1, where=denom > 0)
    # Interval of thresholds producing outcome j: (next lower distinct score, score of run j].
    upper = s[ends]
    lower = np.r_[s[ends[1:]], -np.inf]
    # Outcome "nothing positive": thresholds above the top score; F1 is 0 there (or 0/0 -> 0).
    upper = np.r_[np.inf, upper]
    lower = np.r_[s[0] if n else 0.5, lower]
    f1 = np.r_[0.0, f1]
    inside = (lower < 0.5) & (upper >= 0.5)
    # Open ends: close them at 0 and 1 (the probability range) when that keeps the interval non-empty.
    finite_lo = np.where(np.isfinite(lower), lower, np.where(upper > 0.0, 0.0, upper - 1.0))
    finite_hi = np.where(np.isfinite(upper), upper, np.where(lower < 1.0, 1.0, lower + 1.0))
    mid = (finite_lo + finite_hi) / 2.0
    # Adjacent floats can round the midpoint onto the open end, which would change the outcome.
    mid = np.where(mid > finite_lo, mid, finite_hi)
    rep = np.where(inside, 0.5, mid)
    return _closest_to_half(rep, f1)


def _best_threshold_grid(score: np.ndarray, y: np.ndarray, grid: np.ndarray) -> float:
    """Best of a fixed grid of thresholds for one AU, via one sort and a binary search per grid point."""
    s = np.sort(score)
    ys = y[np.argsort(score, kind="stable")]
    n_pos = int(ys.sum())
    # Frames at or above t are the suffix starting at searchsorted(s, t, "left").
    start = np.searchsorted(s, grid, side="left")
    suffix_pos = np.r_[np.cumsum(ys[::-1], dtype=np.int64)[::-1], 0]
    tp = suffix_pos[start]
    k = s.size - start
    f1 = np.zeros(grid.size, dtype=np.float64)
    denom = k + n_pos
    np.divide(2.0 * tp, denom, out=f1, where=denom > 0)
    return _closest_to_half(grid, f1)


def best_binary_f1(score: np.ndarray, label: np.ndarray, bins: int = 512) -> float:
    """The highest F1 of ``score >= t`` against 0/1 ``label`` over thresholds on a grid of ``bins`` steps
    in [0, 1] (scores are probabilities), in O(N): a histogram of the positives' and the negatives' scores,
    accumulated from the top. Within 1/bins of the exact search of ``tune_au_thresholds``."""
    s = np.clip(np.asarray(score, dtype=np.float64).reshape(-1), 0.0, 1.0)
    y = np.asarray(label).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"best_binary_f1: {s.size} scores for {y.size} labels")
    _require_rows(s.size, "best_binary_f1")
    k = np.minimum((s * bins).astype(np.int64), bins - 1)  # bin k holds [k/bins, (k+1)/bins)
    pos = np.bincount(k[y], minlength=bins)[::-1].cumsum()[::-1]  # positives with score >= k/bins
    neg = np.bincount(k[~y], minlength=bins)[::-1].cumsum()[::-1]
    n_pos = int(y.sum())
    return float(_binary_f1(pos, neg, n_pos - pos).max(initial=0.0))


def tune_au_thresholds(
    prob: np.ndarray,
    label: np.ndarray,
    grid: Sequence[float] | np.ndarray | None = None,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Per-AU thresholds (float64 [12]) maximising each AU's F1 on the given (validation) frames.

    A frame is predicted positive when ``prob >= threshold``. With ``grid=None`` the search is exact over
    every distinct score (see ``_best_threshold_exact``); with a grid, only the grid's values are tried.
    Ties in F1 go to the threshold closest to 0.5, so an AU that never occurs keeps 0.5. ``prob`` may be
    probabilities or logits (the rule is only ``>=``), but the 0.5 tie-break assumes probabilities.
    """
    prob, label = masked(valid, prob, label)
    prob = _check_prob(prob)
    y = _as_binary_matrix(label, "tune_au_thresholds label")
    if y.shape != prob.shape:
        raise ValueError(f"tune_au_thresholds: scores {prob.shape} vs labels {y.shape}")
    _require_rows(len(y), "tune_au_thresholds")
    grid_arr = None
    if grid is not None:
        grid_arr = np.unique(np.asarray(grid, dtype=np.float64).reshape(-1))
        if grid_arr.size == 0 or not np.isfinite(grid_arr).all():
            raise ValueError("tune_au_thresholds: grid must be a non-empty list of finite numbers")
    out = np.empty(N_AU, dtype=np.float64)
    for j in range(N_AU):
        yj = y[:, j].astype(np.int64)
        if grid_arr is None:
            out[j] = _best_threshold_exact(prob[:, j], yj)
        else:
            out[j] = _best_threshold_grid(prob[:, j], yj, grid_arr)
    return out


def au_metrics_tuned(
    prob: np.ndarray,
    label: np.ndarray,
    thresholds: np.ndarray | Sequence[float],
    valid: np.ndarray | None = None,
) -> dict[str, Any]:
    """AU F1 with per-AU thresholds (predicted positive iff ``prob >= t``).

    Returns ``{"f1_au_opt", "f1_au_opt_per_au": {AU: f1}, "au_thresholds": {AU: t}}``.
    """
    prob, label = masked(valid, prob, label)
    prob = _check_prob(prob)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.size != N_AU:
        raise ValueError(f"au_metrics_tuned: expected {N_AU} thresholds, got {t.size}")
    res = au_metrics((prob >= t[None, :]).astype(np.int8), label)
    return {
        "f1_au_opt": res["f1_au"],
        "f1_au_opt_per_au": res["f1_au_per_au"],
        "au_thresholds": {n: float(v) for n, v in zip(AU_NAMES, t, strict=True)},
    }


# --------------------------------------------------------------------------------------------------------
# multi-task


def _pick(value: Mapping[str, Any] | float, key: str) -> float:
    if isinstance(value, Mapping):
        if key not in value:
            raise KeyError(f"mtl_score: metrics dict has no {key!r}")
        return float(value[key])
    return float(value)


def mtl_score(
    va: Mapping[str, Any] | float, expr: Mapping[str, Any] | float, au: Mapping[str, Any] | float
) -> float:
    """P_VA + F1_EXPR + F1_AU (the multi-task score, in [-1, 3]).

    Each argument is either the metric's float or the dict returned by ``va_metrics`` / ``expr_metrics`` /
    ``au_metrics`` (keys ``ccc_va``, ``f1_expr``, ``f1_au``). To score with tuned AU thresholds, pass
    ``result["f1_au_opt"]`` as a float.
    """
    return _pick(va, "ccc_va") + _pick(expr, "f1_expr") + _pick(au, "f1_au")
