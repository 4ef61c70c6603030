"""Audio stage one, end to end from the video file to the HDF5 cache: speed as a multiple of real time, the
decoding share, and peak memory for a short and a long video.

    .venv/bin/python benchmarks/audio.py             # measure, print, rewrite docs/performance.md (audio)
    .venv/bin/python benchmarks/audio.py --quick     # a 1 and a 3 min video, one run each; never writes

Data: one source video per measurement, written here with PyAV: 30 fps frames (32 x 32, the size does not
matter: the audio path only reads the video's packet timestamps) and a 48 kHz stereo AAC track of a
speech-like signal (gliding harmonic bursts, pauses, a noise floor), plus the crop folder and annotation file
that make it an Aff-Wild2 tree (the crops are hard links to one JPEG: the audio path lists them, never reads
them). Encoder: ``wav2vec2`` with ``--random-init`` at the base size (12 layers, hidden 768, the published
wav2vec2-base architecture: the same cost as pretrained weights, which cannot be downloaded here), bf16.

Every measurement runs ``run_extraction`` in its own subprocess, so its peak RSS is its own: the model, the
decoder, one segment of activations and the video's rows. The decode share is the time spent reading the
frame timestamps, decoding and resampling (twice: once for the whole-track statistics, once to encode),
out of the extraction's own time; "wall" also counts building the model and writing the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

from heads import peak_mb  # benchmarks/heads.py
from perfdoc import (  # benchmarks/perfdoc.py (scripts run from benchmarks/)
    DOC,
    measure_in_child,
    write_section,
)

ROOT = Path(__file__).resolve().parents[1]
TARGET_REALTIME = 15.0  # the target for a wav2vec2-base-sized encoder in bf16 on this CPU


# ----------------------------------------------------------------------------------------------- the data


def speechlike(seconds: float, rate: int, seed: int) -> Any:
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    loud = 0.3 + 0.7 * (np.sin(2 * np.pi * 0.03 * t) > 0)
    on = (np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, 6)) > 0.1) * loud
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(h * phase) / h for h in range(1, 6))
    x = 0.2 * on * voice + 0.003 * rng.standard_normal(len(t))
    return np.stack([x, 0.8 * x]).astype(np.float32)


def make_tree(root: Path, name: str, seconds: float) -> Path:
    """An Aff-Wild2 tree holding one video of ``seconds``: source file, crops, one VA annotation."""
    import av
    import numpy as np
    from PIL import Image

    fps, rate = 30, 48_000
    n_frames = int(seconds * fps)
    video_path = root / "videos" / "batch1" / f"{name}.mp4"
    video_path.parent.mkdir(parents=True)
    container = av.open(str(video_path), "w")
    video = container.add_stream("mpeg4", rate=fps)
    video.width = video.height = 32
    video.pix_fmt = "yuv420p"
    audio = container.add_stream("aac", rate=rate)  # every stream before the first packet
    audio.layout = "stereo"
    frame_image = np.zeros((32, 32, 3), np.uint8)
    for k in range(n_frames):
        frame = av.VideoFrame.from_ndarray(frame_image, format="rgb24")
        frame.pts = k
        for packet in video.encode(frame):
            container.mux(packet)
    for packet in video.encode():
        container.mux(packet)
    samples = speechlike(seconds, rate, seed=len(name))
    size = audio.codec_context.frame_size or 1024
    for pos in range(0, samples.shape[1], size):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, pos : pos + size]), format="fltp",
                                           layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = rate, pos, Fraction(1, rate)
        for packet in audio.encode(frame):
            container.mux(packet)
    for packet in audio.encode():
        container.mux(packet)
    container.close()
    crops = root / "cropped_aligned" / name
    crops.mkdir(parents=True)
    jpg = root / "one.jpg"
    Image.new("RGB", (112, 112), (120, 100, 90)).save(jpg, quality=90)
    for k in range(1, n_frames + 1):
        os.link(jpg, crops / f"{k:05d}.jpg")
    ann = root / "8th_ABAW_Annotations" / "VA_Estimation_Challenge" / "Train_Set"
    ann.mkdir(parents=True)
    (ann / f"{name}.txt").write_text("valence,arousal\n" + "0.1,0.2\n" * n_frames)
    return root


# ------------------------------------------------------------------------------------ measurements (child)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from abawfeat.extract import ExtractConfig, run_extraction
    from abawfeat.utils.allocator import keep_heap

    keep_heap()  # as the CLI does (docs/performance.md, "Allocator")
    config = ExtractConfig(backbone="wav2vec2", data=Path(spec["data"]), out=Path(spec["out"]),
                           random_init=True, precision=spec["precision"], device="cpu", progress=False,
                           encoder_options={} if spec["layer"] is None else {"layer": spec["layer"]})
    start = time.perf_counter()
    result = run_extraction(config)
    wall = time.perf_counter() - start
    # VmHWM belongs to the address space exec made; ru_maxrss would carry this script's own peak (it
    # writes the long video) into every child.
    peak = peak_mb()
    return {"audio_seconds": result.audio_seconds, "seconds": result.seconds,
            "decode_seconds": result.decode_seconds, "wall_seconds": wall, "rows": result.frames,
            "rss_mb": peak, "file_mb": result.file_size / 1e6}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    result = measure_in_child(__file__, spec)
    if not result["rows"]:
        raise SystemExit(f"measurement {spec['label']} wrote no rows")
    result.update(label=spec["label"], minutes=spec["minutes"], layer=spec["layer"],
                  precision=spec["precision"])
    rt = result["audio_seconds"] / result["seconds"]
    share = 100 * result["decode_seconds"] / result["seconds"]
    wall = result["audio_seconds"] / result["wall_seconds"]
    print(f"  {spec['label']:<40} {spec['minutes']:5.2f} min: {rt:5.1f}x real time (wall {wall:.1f}x), "
          f"decoding {share:.0f} %; peak RSS {result['rss_mb']:.0f} MB", flush=True)
    return result


# ------------------------------------------------------------------------------------------ driver (parent)


def summarise(results: list[dict[str, Any]], command: str, load: tuple[float, float],
              lengths: dict[str, float]) -> str:
    lines = [
        f"Measured with `{command}` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, {os.cpu_count()} "
        f"cores, torch's default threads, torch {_torch_version()}, no GPU). Load average {load[0]:.1f} "
        f"before, {load[1]:.1f} after. One source video per run: 30 fps, 48 kHz stereo AAC speech-like "
        "audio; wav2vec2 `--random-init` at the base size (12 layers, hidden 768: wav2vec2-base's cost), "
        "segments of 20 s + 2 x 2 s context, 500 ms windows, float16 cache.",
        "",
        "| configuration | video | real-time multiple | decode + resample share | wall multiple | peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rt = r["audio_seconds"] / r["seconds"]
        lines.append(f"| {r['label']} | {r['minutes']:g} min | {rt:.1f}x | "
                     f"{100 * r['decode_seconds'] / r['seconds']:.1f} % | "
                     f"{r['audio_seconds'] / r['wall_seconds']:.1f}x | {r['rss_mb']:.0f} MB |")
    by_config: dict[str, list[float]] = {}
    for r in results:
        if r["minutes"] == max(lengths.values()):
            by_config.setdefault(r["label"], []).append(r["audio_seconds"] / r["seconds"])
    lines += ["", f"Against the target (>= {TARGET_REALTIME:g}x real time, wav2vec2-base-sized, bf16, end "
              "to end):"]
    for label, values in by_config.items():
        median = statistics.median(values)
        verdict = "met" if median >= TARGET_REALTIME else "NOT met"
        lines.append(f"- {label}: {median:.1f}x on the long video (median of {len(values)}): {verdict}")
    rss = {}
    for r in results:
        rss.setdefault(r["label"], {}).setdefault(r["minutes"], []).append(r["rss_mb"])
    lines += ["", "Peak memory, short against long video (the rows written to the cache, 2 bytes x 768 per "
              "frame = 41 MB per 15 minutes, are the only thing that grows with length):"]
    for label, by_len in rss.items():
        parts = [f"{m:g} min: {max(v):.0f} MB" for m, v in sorted(by_len.items())]
        lines.append(f"- {label}: {', '.join(parts)}")
    lines += [
        "",
        "- real-time multiple: seconds of audio per second of `run_extraction`'s own loop (probing, "
        "decoding twice, whole-track statistics, encoding, pooling, writing the parts); *wall* also counts "
        "building the model and consolidating the file.",
        "- decode + resample share: reading the frames' timestamps, then decoding the AAC track and "
        "resampling it to 16 kHz mono, twice (the first pass feeds the whole-track statistics), out of the "
        "loop's time.",
        "- The default layer is the middle one (6 of 12): layers above it are not computed. `--layer 12` "
        "runs the whole model.",
    ]
    return "\n".join(lines)


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=float, default=1.0, help="minutes of the short video (default 1)")
    parser.add_argument("--long", type=float, default=15.0, help="minutes of the long video (default 15)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration on the long video")
    parser.add_argument("--quick", action="store_true",
                        help="a 1 and a 3 min video (both longer than one segment, so their peak memory "
                             "compares), one run each, default layer only; never writes the docs")
    parser.add_argument("--no-write", dest="write", action="store_false", help="do not touch the docs")
    parser.add_argument("--results", help="also save the raw measurements to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    if args.quick:
        args.short, args.long, args.rounds, args.write = 1.0, 3.0, 1, False

    command = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])
    load_before = os.getloadavg()[0]
    lengths = {"short": args.short, "long": args.long}
    configs = [("wav2vec2-base bf16, default layer (6)", None)]
    if not args.quick:
        configs.append(("wav2vec2-base bf16, --layer 12", 12))
    results = []
    with tempfile.TemporaryDirectory(prefix="abawfeat-bench-audio-") as tmp_name:
        tmp = Path(tmp_name)
        trees = {}
        for key, minutes in lengths.items():
            trees[key] = make_tree(tmp / key, f"bench{key}", minutes * 60)
            print(f"{key} video: {minutes:g} min", flush=True)
        serial = 0
        for rnd in range(args.rounds):
            for label, layer in configs:
                for key, minutes in lengths.items():
                    if key == "short" and rnd > 0:
                        continue
                    serial += 1
                    spec = {"label": label, "layer": layer, "precision": "bf16", "minutes": minutes,
                            "data": str(trees[key]), "out": str(tmp / f"out{serial}.h5")}
                    results.append(run_child(spec))
    if args.results:
        Path(args.results).write_text(json.dumps(results, indent=2))
    text = summarise(results, command, (load_before, os.getloadavg()[0]), lengths)
    print()
    print(text)
    if args.write:
        write_section("audio", text)
        print(f"\nwrote the audio section of {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
