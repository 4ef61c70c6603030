"""Segment-wise encoding and per-frame pooling (abawfeat/audio/stream.py), with hand-made "encoders" whose
outputs are known exactly, so every index and every boundary is checked against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from abawfeat.audio.stream import FrameGeometry, WindowPooler, encode_stream, window_of

G = FrameGeometry()


def local_forward(x: np.ndarray) -> np.ndarray:
    """A purely local 'encoder': output j = (mean, max) of its receptive field [320 j, 320 j + 400)."""
    n = G.n_outputs(len(x))
    idx = np.arange(n)[:, None] * G.hop + np.arange(G.receptive_field)[None, :]
    win = x[idx] if n else np.zeros((0, G.receptive_field), np.float32)
    return np.stack([win.mean(axis=1), win.max(axis=1)], axis=1) if n else np.zeros((0, 2), np.float32)


def segment_forward(x: np.ndarray) -> np.ndarray:
    """An 'encoder' whose outputs depend on the whole input it is fed (like GroupNorm or attention): the
    local mean minus the mean over the input, plus the input's length."""
    y = local_forward(x)
    if len(y):
        y[:, 0] -= x.mean()
        y[:, 1] = len(x)
    return y


def run(x: np.ndarray, block: int, forward, chunk: int, context: int) -> tuple[np.ndarray, list[int]]:
    blocks = [x[i : i + block] for i in range(0, len(x), block)]
    pieces = list(encode_stream(blocks, forward, G, chunk, context))
    starts = [j0 for j0, _ in pieces]
    out = np.concatenate([o for _, o in pieces]) if pieces else np.zeros((0, 2))
    return out, starts


def reference_segments(x: np.ndarray, forward, chunk: int, context: int) -> np.ndarray:
    """The definition, written out directly: segment k keeps outputs [kC, (k+1)C) from its own input, the
    audio of outputs [kC - O, (k+1)C + O) clipped at the track; where that runs past the track's last
    output in a track of at least C + 2O outputs, the audio of the track's last C + 2O outputs."""
    n_out = G.n_outputs(len(x))
    full = chunk + 2 * context
    rows = []
    for j in range(n_out):
        k = j // chunk
        if (k + 1) * chunk + context > n_out >= full:
            s0 = G.hop * (n_out - full)
            s1 = s0 + G.hop * (full - 1) + G.receptive_field
        else:
            s0 = max(0, G.hop * (k * chunk - context))
            s1 = min(len(x), G.hop * ((k + 1) * chunk + context - 1) + G.receptive_field)
        rows.append(forward(x[s0:s1])[j - s0 // G.hop])
    return np.array(rows).reshape(-1, 2)


@pytest.mark.parametrize("n", [0, 399, 400, 719, 720, 16_000, 16_000 * 3 + 123, 16_000 * 7])
@pytest.mark.parametrize("block", [1000, 7919, 10**7])
def test_local_encoder_chunked_equals_one_shot_exactly(n: int, block: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    out, starts = run(x, block, local_forward, chunk=50, context=10)  # 1 s segments, 0.2 s context
    assert out.shape == (G.n_outputs(n), 2)
    np.testing.assert_array_equal(out, local_forward(x))  # every output exactly once, in order
    assert starts == sorted(starts) and all(j0 % 50 == 0 for j0 in starts)


@pytest.mark.parametrize("block", [333, 5000, 16_000, 10**7])
def test_segments_do_not_depend_on_how_the_track_was_decoded(block: int) -> None:
    x = np.random.default_rng(1).standard_normal(16_000 * 5 + 77).astype(np.float32)
    out, _ = run(x, block, segment_forward, chunk=60, context=15)
    np.testing.assert_array_equal(out, reference_segments(x, segment_forward, 60, 15))


@pytest.mark.parametrize("block", [333, 16_000])
def test_tracks_longer_than_a_segment_run_two_segment_shapes(block: int) -> None:
    """Whatever a track's length, once it holds a full segment: the first segment (C + O outputs) and full
    ones (C + 2 O), the last included; shorter tracks are one or two segments clipped at their end."""
    chunk, context = 60, 15
    first, full = G.hop * (chunk + context - 1) + G.receptive_field, G.hop * (chunk + 2 * context - 1) + 400
    for n_out in (60, 61, 89, 90, 91, 119, 120, 121, 179, 180, 181, 250, 359):
        n = G.hop * (n_out - 1) + G.receptive_field + int(n_out) % 7 * 41  # trailing samples of no output
        x = np.random.default_rng(n_out).standard_normal(n).astype(np.float32)
        lengths: list[int] = []

        def forward(s: np.ndarray, lengths: list[int] = lengths) -> np.ndarray:
            lengths.append(len(s))
            return segment_forward(s)

        out, _ = run(x, block, forward, chunk, context)
        np.testing.assert_array_equal(out, reference_segments(x, segment_forward, chunk, context))
        if n_out >= chunk + 2 * context:
            assert set(lengths) <= {first, full} and lengths[-1] == full, (n_out, lengths)
        if n_out <= chunk:
            assert lengths == [n]


def test_a_track_of_at_most_one_chunk_is_one_segment() -> None:
    x = np.random.default_rng(2).standard_normal(320 * 59 + 400).astype(np.float32)  # exactly 60 outputs
    out, starts = run(x, 1000, segment_forward, chunk=60, context=15)
    np.testing.assert_array_equal(out, segment_forward(x))  # one-shot: the whole track in one piece
    assert starts == [0]


def test_geometry() -> None:
    assert G.rate == 50.0
    assert [G.n_outputs(n) for n in (0, 399, 400, 719, 720, 16_000)] == [0, 0, 1, 1, 2, 49]
    assert G.centre(0) == pytest.approx(0.0125) and G.centre(50) == pytest.approx(1.0125)
    assert G.outputs_of(20.0) == 1000
    with pytest.raises(ValueError):
        G.outputs_of(0.03)
    with pytest.raises(ValueError):
        window_of(10)


def brute_force_pool(times: np.ndarray, a0: float, n_out: int, window_s: float, values: np.ndarray):
    centres = a0 + G.centre(np.arange(n_out))
    rows, has = [], []
    for t in times:
        inside = np.flatnonzero((centres >= t - window_s / 2 - 1e-9) & (centres <= t + window_s / 2 + 1e-9))
        has.append(bool(len(inside)) and np.isfinite(t))
        rows.append(values[inside].mean(axis=0) if len(inside) else np.zeros(values.shape[1]))
    return np.array(has), np.array(rows)


@pytest.mark.parametrize("a0", [0.0, 0.7333, -0.05])
@pytest.mark.parametrize("window_ms", [20, 100, 500, 1500])
def test_pooling_matches_brute_force(a0: float, window_ms: float) -> None:
    rng = np.random.default_rng(int(window_ms))
    frames = np.flatnonzero(rng.random(200) < 0.8).astype(np.int32) + 1
    times = (frames - 1) / 25.0 + rng.normal(0, 0.002, len(frames))  # jittered, still ascending
    times = np.maximum.accumulate(times)
    n_out = 300  # 6 s of outputs: the frames run to 8 s, so the end is uncovered too
    values = rng.standard_normal((n_out, 3)).astype(np.float32)
    pooler = WindowPooler(frames, times, a0, G, window_ms / 1000, 3)
    for start in range(0, n_out, 37):  # outputs arrive in uneven pieces
        pooler.add(start, values[start : start + 37])
    pooler.finish(n_out)
    kept, rows, missing = pooler.result()
    has, expected = brute_force_pool(times, a0, n_out, window_ms / 1000, values)
    np.testing.assert_array_equal(kept, frames[has])
    np.testing.assert_array_equal(missing, frames[~has])
    np.testing.assert_allclose(rows, expected[has], rtol=1e-5, atol=1e-6)
    assert not has[-1]  # past the audio's end


def test_pooling_unknown_times_and_late_audio() -> None:
    frames = np.arange(1, 11, dtype=np.int32)
    times = np.arange(10) / 10.0
    times[8:] = np.nan  # frames past the video's last frame
    pooler = WindowPooler(frames, times, 0.4, G, 0.1, 1)  # audio starts at 0.4 s
    values = np.arange(100, dtype=np.float32)[:, None]  # output j has value j
    pooler.add(0, values)
    pooler.finish(100)
    kept, rows, missing = pooler.result()
    # Output j is centred at 0.4 + 0.0125 + 0.02 j s. Frame 4 (t = 0.3): window [0.25, 0.35] ends before
    # the first centre: no row. Frame 5 (t = 0.4): [0.35, 0.45] holds j = 0, 1. Frame 6: [0.45, 0.55],
    # j = 2..6.
    assert kept.tolist() == [5, 6, 7, 8] and missing.tolist() == [1, 2, 3, 4, 9, 10]
    assert rows[0, 0] == pytest.approx(0.5)
    assert rows[1, 0] == pytest.approx(np.mean([2, 3, 4, 5, 6]))


def test_pooler_bounds_its_buffer() -> None:
    frames = np.arange(1, 30_001, dtype=np.int32)  # 1000 s at 30 fps
    pooler = WindowPooler(frames, (frames - 1) / 30.0, 0.0, G, 0.5, 4)
    biggest = 0
    for start in range(0, 50_000, 1000):
        pooler.add(start, np.ones((1000, 4), np.float32))
        biggest = max(biggest, len(pooler._buf))
    pooler.finish(50_000)
    assert biggest <= 1000 + 30  # one piece plus one window, whatever the length
    kept, rows, _ = pooler.result()
    assert len(kept) == 30_000 and np.all(rows == 1)
