"""Ablation grids from TOML recipes, and the stage-two CLI driven through typer's CliRunner."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner
from worlds import World, build_world

from abawfeat.ablate import load_recipe, run_ablation
from abawfeat.cli import app
from abawfeat.errors import ConfigError

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("ablate-world"), n_train=4, n_val=2, n_test=1)


def recipe(tmp: Path, world: World, epochs: int = 2, extra: str = "") -> Path:
    path = tmp / "grid.toml"
    path.write_text(f"""
[grid]
name = "tiny"
title = "Tiny grid"
data = "{world.root}"
out = "{tmp / 'grid'}"

[caches]
fake = "{world.cache}"

[defaults]
epochs = {epochs}
plots = false
batch_size = 32

[defaults.au]
pos_weight = true

[[rows]]
label = "FAKE+Fc"
backbone = "fake"
head = "fc"
tasks = ["va", "au"]
reference = "seed-ddamfn-fc"

[[rows]]
label = "FAKE+LSTM"
backbone = "fake"
head = "lstm"
tasks = ["expr"]
window = 16
batch_size = 8
{extra}
""")
    return path


def test_grid_runs_then_skips_completed_cells_and_writes_table3(world: World, tmp_path: Path) -> None:
    path = recipe(tmp_path, world)
    first = run_ablation(path)
    assert [c.status for c in first.cells] == ["trained", "trained", "trained"]
    out = tmp_path / "grid"
    assert (out / "fake-fc" / "va" / "metrics.json").is_file()
    rows = list(csv.reader((out / "results.csv").open()))
    assert rows[0] == ["architecture", "CCC_VA", "F1_Expr", "F1_AU", "F1_AUopt"]
    table = {r[0]: r[1:] for r in rows[1:]}
    assert list(table) == ["FAKE+Fc", "FAKE+LSTM"]
    fc_va = json.loads((out / "fake-fc" / "va" / "metrics.json").read_text())
    fc_au = json.loads((out / "fake-fc" / "au" / "metrics.json").read_text())
    assert float(table["FAKE+Fc"][0]) == pytest.approx(fc_va["ccc_va"], abs=1e-6)
    assert float(table["FAKE+Fc"][3]) == pytest.approx(fc_au["f1_au_opt"], abs=1e-6)
    assert table["FAKE+Fc"][1] == "" and table["FAKE+LSTM"][0] == ""  # cells no run fills stay empty
    md = (out / "results.md").read_text()
    assert "| Architecture | CCC_VA | F1_Expr | F1_AU | F1_AUopt |" in md
    assert "| FAKE+LSTM | - |" in md and "DDAMFN+Fc (seed paper)" in md  # ours, then the published row
    assert (out / "report.html").is_file()
    stamp = (out / "fake-fc" / "va" / "checkpoint.pt").stat().st_mtime_ns

    again = run_ablation(path)
    assert [c.status for c in again.cells] == ["skipped", "skipped", "skipped"]
    assert (out / "fake-fc" / "va" / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert again.table == first.table

    # A changed setting makes the affected cells stale: they are trained again, the others kept.
    path.write_text(path.read_text().replace("window = 16", "window = 12"))
    third = run_ablation(path)
    assert [c.status for c in third.cells] == ["skipped", "skipped", "trained"]


def test_parallel_jobs_give_the_same_grid(world: World, tmp_path: Path) -> None:
    # --jobs 2 trains cells in two spawned processes (one thread each here, as in the serial run under the
    # one_torch_thread fixture): same statuses, same table, same per-cell metrics, cells in recipe order.
    path = recipe(tmp_path, world)
    serial = run_ablation(path, out=str(tmp_path / "serial"))
    parallel = run_ablation(path, out=str(tmp_path / "parallel"), jobs=2)
    assert [c.status for c in parallel.cells] == ["trained", "trained", "trained"]
    assert [(c.row.label, c.task) for c in parallel.cells] == [(c.row.label, c.task) for c in serial.cells]
    for a, b in zip(serial.cells, parallel.cells, strict=True):
        assert b.seconds > 0
        for key, value in a.metrics.items():
            if isinstance(value, float):
                assert b.metrics[key] == pytest.approx(value, abs=1e-6), (a.row.label, a.task, key)
    assert parallel.table == serial.table
    assert (tmp_path / "parallel" / "results.md").is_file()
    again = run_ablation(path, out=str(tmp_path / "parallel"), jobs=2)
    assert [c.status for c in again.cells] == ["skipped", "skipped", "skipped"]
    with pytest.raises(ConfigError, match="--jobs must be at least 1"):
        run_ablation(path, jobs=-1)


def test_auto_jobs_follow_cores_memory_and_device(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --jobs 0: one job per core, capped by the cells and by memory (1.5x the cache file per job); 1 on a GPU.
    import torch

    import abawfeat.ablate as ablate
    import abawfeat.utils.device as device

    cells = ablate.plan_cells(load_recipe(recipe(tmp_path, world)), None, None)
    size = Path(world.cache).stat().st_size
    monkeypatch.setattr(ablate.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(ablate, "available_memory", lambda: 100 * size)
    assert ablate.auto_jobs(cells) == 3  # the three cells, though there are 8 cores
    assert ablate.auto_jobs(cells[:1]) == 1
    monkeypatch.setattr(ablate.os, "cpu_count", lambda: 2)
    assert ablate.auto_jobs(cells) == 2  # the two cores
    monkeypatch.setattr(ablate.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(ablate, "available_memory", lambda: int(3.2 * size))
    assert ablate.auto_jobs(cells) == 2  # 3.2x the cache holds two 1.5x budgets, not three
    monkeypatch.setattr(ablate, "available_memory", lambda: size)
    assert ablate.auto_jobs(cells) == 1  # never fewer than one
    monkeypatch.setattr(ablate, "available_memory", lambda: 100 * size)
    monkeypatch.setattr(device, "resolve_device", lambda name="auto": torch.device("cuda", 0))
    assert ablate.auto_jobs(cells) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        ('[[rows]]\nlabel = "X"\nbackbone = "fake"\nhead = "fc"\ntasks = ["va"]\nlr_rate = 1.0\n',
         r"grid.toml: \[\[rows\]\] #3 \('X'\): unknown key 'lr_rate'"),
        ('[[rows]]\nlabel = "X"\nbackbone = "fake"\nhead = "fc"\ntasks = ["va"]\nepochs = "ten"\n',
         r"grid.toml: \[\[rows\]\] #3 \('X'\): key 'epochs' must be a int"),
        ('[[rows]]\nlabel = "X"\nbackbone = "fake"\nhead = "fc"\ntasks = ["valence"]\n',
         r"grid.toml: \[\[rows\]\] #3: key 'tasks' must list distinct tasks"),
        ('[[rows]]\nlabel = "X"\nbackbone = "nocache"\nhead = "fc"\ntasks = ["va"]\n',
         r"grid.toml: cache file\(s\) not found: .*nocache.h5"),
        ('[[rows]]\nlabel = "X"\nbackbone = "fake"\nhead = "transformer-xl"\ntasks = ["va"]\n',
         r"grid.toml: row 'X', task va: --head 'transformer-xl'"),
        ("[extra]\nx = 1\n", r"grid.toml: unknown top-level key\(s\) extra"),
        ("[[rows]\n", r"grid.toml: invalid TOML"),
    ],
)
def test_recipe_errors_name_the_file_and_the_key(
    world: World, tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run_ablation(recipe(tmp_path, world, extra=extra), dry_run=True)


def test_shipped_recipes_are_valid_and_reproduce_the_papers_grid() -> None:
    paper = load_recipe(PIPELINES / "paper-table3.toml")
    cells = {(r.label, t, r.options.get("objective", "")) for r in paper.rows for t in r.tasks}
    assert cells == {
        ("DDAMFN+Fc", "va", ""), ("DDAMFN+Fc", "expr", ""), ("DDAMFN+Fc", "au", ""),
        ("DDAMFN+LSTM", "va", ""), ("DDAMFN+LSTM", "expr", ""), ("DDAMFN+LSTM", "au", ""),
        ("CLIP+Fc", "expr", "contrastive"), ("CLIP+LSTM", "expr", "contrastive"),
    }
    assert {r.label: (r.backbones, r.head) for r in paper.rows}["CLIP+LSTM"] == (("clip",), "lstm")
    demo = load_recipe(PIPELINES / "demo.toml")
    assert demo.caches["ddamfn"] and len(demo.rows) >= 2


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_train_evaluate_predict_heads(world: World, tmp_path: Path) -> None:
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["train-head", "--task", "au", "--head", "lstm", "--backbone", "fake",
                              "--data", str(world.root), "--cache", str(world.cache), "--out", str(run),
                              "--epochs", "2", "--window", "16", "--batch-size", "8", "--hidden", "16",
                              "--no-plots"])
    assert res.exit_code == 0, res.output
    assert "f1_au_opt" in res.output
    res = runner.invoke(app, ["evaluate", str(run), "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    stored = json.loads((run / "metrics.json").read_text())
    assert metrics["f1_au_opt"] == pytest.approx(stored["f1_au_opt"], abs=1e-9)
    assert metrics["au_thresholds"] == stored["au_thresholds"]
    res = runner.invoke(app, ["predict", str(run), "--split", "test", "--out", str(tmp_path / "au.txt")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "au.txt").read_text().startswith("image_location,AU1,AU2,")
    res = runner.invoke(app, ["heads", "--json"])
    listed = json.loads(res.stdout)
    assert {t["name"] for t in listed["trunks"]} >= {"fc", "lstm", "gru"}
    assert {h["name"] for h in listed["heads"]} == {"tasks", "contrastive"}
    assert {o["name"] for o in listed["objectives"]} >= {"ccc", "ce", "bce", "contrastive", "mtl"}
    assert {o["name"] for o in listed["objectives"]} == {"ccc", "ce", "bce", "contrastive", "mtl"}


def test_cli_user_errors_are_one_line_with_exit_code_2(world: World, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["train-head", "--task", "expr", "--objective", "ccc", "--data", str(world.root),
                              "--cache", str(world.cache), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "--objective ccc trains task(s) va, not expr" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "missing-run")])
    assert res.exit_code == 2 and "no such run directory" in res.output


def test_cli_ablate_prints_the_table(world: World, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["ablate", str(recipe(tmp_path, world, epochs=1)), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "would train" in res.output and "Architecture" in res.output


def test_an_ensemble_of_the_best_rows_takes_distinct_models_by_their_raw_scores() -> None:
    from abawfeat.ablate import Cell, Row, _best_models
    from abawfeat.train import TrainConfig

    def cell(label: str, raw: float, smoothed: float | None = None, **options: object) -> Cell:
        row = Row(label, ("fake",), "lstm", ("va",), None, {})
        config = TrainConfig(task="va", head="lstm", cache=("c.h5",), out=f"runs/{label}", **options)
        metrics = {"ccc_va": raw} if smoothed is None else {"ccc_va": smoothed, "unsmoothed": {"ccc_va": raw}}
        return Cell(row=row, task="va", config=config, metrics=metrics)

    plain = cell("plain", 0.50)
    smoothed = cell("smoothed", 0.50, smoothed=0.70, smooth="auto")  # the same model as plain, smoothed
    other = cell("other", 0.45, seed=1)
    # Tuned on held-out training videos: trained on fewer videos, so a model of its own.
    holdout = cell("holdout", 0.40, smoothed=0.90, smooth="auto", tune_on="holdout")
    chosen = _best_models([smoothed, holdout, other, plain], "ccc_va", 3)
    assert [c.row.label for c in chosen] in (["smoothed", "other", "holdout"], ["plain", "other", "holdout"])
    assert len({c.config.seed for c in chosen[:2]}) == 2
