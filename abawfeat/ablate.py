"""Grids of ``train-head`` runs from a TOML recipe, summarised in the seed paper's Table 3 layout.

A recipe is data, never code (parsed with ``tomllib``, every key checked, errors name the file and the key).
Its shape (see ``pipelines/paper-table3.toml``)::

    [grid]                     name, title, data (Aff-Wild2 root), out (where runs and tables go)
    [caches]                   optional: backbone = "path/to/cache.h5" (default: where extract writes it)
    [defaults]                 any train-head option (TrainConfig field) for every run ...
    [defaults.au]              ... or only for runs of one task (va, expr, au, mtl)
    [[rows]]                   one Table 3 row: label, backbone (or a list of them: their caches fused), head,
                               tasks, optional folds (cross-validate it over train+val), optional reference
                               (a published result id) and any train-head option for this row's runs
    [[ensembles]]              a row made of other rows' runs: label, tasks, members (row labels) or best = N
                               (the N best rows of each task by its selection metric), weights (equal |
                               tuned), smooth (none | auto)

Each (row, task) is one run in ``<out>/<row slug>/<task>`` (a cross-validated row: a cross-validation run
there, its folds inside); ensembles are built once the rows are trained. ``seeds = [0, 1, 2]`` (in
[defaults], [defaults.<task>] or a row) makes it one run per seed in ``<out>/<row slug>/<task>/seed-<s>``,
and one ensemble per seed of its members' runs of that seed; the tables then show each column's mean over
the seeds with its sample standard deviation and count. A cell's torch thread count is part of its
configuration (``threads``, default 1): ``--jobs`` decides only how many cells run at once.

A run whose directory is complete and holds the same configuration (``train.fit.run_is_complete``) is
skipped; an interrupted one with the same configuration is resumed (``--resume``); one with another
configuration is trained again and replaces the old run once complete (``--overwrite``). So an interrupted
grid resumes where it stopped.
``results.md`` / ``results.csv`` get one row per recipe row and the columns CCC_VA, F1_Expr, F1_AU, F1_AUopt
(validation, best epoch; results.csv also ``<column>_std`` and ``<column>_n``); ``report.html`` comes from
``abawfeat.report.build_report``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abawfeat.backends import Backend, BackendOptions, get_backend
from abawfeat.errors import AbawfeatError, ConfigError
from abawfeat.tasks import run_task_names, single_tasks
from abawfeat.train.config import TrainConfig, default_cache, trunk_context, validate_config
from abawfeat.train.fit import RUN_ONLY_SETTINGS, run_is_complete
from abawfeat.train.objectives import OBJECTIVES
from abawfeat.train.rundir import run_state, writer_lock
from abawfeat.utils.configs import read_json, to_dict
from abawfeat.utils.io import atomic_write, atomic_write_text, file_in_the_way, what_is, write_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Table 3 columns: header -> (task whose run fills it, metrics.json key), as the tasks declare them.
COLUMNS: dict[str, tuple[str, str]] = {
    header: (t.name, key) for t in single_tasks() for header, key in t.table_columns.items()
}
GRID_KEYS = {"name": str, "title": str, "data": str, "out": str}
ROW_KEYS = {"label": str, "backbone": (str, list), "head": str, "tasks": list, "reference": str}
# Options a recipe may not set per run: the grid decides them (task, data, out) or they are row keys.
_MANAGED = {"task", "head", "backbone", "data", "out", "cache", "fold"}
TRAIN_KEYS = {f.name: type(f.default if f.default is not dataclasses.MISSING else f.default_factory())
              for f in dataclasses.fields(TrainConfig) if f.name not in _MANAGED}


@dataclass
class Row:
    label: str
    backbones: tuple[str, ...]  # one, or several whose caches are fused
    head: str
    tasks: tuple[str, ...]
    reference: str | None
    options: dict[str, Any]  # train-head options, and ``seeds`` (a tuple) when the row sets them


@dataclass
class EnsembleRow:
    label: str
    tasks: tuple[str, ...]
    members: tuple[str, ...]  # row labels; () with best = N
    best: int  # 0 with members
    weights: str
    smooth: str
    reference: str | None = None


ENSEMBLE_KEYS = {"label": str, "tasks": list, "members": list, "best": int, "weights": str, "smooth": str,
                 "reference": str}


@dataclass
class Recipe:
    path: Path
    name: str
    title: str
    data: str
    out: str
    caches: dict[str, str]
    defaults: dict[str, Any]
    task_defaults: dict[str, dict[str, Any]]
    rows: list[Row]
    ensembles: list[EnsembleRow] = field(default_factory=list)


@dataclass
class Cell:
    row: Row | EnsembleRow
    task: str
    config: TrainConfig | None  # None for an ensemble cell (``ensemble`` says what it averages)
    status: str = "pending"  # pending | skipped (already complete) | trained | failed
    mode: str = "new"  # how it trains: new | resume (interrupted, same settings) | overwrite (other settings)
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    out: str = ""  # the run directory
    ensemble: Any = None  # EnsembleConfig of an ensemble cell
    log: str = ""  # the worker's log, where the backend keeps one (a Slurm job's output)
    seed: int | None = None  # one of the row's seeds; None for a row without seeds (one run of ``seed``)

    @property
    def run_dir(self) -> Path:
        return Path(self.out or (self.config.out if self.config else ""))


@dataclass
class AblationResult:
    recipe: Recipe
    cells: list[Cell]
    table: list[dict[str, Any]]  # rows of results.csv: architecture + the four columns (None = no value)
    files: dict[str, Path]
    script: str = ""  # --dry-run with the submitit backend: the sbatch script it would submit

    @property
    def failed(self) -> list[Cell]:
        return [c for c in self.cells if c.status == "failed"]


# ------------------------------------------------------------------------------------------------ parsing


def _check_value(where: str, key: str, value: Any, want: type | tuple[type, ...]) -> Any:
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: key {key!r} must be true or false, got {value!r}")
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        name = " or ".join(t.__name__ for t in want) if isinstance(want, tuple) else want.__name__
        raise ConfigError(f"{where}: key {key!r} must be a {name}, got {value!r}")
    return value


def _options(where: str, table: Mapping[str, Any], extra: Mapping[str, type] = {}) -> dict[str, Any]:
    """Train-head options of a table, type-checked against TrainConfig's defaults, and ``seeds``."""
    out: dict[str, Any] = {}
    if "seed" in table and "seeds" in table:
        raise ConfigError(f"{where}: give seed (one run) or seeds (one run per seed), not both")
    for key, value in table.items():
        if key in extra:
            continue
        if key == "seeds":
            out[key] = _seed_list(where, value)
            continue
        if key not in TRAIN_KEYS:
            hint = " (set by the grid)" if key in _MANAGED else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; train-head options are "
                              f"{', '.join(sorted(TRAIN_KEYS))}")
        out[key] = _check_value(where, key, value, TRAIN_KEYS[key])
    return out


def _seed_list(where: str, value: Any) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ConfigError(f"{where}: key 'seeds' must be a list of seeds (integers >= 0), got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: key 'seeds' lists a seed twice: {value!r}")
    return tuple(value)


def cell_options(recipe: Recipe, row: Row, task: str) -> tuple[dict[str, Any], tuple[int, ...] | None]:
    """A (row, task)'s train-head options, the row's over [defaults.<task>] over [defaults], and its seeds:
    None for one run (of ``seed``), else one run per seed. ``seed`` and ``seeds`` replace each other: the
    most specific table that sets either decides."""
    merged: dict[str, Any] = {}
    for table in (recipe.defaults, recipe.task_defaults.get(task, {}), row.options):
        if "seed" in table:
            merged.pop("seeds", None)
        if "seeds" in table:
            merged.pop("seed", None)
        merged.update(table)
    seeds = merged.pop("seeds", None)
    return merged, seeds


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe; every problem is a ConfigError naming the file and the key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a recipe file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (TOML recipes are UTF-8)") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"grid", "caches", "defaults", "rows", "ensembles"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; expected grid, caches, "
                          "defaults, rows, ensembles")
    grid = raw.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: [grid] must be a table")
    for key, value in grid.items():
        if key not in GRID_KEYS:
            raise ConfigError(f"{path}: [grid] unknown key {key!r}; expected {', '.join(GRID_KEYS)}")
        _check_value(f"{path}: [grid]", key, value, GRID_KEYS[key])
    caches = raw.get("caches", {})
    if not isinstance(caches, dict) or not all(isinstance(v, str) for v in caches.values()):
        raise ConfigError(f"{path}: [caches] must map backbone names to cache file paths (strings)")

    defaults_raw = raw.get("defaults", {})
    if not isinstance(defaults_raw, dict):
        raise ConfigError(f"{path}: [defaults] must be a table")
    # Sub-tables of [defaults] are per-task defaults; a table-valued option (trunk_opts) is not one.
    task_tables = {k: v for k, v in defaults_raw.items()
                   if isinstance(v, dict) and TRAIN_KEYS.get(k) is not dict}
    for task in task_tables:
        if task not in run_task_names():
            raise ConfigError(f"{path}: [defaults.{task}]: not a task; per-task defaults are "
                              f"[defaults.{'], [defaults.'.join(run_task_names())}]")
    plain = {k: v for k, v in defaults_raw.items() if k not in task_tables}
    defaults = _options(f"{path}: [defaults]", plain)
    task_defaults = {t: _options(f"{path}: [defaults.{t}]", v) for t, v in task_tables.items()}

    rows_raw = raw.get("rows", [])
    if not isinstance(rows_raw, list) or not rows_raw:
        raise ConfigError(f"{path}: needs at least one [[rows]] table")
    rows: list[Row] = []
    for i, entry in enumerate(rows_raw, start=1):
        where = f"{path}: [[rows]] #{i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        for key in ("label", "backbone", "head", "tasks"):
            if key not in entry:
                raise ConfigError(f"{where}: missing key {key!r}")
        for key, want in ROW_KEYS.items():
            if key in entry:
                _check_value(where, key, entry[key], want)
        tasks = tuple(entry["tasks"])
        bad = [t for t in tasks if t not in run_task_names()]
        if bad or not tasks or len(set(tasks)) != len(tasks):
            raise ConfigError(f"{where}: key 'tasks' must list distinct tasks among "
                              f"{', '.join(run_task_names())}, got {list(tasks)}")
        label = str(entry["label"])
        if any(r.label == label for r in rows):
            raise ConfigError(f"{where}: label {label!r} is used twice")
        backbones = entry["backbone"] if isinstance(entry["backbone"], list) else [entry["backbone"]]
        if not backbones or not all(isinstance(b, str) and b for b in backbones):
            raise ConfigError(f"{where}: key 'backbone' must be a backbone name or a list of them")
        rows.append(Row(label=label, backbones=tuple(backbones), head=str(entry["head"]), tasks=tasks,
                        reference=entry.get("reference"),
                        options=_options(f"{where} ({label!r})", entry, ROW_KEYS)))
    ensembles = _ensembles(path, raw.get("ensembles", []), rows, defaults, task_defaults)
    _check_folders(path, rows, ensembles)
    return Recipe(
        path=path, name=str(grid.get("name", path.stem)), title=str(grid.get("title", path.stem)),
        data=str(grid.get("data", "")), out=str(grid.get("out", "")), caches=dict(caches),
        defaults=defaults, task_defaults=task_defaults, rows=rows, ensembles=ensembles,
    )


def _check_folders(path: Path, rows: list[Row], ensembles: list[EnsembleRow]) -> None:
    """Every row (and [[ensembles]] entry) gets a folder of its own (``slug`` of its label): two labels
    that reduce to the same folder would train the first cell and then fail, or overwrite, on the second.
    Refused when the recipe is read, before anything trains."""
    seen: dict[str, str] = {}
    entries = [(f"[[rows]] #{i}", r.label) for i, r in enumerate(rows, start=1)] + [
        (f"[[ensembles]] #{i}", e.label) for i, e in enumerate(ensembles, start=1)]
    for where, label in entries:
        folder = slug(label)
        if folder in seen:
            raise ConfigError(f"{path}: {where}: label {label!r} goes in the same folder {folder!r} as "
                              f"{seen[folder]}; give labels that differ in letters or digits")
        seen[folder] = f"{where.split(' #')[0]} label {label!r}"


def _ensembles(path: Path, raw: Any, rows: list[Row], defaults: Mapping[str, Any] = {},
               task_defaults: Mapping[str, Mapping[str, Any]] = {}) -> list[EnsembleRow]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: [[ensembles]] must be a list of tables")
    out: list[EnsembleRow] = []
    labels = {r.label for r in rows}
    for i, entry in enumerate(raw, start=1):
        where = f"{path}: [[ensembles]] #{i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        unknown = sorted(set(entry) - set(ENSEMBLE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; expected {', '.join(ENSEMBLE_KEYS)}")
        for key in ("label", "tasks"):
            if key not in entry:
                raise ConfigError(f"{where}: missing key {key!r}")
        for key, want in ENSEMBLE_KEYS.items():
            if key in entry:
                _check_value(where, key, entry[key], want)
        members, best = tuple(entry.get("members", ())), int(entry.get("best", 0))
        if bool(members) == bool(best):
            raise ConfigError(f"{where}: give either members (row labels) or best = N")
        bad = [m for m in members if m not in labels]
        if bad:
            raise ConfigError(f"{where}: unknown row {bad[0]!r} in members")
        if best < 0:
            raise ConfigError(f"{where}: best must be >= 1")
        label = str(entry["label"])
        if label in labels or any(e.label == label for e in out):
            raise ConfigError(f"{where}: label {label!r} is used twice")
        tasks = tuple(entry["tasks"])
        if not tasks or any(t not in run_task_names() for t in tasks):
            raise ConfigError(f"{where}: key 'tasks' must list tasks among {', '.join(run_task_names())}")
        for member in members:
            row = next(r for r in rows if r.label == member)
            if any({**defaults, **task_defaults.get(t, {}), **row.options}.get("folds") for t in tasks):
                raise ConfigError(f"{where}: member {member!r} is a cross-validated row (folds): it has no "
                                  "validation scores of its own to average; name rows without folds")
        weights, smooth = str(entry.get("weights", "equal")), str(entry.get("smooth", "none"))
        if weights not in ("equal", "tuned") or smooth not in ("none", "auto"):
            raise ConfigError(f"{where}: weights is equal or tuned, smooth none or auto")
        out.append(EnsembleRow(label=label, tasks=tasks, members=members, best=best, weights=weights,
                               smooth=smooth, reference=entry.get("reference")))
    return out


def seed_dir(cell_dir: Path, seed: int | None) -> Path:
    """Where a cell's run of ``seed`` goes: the cell's folder itself for a row without seeds."""
    return cell_dir if seed is None else cell_dir / f"seed-{seed}"


def ensemble_seeds(recipe: Recipe, ens: EnsembleRow, task: str) -> tuple[int, ...] | None:
    """The seeds an ensemble is built for: the seeds its candidate rows (its members, or for best = N every
    row of the task without folds) train; one ensemble per seed, of the members' runs of that seed (a row
    without seeds lends its one run to each). None when no candidate has seeds. Candidates with different
    seeds are refused: an ensemble per seed needs every seeded member to have that seed."""
    def candidate(r: Row) -> bool:
        return r.label in ens.members if ens.members else not cell_options(recipe, r, task)[0].get("folds")

    rows = [r for r in recipe.rows if task in r.tasks and candidate(r)]
    found = {s for r in rows if (s := cell_options(recipe, r, task)[1]) is not None}
    if len(found) > 1:
        listed = "; ".join(str(list(s)) for s in sorted(found))
        raise ConfigError(f"{recipe.path}: ensemble {ens.label!r}, task {task}: its candidate rows train "
                          f"different seeds ({listed}); give them the same seeds")
    return next(iter(found)) if found else None


def slug(label: str) -> str:
    """A folder name for a row label: ``DDAMFN+LSTM`` -> ``ddamfn-lstm``."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "row"


def plan_cells(recipe: Recipe, data: str | None = None, out: str | None = None) -> list[Cell]:
    """One TrainConfig per (row, task), validated before anything runs."""
    data = data or recipe.data
    out = out or recipe.out
    if not data:
        raise ConfigError(f"{recipe.path}: no data root: set [grid] data or pass --data")
    if not out:
        raise ConfigError(f"{recipe.path}: no output folder: set [grid] out or pass --out")
    cells = []
    for row in recipe.rows:
        caches = tuple(recipe.caches.get(b) or str(default_cache(data, b)) for b in row.backbones)
        backbone = row.backbones[0] if len(row.backbones) == 1 else ""
        for task in row.tasks:
            options, seeds = cell_options(recipe, row, task)
            where = Path(out) / slug(row.label) / task
            if seeds is not None and run_state(where) in ("complete", "incomplete"):
                raise ConfigError(f"{recipe.path}: row {row.label!r}, task {task}: {where} holds a run "
                                  "trained without seeds; the seeds' runs would go inside it: move it, or "
                                  "choose another out")
            if seeds is None and where.is_dir() and any(where.glob("seed-*/config.json")):
                raise ConfigError(f"{recipe.path}: row {row.label!r}, task {task}: {where} holds the runs of "
                                  "its seeds (seed-<s>); without seeds its one run would land on them: set "
                                  "seeds again, or choose another out")
            for seed in seeds or (None,):
                extra = {} if seed is None else {"seed": seed}
                cfg = TrainConfig(task=task, head=row.head, backbone=backbone, data=str(data), cache=caches,
                                  out=str(seed_dir(where, seed)), **options, **extra)
                try:
                    validate_config(cfg)
                except ConfigError as exc:
                    raise ConfigError(f"{recipe.path}: row {row.label!r}, task {task}: {exc}") from None
                cells.append(Cell(row=row, task=task, config=cfg, seed=seed))
    for ens in recipe.ensembles:
        for task in ens.tasks:
            ensemble_seeds(recipe, ens, task)  # refuses members of different seeds before anything runs
    missing = sorted({p for c in cells for p in c.config.cache if not Path(p).is_file()})
    if missing:
        raise ConfigError(f"{recipe.path}: cache file(s) not found: {', '.join(missing)}; run `abawfeat "
                          "extract` for those backbones or set [caches]")
    return cells


# ------------------------------------------------------------------------------------------------ running


def run_ablation(
    recipe_path: str | Path, data: str | None = None, out: str | None = None,
    log: Callable[[str], None] | None = None, dry_run: bool = False, jobs: int = 1,
    backend: str = "local", options: BackendOptions | None = None,
) -> AblationResult:
    """Run (or skip) every cell, then write results.md, results.csv and report.html into the grid's out.

    ``jobs`` > 1 trains that many cells at once, each in its own process on its configured torch threads
    (``threads``: the recipe's, else TrainConfig's default of 1); 0 picks the number (``auto_jobs``). Why:
    a head's small matrix products scale poorly over threads (docs/performance.md, benchmarks/heads.py's
    two-thread rows), while independent runs scale almost linearly, so on a 2-core
    machine two one-thread jobs finish a grid sooner. A cell's numbers never depend on ``jobs``, the load
    or the memory free at launch: its thread count is part of its configuration.

    ``backend`` (local | submitit | ray, ``abawfeat.backends``) decides where the cells train, ``options``
    how; every backend trains the same units into the same run directories, so the tables and grid-runs.json
    do not depend on it. With ``jobs`` and another backend than local, ``jobs`` sizes a local Ray cluster."""
    if jobs < 0:
        raise ConfigError(f"--jobs must be at least 1 (or 0 = auto), not {jobs}")
    options = options or BackendOptions()
    # An unknown backend or bad options: one line before anything runs (--jobs 0 is resolved below).
    get_backend(backend, dataclasses.replace(options, jobs=max(1, jobs), dry_run=dry_run))
    say = log or (lambda _msg: None)
    recipe = load_recipe(recipe_path)
    cells = plan_cells(recipe, data, out)
    out_dir = Path(out or recipe.out)
    _check_grid_out(out_dir, recipe, out, cells)
    if dry_run:
        return _run_grid(recipe, cells, out_dir, say, dry_run, jobs, backend, options)
    with writer_lock(out_dir, "grid"):
        return _run_grid(recipe, cells, out_dir, say, dry_run, jobs, backend, options)


def _check_grid_out(out_dir: Path, recipe: Recipe, out: str | None, cells: list[Cell]) -> None:
    """The grid's folder must be a folder of its own: not a file or under one, not a run directory (a run's
    record and the grid's tables would mix), not inside a run or the data tree."""
    from abawfeat.train.rundir import CONFIG_FILE

    where = f"--out {out_dir}" if out else f"{recipe.path}: [grid] out {str(out_dir)!r}"
    blocker = file_in_the_way(out_dir)
    if blocker is not None:
        raise ConfigError(f"{where}: {blocker} is {what_is(blocker)}, not a folder; the grid's runs and "
                          "tables go in a folder (choose another --out)")
    here = Path(os.path.abspath(out_dir))
    for folder in (here, *here.parents):
        if (folder / CONFIG_FILE).is_file() and run_state(folder) in ("complete", "incomplete"):
            how = "is" if folder == here else "is inside"
            raise ConfigError(f"{where}: {how} the run directory {folder}; the grid's runs and tables go "
                              "in a folder of their own (choose another --out)")
    from abawfeat.data.synth import MANIFEST_NAME

    data = {Path(os.path.abspath(c.config.data)) for c in cells if c.config is not None}
    for folder in (here, *here.parents):
        # The grid's own tree, or a synthetic tree (its manifest says so).
        if folder in data or (folder / MANIFEST_NAME).is_file():
            raise ConfigError(f"{where}: is inside the data tree {folder}, which abawfeat never writes "
                              "into; choose another --out")


def _run_grid(recipe: Recipe, cells: list[Cell], out_dir: Path, say: Callable[[str], None], dry_run: bool,
              jobs: int, backend: str, options: BackendOptions) -> AblationResult:
    todo: list[tuple[str, Cell]] = []
    todo_dry: list[tuple[str, Cell]] = []  # what --dry-run would train (submitit prints its sbatch script)
    for i, cell in enumerate(cells, start=1):
        name = f"[{i}/{len(cells)}] {cell.row.label} {cell.task}"
        if run_is_complete(cell.run_dir, cell.config):
            cell.status = "skipped"
            cell.metrics = read_json(cell.run_dir / "metrics.json")
            say(f"{name}: already complete in {cell.run_dir}, skipped")
            continue
        cell.mode = _mode(cell)
        verb = {"new": "train into", "resume": "resume", "overwrite": "retrain (settings changed)"}[cell.mode]
        if dry_run:
            say(f"{name}: would {verb} {cell.run_dir}")
            todo_dry.append((name, cell))
        else:
            todo.append((name, cell))
    _claim_cells(out_dir, recipe, [cell for _, cell in todo if cell.mode != "new"], dry_run)
    if jobs == 0:
        jobs = auto_jobs([cell for _, cell in todo or todo_dry])
        if len(todo) > 1 and backend == "local":
            say(f"--jobs auto: {jobs} cell(s) at once")
    script = ""
    if dry_run and backend == "submitit" and todo_dry:
        script = get_backend_script(todo_dry, options, out_dir)
    if todo and backend == "local":
        cores = os.cpu_count() or 1
        busiest = max((c.config.threads or cores for _, c in todo), default=1)
        at_once = min(jobs, len(todo))
        if at_once * busiest > cores:
            say(f"note: {at_once} job(s) of up to {busiest} thread(s) each share {cores} core(s): slower, "
                "the same numbers (a cell's threads are its configuration)")
    if todo:
        log_dir = options.log_dir or str(out_dir / ".submitit")
        options = dataclasses.replace(options, jobs=jobs, log_dir=log_dir)
        _train_cells(todo, get_backend(backend, options), say)
    cells += _ensemble_cells(recipe, cells, out_dir, say, dry_run)
    table = results_table(recipe, cells)
    files = {} if dry_run else write_results(recipe, cells, table, out_dir, say)
    return AblationResult(recipe=recipe, cells=cells, table=table, files=files, script=script)


def get_backend_script(todo: list[tuple[str, Cell]], options: BackendOptions, out: Path) -> str:
    """The sbatch script the submitit backend would submit for these cells (``--dry-run``)."""
    from abawfeat.backends import UnitSpec
    from abawfeat.backends.submitit_backend import SubmititBackend

    specs = [UnitSpec(name=n, config=c.config) for n, c in todo]
    folder = Path(options.log_dir or out / ".submitit") / "%j"
    return SubmititBackend(dataclasses.replace(options, dry_run=True)).script(specs, folder)


GRID_FILE = "grid-runs.json"  # the run directories this grid trained, relative to its out folder


def _claim_cells(out: Path, recipe: Recipe, reused: list[Cell], dry_run: bool) -> None:
    """Refuse, before anything trains, to retrain or rebuild a run this grid did not make (a user's own
    ``train-head --out`` that happens to sit where a cell goes would be replaced), then record every cell's
    folder as the grid's. ``reused``: the row cells that resume or retrain an existing run."""
    ensembles = [Cell(row=e, task=t, config=None, out=str(seed_dir(out / slug(e.label) / t, s)), seed=s)
                 for e in recipe.ensembles for t in e.tasks for s in ensemble_seeds(recipe, e, t) or (None,)]
    owned = _owned_runs(out)
    for cell in [*reused, *ensembles]:
        if run_state(cell.run_dir) in ("missing", "empty") or _relative(out, cell) in owned:
            continue
        if cell.config is not None and cell.mode == "resume":
            continue  # an interrupted run of exactly this cell's settings: continuing it loses nothing
        raise ConfigError(f"{cell.run_dir}: holds a run this grid did not train (it is not in "
                          f"{out / GRID_FILE}); the grid would replace it: move it, or choose another out")
    if dry_run:
        return
    planned = {_relative(out, c) for c in ensembles} | {
        str(seed_dir(Path(slug(r.label)) / t, s)) for r in recipe.rows for t in r.tasks
        for s in cell_options(recipe, r, t)[1] or (None,)}
    if planned <= owned and (out / GRID_FILE).is_file():
        return  # nothing new to record (a grid re-run to refresh its tables writes nothing here)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / GRID_FILE, {"format": "abawfeat-grid", "version": 1, "runs": sorted(owned | planned)})


def _relative(out: Path, cell: Cell) -> str:
    return str(cell.run_dir.relative_to(out))


def _owned_runs(out: Path) -> set[str]:
    """The cells a grid in ``out`` made: its GRID_FILE, or for a grid written before that file existed, the
    run folders its results.md lists."""
    record = out / GRID_FILE
    if record.is_file():
        try:
            stored = read_json(record)
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8 or not JSON
            raise ConfigError(f"{record}: not the grid's list of its runs ({exc}); move it aside to let the "
                              "grid count the runs its results.md lists") from None
        runs = stored.get("runs") if isinstance(stored, dict) else None
        if not isinstance(runs, list):
            raise ConfigError(f"{record}: 'runs' is not a list of run folders")
        return {str(r) for r in runs}
    legacy = out / "results.md"
    if not legacy.is_file():
        return set()
    listed = re.findall(r"\| `([^`]+)` \|", legacy.read_text(encoding="utf-8", errors="replace"))
    owned = set()
    for path in listed:
        try:
            owned.add(str(Path(path).relative_to(out)))
        except ValueError:
            continue
    return owned


def _ensemble_cells(recipe: Recipe, cells: list[Cell], out: Path, say: Callable[[str], None],
                    dry_run: bool) -> list[Cell]:
    """Build (or keep) each [[ensembles]] entry's runs from the rows' runs, once those are trained: one per
    seed when its members have seeds (``ensemble_seeds``), of the members' runs of that seed."""
    made: list[Cell] = []
    for ens in recipe.ensembles:
        for t in ens.tasks:
            from abawfeat.tasks import task

            candidates = [c for c in cells if c.task == t and c.metrics and isinstance(c.row, Row)
                          and not c.row.options.get("folds")]
            if ens.members:
                rows = [label for label in ens.members if any(c.row.label == label for c in candidates)]
            else:
                rows = [c.row.label for c in _best_models(candidates, task(t).select_metric, ens.best)]
            for seed in ensemble_seeds(recipe, ens, t) or (None,):
                cell = Cell(row=ens, task=t, config=None, out=str(seed_dir(out / slug(ens.label) / t, seed)),
                            seed=seed)
                made.append(cell)
                name = f"{ens.label} {t}" + ("" if seed is None else f" seed {seed}")
                chosen = [c for label in rows for c in candidates
                          if c.row.label == label and c.seed in (seed, None)]
                _build_ensemble_cell(cell, ens, chosen, name, say, dry_run)
    return made


def _build_ensemble_cell(cell: Cell, ens: EnsembleRow, chosen: list[Cell], name: str,
                         say: Callable[[str], None], dry_run: bool) -> None:
    from abawfeat.ensemble import EnsembleConfig, build_ensemble
    from abawfeat.train.rundir import read_record_or_none

    if not chosen:
        cell.status, cell.error = "failed", "no trained member run"
        say(f"{name}: FAILED: {cell.error}")
        return
    cfg = EnsembleConfig(runs=tuple(str(c.run_dir) for c in chosen), out=cell.out,
                         weights=ens.weights, smooth=ens.smooth)
    cell.ensemble = cfg
    record = read_record_or_none(cell.run_dir)
    stored = (record.extra.get("ensemble") or {}) if record is not None else {}
    current = (stored.get("runs") == list(cfg.runs) and stored.get("weights") == cfg.weights
               and stored.get("smooth") == cfg.smooth and run_state(cell.run_dir) == "complete"
               and all((c.run_dir / "metrics.json").stat().st_mtime
                       <= (cell.run_dir / "metrics.json").stat().st_mtime for c in chosen))
    if current:
        cell.status, cell.metrics = "skipped", read_json(cell.run_dir / "metrics.json")
        say(f"{name}: already complete in {cell.run_dir}, skipped")
        return
    if dry_run:
        say(f"{name}: would build an ensemble of {len(chosen)} run(s) into {cell.run_dir}")
        return
    t0 = time.perf_counter()
    try:
        result = build_ensemble(cfg, log=lambda m, name=name: say(f"{name}: {m}"),
                                overwrite=run_state(cell.run_dir) != "missing")
        cell.status, cell.metrics = "trained", result.metrics
    except AbawfeatError as exc:
        cell.status, cell.error = "failed", str(exc)
        say(f"{name}: FAILED: {exc}")
    cell.seconds = time.perf_counter() - t0


def _best_models(candidates: list[Cell], key: str, n: int) -> list[Cell]:
    """The ``n`` best distinct trained models by ``key``, one cell per row. An ensemble averages its
    members' raw outputs, so rows rank by their unsmoothed score (the mean over their seeds), and two rows
    that trained the same model (they differ only in how they smooth) count once."""

    def raw(c: Cell) -> float:
        scores = (c.metrics or {}).get("unsmoothed") or c.metrics or {}
        value = scores.get(key)
        return float(value) if isinstance(value, (int, float)) else -math.inf

    groups: dict[str, list[Cell]] = {}
    for c in candidates:
        groups.setdefault(c.row.label, []).append(c)

    def model(group: list[Cell]) -> str:
        c = group[0]
        if c.config is None:
            return str(c.run_dir)
        seeded = c.seed is not None
        trained = {k: v for k, v in to_dict(c.config).items()
                   if k not in RUN_ONLY_SETTINGS and k != "smooth" and not (seeded and k == "seed")}
        if seeded:
            trained["seeds"] = sorted(g.seed for g in group)
        return json.dumps(trained, sort_keys=True, default=str)

    def score(group: list[Cell]) -> float:
        return math.fsum(raw(c) for c in group) / len(group)

    chosen: list[Cell] = []
    seen: set[str] = set()
    for group in sorted(groups.values(), key=lambda g: -score(g)):
        if model(group) not in seen and len(chosen) < n:
            seen.add(model(group))
            chosen.append(group[0])
    return chosen


def auto_jobs(cells: list[Cell]) -> int:
    """``--jobs 0``: on CPU, as many jobs as the cores hold cells of their configured thread count (a cell
    of ``threads = 0`` takes all of them), as the cells and the available memory allow; 1 when any cell
    trains on a GPU (one device; its heads are far too small to need sharing it). Only how many cells run at
    once depends on the machine; what each computes does not.

    Each job holds its own copy of the caches' features, and training peaks at ~1.3x the feature bytes
    (docs/performance.md), so a job is budgeted 1.5x its cache files' size."""
    from abawfeat.utils.device import resolve_device

    if not cells:
        return 1
    if any(resolve_device(c.config.device).type != "cpu" for c in cells):
        return 1
    cores = os.cpu_count() or 1
    per_cell = max(c.config.threads or cores for c in cells)
    budget = max(1.5 * sum(Path(p).stat().st_size for p in c.config.cache) for c in cells)
    available = available_memory()
    by_memory = int(available // budget) if available and budget else len(cells)
    return max(1, min(len(cells), cores // per_cell, by_memory))


def available_memory() -> int:
    """Bytes the kernel says new work can use (MemAvailable on Linux); 0 when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _mode(cell: Cell) -> str:
    """new, resume (an interrupted run of the same settings) or overwrite (a run of other settings)."""
    from abawfeat.backends.unit import run_mode

    return run_mode(cell.config)


def _train_cells(todo: list[tuple[str, Cell]], backend: Backend, say: Callable[[str], None]) -> None:
    """Hand every cell to the backend as one unit (longest first, so the last to start is a short one)."""
    from abawfeat.backends import UnitSpec

    order = sorted(todo, key=lambda t: queue_order(t[1].config))
    specs = [UnitSpec(name=name, config=cell.config, mode=cell.mode,
                      kind="cv" if cell.config.folds else "run") for name, cell in order]
    results = backend.run(specs, say)
    for (_name, cell), r in zip(order, results, strict=True):
        cell.status = "skipped" if r.status == "skipped" else r.status
        cell.metrics, cell.error, cell.seconds, cell.log = r.metrics, r.error, r.seconds, r.log


def _threads_text(config: TrainConfig) -> str:
    return f"{config.threads} thread(s)" if config.threads else "torch's default threads"


def queue_order(config: TrainConfig) -> tuple[int, bool]:
    """Sort key of the parallel queue, longest cells first so that the last cell to start is a short one:
    cells of temporal trunks (their declared context), then frame-wise cells of heavier head kinds (the
    contrastive projection), then plain frame-wise cells; the task with the most frames (VA) first within
    each. benchmarks/heads.py schedules its estimate with it."""
    head_kind = OBJECTIVES.get(config.objective or _default_objective(config.task)).head
    rank = 0 if trunk_context(config).temporal else 1 if head_kind != "tasks" else 2
    # A cross-validated cell trains one run per fold: it goes before any single run of its kind.
    return (rank - 3 if config.folds else rank), config.task != "va"


def _default_objective(task_name: str) -> str:
    from abawfeat.tasks import task

    return task(task_name).default_objective


def results_table(recipe: Recipe, cells: list[Cell]) -> list[dict[str, Any]]:
    """One dict per recipe row: architecture, the four Table 3 columns, and for each column ``<col>_std``
    and ``<col>_n``. A column's value is the mean over the row's runs that fill it (its seeds; one run for a
    row without seeds: its value as is), ``_std`` their sample standard deviation (None for fewer than two
    runs), ``_n`` how many there are (0 and None where no run fills it)."""
    table = []
    for row in [*recipe.rows, *recipe.ensembles]:
        values: dict[str, Any] = {"architecture": row.label}
        for column, (task, key) in COLUMNS.items():
            found = []
            for cell in cells:
                if cell.row is row and cell.metrics and cell.task in (task, "mtl"):
                    value = cell.metrics.get(key)
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        found.append(float(value))
            mean, std = mean_std(found)
            values[column], values[f"{column}_std"], values[f"{column}_n"] = mean, std, len(found)
        table.append(values)
    return table


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); None for no values, std None for one value."""
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], None
    import statistics

    return statistics.fmean(values), statistics.stdev(values)


def format_cell(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if std is None else f"{value:.3f} ± {std:.3f}"


def row_n(row: Mapping[str, Any]) -> int:
    """How many runs (seeds) a results row averages: the most any of its columns has."""
    return max((int(row.get(f"{c}_n") or 0) for c in COLUMNS), default=0)


def _references(recipe: Recipe) -> list[tuple[str, dict[str, float | None]]]:
    """Published numbers for the rows that name one, in the recipe's row order."""
    wanted = [r for r in recipe.rows if r.reference]
    if not wanted:
        return []
    from abawfeat.reference import load_published

    published = {p.id: p for p in load_published()}
    out = []
    for row in wanted:
        p = published.get(str(row.reference))
        if p is None:
            raise ConfigError(f"{recipe.path}: row {row.label!r}: unknown reference {row.reference!r}; "
                              f"known: {', '.join(sorted(published))}")
        out.append((f"{p.label} [{p.split}]",
                    {col: p.value(key) for col, (_task, key) in COLUMNS.items()}))
    return out


def markdown(recipe: Recipe, cells: list[Cell], table: list[dict[str, Any]]) -> str:
    seeded = any(row_n(r) > 1 for r in table)  # a column n, and the mean ± std where a row has seeds
    header = "| Architecture | " + " | ".join(COLUMNS) + " |" + (" n |" if seeded else "")
    rule = "|---|" + "---:|" * (len(COLUMNS) + seeded)
    lines = [f"# {recipe.title}", "",
             "Validation split, official protocol (every labelled frame, crop or not), best epoch per run.",
             "F1_AU thresholds every AU at 0.5; F1_AUopt uses one threshold per AU tuned on validation.",
             "Rows with smoothing report the smoothed scores (tuned on validation unless the row tunes on a "
             "held-out part of train: such tuning flatters the score, as AU thresholds do). Cross-validated "
             "rows report the mean over folds of each fold's held-out videos of train+val, a different "
             "protocol from the validation split."]
    if seeded:
        lines.append("Rows trained over several seeds show the mean ± the sample standard deviation over "
                     "their n seeds (a cell with fewer runs than its row says how many): a difference "
                     "smaller than the spread is not a difference.")
    lines += ["", header, rule]

    def cell_text(r: Mapping[str, Any], c: str) -> str:
        n = int(r.get(f"{c}_n") or 0)
        fewer = f" (n={n})" if r[c] is not None and n < row_n(r) else ""
        return format_cell(r[c], r.get(f"{c}_std")) + fewer

    lines += [f"| {r['architecture']} | " + " | ".join(cell_text(r, c) for c in COLUMNS) + " |"
              + (f" {row_n(r)} |" if seeded else "") for r in table]
    refs = _references(recipe)
    if refs:
        lines += ["", "Published numbers for comparison (abawfeat/reference/published.json):", "", header,
                  rule]
        lines += [f"| {label} | " + " | ".join(format_cell(v[c]) for c in COLUMNS) + " |"
                  + (" - |" if seeded else "") for label, v in refs]
    lines += ["", "## Runs", "", "| row | task | run directory | status | best epoch | seconds |",
              "|---|---|---|---|---:|---:|"]
    for c in cells:
        best = c.metrics.get("best_epoch", "-") if c.metrics else "-"
        status = c.status + (f": {c.error}" if c.error else "")
        lines.append(f"| {c.row.label} | {c.task} | `{c.run_dir}` | {status} | {best} | "
                     f"{_run_seconds(c):.1f} |")
    return "\n".join(lines) + "\n"


def _run_seconds(cell: Cell) -> float:
    """Training time from the run's history (also right for runs skipped because already complete)."""
    path = cell.run_dir / "history.csv"
    if not path.is_file():
        return cell.seconds
    with open(path, newline="") as fh:
        return sum(float(r.get("seconds") or 0.0) for r in csv.DictReader(fh))


def write_results(
    recipe: Recipe, cells: list[Cell], table: list[dict[str, Any]], out: Path, say: Callable[[str], None]
) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / "results.md", "csv": out / "results.csv"}
    atomic_write_text(files["md"], markdown(recipe, cells, table))

    import polars as pl

    # A typed frame: a column stays Float64 with empty cells where no run fills it, and labels with commas
    # or quotes are quoted as CSV readers expect.
    schema = {"architecture": pl.String, **dict.fromkeys(COLUMNS, pl.Float64),
              **{f"{c}_std": pl.Float64 for c in COLUMNS}, **{f"{c}_n": pl.Int64 for c in COLUMNS}}
    frame = pl.DataFrame(table, schema=schema)
    atomic_write(files["csv"], lambda tmp: frame.write_csv(tmp, float_precision=6))
    done = [c.run_dir for c in cells if c.metrics]
    if done:
        try:
            from abawfeat.report import build_report
        except Exception as exc:  # the tables are the deliverable; the HTML report is a bonus
            say(f"HTML report skipped ({type(exc).__name__}: {exc})")
        else:
            try:
                # Runs trained with plots = false asked for no matplotlib time; the report respects that.
                plots = all(c.config.plots for c in cells if c.metrics)
                files["html"] = build_report(done, out / "report.html", title=recipe.title,
                                             make_missing_plots=plots)
            except Exception as exc:
                say(f"HTML report failed ({type(exc).__name__}: {exc})")
    return files


__all__ = ["COLUMNS", "AblationResult", "Cell", "Recipe", "cell_options", "ensemble_seeds", "format_cell",
           "load_recipe", "mean_std", "plan_cells", "results_table", "run_ablation", "seed_dir", "slug"]
