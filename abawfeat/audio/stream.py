"""Long audio through a speech encoder in bounded memory, and its 50 Hz outputs pooled per video frame.

**Output geometry.** wav2vec2, HuBERT and WavLM share one convolutional front end without padding: output j
is computed from samples ``[320 j, 320 j + 400)`` at 16 kHz, so outputs come 50 per second and output j is
centred ``(320 j + 200) / 16000`` s after the first sample. ``FrameGeometry`` holds those numbers.

**Segments.** A transformer attends over its whole input, and the base models' first convolution normalises
each channel over its whole input (GroupNorm), so a speech encoder's output for a moment depends on how much
audio around it was fed in. Feeding a 15-minute track at once would need memory that grows with the track
(and is far longer than the <= 16 s crops these models were trained on). So outputs are computed segment by
segment, on a grid fixed in the track's own sample numbers: segment k *keeps* outputs
``[k C, (k + 1) C)`` and is fed the audio of those outputs plus ``O`` outputs of context on each side (clipped
at the track's start), whose outputs are dropped; the last one keeps ``[k C, N)`` (N outputs in the track).
A segment whose context would run past the track's last output is instead fed the audio of the track's
last C + 2 O outputs, when the track holds that many: full length, ending with the track. So every track
longer than a segment runs the same two shapes (the first segment, C + O outputs, and full ones, C + 2 O),
and a video of a new length brings no new shape; only tracks shorter than C + 2 O outputs are cut.
``C`` and ``O`` are the encoder's ``chunk_s`` and ``context_s`` (20 s and 2 s by default). A frame's features
therefore depend only on the track and these two numbers: not on how the track was decoded into blocks, not
on where a run stopped or resumed. A track of at most ``C`` outputs is one segment: exactly a one-shot pass.
Memory is bounded by two segments of samples (the last segment reaches back C + 2 O outputs from the end)
plus one decoded block, and one segment's activations.

**Pooling.** A crop frame shown at time t gets the mean of the outputs centred inside
``[t - w / 2, t + w / 2]`` (w = ``window_ms``, both ends included). A frame whose window holds no output
centre (before the audio starts, after it ends, or a track shorter than one output) gets no row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FrameGeometry:
    """Where the encoder's outputs sit in time (the same for wav2vec2, HuBERT and WavLM)."""

    sample_rate: int = 16_000
    hop: int = 320  # samples between outputs: 50 outputs per second
    receptive_field: int = 400  # samples that make one output

    @property
    def rate(self) -> float:
        """Outputs per second."""
        return self.sample_rate / self.hop

    def n_outputs(self, n_samples: int) -> int:
        """How many outputs ``n_samples`` give (0 when shorter than one receptive field)."""
        if n_samples < self.receptive_field:
            return 0
        return (n_samples - self.receptive_field) // self.hop + 1

    def centre(self, j: np.ndarray | int) -> np.ndarray | float:
        """Seconds from the first sample to the centre of output j."""
        return (self.hop * np.asarray(j, dtype=np.float64) + self.receptive_field / 2) / self.sample_rate

    def outputs_of(self, seconds: float) -> int:
        """A duration as a whole number of outputs (raises if it is not one)."""
        n = seconds * self.rate
        if n < 0 or abs(n - round(n)) > 1e-6:
            raise ValueError(f"{seconds} s is not a whole number of {1000 / self.rate:g} ms outputs")
        return int(round(n))


# forward(samples float32 [n]) -> outputs [geometry.n_outputs(n), D]
Forward = Callable[[np.ndarray], np.ndarray]


def encode_stream(
    blocks: Iterable[np.ndarray],
    forward: Forward,
    geometry: FrameGeometry,
    chunk: int,
    context: int,
) -> Iterator[tuple[int, np.ndarray]]:
    """Run ``forward`` segment by segment over a stream of sample blocks (see the module docstring).

    ``chunk`` and ``context`` are in outputs. Yields ``(j0, outputs [n, D])`` in order: outputs
    j0 .. j0 + n - 1 of the whole track, every output exactly once. Memory: one segment plus one block."""
    if chunk < 1 or context < 0:
        raise ValueError(f"chunk must be >= 1 and context >= 0 outputs, got {chunk} and {context}")
    hop, rf = geometry.hop, geometry.receptive_field
    full = chunk + 2 * context  # outputs fed to a full segment
    buf = np.zeros(0, np.float32)
    buf_start = 0  # track sample number of buf[0]
    total = 0
    k = 0

    def bounds(k: int, n_total: int | None) -> tuple[int, int]:
        if n_total is not None:
            n_out = geometry.n_outputs(n_total)
            if (k + 1) * chunk + context > n_out >= full:  # context past the end: the track's last segment
                s0 = hop * (n_out - full)
                return s0, s0 + hop * (full - 1) + rf
        s0 = max(0, hop * (k * chunk - context))
        s1 = hop * ((k + 1) * chunk + context - 1) + rf
        return s0, (s1 if n_total is None else min(s1, n_total))

    done: list[Any] = [None, None]  # (s0, s1) and outputs of the last forward pass

    def run(k: int, n_total: int | None) -> tuple[int, np.ndarray] | None:
        nonlocal buf, buf_start
        s0, s1 = bounds(k, n_total)
        x = buf[s0 - buf_start : s1 - buf_start]
        first = k * chunk
        last = (k + 1) * chunk if n_total is None else min((k + 1) * chunk, geometry.n_outputs(n_total))
        out = None
        if last > first and len(x) >= rf:
            # The last two segments of a track can both be its last C + 2 O outputs: encoded once.
            y = done[1] if done[0] == (s0, s1) else forward(x)
            done[:] = [(s0, s1), y]
            expected = geometry.n_outputs(len(x))
            if len(y) != expected:
                raise RuntimeError(f"the encoder gave {len(y)} outputs for {len(x)} samples, not {expected}")
            lo = first - s0 // hop
            out = (first, y[lo : lo + (last - first)])
        # The next segment starts O outputs before its first kept output, or, at the end of the track, C + 2 O
        # outputs before the track's last (N > (k + 1) C): drop what lies before the earlier of the two.
        keep_from = max(0, hop * (k * chunk + 1 - 2 * context))
        if keep_from > buf_start:
            buf = buf[keep_from - buf_start :]
            buf_start = keep_from
        return out

    for block in blocks:
        if len(block) == 0:
            continue
        buf = np.concatenate([buf, np.asarray(block, dtype=np.float32)]) if len(buf) else np.asarray(
            block, dtype=np.float32)
        total += len(block)
        while total >= bounds(k, None)[1]:
            out = run(k, None)
            k += 1
            if out is not None:
                yield out
    n_out = geometry.n_outputs(total)
    while k * chunk < n_out:
        out = run(k, total)
        k += 1
        if out is not None:
            yield out


class WindowPooler:
    """Pools the outputs of one track into rows for one video's crop frames, as outputs stream in.

    ``frames`` are 1-based crop frame numbers (ascending) and ``times`` their presentation times (seconds,
    container clock; NaN = unknown, such a frame gets no row); ``audio_start`` is the time of the track's
    first sample. Outputs are kept only from the earliest window still open, so memory stays bounded."""

    def __init__(
        self,
        frames: np.ndarray,
        times: np.ndarray,
        audio_start: float,
        geometry: FrameGeometry,
        window_s: float,
        dim: int,
        dtype: np.dtype | type = np.float32,
    ) -> None:
        self.frames = np.asarray(frames, dtype=np.int32)
        times = np.asarray(times, dtype=np.float64)
        if len(times) != len(self.frames):
            raise ValueError("one time per frame")
        rel = times - audio_start  # seconds from the first sample
        half = window_s / 2.0
        c0 = geometry.receptive_field / 2 / geometry.sample_rate
        step = geometry.hop / geometry.sample_rate
        # Output j is in the window when c0 + j step lies in [rel - half, rel + half]; the epsilon keeps a
        # centre that falls on the edge inside, whatever the float rounding.
        with np.errstate(invalid="ignore"):
            lo = np.ceil((rel - half - c0) / step - 1e-9)
            hi = np.floor((rel + half - c0) / step + 1e-9) + 1
        # A frame of unknown time (past the video's last frame: only ever at the end) gets an empty window
        # beyond any output, which keeps the windows' ends non-decreasing.
        known = np.isfinite(lo) & np.isfinite(hi)
        never = np.int64(2**62)
        self._lo = np.where(known, np.maximum(np.nan_to_num(lo), 0), never).astype(np.int64)
        self._hi = np.where(known, np.nan_to_num(hi), never).astype(np.int64)
        self._hi = np.maximum(self._hi, self._lo)  # empty windows: lo == hi
        if np.any(np.diff(self._hi) < 0):
            raise ValueError("frame times must ascend with the frame numbers")
        self.dim = dim
        self.rows = np.zeros((len(self.frames), dim), dtype=dtype)
        self.has_row = np.zeros(len(self.frames), dtype=bool)
        self._next = 0  # first frame not yet decided
        self._buf = np.zeros((0, dim), np.float32)
        self._buf_start = 0
        self._received = 0

    def add(self, j0: int, outputs: np.ndarray) -> None:
        """Outputs j0 .. j0 + n - 1 (must follow the previous ones)."""
        if j0 != self._received:
            raise ValueError(f"outputs must arrive in order: expected {self._received}, got {j0}")
        self._buf = np.concatenate([self._buf, np.asarray(outputs, dtype=np.float32)])
        self._received += len(outputs)
        self._emit(self._received)

    def finish(self, n_outputs: int) -> None:
        """The track gave ``n_outputs`` in all: decide every frame left."""
        if n_outputs != self._received:
            raise ValueError(f"finish({n_outputs}) after {self._received} outputs")
        self._emit(n_outputs, final=True)

    def _emit(self, available: int, final: bool = False) -> None:
        i = self._next
        if i >= len(self.frames):
            self._buf = self._buf[:0]
            return
        # Frames whose window is complete (every output it could hold has arrived), in order.
        ready = len(self.frames) if final else i + int(np.searchsorted(self._hi[i:], available, side="right"))
        # hi is non-decreasing because frame times ascend, so the ready frames are a prefix.
        if ready > i:
            lo = np.minimum(self._lo[i:ready], available)
            hi = np.minimum(self._hi[i:ready], available)
            ok = hi > lo
            if ok.any():
                csum = np.zeros((len(self._buf) + 1, self.dim), np.float64)
                np.cumsum(self._buf, axis=0, out=csum[1:])
                a = lo[ok] - self._buf_start
                b = hi[ok] - self._buf_start
                means = (csum[b] - csum[a]) / (b - a)[:, None]
                idx = np.arange(i, ready)[ok]
                self.rows[idx] = means
                self.has_row[idx] = True
            self._next = ready
        # Keep outputs from the earliest window still open.
        start = int(self._lo[self._next]) if self._next < len(self.frames) else available
        start = min(max(start, self._buf_start), self._buf_start + len(self._buf))
        self._buf = self._buf[start - self._buf_start :]
        self._buf_start = start

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frames with a row int32 [T], rows [T, D], frames without a row int32 [K])."""
        if self._next < len(self.frames):
            raise RuntimeError("WindowPooler.result() before finish()")
        return self.frames[self.has_row], self.rows[self.has_row], self.frames[~self.has_row]


def window_of(window_ms: float) -> float:
    """``--window-ms`` in seconds, checked: at least one output period (20 ms), at most a minute."""
    if not math.isfinite(window_ms) or not 20.0 <= window_ms <= 60_000.0:
        raise ValueError(f"window_ms must be between 20 and 60000, not {window_ms}")
    return window_ms / 1000.0
