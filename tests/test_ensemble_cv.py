"""Ensembles of runs and cross-validation over train+val: both are runs that evaluate, predict and report
treat like any other, and the metrics they print are what an independent re-score of predict's file gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner
from worlds import World, build_world, config

from abawfeat.cli import app
from abawfeat.data import AffWild2
from abawfeat.data.sequences import split_videos
from abawfeat.ensemble import EnsembleConfig, build_ensemble
from abawfeat.errors import ConfigError
from abawfeat.predict import predict
from abawfeat.submission import read_submission, score_submission
from abawfeat.train import evaluate, fit
from abawfeat.train.splits import cv_folds, video_group

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("ens-world"), n_train=6, n_val=3, n_test=2, noise=0.6)


@pytest.fixture(scope="module")
def runs(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ens-runs")
    specs = {"au-fc": dict(task="au", head="fc"), "au-gru": dict(task="au", head="gru", hidden=16, window=16),
             "va-fc": dict(task="va", head="fc")}
    for name, kw in specs.items():
        fit(config(world, out / name, epochs=2, **kw))
    return {name: out / name for name in specs}


def _rescore(world: World, path: Path, task: str) -> dict:
    data = AffWild2(world.root)
    truth = {v: data.annotation(task, "val", v) for v in data.videos(task, "val")}
    return score_submission(path, task, truth)


def test_an_ensemble_of_identical_runs_equals_the_run(
    world: World, runs: dict[str, Path], tmp_path: Path
) -> None:
    run = runs["au-fc"]
    for weights in ("equal", "tuned"):
        ens = build_ensemble(EnsembleConfig(runs=(str(run), str(run), str(run)), out=str(tmp_path / weights),
                                            weights=weights))
        alone = evaluate(run)
        for key in ("f1_au", "f1_au_opt"):
            assert ens.metrics[key] == pytest.approx(alone[key], abs=1e-9), (weights, key)
        assert ens.metrics["au_thresholds"] == pytest.approx(alone["au_thresholds"], abs=1e-9)
        predict(run, "test", tmp_path / f"alone-{weights}.txt")
        predict(tmp_path / weights, "test", tmp_path / f"ens-{weights}.txt")
        a = read_submission(tmp_path / f"alone-{weights}.txt", "au")
        b = read_submission(tmp_path / f"ens-{weights}.txt", "au")
        assert a.keys() == b.keys() and all(np.array_equal(a[v], b[v]) for v in a)


def test_an_ensemble_is_a_run(world: World, runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ens"
    res = CliRunner().invoke(app, ["ensemble", str(runs["au-fc"]), str(runs["au-gru"]), "--out", str(out),
                                   "--weights", "tuned", "--smooth", "auto"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "config.json").read_text())
    assert record["kind"] == "ensemble" and record["label"].startswith("Ensemble of 2")
    weights = [m["weights"]["au"] for m in record["extra"]["members"]]
    assert sum(weights) == pytest.approx(1.0) and all(w >= 0 for w in weights)
    reported = json.loads((out / "metrics.json").read_text())
    assert "unsmoothed" in reported and reported["tuned_on"] == "val"
    again = evaluate(out)
    assert again["f1_au_opt"] == pytest.approx(reported["f1_au_opt"], abs=1e-9)
    predict(out, "val", tmp_path / "e.txt")
    rescored = _rescore(world, tmp_path / "e.txt", "au")
    assert rescored["f1_au"] == pytest.approx(reported["f1_au_opt"], abs=1e-4)
    res = CliRunner().invoke(app, ["report", str(out), str(runs["au-fc"]), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert "Ensemble of 2" in (tmp_path / "r.html").read_text()
    # Runs that do not agree on the task: one line, nothing written.
    res = CliRunner().invoke(app, ["ensemble", str(runs["au-fc"]), str(runs["va-fc"]), "--out",
                                   str(tmp_path / "bad")])
    assert res.exit_code == 2 and "Traceback" not in res.output and "one task" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_folds_are_disjoint_by_video_cover_every_video_once_and_keep_pairs_together() -> None:
    videos = [f"v{i:02d}" for i in range(23)] + ["p1_left", "p1_right", "p2_left", "p2_right"]
    folds = cv_folds(videos, 5, seed=0)
    assert len(folds) == 5
    seen = [v for _, val in folds for v in val]
    assert sorted(seen) == sorted(videos)  # every video validates exactly once
    for train, val in folds:
        assert not set(train) & set(val) and sorted(train + val) == sorted(videos)
        groups = {video_group(v) for v in val}
        assert not groups & {video_group(v) for v in train}  # the two halves never straddle a split
    assert folds == cv_folds(videos, 5, seed=0) and folds != cv_folds(videos, 5, seed=1)
    with pytest.raises(ConfigError):
        cv_folds(videos[:3], 5, 0)


def test_cross_validation_is_a_run_of_runs(world: World, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    args = ["cv", "--folds", "3", "--task", "va", "--data", str(world.root), "--cache", str(world.cache),
            "--out", str(out), "--epochs", "1", "--batch-size", "64", "--no-plots"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    folds = [json.loads((out / f"fold-{i}" / "metrics.json").read_text()) for i in range(3)]
    assert summary["ccc_va"] == pytest.approx(np.mean([f["ccc_va"] for f in folds]), abs=1e-12)
    spread = np.std([f["ccc_va"] for f in folds], ddof=1)
    assert summary["spread"]["ccc_va"] == pytest.approx(spread, abs=1e-12)
    # Each fold validates on its own videos, drawn from train+val; together they cover them once.
    data = AffWild2(world.root)
    val_videos = []
    for i in range(3):
        npz = np.load(out / f"fold-{i}" / "val_outputs.npz")
        val_videos += sorted(set(npz["video"].tolist()))
    assert sorted(val_videos) == split_videos(data, ("va",), "trainval")
    assert evaluate(out)["ccc_va"] == pytest.approx(summary["ccc_va"], abs=1e-9)
    result = predict(out, "test", tmp_path / "test.txt")
    assert result.videos["va"] == 2
    res = CliRunner().invoke(app, ["predict", str(out), "--split", "val", "--out", str(tmp_path / "v.txt")])
    assert res.exit_code == 2 and "test split only" in res.output
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res = CliRunner().invoke(app, args)  # complete with the same settings: nothing to do, nothing rewritten
    assert res.exit_code == 0, res.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_the_beyond_recipe_is_valid_and_has_each_addition_beside_the_papers_rows() -> None:
    from abawfeat.ablate import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "pipelines" / "beyond.toml")
    heads = {r.head for r in recipe.rows}
    assert {"fc", "lstm", "gru", "transformer", "tcn"} <= heads
    assert any(len(r.backbones) == 2 for r in recipe.rows)  # DDAMFN+CLIP fused
    assert any(r.options.get("smooth") == "auto" for r in recipe.rows)
    assert any(r.options.get("folds") == 5 for r in recipe.rows)
    assert recipe.ensembles and recipe.ensembles[0].best >= 2
    assert {r.reference for r in recipe.rows if r.reference} == {"seed-ddamfn-fc", "seed-ddamfn-lstm",
                                                                 "seed-clip-fc", "seed-clip-lstm"}


@pytest.mark.parametrize("name", ["beyond.toml", "demo-beyond.toml"])
def test_the_beyond_recipes_have_a_row_for_each_10th_abaw_addition(name: str) -> None:
    from abawfeat.ablate import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "pipelines" / name)
    rows = recipe.rows
    assert any(r.head == "mamba" for r in rows)
    assert any(r.options.get("fusion") == "attention" and len(r.backbones) == 2 for r in rows)
    assert any(r.options.get("modality_dropout") and len(r.backbones) == 2 for r in rows)
    assert any(r.options.get("moe_experts") for r in rows)
    assert any(r.options.get("objective") == "focal" and set(r.tasks) == {"expr", "au"} for r in rows)
    assert any(r.options.get("objective") == "logit-adjusted" and r.tasks == ("expr",) for r in rows)
    # Nothing tuned per addition: the new rows set only what names the addition.
    own = {"fusion", "modality_dropout", "moe_experts", "objective"}
    for r in rows:
        if r.head == "mamba" or own & set(r.options):
            assert set(r.options) <= own, (r.label, r.options)


def test_a_grid_with_fusion_smoothing_cross_validation_and_an_ensemble(tmp_path: Path) -> None:
    from abawfeat.ablate import run_ablation

    world = build_world(tmp_path / "w", n_train=6, n_val=2, n_test=1, halves=True, n_frames=100)
    a, b = world.halves
    recipe = tmp_path / "grid.toml"
    recipe.write_text(f"""
[grid]
data = "{world.root}"
out = "{tmp_path / 'grid'}"
[caches]
fake-a = "{a}"
fake-b = "{b}"
[defaults]
epochs = 1
plots = false
batch_size = 32
window = 16
[[rows]]
label = "A+Fc"
backbone = "fake-a"
head = "fc"
tasks = ["va"]
[[rows]]
label = "A&B+TCN, smoothed"
backbone = ["fake-a", "fake-b"]
head = "tcn"
tasks = ["va"]
smooth = "auto"
tune_on = "holdout"
layers = 2
[[rows]]
label = "A+GRU, CV"
backbone = "fake-a"
head = "gru"
tasks = ["va"]
folds = 2
[[ensembles]]
label = "Best two"
tasks = ["va"]
best = 2
weights = "tuned"
""")
    result = run_ablation(recipe, jobs=1)
    assert not result.failed, [(c.row.label, c.error) for c in result.failed]
    table = {r["architecture"]: r["CCC_VA"] for r in result.table}
    assert set(table) == {"A+Fc", "A&B+TCN, smoothed", "A+GRU, CV", "Best two"}
    assert all(v is not None for v in table.values())
    grid = tmp_path / "grid"
    cv = json.loads((grid / "a-gru-cv" / "va" / "config.json").read_text())
    assert cv["kind"] == "cv" and len(cv["extra"]["members"]) == 2
    ens = json.loads((grid / "best-two" / "va" / "config.json").read_text())
    assert ens["kind"] == "ensemble" and len(ens["extra"]["members"]) == 2
    members = {Path(m["path"]) for m in ens["extra"]["members"]}
    assert members == {(grid / "a-fc" / "va").resolve(), (grid / "a-b-tcn-smoothed" / "va").resolve()}
    smoothed = json.loads((grid / "a-b-tcn-smoothed" / "va" / "metrics.json").read_text())
    assert smoothed["tuned_on"] == "holdout" and "unsmoothed" in smoothed
    report = (grid / "report.html").read_text()
    assert "Ensemble of 2" in report and "(2-fold CV)" in report and "FAKE-A&amp;FAKE-B+TCN" in report
    assert "A+GRU, CV" in (grid / "results.md").read_text()
    # Run again: every cell is complete, nothing is retrained or rebuilt.
    again = run_ablation(recipe, jobs=1)
    assert {c.status for c in again.cells} == {"skipped"}


def test_tuned_weights_favour_the_member_that_helps() -> None:
    # Two members on one video: a good one and one that is pure noise. Ensemble selection starts from the
    # better member and adds the noise only where it helps the selection metric (CCC also rewards matching
    # the labels' spread, so a step or two may).
    from types import SimpleNamespace

    from abawfeat.data.sequences import SequenceSet
    from abawfeat.ensemble import select_weights

    rng = np.random.default_rng(3)
    n = 600
    va = np.stack([np.sin(np.arange(n) / 30), np.cos(np.arange(n) / 45)], 1) * 0.6
    data = SequenceSet(split="val", tasks=("va",), videos=["v"], features=np.zeros((0, 1), np.float16),
                       row_offsets=np.zeros(2, np.int64), row_frames=np.zeros(0, np.int32),
                       tl_offsets=np.array([0, n]), row_to_tl=np.zeros(0, np.int64),
                       labels={"va": va}, valid={"va": np.ones(n, bool)})
    good = SimpleNamespace(timeline={"va": va + rng.normal(0, 0.2, va.shape)})
    noise = SimpleNamespace(timeline={"va": rng.normal(0, 0.5, va.shape)})
    weights = select_weights([noise, good], data, "va")
    assert weights[1] >= 0.9 and weights.sum() == pytest.approx(1.0)
    # Two good members with independent errors: averaging them beats either, so both get weight.
    other = SimpleNamespace(timeline={"va": va + rng.normal(0, 0.2, va.shape)})
    weights = select_weights([good, other], data, "va")
    assert 0.3 < weights[0] < 0.7 and weights.sum() == pytest.approx(1.0)
