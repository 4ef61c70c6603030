"""What the cache's checksums cost stage two: reading a whole cache with ``FeatureCache.load_all``.

Writes one synthetic cache (``--mb`` of float16 features, 512-d, videos of 1,000-1,222 frames) twice with the
same data: as abawfeat writes it (format 2: fletcher32 on every dataset, one chunk per dataset) and in the
format-1 layout (contiguous, no checksum). Then reads each whole, alternately, ``--repeats`` times, from the
page cache (the file is read once before timing): that isolates the CPU cost of the checksum, the worst case
for the ratio, since a read from disk adds the same I/O time to both. For reference it also times a SHA-256
and a CRC-32 over the same bytes after a contiguous read (what a per-video digest checked on read would
cost). Results go to docs/performance.md (section "cache").

    python benchmarks/cache_read.py --mb 340 --repeats 7
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
from perfdoc import write_section  # benchmarks/perfdoc.py (scripts run from benchmarks/)

from abawfeat.cache import CacheWriter, FeatureCache, _set_root_attrs, make_provenance

DIM = 512


def _videos(mb: float, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out, total = [], 0
    while total < mb * 1e6:
        t = 1000 + int(rng.integers(0, 223))
        out.append((np.arange(1, t + 1, dtype=np.int32), rng.normal(size=(t, DIM)).astype(np.float16)))
        total += t * DIM * 2
    return out


def _provenance() -> dict:
    enc = {"name": "bench", "config": {}, "weights_sha256": "random-init", "preprocessing": {}}
    return make_provenance(enc, feature_dim=DIM, dtype="float16", precision="fp32")


def write_v2(path: Path, videos: list[tuple[np.ndarray, np.ndarray]]) -> None:
    with CacheWriter(path, _provenance()) as writer:
        for i, (frames, feats) in enumerate(videos):
            writer.write_video(f"v{i:04d}", frames, feats)


def write_v1(path: Path, videos: list[tuple[np.ndarray, np.ndarray]]) -> None:
    with h5py.File(path, "w") as fh:
        _set_root_attrs(fh, {**_provenance(), "format_version": 1})
        for i, (frames, feats) in enumerate(videos):
            group = fh.create_group(f"videos/v{i:04d}")
            group["features"] = feats
            group["frames"] = frames
            group["bad_frames"] = np.zeros(0, np.int32)
            group.attrs["n_crops"] = len(frames)


def read_all(path: Path, digest: str | None = None) -> int:
    with FeatureCache(path) as cache:
        data = cache.load_all()
    if digest == "sha256":
        for _, feats in data.values():
            hashlib.sha256(feats).digest()
    elif digest == "crc32":
        for _, feats in data.values():
            zlib.crc32(feats)
    return sum(f.nbytes for _, f in data.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=340.0, help="feature bytes in the cache, in MB")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md")
    args = parser.parse_args()
    videos = _videos(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        v2, v1 = Path(tmp) / "v2.h5", Path(tmp) / "v1.h5"
        write_v2(v2, videos)
        write_v1(v1, videos)
        cases = {"format 1 (contiguous, no checksum)": (v1, None),
                 "format 2 (fletcher32, one chunk per dataset)": (v2, None),
                 "format 1 + SHA-256 over the features": (v1, "sha256"),
                 "format 1 + CRC-32 over the features": (v1, "crc32")}
        nbytes = read_all(v1)
        for path, _ in cases.values():
            read_all(path)  # into the page cache
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, (path, digest) in cases.items():
                start = time.perf_counter()
                read_all(path, digest)
                times[name].append(time.perf_counter() - start)
        sizes = {name: path.stat().st_size for name, (path, _) in cases.items()}
    base = statistics.median(times["format 1 (contiguous, no checksum)"])
    lines = [
        "## Reading a cache: the cost of its checksums",
        "",
        f"`python benchmarks/cache_read.py --mb {args.mb:g} --repeats {args.repeats}`: one synthetic cache, "
        f"{len(videos)} videos, {nbytes / 1e6:,.0f} MB of 512-d float16 features, read whole with "
        "`FeatureCache.load_all` (as stage two does) from the page cache, median of "
        f"{args.repeats} alternating reads. From the page cache the checksum's CPU cost is all there is; a "
        "read from disk adds the same I/O time to every row, so the ratio there is smaller.",
        "",
        "| layout | file MB | read s | GB/s | vs format 1 |",
        "|---|---|---|---|---|",
    ]
    for name, values in times.items():
        t = statistics.median(values)
        lines.append(f"| {name} | {sizes[name] / 1e6:,.0f} | {t:.3f} | {nbytes / t / 1e9:.2f} | "
                     f"{t / base:.2f}x |")
    extra = (statistics.median(times["format 2 (fletcher32, one chunk per dataset)"]) - base) * 3e9 / nbytes
    lines += [
        "",
        "fletcher32 is checked by HDF5 in C on every read by any program, so no reader can use damaged bytes "
        "by mistake; a per-video digest would be checked only where our code asks for it, and SHA-256 costs "
        f"more. At 3 GB (about the VA train split in float16) the checksum adds about {extra:.1f} s to a "
        "load whose features training then uses for minutes.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("cache", text)


if __name__ == "__main__":
    main()
