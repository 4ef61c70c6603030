"""A learnable demo dataset in the exact layout of the Aff-Wild2 release (docs/architecture.md, Data).

Every face is drawn procedurally from a hidden per-frame state of action-unit intensities, and every label is
read off that same state: AU bits are intensities above a threshold, the expression is the segment that
produced the intensities, valence/arousal are a smooth function of them. So a model that reads the pixels
can recover the labels, and one that does not, cannot; that is what makes the demo a test of the pipeline.
State and labels have the temporal structure of Aff-Wild2's labels, timed in seconds at each video's frame
rate: expressions hold for seconds and change through a short ambiguous blend; AUs are events of about
0.5-3 s, in the pairs real faces move together; valence and arousal drift slowly. Only the labels carry the
annotators' imprecision (AU onsets and offsets shifted by a few frames per event, the expression switch
somewhere inside the blend, valence/arousal lagging the face and smoothed like a joystick's trace); the
pixels show the state itself.
The release's quirks (missing crops, ``_left``/``_right`` pairs, invalid markers, crops past the last
annotated frame, CRLF files, no final newline) are injected at configured rates, and the counts the
generator decided are written to ``synth_manifest.json`` as ground truth for the reader.

``generate(SynthConfig(...), out)`` writes the tree and returns the manifest. Output is byte-identical for the
same config whatever the number of workers: each video draws from its own seeded generator.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from abawfeat.constants import AU_NAMES, EXPR_CLASSES, SPLIT_DIRS, SPLITS
from abawfeat.data.names import video_fps
from abawfeat.errors import ConfigError, DiskFullError
from abawfeat.tasks import single, single_task_names, single_tasks
from abawfeat.utils.configs import read_json, to_dict
from abawfeat.utils.io import (
    atomic_write_bytes,
    interrupted_replacement,
    is_disk_full,
    staging_path,
    swap_in,
    write_json,
)

# Folder and file names of the 8th ABAW release; the reader accepts older spellings, we write the newest.
ANNOTATIONS_DIR = "8th_ABAW_Annotations"
CROP_DIRS: tuple[str, str] = ("cropped_aligned", "cropped_aligned_new_50_vids")
TEST_LISTS_DIR = "names_of_videos_in_each_test_set"
SAMPLES_DIR = "prediction_files_format"
SAMPLE_FILE_NAME = "CVPR_8th_ABAW_{tag}_test_set_sample.txt"
MANIFEST_NAME = "synth_manifest.json"
MANIFEST_FORMAT = "abawfeat-synth/1"
CROP_SIZE = 112
_POOL_MIN_CROPS = 500  # below this a process pool costs more than it saves

# The hidden state: the 12 labelled AUs, then three unlabelled ones that only expressions use (upper lid
# raiser for surprise/fear, nose wrinkler for disgust, lip stretcher for fear), so that expressions are more
# than the sum of the labelled AUs, as in real faces.
HIDDEN_AUS: tuple[str, ...] = ("AU5", "AU9", "AU20")
STATE_NAMES: tuple[str, ...] = AU_NAMES + HIDDEN_AUS
_IDX = {name: i for i, name in enumerate(STATE_NAMES)}

# Expression -> AUs that are always on; optional AUs are added per segment (see _segment_target).
_EXPR_AUS: dict[str, tuple[str, ...]] = {
    "Neutral": (),
    "Anger": ("AU4", "AU7"),  # + AU23 and/or AU24
    "Disgust": ("AU4", "AU10", "AU9"),
    "Fear": ("AU1", "AU2", "AU4", "AU5", "AU20", "AU25"),
    "Happiness": ("AU6", "AU12"),  # + AU25 half of the time
    "Sadness": ("AU1", "AU4", "AU15"),
    "Surprise": ("AU1", "AU2", "AU5", "AU25", "AU26"),
    "Other": (),  # random mixture
}

# Valence/arousal as a linear read-out of the state (then tanh): smiles raise valence, frowns and lip
# depressors lower it; an open jaw and raised brows/lids raise arousal. Prototypes land where the
# circumplex puts them (happiness +V, sadness -V -A, surprise/fear +A, ...).
_VA_WEIGHTS = np.array(
    [
        # AU1   AU2   AU4   AU6   AU7   AU10  AU12  AU15  AU23  AU24  AU25  AU26  AU5   AU9   AU20
        [-0.10, 0.05, -0.45, 0.35, -0.15, -0.30, 0.75, -0.55, -0.20, -0.20, 0.05, 0.00, 0.00, -0.35, -0.25],
        [0.15, 0.25, 0.20, 0.10, 0.25, 0.10, 0.10, -0.35, 0.15, 0.05, 0.25, 0.45, 0.30, 0.10, 0.30],
    ],
    dtype=np.float64,
)
_AROUSAL_BIAS = -0.15


@dataclass(frozen=True)
class SynthConfig:
    """Everything that decides the generated tree (saved in the manifest); same config, same bytes."""

    videos: int = 24  # total videos, counting each half of a _left/_right pair and the test videos
    frames: int = 300  # mean frames per video (annotation rows for train/val, sample-file rows for test)
    seed: int = 0
    frames_jitter: float = 0.25  # video length is frames * U(1 - jitter, 1 + jitter), as videos differ
    val_fraction: float = 0.25  # of source videos; at least one, so every task has a validation split
    test_fraction: float = 0.15  # of source videos; crops and test lists only, no annotations
    single_task_fraction: float = 0.2  # like the release: most videos have several tasks, some only one
    two_task_fraction: float = 0.3
    pair_fraction: float = 0.1  # fraction of videos that are halves of _left/_right pairs
    batch2_fraction: float = 0.15  # source videos whose crops sit in cropped_aligned_new_50_vids/
    # Labels, timed in seconds at each video's frame rate (the rate in its name, 30 fps without one).
    # EXPR frequencies default to the release's train imbalance (Neutral and Other dominate).
    expr_weights: tuple[float, ...] = (0.30, 0.03, 0.02, 0.015, 0.16, 0.135, 0.055, 0.285)
    expr_hold_seconds: float = 3.0  # median time an expression holds (log-normal, 0.4x..3x)
    expr_change_seconds: float = 0.5  # median ambiguous stretch between two expressions: the face blends
    # from one to the next, and the annotator's switch falls somewhere inside it
    au_event_seconds: float = 1.0  # median AU event outside expressions (log-normal, 0.5x..3x)
    au_event_rate: float = 0.05  # per AU on average, fraction of frames in events outside expressions, so
    # AUs are not a mere function of the expression class
    au_threshold: float = 0.5  # the face shows an AU while its intensity is above this
    au_jitter_seconds: float = 0.07  # std of the annotator's shift of each AU onset and offset (~2 frames)
    va_lag_seconds: float = 0.4  # mean reaction delay of the VA trace behind the face (per video
    # 0.5x..1.5x); the joystick's inertia below adds to the lag a model sees
    va_smooth_seconds: float = 0.3  # time constant of the joystick's inertia (a causal low-pass)
    va_noise: float = 0.05  # std of the slow VA component that the pixels do not show
    va_drift_seconds: float = 1.5  # its time scale
    # Release quirks, at known rates.
    missing_crop_rate: float = 0.03  # annotated frames with valid labels but no jpg (in runs)
    missing_crop_run: int = 6  # mean run length of missing crops
    va_invalid_rate: float = 0.01  # rows of -5
    expr_invalid_rate: float = 0.08  # rows of -1
    au_invalid_rate: float = 0.02  # rows of twelve -1
    invalid_run: int = 20  # mean run length of invalid rows
    extra_crops_fraction: float = 0.2  # annotated videos with crops past their last annotated frame
    extra_crops_max: int = 5
    test_tail_fraction: float = 0.5  # test videos whose last frames have no face (N > last crop)
    test_tail_max: int = 10
    crlf_fraction: float = 0.15  # annotation files with CRLF line endings
    no_final_newline_fraction: float = 0.15  # annotation files without a final newline
    # Rendering.
    # Scales all per-video appearance variation (0 = one face for all). 0.5 keeps faces, scenes and skin
    # tones visibly different while a frozen random-init DDAMFN still reads the AUs (measured: 1.0 roughly
    # halves what a linear probe on its features recovers).
    identity_strength: float = 0.5
    noise_std: float = 5.0  # per-pixel Gaussian noise on 0..255
    jpeg_quality: int = 90  # fixed so that files are byte-identical across runs
    # Also write the source videos with sound (abawfeat/data/synth_av.py): the audio modality's input.
    videos_with_audio: bool = False

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        if self.videos < 3:
            raise ConfigError(f"synth: --videos must be at least 3 (train, val, test), got {self.videos}")
        if self.frames < 10:
            raise ConfigError(f"synth: --frames must be at least 10, got {self.frames}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"synth: --seed must be a non-negative integer, got {self.seed}")
        fractions = (
            "frames_jitter", "val_fraction", "test_fraction", "single_task_fraction", "two_task_fraction",
            "pair_fraction", "batch2_fraction", "au_event_rate", "missing_crop_rate", "va_invalid_rate",
            "expr_invalid_rate", "au_invalid_rate", "extra_crops_fraction", "test_tail_fraction",
            "crlf_fraction", "no_final_newline_fraction",
        )
        for name in fractions:
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"synth: {name} must be in [0, 1), got {value}")
        if self.single_task_fraction + self.two_task_fraction > 1.0:
            raise ConfigError("synth: single_task_fraction + two_task_fraction must not exceed 1")
        if len(self.expr_weights) != len(EXPR_CLASSES) or min(self.expr_weights) < 0 or sum(
            self.expr_weights
        ) <= 0:
            raise ConfigError(f"synth: expr_weights needs {len(EXPR_CLASSES)} non-negative weights")
        if not 0.0 <= self.identity_strength <= 1.5:
            raise ConfigError(f"synth: identity_strength must be in [0, 1.5], got {self.identity_strength}")
        if not 0.0 <= self.noise_std <= 50.0:
            raise ConfigError(f"synth: noise_std must be in [0, 50], got {self.noise_std}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"synth: jpeg_quality must be in 1..95, got {self.jpeg_quality}")
        for name in ("missing_crop_run", "invalid_run"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synth: {name} must be at least 1")
        for name in ("expr_hold_seconds", "expr_change_seconds", "au_event_seconds", "va_drift_seconds"):
            if not 0.0 < getattr(self, name) <= 600.0:
                raise ConfigError(f"synth: {name} must be in (0, 600], got {getattr(self, name)}")
        for name in ("au_jitter_seconds", "va_lag_seconds", "va_smooth_seconds"):
            if not 0.0 <= getattr(self, name) <= 10.0:
                raise ConfigError(f"synth: {name} must be in [0, 10], got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------- planning


@dataclass
class VideoPlan:
    """What the generator decided for one video; labels hold the raw values written to the files."""

    index: int  # position in the plan; seeds this video's generators
    name: str
    split: str  # "train", "val" or "test"
    tasks: tuple[str, ...]
    n_frames: int  # annotation rows (train/val) or sample-file rows (test)
    crop_dir: str  # one of CROP_DIRS
    crop_frames: np.ndarray  # int32, ascending, 1-based; may exceed n_frames (extra crops)
    state: np.ndarray  # float32 [n_frames + extra, len(STATE_NAMES)] intensities that drive the pixels
    background: tuple[int, int, int, int, int, int]  # shared by the two halves of a pair (same scene)
    labels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    valid: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # float32 [n_frames + extra, 2]: valence/arousal of every frame, labelled or not (the voices of the source
    # videos follow it, abawfeat/data/synth_av.py)
    va: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2), np.float32))


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # Independent, order-free streams: the plan, each video's labels and each video's pixels never share
    # draws, so changing the worker count or the render order cannot change a byte.
    return np.random.default_rng([seed, *stream])


def _ceil_count(fraction: float, n: int) -> int:
    # Quirks use ceil so that even a 6-video tree shows each of them at least once.
    return 0 if fraction <= 0 or n <= 0 else min(n, math.ceil(fraction * n - 1e-9))


def _allocate(rate: float, lengths: Sequence[int]) -> list[int]:
    """Per-video counts that add up to round(rate * sum(lengths)) (error diffusion): a quirk's rate is then
    exact over the tree even when every video is too short for round(rate * n) to be non-zero."""
    cum = np.cumsum([0, *lengths])
    marks = np.floor(rate * cum + 0.5).astype(int)
    return [int(x) for x in np.diff(marks)]


def _runs_mask(rng: np.random.Generator, n: int, k: int, mean_run: int) -> np.ndarray:
    """Exactly k True frames out of n, laid out in runs of about ``mean_run`` frames."""
    mask = np.zeros(n, dtype=bool)
    if k <= 0:
        return mask
    k = min(k, n)
    n_runs = max(1, min(k, n - k + 1, int(round(k / max(mean_run, 1)))))
    # Split k into n_runs positive lengths and n - k into n_runs + 1 gaps (inner gaps positive).
    cuts = np.sort(rng.choice(np.arange(1, k), size=n_runs - 1, replace=False)) if n_runs > 1 else []
    runs = np.diff(np.concatenate([[0], cuts, [k]])).astype(int)
    free = n - k - (n_runs - 1)  # after reserving one frame for each inner gap
    gaps = rng.multinomial(free, np.full(n_runs + 1, 1.0 / (n_runs + 1)))
    gaps[1:-1] += 1
    pos = 0
    for i in range(n_runs):
        pos += int(gaps[i])
        mask[pos : pos + int(runs[i])] = True
        pos += int(runs[i])
    return mask


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian noise low-passed with a Gaussian of ``sigma`` frames."""
    half = max(1, int(3 * sigma))
    x = rng.standard_normal(n + 2 * half)
    t = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    kernel /= math.sqrt(float(np.sum(kernel**2)))
    return np.convolve(x, kernel, mode="valid")[:n]


def _log_normal(rng: np.random.Generator, median: float, lo: float, hi: float, sigma: float = 0.5) -> float:
    """A duration around ``median`` (log-normal, as durations of behaviour are), kept in median * [lo, hi]."""
    return median * float(np.clip(math.exp(sigma * rng.standard_normal()), lo, hi))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of the runs of True in a 1-d mask, end exclusive."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


def _segment_target(rng: np.random.Generator, expr: int) -> np.ndarray:
    """Intensities held during one expression segment: active AUs in 0.65..1, the rest in 0..0.25."""
    target = rng.uniform(0.0, 0.25, len(STATE_NAMES))
    name = EXPR_CLASSES[expr]
    active = list(_EXPR_AUS[name])
    if name == "Anger":
        r = rng.random()
        active += ["AU23"] if r < 0.4 else ["AU24"] if r < 0.7 else ["AU23", "AU24"]
    elif name == "Happiness" and rng.random() < 0.5:
        active.append("AU25")
    elif name == "Other":
        # A mixture that is none of the prototypes: 1-3 labelled AUs, sometimes a hidden one.
        picks = rng.choice(len(AU_NAMES), size=int(rng.integers(1, 4)), replace=False)
        active += [AU_NAMES[i] for i in picks]
        if rng.random() < 0.3:
            active.append(HIDDEN_AUS[int(rng.integers(len(HIDDEN_AUS)))])
    for au in active:
        target[_IDX[au]] = rng.uniform(0.65, 1.0)
    return target


def _expression_track(
    rng: np.random.Generator, n: int, fps: float, cfg: SynthConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expression segments over n frames: the face's intensities [n, D], the affect offset the face does not
    show [n, 2] (both blended across each change), and the annotator's expression label [n]."""
    weights = np.asarray(cfg.expr_weights, dtype=np.float64)
    weights = weights / weights.sum()
    starts: list[int] = []
    classes: list[int] = []
    values: list[np.ndarray] = []
    pos = 0
    while pos < n:
        length = max(1, round(fps * _log_normal(rng, cfg.expr_hold_seconds, 0.4, 3.0)))
        if not starts:  # the video starts somewhere inside its first expression
            length = max(1, math.ceil(length * rng.random()))
        c = int(rng.choice(len(EXPR_CLASSES), p=weights))
        starts.append(pos)
        classes.append(c)
        values.append(np.concatenate([_segment_target(rng, c), rng.normal(0.0, 0.08, 2)]))
        pos += length
    ends = [*starts[1:], n]
    seg = np.repeat(np.arange(len(starts)), np.diff([*starts, n]))
    table = np.stack(values)
    face = table[seg]
    label = np.asarray(classes, dtype=np.int64)[seg]
    for i in range(1, len(starts)):
        # The ambiguous stretch: the face blends linearly from one expression to the next, centred on the
        # change; no wider than either neighbour, so that stretches never overlap.
        b = starts[i]
        width = round(fps * _log_normal(rng, cfg.expr_change_seconds, 0.5, 2.0, sigma=0.3))
        width = min(width, b - starts[i - 1], ends[i] - b)
        if width < 2:
            continue
        lo = b - width // 2
        alpha = ((np.arange(width) + 0.5) / width)[:, None]
        face[lo : lo + width] = (1 - alpha) * table[i - 1] + alpha * table[i]
        # The annotator switches somewhere inside it, not where the face is exactly half-way.
        switch = lo + int(rng.integers(0, width + 1))
        label[lo:switch] = classes[i - 1]
        label[switch : lo + width] = classes[i]
    d = len(STATE_NAMES)
    return face[:, :d], face[:, d:], label


# AU events outside expressions, as (AUs that move together, relative frequency). Real faces move some AUs
# together, and Aff-Wild2's labels show it: the cheeks rise with most smiles (AU6 with AU12), the jaw drops
# with parted lips (AU25 with AU26, as in talking), the inner and outer brows rise together (AU1 with AU2).
# Each also occurs alone, less often; the other AUs occur alone.
_AU_EVENT_KINDS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("AU12", "AU6"), 1.0), (("AU12",), 0.4), (("AU6",), 0.2),
    (("AU25", "AU26"), 1.0), (("AU25",), 0.5), (("AU26",), 0.2),
    (("AU1", "AU2"), 1.0), (("AU1",), 0.3), (("AU2",), 0.2),
    (("AU4",), 0.8), (("AU4", "AU7"), 0.4), (("AU7",), 0.8),
    (("AU10",), 1.0), (("AU15",), 1.0), (("AU23",), 1.0), (("AU24",), 1.0),
)
_AU_RAMP_SECONDS = 0.2  # an AU's onset (rest to apex) and offset take about this long
_AU_PARTNER_SECONDS = 0.15  # AUs that move together start and stop up to this far apart


def _au_events(rng: np.random.Generator, n: int, fps: float, cfg: SynthConfig) -> np.ndarray:
    """Intensities [n, D] of AU events outside expressions: each kind of event arrives as a renewal process
    whose events cover its share of ``au_event_rate``; an event is a trapezoid (onset, apex, offset)."""
    events = np.zeros((n, len(STATE_NAMES)))
    ramp = max(1.0, _AU_RAMP_SECONDS * fps)
    per_au = sum(rel * len(aus) for aus, rel in _AU_EVENT_KINDS) / len(AU_NAMES)
    mean_len = fps * cfg.au_event_seconds * math.exp(0.5**2 / 2)  # mean of the log-normal, near enough
    frames = np.arange(n, dtype=np.float64)
    for aus, rel in _AU_EVENT_KINDS:
        duty = cfg.au_event_rate * rel / per_au
        if duty <= 0:
            continue
        mean_gap = mean_len * (1 - duty) / duty
        t = rng.exponential(mean_gap) - mean_len  # an event may be under way when the video starts
        while t < n:
            length = fps * _log_normal(rng, cfg.au_event_seconds, 0.5, 3.0)
            for k, au in enumerate(aus):
                lag = rng.uniform(0.0, _AU_PARTNER_SECONDS * fps) if k else 0.0
                stop = rng.uniform(-1.0, 1.0) * _AU_PARTNER_SECONDS * fps if k else 0.0
                # Above threshold from about t + lag to t + length + stop (the 0.5 crossing sits mid-ramp).
                a, b = t + lag - ramp / 2, t + length + stop + ramp / 2
                lo, hi = max(0, math.floor(a)), min(n, math.ceil(b) + 1)
                if lo >= hi:
                    continue
                x = frames[lo:hi]
                shape = np.clip(np.minimum(x - a, b - x) / ramp, 0.0, 1.0) * rng.uniform(0.65, 1.0)
                col = events[lo:hi, _IDX[au]]
                np.maximum(col, shape, out=col)
            t += length + rng.exponential(mean_gap)
    return events


def _annotate_events(rng: np.random.Generator, shown: np.ndarray, sd: float) -> np.ndarray:
    """AU labels [n, 12] as an annotator marks the events the face shows [n, 12]: each onset and offset
    shifted by a few frames (Gaussian, ``sd`` frames, at most 3 sd); an event is never lost (at least half
    of it stays) and where the video cuts an event, that end is not moved."""
    n = len(shown)
    out = np.zeros(shown.shape, dtype=np.int64)
    for j in range(shown.shape[1]):
        for s, e in _runs(shown[:, j]):
            shift = np.clip(np.round(rng.normal(0.0, sd, 2)), -3 * sd, 3 * sd).astype(int)
            s2 = s if s == 0 else s + int(shift[0])
            e2 = e if e == n else e + int(shift[1])
            e2 = max(e2, s2 + max(1, (e - s + 1) // 2))
            out[max(0, s2) : min(n, e2), j] = 1
    return out


def _joystick(x: np.ndarray, delay: int, tau: float) -> np.ndarray:
    """What a joystick annotator traces of x [n, k]: late by ``delay`` frames and low-passed by the stick's
    inertia (a causal first-order lag of ``tau`` frames), starting at rest on x's first value."""
    kernel = np.exp(-np.arange(max(1, math.ceil(6 * tau))) / tau) if tau > 0 else np.ones(1)
    kernel /= kernel.sum()
    pad = delay + len(kernel) - 1
    out = np.empty_like(x)
    for j in range(x.shape[1]):
        padded = np.concatenate([np.full(pad, x[0, j]), x[: len(x) - delay, j] if delay else x[:, j]])
        out[:, j] = np.convolve(padded, kernel, mode="valid")[: len(x)]
    return out


def _latent(
    rng: np.random.Generator, n: int, fps: float, cfg: SynthConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """State [n, D] that the pixels show, and the labels an annotator gives it: expression [n], AU bits
    [n, 12] and valence/arousal [n, 2]."""
    face, hidden_affect, expr = _expression_track(rng, n, fps, cfg)
    clean = np.maximum(face, _au_events(rng, n, fps, cfg))
    au = _annotate_events(rng, clean[:, : len(AU_NAMES)] > cfg.au_threshold, cfg.au_jitter_seconds * fps)
    # Small slow variation of every intensity (the face is never perfectly still); the AU labels follow the
    # events, not this, as an annotator marks an event once rather than each flicker around the threshold.
    wobble = np.stack([_smooth_noise(rng, n, 0.2 * fps) for _ in range(len(STATE_NAMES))], axis=1)
    state = np.clip(clean + 0.04 * wobble, 0.0, 1.0)
    lin = state @ _VA_WEIGHTS.T + hidden_affect
    lin[:, 1] += _AROUSAL_BIAS
    drift = np.stack([_smooth_noise(rng, n, cfg.va_drift_seconds * fps) for _ in range(2)], axis=1)
    felt = np.tanh(1.3 * lin) + cfg.va_noise * drift
    delay = round(fps * cfg.va_lag_seconds * rng.uniform(0.5, 1.5))
    va = _joystick(felt, delay, cfg.va_smooth_seconds * fps)
    return state.astype(np.float32), expr, au, np.clip(va, -1.0, 1.0)


def _video_names(rng: np.random.Generator, n_sources: int) -> list[str]:
    """Names shaped like the release's (``12-30-1280x720``, ``video47``), unique and in plan order."""
    numbers = rng.permutation(np.arange(1, 4 * n_sources + 50))[:n_sources]
    fmts = ("640x360", "1280x720", "1920x1080", "480x360", "640x480")
    names = []
    for num in numbers:
        if rng.random() < 0.2:
            names.append(f"video{int(num)}")
        else:
            fps = int(rng.choice([24, 25, 30, 60]))
            names.append(f"{int(num)}-{fps}-{fmts[int(rng.integers(len(fmts)))]}")
    return names


_TASK_COMBOS_2 = (("va", "expr"), ("va", "au"), ("expr", "au"))


def plan(cfg: SynthConfig) -> list[VideoPlan]:
    """Decide every video: name, split, tasks, length, crops, hidden state and labels (no pixels yet)."""
    cfg.validate()
    rng = _rng(cfg.seed, 0)
    # Each pair turns one source video into two entries; at least one pair whenever the rate is non-zero.
    n_pairs = max(1, int(round(cfg.pair_fraction * cfg.videos / 2))) if cfg.pair_fraction > 0 else 0
    n_pairs = min(n_pairs, cfg.videos // 4)
    n_sources = cfg.videos - n_pairs
    n_test = max(1, int(round(cfg.test_fraction * n_sources))) if cfg.test_fraction > 0 else 0
    n_val = max(1, int(round(cfg.val_fraction * n_sources)))
    n_train = n_sources - n_test - n_val
    if n_train < 1:
        raise ConfigError(
            f"synth: {cfg.videos} videos leave no training video after {n_val} val and {n_test} test; "
            "use more --videos"
        )
    splits = ["test"] * n_test + ["val"] * n_val + ["train"] * n_train
    names = _video_names(rng, n_sources)
    # Task sets: the first video of each split has all three tasks so every (task, split) exists.
    task_sets: list[tuple[str, ...]] = []
    seen_split: set[str] = set()
    for split in splits:
        r = rng.random()
        if split not in seen_split or r >= cfg.single_task_fraction + cfg.two_task_fraction:
            tasks: tuple[str, ...] = single_task_names()
        elif r < cfg.single_task_fraction:
            tasks = (single_task_names()[int(rng.integers(3))],)
        else:
            tasks = _TASK_COMBOS_2[int(rng.integers(3))]
        seen_split.add(split)
        task_sets.append(tasks)
    # Pairs come from annotated sources (two people in one annotated video), starting with a train one.
    annotated = [i for i, s in enumerate(splits) if s != "test"]
    pair_sources = set(annotated[-1:] if n_pairs else [])
    rest = [i for i in annotated if i not in pair_sources]
    pair_sources |= {int(i) for i in rng.permutation(rest)[: max(0, n_pairs - 1)]}
    batch2 = {int(i) for i in rng.permutation(n_sources)[: _ceil_count(cfg.batch2_fraction, n_sources)]}
    lengths = [
        max(10, int(round(cfg.frames * rng.uniform(1 - cfg.frames_jitter, 1 + cfg.frames_jitter))))
        for _ in range(n_sources)
    ]
    # Muted scene tones (a random colour pulled halfway to grey), a different one at top and bottom.
    backgrounds = [tuple(int(v) for v in (rng.integers(40, 216, 6) + 2 * rng.integers(80, 170)) // 3)
                   for _ in range(n_sources)]

    videos: list[VideoPlan] = []
    for src in range(n_sources):
        halves = ("_left", "_right") if src in pair_sources else ("",)
        for suffix in halves:
            videos.append(
                VideoPlan(
                    index=len(videos),
                    name=names[src] + suffix,
                    split=splits[src],
                    tasks=task_sets[src],
                    n_frames=lengths[src],
                    crop_dir=CROP_DIRS[1] if src in batch2 else CROP_DIRS[0],
                    crop_frames=np.zeros(0, dtype=np.int32),
                    state=np.zeros((0, len(STATE_NAMES)), dtype=np.float32),
                    background=backgrounds[src],  # type: ignore[arg-type]
                )
            )

    annotated_videos = [v for v in videos if v.split != "test"]
    test_videos = [v for v in videos if v.split == "test"]
    extra_idx = {int(i) for i in rng.permutation(len(annotated_videos))[
        : _ceil_count(cfg.extra_crops_fraction, len(annotated_videos))]}
    tail_idx = {int(i) for i in rng.permutation(len(test_videos))[
        : _ceil_count(cfg.test_tail_fraction, len(test_videos))]}
    extra = {v.index: int(rng.integers(1, cfg.extra_crops_max + 1)) if i in extra_idx else 0
             for i, v in enumerate(annotated_videos)}
    tail = {v.index: int(rng.integers(1, cfg.test_tail_max + 1)) if i in tail_idx else 0
            for i, v in enumerate(test_videos)}

    invalid_rates = {"va": cfg.va_invalid_rate, "expr": cfg.expr_invalid_rate, "au": cfg.au_invalid_rate}
    n_missing: dict[int, int] = {}
    for group in (annotated_videos, test_videos):
        counts = _allocate(cfg.missing_crop_rate, [v.n_frames for v in group])
        n_missing.update({v.index: c for v, c in zip(group, counts, strict=True)})
    n_invalid: dict[tuple[str, int], int] = {}
    for task in single_task_names():
        having = [v for v in annotated_videos if task in v.tasks]
        counts = _allocate(invalid_rates[task], [v.n_frames for v in having])
        n_invalid.update({(task, v.index): c for v, c in zip(having, counts, strict=True)})
    for v in videos:
        vrng = _rng(cfg.seed, 1, v.index)
        n = v.n_frames
        n_extra = extra.get(v.index, 0)
        state, expr, au, va = _latent(vrng, n + n_extra, video_fps(v.name), cfg)
        v.state = state
        v.va = va.astype(np.float32)
        has_crop = ~_runs_mask(vrng, n, n_missing[v.index], cfg.missing_crop_run)
        n_tail = min(tail.get(v.index, 0), n - 1)
        if n_tail:
            has_crop[n - n_tail :] = False
        frames = np.flatnonzero(has_crop) + 1
        v.crop_frames = np.concatenate([frames, np.arange(n + 1, n + n_extra + 1)]).astype(np.int32)
        if v.split == "test":
            continue
        for task in v.tasks:
            invalid = _runs_mask(vrng, n, n_invalid[(task, v.index)], cfg.invalid_run)
            v.valid[task] = ~invalid
            if task == "va":
                lab = np.round(va[:n], 4).astype(np.float64)
                lab[invalid] = -5.0
            elif task == "expr":
                lab = expr[:n].copy()
                lab[invalid] = single("expr").invalid
            else:
                lab = au[:n].copy()
                lab[invalid] = single("au").invalid
            v.labels[task] = lab
    return videos


# ---------------------------------------------------------------------------------------------- writing


def _format_rows(task: str, labels: np.ndarray) -> list[str]:
    if task == "va":
        # +0.0 turns -0.0 into 0.0; invalid rows are written as the release writes them, "-5,-5".
        return ["-5,-5" if row[0] == -5.0 else f"{row[0] + 0.0:.4f},{row[1] + 0.0:.4f}" for row in labels]
    if task == "expr":
        return [str(int(x)) for x in labels]
    return [",".join(str(int(x)) for x in row) for row in labels]


def _annotation_text(task: str, labels: np.ndarray, crlf: bool, final_newline: bool) -> bytes:
    eol = "\r\n" if crlf else "\n"
    text = eol.join([",".join(single(task).header), *_format_rows(task, labels)])
    return (text + (eol if final_newline else "")).encode("ascii")


def _sample_text(task: str, videos: Sequence[VideoPlan]) -> bytes:
    # The organisers' sample lists every frame 1..N of every test video, face or not; values are placeholders.
    value = {"va": "0,0", "expr": "0", "au": ",".join(["0"] * len(AU_NAMES))}[task]
    lines = [single(task).submission_header]
    for v in videos:
        lines.extend(f"{v.name}/{k:05d}.jpg,{value}" for k in range(1, v.n_frames + 1))
    return ("\n".join(lines) + "\n").encode("ascii")


def _summary(videos: Sequence[VideoPlan]) -> list[dict[str, Any]]:
    """Rows of ``abawfeat data summary --json`` as decided here: usable = valid label and a crop exists."""
    rows = []
    for task in single_task_names():
        for split in SPLITS:
            vids = [v for v in videos if v.split == split and task in v.tasks]
            frames = valid = usable = 0
            for v in vids:
                has_crop = np.zeros(v.n_frames + 1, dtype=bool)
                inside = v.crop_frames[v.crop_frames <= v.n_frames]
                has_crop[inside] = True
                frames += v.n_frames
                valid += int(v.valid[task].sum())
                usable += int((v.valid[task] & has_crop[1:]).sum())
            rows.append({"task": task, "split": split, "videos": len(vids), "frames": frames,
                         "valid_frames": valid, "usable_frames": usable})
    return rows


def _manifest(cfg: SynthConfig, videos: Sequence[VideoPlan], files: dict[str, list[str]],
              complete: bool) -> dict[str, Any]:
    test_rows = []
    for task in single_task_names():
        vids = [v for v in videos if v.split == "test" and task in v.tasks]
        test_rows.append({"task": task, "split": "test", "videos": len(vids),
                          "frames": sum(v.n_frames for v in vids),
                          "crops": sum(int((v.crop_frames <= v.n_frames).sum()) for v in vids)})
    expr_counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        counts = np.zeros(len(EXPR_CLASSES), dtype=np.int64)
        for v in videos:
            if v.split == split and "expr" in v.tasks:
                lab = v.labels["expr"]
                counts += np.bincount(lab[lab >= 0], minlength=len(EXPR_CLASSES))
        expr_counts[split] = {c: int(n) for c, n in zip(EXPR_CLASSES, counts, strict=True)}
    annotated = [v for v in videos if v.split != "test"]
    return {
        "format": MANIFEST_FORMAT,
        "complete": complete,
        "config": to_dict(cfg),
        "annotations_dir": ANNOTATIONS_DIR,
        "summary": _summary(videos),
        "test": test_rows,
        "expr_valid_frames": expr_counts,
        "quirks": {
            "pairs": sorted({v.name.rsplit("_", 1)[0] for v in videos
                             if v.name.endswith(("_left", "_right"))}),
            "batch2_videos": sorted(v.name for v in videos if v.crop_dir == CROP_DIRS[1]),
            "missing_crops": sum(int(v.n_frames - (v.crop_frames <= v.n_frames).sum()) for v in annotated),
            "annotated_frames": sum(v.n_frames for v in annotated),
            "extra_crops": {v.name: int((v.crop_frames > v.n_frames).sum()) for v in videos
                            if (v.crop_frames > v.n_frames).any()},
            "invalid_rows": {t: sum(int((~v.valid[t]).sum()) for v in annotated if t in v.tasks)
                             for t in single_task_names()},
            "crlf_files": files.get("crlf", []),
            "no_final_newline_files": files.get("no_final_newline", []),
        },
        "videos": [
            {"name": v.name, "split": v.split, "tasks": list(v.tasks), "frames": v.n_frames,
             "crop_dir": v.crop_dir, "crops": int(len(v.crop_frames))}
            for v in videos
        ],
    }


# ---------------------------------------------------------------------------------------------- rendering


def _blend(a: Sequence[float], b: Sequence[float], t: float) -> tuple[int, int, int]:
    """Colour a moved towards colour b by t in [0, 1] (unrolled: called a few dozen times per frame)."""
    t = min(max(t, 0.0), 1.0)
    return (int(a[0] + (b[0] - a[0]) * t + 0.5), int(a[1] + (b[1] - a[1]) * t + 0.5),
            int(a[2] + (b[2] - a[2]) * t + 0.5))


_DARK = (25, 18, 16)
_SS = 2  # supersampling: draw at 224 and reduce, so sub-pixel feature motion shows as grey levels
_ANGLES = np.linspace(0, 2 * math.pi, 48, endpoint=False)
_COS, _SIN = np.cos(_ANGLES), np.sin(_ANGLES)


def _points(xs: np.ndarray, ys: np.ndarray) -> list[tuple[float, float]]:
    """Polygon vertices in supersampled pixels from coordinates in 112-pixel units."""
    return list(zip((xs * _SS).tolist(), (ys * _SS).tolist(), strict=True))


class _Face:
    """One person's appearance, drawn for any state; all geometry in 112-pixel units."""

    def __init__(self, rng: np.random.Generator, background: Sequence[int], strength: float) -> None:
        from PIL import Image, ImageDraw

        u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
        k = strength
        light = u(0.62, 0.93) if k > 0 else 0.8
        light = 0.8 + (light - 0.8) * min(k, 1.0)
        self.skin = (255 * light, 205 * light * u(0.97, 1.03), 172 * light * u(0.95, 1.05))
        self.lip = _blend(self.skin, (140, 35, 45), 0.7)  # dark enough to show lip thinning in grey
        self.hair = _blend((20, 15, 12), (120, 80, 40), u(0, 0.6) * k)
        self.brow = _blend(self.hair, (0, 0, 0), 0.4)
        self.fw = 34.0 + u(-3.5, 3.5) * k
        self.dx0, self.dy0 = u(-2.5, 2.5) * k, u(-2.0, 2.0) * k
        self.s0 = 1.0 + u(-0.05, 0.04) * k
        self.eye_dx = u(-1.2, 1.2) * k
        self.brow_w = 4.4 + u(-0.6, 0.8) * k
        self.mouth_w = 1.0 + u(-0.08, 0.08) * k
        self.hair_h = 3.0 + u(0, 2.5) * k
        self.yaw_amp = u(0.5, 3.0) * k
        side = u(-0.12, 0.12) * k  # light from one side: a left-right shading ramp
        ramp = 1.0 + side * np.linspace(-1, 1, CROP_SIZE, dtype=np.float32)
        self.shade = np.broadcast_to(ramp[None, :, None], (CROP_SIZE, CROP_SIZE, 1))
        # The scene varies with identity_strength too: a large area whose colour random features see first.
        grey = np.float32(128.0)
        top = grey + (np.array(background[:3], dtype=np.float32) - grey) * min(k, 1.0)
        bottom = grey + (np.array(background[3:], dtype=np.float32) - grey) * min(k, 1.0)
        grad = np.linspace(0, 1, CROP_SIZE * _SS, dtype=np.float32)[:, None, None]
        bg = top + (bottom - top) * grad
        self.bg = Image.fromarray(np.broadcast_to(bg, (CROP_SIZE * _SS, CROP_SIZE * _SS, 3)).astype(np.uint8))
        # One canvas and one ImageDraw reused for every frame: building them per frame cost a third of draw().
        self.canvas = self.bg.copy()
        self.pen = ImageDraw.Draw(self.canvas)

    def draw(self, x: np.ndarray, dx: float, dy: float, scale: float, yaw: float) -> Any:
        """The 224 x 224 supersampled drawing of state ``x`` (intensities in STATE_NAMES order); the returned
        canvas is reused by the next call."""

        # A smoothstep from 0.15 to 0.75: faint below the 0.5 label threshold, near full above it, so the
        # bit a label carries is what the pixels show most clearly (small intensities stay faintly visible).
        t = np.clip((x - 0.15) / 0.6, 0.0, 1.0)
        vis = t * t * (3 - 2 * t)
        i1, i2, i4, i6, i7, i10, i12, i15, i23, i24, i25, i26, i5, i9, i20 = vis.tolist()
        img = self.canvas
        img.paste(self.bg)
        d = self.pen
        s = self.s0 * scale
        cx, cy = 56 + self.dx0 + dx, 57 + self.dy0 + dy
        fx = cx + yaw  # inner features turn with the head more than the outline does

        def p(px: float, py: float) -> tuple[float, float]:
            return (px * _SS, py * _SS)

        def w(width: float) -> int:
            return max(1, int(round(width * s * _SS)))

        skin = self.skin
        fw, fh_top, fh_bot = self.fw * s, 44 * s, (41 + 9 * i26) * s  # the chin drops with AU26
        # Neck, hair behind, face, fringe.
        d.rectangle([p(cx - 0.5 * fw, cy + 20 * s), p(cx + 0.5 * fw, 120)], fill=_blend(skin, _DARK, 0.25))
        d.ellipse([p(cx - fw - 4 * s, cy - fh_top - 5 * s), p(cx + fw + 4 * s, cy + 12 * s)], fill=self.hair)
        lower = _SIN > 0
        ox = cx + fw * (1 - 0.18 * np.where(lower, _SIN, 0.0) ** 2) * _COS  # jaw narrower than the temples
        oy = cy + np.where(lower, fh_bot, fh_top) * _SIN
        d.polygon(_points(ox, oy), fill=tuple(int(c) for c in skin))
        # Fringe: the cap of the face ellipse above the hairline, as a polygon (PIL's chord() can leave a
        # stray horizontal line across the image at some angles).
        delta = math.acos(max(-1.0, 1 - self.hair_h * s / fh_top))
        angles = np.linspace(1.5 * math.pi - delta, 1.5 * math.pi + delta, 12)
        d.polygon(_points(cx + fw * np.cos(angles), cy + fh_top * np.sin(angles)), fill=self.hair)

        # AU6: raised, flushed cheeks and crow's feet; AU9 (hidden): nose wrinkles.
        if i6 > 0.05:
            for side in (-1, 1):
                ccx, ccy = fx + side * 18 * s, cy + 9 * s
                d.ellipse([p(ccx - 10 * s, ccy - (3 + 4 * i6) * s), p(ccx + 10 * s, ccy + (3 + 4 * i6) * s)],
                          fill=_blend(skin, (160, 45, 45), 0.8 * i6))
        by = cy - 19 * s
        # AU1 / AU2: forehead wrinkles, central for the inner brow, lateral for the outer brow.
        if i1 > 0.05:
            col = _blend(skin, _DARK, 0.75 * i1)
            for yy in (by - 11 * s, by - 15 * s):
                d.line([p(fx - 8 * s, yy + 1 * s), p(fx, yy), p(fx + 8 * s, yy + 1 * s)], fill=col,
                       width=w(2.5))
        if i2 > 0.05:
            col = _blend(skin, _DARK, 0.75 * i2)
            for side in (-1, 1):
                for yy in (by - 12 * s, by - 16 * s):
                    d.line([p(fx + side * 12 * s, yy), p(fx + side * 24 * s, yy + 2 * s)], fill=col,
                           width=w(2.5))
        # Brows: AU1 lifts the inner end, AU2 the outer end, AU4 lowers and draws them together.
        for side in (-1, 1):
            inner = p(fx + side * (6 - 2.5 * i4) * s, by - 10 * i1 * s + 5 * i4 * s)
            outer = p(fx + side * 24 * s, by + 1 * s - 10 * i2 * s + 2.5 * i4 * s)
            mid = p(fx + side * 15 * s, (inner[1] + outer[1]) / (2 * _SS) - (2.5 + 1.5 * i2) * s)
            d.line([inner, mid, outer], fill=self.brow, width=w(self.brow_w), joint="curve")
        if i4 > 0.05:  # AU4: vertical furrows between the brows
            col = _blend(skin, _DARK, 0.85 * i4)
            for side in (-1, 1):
                d.line([p(fx + side * 2.2 * s, by - 1 * s), p(fx + side * 1.6 * s, by + 8 * s)], fill=col,
                       width=w(2.8))
        # Eyes: AU7 narrows both lids, AU6 pushes the lower lid up, AU5 (hidden) opens the upper lid.
        ey = cy - 6 * s
        for side in (-1, 1):
            ex = fx + side * (14.5 + self.eye_dx) * s
            h_up = max(0.6, 4.8 + 2.5 * i5 - 3.4 * i7) * s
            h_lo = max(0.5, 3.8 - 2.2 * i7 - 2.0 * i6) * s
            box = [p(ex - 7.5 * s, ey - h_up), p(ex + 7.5 * s, ey + h_lo)]
            d.ellipse(box, fill=(238, 236, 230))
            r = 3.6 * s
            d.ellipse([p(ex - r, max(ey - r, ey - h_up)), p(ex + r, min(ey + r, ey + h_lo))],
                      fill=(45, 32, 26))
            d.arc(box, 180, 360, fill=_DARK, width=w(1.8 + 1.6 * i7))
            # AU7 also tenses the lower lid: a thicker, darker lower rim.
            d.arc(box, 0, 180, fill=_blend(skin, _DARK, 0.5 + 0.4 * i7), width=w(1.0 + 2.5 * i7))
            if i6 > 0.05:
                col = _blend(skin, _DARK, 0.8 * i6)
                for k in (-1, 0, 1):
                    d.line([p(ex + side * 8.5 * s, ey + k * 2 * s), p(ex + side * 14 * s, ey + k * 4 * s)],
                           fill=col, width=w(2.4))
        # Nose (turns a little more than the eyes, like a nose in depth).
        nx, ny = fx + 0.3 * yaw, cy + 10 * s
        d.line([p(fx, cy - 4 * s), p(nx, ny)], fill=_blend(skin, _DARK, 0.3), width=w(1.5))
        for side in (-1, 1):
            nos = nx + side * 3.5 * s
            d.ellipse([p(nos - 2 * s, ny - 1.2 * s), p(nos + 2 * s, ny + 1.2 * s)],
                      fill=_blend(skin, _DARK, 0.7))
        if i9 > 0.05:
            col = _blend(skin, _DARK, 0.8 * i9)
            for yy in (cy - 2 * s, cy + 1.5 * s, cy + 5 * s):
                d.line([p(fx - 4 * s, yy), p(fx + 4 * s, yy)], fill=col, width=w(2.4))
        # Mouth: AU12 / AU15 pull the corners up / down, AU20 (hidden) stretches, AU23 thins and narrows,
        # AU24 presses (pale lips, heavy lip line, chin crease), AU25 parts, AU26 opens wide, AU10 lifts the
        # upper lip (upper teeth show) and deepens the nasolabial folds.
        my = cy + 24 * s
        mw = 12.5 * self.mouth_w * (1 + 0.3 * i12 + 0.35 * i20 - 0.3 * i23) * s
        corner = (-9 * i12 + 9 * i15 + 1.0 * i20) * s
        gap = (6.5 * i25 + 8 * i26) * s
        lift = 4.5 * i10 * s
        thin = (1 - 0.8 * i23) * (1 - 0.45 * i24)
        t_up, t_lo = 4.0 * thin * s, 5.0 * thin * s
        us = np.linspace(-1, 1, 15)
        xs = fx + mw * us
        line = my + corner * us**2
        open_ = 1 - us**2
        root = np.sqrt(open_)
        y_ui = line - (0.35 * gap + lift) * open_
        y_li = line + 0.65 * gap * open_
        y_uo = y_ui - t_up * (0.1 + 0.9 * root)
        y_lo = y_li + t_lo * (0.1 + 0.9 * root)
        if i10 > 0.05:
            col = _blend(skin, _DARK, 0.85 * i10)
            for side in (-1, 1):
                d.line([p(nx + side * 5.5 * s, ny + 1 * s), p(fx + side * (mw / s + 3) * s, ny + 7 * s),
                        p(fx + side * (mw / s + 2.5) * s, my + corner + 2 * s)],
                       fill=col, width=w(2.0 + 1.5 * i10), joint="curve")
        lips = _points(np.concatenate([xs, xs[::-1]]), np.concatenate([y_uo, y_lo[::-1]]))
        d.polygon(lips, fill=_blend(self.lip, skin, 0.55 * i24))
        d.line(_points(xs, line), fill=_blend(_DARK, (90, 30, 35), 0.3 - 0.3 * i24),
               width=w(1.2 + 3.5 * i24), joint="curve")
        if gap + lift > 0.4 * s:
            inner = _points(np.concatenate([xs, xs[::-1]]), np.concatenate([y_ui, y_li[::-1]]))
            d.polygon(inner, fill=(35, 12, 15))
            sel = np.abs(us) <= 0.75
            depth = min(3.2 * s, 0.5 * gap + lift)
            tx, tu, tl = xs[sel], y_ui[sel], y_li[sel]
            bottom = np.minimum(tu + depth, tl)
            teeth = _points(np.concatenate([tx, tx[::-1]]), np.concatenate([tu, bottom[::-1]]))
            d.polygon(teeth, fill=(240, 238, 230))
        if i15 > 0.05:  # AU15: the pulled-down corners crease the skin below them
            col = _blend(skin, _DARK, 0.85 * i15)
            for side, k in ((-1, 0), (1, -1)):
                cx0, cy0 = float(xs[k]), float(line[k])
                d.line([p(cx0 + side * 0.5 * s, cy0 + 1.5 * s), p(cx0 + side * 2.5 * s, cy0 + 8 * s)],
                       fill=col, width=w(2.4))
        if i23 > 0.05:  # AU23: purse wrinkles on the upper lip's skin
            col = _blend(skin, _DARK, 0.8 * i23)
            top = float(y_uo.min())
            for k in (-1.5, -0.5, 0.5, 1.5):
                d.line([p(fx + k * 3.2 * s, top - 5 * s), p(fx + k * 2.6 * s, top - 1 * s)], fill=col,
                       width=w(2.2))
        if i24 > 0.05:  # AU24: the chin boss bulges under pressed lips, with a crease below it
            col = _blend(skin, _DARK, 0.9 * i24)
            yy = float(y_lo.max()) + 4 * s
            d.line([p(fx - 9 * s, yy - 1.5 * s), p(fx, yy + 1.5 * s), p(fx + 9 * s, yy - 1.5 * s)], fill=col,
                   width=w(3.0), joint="curve")
        return img


def _render_video(job: dict[str, Any]) -> int:
    """Render and write the crops of one video; returns the number of jpgs written. Runs in workers."""
    from PIL import Image

    rng = _rng(job["seed"], 2, job["index"])
    face = _Face(rng, job["background"], job["identity_strength"])
    state: np.ndarray = job["state"]
    n = len(state)
    # Head motion: smooth position, scale and yaw; brightness drifts; the noise tiles are drawn once.
    dx = 1.5 * _smooth_noise(rng, n, 8.0)
    dy = 1.2 * _smooth_noise(rng, n, 8.0)
    scale = 1.0 + 0.025 * _smooth_noise(rng, n, 12.0)
    yaw = face.yaw_amp * _smooth_noise(rng, n, 15.0)
    bright = 1.0 + 0.05 * _smooth_noise(rng, n, 20.0) + 0.015 * rng.standard_normal(n)
    tiles = rng.standard_normal((4, CROP_SIZE + 32, CROP_SIZE + 32, 3)).astype(np.float32) * job["noise_std"]
    out = Path(job["dir"])
    out.mkdir(parents=True, exist_ok=True)
    frames: np.ndarray = job["frames"]
    offsets = rng.integers(0, 32, (len(frames), 3))
    for j, k in enumerate(frames):
        t = int(k) - 1
        big = face.draw(state[t], float(dx[t]), float(dy[t]), float(scale[t]), float(yaw[t]))
        arr = np.asarray(big.reduce(_SS), dtype=np.float32)
        ti, oy, ox = int(offsets[j, 0]) % 4, int(offsets[j, 1]), int(offsets[j, 2])
        arr = arr * (face.shade * float(bright[t])) + tiles[ti, oy : oy + CROP_SIZE, ox : ox + CROP_SIZE]
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=job["jpeg_quality"])
        atomic_write_bytes(out / f"{int(k):05d}.jpg", buf.getvalue())
    return len(frames)


# ---------------------------------------------------------------------------------------------- the tree


_CROP_NAME = re.compile(r"^\d{5}\.jpg$")


def _owned_files(out: Path, manifest: dict[str, Any]) -> list[Path]:
    """Every file under ``out`` if all were written by synth (per the old manifest); else raise."""
    names = {v["name"] for v in manifest.get("videos", [])}
    # Source videos (--videos-with-audio; the provisional manifest lists them too) and the temporaries of an
    # interrupted write of one.
    sources = {tuple(s["file"].split("/")) for s in manifest.get("sources", [])}
    ann = manifest.get("annotations_dir", ANNOTATIONS_DIR)
    task_dirs = {t.folders[0] for t in single_tasks()}
    samples = {SAMPLE_FILE_NAME.format(tag=t.sample_tag) for t in single_tasks()}
    test_lists = {t.test_list_file for t in single_tasks()}
    owned = []
    for path in sorted(out.rglob("*")):
        if path.is_dir():
            continue
        parts = path.relative_to(out).parts
        ok = (
            (len(parts) == 1 and (parts[0] == MANIFEST_NAME or (
                parts[0].startswith(MANIFEST_NAME + ".") and parts[0].endswith(".tmp"))))
            or (len(parts) == 4 and parts[0] == ann and parts[1] in task_dirs
                and parts[2] in SPLIT_DIRS.values() and parts[3].endswith(".txt") and parts[3][:-4] in names)
            or (len(parts) == 3 and parts[0] in CROP_DIRS and parts[1] in names
                and _CROP_NAME.match(parts[2]) is not None)
            or (len(parts) == 2 and parts[0] == TEST_LISTS_DIR and parts[1] in test_lists)
            or (len(parts) == 2 and parts[0] == SAMPLES_DIR and parts[1] in samples)
            or parts in sources
            or (parts[:-1] + (_untemp(parts[-1]),)) in sources
        )
        if not ok:
            raise ConfigError(
                f"{path}: --out {out} is a synth tree but holds this file that synth did not write; "
                "nothing was changed (choose another --out or move the file)"
            )
        owned.append(path)
    return owned


def _untemp(name: str) -> str:
    """``x.mp4`` for atomic_write's temporary ``.x.mp4.<pid>.<hex>.tmp``, else the name itself."""
    match = re.fullmatch(r"\.(.+)\.\d+\.[0-9a-f]+\.tmp", name)
    return match.group(1) if match else name


def _prepare_out(out: Path) -> Path:
    """Where the tree is written: ``out`` itself when it is new or empty; a staging folder beside it when it
    holds a previous synth tree, which is swapped in once complete (a run that fails, on a full disk or
    otherwise, leaves the previous tree as it was). Anything else is refused, untouched."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out exists and is not a directory")
    stale = interrupted_replacement(out)
    if stale is not None:
        raise ConfigError(f"{out}: replacing the synthetic tree there was interrupted; the previous tree "
                          f"is in {stale}: move it back, or remove it and run synth again")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return out
    manifest_path = out / MANIFEST_NAME
    try:
        old = read_json(manifest_path) if manifest_path.is_file() else None
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict) or old.get("format") != MANIFEST_FORMAT:
        raise ConfigError(
            f"{out}: --out is not empty and is not a previous synth tree (no {MANIFEST_NAME}); "
            "choose an empty or new directory"
        )
    _owned_files(out, old)  # refuses a tree holding a file synth did not write
    staging = staging_path(out)
    staging.mkdir()
    return staging


def _pick_files(rng: np.random.Generator, paths: list[str], fraction: float) -> list[str]:
    order = rng.permutation(len(paths))[: _ceil_count(fraction, len(paths))]
    return sorted(paths[int(i)] for i in order)


def generate(
    cfg: SynthConfig,
    out: str | Path,
    *,
    workers: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write the demo tree under ``out`` and return its manifest (also saved as ``synth_manifest.json``).

    ``workers`` > 1 renders videos in that many processes (output unchanged); ``on_progress(done, total)``
    is called with crop counts as videos finish. ``out`` must be new, empty or a previous synth tree.
    """
    out = Path(out)
    videos = plan(cfg)
    target = _prepare_out(out)
    kept = (f"the previous synthetic tree in {out} is kept" if target != out else
            f"the synthetic tree in {out} is incomplete: run synth again once there is space (it replaces "
            "an incomplete tree)")
    try:
        manifest = _write_tree(cfg, videos, target, workers, on_progress)
    except BaseException as exc:
        if target != out:
            shutil.rmtree(target, ignore_errors=True)
        if isinstance(exc, DiskFullError):
            where = str(exc).replace(str(target), str(out))
            raise DiskFullError(f"{where}; {kept}", out) from None
        if isinstance(exc, OSError) and is_disk_full(exc):  # a folder that could not be made
            raise DiskFullError(f"{out}: no space left on the device while writing the synthetic tree; "
                                f"{kept}", out) from None
        raise
    if target != out:
        swap_in(target, out)
    return manifest


def _write_tree(cfg: SynthConfig, videos: list[VideoPlan], out: Path, workers: int,
                on_progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    source_plans: list[dict[str, Any]] = []
    if cfg.videos_with_audio:
        from abawfeat.data.synth_av import plan_sources

        source_plans = plan_sources(videos, cfg.seed)
    # A provisional manifest first: a crashed run still leaves a tree that a re-run recognises and replaces.
    provisional = _manifest(cfg, videos, {}, complete=False)
    if source_plans:
        provisional["sources"] = [{"file": p["file"]} for p in source_plans]
    write_json(out / MANIFEST_NAME, provisional)

    rng = _rng(cfg.seed, 3)
    ann_files = [
        (v, task, f"{ANNOTATIONS_DIR}/{single(task).folders[0]}/{SPLIT_DIRS[v.split]}/{v.name}.txt")
        for v in videos if v.split != "test" for task in v.tasks
    ]
    rels = [rel for _v, _t, rel in ann_files]
    files = {"crlf": _pick_files(rng, rels, cfg.crlf_fraction),
             "no_final_newline": _pick_files(rng, rels, cfg.no_final_newline_fraction)}
    crlf, no_nl = set(files["crlf"]), set(files["no_final_newline"])
    for v, task, rel in ann_files:
        atomic_write_bytes(out / rel, _annotation_text(task, v.labels[task], rel in crlf, rel not in no_nl))
    for task in single_task_names():
        tests = sorted((v for v in videos if v.split == "test" and task in v.tasks), key=lambda v: v.name)
        atomic_write_bytes(out / TEST_LISTS_DIR / single(task).test_list_file,
                           "".join(f"{v.name}\n" for v in tests).encode("ascii"))
        atomic_write_bytes(out / SAMPLES_DIR / SAMPLE_FILE_NAME.format(tag=single(task).sample_tag),
                           _sample_text(task, tests))

    jobs = [
        {"seed": cfg.seed, "index": v.index, "background": v.background, "state": v.state,
         "frames": v.crop_frames, "dir": str(out / v.crop_dir / v.name), "noise_std": cfg.noise_std,
         "identity_strength": cfg.identity_strength, "jpeg_quality": cfg.jpeg_quality}
        for v in videos
    ]
    total = sum(len(j["frames"]) for j in jobs)
    done = 0
    if workers <= 1 or len(jobs) == 1 or total < _POOL_MIN_CROPS:
        for job in jobs:
            done += _render_video(job)
            if on_progress:
                on_progress(done, total)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # fork where the platform has it: spawn would re-run the caller's script in every worker (a
        # script without a __main__ guard would recurse), and the workers only use numpy and PIL.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(_render_video, job) for job in jobs]
            for fut in as_completed(futures):
                done += fut.result()
                if on_progress:
                    on_progress(done, total)

    manifest = _manifest(cfg, videos, files, complete=True)
    if source_plans:
        from abawfeat.data.synth_av import write_source_videos

        manifest["sources"] = write_source_videos(source_plans, videos, out, cfg.seed, workers=workers)
    write_json(out / MANIFEST_NAME, manifest)
    return manifest


def load_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a synth tree (raises ConfigError if ``root`` is not one)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: no synth manifest here")
    return read_json(path)
