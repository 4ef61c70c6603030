"""The ``moe`` head: the trunk, then a mixture of experts for every task output (``--moe-experts K``).

Per task, K small experts (Linear -> GELU -> Linear to the task's width) and a gate (a linear layer and a
softmax over the experts) read the trunk's representation of the frame; the output is the gate-weighted sum
of the experts' outputs, then the task's activation. A gate left to itself tends to send every frame to one
expert, which wastes the others; the head therefore returns a load-balance term (Switch Transformer's:
K x sum_k f_k P_k over the batch's real frames, f_k the share of frames whose largest gate weight is expert k
and P_k the mean gate weight of k; 1 when the load is even, K when one expert takes everything) under the
auxiliary key ``moe_balance``, which the objective adds to the loss at ``balance_weight``
(abawfeat.train.objectives.build_objective) and the training loop records per epoch in history.csv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from abawfeat.errors import ConfigError
from abawfeat.heads import HEADS, Head, HeadConfig
from abawfeat.tasks import single

BALANCE_KEY = "moe_balance"


@dataclass
class MoEConfig(HeadConfig):
    experts: int = 4  # K experts per task output (Sun & Gao's expression head mixes a handful)
    expert_hidden: int = 64  # each expert's hidden width: small, since K of them run on every frame
    balance_weight: float = 0.01  # weight of the load-balance term in the loss (Switch's 0.01)


class MixtureOfExperts(nn.Module):
    """K experts Linear(d, h) -> GELU -> Linear(h, width) and a softmax gate over them, per frame."""

    def __init__(self, in_features: int, width: int, experts: int, hidden: int) -> None:
        super().__init__()
        self.experts, self.hidden, self.width = experts, hidden, width
        self.gate = nn.Linear(in_features, experts)
        self.up = nn.Linear(in_features, experts * hidden)  # all experts' first layers in one product
        bound = 1.0 / math.sqrt(hidden)
        self.down = nn.Parameter(torch.empty(experts, hidden, width).uniform_(-bound, bound))
        self.down_bias = nn.Parameter(torch.zeros(experts, width))

    def forward(self, h: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(output [..., width], load-balance term over the real frames)."""
        gates = torch.softmax(self.gate(h).float(), dim=-1)  # [..., K]
        hidden = F.gelu(self.up(h)).unflatten(-1, (self.experts, self.hidden))  # [..., K, h]
        each = torch.einsum("...kh,khw->...kw", hidden.float(), self.down.float()) + self.down_bias.float()
        out = (gates[..., None] * each).sum(dim=-2)
        real = gates.reshape(-1, self.experts) if mask is None else gates[mask.bool()]
        if real.shape[0] == 0:
            return out, gates.sum() * 0.0
        share = F.one_hot(real.argmax(dim=-1), self.experts).float().mean(dim=0)  # f_k (no gradient)
        balance = self.experts * (share * real.mean(dim=0)).sum()
        return out, balance


@HEADS.register("moe")
class MoEHead(Head):
    """Trunk, then a mixture of experts per task output (a learned gate over K experts, load-balanced)."""

    Config = MoEConfig

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        if config.experts < 2:
            raise ConfigError(f"a mixture of experts needs >= 2 experts, got {config.experts}")
        if config.expert_hidden < 1:
            raise ConfigError(f"moe: expert_hidden must be >= 1, got {config.expert_hidden}")
        if config.balance_weight < 0:
            raise ConfigError(f"moe: balance_weight must be >= 0, got {config.balance_weight}")
        self.specs = {t: single(t) for t in self.tasks}
        self.mixtures = nn.ModuleDict({
            t: MixtureOfExperts(self.trunk.out_dim, spec.width, config.experts, config.expert_hidden)
            for t, spec in self.specs.items()})
        # Read by build_objective: auxiliary output key -> its weight in the loss.
        self.aux_weights = {BALANCE_KEY: float(config.balance_weight)}

    def forward(self, features: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        h = self.represent(features, mask)
        out, balance = {}, []
        for t, mixture in self.mixtures.items():
            y, b = mixture(h, mask)
            out[t] = self.specs[t].activation(y)
            balance.append(b)
        out = self.apply_mask(out, mask)
        out[BALANCE_KEY] = torch.stack(balance).mean()  # a scalar: averaged over the tasks' mixtures
        return out
