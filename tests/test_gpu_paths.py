"""The CUDA-only parts of stage one, as far as a CPU can check them: the compile mode each device gets, the
host copy that keeps one batch in flight, and benchmarks/gpu.py's own code path (its smoke run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from abawfeat import extract
from abawfeat.utils.compiling import CompiledWithFallback
from abawfeat.utils.device import HostCopy

ROOT = Path(__file__).resolve().parents[1]


def test_compiled_extraction_uses_max_autotune_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw["mode"]) or model)
    for device in ("cuda", "cuda:1", "cpu"):
        CompiledWithFallback(torch.nn.Identity(), doing="extracting", skip="--no-compile",
                             mode=extract.compile_mode(torch.device(device)))
    assert seen == ["max-autotune", "max-autotune", None]


def test_host_copy_gives_float32_of_the_values() -> None:
    x = torch.tensor([[1.5, -2.25], [3.0, 0.125]], dtype=torch.bfloat16)
    got = HostCopy(x[:1]).numpy()
    assert got.dtype == np.float32 and got.tolist() == [[1.5, -2.25]]


def test_gpu_benchmark_smoke_run_on_cpu() -> None:
    cmd = [sys.executable, "gpu.py", "--device", "cpu", "--videos", "3", "--frames", "12", "--backbones",
           "ddamfn", "--no-compile", "--rounds", "1", "--workers", "0", "--batch-size", "8",
           "--precision", "fp32"]
    proc = subprocess.run(cmd, cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in proc.stdout.splitlines()
            if line.startswith("| ") and "configuration" not in line}
    assert set(rows) == {"baseline ddamfn fp32 eager", "ours ddamfn fp32 eager"}
    # The same network in fp32 on the same frames: the extraction agrees with the CPU reference (float32
    # cache on both sides; only batch composition differs).
    assert float(rows["ours ddamfn fp32 eager"][-1]) < 1e-4
    assert "smoke run, not a measurement" in proc.stdout


def test_gpu_benchmark_without_cuda_measures_nothing_in_one_line() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, "gpu.py"], cwd=ROOT / "benchmarks", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "no CUDA device" in proc.stderr
