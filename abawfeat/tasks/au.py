"""Action-unit detection: twelve binary AUs per frame, scored by mean F1 (at 0.5 and at tuned thresholds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from abawfeat import metrics
from abawfeat.constants import AU_NAMES
from abawfeat.errors import DataError
from abawfeat.tasks import TASKS, Task, Thresholds, check_integer_decisions, parse_integers


class AUTask(Task):
    name = "au"
    title = "AU"
    columns = AU_NAMES
    folders = ("AU_Detection_Challenge",)
    header = AU_NAMES
    value_names = AU_NAMES
    invalid = -1
    valid_rule = "{0, 1}"
    label_shape = (len(AU_NAMES),)
    label_dtype = np.int8
    test_list_file = "Action_Unit_Detection_Challenge_test_set_release.txt"
    test_list_keyword = "action_unit"
    sample_tag = "AU"
    default_objective = "bce"
    # The tuned-threshold F1 is what a run submits (predict uses the tuned thresholds).
    select_metric = "f1_au_opt"
    metric_keys = ("f1_au", "f1_au_opt")
    per_item_keys = {"F1 @0.5": "f1_au_per_au", "F1 tuned": "f1_au_opt_per_au", "threshold": "au_thresholds"}
    item_name = "AU"
    table_columns = {"F1_AU": "f1_au", "F1_AUopt": "f1_au_opt"}
    outputs_key = "au_prob"
    no_crop_score = 0.0  # no AU active
    tunes_thresholds = True
    plots = ("au_f1.png", "timeline_au.png")
    submission_values = len(AU_NAMES)

    def labels_and_validity(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ok = (values == 0) | (values == 1)
        valid = ok.all(axis=1)
        out_of_range = ~(ok | (values == self.invalid)).all(axis=1)
        labels = np.where(valid[:, None], values, self.invalid).astype(self.label_dtype)
        return labels, valid, out_of_range

    def to_scores(self, output: Any) -> Any:
        import torch

        return torch.sigmoid(output)

    def decide(self, scores: np.ndarray, thresholds: Thresholds = None) -> np.ndarray:
        t = np.full(len(AU_NAMES), 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        return (scores >= t[None, :]).astype(np.int8)

    def decision_metrics(self, decisions: np.ndarray, labels: np.ndarray,
                         valid: np.ndarray | None = None) -> dict[str, Any]:
        return metrics.au_metrics(decisions, labels, valid)

    def score(self, scores: np.ndarray, labels: np.ndarray, valid: np.ndarray,
              thresholds: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray | None]:
        """F1 at 0.5 (``f1_au``) and at one threshold per AU (``f1_au_opt``): the given thresholds, or
        thresholds tuned here on these frames (returned)."""
        result = self.decision_metrics(self.decide(scores), labels, valid)
        if thresholds is None:
            thresholds = metrics.tune_au_thresholds(scores, labels, valid=valid)
        result.update(metrics.au_metrics_tuned(scores, labels, thresholds, valid=valid))
        return result, thresholds

    def smoothing_objective(self, scores: np.ndarray, labels: np.ndarray, columns: list[int]) -> float:
        # The AU's F1 at its best threshold, as f1_au_opt scores it (on a fine grid: fast enough to try
        # every filter; the final thresholds are tuned exactly on the chosen smoothing).
        (j,) = columns
        return metrics.best_binary_f1(scores[:, 0], labels[:, j])

    def format_rows(self, decisions: np.ndarray) -> list[str]:
        return [",".join(map(str, r)) for r in decisions.tolist()]

    def check_decisions(self, video: str, decisions: np.ndarray) -> np.ndarray:
        return check_integer_decisions(video, self.name, decisions, 1)

    def parse_values(self, path: Path, fields: list[str], lineno: int) -> Any:
        values = parse_integers(path, self.title, fields, lineno)
        if any(v not in (0, 1) for v in values):
            raise DataError(path, f"AU values {fields} are not all 0 or 1", lineno)
        return values

    def stack_rows(self, rows: list[Any]) -> np.ndarray:
        return np.asarray(rows, dtype=np.int8).reshape(-1, self.width)


AU = TASKS.add("au", AUTask())
