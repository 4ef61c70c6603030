"""What the recurrent trunks share: a masked, optionally stacked and bidirectional ``torch.nn`` RNN."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from abawfeat.errors import ConfigError
from abawfeat.trunks import Context, Trunk, TrunkConfig, prefix_mask


@dataclass
class RecurrentConfig(TrunkConfig):
    hidden: int = 256  # state size; 256 is the size benchmarked in docs/performance.md
    layers: int = 1  # stacked layers; the paper does not say, one is the cheapest that models time
    bidirectional: bool = False  # also read each window backwards (doubles cost; uses future frames)


class RecurrentTrunk(Trunk):
    """A (stacked, optionally bidirectional) RNN over ``[B, T, D]``; subclasses name the ``torch.nn`` class.

    Padded positions (``mask`` False, trailing) are packed away, so a bidirectional RNN's backward pass
    starts at each sequence's last real frame rather than at the padding. Full batches (the usual case in
    training: every window is complete) skip packing, which costs a sort and two copies.
    """

    Config = RecurrentConfig
    rnn_class: ClassVar[type[nn.RNNBase]] = nn.LSTM

    def __init__(self, in_dim: int, config: RecurrentConfig) -> None:
        super().__init__(in_dim, config)
        if config.hidden < 1 or config.layers < 1:
            raise ConfigError(f"{self.label} needs hidden >= 1 and layers >= 1, got hidden={config.hidden}, "
                              f"layers={config.layers}")
        self.drop = nn.Dropout(config.dropout)
        self.rnn = self.rnn_class(
            in_dim, config.hidden, num_layers=config.layers, batch_first=True,
            bidirectional=config.bidirectional,
            # PyTorch only applies this between stacked layers (and warns when there is one layer).
            dropout=config.dropout if config.layers > 1 else 0.0,
        )
        self.out_dim = config.hidden * (2 if config.bidirectional else 1)

    def context(self) -> Context:
        return Context("bidirectional" if self.config.bidirectional else "causal")

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.drop(x)
        if mask is None or bool(mask.all()):
            y, _ = self.rnn(x)
            return self.drop(y)
        lengths = prefix_mask(mask)
        # pack_padded_sequence refuses empty sequences; a fully padded row is computed on one frame and
        # zeroed by the head's mask afterwards.
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        y, _ = self.rnn(packed)
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        return self.drop(y)
