"""``--fusion attention``: each fused cache's sequence attends to the other caches' sequences, then one trunk.

Every cache's standardised features are projected to a common width (plus a learned embedding of which cache
it is); each cache's token at frame t then attends, with multi-head attention, to the *other* caches' tokens
at the frames its trunk may see (the same frame for a frame-wise trunk, earlier ones for a causal trunk, the
window or the receptive field for a bidirectional one) with a learned recency bias per head (scores fall
linearly with the distance |t - s|, as in ALiBi). A key where its cache has no row (availability 0, or a
cache dropped by modality dropout) or a padded frame is masked out, and a learned "nothing here" key and
value stand beside the real ones, so a frame whose other caches are all missing attends to that instead of
to a zero-filled row. Each cache's token (zeroed where the cache lacks the frame) plus what it gathered, for
all caches, and the availability columns are the trunk's input. The zero-filled features of a missing row
are never read: they are multiplied out before any projection, and their keys are masked.

Context: attention over earlier frames before a causal trunk widens what an output may see; with a finite
receptive field R the pair sees 2R - 1 frames, which ``context()`` declares.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from abawfeat.heads import FUSIONS
from abawfeat.trunks import Context, build_trunk

WIDTH = 128  # every cache's token width: a 512-d embedding is summarised, not copied, before fusing
HEADS = 4  # attention heads of WIDTH / HEADS = 32 dimensions


class AttentionFusion(nn.Module):
    """Cross-cache attention (masked by availability) in front of one trunk; declares the pair's context."""

    def __init__(self, in_dim: int, groups: tuple[int, ...], trunk: str, options: dict[str, Any]) -> None:
        super().__init__()
        self.groups = tuple(groups)
        caches = len(groups)
        self.project = nn.ModuleList(nn.Linear(g, WIDTH) for g in groups)
        self.which = nn.Parameter(0.02 * torch.randn(caches, WIDTH))  # which cache a token comes from
        self.norm = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.null = nn.Parameter(0.02 * torch.randn(2, HEADS, WIDTH // HEADS))  # "nothing here" key, value
        # Recency bias: softplus(slope) per head, from 1/8 down to 1/512 per frame (ALiBi's geometric range).
        slopes = torch.tensor([2.0 ** (-3 - 6 * h / max(HEADS - 1, 1)) for h in range(HEADS)])
        self.slope = nn.Parameter(torch.log(torch.expm1(slopes)))
        self.out = nn.Linear(WIDTH, WIDTH)
        self.trunk = build_trunk(trunk, caches * WIDTH + caches, options)
        self.config = self.trunk.config
        self.out_dim = self.trunk.out_dim

    def context(self) -> Context:
        inner = self.trunk.context()
        if not inner.temporal or inner.receptive_field is None:
            return inner
        return Context(inner.kind, 2 * inner.receptive_field - 1)

    def _allowed(self, t: int, device: torch.device) -> Tensor:
        """bool [T, T]: query frame t may attend to key frame s (the trunk's own context, once)."""
        inner = self.trunk.context()
        pos = torch.arange(t, device=device)
        lag = pos[:, None] - pos[None, :]  # t - s
        field = inner.receptive_field
        if inner.kind == "causal":
            return (lag >= 0) & (lag < (field if field is not None else t + 1))
        half = (field - 1) // 2 if field is not None else t
        return lag.abs() <= half

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        n = sum(self.groups)
        caches = len(self.groups)
        present = x[..., n:] > 0.5  # [B, T, C]
        if mask is not None:
            present = present & mask[..., None].bool()
        keep = present.to(x.dtype)
        bounds = [0, *torch.tensor(self.groups).cumsum(0).tolist()]
        tokens = torch.stack([proj(x[..., bounds[c] : bounds[c + 1]] * keep[..., c : c + 1])
                              for c, proj in enumerate(self.project)], dim=2)  # [B, T, C, W]
        tokens = tokens + self.which.to(tokens.dtype)
        b, t = tokens.shape[:2]
        dh = WIDTH // HEADS
        q, k, v = self.qkv(self.norm(tokens)).view(b, t, caches, 3, HEADS, dh).permute(3, 0, 4, 2, 1, 5)
        # q, k, v: [B, H, C, T, dh]; scores in float32 (softmax over few keys, some of them masked).
        q, k, v = q.float() * dh**-0.5, k.float(), v.float()
        other = ~torch.eye(caches, dtype=torch.bool, device=x.device)  # [C query, C key]
        key_ok = present.permute(0, 2, 1)  # [B, C, T]
        null_k, null_v = self.null.float().unbind(0)  # [H, dh]
        null_score = torch.einsum("bhctd,hd->bhct", q, null_k)[..., None]
        if not self.trunk.context().temporal:
            # Frame-wise: the other caches at the same frame only.
            scores = torch.einsum("bhctd,bhktd->bhctk", q, k)
            ok = other[None, None, :, None, :] & key_ok.permute(0, 2, 1)[:, None, None, :, :]
            scores = scores.masked_fill(~ok, -math.inf)
            w = torch.softmax(torch.cat([scores, null_score], dim=-1), dim=-1)
            gathered = torch.einsum("bhctk,bhktd->bhctd", w[..., :-1], v)
        else:
            scores = torch.einsum("bhctd,bhksd->bhctks", q, k)  # [B, H, Cq, T, Ck, S]
            pos = torch.arange(t, device=x.device, dtype=torch.float32)
            distance = (pos[:, None] - pos[None, :]).abs()
            recency = F.softplus(self.slope.float())[:, None, None] * distance  # [H, T, S]
            scores = scores - recency[None, :, None, :, None, :]
            ok = (other[:, None, :, None] & self._allowed(t, x.device)[None, :, None, :])[None, None]
            ok = ok & key_ok[:, None, None, None, :, :]
            scores = scores.masked_fill(~ok, -math.inf).flatten(-2)  # [B, H, C, T, C * S]
            w = torch.softmax(torch.cat([scores, null_score], dim=-1), dim=-1)
            gathered = (w[..., :-1].flatten(2, 3) @ v.flatten(2, 3)).view(b, HEADS, caches, t, dh)
        gathered = gathered + w[..., -1:] * null_v[None, :, None, None, :]
        gathered = self.out(gathered.permute(0, 3, 2, 1, 4).reshape(b, t, caches, WIDTH).to(tokens.dtype))
        fused = tokens * keep[..., None] + gathered  # a missing cache's own token is not signal
        return self.trunk(torch.cat([fused.flatten(-2), keep], dim=-1), mask)


FUSIONS.add("attention", AttentionFusion)
