"""Source videos with sound for the synthetic tree (``abawfeat synth --videos-with-audio``).

Each source video holds the rendered crops as its frames (the two halves of a ``_left``/``_right`` pair side
by side; a frame without a crop shows the empty scene) and an audio track of a synthetic voice whose
loudness, pitch, brightness, speaking rate and pauses follow that person's valence and arousal, frame by
frame on the video's clock, over a noise floor with stretches of digital silence. The voice follows the
*labels*, which include what the face does not show (abawfeat/data/synth.py draws part of valence/arousal
independently of the face state), so on this data audio carries information about arousal that the face
lacks: that is what the demo can measure.

The release's awkward cases are planted at known places and written to the manifest (``sources``):
- frame rates read from the video names (``12-25-1280x720`` runs at 25 fps), at least one not 30, and one
  video with a variable frame rate (irregular frame durations: its timestamps are listed in the manifest);
- videos without an audio stream, audio starting late, audio ending before the video;
- one ``.avi`` (mpeg4 video, 16-bit PCM audio at 44.1 kHz) among the ``.mp4`` files (mpeg4 video, AAC audio at
  48 kHz, stereo), in ``videos/batch1`` and ``videos/batch2`` as in the release;
- a ``_left``/``_right`` pair shares one source video (two voices taking turns, one per side of the stereo
  image).

Output is byte-identical for the same config with the same PyAV/FFmpeg build: every random draw comes from a
seeded generator per source video, and the encoders run single-threaded. (A different FFmpeg version may
encode different bytes; the decoded content and timestamps stay the same.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from abawfeat.data.names import source_video, video_fps
from abawfeat.utils.io import atomic_write

VIDEO_DIRS: dict[str, str] = {"cropped_aligned": "videos/batch1",
                              "cropped_aligned_new_50_vids": "videos/batch2"}
MP4_AUDIO_RATE = 48_000
AVI_AUDIO_RATE = 44_100
VFR_TIME_BASE = Fraction(1, 1000)  # millisecond timestamps for the variable-frame-rate video


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def plan_sources(videos: Sequence[Any], seed: int) -> list[dict[str, Any]]:
    """One entry per source video: its file, clock, audio layout and the videos (halves) it holds."""
    rng = _rng(seed, 4)
    groups: dict[str, list[Any]] = {}
    for v in videos:
        groups.setdefault(source_video(v.name), []).append(v)
    names = sorted(groups)
    plans = []
    for name in names:
        halves = sorted(groups[name], key=lambda v: v.name)
        # The video runs to its last annotated frame or its last crop, whichever comes later.
        n_frames = max(max(int(v.n_frames), int(v.crop_frames.max()) if len(v.crop_frames) else 0)
                       for v in halves)
        plans.append({"name": name, "videos": [v.name for v in halves], "fps": video_fps(name),
                      "frames": n_frames, "vfr": False, "container": "mp4", "audio": "normal",
                      "dir": VIDEO_DIRS.get(halves[0].crop_dir, "videos/batch1")})
    singles = [i for i, p in enumerate(plans) if len(p["videos"]) == 1]
    order = [singles[int(i)] for i in rng.permutation(len(singles))]
    # The awkward cases, each on its own single-person video while there are enough of them.
    roles = ["vfr", "avi", "no_audio", "late", "short"]
    n_extra = max(0, (len(order) - len(roles)) // 8)  # larger trees get a few more of the audio cases
    roles += ["no_audio", "late", "short"] * n_extra
    for i, role in zip(order, roles, strict=False):
        p = plans[i]
        if role == "vfr":
            p["vfr"] = True
        elif role == "avi":
            p["container"] = "avi"
        else:
            p["audio"] = role
    if all(p["fps"] == 30 for p in plans):  # at least one rate that is not 30
        p = next((p for p in plans if not p["vfr"]), plans[0])
        p["fps"] = 25
    for p in plans:
        p["file"] = f"{p['dir']}/{p['name']}.{p['container']}"
    return plans


def frame_times(plan: dict[str, Any], seed: int, index: int) -> np.ndarray:
    """Seconds at which each frame is shown: k / fps, or irregular durations for the VFR video."""
    n, fps = plan["frames"], plan["fps"]
    if not plan["vfr"]:
        return np.arange(n, dtype=np.float64) / fps
    rng = _rng(seed, 6, index)
    # A phone-like clip: mostly 1/fps, some frames held 1.5-3 times as long, and a little jitter; whole
    # milliseconds, at least one each, so the timestamps stay strictly increasing.
    durations = (1.0 / fps) * np.where(rng.random(n) < 0.15, rng.choice([1.5, 2.0, 3.0], n), 1.0)
    durations *= 1.0 + 0.05 * rng.standard_normal(n)
    ms = np.maximum(np.round(durations * 1000), 1).astype(np.int64)
    return np.concatenate([[0], np.cumsum(ms)[:-1]]).astype(np.float64) / 1000.0


def audio_span(plan: dict[str, Any], times: np.ndarray, seed: int, index: int) -> tuple[float, float] | None:
    """(start, end) of the audio track in seconds on the video's clock, or None without audio."""
    if plan["audio"] == "no_audio":
        return None
    rng = _rng(seed, 7, index)
    end_video = float(times[-1]) + 1.0 / plan["fps"]
    start, end = 0.0, end_video
    # Late start or early end by 15-35 % of the video, so part of it is always covered and part not.
    if plan["audio"] == "late":
        start = round(end_video * float(rng.uniform(0.15, 0.35)), 3)
    elif plan["audio"] == "short":
        end = round(end_video * float(rng.uniform(0.65, 0.85)), 3)
    return start, end


# ----------------------------------------------------------------------------------------------- the voice


def _label_at(times: np.ndarray, va: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The valence/arousal of the frame shown at each time t (the last frame before it)."""
    k = np.clip(np.searchsorted(times, t, side="right") - 1, 0, len(va) - 1)
    return va[k]


def _runs(rng: np.random.Generator, n: int, step: float, arousal: np.ndarray) -> np.ndarray:
    """bool [n] on a grid of ``step`` seconds: speaking (True) or pausing, in runs whose lengths follow
    arousal (aroused: long phrases, short pauses; calm: the opposite)."""
    out = np.zeros(n, dtype=bool)
    i, speaking = 0, bool(rng.random() < 0.7)
    while i < n:
        a = float(arousal[min(i, n - 1)])
        mean = (1.2 + 1.0 * a) if speaking else (0.9 - 0.6 * a)
        length = max(1, int(rng.exponential(max(mean, 0.15)) / step) + 1)
        out[i : i + length] = speaking
        i += length
        speaking = not speaking
    return out


def voice(rng: np.random.Generator, t: np.ndarray, va: np.ndarray, rate: int, base_f0: float) -> np.ndarray:
    """A voice-like signal at times t (seconds, one per sample) for per-sample labels va [n, 2]:
    loudness (dB) and pitch rise with arousal, pitch and brightness with valence, syllables come faster and
    pauses shorter with arousal."""
    n = len(t)
    valence, arousal = va[:, 0], va[:, 1]
    step = 0.01
    grid = np.arange(0, n, int(rate * step))
    speaking_grid = _runs(rng, len(grid), step, arousal[grid])
    speaking = np.repeat(speaking_grid, int(rate * step))[:n]
    # Syllables: a raised-cosine envelope at 3-6 per second.
    syll_rate = 4.0 + 1.8 * arousal
    syll = 0.5 - 0.5 * np.cos(2 * np.pi * np.cumsum(syll_rate) / rate)
    # Pitch: semitones above the speaker's base, with a slow intonation wobble.
    wobble = np.sin(2 * np.pi * np.cumsum(np.full(n, 0.7)) / rate + rng.uniform(0, 2 * np.pi))
    semitones = 6.0 * arousal + 2.5 * valence + 1.0 * wobble
    f0 = base_f0 * 2.0 ** (semitones / 12.0)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    tilt = 1.6 - 0.5 * arousal - 0.3 * valence  # spectral tilt: aroused and positive voices are brighter
    signal = np.zeros(n)
    for h in range(1, 7):
        signal += np.sin(h * phase) * h ** (-tilt)
    gain_db = -22.0 + 10.0 * arousal + 2.0 * valence
    envelope = 10.0 ** (gain_db / 20.0) * syll * speaking
    # Smooth the on/off edges of phrases (10 ms ramps), as a voice does.
    ramp = int(rate * 0.01)
    kernel = np.ones(ramp) / ramp
    envelope = np.convolve(envelope, kernel, mode="same")
    return (signal * envelope).astype(np.float64)


def render_audio(plan: dict[str, Any], halves: Sequence[Any], times: np.ndarray, span: tuple[float, float],
                 rate: int, seed: int, index: int) -> np.ndarray:
    """float32 [2, n] stereo samples for [start, end) on the video's clock."""
    rng = _rng(seed, 5, index)
    start, end = span
    n = int(round((end - start) * rate))
    t = start + np.arange(n) / rate
    channels = np.zeros((2, n))
    if len(halves) == 1:
        va = _label_at(times, halves[0].va, t)
        v = voice(rng, t, va, rate, float(rng.uniform(100, 220)))
        pan = float(rng.uniform(-0.3, 0.3))
        channels += np.stack([v * (1 - pan), v * (1 + pan)])
    else:
        # Two people taking turns of 1.5-4 s; the left person on the left of the stereo image.
        turns = np.zeros(n, dtype=bool)
        i, who = 0, False
        while i < n:
            length = int(rng.uniform(1.5, 4.0) * rate)
            turns[i : i + length] = who
            i += length
            who = not who
        for side, (half, mask) in enumerate(zip(halves, (~turns, turns), strict=True)):
            va = _label_at(times, half.va, t)
            v = voice(rng, t, va, rate, float(rng.uniform(100, 220))) * mask
            pan = -0.6 if side == 0 else 0.6
            channels += np.stack([v * (1 - pan), v * (1 + pan)])
    # A noise floor, and one or two stretches of digital silence (no voice, no noise).
    noise_db = float(rng.uniform(-52, -40))
    channels += 10 ** (noise_db / 20) * rng.standard_normal((2, n))
    for _ in range(int(rng.integers(1, 3))):
        length = int(rng.uniform(0.4, 1.2) * rate)
        if n > 2 * length:
            at = int(rng.integers(0, n - length))
            channels[:, at : at + length] = 0.0
    return np.clip(channels, -1.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------- writing


def _frame_image(halves: Sequence[Any], crops_root: Path, k: int,
                 backgrounds: list[np.ndarray]) -> np.ndarray:
    from PIL import Image

    parts = []
    for half, bg in zip(halves, backgrounds, strict=True):
        path = crops_root / half.crop_dir / half.name / f"{k:05d}.jpg"
        if path.is_file():
            with Image.open(path) as img:
                parts.append(np.asarray(img.convert("RGB")))
        else:  # no face detected in this frame: the empty scene
            parts.append(bg)
    return np.concatenate(parts, axis=1)


def write_source(job: dict[str, Any]) -> dict[str, Any]:
    """Write one source video (runs in synth's workers); returns its manifest entry."""
    import av

    plan, halves, out = job["plan"], job["halves"], Path(job["out"])
    seed, index = job["seed"], job["index"]
    times = frame_times(plan, seed, index)
    span = audio_span(plan, times, seed, index)
    avi = plan["container"] == "avi"
    rate = AVI_AUDIO_RATE if avi else MP4_AUDIO_RATE
    samples = None if span is None else render_audio(plan, halves, times, span, rate, seed, index)
    backgrounds = [np.full((112, 112, 3), np.asarray(h.background[:3], dtype=np.uint8), np.uint8)
                   for h in halves]

    def write(tmp: Path) -> None:
        container = av.open(str(tmp), "w", format=plan["container"])
        try:
            video = container.add_stream("mpeg4", rate=plan["fps"])
            video.width, video.height = 112 * len(halves), 112
            video.pix_fmt = "yuv420p"
            video.bit_rate = 600_000
            video.thread_count = 1  # one thread: the same bytes on every machine
            tb = VFR_TIME_BASE if plan["vfr"] else Fraction(1, plan["fps"])
            video.codec_context.time_base = tb
            audio = None
            if samples is not None:
                audio = container.add_stream("pcm_s16le" if avi else "aac", rate=rate)
                audio.layout = "stereo"
                audio.thread_count = 1
            for k in range(1, plan["frames"] + 1):
                frame = av.VideoFrame.from_ndarray(_frame_image(halves, out, k, backgrounds), format="rgb24")
                frame.pts = int(round(times[k - 1] / tb))
                frame.time_base = tb
                for packet in video.encode(frame):
                    container.mux(packet)
            for packet in video.encode():
                container.mux(packet)
            if audio is not None and samples is not None:
                _encode_audio(av, container, audio, samples, rate, span[0] if span else 0.0, avi)
        finally:
            container.close()

    atomic_write(out / plan["file"], write)
    entry = {"name": plan["name"], "file": plan["file"], "videos": plan["videos"], "frames": plan["frames"],
             "fps": plan["fps"], "vfr": plan["vfr"],
             "audio": None if span is None else {"start_s": span[0], "end_s": span[1], "sample_rate": rate,
                                                 "channels": 2, "codec": "pcm_s16le" if avi else "aac"}}
    if plan["vfr"]:
        entry["frame_times"] = [round(float(x), 6) for x in times]
    return entry


def _encode_audio(av: Any, container: Any, stream: Any, samples: np.ndarray, rate: int, start_s: float,
                  pcm: bool) -> None:
    size = stream.codec_context.frame_size or 1024
    first = int(round(start_s * rate))
    data = (np.clip(samples, -1, 1) * 32767).astype(np.int16) if pcm else samples
    for pos in range(0, data.shape[1], size):
        block = data[:, pos : pos + size]
        if pcm:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block.T.reshape(1, -1)), format="s16",
                                               layout="stereo")
        else:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout="stereo")
        frame.sample_rate = rate
        frame.pts = first + pos
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_source_videos(plans: Sequence[dict[str, Any]], videos: Sequence[Any], out: Path, seed: int,
                        workers: int = 1, on_progress: Callable[[int, int], None] | None = None,
                        ) -> list[dict[str, Any]]:
    """Write the source videos ``plan_sources`` planned under ``out`` (after the crops, which they show);
    returns the manifest entries."""
    by_name = {v.name: v for v in videos}
    jobs = [{"plan": p, "halves": [by_name[n] for n in p["videos"]], "out": str(out), "seed": seed,
             "index": i} for i, p in enumerate(plans)]
    entries: list[dict[str, Any] | None] = [None] * len(jobs)
    if workers <= 1 or len(jobs) == 1:
        for i, job in enumerate(jobs):
            entries[i] = write_source(job)
            if on_progress:
                on_progress(i + 1, len(jobs))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(write_source, job): i for i, job in enumerate(jobs)}
            for n_done, fut in enumerate(as_completed(futures), start=1):
                entries[futures[fut]] = fut.result()
                if on_progress:
                    on_progress(n_done, len(jobs))
    return [e for e in entries if e is not None]


__all__ = ["VIDEO_DIRS", "audio_span", "frame_times", "plan_sources", "render_audio", "voice",
           "write_source", "write_source_videos"]
