"""Official ABAW metrics (API stub; implementation in progress)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def masked(valid: np.ndarray | None, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Keep only the rows where ``valid`` is true (``None`` keeps all)."""
    raise NotImplementedError


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    raise NotImplementedError


def va_metrics(pred: np.ndarray, label: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
    raise NotImplementedError


def expr_metrics(pred_class: np.ndarray, label: np.ndarray, valid: np.ndarray | None = None) -> dict:
    raise NotImplementedError


def au_metrics(pred_bin: np.ndarray, label: np.ndarray, valid: np.ndarray | None = None) -> dict:
    raise NotImplementedError


def tune_au_thresholds(
    prob: np.ndarray, label: np.ndarray, grid: Sequence[float] | None = None, valid: np.ndarray | None = None
) -> np.ndarray:
    raise NotImplementedError


def au_metrics_tuned(
    prob: np.ndarray, label: np.ndarray, thresholds: np.ndarray | Sequence[float], valid: np.ndarray | None = None
) -> dict:
    raise NotImplementedError


def mtl_score(va: dict | float, expr: dict | float, au: dict | float) -> float:
    raise NotImplementedError
