"""``abawfeat tune [RECIPE.toml]``: a hyperparameter search over cached features (abawfeat.tune)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from abawfeat.cli import _backend_opts as bo
from abawfeat.cli import _stage_two as st
from abawfeat.cli import app
from abawfeat.cli._common import console, err_console, guarded, warn_line


def _log(message: str) -> None:
    err_console.print(message, highlight=False, soft_wrap=True)


@app.command("tune")
@guarded
def tune_command(
    recipe: Path | None = typer.Argument(
        None, help="TOML recipe naming the search space, task, caches and budget (its tune, fixed and space "
        "tables); default: the default space of --task and --head."),
    task: st.Task = None,
    head: str | None = typer.Option(None, "--head", help="Trunk to tune (default fc, or the recipe's)."),
    data: st.Data = None,
    cache: st.Caches = None,
    out: Path | None = typer.Option(None, "--out", help="Folder of the search: trials/, study.db, tables."),
    trials: int | None = typer.Option(
        None, "--trials", help="Budget: finished trials over all workers (20)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs per trial (10)."),
    storage: str | None = typer.Option(
        None, "--storage", help="Optuna storage URL (default sqlite:///OUT/study.db), or journal:PATH (a "
        "journal file, for shared filesystems)."),
    study: str | None = typer.Option(None, "--study", help="Study name (default: OUT's folder name)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the sampler and of every trial's run (0)."),
    tune_on: str | None = typer.Option(
        None, "--tune-on", help="val: select by the validation score (optimistic); holdout: by held-out "
        "training videos (an honest validation score; no pruning)."),
    prune: bool | None = typer.Option(None, "--prune/--no-prune", help="Median pruning on each epoch."),
    jobs: int | None = typer.Option(None, "--jobs", "-j", help="Trials this worker trains at once (1)."),
    backend: str | None = typer.Option(None, "--backend", help="local, submitit or ray (docs/cluster.md)."),
    slurm_partition: bo.SlurmPartition = "",
    slurm_gpus_per_job: bo.SlurmGpus = 0,
    slurm_time: bo.SlurmTime = 60,
    slurm_opt: bo.SlurmOpt = None,
    submitit_local: bo.SubmititLocal = False,
    submitit_folder: bo.SubmititFolder = None,
    ray_address: bo.RayAddress = "",
    gpus_per_run: bo.GpusPerRun = 0.0,
) -> None:
    """Search hyperparameters with Optuna (TPE, median pruning): every trial is a run directory; several
    `tune` processes on one storage share the study; re-running continues it up to the budget."""
    from abawfeat.tune import TuneConfig, load_tune_recipe, run_tune

    settings, fixed, space = load_tune_recipe(recipe) if recipe is not None else ({}, {}, [])
    given = {"task": task, "head": head, "data": str(data) if data else None,
             "cache": [str(c) for c in cache] if cache else None, "out": str(out) if out else None,
             "trials": trials, "epochs": epochs, "storage": storage, "study": study, "seed": seed,
             "tune_on": tune_on, "prune": prune, "jobs": jobs, "backend": backend}
    values = {**settings, **{k: v for k, v in given.items() if v is not None}}  # the command line wins
    if isinstance(values.get("cache"), str):
        values["cache"] = [values["cache"]]
    values["cache"] = tuple(values.get("cache") or ())
    if "task" not in values:
        st.require(task=None)
    cfg = TuneConfig(**values, fixed=fixed, space=space, recipe=str(recipe or ""))
    options = bo.backend_options(
        jobs=cfg.jobs, slurm_partition=slurm_partition, slurm_gpus_per_job=slurm_gpus_per_job,
        slurm_time=slurm_time, slurm_opt=slurm_opt, submitit_local=submitit_local,
        submitit_folder=submitit_folder, ray_address=ray_address, gpus_per_run=gpus_per_run,
    )
    result = run_tune(cfg, log=_log, options=options)
    c = result.counts
    console.print(Text(f"{result.out}: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed"
                       + (f", {c['running']} still running in other workers" if c["running"] else "")
                       + f" (budget {cfg.trials})"), soft_wrap=True)
    if result.best is not None:
        b = result.best
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in b["params"].items())
        console.print(Text(f"best: trial {b['number']}, {b['metric']} {b['value']:.4f}: {params}"),
                      soft_wrap=True)
        console.print(Text(f"best run: {b['run_dir']} (abawfeat evaluate {b['run_dir']})"), soft_wrap=True)
    warn_line(result.note)
    for path in result.files.values():
        console.print(str(path), highlight=False, soft_wrap=True)
