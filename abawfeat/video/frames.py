"""Frames of a source, streamed: a video through PyAV one decoded frame at a time (memory does not grow
with its length), a still image as a one-frame video.

Frame k (1-based) is the k-th frame in presentation order, the release's numbering; its time is the
container's timestamp (``pts * time_base``, seconds), so a variable frame rate is followed as recorded.
A frame without a timestamp gets the previous one's plus one frame period. Errors of the container or the
codec are ``DataError`` lines naming the file (``abawfeat.audio.decode``'s handling).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abawfeat.audio.decode import _av_errors, _open, _reason
from abawfeat.errors import DataError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".mts",
                  ".ts", ".3gp")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def is_media(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES and not path.name.startswith(".")


@dataclass(frozen=True)
class Frame:
    number: int  # 1-based, presentation order
    time: float  # seconds, container clock
    rgb: np.ndarray  # uint8 [H, W, 3]


class FrameSource:
    """``with FrameSource(path) as src: for frame in src.frames(every, max_frames): ...``; ``estimate`` is
    the container's frame count (or duration x rate) for progress bars, 0 when unknown."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.still = self.path.suffix.lower() in IMAGE_SUFFIXES
        self.estimate = 1 if self.still else 0
        self.width = self.height = 0
        self._container = None

    def __enter__(self) -> FrameSource:
        if self.still:
            return self
        self._container = _open(self.path)
        streams = self._container.streams.video
        if not streams:
            self.close()
            raise DataError(self.path, "has no video stream")
        stream = streams[0]
        stream.thread_type = "AUTO"  # frame-parallel decoding where the codec allows it
        self.width, self.height = int(stream.codec_context.width), int(stream.codec_context.height)
        frames = int(stream.frames or 0)
        if frames <= 0 and stream.duration and stream.time_base and stream.average_rate:
            frames = int(float(stream.duration * stream.time_base) * float(stream.average_rate))
        self.estimate = frames
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def frames(self, every: int = 1, max_frames: int | None = None) -> Iterator[tuple[int, Frame | None]]:
        """(frame number, Frame) for every ``every``-th frame (1, 1 + every, ...) and (number, None) for the
        frames decoded but skipped, up to frame ``max_frames``."""
        if self.still:
            yield 1, Frame(1, 0.0, self._image())
            return
        assert self._container is not None, "FrameSource.frames() outside its `with` block"
        stream = self._container.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else 30.0
        tb = stream.time_base
        k, last_t = 0, None
        try:
            for frame in self._container.decode(stream):
                k += 1
                if max_frames is not None and k > max_frames:
                    return
                t = float(frame.pts * tb) if frame.pts is not None and tb is not None else None
                if t is None:
                    t = 0.0 if last_t is None else last_t + 1.0 / rate
                last_t = t
                if (k - 1) % every:
                    yield k, None
                    continue
                yield k, Frame(k, t, frame.to_ndarray(format="rgb24"))
        except _av_errors() as exc:
            raise DataError(self.path, f"video cannot be decoded after frame {k} ({_reason(exc)})") from None

    def _image(self) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(self.path, f"cannot be read as an image ({type(exc).__name__})") from None
        self.height, self.width = rgb.shape[:2]
        return rgb
