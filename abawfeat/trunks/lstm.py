"""LSTM trunk: the seed paper's LSTM head (section 3.1, "replace the fully connected layers with an LSTM")."""

from __future__ import annotations

from torch import nn

from abawfeat.trunks import TRUNKS
from abawfeat.trunks.recurrent import RecurrentTrunk


@TRUNKS.register("lstm")
class LSTMTrunk(RecurrentTrunk):
    """LSTM over the frame sequence (--hidden, --layers, --bidirectional)."""

    label = "LSTM"
    rnn_class = nn.LSTM
    bf16_needs_native = True  # oneDNN's LSTM primitive has no bf16 kernel on CPUs without AVX-512 BF16
