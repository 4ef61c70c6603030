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
    columns = ["CCC_VA", "F1_Expr", "F1_AU", "F1_AUopt"]
    assert rows[0] == ["architecture", *columns, *(f"{c}_std" for c in columns), *(f"{c}_n" for c in columns)]
    table = {r[0]: r[1:] for r in rows[1:]}
    assert list(table) == ["FAKE+Fc", "FAKE+LSTM"]
    fc_va = json.loads((out / "fake-fc" / "va" / "metrics.json").read_text())
    fc_au = json.loads((out / "fake-fc" / "au" / "metrics.json").read_text())
    assert float(table["FAKE+Fc"][0]) == pytest.approx(fc_va["ccc_va"], abs=1e-6)
    assert float(table["FAKE+Fc"][3]) == pytest.approx(fc_au["f1_au_opt"], abs=1e-6)
    assert table["FAKE+Fc"][1] == "" and table["FAKE+LSTM"][0] == ""  # cells no run fills stay empty
    # No seeds: no spread, and one run in each filled column.
    assert table["FAKE+Fc"][4:8] == ["", "", "", ""] and table["FAKE+Fc"][8:] == ["1", "0", "1", "1"]
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
    # --jobs 2 trains cells in two spawned processes: same statuses, same table, same per-cell metrics, cells
    # in recipe order. The thread count is each cell's configuration (TrainConfig.threads, default 1), never
    # derived from --jobs or the machine: the serial grid runs in a process that has two torch threads, and
    # the two tables are byte-identical, every run recording the one thread it used.
    import torch

    path = recipe(tmp_path, world)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        serial = run_ablation(path, out=str(tmp_path / "serial"))
    finally:
        torch.set_num_threads(before)
    parallel = run_ablation(path, out=str(tmp_path / "parallel"), jobs=2)
    assert [c.status for c in parallel.cells] == ["trained", "trained", "trained"]
    assert [(c.row.label, c.task) for c in parallel.cells] == [(c.row.label, c.task) for c in serial.cells]
    for a, b in zip(serial.cells, parallel.cells, strict=True):
        assert b.seconds > 0
        for key, value in a.metrics.items():
            if isinstance(value, float):
                assert b.metrics[key] == value, (a.row.label, a.task, key)
    assert parallel.table == serial.table
    assert (tmp_path / "serial" / "results.csv").read_bytes() == (tmp_path / "parallel" /
                                                                   "results.csv").read_bytes()
    for cell in [*serial.cells, *parallel.cells]:
        record = json.loads((cell.run_dir / "config.json").read_text())
        assert record["train"]["threads"] == 1
        assert record["resolved"]["threads"] == 1
        assert record["environment"]["threads"] == 1
        assert record["environment"]["torch"] == torch.__version__
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
    # The demo tables are measured over five seeds on a pinned thread (README; issue 23).
    from abawfeat.ablate import cell_options, ensemble_seeds

    beyond = load_recipe(PIPELINES / "demo-beyond.toml")
    for grid in (demo, beyond):
        for row in grid.rows:
            for t in row.tasks:
                options, seeds = cell_options(grid, row, t)
                assert seeds == (0, 1, 2, 3, 4) and options["threads"] == 1, (grid.name, row.label, t)
    assert all(ensemble_seeds(beyond, e, t) == (0, 1, 2, 3, 4) for e in beyond.ensembles for t in e.tasks)


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
    assert {h["name"] for h in listed["heads"]} == {"tasks", "contrastive", "moe"}
    assert {o["name"] for o in listed["objectives"]} == {"ccc", "ce", "bce", "contrastive", "mtl", "focal",
                                                         "logit-adjusted"}


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


# ------------------------------------------------------------------------------- threads and seeds


def small_recipe(tmp: Path, world: World, defaults: str = "", rows: str = "", ensembles: str = "",
                 epochs: int = 2) -> Path:
    """A grid of seconds: a frame-wise row and a temporal one in fp32 (bf16 LSTMs need AVX-512 BF16)."""
    path = tmp / "small.toml"
    path.write_text(f"""
[grid]
name = "small"
title = "Small grid"
data = "{world.root}"
out = "{tmp / 'grid'}"

[caches]
fake = "{world.cache}"

[defaults]
epochs = {epochs}
plots = false
batch_size = 32
precision = "fp32"
{defaults}

[[rows]]
label = "FAKE+Fc"
backbone = "fake"
head = "fc"
tasks = ["va", "au"]

[[rows]]
label = "FAKE+GRU"
backbone = "fake"
head = "gru"
tasks = ["va"]
window = 16
batch_size = 8
hidden = 16
{rows}
{ensembles}
""")
    return path


def test_a_changed_thread_count_retrains_the_cell(world: World, tmp_path: Path) -> None:
    # Threads are configuration: a grid asked for another count does not reuse runs of the old one.
    path = small_recipe(tmp_path, world)
    cells = load_recipe(path)
    first = run_ablation(path, dry_run=False)
    assert [c.status for c in first.cells] == ["trained"] * 3 and cells.rows
    path.write_text(path.read_text().replace('precision = "fp32"', 'precision = "fp32"\nthreads = 2'))
    again = run_ablation(path, dry_run=True)
    assert [c.status for c in again.cells] == ["pending"] * 3  # none skipped as complete


def test_auto_jobs_count_each_cells_threads(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    import abawfeat.ablate as ablate

    monkeypatch.setattr(ablate, "available_memory", lambda: 0)
    monkeypatch.setattr(ablate.os, "cpu_count", lambda: 4)
    one = ablate.plan_cells(load_recipe(small_recipe(tmp_path, world)), None, None)
    assert ablate.auto_jobs(one) == 3  # one thread per cell: the three cells fit on four cores
    two = ablate.plan_cells(load_recipe(small_recipe(tmp_path, world, defaults="threads = 2")), None, None)
    assert ablate.auto_jobs(two) == 2  # two threads per cell: two cells at once
    assert {c.config.threads for c in two} == {2}  # and jobs never touch what a cell computes


def _metric(run: Path, key: str) -> float:
    return float(json.loads((run / "metrics.json").read_text())[key])


def test_seeds_train_each_cell_once_per_seed_and_report_mean_and_std(world: World, tmp_path: Path) -> None:
    path = small_recipe(
        tmp_path, world, defaults="seeds = [0, 1, 2]",
        rows='[[rows]]\nlabel = "FAKE+Fc, seed 7"\nbackbone = "fake"\nhead = "fc"\ntasks = ["va"]\n'
             "seed = 7\n",
        ensembles='[[ensembles]]\nlabel = "Best 2"\ntasks = ["va"]\nbest = 2\n')
    result = run_ablation(path)
    out = tmp_path / "grid"
    assert not result.failed
    fc = [out / "fake-fc" / "va" / f"seed-{s}" for s in (0, 1, 2)]
    values = [_metric(r, "ccc_va") for r in fc]
    assert [json.loads((r / "config.json").read_text())["train"]["seed"] for r in fc] == [0, 1, 2]
    assert len(set(values)) == 3  # three seeds, three runs
    mean = sum(values) / 3
    std = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5  # sample standard deviation, by hand
    rows = {r["architecture"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert list(rows["FAKE+Fc"]) == ["architecture", "CCC_VA", "F1_Expr", "F1_AU", "F1_AUopt", "CCC_VA_std",
                                     "F1_Expr_std", "F1_AU_std", "F1_AUopt_std", "CCC_VA_n", "F1_Expr_n",
                                     "F1_AU_n", "F1_AUopt_n"]
    assert float(rows["FAKE+Fc"]["CCC_VA"]) == pytest.approx(mean, abs=1e-6)
    assert float(rows["FAKE+Fc"]["CCC_VA_std"]) == pytest.approx(std, abs=1e-6)
    assert rows["FAKE+Fc"]["CCC_VA_n"] == "3" and rows["FAKE+Fc"]["F1_Expr_n"] == "0"
    # A row that sets seed = 7 overrides the defaults' seeds: one run, in the cell's own folder, no spread.
    single = out / "fake-fc-seed-7" / "va"
    assert float(rows["FAKE+Fc, seed 7"]["CCC_VA"]) == pytest.approx(_metric(single, "ccc_va"), abs=1e-6)
    assert rows["FAKE+Fc, seed 7"]["CCC_VA_std"] == "" and rows["FAKE+Fc, seed 7"]["CCC_VA_n"] == "1"
    md = (out / "results.md").read_text()
    assert f"| FAKE+Fc | {mean:.3f} ± {std:.3f} | - |" in md and "| n |" in md
    # The ensemble is built once per seed, of the two best rows' runs of that seed (the single-seed row
    # lends its one run to each).
    ens = [out / "best-2" / "va" / f"seed-{s}" for s in (0, 1, 2)]
    assert all((e / "metrics.json").is_file() for e in ens)
    assert rows["Best 2"]["CCC_VA_n"] == "3"
    members = json.loads((ens[1] / "config.json").read_text())["extra"]["ensemble"]["runs"]
    assert all(m.endswith("seed-1") or "fake-fc-seed-7" in m for m in members) and len(members) == 2
    owned = json.loads((out / "grid-runs.json").read_text())["runs"]
    assert "fake-fc/va/seed-2" in owned and "best-2/va/seed-0" in owned and "fake-fc-seed-7/va" in owned
    again = run_ablation(path)
    assert {c.status for c in again.cells} == {"skipped"}
    assert again.table == result.table


@pytest.mark.parametrize("defaults, rows, ensembles, message", [
    ("seeds = [0, 1]\nseed = 3", "", "", r"\[defaults\]: give seed \(one run\) or seeds"),
    ('seeds = "0-4"', "", "", r"key 'seeds' must be a list of seeds"),
    ("seeds = [1, 1]", "", "", r"key 'seeds' lists a seed twice"),
    ("seeds = []", "", "", r"key 'seeds' must be a list of seeds"),
    ("seeds = [0, 1]",
     '[[rows]]\nlabel = "X"\nbackbone = "fake"\nhead = "fc"\ntasks = ["va"]\nseeds = [2, 3]\n',
     '[[ensembles]]\nlabel = "E"\ntasks = ["va"]\nbest = 2\n',
     r"ensemble 'E', task va: its candidate rows train different seeds"),
])
def test_seed_errors_name_the_file_and_the_key(world: World, tmp_path: Path, defaults: str, rows: str,
                                               ensembles: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_ablation(small_recipe(tmp_path, world, defaults, rows, ensembles), dry_run=True)


def test_seeds_beside_a_run_trained_without_them_are_refused(world: World, tmp_path: Path) -> None:
    path = small_recipe(tmp_path, world)
    run_ablation(path)
    path.write_text(path.read_text().replace('precision = "fp32"', 'precision = "fp32"\nseeds = [0, 1]'))
    with pytest.raises(ConfigError, match=r"fake-fc/va holds a run trained without seeds"):
        run_ablation(path, dry_run=True)


def test_seeds_of_a_cross_validated_row_and_dropping_seeds_again(world: World, tmp_path: Path) -> None:
    # A cross-validated row with seeds: one cross-validation per seed (its folds inside), averaged.
    path = small_recipe(tmp_path, world, defaults="seeds = [0, 1]", epochs=1)
    # Only the Fc row, for VA, cross-validated over two folds.
    text = path.read_text().replace('tasks = ["va", "au"]', 'tasks = ["va"]\nfolds = 2', 1)
    path.write_text(text.split('[[rows]]\nlabel = "FAKE+GRU"')[0])
    result = run_ablation(path)
    assert not result.failed
    out = tmp_path / "grid" / "fake-fc" / "va"
    assert all((out / f"seed-{s}" / f"fold-{f}" / "metrics.json").is_file() for s in (0, 1) for f in (0, 1))
    values = [_metric(out / f"seed-{s}", "ccc_va") for s in (0, 1)]
    assert result.table[0]["CCC_VA"] == pytest.approx(sum(values) / 2)
    assert result.table[0]["CCC_VA_n"] == 2
    path.write_text(path.read_text().replace("seeds = [0, 1]", ""))
    with pytest.raises(ConfigError, match=r"fake-fc/va holds the runs of its seeds"):
        run_ablation(path, dry_run=True)


def test_mean_std_by_hand() -> None:
    from abawfeat.ablate import format_cell, mean_std

    assert mean_std([]) == (None, None)
    assert mean_std([0.25]) == (0.25, None)
    mean, std = mean_std([0.1, 0.2, 0.6])
    assert mean == pytest.approx(0.3) and std == pytest.approx(((0.04 + 0.01 + 0.09) / 2) ** 0.5)
    assert format_cell(0.3, 0.26458) == "0.300 ± 0.265" and format_cell(None) == "-"
