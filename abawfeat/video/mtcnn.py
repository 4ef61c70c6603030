"""MTCNN (Zhang et al., 2016) in our own PyTorch code: P-, R- and O-Net, the image pyramid, non-maximum
suppression, box regression and O-Net's five landmarks, batched over the frames of a batch.

The weights are the three state dicts published with facenet-pytorch 2.6.0 (MIT), fetched by
``python -m abawfeat.video.assets fetch`` into the weights cache and loaded with ``weights_only=True``; our
modules use the same layer names (the original Caffe model's), so the state dicts load strictly as they are.
The detection steps follow that package's published behaviour, which ``tests/fixtures/mtcnn`` pins:

1. pyramid: scales 12/min_face * factor**k while the shorter side stays >= 12 px; each level is the frame
   area-resized to ``int(h * s + 1) x int(w * s + 1)``, normalised as ``(x - 127.5) / 128``;
2. P-Net (fully convolutional, stride 2, 12 px cells): cells with face probability >= 0.6 become boxes;
   NMS (IoU 0.5) within each level and frame, then (IoU 0.7) within each frame; boxes moved by the
   regression (offsets times the box size), made square around their centre;
3. R-Net on 24 x 24 crops of those boxes (clipped to the frame, area-resized): probability > 0.7, NMS 0.7,
   regression (offsets times size + 1), square again;
4. O-Net on 48 x 48 crops: probability > 0.7, five landmarks from the box before its last regression,
   regression, then NMS over the intersection divided by the smaller area (0.7).

The frames are integers, so one integral image per frame (running sums, exact in int32) gives every
pyramid level and every R- and O-Net crop as rectangle sums: an area resize is an average over a rectangle
of pixels, four look-ups per output pixel, for all boxes of all frames at once (no pass over the whole frame
per level, no kernel or Python call per box). P-Net runs once per pyramid level for the whole batch of
frames on a GPU (two frames at a time, channels-last, on a CPU); R- and O-Net once per batch over every
candidate of every frame, channels-last and in cache-sized chunks on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from abawfeat.encoders.weights import NamedWeights, resolve_weights
from abawfeat.errors import CheckpointError
from abawfeat.video.assets import FETCH_COMMAND, MTCNN_FILES
from abawfeat.video.detectors import DETECTORS, Detector, FaceDetections

NETS = ("pnet", "rnet", "onet")
DEFAULT_WEIGHTS = "facenet-pytorch"
MTCNN_WEIGHTS: dict[str, NamedWeights] = {
    net: NamedWeights(
        name=net, encoder="mtcnn", filename=f"{net}.pt", url="",
        description=f"MTCNN {net} state dict from the facenet-pytorch 2.6.0 wheel (MIT)",
        sha256=MTCNN_FILES[f"{net}.pt"], fetch_hint=f"`{FETCH_COMMAND}` puts it there",
    )
    for net in NETS
}
_MAX_CROPS = 1024  # R-/O-Net inputs resized and run per chunk (bounds the memory of a crowded batch)


class PNet(nn.Module):
    """Proposal network: 12 x 12 windows, stride 2; face probability and box offsets per cell."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)  # face / not face
        self.conv4_2 = nn.Conv2d(32, 4, 1)  # box offsets

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


def _flatten_wh(x: torch.Tensor) -> torch.Tensor:
    # The published dense layers read the feature map in (width, height, channel) order (Caffe's layout).
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """Refinement network on 24 x 24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu4(self.dense4(_flatten_wh(self.prelu3(self.conv3(x)))))
        return torch.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output network on 48 x 48 crops: probability, box offsets and five landmarks (x1..x5, y1..y5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.dense5(_flatten_wh(self.prelu4(self.conv4(x)))))
        return torch.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def weight_files(spec: str | None) -> dict[str, Path]:
    """``--detector-weights``: the published set by name (``facenet-pytorch``, from the weights cache) or a
    folder holding ``pnet.pt``, ``rnet.pt`` and ``onet.pt``."""
    if spec in (None, "", DEFAULT_WEIGHTS):
        return {net: resolve_weights(net, "mtcnn", MTCNN_WEIGHTS, what="MTCNN").path for net in NETS}
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{spec}: MTCNN weights are {DEFAULT_WEIGHTS!r} or a folder holding pnet.pt, "
                              "rnet.pt and onet.pt")
    missing = [f"{n}.pt" for n in NETS if not (folder / f"{n}.pt").is_file()]
    if missing:
        raise CheckpointError(f"{folder}: MTCNN weights folder lacks {', '.join(missing)}")
    return {net: folder / f"{net}.pt" for net in NETS}


def load_state(module: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a pickle with code in it, not a torch file at all
        raise CheckpointError(f"{path}: not a loadable state dict ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else str(exc)
        raise CheckpointError(f"{path}: does not fit {type(module).__name__} ({detail})") from None


def pyramid_scales(height: int, width: int, min_face: float, factor: float) -> list[float]:
    """Scales of the image pyramid: 12 / min_face, times ``factor`` each level, while the shorter side
    scaled stays at least 12 px (P-Net's window). Products are formed one level at a time, as published."""
    scale = 12.0 / min_face
    side = min(height, width) * scale
    scales = []
    while side >= 12:
        scales.append(scale)
        scale *= factor
        side *= factor
    return scales


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes made square (side = the longer side) around their centre."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def _regress(boxes: torch.Tensor, offsets: torch.Tensor, plus_one: bool) -> torch.Tensor:
    """Boxes moved by the regression: each corner by its offset times the box's width or height (R- and
    O-Net count sizes inclusively, +1; P-Net's calibration does not)."""
    extra = 1.0 if plus_one else 0.0
    w = boxes[:, 2] - boxes[:, 0] + extra
    h = boxes[:, 3] - boxes[:, 1] + extra
    return boxes + offsets * torch.stack([w, h, w, h], dim=1)


def _integral(frames: torch.Tensor) -> torch.Tensor:
    """Running sums ``[B, H + 1, W + 1, 3]`` of integer-valued frames ``[B, H, W, 3]`` (the decoder's own
    layout), with a zero first row and column; int32 while it cannot overflow, so every rectangle sum taken
    from it is exact. The sums run in place: two fresh [B, H, W, 3] buffers per batch cost more in page
    faults than the additions themselves."""
    b, h, w, c = frames.shape
    dtype = torch.int32 if 255 * h * w < 2**31 else torch.int64
    s = torch.zeros(b, h + 1, w + 1, c, dtype=dtype, device=frames.device)
    s[:, 1:, 1:] = frames
    return s.cumsum_(1).cumsum_(2)


def _cells(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive average pooling's cells over ``length`` pixels from ``start``:
    ``[floor(i * n / size), ceil((i + 1) * n / size))`` per output (broadcast over boxes)."""
    i = torch.arange(size, device=length.device)
    return (start + torch.div(i * length, size, rounding_mode="floor"),
            start - torch.div(-(i + 1) * length, size, rounding_mode="floor"))


def _area_resize(integral: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(frames, size, mode="area")`` of integer-valued frames from their running sums
    (``_integral``): each output pixel is one rectangle sum, exact in integers, over its cell's size.
    Returns ``[B, 3, h, w]`` in channels-last memory, P-Net's input layout on a CPU."""
    zero = torch.zeros((), dtype=torch.int64, device=integral.device)
    r0, r1 = _cells(zero, torch.tensor(integral.shape[1] - 1, device=integral.device), size[0])
    c0, c1 = _cells(zero, torch.tensor(integral.shape[2] - 1, device=integral.device), size[1])
    rows = integral.index_select(1, r1) - integral.index_select(1, r0)  # whole rows: contiguous copies
    total = rows.index_select(2, c1) - rows.index_select(2, c0)  # [B, h, w, 3]
    count = ((r1 - r0)[:, None] * (c1 - c0)[None, :]).to(torch.float32)[..., None]
    return (total.to(torch.float32) / count).permute(0, 3, 1, 2)


def _crops(integral: torch.Tensor, image: torch.Tensor, boxes: torch.Tensor,
           size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-resized ``size x size`` crops of the boxes (clipped to the frame) of frames ``image``, from the
    frames' running sums, normalised for the nets; returns (crops [n, 3, size, size], which boxes had a
    non-empty crop). All boxes of all frames at once: four look-ups per output pixel."""
    height, width = integral.shape[1] - 1, integral.shape[2] - 1
    b = boxes.trunc().to(torch.int64)
    # Clipped as published: 1-based first pixel, inclusive last pixel.
    x = b[:, 0].clamp(min=1) - 1
    y = b[:, 1].clamp(min=1) - 1
    ex = b[:, 2].clamp(max=width)
    ey = b[:, 3].clamp(max=height)
    ok = (ex > x) & (ey > y)
    x, y, ex, ey, img = x[ok], y[ok], ex[ok], ey[ok], image[ok]
    y0, y1 = _cells(y[:, None], (ey - y)[:, None], size)
    x0, x1 = _cells(x[:, None], (ex - x)[:, None], size)
    out = []

    def at(n: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return integral[n, ys[:, :, None], xs[:, None, :]]  # [n, size, size, 3]

    for start in range(0, len(img), _MAX_CROPS):
        sl = slice(start, start + _MAX_CROPS)
        n = img[sl][:, None, None]
        total = (at(n, y1[sl], x1[sl]) - at(n, y0[sl], x1[sl]) - at(n, y1[sl], x0[sl])
                 + at(n, y0[sl], x0[sl]))
        count = (y1[sl] - y0[sl])[:, :, None] * (x1[sl] - x0[sl])[:, None, :]
        mean = total.to(torch.float32) / count[..., None].to(torch.float32)
        out.append(mean.permute(0, 3, 1, 2))
    crops = torch.cat(out) if out else torch.zeros(0, 3, size, size, device=boxes.device)
    return (crops - 127.5) * 0.0078125, ok


def _nms_min(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS where overlap is the intersection over the smaller box (areas counted +1): O-Net's."""
    order = torch.argsort(scores, descending=True, stable=True)
    b = boxes[order]
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    iw = torch.minimum(b[:, None, 2], b[None, :, 2]) - torch.maximum(b[:, None, 0], b[None, :, 0]) + 1
    ih = torch.minimum(b[:, None, 3], b[None, :, 3]) - torch.maximum(b[:, None, 1], b[None, :, 1]) + 1
    iw, ih = iw.clamp(min=0), ih.clamp(min=0)
    overlap = (iw * ih) / torch.minimum(area[:, None], area[None, :])
    keep: list[int] = []
    removed = torch.zeros(len(b), dtype=torch.bool)
    over = (overlap > threshold).cpu()
    for k in range(len(b)):
        if removed[k]:
            continue
        keep.append(k)
        removed |= over[k]
    return order[torch.as_tensor(keep, dtype=torch.int64, device=boxes.device)]


@DETECTORS.register("mtcnn")
class MTCNN(Detector):
    """``--detector mtcnn``: the three published networks and the published detection steps."""

    default_weights = DEFAULT_WEIGHTS

    def __init__(self, weights: str | None = None, device: Any = "cpu", min_face: float = 20.0,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7), factor: float = 0.709) -> None:
        files = weight_files(weights)
        self.device = torch.device(device)
        self.nets = {"pnet": PNet(), "rnet": RNet(), "onet": ONet()}
        for net, module in self.nets.items():
            load_state(module, files[net])
            module.eval().to(self.device)
        self.pnet, self.rnet, self.onet = self.nets["pnet"], self.nets["rnet"], self.nets["onet"]
        # On a CPU, P-Net (3 -> 10 -> 16 -> 32 channels over the whole frame) runs faster channels-last and on
        # a few frames at a time: a large batch's activations of the first level no longer fit the caches
        # (benchmarks/crop.py). On a GPU one pass takes the whole batch.
        self.cpu = self.device.type == "cpu"
        self.pnet_frames = 2 if self.cpu else 0
        # R- and O-Net likewise run channels-last on a CPU, in chunks small enough for their activations to
        # stay in the caches: one pass over a thousand crops cost several times as much per crop as passes
        # over a few dozen in a quick check (docs/performance.md, "Crop").
        self.chunks = {"rnet": 128, "onet": 32} if self.cpu else {"rnet": _MAX_CROPS, "onet": _MAX_CROPS}
        if self.cpu:
            for module in self.nets.values():
                module.to(memory_format=torch.channels_last)
        self.min_face = float(min_face)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)
        from abawfeat.encoders.weights import file_sha256

        self._sha = {net: file_sha256(files[net]) for net in NETS}
        self._weights = weights or DEFAULT_WEIGHTS

    @property
    def provenance(self) -> dict[str, Any]:
        weights = "folder" if Path(self._weights).is_dir() else self._weights
        return {"detector": "mtcnn", "weights": weights,
                "weights_sha256": self._sha, "min_face": self.min_face, "thresholds": list(self.thresholds),
                "factor": self.factor}

    @torch.inference_mode()
    def detect(self, frames: Any) -> list[FaceDetections]:
        """``frames``: uint8 RGB ``[B, H, W, 3]`` (numpy or torch) or ``[H, W, 3]``."""
        if not isinstance(frames, torch.Tensor):
            frames = np.asarray(frames)
            frames = torch.from_numpy(frames if frames.flags.writeable else frames.copy())
        x = frames
        if x.ndim == 3:
            x = x[None]
        if x.shape[0] == 0:
            return []
        x = x.to(self.device, non_blocking=True)
        batch, height, width, _ = x.shape
        t1, t2, t3 = self.thresholds

        # One set of running sums per frame gives every pyramid level and every R- and O-Net crop by
        # rectangle sums: the levels then cost a few look-ups per output pixel instead of one pooling pass
        # over the whole frame each, and the crops of all boxes of all frames come out at once.
        integral = _integral(x)
        # Stage 1: P-Net over the pyramid, one pass per level for all frames.
        found: list[tuple[torch.Tensor, ...]] = []
        chunk = self.pnet_frames or batch
        for scale in pyramid_scales(height, width, self.min_face, self.factor):
            size = (int(height * scale + 1), int(width * scale + 1))
            parts = []
            for start in range(0, batch, chunk):
                im = _area_resize(integral[start:start + chunk], size)
                if not self.cpu:
                    im = im.contiguous()
                parts.append(self.pnet((im - 127.5) * 0.0078125))
            prob = torch.cat([p for p, _ in parts]) if len(parts) > 1 else parts[0][0]
            reg = torch.cat([r for _, r in parts]) if len(parts) > 1 else parts[0][1]
            img, yy, xx = (prob >= t1).nonzero(as_tuple=True)
            if len(img) == 0:
                continue
            cell = torch.stack([xx, yy], dim=1).to(reg.dtype)
            q1 = ((2 * cell + 1) / scale).floor()
            q2 = ((2 * cell + 12) / scale).floor()
            boxes = torch.cat([q1, q2], dim=1)
            scores = prob[img, yy, xx]
            keep = batched_nms(boxes, scores, img, 0.5)
            found.append((boxes[keep], scores[keep], reg[img, :, yy, xx][keep], img[keep]))
        if not found:
            return [FaceDetections.empty() for _ in range(batch)]
        boxes, scores, reg, img = (torch.cat(parts) for parts in zip(*found, strict=True))
        keep = batched_nms(boxes, scores, img, 0.7)
        boxes = _square(_regress(boxes[keep], reg[keep], plus_one=False))
        img = img[keep]

        # Stage 2: R-Net on every candidate of every frame.
        crops, ok = _crops(integral, img, boxes, 24)
        boxes, img = boxes[ok], img[ok]
        prob, reg = self._run(self.rnet, crops)[:2]
        keep = prob > t2
        boxes, scores, reg, img = boxes[keep], prob[keep], reg[keep], img[keep]
        keep = batched_nms(boxes, scores, img, 0.7)
        boxes = _square(_regress(boxes[keep], reg[keep], plus_one=True))
        img = img[keep]

        # Stage 3: O-Net: final score, box and landmarks.
        crops, ok = _crops(integral, img, boxes, 48)
        boxes, img = boxes[ok], img[ok]
        prob, reg, pts = self._run(self.onet, crops)
        keep = prob > t3
        boxes, scores, reg, pts, img = boxes[keep], prob[keep], reg[keep], pts[keep], img[keep]
        w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points = torch.stack([w * pts[:, :5] + boxes[:, :1] - 1, h * pts[:, 5:] + boxes[:, 1:2] - 1], dim=2)
        boxes = _regress(boxes, reg, plus_one=True)

        out = []
        for b in range(batch):
            sel = (img == b).nonzero(as_tuple=True)[0]
            if len(sel) == 0:
                out.append(FaceDetections.empty())
                continue
            sel = sel[_nms_min(boxes[sel], scores[sel], 0.7)]
            sel = sel[torch.argsort(scores[sel], descending=True, stable=True)]
            out.append(FaceDetections(boxes[sel].cpu().numpy().astype(np.float32),
                                      scores[sel].cpu().numpy().astype(np.float32),
                                      points[sel].cpu().numpy().astype(np.float32)))
        return out

    def _run(self, net: nn.Module, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(crops) == 0:
            width = 3 if isinstance(net, ONet) else 2
            shapes = [(0,), (0, 4), (0, 10)][:width]
            return tuple(torch.zeros(s, device=crops.device) for s in shapes)
        step = self.chunks["onet" if isinstance(net, ONet) else "rnet"]
        if self.cpu:
            crops = crops.contiguous(memory_format=torch.channels_last)
        outs = [net(crops[i:i + step]) for i in range(0, len(crops), step)]
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
