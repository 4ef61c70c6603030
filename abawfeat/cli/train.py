"""Stage-two commands: ``train-head``, ``evaluate``, ``predict``, ``ablate``, ``heads``.

Each parses options, builds a config and calls one library function (abawfeat.train / predict / ablate);
torch is imported inside the commands so that ``abawfeat --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from abawfeat.cli import app
from abawfeat.cli._common import console, err_console, error_line, guarded, parse_key_values


def _log(message: str) -> None:
    err_console.print(message, highlight=False, soft_wrap=True)


def _print_metrics(metrics: dict[str, Any], title: str) -> None:
    from rich.table import Table
    from rich.text import Text

    from abawfeat.tasks import run_task_names, single_tasks, task

    main = dict.fromkeys(k for n in run_task_names() for k in task(n).metric_keys)
    groups = [k for t in single_tasks() for k in t.per_item_keys.values()]
    table = Table(title=Text(title), title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("task", "split", "best_epoch"):
        if key in metrics:
            table.add_row(key, Text(str(metrics[key])))
    for key in main:
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.4f}")
    for group in groups:
        if group in metrics:
            values = ", ".join(f"{k} {v:.3f}" for k, v in metrics[group].items())
            table.add_row(group, Text(values))
    console.print(table)


@app.command("train-head")
@guarded
def train_head(
    task: str | None = typer.Option(None, "--task", help="va, expr, au or mtl (one head for all three)."),
    head: str = typer.Option(
        "fc", "--head", help="Trunk: fc (frame-wise) or a temporal one (`abawfeat heads` lists them)."),
    backbone: str = typer.Option(
        "", "--backbone", help="Encoder of the cache; default: the cache's own (it must match when given)."),
    data: Path | None = typer.Option(
        None, "--data", help="Aff-Wild2 root (annotations, test lists, sample files)."
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Feature cache. Default: cache/<data folder name>/<backbone or ddamfn>.h5."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Run directory to write (config, checkpoint, metrics...)."
    ),
    objective: str = typer.Option(
        "", "--objective", help="ccc (va), ce (expr), bce (au), contrastive (expr, CLIP caches), mtl. "
        "Default: the task's own."
    ),
    class_weights: str = typer.Option(
        "none", "--class-weights", help="EXPR cross-entropy weights: none, inverse, sqrt_inverse, effective."
    ),
    pos_weight: bool = typer.Option(False, "--pos-weight", help="AU BCE: weight positives by neg/pos ratio."),
    epochs: int = typer.Option(10, "--epochs", help="Epochs; the best validation epoch is kept."),
    seed: int = typer.Option(0, "--seed", help="Seed (weights, dropout, window order)."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="AdamW weight decay."),
    batch_size: int = typer.Option(0, "--batch-size", help="Windows (frames for fc) per batch; 0 = auto."),
    window: int = typer.Option(64, "--window", help="Training window of temporal trunks, in frames."),
    stride: int = typer.Option(0, "--stride", help="Step between training windows; 0 = --window."),
    infer_stride: int = typer.Option(0, "--infer-stride", help="Step between inference windows; 0 = half."),
    hidden: int = typer.Option(-1, "--hidden", help="Trunk width; -1 = the trunk's default (fc: linear)."),
    layers: int = typer.Option(1, "--layers", help="Trunk depth (trunks with layers)."),
    bidirectional: bool = typer.Option(
        False, "--bidirectional", help="Temporal trunks also use future frames (not causal)."),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout on trunk inputs and hidden states."),
    trunk_opt: list[str] | None = typer.Option(
        None, "--trunk-opt", help="Any other trunk option, key=value (repeatable; `abawfeat heads`)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    threads: int = typer.Option(
        0, "--threads", help="CPU threads; 0 = auto (1 for FC, else all cores). 1 on a busy machine."
    ),
    precision: str = typer.Option(
        "auto", "--precision", help="auto (bf16 for temporal trunks and contrastive heads), fp32, bf16, fp16."
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write plots/*.png at the end."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the run in --out, once the new one is complete."),
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
    from abawfeat.train import TrainConfig, fit, resume_config
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
    missing = [flag for flag, value in (("--task", task), ("--data", data), ("--out", out)) if value is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (unless --resume RUN_DIR)")
    config = TrainConfig(
        task=task, head=head, backbone=backbone, data=str(data), cache=str(cache) if cache else "",
        out=str(out), objective=objective, class_weights=class_weights, pos_weight=pos_weight, epochs=epochs,
        seed=seed, lr=lr, weight_decay=weight_decay, batch_size=batch_size, window=window, stride=stride,
        infer_stride=infer_stride, hidden=hidden, layers=layers, bidirectional=bidirectional,
        dropout=dropout, trunk_opts=parse_key_values(trunk_opt or [], "--trunk-opt"), device=device,
        threads=threads, precision=precision, plots=plots,
    )
    if unfreeze:
        import dataclasses

        from abawfeat.cli._encoder_opts import encoder_opts
        from abawfeat.finetune import DEFAULT_BACKBONE

        config = dataclasses.replace(config, backbone=config.backbone or DEFAULT_BACKBONE)

        options = encoder_opts(None, {"--trust-pickle": ("trust_pickle", "true" if trust_pickle else None)})
        run_finetune_command(config, resume=None, augment=augment, encoder_options=options,
                             **finetune_options)
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
    _print_metrics(metrics, f"{run_dir}: validation, best epoch {metrics['best_epoch']}")


@app.command("evaluate")
@guarded
def evaluate_command(
    run_dir: Path = typer.Argument(..., help="Run directory written by train-head."),
    split: str = typer.Option("val", "--split", help="val or train."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics as JSON on stdout."),
    data: Path | None = typer.Option(None, "--data", help="Override the run's data root."),
    cache: Path | None = typer.Option(None, "--cache", help="Override the run's cache (same encoder only)."),
) -> None:
    """Score a trained run by the official protocol (every labelled frame, crop or not)."""
    from abawfeat.train import evaluate

    metrics = evaluate(run_dir, split, data, cache)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
    else:
        _print_metrics(metrics, f"{run_dir}: {split}")


@app.command("predict")
@guarded
def predict_command(
    run_dir: Path = typer.Argument(..., help="Run directory written by train-head."),
    split: str = typer.Option(..., "--split", help="val, test or train."),
    out: Path = typer.Option(..., "--out", help="Submission file (mtl runs: one file per task beside it)."),
    smooth: int = typer.Option(0, "--smooth", help="Centred moving average over W frames (odd); 0 = off."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier prediction file at --out."),
    data: Path | None = typer.Option(None, "--data", help="Override the run's data root."),
    cache: Path | None = typer.Option(None, "--cache", help="Override the run's cache (same encoder only)."),
) -> None:
    """Write predictions in the organisers' format: every frame 1..N of every video, crop or not."""
    from abawfeat.predict import predict

    result = predict(run_dir, split, out, smooth, data, cache, overwrite=overwrite)
    for task, path in result.files.items():
        console.print(f"{path}: {task}, {result.videos[task]} videos, {result.frames[task]:,} frames "
                      f"({result.frames_without_crop[task]:,} without a crop, filled)", highlight=False)


@app.command("ablate")
@guarded
def ablate_command(
    recipe: Path = typer.Argument(..., help="TOML recipe, e.g. pipelines/paper-table3.toml."),
    data: Path | None = typer.Option(None, "--data", help="Aff-Wild2 root (overrides the recipe's)."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (overrides the recipe's)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be trained or skipped."),
    jobs: int = typer.Option(
        0, "--jobs", "-j", help="Cells trained at once, each in its own process with cores/jobs threads; "
        "0 = auto: one per CPU core as memory allows, 1 on a GPU.",
    ),
) -> None:
    """Run a grid of train-head runs (complete runs with the same config are skipped) and write
    results.md / results.csv in the seed paper's Table 3 layout, plus report.html."""
    from rich.table import Table

    from abawfeat.ablate import COLUMNS, run_ablation

    result = run_ablation(recipe, str(data) if data else None, str(out) if out else None, log=_log,
                          dry_run=dry_run, jobs=jobs)
    table = Table(title=result.recipe.title, title_justify="left")
    table.add_column("Architecture")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for row in result.table:
        table.add_row(row["architecture"], *("-" if row[c] is None else f"{row[c]:.3f}" for c in COLUMNS))
    console.print(table)
    for path in result.files.values():
        console.print(str(path), highlight=False)
    if result.failed:
        for cell in result.failed:
            error_line(f"{cell.row.label} {cell.task}: {cell.error}", label="failed:")
        raise typer.Exit(code=1)


@app.command("heads")
@guarded
def heads_command(
    as_json: bool = typer.Option(False, "--json", help="Print trunks, head kinds and objectives as JSON."),
) -> None:
    """List the registered trunks (what --head chooses, with their context and options), the head kinds
    (what the objective puts on the trunk) and the training objectives."""
    from rich.table import Table

    from abawfeat.heads import describe_heads
    from abawfeat.train.objectives import describe_objectives
    from abawfeat.trunks import describe_trunks

    trunks, heads, objectives = describe_trunks(), describe_heads(), describe_objectives()
    if as_json:
        typer.echo(json.dumps({"trunks": trunks, "heads": heads, "objectives": objectives}, indent=2,
                              default=list))
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
