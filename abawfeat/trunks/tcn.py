"""Temporal convolutional network: dilated residual convolutions, causal or centred.

A frame-wise projection to the channel width, then levels of residual blocks, each two dilated 1-D
convolutions (ReLU, dropout) plus the block's input, the dilation doubling per level, so the receptive
field grows exponentially with depth while the cost grows linearly. The receptive field is finite and
declared (``Context``), which is what windowed inference uses: once a window is longer than it, every frame
past the first field gets its full context.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn import functional as F

from abawfeat.errors import ConfigError
from abawfeat.trunks import TRUNKS, Context, Trunk, TrunkConfig


@dataclass
class TCNConfig(TrunkConfig):
    hidden: int = 128  # channels of every level
    layers: int = 5  # levels; level i dilates by 2**i (5 levels of kernel 3: a field of 125 frames)
    kernel: int = 3  # kernel size of every convolution (odd)
    bidirectional: bool = False  # centre the kernels on the frame (uses later frames) instead of causal


class _Level(nn.Module):
    def __init__(self, width: int, kernel: int, dilation: int, causal: bool, dropout: float) -> None:
        super().__init__()
        span = (kernel - 1) * dilation
        self.pad = (span, 0) if causal else (span // 2, span - span // 2)
        self.conv1 = nn.Conv1d(width, width, kernel, dilation=dilation)
        self.conv2 = nn.Conv1d(width, width, kernel, dilation=dilation)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        # ``keep`` [B, 1, T] zeroes padded frames before every convolution, so that they act as the zero
        # padding beyond a sequence's end and never leak into real frames (nor their garbage outputs).
        h = x if keep is None else x * keep
        h = self.drop(F.relu(self.conv1(F.pad(h, self.pad))))
        h = h if keep is None else h * keep
        h = self.drop(F.relu(self.conv2(F.pad(h, self.pad))))
        return F.relu(h + x)


@TRUNKS.register("tcn")
class TCNTrunk(Trunk):
    """Dilated residual convolutions (--hidden, --layers levels, --trunk-opt kernel=K, --bidirectional)."""

    label = "TCN"
    Config = TCNConfig

    def __init__(self, in_dim: int, config: TCNConfig) -> None:
        super().__init__(in_dim, config)
        if config.hidden < 1 or config.layers < 1:
            raise ConfigError("tcn needs hidden >= 1 and layers >= 1")
        if config.kernel < 2 or config.kernel % 2 == 0:
            raise ConfigError(f"tcn: kernel must be an odd number >= 3, got {config.kernel}")
        self.drop = nn.Dropout(config.dropout)
        # A frame-wise projection to the channel width first: the levels then all work at that width, and
        # the first level's convolutions cost what the others' do instead of scaling with the input size.
        self.input = nn.Linear(in_dim, config.hidden)
        self.levels = nn.ModuleList(
            _Level(config.hidden, config.kernel, 2**i, not config.bidirectional, config.dropout)
            for i in range(config.layers)
        )
        self.out_dim = config.hidden

    def receptive_field(self) -> int:
        """Frames one output sees: 1 + two convolutions per level of span (kernel - 1) x dilation."""
        return 1 + 2 * (self.config.kernel - 1) * (2**self.config.layers - 1)

    def context(self) -> Context:
        kind = "bidirectional" if self.config.bidirectional else "causal"
        return Context(kind, receptive_field=self.receptive_field())

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        keep = None if mask is None or bool(mask.all()) else mask[:, None, :].to(x.dtype)
        h = self.input(self.drop(x)).transpose(1, 2)  # [B, hidden, T]
        for level in self.levels:
            h = level(h, keep if keep is None else keep.to(h.dtype))
        return self.drop(h.transpose(1, 2))
