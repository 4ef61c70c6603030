"""What a training or inference step sees (``Batch``) and where batches come from (``WindowSource``).

A ``Batch`` is the same whether its inputs are cached features (stage two) or decoded frames (fine-tuning,
``abawfeat.data.frames``), so one training loop and one inference path serve both.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from abawfeat.tasks import single

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from abawfeat.data.sequences import SequenceSet


@dataclass
class Batch:
    """What one step sees. ``inputs`` [B, T, ...] (features, or frames when fine-tuning), ``mask`` [B, T]
    real frames (padding only at the end), per task ``targets`` and ``valid`` [B, T] (labelled frames), and
    ``rows`` int64 [B, T], the row index of each position (-1 = padding) so outputs can be put back."""

    inputs: Tensor
    mask: Tensor
    targets: dict[str, Tensor]
    valid: dict[str, Tensor]
    rows: np.ndarray

    def to(self, device: torch.device) -> Batch:
        from abawfeat.utils.device import to_device

        return Batch(
            inputs=to_device(self.inputs, device), mask=to_device(self.mask, device),
            targets={k: to_device(v, device) for k, v in self.targets.items()},
            valid={k: to_device(v, device) for k, v in self.valid.items()}, rows=self.rows,
        )


class BatchSource(Protocol):
    """Anything the training loop can train on: ``batches(epoch)`` yields the epoch's batches."""

    def __len__(self) -> int: ...

    def batches(self, epoch: int) -> Iterator[Batch]: ...


class WindowSource:
    """Batches of feature windows gathered from a ``SequenceSet``'s contiguous array.

    ``windows`` int64 [W, L] (from ``make_windows``) are the only per-epoch state: shuffling permutes their
    order with a generator seeded by (seed, epoch), so the order is reproducible and differs per epoch.
    Gathering is one NumPy fancy index per batch into the fp16 array; inputs stay fp16 (half the bytes to
    copy or send to a GPU) and become float32 inside the head.
    """

    def __init__(
        self, data: SequenceSet, windows: np.ndarray, tasks: Sequence[str], batch_size: int,
        shuffle: bool, seed: int = 0, modality_dropout: float = 0.0,
    ) -> None:
        if modality_dropout and len(data.groups) < 2:
            raise ValueError("modality dropout needs fused caches (several availability columns)")
        self.data = data
        self.modality_dropout = float(modality_dropout)
        self.windows = windows
        self.tasks = tuple(tasks)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.labels = {t: data.row_labels(t) for t in self.tasks}

    def __len__(self) -> int:
        return math.ceil(len(self.windows) / self.batch_size)

    def batches(self, epoch: int = 0) -> Iterator[Batch]:
        order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.windows)) if self.shuffle
                 else np.arange(len(self.windows)))
        # Its own stream, so that turning modality dropout on leaves the window order as it was.
        drops = np.random.default_rng([self.seed, epoch, 1]) if self.modality_dropout else None
        for start in range(0, len(order), self.batch_size):
            # Sorted within the batch: the batch is the same set (losses do not depend on its order), but
            # rows are read in address order, which is markedly faster from a 1.7 GB array.
            idx = self.windows[np.sort(order[start : start + self.batch_size])]
            batch = self.gather(idx)
            if drops is not None:
                self.drop_modalities(batch, drops)
            yield batch

    def drop_modalities(self, batch: Batch, rng: np.random.Generator) -> None:
        """Modality dropout: each cache of each window is dropped with probability ``modality_dropout``
        (its availability column set to 0 over the whole window, so the head zeroes its features and
        attention and gates ignore it), never every cache the window has: when the draw would drop them
        all, one of them, drawn at random, is kept."""
        import torch

        n_feat = sum(self.data.groups)
        avail = batch.inputs[..., n_feat:]  # [B, T, C] view of the fp16 inputs
        has = (avail > 0.5).any(dim=1).numpy()  # [B, C]: the window has the cache somewhere
        drop = rng.random(has.shape) < self.modality_dropout
        for w in np.flatnonzero((has & ~drop).sum(axis=1) == 0):
            present = np.flatnonzero(has[w])
            if present.size:
                drop[w, rng.choice(present)] = False
        if drop.any():
            keep = torch.from_numpy(~drop).to(avail.dtype)[:, None, :]
            avail.mul_(keep)  # the gathered copy, never the packed split

    def gather(self, idx: np.ndarray) -> Batch:
        import torch

        real = idx >= 0
        safe = np.where(real, idx, 0)
        # Still in the cache's dtype (fp16): the head converts while standardising, in one pass.
        inputs = torch.from_numpy(self.data.features[safe])
        mask = torch.from_numpy(real)
        targets, valid = {}, {}
        for t in self.tasks:
            lab, ok = self.labels[t]
            target = lab[safe]
            # Class indices stay integers (cross-entropy wants them); everything else becomes float32.
            integer = np.issubdtype(single(t).label_dtype, np.integer) and single(t).label_shape == ()
            targets[t] = torch.from_numpy(target if integer else target.astype(np.float32))
            valid[t] = torch.from_numpy(ok[safe] & real)
        return Batch(inputs=inputs, mask=mask, targets=targets, valid=valid, rows=idx)


__all__ = ["Batch", "BatchSource", "WindowSource"]
