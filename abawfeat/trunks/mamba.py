"""Mamba trunk: residual blocks of a selective state-space model, causal or bidirectional, in plain PyTorch.

Each block (pre-norm, residual) projects the frame to two branches of width E = expand x hidden: one goes
through a short causal depthwise convolution, SiLU and the selective scan, the other gates the scan's output
(SiLU), and a linear layer projects back. The scan is a linear recurrence whose parameters depend on the
input (what makes it *selective*): per frame a step size delta (softplus), an input matrix B and an output
matrix C, with a diagonal, negative A:

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t,        y_t = C_t h_t + D x_t.

As in Mamba-2, the channels come in ``heads`` groups that share one decay rate and step size, and B, C
are shared by all heads; A stays diagonal (one rate per head, times the identity on the state). That makes
the scan a sum of matrix products over chunks (``selective_scan``): inside a chunk of ``chunk`` frames the
decays exp(sum of delta A) form a lower-triangular matrix, between chunks a short recurrence carries the
state, so no step of the window is computed one frame after another and the same code runs on CPU and GPU.
The bidirectional variant adds a second scan (its own convolution and selective parameters) over the
reversed window, as the bidirectional Mamba models of vision and speech do. Padded frames (the mask) take no
step (delta = 0) and feed nothing to the convolution, so outputs never depend on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from abawfeat.errors import ConfigError
from abawfeat.trunks import TRUNKS, Context, Trunk, TrunkConfig


@dataclass
class MambaConfig(TrunkConfig):
    hidden: int = 128  # model width d: the input is projected to it
    layers: int = 2  # residual Mamba blocks
    expand: int = 2  # inner width E = expand x hidden (Mamba's 2)
    state: int = 16  # N, the state size of each channel (Mamba's 16)
    heads: int = 4  # channel groups sharing a decay rate and step (E / heads each: Mamba-2's 64 by default)
    conv: int = 4  # kernel of the causal depthwise convolution before the scan (Mamba's 4); 0 = none
    chunk: int = 16  # scan chunk: work quadratic in it inside a chunk, a recurrence over chunks
    bidirectional: bool = False  # a second scan over the reversed window (uses later frames; not causal)


def selective_scan(u: Tensor, delta: Tensor, a: Tensor, b: Tensor, c: Tensor, chunk: int = 16) -> Tensor:
    """The selective scan, chunked and in parallel: ``y [B, T, H, P]`` for

        h_t = exp(delta_t a) h_{t-1} + delta_t b_t u_t^T  (h: [H, N, P], h_0 = 0),   y_t = c_t . h_t

    ``u`` [B, T, H, P] inputs, ``delta`` [B, T, H] step sizes (>= 0), ``a`` [H] decay rates (< 0), ``b``,
    ``c`` [B, T, N]. Computed in the inputs' dtype, from cumulative sums of the log decays (delta a <= 0, so
    every exponent is <= 0: nothing overflows however long the window).
    """
    bsz, t, heads, p = u.shape
    n = b.shape[-1]
    q = max(1, min(int(chunk), t))
    pad = (-t) % q
    if pad:  # trailing frames that take no step and add nothing: earlier outputs are unchanged
        u, delta = F.pad(u, (0, 0, 0, 0, 0, pad)), F.pad(delta, (0, 0, 0, pad))
        b, c = F.pad(b, (0, 0, 0, pad)), F.pad(c, (0, 0, 0, pad))
    k = (t + pad) // q
    x = (u * delta[..., None]).view(bsz, k, q, heads, p).permute(0, 3, 1, 2, 4)  # [B, H, K, Q, P]
    log_decay = (delta * a).view(bsz, k, q, heads).permute(0, 3, 1, 2)  # [B, H, K, Q], <= 0
    cum = log_decay.cumsum(dim=-1)  # within each chunk
    bq = b.view(bsz, 1, k, q, n)
    cq = c.view(bsz, 1, k, q, n)
    lower = torch.ones(q, q, dtype=torch.bool, device=u.device).tril()
    # Inside a chunk: y_t = sum_{s <= t} (c_t . b_s) exp(cum_t - cum_s) x_s.
    seg = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, -math.inf)
    y = ((cq @ bq.transpose(-1, -2)) * seg.exp()) @ x  # [B, H, K, Q, P]
    if k > 1:
        # Each chunk's own contribution to the state at its end, then the state entering each chunk: the
        # sum over earlier chunks j of exp(decay from the end of j to the start of i) x their contribution.
        to_end = (cum[..., -1:] - cum).exp()[..., None]  # [B, H, K, Q, 1]
        states = (bq * to_end).transpose(-1, -2) @ x  # [B, H, K, N, P]
        total = cum[..., -1]  # [B, H, K]: a chunk's whole log decay
        before = F.pad(total.cumsum(dim=-1), (1, 0))  # [B, H, K + 1]: log decay before chunk i
        earlier = torch.ones(k, k, dtype=torch.bool, device=u.device).tril(-1)
        between = (before[..., :-1, None] - before[..., None, 1:]).masked_fill(~earlier, -math.inf)
        entering = (between.exp() @ states.flatten(-2)).view(bsz, heads, k, n, p)
        y = y + (cq * cum.exp()[..., None]) @ entering
    return y.permute(0, 2, 3, 1, 4).reshape(bsz, k * q, heads, p)[:, :t]


def scan_reference(u: Tensor, delta: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """The same recurrence one frame after another (what ``selective_scan`` must equal; for tests)."""
    bsz, t, heads, p = u.shape
    h = u.new_zeros(bsz, heads, b.shape[-1], p)
    out = []
    for i in range(t):
        decay = torch.exp(delta[:, i] * a)[:, :, None, None]  # [B, H, 1, 1]
        h = decay * h + (delta[:, i, :, None, None] * b[:, i, None, :, None] * u[:, i, :, None, :])
        out.append(torch.einsum("bn,bhnp->bhp", c[:, i], h))
    return torch.stack(out, dim=1)


class _Scan(nn.Module):
    """One direction: causal depthwise convolution, SiLU, selective parameters, the scan, the skip D."""

    def __init__(self, width: int, cfg: MambaConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.state = cfg.state
        self.chunk = cfg.chunk
        self.kernel = cfg.conv
        # Depthwise causal convolution as K shifted products: PyTorch's CPU kernel for grouped convolutions
        # loops over the channels, many times slower here than this.
        taps = max(cfg.conv, 1)
        self.conv_weight = nn.Parameter(torch.randn(taps, width) / math.sqrt(taps)) if cfg.conv else None
        self.conv_bias = nn.Parameter(torch.zeros(width)) if cfg.conv else None
        self.select = nn.Linear(width, self.heads + 2 * cfg.state)  # delta (per head), B, C from the frame
        # Mamba's initialisation: steps log-uniform in [1e-3, 1e-1] (the bias is softplus' inverse of them),
        # decay rates 1..16 spread over the heads, D = 1.
        steps = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), self.heads))
        self.delta_bias = nn.Parameter(steps + torch.log(-torch.expm1(-steps)))
        self.a_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, self.heads)))
        self.skip = nn.Parameter(torch.ones(self.heads))

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        if keep is not None:
            x = x * keep
        if self.conv_weight is not None:
            t = x.shape[1]
            padded = F.pad(x, (0, 0, self.kernel - 1, 0))  # zeros before the first frame
            w = self.conv_weight.to(x.dtype)
            out = self.conv_bias.to(x.dtype) + padded[:, self.kernel - 1 :] * w[-1]
            for j in range(self.kernel - 1):  # tap j reads frame t - (kernel - 1 - j)
                out = out + padded[:, j : j + t] * w[j]
            x = out
        x = F.silu(x)
        bsz, t, width = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            # The scan in float32: its cumulative sums of log decays need the precision (bf16 has 8 bits).
            x = x.float()
            params = self.select(x)
            delta = F.softplus(params[..., : self.heads] + self.delta_bias)
            if keep is not None:
                delta = delta * keep.float()  # padded frames take no step
            b, c = params[..., self.heads :].split(self.state, dim=-1)
            u = x.view(bsz, t, self.heads, width // self.heads)
            y = selective_scan(u, delta, -torch.exp(self.a_log.float()), b, c, self.chunk)
            y = y + self.skip[:, None] * u
        return y.reshape(bsz, t, width)


class _Block(nn.Module):
    def __init__(self, width: int, cfg: MambaConfig) -> None:
        super().__init__()
        inner = cfg.expand * width
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, 2 * inner)
        self.scans = nn.ModuleList(_Scan(inner, cfg) for _ in range(2 if cfg.bidirectional else 1))
        self.out = nn.Linear(inner, width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h: Tensor, keep: Tensor | None) -> Tensor:
        x, gate = self.inner(self.norm(h)).chunk(2, dim=-1)
        y = self.scans[0](x, keep)
        if len(self.scans) > 1:
            back = None if keep is None else keep.flip(1)
            y = y + self.scans[1](x.flip(1), back).flip(1)
        return h + self.drop(self.out(y * F.silu(gate.float())))


@TRUNKS.register("mamba")
class MambaTrunk(Trunk):
    """Selective state-space (Mamba) blocks, parallel chunked scan (--hidden, --layers, --bidirectional)."""

    label = "Mamba"
    Config = MambaConfig

    def __init__(self, in_dim: int, config: MambaConfig) -> None:
        super().__init__(in_dim, config)
        small = {k: getattr(config, k) for k in ("hidden", "layers", "expand", "state", "heads", "chunk")}
        bad = [f"{k}={v}" for k, v in small.items() if v < 1]
        if bad or config.conv < 0:
            got = ", ".join(bad) or f"conv={config.conv}"
            raise ConfigError("mamba needs hidden, layers, expand, state, heads, chunk >= 1, conv >= 0; "
                              f"got {got}")
        inner = config.expand * config.hidden
        if inner % config.heads:
            raise ConfigError(f"mamba: the inner width expand x hidden = {inner} is not divisible by "
                              f"heads {config.heads}")
        self.drop = nn.Dropout(config.dropout)
        self.input = nn.Linear(in_dim, config.hidden)
        self.blocks = nn.ModuleList(_Block(config.hidden, config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.hidden)
        self.out_dim = config.hidden

    def context(self) -> Context:
        return Context("bidirectional" if self.config.bidirectional else "causal")

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        keep = None if mask is None or bool(mask.all()) else mask[..., None].to(torch.float32)
        h = self.input(self.drop(x))
        for block in self.blocks:
            h = block(h, keep)
        return self.drop(self.norm(h))
