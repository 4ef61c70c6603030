"""Stage-two speed and memory at VA-train scale, against a naive baseline measured in the same run.

    .venv/bin/python benchmarks/heads.py            # measure, print, rewrite docs/performance.md (heads)
    .venv/bin/python benchmarks/heads.py --no-write # measure and print only

Data: 1,682,057 synthetic frames x 512 fp16 features in memory (the VA training set of the 8th ABAW,
seed paper Table 2), in ~594 videos, with VA labels that depend on the features. Each measurement runs in its
own subprocess so peak memory (ru_maxrss) belongs to that measurement alone.

Single-thread runs are judged by their CPU time (on a shared machine, wall time measures the neighbours);
two-thread runs by wall time. ``--scale 0.02`` runs everything on 2% of the data (a smoke test of this
script; it never writes the doc).

- ours: ``abawfeat.train`` as ``fit`` uses it: one contiguous fp16 array, precomputed index windows
  (``make_windows``), ``WindowSource`` batches converted to float32 per batch, ``run_epochs``.
- naive: a plain ``torch.utils.data.DataLoader`` over per-frame float32 tensors (FC), or over windows stacked
  from per-frame tensors (LSTM): what a first implementation typically does. Too slow and too big to run at
  full scale, it runs on 1/8 of the frames; time and memory are scaled by 8 (both grow linearly).

From the measured throughputs the script estimates the paper grid (pipelines/paper-table3.toml: 8 runs,
10 epochs each, every epoch followed by a full validation pass) at full Aff-Wild2 scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from perfdoc import DOC, write_section  # benchmarks/perfdoc.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
N_FRAMES = 1_682_057  # VA train frames (8th ABAW)
N_VIDEOS = 594
DIM = 512
NAIVE_FRACTION = 8
VAL_FRAMES = 454_022  # the largest validation split (AU)

# Full-scale sizes (seed paper Table 2): crops per split and frames with valid labels.
SCALE = {
    "va": {"train": 1_682_057, "train_valid": 1_679_854, "val": 383_814},
    "expr": {"train": 1_110_367, "train_valid": 597_361, "val": 453_535},
    "au": {"train": 1_381_411, "train_valid": 1_359_523, "val": 454_022},
}
# pipelines/paper-table3.toml: (label, task, measurement key of its head).
PAPER_GRID = [
    ("DDAMFN+Fc", "va", "fc"), ("DDAMFN+Fc", "expr", "fc"), ("DDAMFN+Fc", "au", "fc"),
    ("DDAMFN+LSTM", "va", "lstm"), ("DDAMFN+LSTM", "expr", "lstm"), ("DDAMFN+LSTM", "au", "lstm"),
    ("CLIP+Fc", "expr", "contrastive-fc"), ("CLIP+LSTM", "expr", "contrastive-lstm"),
]


def rss_mb() -> float:
    """Current resident set size (MB) from /proc (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM), so a peak measures one phase, not data generation."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_mb() -> float:
    """Peak RSS (MB) since the last ``reset_peak`` (VmHWM; ru_maxrss where /proc is not Linux's)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(n: int, videos: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fp16 features [n, dim] written chunk by chunk (no float64 copy), video offsets, VA labels [n, 2]."""
    rng = np.random.default_rng(seed)
    feats = np.empty((n, dim), dtype=np.float16)
    w = rng.normal(size=(dim, 2)).astype(np.float32) / np.sqrt(dim)
    va = np.empty((n, 2), dtype=np.float32)
    for lo in range(0, n, 16384):
        block = rng.standard_normal((min(16384, n - lo), dim), dtype=np.float32)
        feats[lo : lo + len(block)] = block
        va[lo : lo + len(block)] = np.tanh(block @ w)
    cuts = np.sort(rng.choice(np.arange(1, n), size=videos - 1, replace=False))
    offsets = np.concatenate([[0], cuts, [n]]).astype(np.int64)
    return feats, offsets, va


def sequence_set(feats: np.ndarray, offsets: np.ndarray, labels: dict[str, np.ndarray]) -> Any:
    """A SequenceSet whose timeline is exactly its rows (every frame has a crop)."""
    from abawfeat.data.sequences import SequenceSet

    n = len(feats)
    frames = np.concatenate([np.arange(1, b - a + 1) for a, b in zip(offsets[:-1], offsets[1:], strict=True)])
    tasks = tuple(labels)
    return SequenceSet(
        split="train", tasks=tasks, videos=[f"v{i}" for i in range(len(offsets) - 1)], features=feats,
        row_offsets=offsets, row_frames=frames.astype(np.int32), tl_offsets=offsets.copy(),
        row_to_tl=np.arange(n, dtype=np.int64), labels=labels,
        valid={t: np.ones(n, dtype=bool) for t in tasks},
        task_frames={t: np.diff(offsets) for t in tasks},
    )


# ------------------------------------------------------------------------------------------------ workers


def _head(kind: str, dim: int) -> tuple[Any, str, str]:
    """(head, task, objective) of a measurement key: a trunk name, or contrastive-<trunk>."""
    import torch

    from abawfeat.heads import build_head

    torch.manual_seed(0)
    sizes = {"fc": {}, "lstm": {"hidden": 256}, "gru": {"hidden": 256},
             # The configuration: 2 pre-norm layers, d = 256, 4 heads (64-frame windows).
             "transformer": {"hidden": 256, "layers": 2, "heads": 4},
             # The trunk's defaults: 5 levels of kernel 3, a receptive field of 125 frames.
             "tcn": {},
             # The trunk's defaults: d = 128, 2 blocks, E = 256 in 4 heads, state 16, chunks of 16.
             "mamba": {}}
    if kind in sizes:
        head = build_head("tasks", in_dim=dim, tasks=("va",), trunk=kind, trunk_config=sizes[kind])
        return head, "va", "ccc"
    trunk = kind.split("-")[1]
    head = build_head("contrastive", in_dim=dim, trunk=trunk, embed_dim=dim,
                      trunk_config={"hidden": 512 if trunk == "fc" else 256})
    head.set_text_embeddings(torch.randn(8, dim))
    return head, "expr", "contrastive"


def worker_ours(
    kind: str, precision: str, fraction: int, threads: int, compiled: bool = False
) -> dict[str, Any]:
    """One training epoch (1/fraction of it) with the library's loop; then one validation-size pass.

    ``compiled``: the trunk compiled for training as ``train-head --compile`` does, and two epochs: the
    first pays the compiling (or reads inductor's cache) and is reported as ``first_epoch_seconds``, the
    second is the epoch reported."""
    import torch

    from abawfeat.utils.allocator import keep_heap

    keep_heap()  # as the CLI does (ABAWFEAT_MALLOC=default: glibc's defaults, for benchmarks/allocator.py)

    torch.set_num_threads(threads)

    from abawfeat.data.sequences import make_windows
    from abawfeat.train import (
        DEFAULT_BATCH,
        Evaluation,
        WindowSource,
        build_objective,
        evaluate_set,
        run_epochs,
    )

    base = rss_mb()
    feats, offsets, va = synthetic(N_FRAMES, N_VIDEOS, DIM)
    head, task, objective_name = _head(kind, DIM)
    labels = {"va": va} if task == "va" else {"expr": (np.abs(va[:, 0]) * 8).astype(np.int64).clip(0, 7)}
    data = sequence_set(feats, offsets, labels)
    reset_peak()  # from here on: what training needs, with the features resident
    temporal = head.is_temporal()
    window, batch = (64 if temporal else 1), DEFAULT_BATCH[temporal]  # what train-head uses by default
    t0 = time.perf_counter()
    windows = make_windows(offsets, window, window, keep=data.row_weight())
    mean, std = data.feature_stats()
    head.set_feature_stats(torch.from_numpy(mean), torch.from_numpy(std))
    setup = time.perf_counter() - t0
    source = WindowSource(data, windows[: len(windows) // fraction], (task,), batch, shuffle=True, seed=0)
    objective = build_objective(objective_name, head, (task,))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    device = torch.device("cpu")
    if compiled:
        from abawfeat.utils.compiling import compile_training_forward

        compile_training_forward(head.trunk)
    c0 = time.process_time()
    history = run_epochs(head, source, lambda m: Evaluation({"x": 0.0}, 0.0, {}), objective, optimizer,
                         epochs=2 if compiled else 1, select="x", device=device, precision=precision,
                         grad_clip=1.0)
    epoch_cpu = (time.process_time() - c0) / len(history) * fraction
    epoch = history[-1]["seconds"] * fraction
    # The first epoch at full size: its measured part (compiling included) plus the rest at the steady rate.
    first_epoch = history[0]["seconds"] + (fraction - 1) * history[-1]["seconds"]
    train_peak = peak_mb()

    # A validation pass at AU-val size (the largest val split): overlapping windows for temporal heads,
    # fill to every frame, official metrics (AU threshold tuning is the costliest scoring step).
    n_val = VAL_FRAMES
    val_offsets = offsets[offsets <= n_val].copy()
    val_offsets[-1] = n_val
    val_labels = {"va": va[:n_val]} if task == "va" else {"expr": labels["expr"][:n_val]}
    val = sequence_set(feats[:n_val], val_offsets, val_labels)
    infer_window = 64 if temporal else 256
    val_source = WindowSource(val, make_windows(val_offsets, infer_window, 32 if temporal else 256), (task,),
                              max(batch, 8192 // infer_window), shuffle=False)
    t0, c0 = time.perf_counter(), time.process_time()
    evaluate_set(head, val, task, val_source, device, precision, objective)
    val_seconds = time.perf_counter() - t0
    val_cpu = time.process_time() - c0
    return {
        "kind": kind, "precision": precision, "epoch_seconds": epoch, "epoch_cpu_seconds": epoch_cpu,
        "frames": N_FRAMES, "train_frames_per_cpu_s": N_FRAMES / epoch_cpu, "setup_seconds": setup,
        "val_seconds": val_seconds, "val_cpu_seconds": val_cpu,
        "val_frames": n_val, "feature_mb": feats.nbytes / 2**20, "train_peak_over_base_mb": train_peak - base,
        "fraction_measured": 1 / fraction, "threads": torch.get_num_threads(),
        "compiled": compiled, "first_epoch_seconds": first_epoch,
    }


def worker_naive(kind: str, threads: int) -> dict[str, Any]:
    """The baseline: per-frame float32 tensors and a DataLoader, on 1/NAIVE_FRACTION of the frames."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    torch.set_num_threads(threads)

    from abawfeat.losses import ccc_loss
    from abawfeat.train import DEFAULT_BATCH

    base = rss_mb()
    n = N_FRAMES // NAIVE_FRACTION
    feats, offsets, va = synthetic(n, max(N_VIDEOS // NAIVE_FRACTION, 2), DIM)
    frames = [torch.tensor(f, dtype=torch.float32) for f in feats]  # one tensor per frame
    labels = [torch.tensor(v) for v in va]
    del feats
    reset_peak()  # the per-frame tensors are the naive loader's data; the fp16 source array is gone
    temporal = kind == "lstm"

    class Frames(Dataset):
        def __len__(self) -> int:
            return len(frames)

        def __getitem__(self, i: int) -> tuple[Any, Any]:
            return frames[i], labels[i]

    class Windows(Dataset):
        def __init__(self) -> None:
            self.starts = [s for a, b in zip(offsets[:-1], offsets[1:], strict=True)
                           for s in range(int(a), int(b) - 64 + 1, 64)]

        def __len__(self) -> int:
            return len(self.starts)

        def __getitem__(self, i: int) -> tuple[Any, Any]:
            s = self.starts[i]
            return torch.stack(frames[s : s + 64]), torch.stack(labels[s : s + 64])

    torch.manual_seed(0)
    if temporal:
        lstm = torch.nn.LSTM(DIM, 256, batch_first=True)
        out = torch.nn.Linear(256, 2)
        params = list(lstm.parameters()) + list(out.parameters())
        loader = DataLoader(Windows(), batch_size=DEFAULT_BATCH[True], shuffle=True)
    else:
        lin = torch.nn.Linear(DIM, 2)
        params = list(lin.parameters())
        loader = DataLoader(Frames(), batch_size=1024, shuffle=True)
    opt = torch.optim.AdamW(params, lr=1e-3)
    t0, c0 = time.perf_counter(), time.process_time()
    for x, y in loader:
        if temporal:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h, _ = lstm(x)
                pred = torch.tanh(out(h))
        else:
            pred = torch.tanh(lin(x))
        loss = ccc_loss(pred.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    peak = peak_mb()
    return {
        "kind": f"naive-{kind}", "epoch_seconds": seconds * NAIVE_FRACTION, "frames": N_FRAMES,
        "epoch_cpu_seconds": cpu * NAIVE_FRACTION, "train_frames_per_cpu_s": n / cpu,
        "train_peak_over_base_mb": (peak - base) * NAIVE_FRACTION, "threads": torch.get_num_threads(),
        "feature_mb": N_FRAMES * DIM * 2 / 2**20, "fraction_measured": 1 / NAIVE_FRACTION,
    }


# ------------------------------------------------------------------------------------------------ driver


def set_scale(scale: float) -> None:
    global N_FRAMES, N_VIDEOS, VAL_FRAMES
    N_FRAMES = int(1_682_057 * scale)
    N_VIDEOS = max(int(594 * scale), 2 * NAIVE_FRACTION)
    VAL_FRAMES = int(SCALE["au"]["val"] * scale)


def _worker_cmd(args: list[str], scale: float) -> list[str]:
    return [sys.executable, __file__, "--scale", str(scale), "--worker", *args]


def _finish(result: dict[str, Any]) -> dict[str, Any]:
    result["load"] = os.getloadavg()[0]  # 1-minute load average when the measurement ended
    print("   ", json.dumps(result), file=sys.stderr, flush=True)
    return result


def run_worker(args: list[str], scale: float = 1.0) -> dict[str, Any]:
    cmd = _worker_cmd(args, scale)
    print("  $", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return _finish(json.loads(out.stdout.strip().splitlines()[-1]))


def run_rounds(args: list[str], rounds: int, scale: float = 1.0) -> dict[str, Any]:
    """The same measurement ``rounds`` times in a row; the run with the median epoch wall time, carrying all
    of them in ``rounds``. For the wall-time (two-thread) rows, which this VM's drift moves the most."""
    results = [run_worker(args, scale) for _ in range(max(rounds, 1))]
    results.sort(key=lambda r: r["epoch_seconds"])
    r = dict(results[len(results) // 2])
    r["rounds"] = [x["epoch_seconds"] for x in results]
    return r


def run_pair(args: list[str], scale: float = 1.0) -> dict[str, Any]:
    """The same single-thread measurement twice at once, as `abawfeat ablate --jobs 2` runs two cells on a
    2-core machine: how much two independent runs slow each other (memory bandwidth, caches)."""
    cmd = _worker_cmd(args, scale)
    print("  $ 2x", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"pair measurement {args} failed")
        results.append(json.loads(out.strip().splitlines()[-1]))
    r = dict(results[0])
    r["epoch_seconds"] = max(x["epoch_seconds"] for x in results)  # the pair is done when both are
    return _finish(r)


def jobs_estimate(m: dict[str, dict[str, Any]], rows: list[tuple[str, str, float, float]]
                  ) -> tuple[float, float] | None:
    """Wall seconds of the grid with `ablate --jobs 2`: each run's one-core time times the slowdown measured
    when two runs share the machine, queued on two workers in the order ablate uses."""
    if "lstm-pair" not in m or "fc-pair" not in m:
        return None
    # Against the solo run's CPU time: a pair slowed by shared memory bandwidth spends more CPU time too.
    slow = {"lstm": m["lstm-pair"]["epoch_seconds"] / m["lstm"]["epoch_cpu_seconds"],
            "fc": m["fc-pair"]["epoch_seconds"] / m["fc"]["epoch_cpu_seconds"]}
    from abawfeat.ablate import queue_order

    # ablate's queue order; each run goes to whichever worker frees first, as in its process pool.
    queue = sorted(rows, key=lambda r: queue_order("lstm" if "LSTM" in r[0] else "fc", r[1],
                                                    "contrastive" if "CLIP" in r[0] else ""))
    out = []
    for pick in (2, 3):
        workers = [0.0, 0.0]
        for r in queue:
            workers[workers.index(min(workers))] += r[pick] * slow["lstm" if "LSTM" in r[0] else "fc"]
        out.append(max(workers))
    return out[0], out[1]


def grid_estimate(
    m: dict[str, dict[str, Any]], speedup: dict[str, float] | None = None
) -> tuple[float, float, list[tuple[str, str, float, float]]]:
    """Seconds for the paper grid, 10 epochs per run, each followed by a validation pass: (low, high, rows).

    From the single-thread CPU times, divided by ``speedup`` (per head family) for two cores. Frame-wise
    heads train on labelled crops only. LSTM heads train on the windows that hold a label: all crops for VA
    and AU (almost every frame is labelled); for EXPR between its labelled crops (low: 54%, labels come in
    long runs) and all of its crops (high)."""
    speedup = speedup or {}
    rows = []
    low = high = 0.0
    for label, task, kind in PAPER_GRID:
        r, s = m[kind], SCALE[task]
        k = speedup.get("lstm" if "lstm" in kind else "fc", 1.0)
        if kind in ("fc", "contrastive-fc"):
            choices = (s["train_valid"], s["train_valid"])
        elif task == "expr":
            choices = (s["train_valid"], s["train"])
        else:
            choices = (s["train"], s["train"])
        val = r["val_cpu_seconds"] * s["val"] / r["val_frames"]
        lo, hi = ((10 * (f / r["train_frames_per_cpu_s"] + val) + r["setup_seconds"] * f / r["frames"]) / k
                  for f in choices)
        rows.append((label, task, lo, hi))
        low += lo
        high += hi
    return low, high, rows


def two_core_speedup(m: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """One-core CPU time / two-core wall time, if the two-thread runs had the machine to themselves (their
    own two threads make a load of about 2)."""
    fc2, lstm2 = m["fc-2t"], m["lstm-2t"]
    if max(fc2["load"], lstm2["load"]) > 2.75:
        return None
    return {"fc": m["fc"]["epoch_cpu_seconds"] / fc2["epoch_seconds"],
            "lstm": m["lstm"]["epoch_cpu_seconds"] / lstm2["epoch_seconds"]}


def minutes(a: float, b: float) -> str:
    return f"{a / 60:.1f}" if abs(a - b) < 30 else f"{a / 60:.1f}-{b / 60:.1f}"


def spread(r: dict[str, Any]) -> str:
    """`` (median of N runs: a, b, c s)`` for a measurement repeated by ``run_rounds``, else nothing."""
    rounds = r.get("rounds", [])
    if len(rounds) < 2:
        return ""
    return f" (median of {len(rounds)} runs: {', '.join(f'{x:.1f}' for x in rounds)} s)"


def render(m: dict[str, dict[str, Any]], command: str) -> str:
    two = two_core_speedup(m)
    low1, high1, rows1 = grid_estimate(m)
    low2, high2, rows2 = grid_estimate(m, two)
    jobs = jobs_estimate(m, rows1)

    def line(key: str, label: str) -> str:
        r = m[key]
        ratio = r["train_peak_over_base_mb"] / r["feature_mb"]
        frac = "" if r["fraction_measured"] == 1 else f" (1/{round(1 / r['fraction_measured'])} run)"
        val = f"{r['val_cpu_seconds']:.1f} s" if "val_cpu_seconds" in r else "-"
        return (f"| {label} | {r['threads']} | {r['epoch_cpu_seconds']:.1f} s{frac} | "
                f"{r['epoch_seconds']:.1f} s | {r['load']:.1f} | "
                f"{r['train_frames_per_cpu_s'] / 1e3:,.0f} k | {val} | "
                f"{r['train_peak_over_base_mb'] / 1024:.2f} GB | {ratio:.2f}x |")

    fc, lstm = m["fc"], m["lstm"]
    two_rows = {k: m[k] for k in ("fc-2t", "lstm-2t")}
    out = [
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, torch {fc.get('torch', '?')}). 1-minute load "
        f"average {fc.get('load_start', float('nan')):.1f} at the start; the `load` column is its value as "
        "each measurement ended (a single-thread run alone makes about 1, a two-thread run or a pair about "
        "2; more means other jobs ran). Single-thread runs are judged by their CPU time, which is what the "
        "same work takes on an idle core; two-thread runs by their wall time.",
        "",
        f"Data: {N_FRAMES:,} synthetic frames x {DIM} fp16 in memory ({fc['feature_mb'] / 1024:.2f} GB of "
        "features = the VA training set of the 8th ABAW), 594 videos. One training epoch with the default "
        "batch sizes (FC: 1024 frames; LSTM: 64 windows of 64 frames). Val pass: 454,022 frames (AU val "
        "size), inference (LSTM: windows of 64, stride 32) + fill + official metrics. Memory: peak RSS "
        "during training above the process's RSS before the features were allocated (features included).",
        "",
        "| training | threads | epoch, CPU time | epoch, wall | load | frames / CPU s | val pass, CPU | "
        "peak memory | / feature bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        line("fc", "FC (linear), ours, fp32"),
        line("naive-fc", "FC, naive DataLoader over per-frame tensors"),
        line("lstm", "LSTM(256), ours, bf16 autocast (LSTM default)"),
        line("naive-lstm", "LSTM(256), naive DataLoader over stacked per-frame tensors, bf16"),
        line("lstm-fp32", "LSTM(256), ours, fp32"),
        line("contrastive-fc", "CLIP contrastive FC 512 + linear 512, ours, bf16"),
        line("contrastive-lstm", "CLIP contrastive LSTM(256) + linear 512, ours, bf16"),
        line("fc-2t", "FC, ours, both cores"),
        line("lstm-2t", "LSTM(256), ours, bf16, both cores"),
        *([line("fc-pair", "FC, ours, two runs at once (one thread each)"),
           line("lstm-pair", "LSTM(256), ours, bf16, two runs at once (one thread each)")]
          if "lstm-pair" in m else []),
        "",
        f"- FC epoch: **{fc['epoch_cpu_seconds']:.1f} s** on one core, "
        f"**{two_rows['fc-2t']['epoch_seconds']:.1f} s** wall on two (target <= 5 s); the naive loader needs "
        f"{m['naive-fc']['epoch_cpu_seconds'] / fc['epoch_cpu_seconds']:.1f}x the time.",
        f"- LSTM(256) epoch, bf16: **{lstm['epoch_cpu_seconds']:.1f} s** on one core, "
        f"**{two_rows['lstm-2t']['epoch_seconds']:.1f} s** wall on two{spread(two_rows['lstm-2t'])} "
        f"(target <= 45 s; fp32 on one core: "
        f"{m['lstm-fp32']['epoch_cpu_seconds']:.1f} s). The LSTM's arithmetic dominates, so the naive loader "
        f"costs only {m['naive-lstm']['epoch_cpu_seconds'] / lstm['epoch_cpu_seconds']:.2f}x the time here.",
        f"- Training memory: {fc['train_peak_over_base_mb'] / fc['feature_mb']:.2f}x (FC) and "
        f"{lstm['train_peak_over_base_mb'] / lstm['feature_mb']:.2f}x (LSTM) the feature bytes "
        f"(target <= 1.5x); the naive loader: "
        f"{m['naive-fc']['train_peak_over_base_mb'] / m['naive-fc']['feature_mb']:.1f}x (FC), "
        f"{m['naive-lstm']['train_peak_over_base_mb'] / m['naive-lstm']['feature_mb']:.1f}x (LSTM).",
        "- On a machine shared with other jobs use `--threads 1`: two threads with a busy neighbour wait for "
        "each other at every op (an LSTM epoch took 20 minutes instead of one in an earlier run of this "
        "script at load 5).",
        "",
        "Paper grid estimate (pipelines/paper-table3.toml at full Aff-Wild2 scale, 10 epochs per run, a "
        "validation pass after every epoch; reading each cache from disk, a few seconds per run, not "
        "included), in minutes; a range where EXPR's unlabelled stretches make the LSTM's share uncertain:",
        "",
        "| run | task | one core | two idle cores |",
        "|---|---|---:|---:|",
        *[f"| {a[0]} | {a[1]} | {minutes(a[2], a[3])} | {minutes(b[2], b[3]) if two else '-'} |"
          for a, b in zip(rows1, rows2, strict=True)],
        f"| **total** | | **{minutes(low1, high1)}** | **{minutes(low2, high2) if two else '-'}** |",
        "",
        (f"Two idle cores: the one-core times divided by the speed-ups measured above (FC {two['fc']:.2f}x, "
         f"LSTM {two['lstm']:.2f}x; the contrastive FC is counted at the FC rate, which is conservative)."
         if two else
         "The two-thread rows ran while other jobs used the second core (see their load), so they say "
         "nothing about two idle cores; re-run the script on a quiet machine for that column."),
        "",
        *([f"With `abawfeat ablate pipelines/paper-table3.toml` (its default `--jobs 0` = auto is 2 on "
           f"this machine: two runs at once, one thread each): **{minutes(*jobs)}** minutes (target <= 30): "
           f"the one-core times above, times the slowdown two runs at "
           "once cause each other (the `two runs at once` rows: the pair's epoch wall time over the solo "
           "run's CPU time), queued on two workers in the order ablate uses. Two single-thread runs "
           "use the two cores better than one two-thread run, whose small matrix products scale poorly over "
           "threads.",
           ""] if jobs else []),
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="Do not rewrite docs/performance.md.")
    parser.add_argument("--scale", type=float, default=1.0, help="Fraction of the full size (smoke tests).")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Runs of the two-thread LSTM epoch (the target's row); the median is reported.")
    parser.add_argument("--results", type=Path, help="Also save the raw measurements (JSON) here.")
    parser.add_argument("--render", type=Path, help="Only re-render measurements saved with --results.")
    args = parser.parse_args()
    if args.render:
        text = render(json.loads(args.render.read_text()), "python benchmarks/heads.py")
        print(text)
        if not args.no_write:
            write_section("heads", text)
        return
    set_scale(args.scale)
    if args.worker:
        kind, *rest = args.worker
        if kind == "naive":
            result = worker_naive(rest[0], int(rest[1]))
        else:
            result = worker_ours(kind, rest[0], int(rest[1]), int(rest[2]), rest[3:] == ["compile"])
        import torch

        result["torch"] = torch.__version__
        print(json.dumps(result))
        return
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs", file=sys.stderr)
    load_start = os.getloadavg()[0]
    # One thread: CPU seconds then equal wall seconds on an idle core, whatever else the machine runs.
    m = {
        "fc": run_worker(["fc", "fp32", "1", "1"], args.scale),
        "naive-fc": run_worker(["naive", "fc", "1"], args.scale),
        "lstm": run_worker(["lstm", "bf16", "1", "1"], args.scale),
        "naive-lstm": run_worker(["naive", "lstm", "1"], args.scale),
        # Same loop, other settings: a quarter epoch each, scaled (the per-frame cost is constant).
        "lstm-fp32": run_worker(["lstm", "fp32", "4", "1"], args.scale),
        "contrastive-fc": run_worker(["contrastive-fc", "bf16", "4", "1"], args.scale),
        "contrastive-lstm": run_worker(["contrastive-lstm", "bf16", "4", "1"], args.scale),
        # Both cores (the default): wall time, meaningful only when nothing else runs.
        "fc-2t": run_worker(["fc", "fp32", "1", "2"], args.scale),
        "lstm-2t": run_rounds(["lstm", "bf16", "1", "2"], args.rounds, args.scale),
        # Two single-thread runs at once (`ablate --jobs 2`): their epoch wall time against the CPU time
        # of one alone is the slowdown they cause each other.
        "fc-pair": run_pair(["fc", "fp32", "1", "1"], args.scale),
        "lstm-pair": run_pair(["lstm", "bf16", "4", "1"], args.scale),
    }
    m["fc"]["load_start"] = load_start
    if args.results:
        args.results.write_text(json.dumps(m, indent=1))
    text = render(m, "python benchmarks/heads.py")
    print(text)
    if not args.no_write and args.scale == 1.0:
        write_section("heads", text)
        print(f"wrote the heads section of {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
