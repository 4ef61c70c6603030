"""GRU trunk: a recurrent trunk with three gates instead of the LSTM's four (about 3/4 of its cost)."""

from __future__ import annotations

from torch import nn

from abawfeat.trunks import TRUNKS
from abawfeat.trunks.recurrent import RecurrentTrunk


@TRUNKS.register("gru")
class GRUTrunk(RecurrentTrunk):
    """GRU over the frame sequence (--hidden, --layers, --bidirectional)."""

    label = "GRU"
    rnn_class = nn.GRU
