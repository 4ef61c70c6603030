"""Face alignment: the similarity transform (rotation, uniform scale, translation; no reflection) that best
maps a face's five landmarks onto the standard five-point template, in the least-squares sense (Umeyama,
1991), and the warp of the frame through it.

The template is the one of the ArcFace / InsightFace 112 x 112 crops (left eye, right eye, nose tip, left and
right mouth corner, as seen in the image). ``--size`` scales it to another crop size, ``--margin`` adds that
fraction of the face's extent as context on each side, and each entry of ``--scales`` zooms out by that
factor (1.25: the same face centre, 25 % more context), one crop tree per scale.

Coordinates are pixel indices with pixel centres at integers (OpenCV's convention), for the landmarks and for
the output crop alike.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# ArcFace's five points in a 112 x 112 crop.
TEMPLATE_112 = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
], dtype=np.float64)


def template(size: int = 112, margin: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """The five template points in a ``size x size`` crop with ``margin`` context per side, zoomed out by
    ``scale``: the 112 px template shrunk about the crop centre by ``(1 + 2 * margin) * scale``."""
    shrink = (1.0 + 2.0 * margin) * scale
    centre = (112 - 1) / 2.0
    return (TEMPLATE_112 - centre) * (size / 112.0) / shrink + (size - 1) / 2.0


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 matrix ``[s R | t]`` minimising ``sum |s R src_i + t - dst_i|^2`` with R a rotation
    (determinant +1: a mirrored face is never produced)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / len(src)
    u, sing, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    var_s = (sc**2).sum() / len(src)
    s = float((sing * d).sum() / var_s) if var_s > 0 else 1.0
    t = mu_d - s * rot @ mu_s
    return np.hstack([s * rot, t[:, None]])


def warp(frames: torch.Tensor, which: torch.Tensor, matrices: torch.Tensor, size: int) -> torch.Tensor:
    """Crops ``[n, C, size, size]``: crop i is frame ``which[i]`` of ``frames`` ``[B, C, H, W]`` (float) seen
    through ``matrices[i]`` (2 x 3, frame -> crop), sampled bilinearly; outside the frame is black."""
    n = len(which)
    if n == 0:
        return frames.new_zeros(0, frames.shape[1], size, size)
    height, width = frames.shape[2], frames.shape[3]
    m = matrices.to(torch.float64)
    a, t = m[:, :, :2], m[:, :, 2]
    inv = torch.linalg.inv(a)  # crop -> frame
    coords = torch.arange(size, dtype=torch.float64, device=frames.device)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).reshape(1, -1, 2) - t[:, None, :]  # [n, size*size, 2]
    src = grid @ inv.transpose(1, 2)
    norm = torch.stack([src[..., 0] * 2 / (width - 1) - 1, src[..., 1] * 2 / (height - 1) - 1], dim=-1)
    norm = norm.reshape(n, size, size, 2).to(frames.dtype)
    return F.grid_sample(frames[which], norm, mode="bilinear", padding_mode="zeros", align_corners=True)
