"""Stage one for the audio modality: speech-encoder features per crop frame, in the face caches' schema.

``run_audio_locked`` is what ``abawfeat extract --backbone wav2vec2|hubert|wavlm`` runs: abawfeat/extract.py's
``run_extraction`` dispatches on the encoder's ``modality`` once it holds the cache lock. It reads top to
bottom like the face loop and reuses its parts: video selection, the encoder options, the cache writer
(provenance, atomic parts, resume after ``kill -9``, a full disk in one line), torchrun shares and the
progress bar. What differs is the input: for each video with
crops it finds the source video file in the tree (abawfeat/data/sources.py), reads the frames' timestamps
and streams the audio (abawfeat/audio/decode.py), runs the encoder segment by segment and pools its 50 Hz
outputs over a window centred on each crop frame's timestamp (abawfeat/audio/stream.py).

The cache then has one row per crop frame number whose window holds audio, exactly like a face cache has one
row per crop that decoded: ``/videos/<video>/frames`` are crop frame numbers, and the crop frames that got no
row (the audio starts late or ends early, or there is no audio stream) are listed in ``bad_frames``, so that
``frames`` + ``bad_frames`` are exactly the crop folder's frames and ``abawfeat cache verify`` checks it.
Nothing is zero-filled: stage two masks frames a cache lacks. The two halves of a ``_left``/``_right`` pair
share one source video, which is decoded and encoded once for both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from abawfeat.audio.decode import SAMPLE_RATE, AudioStream, probe, video_frame_times
from abawfeat.audio.stream import FrameGeometry, WindowPooler, encode_stream, window_of
from abawfeat.cache import CacheWriter, make_provenance
from abawfeat.data.sources import SourceIndex, find_source_videos
from abawfeat.errors import ConfigError, DataError
from abawfeat.stage_one import ExtractConfig, ExtractResult
from abawfeat.utils.configs import to_dict

if TYPE_CHECKING:
    import torch

    from abawfeat.data.affwild2 import AffWild2
    from abawfeat.encoders.speech import SpeechEncoder

BLOCK_SECONDS = 10.0  # decoded audio handed to the segmenter at a time (memory: 640 kB a block)


@dataclass
class AudioExtractResult(ExtractResult):
    """What one audio run did; ``frames`` counts the rows written (crop frames with audio)."""

    window_ms: float = 0.0  # the encoder's pooling window
    audio_seconds: float = 0.0  # audio decoded in this run
    decode_seconds: float = 0.0  # part of ``seconds`` spent reading timestamps, decoding and resampling
    uncovered: dict[str, int] = field(default_factory=dict)  # video -> crop frames without a row
    no_audio: list[str] = field(default_factory=list)  # source has no audio stream: written without rows
    no_source: list[str] = field(default_factory=list)  # no source video found: not written
    failed: dict[str, str] = field(default_factory=dict)  # video -> why its source could not be read

    @property
    def realtime(self) -> float:
        """Seconds of audio per second of extraction (the encoder's real-time multiple)."""
        return self.audio_seconds / self.seconds if self.seconds > 0 else 0.0

    def summary_lines(self, max_items: int = 20) -> list[str]:
        share = 100.0 * self.decode_seconds / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"{self.out}: {self.videos_done} videos extracted, {self.videos_skipped} already complete "
            f"({self.videos_total} asked for); {self.frames:,} frames with audio rows from "
            f"{self.audio_seconds / 60:,.1f} min of audio in {self.seconds:.1f} s "
            f"({self.realtime:,.1f}x real time, {share:.0f}% of it decoding); window {self.window_ms:g} ms; "
            f"{self.file_size / 1e6:,.1f} MB",
        ]
        if self.uncovered:
            lines.append(
                f"  {sum(self.uncovered.values()):,} crop frames in {len(self.uncovered)} videos have no "
                "audio at their time (late start, early end or no audio stream): no row, listed as "
                "bad_frames")
            for video, n in list(self.uncovered.items())[:max_items]:
                lines.append(f"    {video}: {n:,} frames without audio")
            if len(self.uncovered) > max_items:
                lines.append(f"    ... and {len(self.uncovered) - max_items} more videos")
        if self.no_audio:
            lines.append(f"  no audio stream ({_count(len(self.no_audio), 'video')}, no rows): "
                         f"{', '.join(self.no_audio)}")
        if self.no_source:
            lines.append(f"  no source video found ({_count(len(self.no_source), 'video')}, not written; "
                         f"re-run once the files are there): {', '.join(self.no_source)}")
        for video, reason in list(self.failed.items())[:max_items]:
            lines.append(f"  {video}: not written: {reason}")
        return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def alignment_record(window_ms: float) -> dict[str, Any]:
    """How rows were made from the encoder's outputs: part of the cache's preprocessing (its identity)."""
    return {
        "window_ms": float(window_ms),
        "pooling": "mean of the encoder outputs centred in [t - window/2, t + window/2]",
        "frame_time": "pts * time_base of the source video's frame (container clock)",
        "rows": "one per crop frame whose window holds an output; the others are listed in bad_frames",
    }


def check_audio_config(config: ExtractConfig) -> None:
    """The face loop's options that mean nothing for audio are refused rather than ignored."""
    if config.compile:
        raise ConfigError("--compile applies to face encoders; audio encoders run eagerly")
    if config.batch_size is not None:
        raise ConfigError("--batch-size applies to face encoders; audio is encoded one segment at a time")


# ------------------------------------------------------------------------------------------------ the run


def run_audio_locked(config: ExtractConfig, dataset: AffWild2, out: Path, lock: int | None,
                     encoder: SpeechEncoder | None, info: Any, distributed: bool,
                     device: torch.device) -> AudioExtractResult:
    """The audio run once rank 0 holds the cache lock (abawfeat/extract.py ``run_extraction`` takes it):
    source videos, encoder, provenance, writer, loop."""
    from abawfeat.stage_one import prepare_encoder, select_videos, write_cache
    from abawfeat.utils.progress import warn

    # 2. Dataset, and the source videos that carry the audio.
    all_videos = sorted(dataset.videos_with_crops())
    if not all_videos:
        raise DataError(config.data, "no crop folders found (expected cropped_aligned/<video>/NNNNN.jpg)")
    selected = select_videos(all_videos, config.videos, config.data)
    skip = [d for d in (dataset.annotations_dir, *(dataset.crop_dir(v) for v in all_videos)) if d is not None]
    sources = find_source_videos(dataset.root, skip)
    if not len(sources):
        raise DataError(dataset.root, "no source videos (.mp4, .avi, ...) under this folder; the audio is "
                                      "read from them (see docs/audio.md)")
    if info.is_main:
        for name, paths in sources.duplicates.items():
            if any(sources.find(v) == paths[0] for v in selected):
                warn(f"several source files for {name}: using {paths[0]} (also: "
                     f"{', '.join(str(p) for p in paths[1:])})")

    # 3. Encoder: seeded when random, so a resumed run (or another rank) builds the very same one.
    encoder = prepare_encoder(config, encoder, info)
    enc_prov = dict(encoder.provenance())
    enc_prov["preprocessing"] = {**enc_prov["preprocessing"],
                                 "alignment": alignment_record(encoder.config.window_ms)}
    provenance = make_provenance(
        enc_prov, feature_dim=encoder.feature_dim, dtype=config.dtype, precision=config.precision,
        logit_names=None, extract_config=to_dict(config),
        tree={"root": str(Path(config.data).resolve()), "name": dataset.name},
    )

    # 4. Writer: rank 0 (holding the lock) checks an existing cache first (see abawfeat/extract.py).
    writer = CacheWriter(out, provenance, lock=info.is_main, consolidate_on_exit=info.is_main, held_lock=lock,
                         tree=dataset)
    result = write_cache(writer, info, distributed, lambda: _extract(
        config, dataset, sources, encoder, writer, selected, out, device, info, distributed))
    result.window_ms = float(encoder.config.window_ms)
    if info.is_main and out.exists():
        result.file_size = out.stat().st_size
    return result


def _extract(
    config: ExtractConfig,
    dataset: AffWild2,
    sources: SourceIndex,
    encoder: SpeechEncoder,
    writer: CacheWriter,
    selected: list[str],
    out: Path,
    device: torch.device,
    info: Any,
    distributed: bool,
) -> AudioExtractResult:
    import torch

    from abawfeat.stage_one import agree, balance_videos
    from abawfeat.utils.device import autocast
    from abawfeat.utils.progress import make_progress

    done = writer.done_videos()
    agree(distributed, True)  # every rank sees the same "done" set before any writes
    pending = [v for v in selected if v not in done]
    # One unit of work per source file: the halves of a pair share it. Videos without a file are units alone.
    groups: dict[str, list[str]] = {}
    for video in pending:
        path = sources.find(video)
        groups.setdefault(str(path) if path is not None else f"\0{video}", []).append(video)
    keys = sorted(groups)
    sizes = [sum(len(dataset.crop_frames(v)) for v in groups[k]) for k in keys]
    mine = balance_videos(keys, sizes, info.rank, info.world_size)

    # No requires_grad trick for autocast's weight-cast cache here (abawfeat/extract.py _prepare_model): one
    # forward pass covers a whole 24 s segment, next to which re-casting the weights once is small.
    encoder.to(device)
    run = _Run(config, dataset, encoder, writer, np.dtype(config.dtype))
    start = time.perf_counter()
    durations = {}
    for key in mine:
        if not key.startswith("\0"):
            try:
                durations[key] = probe(key).duration
            except DataError:
                durations[key] = 0.0
    run.decode_seconds += time.perf_counter() - start
    ok = False
    try:
        progress = make_progress("audio s", disable=None if (config.progress and info.is_main) else True)
        with progress, torch.no_grad(), autocast(device, config.precision):
            total = sum(durations.values())
            task = progress.add_task(f"{config.backbone} 0/{len(mine)} sources", total=total)
            for i, key in enumerate(mine):
                run.source(key, groups[key], lambda s: progress.advance(task, s))
                progress.update(task, description=f"{config.backbone} {i + 1}/{len(mine)} sources")
        ok = True
    finally:
        stats = run.stats()
        if distributed:
            # Gathering the stats doubles as the barrier before rank 0 consolidates; a failed rank says so.
            import torch.distributed as tdist

            gathered: list[Any] = [None] * info.world_size
            tdist.all_gather_object(gathered, (ok, stats))
    seconds = time.perf_counter() - start
    if distributed:
        if not all(g[0] for g in gathered):
            raise ConfigError(f"{out}: a torchrun rank failed; completed videos are kept, re-run to resume")
        stats = _merge([g[1] for g in gathered])
    return AudioExtractResult(
        out=out, backbone=config.backbone, videos_total=len(selected), videos_done=stats["videos"],
        videos_skipped=len(selected) - len(pending), frames=stats["rows"], seconds=seconds,
        random_init=config.random_init, audio_seconds=stats["audio_seconds"],
        decode_seconds=stats["decode_seconds"], uncovered=dict(sorted(stats["uncovered"].items())),
        no_audio=sorted(stats["no_audio"]), no_source=sorted(stats["no_source"]),
        failed=dict(sorted(stats["failed"].items())),
    )


class _Run:
    """Per-source work and the run's tallies (one per rank)."""

    def __init__(self, config: ExtractConfig, dataset: AffWild2, encoder: SpeechEncoder, writer: CacheWriter,
                 dtype: np.dtype) -> None:
        self.config = config
        self.dataset = dataset
        self.encoder = encoder
        self.writer = writer
        self.dtype = dtype
        self.geometry = FrameGeometry(SAMPLE_RATE, encoder.hop, encoder.receptive_field)
        self.window_s = window_of(float(encoder.config.window_ms))
        self.videos = 0
        self.rows = 0
        self.audio_seconds = 0.0
        self.decode_seconds = 0.0
        self.uncovered: dict[str, int] = {}
        self.no_audio: list[str] = []
        self.no_source: list[str] = []
        self.failed: dict[str, str] = {}

    def stats(self) -> dict[str, Any]:
        return {"videos": self.videos, "rows": self.rows, "audio_seconds": self.audio_seconds,
                "decode_seconds": self.decode_seconds, "uncovered": self.uncovered, "no_audio": self.no_audio,
                "no_source": self.no_source, "failed": self.failed}

    def write(self, video: str, frames: np.ndarray, rows: np.ndarray, missing: np.ndarray) -> None:
        self.writer.write_video(video, frames, rows, bad_frames=missing)
        self.videos += 1
        self.rows += len(frames)
        if len(missing):
            self.uncovered[video] = len(missing)

    def source(self, key: str, videos: list[str], advance: Any) -> None:
        """Decode one source file once and write every video (one, or a _left/_right pair) that uses it."""
        from abawfeat.utils.progress import warn

        if key.startswith("\0"):
            warn(f"{videos[0]}: no source video found under {self.dataset.root} (looked for "
                 f"{videos[0]}.mp4/.avi, or its pair's name); not written")
            self.no_source += videos
            return
        path = Path(key)
        frames_of = {v: np.asarray(self.dataset.crop_frames(v), dtype=np.int32) for v in videos}
        try:
            t0 = time.perf_counter()
            media = probe(path)
            if not media.has_audio:
                # "No audio" is only said of a real video of these crops: a file that merely has the name
                # (an image, a text, another container renamed .mp4) would otherwise be cached as a silent
                # video, complete with no rows, and the corrected file later skipped as already done.
                _check_silent_source(path, media, frames_of)
                self.decode_seconds += time.perf_counter() - t0
                verb = "gets" if len(videos) == 1 else "get"
                warn(f"{path}: no audio stream; {' and '.join(videos)} {verb} no audio rows")
                for v in videos:
                    f = frames_of[v]
                    empty = np.zeros((0, self.encoder.feature_dim), self.dtype)
                    self.write(v, np.zeros(0, np.int32), empty, f)
                    self.no_audio.append(v)
                advance(media.duration)
                return
            times = video_frame_times(path)
            self.decode_seconds += time.perf_counter() - t0
            self._encode(path, videos, frames_of, times, advance)
        except DataError as exc:
            warn(f"{exc}; not written: {', '.join(videos)}")
            for v in videos:
                self.failed[v] = str(exc)

    def _encode(self, path: Path, videos: list[str], frames_of: dict[str, np.ndarray], times: np.ndarray,
                advance: Any) -> None:
        from abawfeat.utils.progress import warn

        encoder = self.encoder
        # Two passes over the track, each decoding it (decoding is far faster than the encoder,
        # docs/performance.md): the first for the whole-track statistics that make segments match a one-shot
        # pass (encoders/speech.py), the second to encode. Holding the decoded track instead would need memory
        # growing with its length.
        with AudioStream(path, BLOCK_SECONDS) as audio:
            stats = encoder.track_statistics(audio.blocks())
            self.decode_seconds += audio.decode_seconds
        with AudioStream(path, BLOCK_SECONDS) as audio, encoder.use_track(stats):
            poolers = {}
            for v in videos:
                frames = frames_of[v]
                t = np.full(len(frames), np.nan)
                inside = frames <= len(times)
                t[inside] = times[frames[inside] - 1]
                if not inside.all():
                    warn(f"{v}: crops go up to frame {int(frames.max())} but {path} has {len(times)} video "
                         f"frames; the {int((~inside).sum())} frames past its end get no audio row")
                poolers[v] = WindowPooler(frames, t, audio.start_time, self.geometry, self.window_s,
                                          encoder.feature_dim, self.dtype)

            def blocks() -> Any:
                for block in audio.blocks():
                    yield block
                    advance(len(block) / SAMPLE_RATE)

            def forward(samples: np.ndarray) -> np.ndarray:
                outputs = encoder.encode(samples)
                release_freed_memory()
                return outputs

            segments = encode_stream(blocks(), forward, self.geometry, encoder.chunk, encoder.context)
            for j0, outputs in segments:
                for pooler in poolers.values():
                    pooler.add(j0, outputs)
            if audio.samples != stats.n_samples:
                raise DataError(path, f"decoded {audio.samples} audio samples, then {stats.n_samples} when "
                                      "decoded again; the file cannot be read consistently")
            n_outputs = self.geometry.n_outputs(audio.samples)
            for v, pooler in poolers.items():
                pooler.finish(n_outputs)
                self.write(v, *pooler.result())
            self.audio_seconds += audio.samples / SAMPLE_RATE
            self.decode_seconds += audio.decode_seconds


def _check_silent_source(path: Path, media: Any, frames_of: dict[str, np.ndarray]) -> None:
    """Refuse (a DataError: the video is not written) a source without audio that is not the video its crops
    were cut from: no video stream, or fewer frames than the last crop's number."""
    if not media.has_video:
        raise DataError(path, "is not a video (no video or audio stream)")
    last = max((int(f.max()) for f in frames_of.values() if len(f)), default=0)
    n = len(video_frame_times(path))
    if n < last:
        raise DataError(path, f"has {n} video frame(s) and no audio, but the crops go up to frame {last}: it "
                              "is not the video they were cut from")


def release_freed_memory() -> None:
    """Hand memory freed by the last segment back to the system (glibc's ``malloc_trim``; elsewhere a no-op).

    Segments of a new length make oneDNN and the allocator place their large activations elsewhere, and
    glibc keeps the freed space: without this, resident memory grew by 40-80 MB per new segment length
    (measured: 16 segments of mixed lengths, wav2vec2-base bf16, when each video's last segment had a length
    of its own). Tracks longer than a segment now run two shapes only (abawfeat/audio/stream.py); tracks
    shorter than that still bring lengths of their own."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"videos": 0, "rows": 0, "audio_seconds": 0.0, "decode_seconds": 0.0,
                           "uncovered": {}, "no_audio": [], "no_source": [], "failed": {}}
    for p in parts:
        for key in ("videos", "rows", "audio_seconds", "decode_seconds"):
            out[key] += p[key]
        out["uncovered"].update(p["uncovered"])
        out["failed"].update(p["failed"])
        out["no_audio"] += p["no_audio"]
        out["no_source"] += p["no_source"]
    return out
