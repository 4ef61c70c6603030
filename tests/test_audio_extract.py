"""Audio stage one end to end on held-out synthetic videos with sound (abawfeat synth --videos-with-audio):
exact frame alignment against the crops with every awkward case (no audio, late start, audio ending early,
variable frame rate, an AVI, a _left/_right pair), the pooled values themselves, resume after an
interruption and after kill -9, the lock, torchrun shares, layer averaging, the CLI, and stage two on an audio
cache alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from abawfeat.audio.decode import read_audio
from abawfeat.audio.extract import AudioExtractResult, _Run
from abawfeat.audio.stream import FrameGeometry, encode_stream
from abawfeat.cache import VOLATILE_KEYS, CacheWriter, FeatureCache, parts_dir, verify_cache
from abawfeat.cli import app
from abawfeat.data.affwild2 import AffWild2
from abawfeat.data.synth import SynthConfig, generate
from abawfeat.encoders import ENCODERS
from abawfeat.encoders.speech import SpeechConfig, Wav2Vec2Encoder
from abawfeat.errors import CacheError, ConfigError, DataError
from abawfeat.extract import ExtractConfig, format_summary, run_extraction

TESTS = Path(__file__).parent
G = FrameGeometry()


@dataclass
class FakeSpeechConfig(SpeechConfig):
    """wav2vec2 at the tiny size, in 1 s segments with 0.2 s of context, so that the short synthetic videos
    are cut into several segments and the stitching is exercised."""

    size: str = "tiny"
    chunk_s: float = 1.0
    context_s: float = 0.2


@ENCODERS.register("fake-speech")
class FakeSpeech(Wav2Vec2Encoder):
    config_class = FakeSpeechConfig

    def encode(self, samples: np.ndarray) -> np.ndarray:
        delay = float(os.environ.get("FAKE_SPEECH_DELAY", "0"))
        if delay:
            time.sleep(delay)  # lets the kill test catch a run in the middle
        return super().encode(samples)


# The speech encoders' own options: they reach the encoder as --encoder-opt does (encoder_options).
ENCODER_OPTIONS = ("layer", "layers", "window_ms")


def config(tree: Path, out: Path, **kw: object) -> ExtractConfig:
    """An extraction of the test tree; keyword arguments named in ENCODER_OPTIONS go to the encoder."""
    options = {k: kw.pop(k) for k in list(kw) if k in ENCODER_OPTIONS}
    return ExtractConfig(**{"backbone": "fake-speech", "data": tree, "out": out, "random_init": True,
                            "progress": False, "device": "cpu", "encoder_options": options, **kw})


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("held-out") / "AffAudio"
    generate(SynthConfig(videos=8, frames=75, seed=11, videos_with_audio=True), root)
    return root


@pytest.fixture(scope="module")
def manifest(tree: Path) -> dict:
    return json.loads((tree / "synth_manifest.json").read_text())


# One torch thread in this process, as in the subprocesses below (OMP_NUM_THREADS=1): the kill -9 and torchrun
# runs must match the in-process reference bit for bit, and matrix products round differently on 2 threads.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def extracted(tree: Path, tmp_path_factory: pytest.TempPathFactory,
              one_torch_thread: None) -> tuple[Path, AudioExtractResult]:
    out = tmp_path_factory.mktemp("cache") / "audio.h5"
    result = run_extraction(config(tree, out))
    assert isinstance(result, AudioExtractResult)
    return out, result


def sources_by_video(manifest: dict) -> dict[str, dict]:
    return {v: s for s in manifest["sources"] for v in s["videos"]}


def snapshot(path: Path) -> dict:
    with FeatureCache(path) as cache:
        prov = {k: v for k, v in cache.provenance.items() if k not in VOLATILE_KEYS}
        return {"provenance": prov, **{v: (cache.frames(v).tolist(), cache.features(v, dtype=None).tobytes(),
                                           cache.bad_frames(v).tolist()) for v in cache.videos()}}


def expected_rows(tree: Path, source: dict, crop_frames: np.ndarray, window_s: float) -> np.ndarray:
    """Which crop frames get a row, computed independently of the pooler: the frame's time from the
    manifest, the track's decoded span, and the rule "an encoder output is centred in the window"."""
    k = crop_frames - 1
    times = np.asarray(source["frame_times"])[k] if source["vfr"] else k / source["fps"]
    if source["audio"] is None:
        return np.zeros(len(crop_frames), bool)
    start, samples = read_audio(tree / source["file"])
    centres = start + (G.hop * np.arange(G.n_outputs(len(samples))) + G.receptive_field / 2) / G.sample_rate
    return np.array([bool(np.any(np.abs(centres - t) <= window_s / 2 + 1e-9)) for t in times])


def test_the_held_out_tree_has_every_awkward_case(manifest: dict) -> None:
    sources = manifest["sources"]
    assert any(s["vfr"] for s in sources) and any(s["fps"] != 30 for s in sources)
    assert any(s["file"].endswith(".avi") for s in sources)
    assert any(len(s["videos"]) == 2 for s in sources)
    audio = [s["audio"] for s in sources]
    assert any(a is None for a in audio)
    assert any(a and a["start_s"] > 0 for a in audio)
    assert any(s["audio"] and s["audio"]["end_s"] < s["frames"] / s["fps"] - 0.2 for s in sources)


def test_rows_are_exactly_the_crop_frames_with_audio(tree: Path, manifest: dict, extracted) -> None:
    out, result = extracted
    assert verify_cache(out) == []
    data = AffWild2(tree)
    by_video = sources_by_video(manifest)
    with FeatureCache(out) as cache:
        assert cache.videos() == data.videos_with_crops()
        assert cache.provenance["preprocessing"]["alignment"]["window_ms"] == 500.0
        for video in cache.videos():
            crops = data.crop_frames(video)
            frames, bad = cache.frames(video), cache.bad_frames(video)
            # Every crop frame is accounted for: a row, or listed as having no audio; nothing else.
            assert np.array_equal(np.union1d(frames, bad), crops) and not np.intersect1d(frames, bad).size
            has = expected_rows(tree, by_video[video], crops, 0.5)
            assert np.array_equal(frames, crops[has]), video
            source = by_video[video]
            if source["audio"] is None:
                assert len(frames) == 0 and video in result.no_audio
            elif source["audio"]["start_s"] > 0:  # late start: a prefix of frames has no row
                assert len(bad) and bad.max() < frames.min()
                first = (frames.min() - 1) / source["fps"]
                assert first == pytest.approx(source["audio"]["start_s"] - 0.25, abs=0.06)
            elif source["audio"]["end_s"] < source["frames"] / source["fps"] - 0.2:  # ends early: a suffix
                assert len(bad) and bad.min() > frames.max()
            else:
                assert len(bad) == 0, video
    assert set(result.uncovered) == {v for v in data.videos_with_crops() if len(expected_rows(
        tree, by_video[v], data.crop_frames(v), 0.5)) and not expected_rows(
        tree, by_video[v], data.crop_frames(v), 0.5).all()}
    assert result.frames == sum(len(FeatureCache(out).frames(v)) for v in data.videos_with_crops())


def test_pair_halves_share_one_decoded_track(tree: Path, manifest: dict, extracted) -> None:
    out, _ = extracted
    pair = next(s for s in manifest["sources"] if len(s["videos"]) == 2)
    with FeatureCache(out) as cache:
        (fl, xl), (fr, xr) = ((cache.frames(v), cache.features(v)) for v in pair["videos"])
    common, il, ir = np.intersect1d(fl, fr, return_indices=True)
    assert len(common) > 10
    np.testing.assert_array_equal(xl[il], xr[ir])  # same frame time, same audio, same row


def test_pooled_values_are_the_window_means(tree: Path, manifest: dict, extracted) -> None:
    """Recompute one VFR video's rows from the public pieces: decode, whole-track statistics, segments,
    then a brute-force mean over the outputs centred in each frame's window."""
    out, _ = extracted
    source = next(s for s in manifest["sources"] if s["vfr"])
    video = source["videos"][0]
    encoder = FakeSpeech(FakeSpeechConfig(random_init=True))
    start, samples = read_audio(tree / source["file"])
    with torch.no_grad(), encoder.use_track(encoder.track_statistics([samples])):
        outputs = np.concatenate([o for _, o in encode_stream([samples], encoder.encode, G, encoder.chunk,
                                                                encoder.context)])
    centres = start + (G.hop * np.arange(len(outputs)) + 200) / G.sample_rate
    with FeatureCache(out) as cache:
        frames, features = cache.frames(video), cache.features(video)
    times = np.asarray(source["frame_times"])[frames - 1]
    for frame, t, row in zip(frames, times, features, strict=True):
        inside = np.abs(centres - t) <= 0.25 + 1e-9
        np.testing.assert_allclose(row, outputs[inside].mean(axis=0), rtol=2e-3, atol=2e-3), frame


def test_summary_and_warnings(tree: Path, manifest: dict, tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    silent = next(s for s in manifest["sources"] if s["audio"] is None)["videos"][0]
    late = next(s for s in manifest["sources"] if s["audio"] and s["audio"]["start_s"] > 0)["videos"][0]
    result = run_extraction(config(tree, tmp_path / "a.h5", videos=(silent, late)))
    err = capsys.readouterr().err
    assert err.count("no audio stream") == 1 and silent in err
    lines = format_summary(result)
    assert "2 videos extracted" in lines[0] and "window 500 ms" in lines[0] and "x real time" in lines[0]
    text = "\n".join(lines)
    assert f"no audio stream (1 video, no rows): {silent}" in text
    assert f"{late}: " in text and "frames without audio" in text


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tree: Path, extracted, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reference, _ = extracted
    out = tmp_path / "resumed.h5"
    real_write = _Run.write
    calls = []

    def dying_write(self: _Run, *args: object) -> None:
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        calls.append(args[0])
        real_write(self, *args)

    monkeypatch.setattr(_Run, "write", dying_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_extraction(config(tree, out))
    assert len(list(parts_dir(out).glob("*.h5"))) == 3 and not out.exists()  # parts kept, not consolidated
    monkeypatch.setattr(_Run, "write", real_write)
    result = run_extraction(config(tree, out))
    assert result.videos_skipped == 3 and result.videos_done == len(AffWild2(tree).videos_with_crops()) - 3
    assert snapshot(out) == snapshot(reference)
    again = run_extraction(config(tree, out))  # nothing left: the file is not rewritten
    assert again.videos_done == 0 and snapshot(out) == snapshot(reference)


def test_lock_and_identity(tree: Path, extracted, tmp_path: Path) -> None:
    reference, _ = extracted
    out = tmp_path / "locked.h5"
    with FeatureCache(reference) as cache:
        provenance = cache.provenance
    with CacheWriter(out, provenance), pytest.raises(CacheError, match="another extraction"):
        run_extraction(config(tree, out))
    # Another window, layer or seed is another cache: adding to this one is refused.
    copy = tmp_path / "copy.h5"
    shutil.copy(reference, copy)
    for change in ({"window_ms": 300.0}, {"layer": 2}, {"seed": 1}):
        with pytest.raises(CacheError, match="different encoder configuration"):
            run_extraction(config(tree, copy, **change))


def test_layer_averaging_through_extraction(tree: Path, manifest: dict, tmp_path: Path) -> None:
    video = next(s for s in manifest["sources"] if s["audio"] and s["audio"]["start_s"] == 0)["videos"][0]
    feats = {}
    for name, kw in (("one", {"layer": 1}), ("two", {"layer": 2}), ("mean", {"layers": "1:2"})):
        out = tmp_path / f"{name}.h5"
        run_extraction(config(tree, out, videos=(video,), dtype="float32", **kw))
        with FeatureCache(out) as cache:
            feats[name] = cache.features(video)
            if name == "mean":
                assert cache.provenance["encoder_provenance"]["layers"] == [1, 2]
    # Pooling is a mean, so the pooled mean of two layers is the mean of the two pooled layers.
    np.testing.assert_allclose(feats["mean"], (feats["one"] + feats["two"]) / 2, rtol=1e-4, atol=1e-5)
    assert not np.allclose(feats["one"], feats["two"])


def test_missing_source_is_skipped_and_extracted_once_it_is_there(tree: Path, manifest: dict,
                                                                   tmp_path: Path) -> None:
    copy = tmp_path / "AffCopy"
    shutil.copytree(tree, copy)
    source = next(s for s in manifest["sources"] if s["audio"] and len(s["videos"]) == 1)
    video = source["videos"][0]
    hidden = tmp_path / "aside.bin"
    (copy / source["file"]).rename(hidden)
    out = tmp_path / "m.h5"
    result = run_extraction(config(copy, out))
    assert result.no_source == [video] and "no source video found" in "\n".join(format_summary(result))
    with FeatureCache(out) as cache:
        assert video not in cache
    hidden.rename(copy / source["file"])
    result = run_extraction(config(copy, out))
    assert result.videos_done == 1 and verify_cache(out) == []
    for path in copy.rglob("*.mp4"):
        path.unlink()
    for path in copy.rglob("*.avi"):
        path.unlink()
    with pytest.raises(DataError, match="no source videos"):
        run_extraction(config(copy, tmp_path / "none.h5"))


def test_options_that_do_not_apply(tree: Path, tmp_path: Path) -> None:
    for kw, match in (({"window_ms": 5.0}, "window_ms 5.0: use 20"), ({"compile": True}, "--compile"),
                      ({"batch_size": 8}, "--batch-size"), ({"layers": "3:1"}, "a <= b")):
        with pytest.raises(ConfigError, match=match):
            run_extraction(config(tree, tmp_path / "x.h5", **kw))
    assert not (tmp_path / "x.h5").exists()
    # A face encoder has no such options: refused as any option it does not have.
    for key, value in (("window_ms", "400"), ("layer", "3")):
        face = ExtractConfig(backbone="ddamfn", data=tree, out=tmp_path / "f.h5", random_init=True,
                             encoder_options={key: value})
        with pytest.raises(ConfigError, match=f"encoder 'ddamfn' has no option {key} \\(options: .*seed"):
            run_extraction(face)


# ---------------------------------------------------------------------------------------------- the CLI


def cli(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def test_cli_extract_base_wav2vec2_then_info_verify_and_train_head(tree: Path, manifest: dict,
                                                                   tmp_path: Path) -> None:
    """The real entry point with the registered wav2vec2 (base-sized, random weights, only up to layer 1):
    extract, inspect, then train a VA head on the audio cache alone."""
    out = tmp_path / "w2v.h5"
    res = cli("extract", "--backbone", "wav2vec2", "--random-init", "--layer", "1", "--window-ms", "400",
              "--data", str(tree), "--out", str(out), "--precision", "bf16", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "frames with audio rows" in res.stdout and "window 400 ms" in res.stdout
    res = cli("cache", "verify", str(out))
    assert res.exit_code == 0, res.output
    res = cli("cache", "info", str(out), "--json")
    info = json.loads(res.stdout)
    assert info["encoder"] == "wav2vec2" and info["feature_dim"] == 768
    assert info["provenance"]["preprocessing"]["alignment"]["window_ms"] == 400.0
    run = tmp_path / "run"
    res = cli("train-head", "--task", "va", "--head", "fc", "--backbone", "wav2vec2", "--data", str(tree),
              "--cache", str(out), "--out", str(run), "--epochs", "2", "--no-plots", "--device", "cpu")
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["ccc_arousal"]) and metrics["task"] == "va"


def test_cli_errors_are_one_line(tree: Path, tmp_path: Path) -> None:
    for args, match in (
        (["--backbone", "wav2vec2", "--window-ms", "5"], "window_ms 5.0: use 20"),
        (["--backbone", "ddamfn", "--window-ms", "500"], "encoder 'ddamfn' has no option window_ms"),
        (["--backbone", "ddamfn", "--layer", "3"], "encoder 'ddamfn' has no option layer"),
        (["--backbone", "hubert", "--layers", "1-3"], "layers '1-3': use a:b"),
        (["--backbone", "hubert", "--layer", "1", "--encoder-opt", "layer=2"],
         "--layer and --encoder-opt layer"),
        (["--backbone", "wavlm", "--layer", "one"], "option layer='one': expected int or none"),
    ):
        res = cli("extract", *args, "--random-init", "--data", str(tree), "--out", str(tmp_path / "e.h5"))
        assert res.exit_code == 2, res.output
        assert match in res.output and "Traceback" not in res.output


def test_encoders_command_lists_the_audio_encoders() -> None:
    res = cli("encoders", "--json")
    names = {e["name"]: e for e in json.loads(res.stdout)["encoders"]}
    assert {"wav2vec2", "hubert", "wavlm"} <= set(names) and names["wavlm"]["modality"] == "audio"
    assert names["hubert"]["weights"].startswith("facebook/hubert-base-ls960")
    res = cli("encoders")
    assert res.exit_code == 0 and "hubert" in res.stdout and "16 kHz" in res.stdout


# ------------------------------------------------------------------------------------- kill -9 and torchrun

_RUNNER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_audio_extract  # noqa: F401  (registers fake-speech)
    from abawfeat.cli import main
    sys.argv = ["abawfeat"] + sys.argv[1:]
    main()
""").format(tests=str(TESTS))


def _args(tree: Path, out: Path) -> list[str]:
    return ["extract", "--backbone", "fake-speech", "--random-init", "--data", str(tree), "--out", str(out),
            "--device", "cpu"]


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, ABAWFEAT_NO_PROGRESS="1", OMP_NUM_THREADS="1", **extra)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tree: Path, extracted, tmp_path: Path) -> None:
    reference, _ = extracted
    out = tmp_path / "killed.h5"
    n_videos = len(AffWild2(tree).videos_with_crops())
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, *_args(tree, out)],
                            env=_env(FAKE_SPEECH_DELAY="0.1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts_dir(out).glob("[!_.]*.h5"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_parts = len(list(parts_dir(out).glob("[!_.]*.h5")))
    assert 2 <= n_parts < n_videos and not out.exists()
    done = subprocess.run([sys.executable, "-c", _RUNNER, *_args(tree, out)], env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.replace("\n", " ")
    assert f"{n_videos - n_parts} videos extracted, {n_parts} already complete" in summary
    assert snapshot(out) == snapshot(reference)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_single_process(tree: Path, extracted, tmp_path: Path) -> None:
    reference, _ = extracted
    out = tmp_path / "multi.h5"
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script),
         *_args(tree, out)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot(out) == snapshot(reference)
    assert verify_cache(out) == [] and not parts_dir(out).exists()
