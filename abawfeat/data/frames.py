"""Face crops as training data for end-to-end fine-tuning (``abawfeat finetune``).

Stage two trains on a ``SequenceSet`` whose rows are cached features. Fine-tuning builds the very same
``SequenceSet`` (same videos, rows = crops, same timeline, same labels, same multi-task split rules) from
the crop folders instead of a cache (``load_frames_split``), and the very same index windows
(``sequences.make_windows``); only the inputs differ: a ``Batch`` here carries decoded, normalised (and,
in training, augmented) images [B, T, 3, S, S] where stage two carries features [B, T, D].

Determinism is the design constraint. Everything random here (the order of windows, the augmentation of
each window) is a pure function of ``(seed, epoch, window)``, never of a global random state, of the number
of DataLoader workers, or of the number of processes. That is what lets an interrupted run resume to the
very same weights, and a run on two processes see the same global batches as a run on one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from abawfeat.data.sequences import SequenceSet, load_split, split_videos
from abawfeat.errors import ConfigError, DataError

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "BrokenBatch",
    "CropListing",
    "FrameSource",
    "FrameWindows",
    "apply_augment",
    "check_batch",
    "collate_batch",
    "draw_augment",
    "epoch_steps",
    "load_frames_split",
    "sample_seed",
]


# --------------------------------------------------------------------------------------------------------
# augmentation


@dataclass
class AugmentConfig:
    """The usual face augmentations, applied to training windows only (never at evaluation)."""

    enabled: bool = True  # master switch; off trains on exactly the preprocessing the cache uses
    hflip: float = 0.5  # probability of a horizontal flip (faces are near-symmetric; AU labels bilateral)
    brightness: float = 0.2  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2  # factor drawn from [1 - c, 1 + c]
    saturation: float = 0.2  # factor drawn from [1 - s, 1 + s]
    hue: float = 0.02  # shift drawn from [-h, h] of the hue circle; small: skin tone carries signal
    degrees: float = 10.0  # rotation drawn from [-d, d]; crops are already aligned, so only small tilts
    translate: float = 0.05  # shift drawn from [-t, t] x crop size, per axis
    scale: tuple[float, float] = (0.95, 1.05)  # zoom range; aligned crops frame the face tightly already

    def validate(self) -> None:
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError(f"augmentation: hflip is a probability in [0, 1], got {self.hflip}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"augmentation: {name} must be in [0, 1), got {value}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"augmentation: hue must be in [0, 0.5], got {self.hue}")
        if not 0.0 <= self.degrees <= 180.0:
            raise ConfigError(f"augmentation: degrees must be in [0, 180], got {self.degrees}")
        if not 0.0 <= self.translate < 0.5:
            raise ConfigError(f"augmentation: translate must be in [0, 0.5), got {self.translate}")
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(f"augmentation: scale must be (low, high), 0 < low <= high, got {self.scale}")


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the augmentation. A window shares one draw, so the face does not jump between frames
    (a temporal head would otherwise learn from jitter that real videos do not have)."""

    flip: bool = False
    angle: float = 0.0
    translate: tuple[int, int] = (0, 0)  # pixels
    scale: float = 1.0
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self == AugmentParams()


def sample_seed(seed: int, epoch: int, window: int) -> int:
    """A 62-bit seed for one window in one epoch: the only source of augmentation randomness."""
    a, b = np.random.SeedSequence([int(seed), int(epoch), int(window)]).generate_state(2, np.uint32)
    return (int(a) << 30) ^ int(b)


def draw_augment(cfg: AugmentConfig, seed: int, size: int) -> AugmentParams:
    """The parameters for one window, from its seed alone (same seed -> same augmentation anywhere)."""
    if not cfg.enabled:
        return AugmentParams()
    u = np.random.default_rng(seed).random(9)  # always nine draws: changing one range never shifts others

    def between(x: float, lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * x)

    shift = cfg.translate * size
    return AugmentParams(
        flip=bool(u[0] < cfg.hflip),
        angle=between(u[1], -cfg.degrees, cfg.degrees),
        translate=(round(between(u[2], -shift, shift)), round(between(u[3], -shift, shift))),
        scale=between(u[4], cfg.scale[0], cfg.scale[1]),
        brightness=between(u[5], 1 - cfg.brightness, 1 + cfg.brightness),
        contrast=between(u[6], 1 - cfg.contrast, 1 + cfg.contrast),
        saturation=between(u[7], 1 - cfg.saturation, 1 + cfg.saturation),
        hue=between(u[8], -cfg.hue, cfg.hue),
    )


def apply_augment(pixels: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> uint8 of the same shape: affine, flip, then colour (torchvision's maths)."""
    if params.is_identity:
        return pixels
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    out = pixels
    if params.angle != 0.0 or params.translate != (0, 0) or params.scale != 1.0:
        out = TF.affine(out, angle=params.angle, translate=list(params.translate), scale=params.scale,
                        shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR, fill=0)
    if params.flip:
        out = TF.horizontal_flip(out)
    if params.brightness != 1.0:
        out = TF.adjust_brightness(out, params.brightness)
    if params.contrast != 1.0:
        out = TF.adjust_contrast(out, params.contrast)
    if params.saturation != 1.0:
        out = TF.adjust_saturation(out, params.saturation)
    if params.hue != 0.0:
        out = TF.adjust_hue(out, params.hue)
    return out


# --------------------------------------------------------------------------------------------------------
# the split, with rows = crops


class CropListing:
    """The crop folders seen through the part of the ``FeatureCache`` interface that ``load_split`` reads,
    with zero-width features: every crop is a row, exactly as extraction would have made it one."""

    feature_dim = 0
    dtype = np.dtype(np.float32)

    def __init__(self, data: Any) -> None:
        self.data = data
        self.path = Path(data.root)

    def __contains__(self, video: object) -> bool:
        return isinstance(video, str) and len(self.data.crop_frames(video)) > 0

    def frames(self, video: str) -> np.ndarray:
        return np.asarray(self.data.crop_frames(video), dtype=np.int32)

    def features(self, video: str, dtype: Any = None) -> np.ndarray:
        return np.zeros((len(self.data.crop_frames(video)), 0), dtype=np.float32)

    def bad_frames(self, video: str) -> np.ndarray:
        return np.zeros(0, dtype=np.int32)


def load_frames_split(data: Any, tasks: Sequence[str], split: str) -> tuple[SequenceSet, list[Path]]:
    """Stage two's ``SequenceSet`` for ``split`` with crops as rows, plus each video's crop folder.

    Stricter than the cache path in one way: an annotated video without any crop folder is an error here.
    In the cache it would mean "no face was ever found"; among raw crops it almost always means a crop
    batch (e.g. ``cropped_aligned_new_50_vids``) was not unpacked, and training or scoring without it would
    silently change the task. An existing but empty folder still means "no face" and is accepted.
    """
    for video in split_videos(data, tasks, split):
        if data.crop_dir(video) is None:
            raise DataError(data.root, f"no crop folder for {split} video {video!r} (expected "
                                       f"cropped_aligned/{video}/00001.jpg ...; is a crop batch missing?)")
    seqs = load_split(data, CropListing(data), tasks, split)
    dirs = [Path(data.crop_dir(v)) for v in seqs.videos]
    return seqs, dirs


# --------------------------------------------------------------------------------------------------------
# decoding and batching


class FrameWindows(Dataset):
    """Windows of crops -> dict of tensors, fetched by key ``(window index, augmentation seed)``.

    ``windows`` are int64 [W, L] global row indices (-1 = padding at the end), as ``make_windows`` returns.
    Seed ``-1`` means no augmentation (evaluation, statistics). The seed travels with the key rather than
    living in the dataset, so DataLoader workers, however many, never need to be told the epoch.
    """

    def __init__(self, seqs: SequenceSet, crop_dirs: Sequence[Path], windows: np.ndarray,
                 tasks: Sequence[str], transform: Any, augment: AugmentConfig | None = None) -> None:
        self.windows = np.asarray(windows, dtype=np.int64)
        if self.windows.ndim != 2:
            raise ValueError(f"windows must be [W, L], got shape {self.windows.shape}")
        self.crop_dirs = [str(d) for d in crop_dirs]
        self.row_frames = seqs.row_frames
        self.row_video = (np.searchsorted(seqs.row_offsets, np.arange(seqs.n_rows), side="right") - 1
                          ).astype(np.int32)
        self.tasks = tuple(tasks)
        self.labels = {t: seqs.row_labels(t) for t in self.tasks}
        # The encoder's ImageTransform: the resize and normalisation its weights expect.
        self.transform = transform
        self.augment = augment if augment is not None else AugmentConfig(enabled=False)

    def __len__(self) -> int:
        return len(self.windows)

    def path(self, row: int) -> Path:
        return Path(self.crop_dirs[self.row_video[row]]) / f"{int(self.row_frames[row]):05d}.jpg"

    def decode(self, row: int) -> np.ndarray:
        path = self.path(row)
        try:
            with Image.open(path) as image:
                return np.asarray(self.transform.resize(image), dtype=np.uint8)
        except FileNotFoundError:
            raise DataError(path, "crop disappeared after its folder was listed") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            # Fatal here (unlike extraction, which skips such frames): a training step cannot skip a frame
            # without changing the batch every other rank and every resumed run agreed on.
            raise DataError(path, f"cannot decode this crop ({type(exc).__name__}: {exc}); "
                                  "replace or delete it") from None

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), -1)
        rows = self.windows[index]
        real = rows >= 0
        n = int(real.sum())
        size = self.transform.size
        pixels = np.zeros((len(rows), size, size, 3), dtype=np.uint8)
        try:
            for k in range(n):
                pixels[k] = self.decode(int(rows[k]))
        except DataError as exc:
            # Raised in a DataLoader worker, the error would come back wrapped in a multi-line traceback;
            # carried as data instead, the main process re-raises it as the one line it is.
            return {"error": (str(exc.path), exc.problem)}
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        if seed >= 0 and self.augment.enabled and n:
            # Real frames only, one draw for the whole window; padding stays zero.
            images[:n] = apply_augment(images[:n], draw_augment(self.augment, seed, size))
        mask = torch.from_numpy(real)
        item: dict[str, Any] = {
            "images": self.transform.normalize(images) * mask.view(-1, 1, 1, 1).to(torch.float32),
            "mask": mask,
            "rows": rows,
        }
        safe = np.where(real, rows, 0)
        for t in self.tasks:
            lab, ok = self.labels[t]
            target = lab[safe]
            item[f"{t}_target"] = torch.from_numpy(target.astype(np.float32) if t != "expr" else target)
            item[f"{t}_valid"] = torch.from_numpy(ok[safe] & real)
        return item


def collate_batch(items: Sequence[dict[str, Any]]) -> Any:
    """Samples -> stage two's ``Batch`` (inputs are images [B, L, 3, S, S]); raises the DataError of an
    undecodable crop (see ``check_batch`` for batches collated in DataLoader workers)."""
    from abawfeat.data.batches import Batch

    for it in items:
        if "error" in it:
            return BrokenBatch(*it["error"])
    tasks = [k[: -len("_target")] for k in items[0] if k.endswith("_target")]
    return Batch(
        inputs=torch.stack([it["images"] for it in items]),
        mask=torch.stack([it["mask"] for it in items]),
        targets={t: torch.stack([it[f"{t}_target"] for it in items]) for t in tasks},
        valid={t: torch.stack([it[f"{t}_valid"] for it in items]) for t in tasks},
        rows=np.stack([it["rows"] for it in items]),
    )


@dataclass(frozen=True)
class BrokenBatch:
    """A batch that could not be built: the crop that failed to decode and why."""

    path: str
    problem: str

    def raise_error(self) -> None:
        raise DataError(self.path, self.problem)


def check_batch(batch: Any) -> Any:
    """The batch itself, or the one-line DataError of the crop that broke it."""
    if isinstance(batch, BrokenBatch):
        batch.raise_error()
    return batch


# --------------------------------------------------------------------------------------------------------
# which windows go into which step, on which process


def epoch_steps(n_windows: int, *, seed: int, epoch: int, batch_size: int, grad_accum: int = 1,
                world_size: int = 1, rank: int = 0, shuffle: bool = True,
                augment: bool = True) -> list[list[list[tuple[int, int]]]]:
    """This process's share of one epoch: steps -> micro-batches -> keys ``(window, augmentation seed)``.

    One optimiser step consumes a global batch of ``batch_size * grad_accum * world_size`` windows, taken in
    order from a permutation that depends only on ``(seed, epoch)``. Rank r takes the r-th contiguous slice
    of each global batch and cuts it into ``grad_accum`` micro-batches of ``batch_size``. So the union of
    what the ranks see in a step is the same global batch whatever the world size, and one process with
    ``grad_accum = W`` sees what W processes see. The last global batch is completed by wrapping around to
    the start of the permutation (as DistributedSampler pads), so every rank runs the same number of full
    steps, which DistributedDataParallel requires.
    """
    if n_windows < 1:
        raise ConfigError("no training windows: no crop carries a valid label of the chosen task(s)")
    if batch_size < 1 or grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"bad batching: batch size {batch_size}, grad accumulation {grad_accum}, "
                          f"world size {world_size}, rank {rank}")
    order = (np.random.default_rng([int(seed), int(epoch)]).permutation(n_windows) if shuffle
             else np.arange(n_windows))
    per_rank = batch_size * grad_accum
    global_batch = per_rank * world_size
    n_steps = math.ceil(n_windows / global_batch)
    padded = np.resize(order, n_steps * global_batch)  # np.resize repeats from the start
    steps: list[list[list[tuple[int, int]]]] = []
    for s in range(n_steps):
        lo = s * global_batch + rank * per_rank
        keys = [(int(w), sample_seed(seed, epoch, int(w)) if augment else -1)
                for w in padded[lo : lo + per_rank]]
        steps.append([keys[m * batch_size : (m + 1) * batch_size] for m in range(grad_accum)])
    return steps


class FrameSource:
    """Training batches of image windows, grouped per optimiser step: ``batches(epoch)`` yields, for each
    step, this rank's list of ``grad_accum`` micro-batches (``Batch`` objects)."""

    def __init__(self, windows: FrameWindows, *, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 world_size: int = 1, rank: int = 0, workers: int = 0, pin_memory: bool = False,
                 augment: bool = True) -> None:
        self.windows = windows
        self.batch_size = int(batch_size)
        self.grad_accum = int(grad_accum)
        self.seed = int(seed)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.workers = int(workers)
        self.pin_memory = pin_memory
        self.augment = augment

    def steps(self, epoch: int) -> list[list[list[tuple[int, int]]]]:
        return epoch_steps(len(self.windows), seed=self.seed, epoch=epoch, batch_size=self.batch_size,
                           grad_accum=self.grad_accum, world_size=self.world_size, rank=self.rank,
                           augment=self.augment and self.windows.augment.enabled)

    def __len__(self) -> int:
        return math.ceil(len(self.windows) / (self.batch_size * self.grad_accum * self.world_size))

    def batches(self, epoch: int = 0) -> Iterator[list[Any]]:
        steps = self.steps(epoch)
        micro = [keys for step in steps for keys in step]
        loader = DataLoader(
            self.windows, batch_sampler=micro, num_workers=self.workers, collate_fn=collate_batch,
            pin_memory=self.pin_memory, prefetch_factor=2 if self.workers > 0 else None,
            # A generator of our own: creating the iterator must not consume the global RNG, whose state
            # (dropout) is saved with every checkpoint and restored on resume.
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),
        )
        group: list[Any] = []
        for batch in loader:
            group.append(check_batch(batch))
            if len(group) == self.grad_accum:
                yield group
                group = []
