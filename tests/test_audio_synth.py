"""``abawfeat synth --videos-with-audio``: source videos whose voice follows the labels, the awkward cases
planted where the manifest says, byte-identical output, and a re-run over an existing tree."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from abawfeat.audio.decode import SAMPLE_RATE, probe, read_audio, video_frame_times
from abawfeat.cli import app
from abawfeat.data.synth import SynthConfig, generate, plan


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_rerun_replaces(tmp_path: Path) -> None:
    cfg = SynthConfig(videos=6, frames=40, seed=4, videos_with_audio=True)
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b", workers=2)
    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert any(k.endswith((".mp4", ".avi")) for k in a)
    assert a == b  # videos included, whatever the number of workers
    generate(SynthConfig(videos=6, frames=40, seed=5, videos_with_audio=True), tmp_path / "a")  # replaces it
    assert digest(tmp_path / "a") != a


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "AffSound"
    manifest = generate(SynthConfig(videos=8, frames=250, seed=2, videos_with_audio=True), root, workers=2)
    return root, manifest


def test_files_match_the_manifest(tree: tuple[Path, dict]) -> None:
    root, manifest = tree
    videos = {v["name"] for v in manifest["videos"]}
    covered = {v for s in manifest["sources"] for v in s["videos"]}
    assert covered == videos  # every video with crops has its source file
    for source in manifest["sources"]:
        path = root / source["file"]
        assert path.parent.name in ("batch1", "batch2") and path.stem == source["name"]
        times = video_frame_times(path)
        assert len(times) == source["frames"]
        expected = source["frame_times"] if source["vfr"] else np.arange(source["frames"]) / source["fps"]
        np.testing.assert_allclose(times, expected, atol=1e-6)
        info = probe(path)
        assert info.has_audio == (source["audio"] is not None)
        if info.has_audio:
            start, samples = read_audio(path)
            assert start == pytest.approx(source["audio"]["start_s"], abs=0.03)
            end = start + len(samples) / SAMPLE_RATE
            assert end == pytest.approx(source["audio"]["end_s"], abs=0.06)
    assert plan(SynthConfig(videos=8, frames=250, seed=2))[0].va.shape[1] == 2


def test_the_voice_follows_arousal_with_pauses_noise_and_silence(tree: tuple[Path, dict]) -> None:
    root, manifest = tree
    va_of = {v.name: v.va for v in plan(SynthConfig(**{**manifest["config"], "expr_weights": tuple(
        manifest["config"]["expr_weights"])}))}
    correlations = []
    for source in manifest["sources"]:
        if source["audio"] is None or len(source["videos"]) != 1 or source["audio"]["start_s"] > 0:
            continue
        start, x = read_audio(root / source["file"])
        times = (np.asarray(source["frame_times"]) if source["vfr"]
                 else np.arange(source["frames"]) / source["fps"])
        arousal = va_of[source["videos"][0]][: len(times), 1]
        # Loudness over 1 s windows (speech and pauses alike) against the mean arousal of the frames shown
        # then.
        win = SAMPLE_RATE
        n = min(len(x) // win, int(times[-1]))
        db = [10 * np.log10(np.mean(x[i * win : (i + 1) * win] ** 2) + 1e-10) for i in range(n)]
        ar = [arousal[(times >= start + i) & (times < start + i + 1)].mean() for i in range(n)]
        if np.std(ar) > 0.05:
            correlations.append(np.corrcoef(db, ar)[0, 1])
        # Digital silence somewhere (a run of exact zeros of at least 0.3 s), a noise floor elsewhere.
        zero = np.abs(x) < 1e-6
        runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], zero.astype(int), [0]]))))[::2]
        assert runs.max() >= 0.3 * SAMPLE_RATE
        assert np.percentile(np.abs(x[~zero]), 5) > 0
    assert len(correlations) >= 2 and min(correlations) > 0 and np.mean(correlations) > 0.4, correlations


def test_cli_videos_with_audio(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "t"), "--videos", "6", "--frames", "30",
                                   "--workers", "1", "--videos-with-audio"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "t" / "synth_manifest.json").read_text())
    assert "source videos" in res.stdout and len(manifest["sources"]) == 5
    assert manifest["config"]["videos_with_audio"] is True
