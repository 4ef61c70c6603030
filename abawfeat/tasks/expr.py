"""Expression recognition: one of eight classes per frame (Aff-Wild2 order), scored by macro F1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from abawfeat import metrics
from abawfeat.constants import EXPR_CLASSES
from abawfeat.errors import DataError
from abawfeat.tasks import TASKS, Task, Thresholds, check_integer_decisions, parse_integers


class ExprTask(Task):
    name = "expr"
    title = "EXPR"
    columns = EXPR_CLASSES
    folders = ("EXPR_Recognition_Challenge", "EXPR_Classification_Challenge")
    header = EXPR_CLASSES
    # The header names all eight classes, but each row holds ONE class index.
    value_names = ("class index",)
    invalid = -1
    valid_rule = f"0..{len(EXPR_CLASSES) - 1}"
    label_shape = ()
    label_dtype = np.int64
    test_list_file = "Expression_Recognition_Challenge_test_set_release.txt"
    test_list_keyword = "expression"
    sample_tag = "Expr"
    default_objective = "ce"
    select_metric = "f1_expr"
    metric_keys = ("f1_expr",)
    per_item_keys = {"F1": "f1_expr_per_class"}
    item_name = "class"
    table_columns = {"F1_Expr": "f1_expr"}
    outputs_key = "expr_prob"
    no_crop_score = 1.0 / len(EXPR_CLASSES)  # uniform probabilities
    smooth_per_column = False  # one filter for all class probabilities: they must stay comparable
    plots = ("expr_confusion.png", "timeline_expr.png")
    submission_values = 1  # despite the eight-name header, ONE class index per row

    def labels_and_validity(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        v = values[:, 0]
        with np.errstate(invalid="ignore"):  # NaN / inf compare False, which is what we want
            valid = (v == np.floor(v)) & (v >= 0) & (v <= len(EXPR_CLASSES) - 1)
        out_of_range = ~valid & (v != self.invalid)
        labels = np.where(valid, v, self.invalid).astype(self.label_dtype)
        return labels, valid, out_of_range

    def to_scores(self, output: Any) -> Any:
        import torch

        return torch.softmax(output, dim=-1)

    def decide(self, scores: np.ndarray, thresholds: Thresholds = None) -> np.ndarray:
        return np.argmax(scores, axis=1).astype(np.int64)

    def decision_metrics(self, decisions: np.ndarray, labels: np.ndarray,
                         valid: np.ndarray | None = None) -> dict[str, Any]:
        return metrics.expr_metrics(decisions, np.asarray(labels).reshape(-1), valid)

    def smoothing_objective(self, scores: np.ndarray, labels: np.ndarray, columns: list[int]) -> float:
        decisions = self.decide(scores)
        return float(metrics.expr_metrics(decisions, np.asarray(labels).reshape(-1))["f1_expr"])

    def format_rows(self, decisions: np.ndarray) -> list[str]:
        return [str(c) for c in decisions.tolist()]

    def check_decisions(self, video: str, decisions: np.ndarray) -> np.ndarray:
        return check_integer_decisions(video, self.name, decisions, len(EXPR_CLASSES) - 1)

    def parse_values(self, path: Path, fields: list[str], lineno: int) -> Any:
        (value,) = parse_integers(path, self.title, fields, lineno)
        if not 0 <= value < len(EXPR_CLASSES):
            raise DataError(path, f"expression class {value} outside 0..{len(EXPR_CLASSES) - 1}", lineno)
        return value

    def stack_rows(self, rows: list[Any]) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64).reshape(-1)


EXPR = TASKS.add("expr", ExprTask())
