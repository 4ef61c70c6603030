"""Temporal smoothing: the filters, tuning per output, and smoothing as part of a run (evaluate and predict
apply it; the predict file re-scores to what evaluate reports); tuning on held-out training videos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from worlds import World, build_world, config

from abawfeat import metrics
from abawfeat.data import AffWild2
from abawfeat.errors import ConfigError
from abawfeat.predict import predict
from abawfeat.smoothing import Filter, Smoothing, moving_average, per_video, tune
from abawfeat.submission import score_submission
from abawfeat.train import evaluate, fit
from abawfeat.train.splits import holdout_videos, video_group

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_filters_are_what_they_say_and_stay_inside_each_video() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    np.testing.assert_allclose(Filter("mean", 7)(x), moving_average(x, 7))
    np.testing.assert_allclose(Filter("gaussian", 13)(x),
                               ndimage.gaussian_filter1d(x, 13 / 6, axis=0, mode="nearest", truncate=3.0))
    spike = np.zeros((9, 1))
    spike[4] = 5.0
    assert np.all(Filter("median", 3)(spike) == 0)  # a one-frame spike is gone
    assert np.array_equal(Filter("gaussian", 1)(x), x)
    # Two videos: smoothing the pair equals smoothing each alone (no mixing across the boundary).
    offsets = np.array([0, 15, 40])
    both = per_video(offsets, x, Filter("mean", 9))
    np.testing.assert_allclose(both[:15], moving_average(x[:15], 9))
    np.testing.assert_allclose(both[15:], moving_average(x[15:], 9))
    for bad in (("mean", 4), ("box", 3), ("median", 0)):
        with pytest.raises(ConfigError):
            Filter(*bad)


def test_smoothing_helps_noisy_frame_level_predictions_and_is_tuned_per_output() -> None:
    rng = np.random.default_rng(1)
    n_videos, n = 12, 400
    t = np.arange(n)
    truth, preds = [], []
    for _ in range(n_videos):
        # Valence drifts slowly; arousal too. The predictions are right on average but noisy per frame,
        # arousal much noisier than valence.
        phase = rng.uniform(0, 6, 2)
        va = np.stack([0.6 * np.sin(t / 40 + phase[0]), 0.5 * np.cos(t / 55 + phase[1])], 1)
        truth.append(va)
        preds.append(np.clip(va + rng.normal(0, 1, (n, 2)) * [0.15, 0.5], -1, 1))
    labels, scores = np.concatenate(truth), np.concatenate(preds)
    offsets = np.arange(0, n_videos * n + 1, n)
    valid = np.ones(len(labels), bool)
    s = tune(offsets, {"va": scores}, {"va": labels}, {"va": valid})
    smoothed = s.apply(offsets, {"va": scores})["va"]
    before = metrics.va_metrics(scores, labels)
    after = metrics.va_metrics(smoothed, labels)
    assert after["ccc_valence"] > before["ccc_valence"] + 0.02
    assert after["ccc_arousal"] > before["ccc_arousal"] + 0.2
    v, a = s.filters["va"]

    def spread(f: Filter) -> float:  # a filter's standard deviation in frames
        return f.window / 6 if f.name == "gaussian" else f.window / 12**0.5

    assert spread(a) > spread(v) > 0.5  # the noisier output is smoothed more: one choice per output
    # Labels that change every frame: any smoothing hurts, so none is chosen (ties go to none too).
    flip = np.tile([[0.5, -0.5], [-0.5, 0.5]], (n_videos * n // 2, 1))
    s2 = tune(offsets, {"va": flip}, {"va": flip}, {"va": valid})
    assert [f.window for f in s2.filters["va"]] == [1, 1]
    assert Smoothing.from_json(json.loads(json.dumps(s.to_json()))).filters == s.filters


def test_each_output_gets_the_filter_a_search_of_its_own_would_choose() -> None:
    # tune() filters all outputs of a task at once and scores each on its own column and labelled frames;
    # a search per AU column over the same candidates, written out here, must choose the same.
    rng = np.random.default_rng(4)
    offsets = np.array([0, 70, 160, 300])
    labels = (rng.random((300, 12)) < 0.3).astype(np.int64)
    labels = np.repeat(labels[::5], 5, axis=0)  # events of five frames
    scores = np.clip(0.3 + 0.3 * labels + rng.normal(0, rng.uniform(0.05, 0.5, 12), (300, 12)), 0, 1)
    valid = rng.random(300) > 0.2
    candidates = {"mean": (3, 9), "median": (5,), "gaussian": (9, 25)}
    s = tune(offsets, {"au": scores}, {"au": labels}, {"au": valid}, candidates=candidates)
    options = [Filter("mean", 1)] + [Filter(k, w) for k, ws in candidates.items() for w in ws]
    for j in range(12):
        values = [metrics.best_binary_f1(per_video(offsets, scores[:, [j]], f)[valid, 0], labels[valid, j])
                  for f in options]
        assert s.filters["au"][j] == options[int(np.argmax(values))]  # first of the best: ties to none
    smoothed = s.apply(offsets, {"au": scores})["au"]
    np.testing.assert_array_equal(s.au_thresholds, metrics.tune_au_thresholds(smoothed, labels, valid=valid))
    assert len({f for f in s.filters["au"]}) > 1  # the outputs did not all get the same filter


def test_the_fast_f1_search_is_within_its_grid_of_the_exact_one() -> None:
    rng = np.random.default_rng(2)
    for _ in range(5):
        y = rng.random(5000) < 0.2
        score = np.clip(0.3 * y + rng.normal(0.35, 0.2, 5000), 0, 1)
        exact_t = metrics.tune_au_thresholds(np.tile(score[:, None], 12), np.tile(y[:, None], 12))[0]
        exact = metrics.au_metrics(np.tile((score >= exact_t)[:, None], 12).astype(int),
                                   np.tile(y[:, None], 12))["f1_au"]
        fast = metrics.best_binary_f1(score, y)
        assert exact - 0.01 <= fast <= exact + 1e-12


def test_holdout_videos_are_seeded_and_keep_the_two_people_of_a_video_together() -> None:
    videos = [f"v{i}" for i in range(20)] + ["pair_left", "pair_right"]
    held = holdout_videos(videos, 0.3, seed=0)
    assert held == holdout_videos(videos, 0.3, seed=0) and held != holdout_videos(videos, 0.3, seed=1)
    assert ("pair_left" in held) == ("pair_right" in held)
    assert 5 <= len({video_group(v) for v in held}) <= 7
    with pytest.raises(ConfigError):
        holdout_videos(["only"], 0.5, 0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("smooth-world"), n_train=8, n_val=3, n_test=1, noise=1.0)


def _rescore(world: World, path: Path, task: str) -> dict:
    data = AffWild2(world.root)
    truth = {v: data.annotation(task, "val", v) for v in data.videos(task, "val")}
    return score_submission(path, task, truth)


@pytest.mark.parametrize("task, key", [("va", "ccc_va"), ("au", "f1_au")])
def test_smoothing_is_part_of_the_run(world: World, tmp_path: Path, task: str, key: str) -> None:
    result = fit(config(world, tmp_path / "run", task=task, epochs=3, smooth="auto"))
    m = result.metrics
    assert (tmp_path / "run" / "smoothing.json").is_file()
    assert m["tuned_on"] == "val" and "unsmoothed" in m and "smoothing" in m
    assert m["smoothing"][task]  # one entry per output group
    again = evaluate(tmp_path / "run")
    assert again[key] == pytest.approx(m[key], abs=1e-9)
    assert again["unsmoothed"][key] == pytest.approx(m["unsmoothed"][key], abs=1e-9)
    # The file predict writes holds the smoothed decisions; re-scored, it gives evaluate's numbers.
    predict(tmp_path / "run", "val", tmp_path / "smoothed.txt")
    ours = m["f1_au_opt"] if task == "au" else m[key]
    assert _rescore(world, tmp_path / "smoothed.txt", task)[key] == pytest.approx(ours, abs=1e-4)
    predict(tmp_path / "run", "val", tmp_path / "raw.txt", smooth="none")
    raw = m["unsmoothed"]["f1_au_opt"] if task == "au" else m["unsmoothed"][key]
    assert _rescore(world, tmp_path / "raw.txt", task)[key] == pytest.approx(raw, abs=1e-4)
    # Noisy features, labels that hold for 20 frames: smoothing tuned on val does not lose there.
    assert m[key] >= m["unsmoothed"][key] - 1e-9


def test_tuning_on_held_out_training_videos(world: World, tmp_path: Path) -> None:
    result = fit(config(world, tmp_path / "run", task="au", epochs=3, smooth="auto", tune_on="holdout",
                        holdout=0.25))
    smoothing = json.loads((tmp_path / "run" / "smoothing.json").read_text())
    held = smoothing["holdout_videos"]
    data = AffWild2(world.root)
    assert held and set(held) <= set(data.videos("au", "train"))
    assert result.metrics["tuned_on"] == "holdout"
    again = evaluate(tmp_path / "run")
    assert again["f1_au_opt"] == pytest.approx(result.metrics["f1_au_opt"], abs=1e-9)
    # The thresholds were tuned on the held-out videos, not on validation: thresholds tuned on validation
    # itself (the optimistic protocol) score these very predictions at least as high there.
    with np.load(tmp_path / "run" / "val_outputs.npz") as npz:
        prob, label, ok = npz["au_prob"], npz["au_label"], npz["au_valid"]
    optimistic = metrics.au_metrics_tuned(prob, label, metrics.tune_au_thresholds(prob, label, valid=ok),
                                          valid=ok)["f1_au_opt"]
    assert optimistic >= result.metrics["unsmoothed"]["f1_au_opt"] - 1e-12
