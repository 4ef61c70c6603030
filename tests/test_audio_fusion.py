"""Stage two on face + audio caches from a synthetic tree with sound (abawfeat synth --videos-with-audio).

An audio cache has no row for a crop frame without audio (they are its bad_frames) and none at all for a video
without an audio stream. Fused with a face cache, those frames must be masked: the audio group's availability
is False exactly where the audio cache lacks the frame, never a silent zero feature, never an error. Early and
late fusion train through the CLI, and the metrics `evaluate` prints equal a recomputation from the `predict`
file. The messages speak of audio rows as what they are."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from abawfeat.cache import FeatureCache
from abawfeat.cli import app
from abawfeat.data import AffWild2
from abawfeat.data.sequences import load_split
from abawfeat.data.synth import SynthConfig, generate
from abawfeat.encoders import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderInfo, ImageTransform

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class PixelGridConfig:
    weights: str | None = None
    random_init: bool = False
    seed: int = 0


@ENCODERS.register("fake-pixel-grid")
class PixelGrid(Encoder):
    """A face encoder that costs nothing, so the test's time goes to what it tests: the mean colour of a
    4 x 4 grid over the crop (48 features; the synthetic faces' expressions move them)."""

    config_class = PixelGridConfig
    summary = "test only: mean colours of a 4 x 4 grid"

    def __init__(self, config: PixelGridConfig) -> None:
        super().__init__(config)
        self.transform = ImageTransform(32, IMAGENET_MEAN, IMAGENET_STD)
        self.feature_dim = 48

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1), None

    @classmethod
    def describe(cls) -> EncoderInfo:
        return EncoderInfo(name=cls.name, feature_dim=48, input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                           interpolation="bilinear", weights="none", logit_names=None, summary=cls.summary)


def cli(*args: str) -> object:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict:
    """Seed 7 with 8 videos puts the video without audio and one whose audio starts late in VA's validation
    split, and one whose audio ends early in its training split."""
    base = tmp_path_factory.mktemp("audio-fusion")
    root = base / "AffSound"
    generate(SynthConfig(videos=8, frames=60, seed=7, videos_with_audio=True), root)
    face, audio = base / "face.h5", base / "audio.h5"
    cli("extract", "--backbone", "fake-pixel-grid", "--random-init", "--data", root, "--out", face,
        "--device", "cpu", "--workers", "0")
    res = cli("extract", "--backbone", "wav2vec2", "--random-init", "--encoder-opt", "size=tiny", "--layer",
              "2", "--window-ms", "300", "--data", root, "--out", audio, "--device", "cpu")
    manifest = json.loads((root / "synth_manifest.json").read_text())
    roles = {v: ("none" if s["audio"] is None else "late" if s["audio"]["start_s"] > 0 else "other")
             for s in manifest["sources"] for v in s["videos"]}
    return {"root": root, "face": face, "audio": audio, "roles": roles, "extract_output": res.stdout}


def test_the_tree_has_the_cases_in_validation(world: dict) -> None:
    val = AffWild2(world["root"]).videos("va", "val")
    assert {world["roles"][v] for v in val} >= {"none", "late"}
    with FeatureCache(world["audio"]) as audio:
        silent = next(v for v in val if world["roles"][v] == "none")
        assert len(audio.frames(silent)) == 0 and len(audio.bad_frames(silent)) > 0  # written, no rows
        # The options given as flags and as --encoder-opt are the encoder's, recorded in its config.
        config = audio.provenance["encoder_config"]
        assert (config["size"], config["layer"], config["window_ms"]) == ("tiny", 2, 300.0)
        assert audio.modality == "audio" and audio.feature_dim == 32
    assert "frames with audio rows" in world["extract_output"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_audio_availability_is_false_exactly_where_the_audio_cache_lacks_the_frame(world: dict,
                                                                                    split: str) -> None:
    data = AffWild2(world["root"])
    with FeatureCache(world["face"]) as face, FeatureCache(world["audio"]) as audio:
        seqs = load_split(data, [face, audio], ("va",), split)
        d_face, d_audio = face.feature_dim, audio.feature_dim
        assert seqs.groups == (d_face, d_audio)
        present = seqs.present()
        lacking = 0
        for v, video in enumerate(seqs.videos):
            lo, hi = int(seqs.row_offsets[v]), int(seqs.row_offsets[v + 1])
            frames = seqs.row_frames[lo:hi]
            assert np.array_equal(frames, np.union1d(face.frames(video), audio.frames(video)))
            has_audio = np.isin(frames, audio.frames(video))
            assert np.array_equal(present[lo:hi, 1], has_audio), video
            assert np.array_equal(present[lo:hi, 0], np.isin(frames, face.frames(video))), video
            # Where the audio cache has the frame, its own features; where not, the mask says so.
            cols = slice(d_face, d_face + d_audio)
            np.testing.assert_array_equal(seqs.features[lo:hi][has_audio, cols], audio.features(video, None))
            assert np.isin(frames[~has_audio], audio.bad_frames(video)).all()
            lacking += int((~has_audio).sum())
            if world["roles"][video] == "none":
                assert hi > lo and not has_audio.any()  # face rows, no audio anywhere
        assert lacking > 0
        # Standardisation of the audio columns uses only the frames with audio.
        mean, _ = seqs.feature_stats()
        rows = present[:, 1]
        np.testing.assert_allclose(mean[d_face:d_face + d_audio],
                                   seqs.features[rows, d_face:d_face + d_audio].astype(np.float64).mean(0),
                                   rtol=1e-4, atol=1e-4)


def _ccc(x: np.ndarray, y: np.ndarray) -> float:
    mx, my = x.mean(), y.mean()
    return float(2 * np.mean((x - mx) * (y - my)) / (x.var() + y.var() + (mx - my) ** 2))


def recompute_va(path: Path, data: AffWild2) -> dict[str, float]:
    """CCC of valence and arousal from a submission file and the annotation files, by hand: every validly
    labelled frame of every validation video, videos concatenated."""
    predicted: dict[str, list[tuple[float, float]]] = {}
    lines = path.read_text().splitlines()
    assert lines[0] == "image_location,valence,arousal"
    for line in lines[1:]:
        location, v, a = line.split(",")
        video, name = location.split("/")
        rows = predicted.setdefault(video, [])
        assert name == f"{len(rows) + 1:05d}.jpg"
        rows.append((float(v), float(a)))
    pred, label = [], []
    for video in data.videos("va", "val"):
        ann = data.annotation("va", "val", video)
        p = np.asarray(predicted.pop(video))
        assert len(p) == ann.n_frames
        pred.append(p[ann.valid])
        label.append(np.asarray(ann.labels)[ann.valid])
    assert not predicted  # no video the annotation lists lacks, none extra
    p, y = np.concatenate(pred).astype(np.float64), np.concatenate(label).astype(np.float64)
    return {"ccc_valence": _ccc(p[:, 0], y[:, 0]), "ccc_arousal": _ccc(p[:, 1], y[:, 1])}


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_fused_face_and_audio_train_and_evaluate_equals_the_predict_file(world: dict, tmp_path: Path,
                                                                         fusion: str) -> None:
    run = tmp_path / f"run-{fusion}"
    res = cli("train-head", "--task", "va", "--head", "gru", "--hidden", "16", "--window", "16", "--data",
              world["root"], "--cache", world["face"], "--cache", world["audio"], "--fusion", fusion, "--out",
              run, "--epochs", "3", "--no-plots", "--device", "cpu")
    assert " rows; val: " in res.output  # fused: rows of either cache, not "crops" (stderr)
    record = json.loads((run / "config.json").read_text())
    assert [c["encoder"] for c in record["caches"]] == ["fake-pixel-grid", "wav2vec2"]
    assert record["caches"][1]["fingerprint"]["encoder_config"]["window_ms"] == 300.0
    reported = json.loads(cli("evaluate", run, "--json").stdout)
    out = tmp_path / f"val-{fusion}.txt"
    res = cli("predict", run, "--split", "val", "--out", out)
    assert "in no cache, filled" in res.stdout
    again = recompute_va(out, AffWild2(world["root"]))
    for key in ("ccc_valence", "ccc_arousal"):
        assert np.isfinite(reported[key])
        assert again[key] == pytest.approx(reported[key], abs=2e-5), key


def test_an_audio_cache_alone_speaks_of_audio(world: dict, tmp_path: Path) -> None:
    run = tmp_path / "run-audio"
    res = cli("train-head", "--task", "va", "--head", "fc", "--data", world["root"], "--cache",
              world["audio"], "--out", run, "--epochs", "1", "--no-plots", "--device", "cpu")
    assert "frames with audio; val: " in res.output
    res = cli("predict", run, "--split", "val", "--out", tmp_path / "a.txt")
    assert "without audio, filled" in res.stdout and "crop" not in res.stdout
    res = cli("cache", "info", world["audio"])
    assert "wav2vec2 (audio)" in res.stdout and "frames without audio in " in res.stdout
    assert "bad frames" not in res.stdout
    face = cli("cache", "info", world["face"]).stdout
    assert "fake-pixel-grid (face)" in face and "bad frames" in face
