"""What decides a run's floats beyond its configuration: thread count, library versions, the instruction
sets the CPU kernels dispatch to, the CUDA device and the determinism flags.

The same configuration on the same caches gives the same numbers only when these agree too: the order of a
sum over threads, oneDNN's kernels (AVX-512, BF16, AMX paths) and cuDNN's algorithms all change the last
bits, and on small data the last bits can move a run to another trajectory. Every run record carries
``float_environment()`` (``RunRecord.environment``) and ``abawfeat reproduce`` compares it with the machine
it runs on (``environment_differences``).
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# /proc/cpuinfo flags that select oneDNN / ATen kernels (and hence float results) on x86.
CPU_FLAGS: tuple[str, ...] = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8",
)
# Keys compared by reproduce, with the words a message uses for them.
SETTINGS: dict[str, str] = {
    "threads": "torch threads",
    "torch": "torch version",
    "onednn": "oneDNN version",
    "cpu_capability": "ATen CPU kernels (torch.backends.cpu.get_cpu_capability)",
    "cpu_flags": "CPU instruction sets",
    "device": "device",
    "cuda": "CUDA version",
    "cudnn": "cuDNN version",
    "deterministic_algorithms": "torch.are_deterministic_algorithms_enabled()",
    "cudnn_deterministic": "torch.backends.cudnn.deterministic",
    "cudnn_benchmark": "torch.backends.cudnn.benchmark",
    "numpy": "numpy version",
}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str] | None:
    """The ``CPU_FLAGS`` this CPU has, from the first ``flags`` line of ``cpuinfo``; None when unreadable
    (not Linux, or no flags line: ARM's ``Features`` are read the same way)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, flags=re.MULTILINE)
    if match is None:
        return None
    have = set(match.group(1).split())
    return [f for f in CPU_FLAGS if f in have]


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's model name (informative: instruction sets are what decide the kernels); None if unknown."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"^model name\s*:\s*(.*)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else None


def onednn_version(config: str | None = None) -> str | None:
    """oneDNN's version as torch was built with it (``torch.__config__.show()``), e.g. ``v3.7.1``; None
    when torch was built without it."""
    if config is None:
        import torch

        config = torch.__config__.show()
    match = re.search(r"(?:oneDNN|MKL-DNN|Intel\(R\) MKL-DNN)\s+(v[\d.]+)", config)
    return match.group(1) if match else None


def float_environment(device: Any = None) -> dict[str, Any]:
    """What, besides the configuration, decides this process's floats now. ``device``: the run's torch
    device (or its name); None = CUDA when available, else CPU."""
    import numpy as np
    import torch

    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    env: dict[str, Any] = {
        "threads": int(torch.get_num_threads()),
        "torch": str(torch.__version__),
        "onednn": onednn_version(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()),
        "cpu_capability": _cpu_capability(),
        "cpu_flags": cpu_flags(),
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "numpy": str(np.__version__),
        "device": dev.type,
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
    }
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        env.update(device=f"cuda: {torch.cuda.get_device_name(index)} (capability {major}.{minor})",
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
                   cudnn_benchmark=bool(torch.backends.cudnn.benchmark))
    return env


def _cpu_capability() -> str | None:
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # older torch
        return None


def environment_differences(recorded: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """One phrase per ``SETTINGS`` key whose recorded value differs from ``here``'s, e.g.
    ``torch threads: recorded 2, here 1``. Keys the record does not have are not compared."""
    out = []
    for key, words in SETTINGS.items():
        if key not in recorded:
            continue
        a, b = recorded.get(key), here.get(key)
        if a != b:
            out.append(f"{words}: recorded {_show(a)}, here {_show(b)}")
    return out


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return "unknown" if value is None else str(value)


__all__ = ["CPU_FLAGS", "SETTINGS", "cpu_flags", "environment_differences", "float_environment",
           "onednn_version"]
