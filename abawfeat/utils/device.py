"""Device, precision and seeding. Code is written for CUDA (autocast, pinned memory, non-blocking copies)
and tested on CPU; everything that differs between the two lives here."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from abawfeat.errors import ConfigError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is a clear error."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]")
    return torch.device(name)


def autocast_dtype(precision: str) -> torch.dtype | None:
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA device that supports it, or a CPU whose oneDNN
    build has bf16 kernels (AVX-512 BF16 or AMX). Elsewhere bf16 is emulated, slower than fp32, and some
    oneDNN primitives (the LSTM among them) have no bf16 kernel at all, so ``auto`` precision stays fp32."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN, or one that renamed the probe
        return False


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision where asked for. fp16 on CPU is refused (slow and lossy there); bf16 works on both."""
    import torch

    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("--precision fp16 needs CUDA; on CPU use bf16 or fp32")
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """Run a block on ``threads`` torch intra-op threads (0: this process's setting, OMP_NUM_THREADS or the
    cores), restoring the previous count after it; yields the count in use. The count is configuration: the
    order of float sums depends on it (docs/training.md, "Threads")."""
    import torch

    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that the same seed gives the same numbers on CPU."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to the device; on CUDA through pinned host memory, so the copy is asynchronous (an unpinned
    source is pinned first: a non-blocking copy from pageable memory silently waits for the GPU)."""
    if device.type == "cuda":
        if tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor


class HostCopy:
    """A device tensor on its way to host memory: on CUDA an asynchronous copy into pinned memory, with an
    event that ``numpy()`` waits for, so the GPU computes the next batch while this one is copied and
    written; on CPU the tensor itself. Either way ``numpy()`` gives the same float32 array."""

    def __init__(self, tensor: torch.Tensor) -> None:
        import torch

        self.event: torch.cuda.Event | None = None
        if tensor.device.type == "cuda":
            host = torch.empty(tensor.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            self.tensor = host
        else:
            self.tensor = tensor.float()

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.tensor.numpy()
