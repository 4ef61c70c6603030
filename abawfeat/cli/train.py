"""Stage-two commands: ``train-head``, ``evaluate``, ``predict``, ``ablate``, ``heads``.

Each parses options, builds a config and calls one library function (abawfeat.train / predict / ablate);
torch is imported inside the commands so that ``abawfeat --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from abawfeat.cli import _backend_opts as bo
from abawfeat.cli import _stage_two as st
from abawfeat.cli import app
from abawfeat.cli._common import console, err_console, error_line, guarded, warn_line


def _log(message: str) -> None:
    err_console.print(message, highlight=False, soft_wrap=True)


@app.command("train-head")
@guarded
def train_head(
    task: st.Task = None,
    head: st.Head = "fc",
    backbone: st.Backbone = "",
    data: st.Data = None,
    cache: st.Caches = None,
    fusion: st.Fusion = "early",
    modality_dropout: st.ModalityDropout = 0.0,
    out: st.Out = None,
    objective: st.Objective = "",
    class_weights: st.ClassWeights = "none",
    pos_weight: st.PosWeight = False,
    focal_gamma: st.FocalGamma = 2.0,
    logit_tau: st.LogitTau = 1.0,
    moe_experts: st.MoeExperts = 0,
    moe_balance: st.MoeBalance = 0.01,
    epochs: st.Epochs = 10,
    seed: st.Seed = 0,
    lr: st.Lr = 1e-3,
    weight_decay: st.WeightDecay = 1e-4,
    batch_size: st.BatchSize = 0,
    window: st.Window = 64,
    stride: st.Stride = 0,
    infer_stride: st.InferStride = 0,
    hidden: st.Hidden = -1,
    layers: st.Layers = 1,
    bidirectional: st.Bidirectional = False,
    dropout: st.Dropout = 0.0,
    trunk_opt: st.TrunkOpt = None,
    device: st.Device = "auto",
    threads: st.Threads = 1,
    precision: st.Precision = "auto",
    compile_trunk: st.Compile = False,
    smooth: st.Smooth = "none",
    tune_on: st.TuneOn = "val",
    holdout: st.Holdout = 0.15,
    plots: st.Plots = True,
    overwrite: st.Overwrite = False,
    # The old spelling of fine-tuning, `train-head --unfreeze ...` / `train-head --resume RUN`: hidden; it
    # says that fine-tuning moved to `abawfeat finetune` (cli/finetune.py) and runs it with the same options.
    unfreeze: bool = typer.Option(False, "--unfreeze", hidden=True),
    unfreeze_from: str | None = typer.Option(None, "--unfreeze-from", hidden=True),
    weights: str | None = typer.Option(None, "--weights", hidden=True),
    random_init: bool = typer.Option(False, "--random-init", hidden=True),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", hidden=True),
    backbone_lr: float = typer.Option(1e-4, "--backbone-lr", hidden=True),
    schedule: str = typer.Option("cosine", "--schedule", hidden=True),
    warmup: float = typer.Option(0.05, "--warmup", hidden=True),
    grad_accum: int = typer.Option(1, "--grad-accum", hidden=True),
    freeze_bn: bool = typer.Option(False, "--freeze-bn", hidden=True),
    attention_diversity: bool = typer.Option(False, "--attention-diversity", hidden=True),
    diversity_weight: float = typer.Option(0.1, "--diversity-weight", hidden=True),
    augment: bool = typer.Option(True, "--augment/--no-augment", hidden=True),
    workers: int = typer.Option(2, "--workers", hidden=True),
    eval_batch_size: int = typer.Option(64, "--eval-batch-size", hidden=True),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue this interrupted run exactly (options from its config.json)."
    ),
) -> None:
    """Train a head on cached features; writes the run directory and prints validation metrics.
    (Fine-tuning an encoder with the head: `abawfeat finetune`.)"""
    from abawfeat.errors import ConfigError
    from abawfeat.train import fit, resume_config
    from abawfeat.train.rundir import RunRecord

    finetune_options = {
        "unfreeze_from": unfreeze_from, "weights": weights, "random_init": random_init,
        "backbone_lr": backbone_lr, "schedule": schedule, "warmup": warmup, "grad_accum": grad_accum,
        "freeze_bn": freeze_bn, "attention_diversity": attention_diversity,
        "diversity_weight": diversity_weight, "workers": workers, "eval_batch_size": eval_batch_size,
    }
    resume_finetune = resume is not None and RunRecord.read(resume).kind == "finetune"
    if resume_finetune or unfreeze:
        from abawfeat.cli.finetune import run_finetune_command
        from abawfeat.utils.dist import dist_info

        spelling = "--resume" if resume_finetune else "--unfreeze"
        if dist_info().is_main:
            _log(f"note: fine-tuning moved to `abawfeat finetune`; `train-head {spelling}` runs it with the "
                 "same options")
    if resume_finetune:
        run_finetune_command(None, resume=resume, augment=augment, **finetune_options)
        return
    if resume is not None:
        result = fit(resume_config(resume), log=_log, resume=True)
        _finish(result.run_dir, result.metrics, plots)
        return
    st.require("--resume RUN_DIR", task=task, data=data, out=out)
    config = st.train_config(
        task=task, head=head, backbone=backbone, data=data, cache=cache, fusion=fusion,
        modality_dropout=modality_dropout, out=out, objective=objective, class_weights=class_weights,
        pos_weight=pos_weight, focal_gamma=focal_gamma, logit_tau=logit_tau, moe_experts=moe_experts,
        moe_balance=moe_balance, epochs=epochs, seed=seed,
        lr=lr,
        weight_decay=weight_decay, batch_size=batch_size, window=window, stride=stride,
        infer_stride=infer_stride, hidden=hidden, layers=layers, bidirectional=bidirectional, dropout=dropout,
        trunk_opt=trunk_opt, device=device, threads=threads, precision=precision, compile=compile_trunk,
        smooth=smooth,
        tune_on=tune_on, holdout=holdout, plots=plots,
    )
    if unfreeze:
        import dataclasses

        from abawfeat.cli._encoder_opts import encoder_opts
        from abawfeat.finetune import DEFAULT_BACKBONE

        config = dataclasses.replace(config, backbone=config.backbone or DEFAULT_BACKBONE)

        options = encoder_opts(None, {"--trust-pickle": ("trust_pickle", "true" if trust_pickle else None)})
        run_finetune_command(config, resume=None, augment=augment, encoder_options=options,
                             overwrite=overwrite, **finetune_options)
        return
    defaults = {"unfreeze_from": None, "weights": None, "random_init": False, "backbone_lr": 1e-4,
                "schedule": "cosine", "warmup": 0.05, "grad_accum": 1, "freeze_bn": False,
                "attention_diversity": False, "diversity_weight": 0.1, "workers": 2, "eval_batch_size": 64}
    given = [f"--{k.replace('_', '-')}" for k, v in finetune_options.items() if v != defaults[k]]
    given += ["--trust-pickle"] * trust_pickle + ["--no-augment"] * (not augment)
    if given:
        raise ConfigError(f"{', '.join(given)}: fine-tuning options (`abawfeat finetune`, formerly "
                          "`train-head --unfreeze`); a head on a cache uses the cache's encoder")
    result = fit(config, log=_log, overwrite=overwrite)
    _finish(result.run_dir, result.metrics, plots)


def _finish(run_dir: Path, metrics: dict[str, Any], plots: bool) -> None:
    """Plots of a finished run (a plotting problem costs only the pictures), then its metrics."""
    if plots:
        from abawfeat.report.plots import try_write_run_plots

        try_write_run_plots(run_dir, log=_log)
    st.print_metrics(metrics, f"{run_dir}: validation, best epoch {metrics['best_epoch']}")


@app.command("cv")
@guarded
def cv_command(
    folds: int = typer.Option(
        5, "--folds", help="K: video-level folds over train+val (scikit-learn GroupKFold)."),
    task: st.Task = None,
    head: st.Head = "fc",
    backbone: st.Backbone = "",
    data: st.Data = None,
    cache: st.Caches = None,
    fusion: st.Fusion = "early",
    modality_dropout: st.ModalityDropout = 0.0,
    out: st.Out = None,
    objective: st.Objective = "",
    class_weights: st.ClassWeights = "none",
    pos_weight: st.PosWeight = False,
    focal_gamma: st.FocalGamma = 2.0,
    logit_tau: st.LogitTau = 1.0,
    moe_experts: st.MoeExperts = 0,
    moe_balance: st.MoeBalance = 0.01,
    epochs: st.Epochs = 10,
    seed: st.Seed = 0,
    lr: st.Lr = 1e-3,
    weight_decay: st.WeightDecay = 1e-4,
    batch_size: st.BatchSize = 0,
    window: st.Window = 64,
    stride: st.Stride = 0,
    infer_stride: st.InferStride = 0,
    hidden: st.Hidden = -1,
    layers: st.Layers = 1,
    bidirectional: st.Bidirectional = False,
    dropout: st.Dropout = 0.0,
    trunk_opt: st.TrunkOpt = None,
    device: st.Device = "auto",
    threads: st.Threads = 1,
    precision: st.Precision = "auto",
    compile_trunk: st.Compile = False,
    smooth: st.Smooth = "none",
    tune_on: st.TuneOn = "val",
    holdout: st.Holdout = 0.15,
    plots: st.Plots = True,
    jobs: int = typer.Option(1, "--jobs", "-j", help="Folds trained at once (local backend), or the CPUs of "
                             "a local Ray cluster; never changes a number."),
    backend: bo.Backend = "local",
    slurm_partition: bo.SlurmPartition = "",
    slurm_gpus_per_job: bo.SlurmGpus = 0,
    slurm_time: bo.SlurmTime = 60,
    slurm_array_parallelism: bo.SlurmArray = 0,
    slurm_opt: bo.SlurmOpt = None,
    runs_per_job: bo.RunsPerJob = 1,
    submitit_local: bo.SubmititLocal = False,
    submitit_folder: bo.SubmititFolder = None,
    ray_address: bo.RayAddress = "",
    gpus_per_run: bo.GpusPerRun = 0.0,
    max_retries: bo.MaxRetries = 2,
) -> None:
    """Cross-validate a head over train+val: one run per fold in OUT/fold-I (the train-head options apply to
    each), OUT/summary.json with each metric's mean and spread; OUT predicts the test split as an ensemble of
    its folds. Re-running continues an interrupted cross-validation."""
    from abawfeat.cv import run_cv

    st.require(task=task, data=data, out=out)
    config = st.train_config(
        task=task, head=head, backbone=backbone, data=data, cache=cache, fusion=fusion,
        modality_dropout=modality_dropout, out=out, objective=objective, class_weights=class_weights,
        pos_weight=pos_weight, focal_gamma=focal_gamma, logit_tau=logit_tau, moe_experts=moe_experts,
        moe_balance=moe_balance, epochs=epochs, seed=seed,
        lr=lr, weight_decay=weight_decay, batch_size=batch_size, window=window, stride=stride,
        infer_stride=infer_stride, hidden=hidden, layers=layers, bidirectional=bidirectional, dropout=dropout,
        trunk_opt=trunk_opt, device=device, threads=threads, precision=precision, compile=compile_trunk,
        smooth=smooth,
        tune_on=tune_on, holdout=holdout, plots=plots,
    )
    from abawfeat.backends import fold_trainer, get_backend

    options = bo.backend_options(
        jobs=jobs, slurm_partition=slurm_partition, slurm_gpus_per_job=slurm_gpus_per_job,
        slurm_time=slurm_time,
        slurm_array_parallelism=slurm_array_parallelism, slurm_opt=slurm_opt, runs_per_job=runs_per_job,
        submitit_local=submitit_local, submitit_folder=submitit_folder, ray_address=ray_address,
        gpus_per_run=gpus_per_run, max_retries=max_retries,
    )
    if not options.log_dir:
        options.log_dir = str(Path(config.out) / ".submitit")
    trainer = None
    if backend != "local" or jobs != 1:
        trainer = fold_trainer(get_backend(backend, options), _log)
    result = run_cv(config, folds, log=_log, train_folds=trainer)
    if plots:
        from abawfeat.report.plots import try_write_run_plots

        for fold in result.folds:
            if not (fold / "plots").is_dir():
                try_write_run_plots(fold, log=_log)
    st.print_metrics(result.metrics, f"{result.run_dir}: {folds}-fold cross-validation (mean over folds)")
    spread = result.metrics.get("spread") or {}
    if spread:
        console.print(Text("spread (std over folds): " + ", ".join(f"{k} {v:.4f}" for k, v in spread.items()
                                                                    if k in result.metrics)))


@app.command("ensemble")
@guarded
def ensemble_command(
    runs: list[Path] = typer.Argument(..., help="Run directories of one task on one dataset."),
    out: Path = typer.Option(..., "--out", help="The ensemble's run directory."),
    weights: str = typer.Option(
        "equal", "--weights", help="equal, or tuned: ensemble selection on validation, per task."),
    smooth: str = typer.Option(
        "none", "--smooth", help="auto: tune smoothing on the averaged validation scores; none: off."),
    data: Path | None = typer.Option(None, "--data", help="Override the runs' data root."),
    overwrite: st.Overwrite = False,
) -> None:
    """Average runs' scores (probabilities or values) into an ensemble, re-tuning the AU thresholds and the
    smoothing; OUT is a run that evaluate, predict, report and ablate treat like any other."""
    from abawfeat.ensemble import EnsembleConfig, build_ensemble

    cfg = EnsembleConfig(runs=tuple(str(r) for r in runs), out=str(out), weights=weights, smooth=smooth,
                         data=str(data) if data else "")
    result = build_ensemble(cfg, log=_log, overwrite=overwrite)
    for t, w in result.weights.items():
        console.print(Text(f"{t} weights: " + ", ".join(f"{x:.2f}" for x in w)))
    st.print_metrics(result.metrics, f"{result.run_dir}: validation")


@app.command("evaluate")
@guarded
def evaluate_command(
    run_dir: Path = typer.Argument(..., help="Run directory written by train-head."),
    split: str = typer.Option("val", "--split", help="val or train."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics as JSON on stdout."),
    data: Path | None = typer.Option(None, "--data", help="Override the run's data root."),
    cache: list[Path] | None = typer.Option(
        None, "--cache", help="Override the run's caches (same encoders and order; repeat for fused runs)."),
) -> None:
    """Score a trained run by the official protocol (every labelled frame, crop or not)."""
    from abawfeat.train import evaluate

    metrics = evaluate(run_dir, split, data, cache)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
    else:
        st.print_metrics(metrics, f"{run_dir}: {split}")


@app.command("predict")
@guarded
def predict_command(
    run_dir: Path = typer.Argument(..., help="Run directory written by train-head."),
    split: str = typer.Option(..., "--split", help="val, test or train."),
    out: Path = typer.Option(..., "--out", help="Submission file (mtl runs: one file per task beside it)."),
    smooth: str = typer.Option(
        "run", "--smooth", help="run (the run's own tuned smoothing, if any), none, or W: a centred moving "
        "average of W frames (odd) instead."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier prediction file at --out."),
    data: Path | None = typer.Option(None, "--data", help="Override the run's data root."),
    cache: list[Path] | None = typer.Option(
        None, "--cache", help="Override the run's caches (same encoders and order; repeat for fused runs)."),
) -> None:
    """Write predictions in the organisers' format: every frame 1..N of every video, crop or not."""
    from abawfeat.predict import predict

    result = predict(run_dir, split, out, smooth, data, cache, overwrite=overwrite)
    for task, path in result.files.items():
        console.print(f"{path}: {task}, {result.videos[task]} videos, {result.frames[task]:,} frames "
                      f"({result.frames_without_crop[task]:,} {result.missing}, filled)", highlight=False)


@app.command("ablate")
@guarded
def ablate_command(
    recipe: Path = typer.Argument(..., help="TOML recipe, e.g. pipelines/paper-table3.toml."),
    data: Path | None = typer.Option(None, "--data", help="Aff-Wild2 root (overrides the recipe's)."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (overrides the recipe's)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be trained or skipped."),
    jobs: int = typer.Option(
        0, "--jobs", "-j", help="Cells trained at once, each in its own process on its own configured "
        "threads (recipe `threads`, default 1): --jobs never changes a number. 0 = auto: as many as the "
        "cores and memory hold, 1 on a GPU.",
    ),
    backend: bo.Backend = "local",
    slurm_partition: bo.SlurmPartition = "",
    slurm_gpus_per_job: bo.SlurmGpus = 0,
    slurm_time: bo.SlurmTime = 60,
    slurm_array_parallelism: bo.SlurmArray = 0,
    slurm_opt: bo.SlurmOpt = None,
    runs_per_job: bo.RunsPerJob = 1,
    submitit_local: bo.SubmititLocal = False,
    submitit_folder: bo.SubmititFolder = None,
    ray_address: bo.RayAddress = "",
    gpus_per_run: bo.GpusPerRun = 0.0,
    max_retries: bo.MaxRetries = 2,
) -> None:
    """Run a grid of train-head runs (complete runs with the same config are skipped) and write
    results.md / results.csv in the seed paper's Table 3 layout, plus report.html."""
    from rich.table import Table

    from abawfeat.ablate import COLUMNS, format_cell, run_ablation

    options = bo.backend_options(
        jobs=jobs, slurm_partition=slurm_partition, slurm_gpus_per_job=slurm_gpus_per_job,
        slurm_time=slurm_time,
        slurm_array_parallelism=slurm_array_parallelism, slurm_opt=slurm_opt, runs_per_job=runs_per_job,
        submitit_local=submitit_local, submitit_folder=submitit_folder, ray_address=ray_address,
        gpus_per_run=gpus_per_run, max_retries=max_retries,
    )
    result = run_ablation(recipe, str(data) if data else None, str(out) if out else None, log=_log,
                          dry_run=dry_run, jobs=jobs, backend=backend, options=options)
    if result.script:
        typer.echo(result.script)
    table = Table(title=result.recipe.title, title_justify="left")
    table.add_column("Architecture")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for row in result.table:
        table.add_row(row["architecture"], *(format_cell(row[c], row.get(f"{c}_std")) for c in COLUMNS))
    console.print(table)
    for path in result.files.values():
        console.print(str(path), highlight=False)
    if result.failed:
        for cell in result.failed:
            where = f" (log {cell.log})" if cell.log and cell.log not in cell.error else ""
            error_line(f"{cell.row.label} {cell.task}: {cell.error}{where}", label="failed:")
        raise typer.Exit(code=1)


@app.command("reproduce")
@guarded
def reproduce_command(
    run_dir: Path = typer.Argument(..., help="A complete run: train-head, cv or ensemble."),
    out: Path | None = typer.Option(
        None, "--out", help="Scratch folder for the reproduction (new or empty); default: a temporary one."),
    keep: bool = typer.Option(False, "--keep", help="Keep the reproduction instead of removing it."),
) -> None:
    """Redo a run from its record in a scratch folder (the run itself is only read) and compare every metric
    of metrics.json exactly; exit 0 when all are equal, 1 when any differs, naming the recorded settings
    (threads, torch, oneDNN, CPU instruction sets, device, cache fingerprints) that differ from this
    machine's."""
    from rich.table import Table

    from abawfeat.reproduce import reproduce_run

    result = reproduce_run(run_dir, out, keep=keep, log=_log)
    table = Table(title=f"{run_dir}: original vs reproduced ({result.threads or 'default'} thread(s))",
                  title_justify="left")
    for column in ("metric", "original", "reproduced", ""):
        table.add_column(column, overflow="fold")
    for row in result.rows:
        mark = "=" if row.equal else "≠"
        table.add_row(row.key, json.dumps(row.original), json.dumps(row.reproduced), mark)
    console.print(table)
    if result.kept:
        console.print(f"reproduction kept in {result.scratch}", highlight=False)
    if result.equal:
        console.print(f"equal: all {len(result.rows)} values of {run_dir / 'metrics.json'} reproduced "
                      "exactly", highlight=False)
        for phrase in result.differences:
            warn_line(f"recorded setting differs, yet the numbers agree: {phrase}")
        return
    error_line(f"{run_dir}: {len(result.differing)} of {len(result.rows)} metric values differ",
               label="differ:")
    if result.differences:
        for phrase in result.differences:
            err_console.print(f"  recorded setting differs from this machine's: {phrase}", highlight=False,
                              soft_wrap=True)
    else:
        err_console.print("  no recorded setting (threads, torch, oneDNN, CPU flags, device, cache "
                          "fingerprints) differs from this machine's: something the record does not hold "
                          "changed (OMP or MKL environment variables, the data root's annotations)",
                          highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


@app.command("heads")
@guarded
def heads_command(
    as_json: bool = typer.Option(False, "--json", help="Print trunks, head kinds and objectives as JSON."),
) -> None:
    """List the registered trunks (what --head chooses, with their context and options), the head kinds
    (what the objective puts on the trunk) and the training objectives."""
    from rich.table import Table

    from abawfeat.heads import FUSIONS, describe_heads
    from abawfeat.train.objectives import describe_objectives
    from abawfeat.trunks import describe_trunks

    trunks, heads, objectives = describe_trunks(), describe_heads(), describe_objectives()
    if as_json:
        typer.echo(json.dumps({"trunks": trunks, "heads": heads, "objectives": objectives,
                               "fusions": FUSIONS.names()}, indent=2, default=list))
        return

    def fmt(options: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items()
                         if k != "class_names")

    table = Table(title="Trunks (--head NAME; options: --hidden, --layers, --bidirectional, --dropout, "
                        "--trunk-opt key=value)", title_justify="left")
    for column in ("name", "label", "context (defaults)", "description", "options"):
        table.add_column(column, overflow="fold")
    for t in trunks:
        table.add_row(t["name"], t["label"], t["context"], t["description"], fmt(t["options"]))
    console.print(table)
    table = Table(title="Head kinds (chosen by the objective)", title_justify="left")
    for column in ("name", "description", "options"):
        table.add_column(column, overflow="fold")
    for h in heads:
        table.add_row(h["name"], h["description"], fmt(h["config"]) or "-")
    console.print(table)
    table = Table(title="Objectives (--objective)", title_justify="left")
    for column in ("name", "tasks", "default for", "head kind", "description"):
        table.add_column(column, overflow="fold")
    for o in objectives:
        table.add_row(o["name"], ", ".join(o["tasks"]), ", ".join(o["default_for"]) or "-", o["head"],
                      o["description"])
    console.print(table)
    console.print(Text(f"Fusions of several caches (--fusion): {', '.join(FUSIONS.names())}"))
