"""Where DDAMFN extraction's time goes: the shares of decoding, the network's parts and the HDF5 writes, the
fixed costs in seconds, and the wall time of an extraction at the release's size.

    .venv/bin/python benchmarks/extract_profile.py             # measure, print, rewrite docs/performance.md
    .venv/bin/python benchmarks/extract_profile.py --no-write  # measure and print only
    .venv/bin/python benchmarks/extract_profile.py --videos 4 --frames 80 --no-write  # a quick look

Data and weights as in ``benchmarks/extract.py``: a synthetic Aff-Wild2 tree of 112 x 112 JPEG crops, the
published-format DDAMFN checkpoint in tests/fixtures/ddamfn (the AffectNet weights' network and cost).

- end to end: ``run_extraction`` as extract runs it at scale (bf16, compiled, one decoding worker, batch 32).
  Its HDF5 part writes and its consolidation are timed in place (the writer's methods wrapped with a timer);
  the first batch (worker start-up and compiling) is reported apart, as are building the model and
  consolidating.
- decoding: the extraction's own ``CropDataset`` items (JPEG to resized uint8 pixels), one process, one core:
  what the decoding worker spends per frame.
- network: extraction's model (``PixelInput``, channels_last, bf16) on uint8 batches already in memory, eager
  and compiled. The eager pass is profiled (``torch.profiler``) with a range around each part of the network,
  so each operator's own time is charged to the part that ran it; copies and casts (``copy_``, ``_to_copy``,
  ``contiguous``, ``clone``) are charged to "layout changes and casts" wherever they occur. Compiled, those
  parts fuse and cannot be told apart, so the compiled pass is given as a whole.

Each share is of the end-to-end run's steady time per frame. Decoding runs in the worker on the second core,
beside the two compute threads, so its share says what it takes from the machine, not what it adds to the
wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from extract import WEIGHTS, make_data  # benchmarks/extract.py
from perfdoc import DOC, write_section  # benchmarks/perfdoc.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RELEASE_CROPS = 2_600_000  # the release's size as the stage-one speed issue gives it ("about 2.6 M crops")
LAYOUT_OPS = {"aten::copy_", "aten::_to_copy", "aten::contiguous", "aten::clone"}


def part_names() -> list[tuple[type, str]]:
    """The network's parts. An operator is charged to the innermost part that ran it; the convolution
    blocks inside the attention heads are left unlabelled (``profile_parts``), so they count as the heads'."""
    from abawfeat.encoders import ddamfn

    return [
        (ddamfn.MixedDepthwiseConv, "mixed depthwise convolutions"),
        (ddamfn.CoordinateAttention, "coordinate attention (in the bottlenecks)"),
        (ddamfn.AttentionHead, "dual-direction attention heads"),
        (ddamfn.ConvBN, "other convolutions (1x1, stem, GDConv; BN folded, PReLU)"),
    ]


def profile_parts(model: Any, batches: list[Any]) -> dict[str, float]:
    """Seconds per frame of each part of the eager bf16 pass, from operator self times."""
    import torch
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    labels = {cls: label for cls, label in part_names()}
    handles, stack = [], []

    def enter(label: str) -> Any:
        def hook(*_: Any) -> None:
            rf = record_function(f"part::{label}")
            rf.__enter__()
            stack.append(rf)
        return hook

    def leave(*_: Any) -> None:
        stack.pop().__exit__(None, None, None)

    from abawfeat.encoders import ddamfn

    in_heads = {id(m) for head in model.modules() if isinstance(head, ddamfn.AttentionHead)
                for m in head.modules() if m is not head}
    for module in model.modules():
        label = labels.get(type(module))
        if label is not None and id(module) not in in_heads:
            handles.append(module.register_forward_pre_hook(enter(label)))
            handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(batches[0])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for x in batches:
                    model(x)
    finally:
        for h in handles:
            h.remove()
    frames = sum(len(x) for x in batches)
    seconds: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name.startswith("part::") or event.name.startswith("ProfilerStep"):
            continue
        own = event.self_cpu_time_total / 1e6
        if event.name in LAYOUT_OPS:
            seconds["layout changes and casts"] += own
            continue
        parent, label = event.cpu_parent, "the rest (input normalisation, adds, max of the heads, fc)"
        while parent is not None:
            if parent.name.startswith("part::"):
                label = parent.name[len("part::"):]
                break
            parent = parent.cpu_parent
        seconds[label] += own
    return {k: v / frames for k, v in seconds.items()}


def network_rate(model: Any, batches: list[Any], rounds: int) -> float:
    """Frames/s of ``model`` over ``batches`` (median of ``rounds`` passes, after one warm-up pass)."""
    import torch

    rates = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(batches[0])
        for _ in range(rounds):
            start = time.perf_counter()
            for x in batches:
                model(x)
            rates.append(sum(len(x) for x in batches) / (time.perf_counter() - start))
    return statistics.median(rates)


def end_to_end(data: Path, out: Path, batch: int) -> dict[str, float]:
    """``run_extraction`` bf16 compiled, its part writes and consolidation timed in place."""
    from abawfeat.cache import CacheWriter
    from abawfeat.extract import ExtractConfig, run_extraction
    from abawfeat.utils.allocator import keep_heap

    keep_heap()  # as the CLI does
    spent: dict[str, float] = defaultdict(float)
    originals = {name: getattr(CacheWriter, name) for name in ("write_video", "consolidate")}

    def timed(name: str) -> Any:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return originals[name](self, *args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return method

    config = ExtractConfig(backbone="ddamfn", data=data, out=out, precision="bf16", compile=True,
                           batch_size=batch, workers=1, device="cpu", progress=False, weights=str(WEIGHTS))
    for name in originals:
        setattr(CacheWriter, name, timed(name))
    try:
        start = time.perf_counter()
        result = run_extraction(config)
        wall = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(CacheWriter, name, fn)
    steady_frames = result.frames - result.warmup_frames
    steady_seconds = result.seconds - result.warmup_seconds
    return {
        "frames": result.frames, "wall": wall, "loop": result.seconds,
        "warmup_frames": result.warmup_frames, "warmup": result.warmup_seconds,
        "steady_fps": result.steady_frames_per_second,
        "steady_per_frame": steady_seconds / steady_frames,
        "write_per_frame": spent["write_video"] / result.frames,
        "consolidate": spent["consolidate"],
        "outside_loop": wall - result.seconds - spent["consolidate"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=12, help="synthetic videos (default 12)")
    parser.add_argument("--frames", type=int, default=250, help="mean frames per video (default 250)")
    parser.add_argument("--batch-size", type=int, default=32, help="extraction's batch (default 32)")
    parser.add_argument("--network-frames", type=int, default=640,
                        help="frames of the in-memory network passes (default 640)")
    parser.add_argument("--rounds", type=int, default=3, help="passes per network measurement (median)")
    parser.add_argument("--no-write", dest="write", action="store_false", help="do not touch the docs")
    args = parser.parse_args()

    import numpy as np
    import torch

    from abawfeat.data import AffWild2
    from abawfeat.encoders import build_encoder
    from abawfeat.extract import CropDataset, ExtractConfig, _prepare_model

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="abawfeat-bench-profile-") as tmp:
        data, n_crops = make_data(Path(tmp), args.videos, args.frames)
        print(f"synthetic tree: {n_crops:,} crops in {args.videos} videos", flush=True)
        e2e = end_to_end(data, Path(tmp) / "ddamfn.h5", args.batch_size)
        print(f"  end to end: {e2e['steady_fps']:.1f} frames/s steady", flush=True)

        dataset = AffWild2(data)
        videos = sorted(dataset.videos_with_crops())
        frames_of = {v: dataset.crop_frames(v) for v in videos}
        encoder = build_encoder("ddamfn", weights=str(WEIGHTS)).eval()
        crops = CropDataset(dataset, videos, frames_of, encoder.transform)
        n_decode = min(len(crops), 4 * args.network_frames)
        start = time.perf_counter()
        pixels = [crops[i][1] for i in range(n_decode)]
        decode_per_frame = (time.perf_counter() - start) / n_decode
        print(f"  decoding: {1 / decode_per_frame:.0f} frames/s on one core", flush=True)

        stacked = torch.from_numpy(np.stack(pixels[: args.network_frames]))
        batches = [stacked[i : i + args.batch_size].permute(0, 3, 1, 2)
                   for i in range(0, len(stacked) - args.batch_size + 1, args.batch_size)]
        cfg = ExtractConfig(backbone="ddamfn", data=data, precision="bf16", compile=False)
        eager = _prepare_model(encoder, torch.device("cpu"), cfg)
        parts = profile_parts(eager, batches)
        eager_fps = network_rate(eager, batches, args.rounds)
        twin = build_encoder("ddamfn", weights=str(WEIGHTS)).eval()
        compiled = _prepare_model(twin, torch.device("cpu"), dataclasses.replace(cfg, compile=True))
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            compiled(batches[0])
        compile_s = time.perf_counter() - start
        compiled_fps = network_rate(compiled, batches, args.rounds)
        print(f"  network in memory: eager {eager_fps:.1f}, compiled {compiled_fps:.1f} frames/s", flush=True)

    steady = e2e["steady_per_frame"]
    rows = [("decoding (in the worker, on the other core)", decode_per_frame),
            ("network, compiled (in memory)", 1 / compiled_fps),
            ("HDF5 part writes (main process)", e2e["write_per_frame"])]
    rest = steady - 1 / compiled_fps - e2e["write_per_frame"]
    eager_total = sum(parts.values())
    lines = [
        f"Command: `python benchmarks/extract_profile.py` ({time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, torch's default threads, "
        "one decoding worker, "
        f"batch {args.batch_size}); 1-minute load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after. Synthetic tree of {n_crops:,} crops ({args.videos} videos).",
        "",
        f"End to end, bf16 compiled, steady: **{e2e['steady_fps']:.1f} frames/s**, "
        f"{steady * 1e3:.2f} ms a frame. Its parts, per frame:",
        "",
        "| part | ms a frame | share of the end-to-end frame |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {sec * 1e3:.2f} | {100 * sec / steady:.0f} % |" for name, sec in rows]
    lines += [f"| the rest of the main loop (batch assembly, padding, the worker's share of the cores, "
              f"buffers) | {rest * 1e3:.2f} | {100 * rest / steady:.0f} % |", ""]
    lines += [
        f"The network eager in bf16 runs at {eager_fps:.1f} frames/s in memory, compiled at "
        f"{compiled_fps:.1f} ({compiled_fps / eager_fps:.2f}x). Inside the eager pass (torch.profiler, "
        f"operator self times, {eager_total * 1e3:.2f} ms a frame in all under the profiler):",
        "",
        "| part of the eager bf16 network | ms a frame | share |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {sec * 1e3:.3f} | {100 * sec / eager_total:.0f} % |"
              for name, sec in sorted(parts.items(), key=lambda kv: -kv[1])]
    release_s = RELEASE_CROPS / e2e["steady_fps"] + e2e["warmup"] + e2e["outside_loop"]
    consolidate_release = e2e["consolidate"] * RELEASE_CROPS / e2e["frames"]
    lines += [
        "",
        "Fixed costs, in seconds, apart from the steady rate:",
        f"- the first batch ({e2e['warmup_frames']} frames: the decoding worker's start-up and compiling): "
        f"{e2e['warmup']:.1f} s (compiling alone, the network's first call in memory: {compile_s:.1f} s)",
        "- building the model, checking the tree and the cache, before the loop: "
        f"{e2e['outside_loop']:.1f} s",
        f"- consolidating the part files into one cache: {e2e['consolidate']:.2f} s for {e2e['frames']:,} "
        f"frames; it grows with the rows (about {consolidate_release:.0f} s at the release's size, "
        "scaled linearly)",
        f"- at the release's size (about {RELEASE_CROPS / 1e6:.1f} M crops) the extraction's wall time is "
        f"about **{(release_s + consolidate_release) / 3600:.1f} h** at this steady rate "
        f"({RELEASE_CROPS:,} / {e2e['steady_fps']:.1f} frames/s plus the fixed costs above)",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if args.write:
        write_section("extract-profile", text, DOC)
        print(f"\nwrote the extract-profile section of {DOC}")


if __name__ == "__main__":
    main()
