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
5. Issue 21: the Mamba trunk's epoch (defaults: d = 128, 2 blocks, chunked parallel scan) beside the LSTM's in
   the same run (item 1's worker), and attention fusion of two 512-d caches beside late fusion, one epoch
   each over 1,682,057 fused frames (an LSTM(256) trunk, bf16, two threads; the second cache lacks 10% of
   the frames). Then Mamba compiled for training (`train-head --compile`), with its compiling reported
   apart: once from an empty inductor cache, once from the cache that run filled.
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


def trunk_epochs(scale: float, precision: str = "bf16") -> dict[str, Any]:
    """One epoch per trunk, two threads, through benchmarks/heads.py's measurement worker; then Mamba
    compiled for training (``train-head --compile``) twice with one new inductor cache: the first run
    compiles from nothing (what a first run pays), the second reads the cache (what later runs pay)."""
    out = {}
    runs = [(kind, kind, [], None) for kind in ("lstm", "transformer", "tcn", "mamba")]
    cache = tempfile.mkdtemp(prefix="abawfeat-inductor-")
    runs += [("mamba-compiled-cold", "mamba", ["compile"], cache),
             ("mamba-compiled", "mamba", ["compile"], cache)]
    for key, kind, extra, inductor_cache in runs:
        cmd = [sys.executable, str(HERE / "heads.py"), "--scale", str(scale), "--worker", kind, precision,
               "1", "2", *extra]
        env = dict(os.environ)
        if inductor_cache is not None:
            env["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
        print("  $", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        res = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE, env=env)
        out[key] = json.loads(res.stdout.strip().splitlines()[-1])
        print("   ", out[key]["epoch_seconds"], out[key].get("first_epoch_seconds", ""), file=sys.stderr,
              flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def fusion_worker(fusion: str, scale: float, fraction: int, threads: int,
                  precision: str = "bf16") -> dict[str, Any]:
    """One epoch (1/fraction of it, scaled up) of a fused LSTM(256) head on two synthetic 512-d caches."""
    import torch

    from abawfeat.utils.allocator import keep_heap

    keep_heap()  # as the CLI does

    torch.set_num_threads(threads)
    from heads import N_VIDEOS, sequence_set  # benchmarks/heads.py

    from abawfeat.data.sequences import make_windows
    from abawfeat.heads import build_head
    from abawfeat.train import DEFAULT_BATCH, Evaluation, WindowSource, build_objective, run_epochs

    n = int(1_682_057 * scale)
    rng = np.random.default_rng(0)
    feats = np.empty((n, 2 * 512 + 2), dtype=np.float16)
    w = rng.normal(size=(1024, 2)).astype(np.float32) / 32.0
    va = np.empty((n, 2), dtype=np.float32)
    for lo in range(0, n, 16384):
        block = rng.standard_normal((min(16384, n - lo), 1024), dtype=np.float32)
        feats[lo : lo + len(block), :1024] = block
        va[lo : lo + len(block)] = np.tanh(block @ w)
    feats[:, 1024] = 1
    feats[:, 1025] = rng.random(n) > 0.1  # the second cache lacks 10% of the frames
    feats[feats[:, 1025] == 0, 512:1024] = 0
    videos = max(int(N_VIDEOS * scale), 2)
    cuts = np.sort(rng.choice(np.arange(1, n), size=videos - 1, replace=False))
    offsets = np.concatenate([[0], cuts, [n]]).astype(np.int64)
    data = sequence_set(feats, offsets, {"va": va})
    data.groups = (512, 512)
    torch.manual_seed(0)
    head = build_head("tasks", in_dim=1026, tasks=("va",), trunk="lstm", trunk_config={"hidden": 256},
                      groups=(512, 512), fusion=fusion)
    windows = make_windows(offsets, 64, 64)
    source = WindowSource(data, windows[: max(len(windows) // fraction, 1)], ("va",), DEFAULT_BATCH[True],
                          shuffle=True, seed=0)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    objective = build_objective("ccc", head, ("va",))
    history = run_epochs(head, source, lambda m: Evaluation({"x": 0.0}, 0.0, {}), objective, optimizer,
                         epochs=1, select="x", device=torch.device("cpu"), precision=precision, grad_clip=1.0)
    return {"fusion": fusion, "frames": n, "fraction_measured": 1 / fraction,
            "epoch_seconds": history[0]["seconds"] * fraction, "threads": torch.get_num_threads()}


def fusion_epochs(scale: float, fraction: int, precision: str = "bf16") -> dict[str, Any]:
    """Late and attention fusion, each in a fresh process (the features are 3.4 GB at full size)."""
    out = {}
    for fusion in ("late", "attention"):
        cmd = [sys.executable, str(HERE / "beyond.py"), "--scale", str(scale), "--precision", precision,
               "--fusion-worker", fusion, str(fraction)]
        print("  $", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        res = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE)
        out[fusion] = json.loads(res.stdout.strip().splitlines()[-1])
        print("   ", out[fusion]["epoch_seconds"], file=sys.stderr, flush=True)
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
    fu = m["fusion"]
    compiled = (t["mamba-compiled-cold"]["epoch_seconds"] + t["mamba-compiled"]["epoch_seconds"]) / 2
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
        f"| Transformer (2 layers, d 256, 4 heads, 64-frame windows), one epoch, {m['precision']}, "
        "two threads | "
        f"{t['transformer']['epoch_seconds']:.1f} s | LSTM(256): {t['lstm']['epoch_seconds']:.1f} s | "
        f"{t['transformer']['epoch_seconds'] / t['lstm']['epoch_seconds']:.2f}x | <= 60 s |",
        f"| TCN (receptive field 125 frames), one epoch, {m['precision']}, two threads | "
        f"{t['tcn']['epoch_seconds']:.1f} s | LSTM(256): {t['lstm']['epoch_seconds']:.1f} s | "
        f"{t['tcn']['epoch_seconds'] / t['lstm']['epoch_seconds']:.2f}x | <= 30 s |",
        f"| Mamba (d 128, 2 blocks, state 16, chunked scan), one epoch, {m['precision']}, two threads | "
        f"{t['mamba']['epoch_seconds']:.1f} s | LSTM(256): {t['lstm']['epoch_seconds']:.1f} s | "
        f"{t['mamba']['epoch_seconds'] / t['lstm']['epoch_seconds']:.2f}x | <= 1x the LSTM |",
        f"| Mamba, `--compile`, one epoch once compiled (mean of two runs' second epochs; their first "
        f"epochs, compiling included: {t['mamba-compiled-cold']['first_epoch_seconds']:.1f} s with an empty "
        f"inductor cache, {t['mamba-compiled']['first_epoch_seconds']:.1f} s from the cache it filled), "
        f"{m['precision']}, two threads | {compiled:.1f} s | LSTM(256): {t['lstm']['epoch_seconds']:.1f} s | "
        f"{compiled / t['lstm']['epoch_seconds']:.2f}x | <= 1x the LSTM |",
        f"| Attention fusion of two 512-d caches, LSTM(256), one epoch over {fu['late']['frames']:,} frames, "
        f"{m['precision']}, two threads ({fu['late']['fraction_measured']:.2g} of it measured) | "
        f"{fu['attention']['epoch_seconds']:.1f} s | late fusion: {fu['late']['epoch_seconds']:.1f} s | "
        f"{fu['attention']['epoch_seconds'] / fu['late']['epoch_seconds']:.2f}x | <= 1.5x late fusion |",
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
    parser.add_argument("--fusion-fraction", type=int, default=4,
                        help="Measure 1/N of the fusion epochs and scale up (1 = whole epochs).")
    parser.add_argument("--precision", default="bf16",
                        help="Trunk and fusion epochs: bf16 (the default, what train-head picks), or fp32 on "
                        "a CPU without bf16 kernels.")
    parser.add_argument("--fusion-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fusion_worker:
        print(json.dumps(fusion_worker(args.fusion_worker[0], args.scale, int(args.fusion_worker[1]), 2,
                                       args.precision)))
        return
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs", file=sys.stderr)
    m: dict[str, Any] = {"load_start": os.getloadavg()[0]}
    m["precision"] = args.precision
    m["trunks"] = trunk_epochs(args.scale, args.precision)
    m["fusion"] = fusion_epochs(args.scale, args.fusion_fraction, args.precision)
    m["smoothing"] = smoothing(args.scale)
    tmp = Path(tempfile.mkdtemp(prefix="abawfeat-bench-beyond-", dir=args.tmp))
    try:
        m["cv_fusion"] = cv_and_fusion(tmp, args.scale, args.epochs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m["load_end"] = os.getloadavg()[0]
    command = "python benchmarks/beyond.py" + (f" --scale {args.scale}" if args.scale != 1 else "") + (
        f" --precision {args.precision}" if args.precision != "bf16" else "")
    text = render(m, command)
    print(json.dumps(m, indent=1), file=sys.stderr)
    print(text)
    if not args.no_write and args.scale == 1.0:
        write_section("beyond", text)
        print(f"wrote the beyond section of {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
