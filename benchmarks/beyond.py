"""Issue 12's speed and memory targets at Aff-Wild2 scale, each as a ratio to a baseline of the same run.

    .venv/bin/python benchmarks/beyond.py             # measure, print, rewrite docs/performance.md (beyond)
    .venv/bin/python benchmarks/beyond.py --no-write  # measure and print only
    .venv/bin/python benchmarks/beyond.py --scale 0.02 --no-write   # a smoke test of this script

1. Temporal trunks, one epoch over 1,682,057 frames x 512 (VA train), bf16, both cores: the Transformer (2
   pre-norm layers, d = 256, 4 heads, 64-frame windows) and the TCN (5 levels of kernel 3: a receptive field
   of 125 frames), beside the LSTM(256) of the paper grid in the same run (benchmarks/heads.py's worker).
2. Smoothing tuned for AU on 454,022 validation frames (the AU validation split) in ~150 videos, beside one
   exact AU-threshold tuning pass on the same frames.
3. 5-fold cross-validation of an FC head over train+val against one FC run (`abawfeat cv` vs
   `abawfeat train-head`, same options, on a synthetic tree and cache of the release's sizes).
4. Early fusion of two 512-d caches (DDAMFN + CLIP sized): the peak memory of a `train-head` process over the
   fused feature bytes it holds (train + val rows x (512 + 512 + 2 availability columns) x 2 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from perfdoc import DOC, write_section  # benchmarks/perfdoc.py (scripts run from benchmarks/)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VAL_AU = 454_022


def trunk_epochs(scale: float) -> dict[str, Any]:
    """One epoch per trunk, two threads, through benchmarks/heads.py's measurement worker."""
    out = {}
    for kind in ("lstm", "transformer", "tcn"):
        cmd = [sys.executable, str(HERE / "heads.py"), "--scale", str(scale), "--worker", kind, "bf16", "1",
               "2"]
        print("  $", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        res = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
        print("   ", out[kind]["epoch_seconds"], file=sys.stderr, flush=True)
    return out


def smoothing(scale: float) -> dict[str, Any]:
    """Tuning the smoothing of 12 AUs against one exact threshold search, on the same synthetic frames."""
    from abawfeat import metrics
    from abawfeat.smoothing import tune

    rng = np.random.default_rng(0)
    n = max(int(VAL_AU * scale), 2000)
    offsets = np.linspace(0, n, 151).astype(np.int64)
    # AU events of ~30 frames; probabilities that follow them with frame-level noise.
    labels = np.zeros((n, 12), dtype=np.int8)
    for j in range(12):
        starts = rng.choice(n, size=n // 150, replace=False)
        for s in starts:
            labels[s : s + int(rng.integers(15, 90)), j] = 1
    prob = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.25, labels.shape), 0, 1).astype(np.float32)
    valid = np.ones(n, bool)
    t0 = time.perf_counter()
    metrics.tune_au_thresholds(prob, labels, valid=valid)
    exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = tune(offsets, {"au": prob}, {"au": labels}, {"au": valid})
    seconds = time.perf_counter() - t0
    return {"frames": n, "videos": 150, "tune_seconds": seconds, "exact_threshold_seconds": exact,
            "chosen": [f.as_dict() for f in s.filters["au"]]}


# Runs a command and prints the peak resident memory of that command alone: ru_maxrss of RUSAGE_CHILDREN is
# the largest of all children so far, so each measured command gets a fresh parent of its own.
_PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a command run as a child process."""
    print("  $", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _PEAK, *cmd], check=True, cwd=cwd, capture_output=True,
                         text=True, env={**os.environ, "ABAWFEAT_NO_PROGRESS": "1"})
    wall = time.perf_counter() - t0
    return wall, int(res.stdout.strip().splitlines()[-1]) / 1024


def cv_and_fusion(tmp: Path, scale: float, epochs: int) -> dict[str, Any]:
    from grid import NAME, assign, video_pool, write_cache, write_tree  # benchmarks/grid.py

    abawfeat = str(Path(sys.executable).with_name("abawfeat"))
    rng = np.random.default_rng(0)
    lengths = video_pool(rng, scale)
    plan = assign(lengths, rng, scale)
    root = tmp / NAME
    write_tree(root, lengths, plan, rng, scale)
    caches = {b: tmp / f"{b}.h5" for b in ("ddamfn", "clip")}
    for k, (b, path) in enumerate(caches.items()):
        write_cache(path, b, lengths, seed=k + 1)
    common = ["--task", "va", "--head", "fc", "--data", str(root), "--epochs", str(epochs), "--no-plots"]
    one, one_peak = _timed([abawfeat, "train-head", *common, "--cache", str(caches["ddamfn"]), "--out",
                            str(tmp / "one")], tmp)
    five, _ = _timed([abawfeat, "cv", "--folds", "5", *common, "--cache", str(caches["ddamfn"]), "--out",
                      str(tmp / "cv")], tmp)
    fused, fused_peak = _timed([abawfeat, "train-head", *common, "--cache", str(caches["ddamfn"]), "--cache",
                                str(caches["clip"]), "--out", str(tmp / "fused")], tmp)
    _, base_peak = _timed([sys.executable, "-c", "import abawfeat.train, abawfeat.cache, torch, h5py"], tmp)
    from abawfeat.data import AffWild2
    from abawfeat.data.sequences import split_videos

    data = AffWild2(root)
    rows = sum(int(lengths[int(v[1:])]) for s in ("train", "val") for v in split_videos(data, ("va",), s))
    fused_bytes = rows * (512 + 512 + 2) * 2
    return {"one_fc_seconds": one, "cv5_seconds": five, "fused_seconds": fused, "epochs": epochs,
            "one_fc_peak_mb": one_peak, "fused_peak_mb": fused_peak, "interpreter_peak_mb": base_peak,
            "fused_feature_mb": fused_bytes / 2**20, "rows": rows, "crops": int(lengths.sum())}


def render(m: dict[str, Any], command: str) -> str:
    import torch

    t = m["trunks"]
    sm = m["smoothing"]
    cf = m["cv_fusion"]
    fused_ratio = (cf["fused_peak_mb"] - cf["interpreter_peak_mb"]) / cf["fused_feature_mb"]
    return "\n".join([
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}); 1-minute load average {m['load_start']:.1f} before, "
        f"{m['load_end']:.1f} after.",
        "",
        "| measurement | value | baseline in the same run | ratio | target |",
        "|---|---:|---|---:|---|",
        f"| Transformer (2 layers, d 256, 4 heads, 64-frame windows), one epoch, bf16, two threads | "
        f"{t['transformer']['epoch_seconds']:.1f} s | LSTM(256): {t['lstm']['epoch_seconds']:.1f} s | "
        f"{t['transformer']['epoch_seconds'] / t['lstm']['epoch_seconds']:.2f}x | <= 60 s |",
        f"| TCN (receptive field 125 frames), one epoch, bf16, two threads | "
        f"{t['tcn']['epoch_seconds']:.1f} s | LSTM(256): {t['lstm']['epoch_seconds']:.1f} s | "
        f"{t['tcn']['epoch_seconds'] / t['lstm']['epoch_seconds']:.2f}x | <= 30 s |",
        f"| Smoothing tuned for 12 AUs on {sm['frames']:,} frames ({sm['videos']} videos) | "
        f"{sm['tune_seconds']:.1f} s | one exact AU-threshold search: {sm['exact_threshold_seconds']:.2f} s "
        "| "
        f"{sm['tune_seconds'] / sm['exact_threshold_seconds']:.1f}x | <= 10 s |",
        f"| `abawfeat cv --folds 5`, FC, {cf['epochs']} epochs | {cf['cv5_seconds']:.0f} s | one FC run "
        f"(`train-head`): {cf['one_fc_seconds']:.0f} s | {cf['cv5_seconds'] / cf['one_fc_seconds']:.2f}x | "
        "<= 5.5x |",
        f"| Early fusion DDAMFN+CLIP, `train-head` peak memory above the interpreter's | "
        f"{(cf['fused_peak_mb'] - cf['interpreter_peak_mb']) / 1024:.2f} GB | fused features "
        f"{cf['fused_feature_mb'] / 1024:.2f} GB ({cf['rows']:,} rows x 1,026 x 2 bytes) | "
        f"{fused_ratio:.2f}x | <= 1.5x |",
        "",
        f"Data: synthetic features; the trunk epochs on benchmarks/heads.py's 1,682,057 x 512 in-memory set; "
        f"cv and fusion on benchmarks/grid.py's synthetic tree and caches ({cf['crops']:,} crops). The "
        "interpreter with abawfeat, torch and h5py imported peaks at "
        f"{cf['interpreter_peak_mb']:.0f} MB; one FC run on one cache peaked at "
        f"{cf['one_fc_peak_mb'] / 1024:.2f} GB.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="Fraction of the full size (smoke tests).")
    parser.add_argument("--epochs", type=int, default=3, help="Epochs of the FC runs compared with cv.")
    parser.add_argument("--no-write", action="store_true", help="Do not rewrite docs/performance.md.")
    parser.add_argument("--tmp", type=Path, default=None, help="Parent folder of the data (~7 GB).")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs", file=sys.stderr)
    m: dict[str, Any] = {"load_start": os.getloadavg()[0]}
    m["trunks"] = trunk_epochs(args.scale)
    m["smoothing"] = smoothing(args.scale)
    tmp = Path(tempfile.mkdtemp(prefix="abawfeat-bench-beyond-", dir=args.tmp))
    try:
        m["cv_fusion"] = cv_and_fusion(tmp, args.scale, args.epochs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m["load_end"] = os.getloadavg()[0]
    command = "python benchmarks/beyond.py" + (f" --scale {args.scale}" if args.scale != 1 else "")
    text = render(m, command)
    print(json.dumps(m, indent=1), file=sys.stderr)
    print(text)
    if not args.no_write and args.scale == 1.0:
        write_section("beyond", text)
        print(f"wrote the beyond section of {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
