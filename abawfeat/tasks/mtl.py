"""The multi-task combination (seed 003, 7th ABAW): VA, EXPR and AU from one head, scored together."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abawfeat import metrics
from abawfeat.tasks import TASKS, TaskSet


class MultiTask(TaskSet):
    name = "mtl"
    title = "MTL"
    default_objective = "mtl"
    select_metric = "score"
    member_names = ("va", "expr", "au")

    def combine(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """``score`` = P_VA + F1_EXPR + F1_AU, the AU term at the tuned thresholds: the AU decisions the run
        submits (each member's headline metric)."""
        return {"score": metrics.mtl_score(result["ccc_va"], result["f1_expr"], result["f1_au_opt"])}


MTL = TASKS.add("mtl", MultiTask())
