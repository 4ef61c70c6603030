"""DDAMFN computed in the published code's order of operations, over our modules' own parameters: the
"original eager fp32 code" that benchmarks/extract.py measures our extraction against.

Our network computes the same function more cheaply in inference (abawfeat/encoders/ddamfn.py): batch norms
folded into the convolutions, the mixed depthwise convolution as one convolution of zero-padded kernels. The
published code (DDAMFN's networks/MixedFeatureNet.py and networks/DDAM.py) does neither, so a baseline of our
own eager network would flatter the baseline. This module walks our modules and applies, step by step, what
the published forward passes do:

- every convolution block: the convolution, then its batch norm as a separate pass, then PReLU;
- the mixed depthwise convolution: the channels split per kernel size, one convolution per group, and the
  groups concatenated again;
- coordinate attention: average pools along each axis, the pooled rows concatenated, a 1x1 convolution,
  batch norm and h-swish written as ``x * relu6(x + 3) / 6``, split again, one sigmoid gate per axis,
  both gates expanded to the map's size and multiplied with it;
- the dual-direction heads the same way, with their learned 1x7 and 7x1 depthwise pooling blocks; the heads'
  maximum times the feature map, the GDConv block (convolution, batch norm), flatten, the classifier.

``check`` compares its embeddings with the reference outputs of the published network in the DDAMFN fixture:
the baseline is only a baseline if it computes the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _block(m: Any, x: torch.Tensor) -> torch.Tensor:
    y = m.bn(m.conv(x))
    return m.prelu(y) if m.prelu is not None else y


def _h_swish(y: torch.Tensor) -> torch.Tensor:
    return y * (F.relu6(y + 3) / 6)


def _mixed(m: Any, x: torch.Tensor) -> torch.Tensor:
    parts = torch.split(x, [c.in_channels for c in m.mixed_depthwise_conv], dim=1)
    return torch.cat([conv(p) for conv, p in zip(m.mixed_depthwise_conv, parts, strict=True)], dim=1)


def _gates(m: Any, x_h: torch.Tensor, x_w: torch.Tensor, h: int, w: int) -> torch.Tensor:
    y = _h_swish(m.bn1(m.conv1(torch.cat([x_h, x_w.permute(0, 1, 3, 2)], dim=2))))
    y_h, y_w = torch.split(y, [h, w], dim=2)
    gate_h = m.conv2(y_h).sigmoid().expand(-1, -1, h, w)
    gate_w = m.conv3(y_w.permute(0, 1, 3, 2)).sigmoid().expand(-1, -1, h, w)
    return gate_w * gate_h


def _coordinate(m: Any, x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[2], x.shape[3]
    pooled_h = F.adaptive_avg_pool2d(x, (h, 1))
    pooled_w = F.adaptive_avg_pool2d(x, (1, w))
    return x * _gates(m, pooled_h, pooled_w, h, w)


def _bottleneck(m: Any, x: torch.Tensor) -> torch.Tensor:
    y = _block(m.project, _coordinate(m.CA, _mixed(m.conv_dw, _block(m.conv, x))))
    return x + y if m.residual else y


def _features(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    from abawfeat.encoders import ddamfn

    for child in seq:
        if isinstance(child, ddamfn.ConvBN):
            x = _block(child, x)
        elif isinstance(child, ddamfn.MixedBottleneck):
            x = _bottleneck(child, x)
        elif isinstance(child, ddamfn.BottleneckStack):
            for block in child.model:
                x = _bottleneck(block, x)
        else:
            raise TypeError(f"no published order for {type(child).__name__}")
    return x


def _head(m: Any, x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[2], x.shape[3]
    return _gates(m, _block(m.Linear_h, x), _block(m.Linear_w, x), h, w)


class PublishedOrder(nn.Module):
    """``net`` (a ``DDAMFNNet``) evaluated as the published code evaluates it: (embedding, logits)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.net
        feature_map = _features(net.features, x)
        attention = None
        for i in range(net.num_head):
            head = _head(getattr(net, f"cat_head{i}").CoordAtt, feature_map)
            attention = head if attention is None else torch.max(attention, head)
        embedding = _block(net.Linear, feature_map * attention).view(x.shape[0], -1)
        return embedding, net.fc(embedding)


def check(encoder: Any, reference: Path) -> float:
    """The published order's embeddings on the DDAMFN fixture's inputs against the fixture's reference
    outputs (those of the published network): the largest absolute deviation over the largest reference
    magnitude, as tests/test_ddamfn.py measures our network. ``encoder`` must hold the fixture's weights."""
    import numpy as np

    from abawfeat.encoders.ddamfn import _net_of

    with np.load(reference) as data:
        x, want = torch.from_numpy(data["input_normalized_nchw"]), data["embedding"]
    with torch.no_grad():
        got = PublishedOrder(_net_of(encoder))(x)[0].numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())
