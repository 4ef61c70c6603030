"""Organiser-format predictions: evaluate == an independent re-score of the predict file, on every frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from worlds import World, build_world, config

from abawfeat.data import AffWild2
from abawfeat.predict import predict
from abawfeat.submission import read_submission, score_submission
from abawfeat.tasks import single, single_task_names
from abawfeat.train import evaluate, fit

SCORE_KEYS = {"va": ("ccc_valence", "ccc_arousal", "ccc_va"), "expr": ("f1_expr",), "au": ("f1_au",)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("predict-world"), n_train=5, n_val=3, n_test=2)


@pytest.fixture(scope="module")
def runs(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("predict-runs")
    specs = {"va": ("va", "lstm"), "expr": ("expr", "fc"), "au": ("au", "lstm"), "mtl": ("mtl", "fc")}
    for key, (task, head) in specs.items():
        fit(config(world, out / key, task=task, head=head, window=16, batch_size=16, epochs=2))
    return {key: out / key for key in specs}


@pytest.mark.parametrize("task", ["va", "expr", "au"])
def test_evaluate_equals_independent_score_of_the_predict_file(
    world: World, runs: dict[str, Path], tmp_path: Path, task: str
) -> None:
    run = runs[task]
    reported = evaluate(run)
    path = tmp_path / f"{task}.txt"
    result = predict(run, "val", path)
    assert result.frames_without_crop[task] > 0  # the protocol includes frames without a crop
    data = AffWild2(world.root)
    annotations = {v: data.annotation(task, "val", v) for v in data.videos(task, "val")}
    rescored = score_submission(path, task, annotations)
    for key in SCORE_KEYS[task]:
        # AU files hold decisions at the run's tuned thresholds: the file's plain F1 is our f1_au_opt.
        ours = reported["f1_au_opt"] if task == "au" else reported[key]
        assert rescored[key] == pytest.approx(ours, abs=1e-4), key
    assert rescored["n_frames"] == sum(int(a.valid.sum()) for a in annotations.values())


def test_multitask_run_writes_one_file_per_task_that_rescore_to_its_metrics(
    world: World, runs: dict[str, Path], tmp_path: Path
) -> None:
    reported = evaluate(runs["mtl"])
    result = predict(runs["mtl"], "val", tmp_path / "mtl.txt")
    assert set(result.files) == set(single_task_names())
    data = AffWild2(world.root)
    scores = {}
    for task, path in result.files.items():
        assert path.name == f"mtl_{task}.txt"
        annotations = {v: data.annotation(task, "val", v) for v in data.videos(task, "val")}
        scores[task] = score_submission(path, task, annotations)
    assert scores["va"]["ccc_va"] + scores["expr"]["f1_expr"] + scores["au"]["f1_au"] == pytest.approx(
        reported["score"], abs=1e-4
    )


def test_test_split_lists_every_frame_of_every_test_video(world: World, runs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    data = AffWild2(world.root)
    path = tmp_path / "au_test.txt"
    predict(runs["au"], "test", path, smooth=5)
    text = path.read_text().splitlines()
    assert text[0] == single("au").submission_header
    rows = read_submission(path, "au")
    counts = data.sample_frame_counts("au")
    assert {v: len(r) for v, r in rows.items()} == counts
    assert all(set(np.unique(r)) <= {0, 1} for r in rows.values())


def test_test_video_missing_from_the_sample_file_stops_at_its_last_crop(
    world: World, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from abawfeat.cache import FeatureCache

    sample = next((world.root / "prediction_files_format").glob("*_VA_test_set_sample.txt"))
    original = sample.read_text()
    try:
        # Drop test01 from the sample file: its N must come from its last crop, with a warning.
        sample.write_text("\n".join(line for line in original.splitlines() if not line.startswith("test01/"))
                          + "\n")
        rows = read_submission(predict(runs["va"], "test", tmp_path / "va.txt").files["va"], "va")
    finally:
        sample.write_text(original)
    with FeatureCache(world.cache) as cache:
        assert len(rows["test01"]) == int(cache.frames("test01")[-1])
    assert "not in the organisers' sample file" in capsys.readouterr().err
    assert np.all(np.abs(rows["test00"]) <= 1.0)


def test_even_smoothing_window_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    from abawfeat.errors import ConfigError

    with pytest.raises(ConfigError, match="odd"):
        predict(runs["va"], "val", tmp_path / "x.txt", smooth=4)
