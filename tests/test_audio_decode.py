"""Decoding source videos (abawfeat/audio/decode.py) and finding them (abawfeat/data/sources.py), on tiny
media files written here with PyAV: frame timestamps at any rate, audio on the container's clock (late start,
holes, AVI and MP4, 44.1 and 48 kHz), downmixing, and the one-line errors."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from abawfeat.audio.decode import SAMPLE_RATE, AudioStream, probe, read_audio, video_frame_times
from abawfeat.data.names import source_video
from abawfeat.data.sources import find_source_videos
from abawfeat.errors import DataError

av = pytest.importorskip("av")


def click_track(n: int, rate: int, clicks: dict[float, float]) -> np.ndarray:
    """Quiet tone with loud 5 ms clicks at the given times (seconds from the track's first sample)."""
    t = np.arange(n) / rate
    x = 0.05 * np.sin(2 * np.pi * 220 * t)
    for at, level in clicks.items():
        i = int(round(at * rate))
        x[i : i + rate // 200] = level
    return x.astype(np.float32)


def write_media(path: Path, *, fps: int = 25, times: list[float] | None = None, n_frames: int = 50,
                audio: np.ndarray | None = None, rate: int = 48_000, audio_start: float = 0.0,
                hole: tuple[float, float] | None = None) -> Path:
    """A small video: mpeg4 frames at ``times`` (default k / fps) and optionally a stereo track [2, n]
    starting at ``audio_start`` on the container clock (AAC in .mp4, 16-bit PCM in .avi); ``hole`` =
    (at, length) seconds of the track left out of the file (its timestamps jump)."""
    avi = path.suffix == ".avi"
    container = av.open(str(path), "w")
    video = container.add_stream("mpeg4", rate=fps)
    video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
    tb = Fraction(1, 1000) if times is not None else Fraction(1, fps)
    video.codec_context.time_base = tb
    stamps = times if times is not None else [k / fps for k in range(n_frames)]
    stream = None
    if audio is not None:
        stream = container.add_stream("pcm_s16le" if avi else "aac", rate=rate)
        stream.layout = "stereo"
    for k, t in enumerate(stamps):
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), k % 255, np.uint8), format="rgb24")
        frame.pts, frame.time_base = int(round(t / tb)), tb
        for packet in video.encode(frame):
            container.mux(packet)
    for packet in video.encode():
        container.mux(packet)
    if stream is not None and audio is not None:
        size = stream.codec_context.frame_size or 1024
        first = int(round(audio_start * rate))
        skip = (int(hole[0] * rate), int((hole[0] + hole[1]) * rate)) if hole else (-1, -1)
        for pos in range(0, audio.shape[1], size):
            if skip[0] <= pos < skip[1]:
                continue
            block = np.ascontiguousarray(audio[:, pos : pos + size])
            if avi:
                pcm = (block.T.reshape(1, -1) * 32767).astype(np.int16)
                frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
            else:
                frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, first + pos, Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    container.close()
    return path


def first_click(start: float, samples: np.ndarray, threshold: float = 0.4) -> float:
    return start + int(np.argmax(np.abs(samples) > threshold)) / SAMPLE_RATE


def test_cfr_and_vfr_frame_times_come_from_the_container(tmp_path: Path) -> None:
    cfr = write_media(tmp_path / "a.mp4", fps=25, n_frames=40)
    np.testing.assert_allclose(video_frame_times(cfr), np.arange(40) / 25, atol=1e-9)
    stamps = [0.0, 0.033, 0.066, 0.2, 0.233, 0.5, 0.52, 0.9]  # irregular: a variable frame rate
    vfr = write_media(tmp_path / "b.mp4", fps=30, times=stamps)
    np.testing.assert_allclose(video_frame_times(vfr), stamps, atol=1e-9)
    # The packets' timestamps are those of the decoded frames.
    with av.open(str(vfr)) as container:
        decoded = [float(f.pts * f.time_base) for f in container.decode(video=0)]
    np.testing.assert_allclose(video_frame_times(vfr), decoded, atol=1e-9)
    avi = write_media(tmp_path / "c.avi", fps=24, n_frames=30)
    np.testing.assert_allclose(video_frame_times(avi), np.arange(30) / 24, atol=1e-9)


# AVI has no start time per stream (its muxer writes audio from zero), so a late start is an MP4 case.
@pytest.mark.parametrize(("suffix", "rate", "audio_start"),
                         [(".mp4", 48_000, 0.0), (".mp4", 48_000, 0.8), (".avi", 44_100, 0.0)])
def test_audio_lands_on_the_container_clock(tmp_path: Path, suffix: str, rate: int,
                                           audio_start: float) -> None:
    track = click_track(int(2.0 * rate), rate, {0.5: 0.9})
    stereo = np.stack([track, track])
    path = write_media(tmp_path / f"v{suffix}", audio=stereo, rate=rate, audio_start=audio_start, n_frames=75)
    info = probe(path)
    assert info.has_audio and info.audio_rate == rate and info.audio_channels == 2
    start, samples = read_audio(path)
    # The click was at audio_start + 0.5 s on the video's clock; AAC's priming samples and the resampler
    # move the decoded start, never the click (to within 2 ms).
    assert first_click(start, samples) == pytest.approx(audio_start + 0.5, abs=0.002)
    assert start == pytest.approx(audio_start, abs=0.03)
    assert len(samples) / SAMPLE_RATE == pytest.approx(2.0, abs=0.07)
    assert samples.dtype == np.float32


def test_a_hole_in_the_track_becomes_silence(tmp_path: Path) -> None:
    rate = 48_000
    track = click_track(3 * rate, rate, {0.3: 0.9, 2.5: -0.9})
    path = write_media(tmp_path / "hole.mp4", audio=np.stack([track, track]), rate=rate, n_frames=75,
                       hole=(1.0, 0.6))
    with AudioStream(path, block_seconds=0.25) as stream:
        samples = np.concatenate(list(stream.blocks()))
        filled = stream.filled
    assert filled == pytest.approx(0.6 * SAMPLE_RATE, abs=0.05 * SAMPLE_RATE)
    # The click after the hole is still where it was played.
    late = np.flatnonzero(samples < -0.4)[0]
    assert stream.start_time + late / SAMPLE_RATE == pytest.approx(2.5, abs=0.002)
    assert np.abs(samples[int(1.1 * SAMPLE_RATE) : int(1.5 * SAMPLE_RATE)]).max() == 0.0


def test_stereo_is_mixed_to_mono_and_blocks_are_bounded(tmp_path: Path) -> None:
    rate = 48_000
    t = np.arange(int(1.5 * rate)) / rate
    left = (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    path = write_media(tmp_path / "mix.avi", audio=np.stack([left, np.zeros_like(left)]), rate=rate,
                       n_frames=40)
    both = write_media(tmp_path / "both.avi", audio=np.stack([left, left]), rate=rate, n_frames=40)
    assert np.abs(read_audio(both)[1]).max() == pytest.approx(0.5, abs=0.01)  # a centred voice keeps its
    # level
    with AudioStream(path, block_seconds=0.2) as stream:
        blocks = list(stream.blocks())
    assert all(len(b) >= 0.2 * SAMPLE_RATE for b in blocks[:-1])
    assert max(len(b) for b in blocks) < 0.2 * SAMPLE_RATE + 2048  # one block plus one decoded frame
    mono = np.concatenate(blocks)
    # The mean of the channels: a left-only tone of amplitude 0.5 becomes 0.25 (libswresample's own downmix
    # would give 0.354).
    rms = float(np.sqrt(np.mean(mono[SAMPLE_RATE // 10 : -SAMPLE_RATE // 10] ** 2)))
    assert rms == pytest.approx(0.25 / np.sqrt(2), rel=0.01)


def test_no_audio_stream_and_unreadable_files_are_one_line_errors(tmp_path: Path) -> None:
    silent = write_media(tmp_path / "silent.mp4", n_frames=10)
    assert not probe(silent).has_audio and probe(silent).has_video
    with pytest.raises(DataError, match="has no audio stream"):
        AudioStream(silent).__enter__()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 10)
    for call in (probe, video_frame_times, read_audio):
        with pytest.raises(DataError) as info:
            call(broken)
        assert str(broken) in str(info.value) and "\n" not in str(info.value)


def test_source_search_finds_release_layouts_and_pairs(tmp_path: Path) -> None:
    root = tmp_path / "Aff-Wild2"
    for rel in ("videos/batch1/1-30-1280x720.mp4", "videos/batch2/video10.avi", "raw_video/2-24-640x360.mp4",
                "new_vids/sub/video5.MP4", "videos/batch1/notes.txt", ".hidden/video9.mp4",
                "cropped_aligned/video7/video7.mp4", "videos/batch2/1-30-1280x720.avi"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    index = find_source_videos(root, skip=[root / "cropped_aligned/video7"])
    assert sorted(index.files) == ["1-30-1280x720", "2-24-640x360", "video10", "video5"]
    # .mp4 is preferred over .avi for the same name, and the duplicate is reported.
    assert index.files["1-30-1280x720"].suffix == ".mp4" and len(index.duplicates["1-30-1280x720"]) == 2
    assert index.find("video10_left") == index.find("video10_right") == index.files["video10"]
    assert index.find("video5") == root / "new_vids/sub/video5.MP4"
    assert index.find("video7") is None  # inside a crop folder: not searched
    assert source_video("a_left") == "a" and source_video("a_right") == "a"
    assert source_video("_left") == "_left"
