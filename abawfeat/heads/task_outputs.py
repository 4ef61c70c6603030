"""The ``tasks`` head: one linear output per task on the trunk (the paper's Fc and LSTM heads; with all three
tasks, seed 003's multi-task head, whose tasks share the trunk)."""

from __future__ import annotations

from torch import Tensor, nn

from abawfeat.heads import HEADS, Head, HeadConfig
from abawfeat.tasks import single


class TaskOutputs(nn.Module):
    """One linear layer per task on top of a shared representation, then the task's activation."""

    def __init__(self, in_features: int, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.specs = {t: single(t) for t in tasks}
        self.layers = nn.ModuleDict({t: nn.Linear(in_features, spec.width) for t, spec in self.specs.items()})

    def forward(self, h: Tensor) -> dict[str, Tensor]:
        return {t: self.specs[t].activation(layer(h)) for t, layer in self.layers.items()}


@HEADS.register("tasks")
class TaskHead(Head):
    """Trunk, then one linear output per task (one task, or the three of multi-task learning)."""

    Config = HeadConfig

    def __init__(self, config: HeadConfig) -> None:
        super().__init__(config)
        self.outputs = TaskOutputs(self.trunk.out_dim, self.tasks)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        return self.apply_mask(self.outputs(self.represent(features, mask)), mask)
