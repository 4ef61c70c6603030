"""Seed 003's multi-task head: one shared trunk, three task outputs (VA, EXPR, AU)."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from abawfeat.constants import TASKS
from abawfeat.errors import ConfigError
from abawfeat.heads import Head, HeadConfig, TaskOutputs, register_head
from abawfeat.heads.trunks import FCTrunk, LSTMTrunk


@dataclasses.dataclass
class MultiTaskConfig(HeadConfig):
    tasks: tuple[str, ...] = TASKS  # all three outputs; the masked loss skips whatever a frame lacks
    trunk: str = "fc"  # "fc" (frame-wise hidden layer, seed 003's shared representation) or "lstm"
    hidden: int = 256  # width of the shared representation every task reads
    layers: int = 1  # LSTM trunk only: stacked layers
    bidirectional: bool = False  # LSTM trunk only: also read windows backwards


@register_head("mtl")
class MultiTaskHead(Head):
    """Shared trunk (FC hidden layer or LSTM) with three task-specific linear outputs (seed 003)."""

    Config = MultiTaskConfig

    def __init__(self, config: MultiTaskConfig) -> None:
        super().__init__(config)
        if config.trunk == "fc":
            # A shared layer is the point of multi-task learning here, so the FC trunk always has one.
            self.trunk = FCTrunk(config.in_dim, max(config.hidden, 1), config.dropout)
        elif config.trunk == "lstm":
            self.trunk = LSTMTrunk(
                config.in_dim, config.hidden, config.layers, config.bidirectional, config.dropout
            )
        else:
            raise ConfigError(f"multi-task trunk must be 'fc' or 'lstm', got {config.trunk!r}")
        self.outputs = TaskOutputs(self.trunk.out_dim, self.tasks)

    def is_temporal(self) -> bool:
        return self.config.trunk == "lstm"

    def forward(self, features: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        h = self.trunk(self.prepare(features), mask)
        return self.apply_mask(self.outputs(h), mask)
