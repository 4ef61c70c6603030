"""The two building blocks the heads share: a frame-wise FC trunk and a masked LSTM trunk."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from abawfeat.errors import ConfigError


class FCTrunk(nn.Module):
    """Frame-wise: ``hidden == 0`` is the identity (a linear classifier follows), otherwise one hidden
    layer ``Linear -> ReLU``. Frames never see each other, so masking needs nothing here."""

    def __init__(self, in_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        if hidden < 0:
            raise ConfigError(f"FC hidden size must be >= 0 (0 = no hidden layer), got {hidden}")
        self.drop = nn.Dropout(dropout)
        self.hidden = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU()) if hidden else None
        self.out_dim = hidden if hidden else in_dim

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.drop(x)
        if self.hidden is not None:
            x = self.drop(self.hidden(x))
        return x


class LSTMTrunk(nn.Module):
    """A (stacked, optionally bidirectional) LSTM over ``[B, T, D]``.

    Padded positions (``mask`` False, trailing) are packed away, so a bidirectional LSTM's backward pass
    starts at each sequence's last real frame rather than at the padding. Full batches (the usual case in
    training: every window is complete) skip packing, which costs a sort and two copies.
    """

    def __init__(self, in_dim: int, hidden: int, layers: int, bidirectional: bool, dropout: float) -> None:
        super().__init__()
        if hidden < 1 or layers < 1:
            raise ConfigError(f"LSTM needs hidden >= 1 and layers >= 1, got hidden={hidden}, layers={layers}")
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            in_dim, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional,
            # PyTorch only applies this between stacked layers (and warns when there is one layer).
            dropout=dropout if layers > 1 else 0.0,
        )
        self.out_dim = hidden * (2 if bidirectional else 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.drop(x)
        if mask is None or bool(mask.all()):
            y, _ = self.lstm(x)
            return self.drop(y)
        lengths = mask.sum(dim=1)
        # The contract: padding only at the end. A mask with holes would silently mix frames, so refuse it.
        expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
        if not bool((expected == mask.bool()).all()):
            raise ValueError("LSTM mask must be a prefix mask (padding only at the end of each sequence)")
        # pack_padded_sequence refuses empty sequences; a fully padded row is computed on one frame and
        # zeroed by the head's mask afterwards.
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        y, _ = self.lstm(packed)
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        return self.drop(y)
