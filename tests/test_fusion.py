"""Fused caches: aligned by frame number with an availability mask, early and late fusion, fingerprints of
every cache checked; and on a world built to need it (each cache carries half of the signal), fusion beats
either cache alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner
from worlds import World, build_world, config

from abawfeat.cache import FeatureCache
from abawfeat.cli import app
from abawfeat.data import AffWild2
from abawfeat.data.sequences import load_split
from abawfeat.errors import CheckpointError, ConfigError
from abawfeat.heads import build_head
from abawfeat.predict import predict
from abawfeat.submission import score_submission
from abawfeat.train import evaluate, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("fusion-world"), n_train=8, n_val=3, n_test=1, halves=True,
                       noise=0.2)


def test_caches_align_by_frame_number_and_missing_frames_are_masked(world: World) -> None:
    data = AffWild2(world.root)
    a, b = world.halves
    with FeatureCache(a) as ca, FeatureCache(b) as cb:
        seqs = load_split(data, [ca, cb], ("va",), "val")
        dim = ca.feature_dim
        assert seqs.groups == (dim, dim) and seqs.feature_dim == 2 * dim + 2
        present = seqs.present()
        for v, video in enumerate(seqs.videos):
            lo, hi = seqs.row_offsets[v], seqs.row_offsets[v + 1]
            frames = seqs.row_frames[lo:hi]
            assert np.array_equal(frames, np.union1d(ca.frames(video), cb.frames(video)))
            for c, cache in enumerate((ca, cb)):
                have = np.isin(frames, cache.frames(video))
                assert np.array_equal(present[lo:hi, c], have)
                cols = slice(c * dim, (c + 1) * dim)
                np.testing.assert_array_equal(seqs.features[lo:hi][have, cols], cache.features(video, None))
        assert not present[:, 1].all() and present[:, 0].all()  # cache "b" lacks some frames
        # Statistics of a cache come from the frames it has, not from the placeholders of missing ones.
        mean, std = seqs.feature_stats()
        rows_b = present[:, 1]
        np.testing.assert_allclose(mean[dim:2 * dim], seqs.features[rows_b, dim:2 * dim].astype(np.float64)
                                   .mean(axis=0), rtol=1e-4, atol=1e-4)
        assert np.all(mean[2 * dim:] == 0) and np.all(std[2 * dim:] == 1)


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_a_missing_cache_frame_never_reaches_the_trunk_as_a_feature(fusion: str) -> None:
    torch.manual_seed(0)
    head = build_head("tasks", in_dim=3 + 2 + 2, tasks=("va",), trunk="fc", trunk_config={"hidden": 4},
                      groups=(3, 2), fusion=fusion).eval()
    x = torch.randn(1, 4, 7)
    x[..., 5] = 1.0
    x[..., 6] = torch.tensor([1.0, 0.0, 1.0, 0.0])  # cache 2 lacks frames 2 and 4
    y = x.clone()
    y[0, 1, 3:5] = 1e3  # whatever sits in a missing cache's columns...
    y[0, 3, 3:5] = -7.0
    # ...changes nothing.
    torch.testing.assert_close(head(x, None)["va"], head(y, None)["va"], rtol=0, atol=0)
    z = x.clone()
    z[0, 0, 3:5] += 1.0  # present features do matter
    assert not torch.equal(head(x, None)["va"][0, 0], head(z, None)["va"][0, 0])


@pytest.mark.parametrize("task_name, key", [("va", "ccc_va"), ("au", "f1_au_opt")])
def test_fusion_beats_either_cache_alone_when_each_carries_half_the_signal(
    world: World, tmp_path: Path, task_name: str, key: str
) -> None:
    a, b = world.halves
    score = {}
    for name, caches, fusion in (("a", (a,), "early"), ("b", (b,), "early"), ("early", (a, b), "early"),
                                 ("late", (a, b), "late")):
        cfg = config(world, tmp_path / name, task=task_name, cache=tuple(map(str, caches)), fusion=fusion,
                     epochs=6, hidden=32)
        score[name] = fit(cfg).metrics[key]
    # A clear margin, not a tie within noise; late fusion (gated trunks) learns more slowly than early here.
    assert score["early"] > max(score["a"], score["b"]) + 0.03, score
    assert score["late"] > max(score["a"], score["b"]) + 0.03, score


def test_fused_runs_record_every_cache_and_evaluate_checks_all_fingerprints(
    world: World, tmp_path: Path
) -> None:
    a, b = world.halves
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, [
        "train-head", "--task", "expr", "--head", "gru", "--hidden", "8", "--window", "16", "--data",
        str(world.root), "--cache", str(a), "--cache", str(b), "--fusion", "late", "--out", str(run),
        "--epochs", "1", "--no-plots"])
    assert res.exit_code == 0, res.output
    record = json.loads((run / "config.json").read_text())
    assert [c["encoder"] for c in record["caches"]] == ["fake-a", "fake-b"]
    assert record["label"] == "FAKE-A&FAKE-B+GRU (late fusion)"
    reported = evaluate(run)
    predict(run, "val", tmp_path / "e.txt")
    data = AffWild2(world.root)
    rescored = score_submission(tmp_path / "e.txt", "expr", {v: data.annotation("expr", "val", v)
                                                              for v in data.videos("expr", "val")})
    assert rescored["f1_expr"] == pytest.approx(reported["f1_expr"], abs=1e-4)
    with pytest.raises(CheckpointError, match="fingerprint differs"):
        evaluate(run, cache_path=[a, world.cache])  # the second cache is not the one it was trained on
    with pytest.raises(ConfigError, match="trained on 2 cache"):
        evaluate(run, cache_path=[a])
    res = runner.invoke(app, ["train-head", "--task", "va", "--data", str(world.root), "--cache", str(a),
                              "--cache", str(b), "--backbone", "ddamfn", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--backbone names one cache" in res.output
