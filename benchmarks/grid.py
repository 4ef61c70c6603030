"""The paper grid end to end at Aff-Wild2 scale: `abawfeat ablate pipelines/paper-table3.toml`, timed.

    .venv/bin/python benchmarks/grid.py              # build data, run the grid, rewrite docs/performance.md
    .venv/bin/python benchmarks/grid.py --no-write   # measure and print only
    .venv/bin/python benchmarks/grid.py --scale 0.01 --no-write   # a smoke test of this script

benchmarks/heads.py estimates the grid's time from measured epochs; this script runs it. Data: a synthetic
annotation tree and two feature caches (DDAMFN and CLIP, 512-d float16, the CLIP one with its 8 prompt
embeddings) at the seed paper's Table 2 sizes: VA train 1,682,057 / val 383,814 frames, EXPR 1,110,367 /
453,535 (597,361 / 284,230 of them labelled), AU 1,381,411 / 454,022; tasks share videos as in the release,
about 3 M crops in all. Features and labels are random (the time of an epoch does not depend on their values;
the metrics here mean nothing). The grid runs with ablate's defaults (``--jobs`` auto), exactly as a user
runs it, in a temporary folder that is deleted afterwards (it needs ~7 GB of disk).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from perfdoc import DOC, write_section  # benchmarks/perfdoc.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "pipelines" / "paper-table3.toml"
DIM = 512
NAME = "AffWild2Synth"
# (task, split) -> (annotated frames, frames with a valid label): seed paper Table 2.
SIZES = {
    ("va", "train"): (1_682_057, 1_679_854), ("va", "val"): (383_814, 382_021),
    ("expr", "train"): (1_110_367, 597_361), ("expr", "val"): (453_535, 284_230),
    ("au", "train"): (1_381_411, 1_359_523), ("au", "val"): (454_022, 445_845),
}
POOL_FRAMES = 3_000_000  # crops in the whole release, about
MEAN_VIDEO = 5_000  # frames per video, about (594 VA videos for ~3 M crops)


def video_pool(rng: np.random.Generator, scale: float) -> np.ndarray:
    """Lengths of the release's videos (one crop per frame, no gaps: gaps do not change an epoch's cost)."""
    n = max(int(POOL_FRAMES * scale / MEAN_VIDEO), 12)
    lengths = rng.gamma(2.0, MEAN_VIDEO / 2.0, size=n).astype(np.int64) + 50
    return lengths


def assign(lengths: np.ndarray, rng: np.random.Generator, scale: float) -> dict[tuple[str, str], list[int]]:
    """Each (task, split) gets videos of the shared pool whose lengths add up to its Table 2 size (the last
    one's annotation is cut to fit). Train and val of one task never share a video; tasks do share them."""
    out: dict[tuple[str, str], list[int]] = {}
    for task in ("va", "expr", "au"):
        order = rng.permutation(len(lengths))
        pos = 0
        for split in ("train", "val"):
            want = int(SIZES[(task, split)][0] * scale)
            chosen, total = [], 0
            while total < want:
                i = int(order[pos])
                pos += 1
                chosen.append(i)
                total += int(lengths[i])
            out[(task, split)] = chosen
    return out


def write_tree(root: Path, lengths: np.ndarray, plan: dict[tuple[str, str], list[int]],
               rng: np.random.Generator, scale: float) -> dict[tuple[str, str], int]:
    """Annotation files of the release's layout; returns the annotated frames per (task, split)."""
    from abawfeat.constants import SPLIT_DIRS
    from abawfeat.tasks import single

    counts = {}
    for (task, split), videos in plan.items():
        want, valid = (int(x * scale) for x in SIZES[(task, split)])
        folder = root / "8th_ABAW_Annotations" / single(task).folders[0] / SPLIT_DIRS[split]
        folder.mkdir(parents=True, exist_ok=True)
        left = want
        invalid_share = 1 - valid / want
        for i in videos:
            n = min(int(lengths[i]), left)
            left -= n
            # Labels in runs of 25 frames; invalid labels (-5 / -1) in whole runs, like unlabelled stretches.
            runs = -(-n // 25)
            bad = np.repeat(rng.random(runs) < invalid_share, 25)[:n]
            if task == "va":
                va = np.repeat(rng.uniform(-0.9, 0.9, (runs, 2)), 25, axis=0)[:n]
                rows = ["-5,-5" if b else f"{v:.3f},{a:.3f}" for (v, a), b in zip(va, bad, strict=True)]
            elif task == "expr":
                ex = np.repeat(rng.integers(0, 8, runs), 25)[:n]
                rows = ["-1" if b else str(e) for e, b in zip(ex, bad, strict=True)]
            else:
                au = np.repeat((rng.random((runs, 12)) < 0.3).astype(np.int8), 25, axis=0)[:n]
                text = [",".join(r) for r in au.astype(str)]
                rows = [",".join(["-1"] * 12) if b else r for r, b in zip(text, bad, strict=True)]
            header = ",".join(single(task).header)
            (folder / f"v{i:04d}.txt").write_text(header + "\n" + "\n".join(rows) + "\n")
        counts[(task, split)] = want - left
    (root / "names_of_videos_in_each_test_set").mkdir(exist_ok=True)
    return counts


def write_cache(path: Path, backbone: str, lengths: np.ndarray, seed: int) -> None:
    """A cache of random 512-d float16 features for every video of the pool (CLIP's with prompts)."""
    from abawfeat.cache import CacheWriter, make_provenance
    from abawfeat.constants import EXPR_CLASSES

    rng = np.random.default_rng(seed)
    encoder: dict[str, Any] = {"name": backbone, "config": {"synthetic": True}, "preprocessing": {},
                               "weights_sha256": "random-init", "calibration": None}
    if backbone == "clip":
        encoder["prompt_classes"] = list(EXPR_CLASSES)
    provenance = make_provenance(encoder, feature_dim=DIM, dtype="float16", precision="bf16")
    path.parent.mkdir(parents=True, exist_ok=True)
    with CacheWriter(path, provenance) as writer:
        for i, n in enumerate(lengths):
            feats = rng.standard_normal((int(n), DIM), dtype=np.float32)
            writer.write_video(f"v{i:04d}", np.arange(1, n + 1, dtype=np.int32), feats)
        if backbone == "clip":
            writer.set_text_embeddings([f"a face showing {c.lower()}" for c in EXPR_CLASSES],
                                       rng.standard_normal((8, DIM)).astype(np.float32))


def run_grid(tmp: Path, scale: float) -> dict[str, Any]:
    from abawfeat.ablate import run_ablation

    root = tmp / NAME
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    lengths = video_pool(rng, scale)
    plan = assign(lengths, rng, scale)
    counts = write_tree(root, lengths, plan, rng, scale)
    for k, backbone in enumerate(("ddamfn", "clip")):
        write_cache(tmp / "cache" / NAME / f"{backbone}.h5", backbone, lengths, seed=k + 1)
    build = time.perf_counter() - t0
    print(f"data: {len(lengths)} videos, {int(lengths.sum()):,} crops, built in {build:.0f} s", flush=True)

    os.chdir(tmp)  # the recipe finds caches where extract writes them: cache/<dataset>/<backbone>.h5
    t0 = time.perf_counter()
    result = run_ablation(RECIPE, data=str(root), out=str(tmp / "grid"),
                          log=lambda m: print(m, flush=True) if "epoch " not in m else None, jobs=0)
    wall = time.perf_counter() - t0
    return {
        "wall_seconds": wall, "crops": int(lengths.sum()), "videos": len(lengths), "build_seconds": build,
        "counts": {f"{t}/{s}": n for (t, s), n in counts.items()},
        "cells": [{"label": c.row.label, "task": c.task, "status": c.status, "seconds": c.seconds}
                  for c in result.cells],
        "peak_child_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpus": os.cpu_count(), "load_end": os.getloadavg()[0],
    }


def render(m: dict[str, Any], command: str, load_start: float) -> str:
    import torch

    rows = [f"| {c['label']} | {c['task']} | {c['status']} | {c['seconds'] / 60:.1f} |" for c in m["cells"]]
    serial = sum(c["seconds"] for c in m["cells"])
    counts = ", ".join(f"{k} {v:,}" for k, v in m["counts"].items())
    return "\n".join([
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {m['cpus']} cores, torch "
        f"{torch.__version__}). 1-minute load average {load_start:.1f} before, {m['load_end']:.1f} after.",
        "",
        "`abawfeat ablate pipelines/paper-table3.toml` with its defaults (`--jobs` auto): 8 runs, 10 epochs, "
        f"each epoch followed by a full validation pass and the best epoch's predictions, plots and "
        f"checkpoint written, on synthetic caches of {m['crops']:,} crops in {m['videos']} videos (annotated "
        f"frames: {counts}; the seed paper's Table 2 sizes).",
        "",
        f"**Whole grid: {m['wall_seconds'] / 60:.1f} minutes wall** (target <= 30). The runs' own times add "
        f"up to {serial / 60:.1f} minutes; two at a time they overlap. Peak RSS: largest run process "
        f"{m['peak_child_rss_mb'] / 1024:.1f} GB.",
        "",
        "| run | task | status | minutes (its own wall time) |",
        "|---|---|---|---:|",
        *rows,
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="Fraction of the full size (smoke tests).")
    parser.add_argument("--no-write", action="store_true", help="Do not rewrite docs/performance.md.")
    parser.add_argument("--tmp", type=Path, default=None, help="Parent folder of the data.")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs", file=sys.stderr)
    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="abawfeat-bench-grid-", dir=args.tmp))
    cwd = Path.cwd()
    try:
        m = run_grid(tmp, args.scale)
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)
    text = render(m, "python benchmarks/grid.py" + (f" --scale {args.scale}" if args.scale != 1 else ""),
                  load_start)
    print(text)
    if not args.no_write and args.scale == 1.0:
        write_section("grid", text)
        print(f"wrote the grid section of {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
