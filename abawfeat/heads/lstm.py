"""The seed paper's LSTM head (section 3.1, "replace the fully connected layers with an LSTM")."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from abawfeat.heads import Head, HeadConfig, TaskOutputs, register_head
from abawfeat.heads.trunks import LSTMTrunk


@dataclasses.dataclass
class LSTMConfig(HeadConfig):
    hidden: int = 256  # LSTM state size; 256 is the size benchmarked in docs/performance.md
    layers: int = 1  # stacked LSTM layers; the paper does not say, one is the cheapest that models time
    bidirectional: bool = False  # also read each window backwards (doubles cost; uses future frames)


@register_head("lstm")
class LSTMHead(Head):
    """LSTM over the frame sequence, then one linear layer per task: the paper's DDAMFN+LSTM."""

    Config = LSTMConfig
    temporal = True

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__(config)
        self.trunk = LSTMTrunk(
            config.in_dim, config.hidden, config.layers, config.bidirectional, config.dropout
        )
        self.outputs = TaskOutputs(self.trunk.out_dim, self.tasks)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        h = self.trunk(self.prepare(features), mask)
        return self.apply_mask(self.outputs(h), mask)
