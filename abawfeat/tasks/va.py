"""Valence-arousal estimation: two continuous values in [-1, 1] per frame, scored by CCC."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from abawfeat import metrics
from abawfeat.constants import VA_NAMES
from abawfeat.errors import DataError
from abawfeat.tasks import TASKS, Task, Thresholds


class VATask(Task):
    name = "va"
    title = "VA"
    columns = VA_NAMES
    folders = ("VA_Estimation_Challenge",)
    header = VA_NAMES
    value_names = VA_NAMES
    invalid = -5.0
    valid_rule = "[-1, 1]"
    label_shape = (len(VA_NAMES),)
    label_dtype = np.float32
    test_list_file = "Valence_Arousal_Estimation_Challenge_test_set_release.txt"
    test_list_keyword = "valence_arousal"
    sample_tag = "VA"
    default_objective = "ccc"
    select_metric = "ccc_va"
    metric_keys = ("ccc_valence", "ccc_arousal", "ccc_va")
    table_columns = {"CCC_VA": "ccc_va"}
    outputs_key = "va_pred"
    no_crop_score = 0.0
    plots = ("va_hist2d.png", "timeline_va.png")
    submission_values = len(VA_NAMES)

    def labels_and_validity(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ok = (values >= -1.0) & (values <= 1.0)
        valid = ok.all(axis=1)
        out_of_range = ~(ok | (values == self.invalid)).all(axis=1)
        labels = np.where(valid[:, None], values, self.invalid).astype(self.label_dtype)
        return labels, valid, out_of_range

    def activation(self, y: Any) -> Any:
        import torch

        # tanh keeps VA in the labels' range without clipping, so the CCC loss still has gradients there.
        return torch.tanh(y)

    def to_scores(self, output: Any) -> Any:
        return output.clamp(-1.0, 1.0)

    def decide(self, scores: np.ndarray, thresholds: Thresholds = None) -> np.ndarray:
        return np.clip(scores, -1.0, 1.0)

    def decision_metrics(self, decisions: np.ndarray, labels: np.ndarray,
                         valid: np.ndarray | None = None) -> dict[str, Any]:
        return metrics.va_metrics(decisions, labels, valid)

    def smoothing_objective(self, scores: np.ndarray, labels: np.ndarray, columns: list[int]) -> float:
        (j,) = columns
        return metrics.ccc(np.clip(scores[:, 0], -1.0, 1.0), labels[:, j])

    def format_rows(self, decisions: np.ndarray) -> list[str]:
        return [f"{v:.6f},{a:.6f}" for v, a in decisions.tolist()]

    def check_decisions(self, video: str, decisions: np.ndarray) -> np.ndarray:
        a = np.asarray(decisions, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"write_submission: VA predictions of video {video!r} contain NaN or infinity")
        return np.clip(a, -1.0, 1.0)

    def parse_values(self, path: Path, fields: list[str], lineno: int) -> Any:
        try:
            vals = [float(f) for f in fields]
        except ValueError:
            raise DataError(path, f"VA values {fields} are not numbers", lineno) from None
        if not all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in vals):
            raise DataError(path, f"VA values {fields} outside [-1, 1]", lineno)
        return vals

    def stack_rows(self, rows: list[Any]) -> np.ndarray:
        return np.asarray(rows, dtype=np.float64).reshape(-1, self.width)


VA = TASKS.add("va", VATask())
