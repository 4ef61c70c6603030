"""The seed paper's task-specific fully-connected classifier (section 3.1), optionally with a hidden layer."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from abawfeat.heads import Head, HeadConfig, TaskOutputs, register_head
from abawfeat.heads.trunks import FCTrunk


@dataclasses.dataclass
class FCConfig(HeadConfig):
    hidden: int = 0  # 0: one linear layer on the features, as in the paper; >0: one ReLU hidden layer first


@register_head("fc")
class FCHead(Head):
    """Frame-wise fully-connected head (linear, or one hidden layer): the paper's DDAMFN+Fc."""

    Config = FCConfig
    temporal = False

    def __init__(self, config: FCConfig) -> None:
        super().__init__(config)
        self.trunk = FCTrunk(config.in_dim, config.hidden, config.dropout)
        self.outputs = TaskOutputs(self.trunk.out_dim, self.tasks)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        h = self.trunk(self.prepare(features), mask)
        return self.apply_mask(self.outputs(h), mask)
