"""DDAMFN (Dual-Direction Attention Mixed Feature Network), our implementation.

The network computes what the published DDAMFN / DDAMFN++ computes and owns parameters under the published
names, so the authors' checkpoints load with a strict ``load_state_dict`` (tests/test_ddamfn.py checks parity
against reference outputs of the original code). Structure, for a 112 x 112 face:

    features  MixedFeatureNet up to its 1x1 conv to 512 channels -> feature map [512, 7, 7]
              (a MobileFaceNet whose bottlenecks use mixed depthwise convolutions, kernels 3/5/7/9, and a
              coordinate-attention block between the depthwise and the projection convolution)
    cat_headK K = 0..num_head-1: coordinate-attention heads over the map, pooling with learned 1x7 / 7x1
              depthwise convolutions; combined by element-wise max, then multiplied with the map
    Linear    GDConv, a 7x7 depthwise conv + BN -> the 512-d embedding (what stage one caches)
    fc        Linear 512 -> classes (AffectNet order) -> logits

A few modules exist only because published checkpoints contain them and a strict load must find an owner:
the BN and PReLU inside each mixed depthwise convolution, each head's ``Linear`` and the top-level ``bn``.
They take no part in the forward pass.

The forward pass has no data-dependent Python control flow, so it works with ``torch.compile``,
``channels_last`` and bf16 autocast.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from abawfeat.constants import AFFECTNET7_CLASSES, AFFECTNET8_CLASSES
from abawfeat.encoders.base import (
    ATTENTION_MAPS,
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM_INIT,
    Block,
    Encoder,
    EncoderInfo,
    ImageTransform,
    recalibrate_batchnorm,
)
from abawfeat.encoders.weights import NamedWeights
from abawfeat.errors import CheckpointError, ConfigError
from abawfeat.utils.io import torch_save

INPUT_SIZE = 112
EMBEDDING_DIM = 512
DEFAULT_WEIGHTS = "affectnet8"
# How many key names an architecture-mismatch message shows per kind of problem.
_SHOW_KEYS = 4

# The three DDAMFN++ checkpoints published in the authors' repository (README: "The trained RAF-DB and
# AffectNet model is available in DDAMFN++/checkpoints_ver2.0"). Addresses are pinned to the commit that
# holds all three, so that they keep naming the same bytes.
_DDAMFN_REPO = "https://github.com/SainingZhang/DDAMFN"
_DDAMFN_COMMIT = "74d638ae20f63b258962570b02dc26bc6f99aa03"


def _ddamfn_url(filename: str) -> str:
    return f"{_DDAMFN_REPO}/raw/{_DDAMFN_COMMIT}/DDAMFN%2B%2B/checkpoints_ver2.0/{filename}"


# DDAMFN's named weights (``DDAMFNEncoder.named_weights``), resolved by abawfeat/encoders/weights.py.
NAMED_WEIGHTS: dict[str, NamedWeights] = {
    w.name: w
    for w in (
        NamedWeights(
            name="affectnet8",
            encoder="ddamfn",
            filename="affecnet8_epoch25_acc0.6469.pth",
            url=_ddamfn_url("affecnet8_epoch25_acc0.6469.pth"),
            num_class=8,
            logit_names=AFFECTNET8_CLASSES,
            description="DDAMFN++ trained on AffectNet-8 (published val. accuracy 64.69%)",
            git_blob_sha1="b8dce63bfc249c270cd09f5adc34cf7948954b1f",
        ),
        NamedWeights(
            name="affectnet7",
            encoder="ddamfn",
            filename="affecnet7_epoch19_acc0.671.pth",
            url=_ddamfn_url("affecnet7_epoch19_acc0.671.pth"),
            num_class=7,
            logit_names=AFFECTNET7_CLASSES,
            description="DDAMFN++ trained on AffectNet-7 (published val. accuracy 67.1%)",
            git_blob_sha1="a2399a1346f184f12725b37b3969bcc41529cdec",
        ),
        NamedWeights(
            name="rafdb",
            encoder="ddamfn",
            filename="rafdb_epoch20_acc0.9204_bacc0.8617.pth",
            url=_ddamfn_url("rafdb_epoch20_acc0.9204_bacc0.8617.pth"),
            num_class=7,
            logit_names=AFFECTNET7_CLASSES,  # the published RAF-DB scripts use the same 7-class order
            description="DDAMFN++ trained on RAF-DB (published accuracy 92.04%)",
            git_blob_sha1="3adfea01f296a4ef56ccd98578ab45a43e73f2eb",
        ),
    )
}

# The trainable stages in forward order (``DDAMFNEncoder.blocks``). The first nine are MixedFeatureNet's
# (``features.0`` .. ``features.8``, named as in the MobileFaceNet code DDAMFN derives from); then the
# attention heads and the GDConv that makes the 512-d embedding.
BLOCKS: tuple[str, ...] = (
    "conv1", "conv2_dw", "conv_23", "conv_3", "conv_34", "conv_4", "conv_45", "conv_5", "conv_6_sep",
    "attention", "gdconv",
)


# --------------------------------------------------------------------------------------------------------
# Building blocks. Attribute names (conv, bn, prelu, conv_dw, CA, project, model, CoordAtt, Linear_h, ...)
# are those of the published checkpoints; class names are ours.
# --------------------------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """Conv (no bias) + BN, optionally followed by a per-channel PReLU."""

    def __init__(self, in_c: int, out_c: int, kernel: int | tuple[int, int] = 1, stride: int = 1,
                 padding: int | tuple[int, int] = 0, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_c)
        self.prelu = nn.PReLU(out_c) if act else None

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv weight and bias with the eval-mode BN folded in: ``conv(x, w * s) + (beta - mean * s)``."""
        bn = self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return self.conv.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn.training:
            x = self.bn(self.conv(x))
        else:
            # BN folded into the conv: one pass over the activations instead of two (about 10% of eager
            # inference time). Same function; float32 results move by ~1e-7 relative. The fold is
            # recomputed per call (cheap, weight-sized), so loaded or fine-tuned weights need no refresh.
            weight, bias = self.folded()
            c = self.conv
            x = F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)
        return self.prelu(x) if self.prelu is not None else x


class MixedDepthwiseConv(nn.Module):
    """MixConv: channels split into groups, each group a depthwise conv with its own kernel size."""

    def __init__(self, channels: int, kernels: tuple[int, ...], splits: tuple[int, ...], stride: int) -> None:
        super().__init__()
        if sum(splits) != channels or len(splits) != len(kernels):
            raise ValueError(f"splits {splits} must cover {channels} channels, one per kernel {kernels}")
        self.channels = channels
        self.stride = stride
        self.max_kernel = max(kernels)
        self.pads = [(self.max_kernel - k) // 2 for k in kernels]
        self.mixed_depthwise_conv = nn.ModuleList(
            nn.Conv2d(c, c, k, stride=stride, padding=k // 2, groups=c, bias=False)
            for c, k in zip(splits, kernels, strict=True)
        )
        # Present in published checkpoints, never applied by the published forward pass (the bottleneck goes
        # straight from the mixed convolution to coordinate attention). Kept for strict loading only.
        self.bn = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels)

    def combined_weight(self) -> torch.Tensor:
        """All groups as one depthwise kernel of the largest size, smaller kernels zero-padded around
        their centre. With padding ``max_kernel // 2`` this is exactly the per-group convolution."""
        convs = zip(self.mixed_depthwise_conv, self.pads, strict=True)
        return torch.cat([F.pad(conv.weight, [pad] * 4) for conv, pad in convs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and any(c.weight.requires_grad for c in self.mixed_depthwise_conv):
            # Fine-tuning: the backward pass of the zero-padded 9x9 kernel costs about 4x the per-group
            # one, so train with split + per-group convolutions + cat (the same function).
            parts = torch.split(x, [c.in_channels for c in self.mixed_depthwise_conv], dim=1)
            return torch.cat([conv(p) for conv, p in zip(self.mixed_depthwise_conv, parts, strict=True)], 1)
        # Inference: one convolution instead of split + per-group convolutions + cat: no channel-slice copies
        # (which channels_last makes strided) and one kernel launch; the zero taps cost less than the copies.
        return F.conv2d(x, self.combined_weight(), None, self.stride, self.max_kernel // 2, 1, self.channels)


class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou et al. 2021) inside each bottleneck: average-pool along W and along H,
    a shared 1x1 conv + BN + h-swish over both, then one sigmoid gate per direction."""

    def __init__(self, channels: int, reduction: int = 32) -> None:
        super().__init__()
        mid = max(8, channels // reduction)
        self.conv1 = nn.Conv2d(channels, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, channels, 1)
        self.conv3 = nn.Conv2d(mid, channels, 1)

    def gates(self, pooled_h: torch.Tensor, pooled_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C, H, 1] and [B, C, W, 1] -> sigmoid gates [B, C, H, 1] and [B, C, 1, W]."""
        h = pooled_h.shape[2]
        w = pooled_w.shape[2]
        # One conv over both directions (not two), so that BN statistics in train mode (calibration,
        # fine-tuning) are pooled over H and W positions together, as in the published model.
        y = F.hardswish(self.bn1(self.conv1(torch.cat([pooled_h, pooled_w], dim=2))))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        return torch.sigmoid(self.conv2(y_h)), torch.sigmoid(self.conv3(y_w)).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        if x.is_contiguous(memory_format=torch.channels_last):
            # A layout choice, not a data-dependent one: the NHWC pooling kernel is faster than a
            # strided mean there, while in NCHW the plain mean is the faster one.
            pooled_h, pooled_w = F.adaptive_avg_pool2d(x, (h, 1)), F.adaptive_avg_pool2d(x, (1, w))
        else:
            pooled_h, pooled_w = x.mean(dim=3, keepdim=True), x.mean(dim=2, keepdim=True)
        gate_h, gate_w = self.gates(pooled_h, pooled_w.transpose(2, 3))
        return x * gate_w * gate_h


class MixedBottleneck(nn.Module):
    """Inverted bottleneck: 1x1 expand (BN, PReLU) -> mixed depthwise -> coordinate attention -> 1x1 project
    (BN), plus the input when shapes allow (stride 1, same width)."""

    def __init__(self, in_c: int, out_c: int, expand: int, stride: int, kernels: tuple[int, ...],
                 splits: tuple[int, ...], residual: bool) -> None:
        super().__init__()
        self.conv = ConvBN(in_c, expand, 1)
        self.conv_dw = MixedDepthwiseConv(expand, kernels, splits, stride)
        self.CA = CoordinateAttention(expand)
        self.project = ConvBN(expand, out_c, 1, act=False)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.CA(self.conv_dw(self.conv(x))))
        return x + y if self.residual else y


class BottleneckStack(nn.Module):
    """``repeats`` residual bottlenecks at constant width and resolution."""

    def __init__(self, channels: int, repeats: int, expand: int, kernels: tuple[int, ...],
                 splits: tuple[int, ...]) -> None:
        super().__init__()
        self.model = nn.Sequential(*[
            MixedBottleneck(channels, channels, expand, 1, kernels, splits, residual=True)
            for _ in range(repeats)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def mixed_feature_net() -> nn.Sequential:
    """The MixedFeatureNet trunk as published (widths, kernels and channel splits), 112x112 -> [512, 7, 7]."""
    return nn.Sequential(
        ConvBN(3, 64, 3, stride=2, padding=1),  # 56x56
        ConvBN(64, 64, 3, stride=1, padding=1, groups=64),
        MixedBottleneck(64, 64, 128, 2, (3, 5, 7), (64, 32, 32), residual=False),  # 28x28
        BottleneckStack(64, 9, 128, (3, 5), (96, 32)),
        MixedBottleneck(64, 128, 256, 2, (3, 5, 7), (128, 64, 64), residual=False),  # 14x14
        BottleneckStack(128, 16, 256, (3, 5), (192, 64)),
        MixedBottleneck(128, 256, 1024, 2, (3, 5, 7, 9), (256, 256, 256, 256), residual=False),  # 7x7
        BottleneckStack(256, 6, 512, (3, 5, 7), (172, 170, 170)),
        ConvBN(256, 512, 1),
    )


class DirectionalAttention(nn.Module):
    """One dual-direction attention map over the 7x7 feature map: learned 1x7 / 7x1 depthwise pooling
    (+ BN) instead of averages, then the coordinate-attention gates; returns the map, not the product."""

    def __init__(self, channels: int = EMBEDDING_DIM, size: int = 7, reduction: int = 32) -> None:
        super().__init__()
        self.Linear_h = ConvBN(channels, channels, (1, size), groups=channels, act=False)
        self.Linear_w = ConvBN(channels, channels, (size, 1), groups=channels, act=False)
        mid = max(8, channels // reduction)
        self.conv1 = nn.Conv2d(channels, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, channels, 1)
        self.conv3 = nn.Conv2d(mid, channels, 1)
        # In published checkpoints, unused by the published forward pass; kept for strict loading only.
        self.Linear = ConvBN(channels, channels, size, groups=channels, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        pooled_h = self.Linear_h(x)  # [B, C, H, 1]
        pooled_w = self.Linear_w(x).transpose(2, 3)  # [B, C, 1, W] -> [B, C, W, 1]
        y = F.hardswish(self.bn1(self.conv1(torch.cat([pooled_h, pooled_w], dim=2))))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        gate_h = torch.sigmoid(self.conv2(y_h))
        gate_w = torch.sigmoid(self.conv3(y_w)).transpose(2, 3)
        return gate_w * gate_h  # broadcasts to [B, C, H, W]


class AttentionHead(nn.Module):
    """Published wrapper level (``cat_headK.CoordAtt``), kept so that parameter names match."""

    def __init__(self) -> None:
        super().__init__()
        self.CoordAtt = DirectionalAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.CoordAtt(x)


class DDAMFNOutput(NamedTuple):
    embedding: torch.Tensor  # [B, 512], GDConv output: the vector stage one caches
    logits: torch.Tensor  # [B, num_class]
    feature_map: torch.Tensor  # [B, 512, 7, 7], before attention
    # num_head x [B, 512, 7, 7], what abawfeat.losses.attention_diversity_loss reads when fine-tuning
    head_maps: tuple[torch.Tensor, ...]


class DDAMFNNet(nn.Module):
    """The network alone, with published parameter names: ``state_dict()`` is the published format."""

    def __init__(self, num_class: int = 8, num_head: int = 2) -> None:
        super().__init__()
        if num_head < 1:
            raise ConfigError(f"num_head must be at least 1, got {num_head}")
        self.num_class = num_class
        self.num_head = num_head
        self.features = mixed_feature_net()
        for i in range(num_head):
            setattr(self, f"cat_head{i}", AttentionHead())
        self.Linear = ConvBN(EMBEDDING_DIM, EMBEDDING_DIM, 7, groups=EMBEDDING_DIM, act=False)  # GDConv
        self.fc = nn.Linear(EMBEDDING_DIM, num_class)
        # In published checkpoints, unused by the published forward pass; kept for strict loading only.
        self.bn = nn.BatchNorm1d(num_class)

    def forward(self, x: torch.Tensor) -> DDAMFNOutput:
        feature_map = self.features(x)
        heads = tuple(getattr(self, f"cat_head{i}")(feature_map) for i in range(self.num_head))
        attention = heads[0]
        for head in heads[1:]:
            attention = torch.max(attention, head)
        embedding = self.Linear(feature_map * attention).flatten(1)
        return DDAMFNOutput(embedding, self.fc(embedding), feature_map, heads)


# --------------------------------------------------------------------------------------------------------
# Checkpoints in the published format
# --------------------------------------------------------------------------------------------------------
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The model weights of a DDAMFN checkpoint file, with wrapper prefixes removed.

    Accepts the published format (a dict with ``model_state_dict``), a bare state dict, or (only with
    ``trust_pickle``) a whole pickled model. Files are opened with ``weights_only=True``: a pickle that
    needs code to load is refused, because loading it would run that code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: a pickled Python object (e.g. torch.save(model)), not a state dict; loading it "
                "would run code from the file. Re-save it as a state dict, or pass trust_pickle=True "
                "(--encoder-opt trust_pickle=true) if you trust where it comes from"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - any failure of arbitrary unpickling is the file's fault
            raise CheckpointError(
                f"{path}: cannot unpickle ({type(exc2).__name__}: {_first_line(exc2)})"
            ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zips, wrong magic numbers, directories, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None

    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: neither a state dict nor a dict with 'model_state_dict'")
    state = dict(obj)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _head_count(state: dict[str, torch.Tensor]) -> int:
    heads = {k.split(".", 1)[0] for k in state if k.startswith("cat_head")}
    return len(heads)


def _shorten(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW_KEYS} more)" if len(keys) > _SHOW_KEYS else ""
    return ", ".join(keys[:_SHOW_KEYS]) + more


def net_from_state_dict(state: dict[str, torch.Tensor], path: str | Path) -> DDAMFNNet:
    """Build a DDAMFNNet sized from the weights (classes from ``fc.weight``, heads from ``cat_headK``) and
    load them strictly; any mismatch is a CheckpointError naming the file and the first offending keys."""
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2:
        raise CheckpointError(f"{path}: not a DDAMFN checkpoint (no 2-d 'fc.weight'; keys start with "
                              f"{_shorten(list(state))})")
    num_class, num_head = int(fc.shape[0]), max(_head_count(state), 1)
    net = DDAMFNNet(num_class=num_class, num_head=num_head)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        kinds = (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        problems = [f"{label}: {_shorten(keys)}" for label, keys in kinds if keys]
        raise CheckpointError(f"{path}: not a DDAMFN checkpoint ({num_class} classes, {num_head} heads); "
                              + "; ".join(problems))
    net.load_state_dict(state, strict=True)
    return net


def load_ddamfn_net(path: str | Path, *, trust_pickle: bool = False) -> DDAMFNNet:
    """A DDAMFNNet (eval mode) from a checkpoint file in the published format."""
    return net_from_state_dict(read_state_dict(path, trust_pickle=trust_pickle), path).eval()


def _net_of(model: nn.Module) -> DDAMFNNet:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # (Distributed)DataParallel
    if isinstance(model, DDAMFNEncoder):
        return model.net
    if isinstance(model, DDAMFNNet):
        return model
    raise TypeError(f"expected a DDAMFN encoder or network, got {type(model).__name__}")


def save_published_checkpoint(model: nn.Module, path: str | Path, *, iteration: int = 0,
                              optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``model`` (a DDAMFNEncoder or DDAMFNNet, possibly fine-tuned) in the published format:
    ``{"iter", "model_state_dict", "optimizer_state_dict"}`` with the published key names, so that both the
    authors' scripts and ``build_encoder("ddamfn", weights=path)`` load it. Written atomically."""
    net = _net_of(model)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
    payload = {
        "iter": int(iteration),
        "model_state_dict": state,
        # The authors' scripts save their optimizer too; an empty one keeps the format without the bulk.
        "optimizer_state_dict": (
            optimizer.state_dict() if optimizer is not None else {"state": {}, "param_groups": []}
        ),
    }
    return torch_save(path, payload)


# --------------------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------------------
@dataclass
class DDAMFNConfig:
    # Named published weights (affectnet8, affectnet7, rafdb) or a checkpoint path; None = affectnet8.
    weights: str | None = None
    # Build with PyTorch's default initialisation from `seed` instead of loading weights (demo, tests).
    # Such an encoder needs calibrate() on real frames before its features mean anything.
    random_init: bool = False
    # Seed of the random initialisation; part of the provenance so a resumed run rebuilds the same network.
    seed: int = 0
    # Random init only: classifier size (8 = AffectNet-8 order) and attention heads. Loaded checkpoints
    # set both from their own weights.
    num_class: int = 8
    num_head: int = 2
    # Allow whole-model pickles (torch.save(model)); unpickling runs code from the file.
    trust_pickle: bool = False
    # Frames per train-mode forward pass in calibrate(); fixed so calibration is reproducible.
    calibration_chunk: int = 64


def _logit_names(num_class: int) -> tuple[str, ...] | None:
    return {8: AFFECTNET8_CLASSES, 7: AFFECTNET7_CLASSES}.get(num_class)


@ENCODERS.register("ddamfn")
class DDAMFNEncoder(Encoder):
    """DDAMFN / DDAMFN++ as a frozen feature extractor: 512-d GDConv embedding plus AffectNet logits."""

    config_class = DDAMFNConfig
    summary = "DDAMFN++ (MixedFeatureNet + dual-direction attention), 512-d GDConv embedding + logits"
    compile_by_default = True  # it pays end to end: benchmarks/extract.py, docs/performance.md
    needs_calibration = True  # random weights give one embedding for every image until BN is calibrated
    auxiliary_outputs = (ATTENTION_MAPS,)  # the attention heads' maps, for the attention-diversity loss

    def __init__(self, config: DDAMFNConfig) -> None:
        super().__init__(config)
        if config.calibration_chunk < 2:
            raise ConfigError("calibration_chunk must be at least 2 (batch norm needs two frames per pass)")
        self.transform = ImageTransform(INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, "bilinear", "squash")
        self.feature_dim = EMBEDDING_DIM
        if config.random_init:
            if config.weights is not None:
                raise ConfigError("ddamfn: give either weights or random_init, not both")
            # A private RNG stream: the same seed gives the same network whatever ran before.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                self.net = DDAMFNNet(num_class=config.num_class, num_head=config.num_head)
            self.weights_source = RANDOM_INIT
            self.weights_sha256 = RANDOM_INIT
        else:
            spec = config.weights or DEFAULT_WEIGHTS
            resolved = self.resolve_weights(
                spec, verify=lambda p: load_ddamfn_net(p, trust_pickle=config.trust_pickle)
            )
            self.net = load_ddamfn_net(resolved.path, trust_pickle=config.trust_pickle)
            self.weights_source = resolved.source
            self.weights_sha256 = resolved.sha256
            # Record what the weights really are, whatever the config asked for.
            self.config = dataclasses.replace(
                config, num_class=self.net.num_class, num_head=self.net.num_head
            )
            if _logit_names(self.net.num_class) is None:
                self.note(f"{resolved.path}: DDAMFN checkpoint with {self.net.num_class} classes, not the "
                          "published 7 (AffectNet-7, RAF-DB) or 8 (AffectNet-8); its logits are kept without "
                          "class names")
        self.logit_names = _logit_names(self.net.num_class)
        self.net.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return out.embedding, out.logits

    def forward_with_maps(self, x: torch.Tensor) -> DDAMFNOutput:
        """Embedding, logits, feature map and the heads' attention maps (for end-to-end fine-tuning)."""
        return self.net(x)

    def head_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.net(x).head_maps

    # -- fine-tuning --------------------------------------------------------------------------------
    def blocks(self) -> list[Block]:
        """BLOCKS: the nine MixedFeatureNet stages, the attention heads, the GDConv (the classifier ``fc``
        and the modules only published checkpoints carry are in no block, so they stay frozen)."""
        n_stages = len(self.net.features)
        if n_stages != len(BLOCKS) - 2:
            raise CheckpointError(f"DDAMFN trunk has {n_stages} stages, expected {len(BLOCKS) - 2}")
        trunk = [Block(name, (f"net.features.{i}",)) for i, name in enumerate(BLOCKS[:n_stages])]
        heads = tuple(f"net.cat_head{i}" for i in range(self.net.num_head))
        return [*trunk, Block("attention", heads), Block("gdconv", ("net.Linear",))]

    def forward_train(
        self, x: torch.Tensor, outputs: Sequence[str] = ()
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        unknown = [o for o in outputs if o not in self.auxiliary_outputs]
        if unknown:
            raise ConfigError(f"encoder 'ddamfn' has no auxiliary output {', '.join(unknown)}")
        out = self.net(x)
        aux = {ATTENTION_MAPS: torch.stack([m.float() for m in out.head_maps])} if outputs else {}
        return out.embedding, aux

    def save_weights(self, path: str | Path, *, step: int = 0) -> Path:
        """The published DDAMFN format (``save_published_checkpoint``): the authors' scripts and
        ``--weights PATH`` both load it."""
        return save_published_checkpoint(self, path, iteration=step)

    def calibrate(self, images: torch.Tensor) -> None:
        """Recompute every batch-norm running statistic from ``images`` (normalised, [N, 3, 112, 112]): with
        default initialisation, in eval mode, the signal dies through the ~35 blocks and every image gets the
        same embedding (``recalibrate_batchnorm``)."""
        if self.weights_sha256 != RANDOM_INIT:
            raise ConfigError("calibrate() recomputes batch-norm statistics of random-init weights only; "
                              f"these are {self.weights_source}")
        if images.ndim != 4 or images.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE) or images.shape[0] < 2:
            raise ConfigError(f"calibrate() needs at least 2 frames of shape "
                              f"[3, {INPUT_SIZE}, {INPUT_SIZE}], got {tuple(images.shape)}")
        record = recalibrate_batchnorm(self.net, images, self.config.calibration_chunk)
        record.pop("batch_norms")  # the calibration record DDAMFN caches have always carried
        self.calibration = record

    def provenance_config(self) -> dict[str, Any]:
        # `weights` (a name or a path) is told by weights_source / weights_sha256; trust_pickle is a
        # loading policy. Neither changes what the network computes.
        config = super().provenance_config()
        for key in ("weights", "trust_pickle"):
            config.pop(key, None)
        return config

    @classmethod
    def named_weights(cls, config: Any | None = None) -> dict[str, NamedWeights]:
        return dict(NAMED_WEIGHTS)

    @classmethod
    def describe(cls) -> EncoderInfo:
        named = NAMED_WEIGHTS[DEFAULT_WEIGHTS]
        others = ", ".join(n for n in NAMED_WEIGHTS if n != named.name)
        return EncoderInfo(
            name=cls.name,
            feature_dim=EMBEDDING_DIM,
            input_size=INPUT_SIZE,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            interpolation="bilinear",
            weights=f"{named.name} ({others}, or a path)",
            logit_names=named.logit_names,
            summary=cls.summary,
        )
