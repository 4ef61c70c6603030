"""Transformer trunk: a pre-norm encoder with positions over each window, causal or bidirectional.

The temporal model of the strongest recent ABAW valence-arousal systems (a Transformer over cached frame
embeddings). Each block is LayerNorm -> multi-head self-attention -> residual, LayerNorm -> feed-forward
(GELU) -> residual; a final LayerNorm closes the stack. Positions are sinusoidal and absolute within the
window, so a frame's output depends on where it sits in its window, exactly like the recurrent trunks' does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from abawfeat.errors import ConfigError
from abawfeat.trunks import TRUNKS, Context, Trunk, TrunkConfig, prefix_mask


@dataclass
class TransformerConfig(TrunkConfig):
    hidden: int = 256  # model width d: the input is projected to it
    layers: int = 2  # encoder blocks
    heads: int = 4  # attention heads (hidden must divide by it)
    ffn_mult: int = 2  # feed-forward width = ffn_mult x hidden (2 keeps an epoch within budget on a CPU)
    bidirectional: bool = False  # attend to later frames of the window too (not causal)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))
        self.drop = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x: Tensor, attn_mask: Tensor | None, causal: bool) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        dropout = self.p if self.training else 0.0
        if q.is_cuda:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               is_causal=causal and attn_mask is None, dropout_p=dropout)
        else:
            a = _attention(q, k, v, attn_mask, causal, dropout)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


def _attention(q: Tensor, k: Tensor, v: Tensor, keys: Tensor | None, causal: bool, dropout: float) -> Tensor:
    """Attention written out (softmax in float32). On CPU, for windows of tens of frames, this is several
    times faster to train than PyTorch's fused CPU kernel, whose backward pass dominated an epoch
    (docs/performance.md); on CUDA the fused kernel is used."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        t = q.shape[-2]
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), -math.inf)
    if keys is not None:
        scores = scores.masked_fill(~keys, -math.inf)
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    if dropout:
        weights = F.dropout(weights, dropout)
    return weights @ v


@TRUNKS.register("transformer")
class TransformerTrunk(Trunk):
    """Pre-norm Transformer encoder with sinusoidal positions (--hidden, --layers, --trunk-opt heads=N)."""

    label = "Transformer"
    Config = TransformerConfig

    def __init__(self, in_dim: int, config: TransformerConfig) -> None:
        super().__init__(in_dim, config)
        if config.hidden < 1 or config.layers < 1 or config.heads < 1 or config.ffn_mult < 1:
            raise ConfigError("transformer needs hidden, layers, heads and ffn_mult >= 1")
        if config.hidden % config.heads:
            raise ConfigError(f"transformer: hidden {config.hidden} is not divisible by heads {config.heads}")
        self.drop = nn.Dropout(config.dropout)
        self.input = nn.Linear(in_dim, config.hidden)
        self.blocks = nn.ModuleList(
            _Block(config.hidden, config.heads, config.ffn_mult * config.hidden, config.dropout)
            for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.hidden)
        self.out_dim = config.hidden

    def context(self) -> Context:
        return Context("bidirectional" if self.config.bidirectional else "causal")

    def positions(self, length: int, device: torch.device) -> Tensor:
        """Sinusoidal encodings [length, hidden] (the original Transformer's)."""
        d = self.config.hidden
        pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
        enc = torch.zeros(length, d, device=device)
        enc[:, 0::2] = torch.sin(pos * freq)
        enc[:, 1::2] = torch.cos(pos * freq[: d // 2])
        return enc

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        causal = not self.config.bidirectional
        attn_mask = None
        if mask is not None and not bool(mask.all()) and not causal:
            # Padding is only at the end: a causal window never looks at it, a bidirectional one must not.
            lengths = prefix_mask(mask)
            keys = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.clamp(min=1)[:, None]
            attn_mask = keys[:, None, None, :]
        h = self.input(self.drop(x))
        h = h + self.positions(x.shape[1], x.device).to(h.dtype)
        for block in self.blocks:
            h = block(h, attn_mask, causal)
        return self.drop(self.norm(h))
