"""Frame-wise fully-connected trunk: the seed paper's task-specific FC classifier (section 3.1)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from abawfeat.errors import ConfigError
from abawfeat.trunks import TRUNKS, Context, Trunk, TrunkConfig


@dataclass
class FCConfig(TrunkConfig):
    hidden: int = 0  # 0: the identity, so a linear layer per task reads the features (the paper's Fc)


@TRUNKS.register("fc")
class FCTrunk(Trunk):
    """Frame-wise: the identity, or one hidden layer Linear -> ReLU (--hidden N)."""

    label = "Fc"
    Config = FCConfig

    def __init__(self, in_dim: int, config: FCConfig) -> None:
        super().__init__(in_dim, config)
        if config.hidden < 0:
            raise ConfigError(f"FC hidden size must be >= 0 (0 = no hidden layer), got {config.hidden}")
        self.drop = nn.Dropout(config.dropout)
        self.hidden = nn.Sequential(nn.Linear(in_dim, config.hidden), nn.ReLU()) if config.hidden else None
        self.out_dim = config.hidden or in_dim

    def context(self) -> Context:
        return Context("frame")

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        # Frames never see each other, so the mask needs nothing here (the head zeroes padded outputs).
        x = self.drop(x)
        if self.hidden is not None:
            x = self.drop(self.hidden(x))
        return x
