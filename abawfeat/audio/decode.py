"""Decoding a source video with PyAV: its frame timestamps, and its audio as 16 kHz mono float32 blocks.

Everything is on the container's clock, in seconds: frame k (1-based, presentation order) is shown at
``frame_times[k - 1]`` (its ``pts * time_base``), and audio sample i plays at ``start_time + i / 16000``. Two
tracks that start at different times (audio starting late), a variable frame rate, and an audio track that
ends before the video all fall out of that one clock; nothing assumes 30 fps or a common start.

- Frame timestamps come from the video stream's packets (demuxed, not decoded: a packet holds one frame in
  the codecs the release uses, and demuxing costs a small fraction of decoding). Empty packets (a demuxer's
  flush marker, AVI's "dropped frame" placeholders) are not frames. Timestamps are sorted, so B-frames'
  decode order does not matter.
- Audio is decoded from the best audio stream, resampled to 16 kHz float32 by PyAV's ``AudioResampler``
  (FFmpeg's libswresample, its default windowed-sinc filter) channel by channel, and mixed to mono as the
  mean of the channels, as librosa and torchaudio users do (libswresample's own downmix would give a voice
  recorded on both channels +3 dB, and its level would then depend on the channel layout). Streamed in
  blocks, so memory does not grow with the length of the video. The time of the first
  sample is the first converted frame's timestamp. A hole in the track's timestamps is filled with silence
  and an overlap dropped, so sample i stays at ``start_time + i / 16000``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from abawfeat.errors import DataError

SAMPLE_RATE = 16_000
# Timestamp disagreements smaller than this are rounding in the containers' time bases, not holes.
_GAP_TOLERANCE_S = 0.001


def _av() -> Any:
    import av

    return av


def _av_errors() -> tuple[type[BaseException], ...]:
    return (_av().FFmpegError, OSError, ValueError)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _open(path: Path) -> Any:
    try:
        return _av().open(str(path))
    except _av_errors() as exc:
        raise DataError(path, f"cannot be opened as a video ({_reason(exc)})") from None


@dataclass(frozen=True)
class MediaInfo:
    """What the container says about a source video, without decoding it."""

    path: Path
    has_video: bool
    has_audio: bool
    duration: float  # seconds, the container's estimate (progress bars); 0.0 when unknown
    audio_codec: str | None = None
    audio_rate: int | None = None  # the stream's own sample rate
    audio_channels: int | None = None


def probe(path: str | Path) -> MediaInfo:
    """Stream layout and duration from the container's header (fast: nothing is decoded)."""
    path = Path(path)
    container = _open(path)
    try:
        audio = container.streams.best("audio")
        duration = float(container.duration) / 1_000_000 if container.duration else 0.0
        if duration <= 0 and audio is not None and audio.duration and audio.time_base:
            duration = float(audio.duration * audio.time_base)
        return MediaInfo(
            path=path,
            has_video=bool(container.streams.video),
            has_audio=audio is not None,
            duration=max(duration, 0.0),
            audio_codec=None if audio is None else audio.codec_context.name,
            audio_rate=None if audio is None else int(audio.codec_context.sample_rate or 0),
            audio_channels=None if audio is None else int(audio.layout.nb_channels),
        )
    finally:
        container.close()


def video_frame_times(path: str | Path) -> np.ndarray:
    """float64 [N]: the presentation time in seconds of every frame of the first video stream, ascending;
    frame k (1-based) is ``[k - 1]``."""
    path = Path(path)
    container = _open(path)
    try:
        if not container.streams.video:
            raise DataError(path, "has no video stream")
        stream = container.streams.video[0]
        tb = stream.time_base
        if tb is None:
            raise DataError(path, "video stream has no time base")
        ticks: list[int] = []
        missing = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                t = packet.pts if packet.pts is not None else packet.dts
                if t is None:
                    missing += 1
                    continue
                ticks.append(int(t))
        except _av_errors() as exc:
            raise DataError(path, f"video stream cannot be read ({_reason(exc)})") from None
        if missing:
            raise DataError(path, f"{missing} video packets have no timestamp; frame times are unknown")
        times = np.sort(np.asarray(ticks, dtype=np.int64)).astype(np.float64) * float(tb)
        return times
    finally:
        container.close()


class AudioStream:
    """The first (best) audio stream of a file as 16 kHz mono float32, in blocks (a context manager).

    ``start_time`` (seconds, container clock) is known once the stream is opened; ``blocks()`` yields
    contiguous arrays of at least ``block_seconds`` (the last may be shorter). ``decode_seconds`` is the time
    spent decoding and resampling so far (not the consumer's time between blocks); ``filled`` / ``dropped``
    count the samples of silence inserted for holes and of overlaps removed.
    """

    def __init__(self, path: str | Path, block_seconds: float = 10.0) -> None:
        self.path = Path(path)
        self.block_samples = max(1, int(round(block_seconds * SAMPLE_RATE)))
        self.start_time: float = 0.0
        self.samples = 0
        self.filled = 0
        self.dropped = 0
        self.decode_seconds = 0.0
        self._container: Any = None
        self._frames: Iterator[Any] | None = None
        self._first: list[np.ndarray] = []

    def __enter__(self) -> AudioStream:
        t0 = time.perf_counter()
        self._container = _open(self.path)
        stream = self._container.streams.best("audio")
        if stream is None:
            self.close()
            raise DataError(self.path, "has no audio stream")
        self._frames = self._converted(stream)
        # Decode up to the first converted samples now, so that start_time is known before any block.
        for start, samples in self._frames:
            if np.isnan(start):  # a track without timestamps starts where the stream says, or at zero
                start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            self.start_time = start
            self._first.append(samples)
            break
        self.decode_seconds += time.perf_counter() - t0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def _converted(self, stream: Any) -> Iterator[tuple[float, np.ndarray]]:
        """(time of the frame's first sample or nan, mono float32 samples) per converted frame."""
        av = _av()
        resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)  # planar, the stream's channels
        try:
            for packet in self._container.demux(stream):
                for frame in packet.decode():
                    for out in resampler.resample(frame):
                        yield _frame_time(out), _mono(out)
            for out in resampler.resample(None):
                yield _frame_time(out), _mono(out)
        except _av_errors() as exc:
            raise DataError(self.path, f"audio stream cannot be decoded ({_reason(exc)})") from None

    def blocks(self) -> Iterator[np.ndarray]:
        """Contiguous float32 blocks; sample i of the whole stream plays at ``start_time + i / 16000``."""
        if self._frames is None:
            raise RuntimeError("AudioStream.blocks() outside its `with` block")
        pending: list[np.ndarray] = []
        n_pending = 0
        t0 = time.perf_counter()

        def frames() -> Iterator[tuple[float, np.ndarray]]:
            for samples in self._first:
                yield self.start_time, samples
            self._first = []
            assert self._frames is not None
            yield from self._frames

        for start, samples in frames():
            if not np.isnan(start):
                # Where this frame should begin, in samples from the stream's start, against where the
                # samples so far end: a hole becomes silence, an overlap is cut.
                offset = int(round((start - self.start_time) * SAMPLE_RATE)) - (self.samples + n_pending)
                if offset > _GAP_TOLERANCE_S * SAMPLE_RATE:
                    pending.append(np.zeros(offset, np.float32))
                    n_pending += offset
                    self.filled += offset
                elif offset < -_GAP_TOLERANCE_S * SAMPLE_RATE:
                    cut = min(-offset, len(samples))
                    samples = samples[cut:]
                    self.dropped += cut
            if len(samples):
                pending.append(np.asarray(samples, dtype=np.float32))
                n_pending += len(samples)
            if n_pending >= self.block_samples:
                block = np.concatenate(pending)
                pending, n_pending = [], 0
                self.samples += len(block)
                self.decode_seconds += time.perf_counter() - t0
                yield block
                t0 = time.perf_counter()
        if n_pending:
            block = np.concatenate(pending)
            self.samples += len(block)
            self.decode_seconds += time.perf_counter() - t0
            yield block
        else:
            self.decode_seconds += time.perf_counter() - t0


def _mono(frame: Any) -> np.ndarray:
    """The mean of a planar float frame's channels, float32."""
    planes = frame.to_ndarray()  # [channels, n]
    return planes[0].astype(np.float32) if planes.shape[0] == 1 else planes.mean(axis=0, dtype=np.float32)


def _frame_time(frame: Any) -> float:
    if frame.pts is None or frame.time_base is None:
        return float("nan")
    return float(frame.pts * frame.time_base)


def read_audio(path: str | Path) -> tuple[float, np.ndarray]:
    """The whole track at once: (start time, float32 samples); for tests and short files (extraction
    streams)."""
    with AudioStream(path) as stream:
        blocks = list(stream.blocks())
        return stream.start_time, (np.concatenate(blocks) if blocks else np.zeros(0, np.float32))
