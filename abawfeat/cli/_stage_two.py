"""The stage-two options, declared once: ``train-head``, ``cv`` and ``finetune`` take them (Annotated
types; each command lists the ones it takes), and ``train_config`` turns their values into a
``TrainConfig`` (imported lazily, so that ``--help`` never loads torch); ``print_metrics`` shows a run's
metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

Task = Annotated[str | None, typer.Option("--task", help="va, expr, au or mtl (one head for all three).")]
Head = Annotated[str, typer.Option(
    "--head", help="Trunk: fc (frame-wise) or a temporal one: lstm, gru, transformer, tcn, mamba "
    "(`abawfeat heads`).")]
Backbone = Annotated[str, typer.Option(
    "--backbone", help="Encoder of the cache; default: the cache's own (it must match when given).")]
Data = Annotated[Path | None, typer.Option(
    "--data", help="Aff-Wild2 root (annotations, test lists, sample files).")]
Caches = Annotated[list[Path] | None, typer.Option(
    "--cache", help="Feature cache; repeat to fuse several (aligned by frame number). Default: "
    "cache/<data folder name>/<backbone or ddamfn>.h5.")]
Fusion = Annotated[str, typer.Option(
    "--fusion", help="Several caches: early (standardised features concatenated, with availability columns), "
    "late (a trunk per cache, learned gates) or attention (each cache attends to the others, masked where "
    "they lack the frame).")]
ModalityDropout = Annotated[float, typer.Option(
    "--modality-dropout", help="Several caches: probability that a training window loses a whole cache "
    "(never all of them).")]
FocalGamma = Annotated[float, typer.Option(
    "--focal-gamma", help="--objective focal: the focusing exponent gamma (0 = plain CE / BCE).")]
LogitTau = Annotated[float, typer.Option(
    "--logit-tau", help="--objective logit-adjusted: logits + tau log(class prior) in training.")]
MoeExperts = Annotated[int, typer.Option(
    "--moe-experts", help="K >= 2: a mixture-of-experts output per task (learned gate over K experts).")]
MoeBalance = Annotated[float, typer.Option(
    "--moe-balance", help="Weight of the experts' load-balance term in the loss.")]
Out = Annotated[Path | None, typer.Option("--out", help="Run directory to write.")]
Objective = Annotated[str, typer.Option(
    "--objective", help="ccc (va), ce (expr), bce (au), focal (expr, au), logit-adjusted (expr), "
    "contrastive (expr, CLIP caches), mtl. Default: the task's own.")]
ClassWeights = Annotated[str, typer.Option(
    "--class-weights", help="EXPR cross-entropy weights: none, inverse, sqrt_inverse, effective.")]
PosWeight = Annotated[bool, typer.Option("--pos-weight", help="AU BCE: weight positives by neg/pos ratio.")]
Epochs = Annotated[int, typer.Option("--epochs", help="Epochs; the best validation epoch is kept.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed (weights, dropout, window order, folds, holdout).")]
Lr = Annotated[float, typer.Option("--lr", help="AdamW learning rate (of the head).")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Windows (frames for fc) per batch; 0 = auto.")]
Window = Annotated[int, typer.Option("--window", help="Training window of temporal trunks, in frames.")]
Stride = Annotated[int, typer.Option("--stride", help="Step between training windows; 0 = --window.")]
InferStride = Annotated[int, typer.Option("--infer-stride", help="Step between inference windows; 0 = half.")]
Hidden = Annotated[int, typer.Option("--hidden", help="Trunk width; -1 = the trunk's default (fc: linear).")]
Layers = Annotated[int, typer.Option("--layers", help="Trunk depth (trunks with layers).")]
Bidirectional = Annotated[bool, typer.Option(
    "--bidirectional", help="Temporal trunks also use future frames (not causal).")]
Dropout = Annotated[float, typer.Option("--dropout", help="Dropout on trunk inputs and hidden states.")]
TrunkOpt = Annotated[list[str] | None, typer.Option(
    "--trunk-opt", help="Any other trunk option, key=value (repeatable; `abawfeat heads` lists them).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]
Threads = Annotated[int, typer.Option(
    "--threads", help="Torch CPU threads, part of the run's configuration (the numbers depend on it); 0 = "
    "this process's default (the cores: machine-dependent).")]
Precision = Annotated[str, typer.Option(
    "--precision", help="auto (bf16 for temporal trunks and contrastive heads on a device with bf16 "
    "kernels, else fp32), fp32, bf16, fp16 (CUDA).")]
Compile = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the trunk for training (faster steps for trunks of many small "
    "operations, such as mamba; the first run of a shape compiles, later runs read inductor's cache).")]
Smooth = Annotated[str, typer.Option(
    "--smooth", help="auto: tune a temporal filter per output (mean, median or gaussian) after training; "
    "none: off.")]
TuneOn = Annotated[str, typer.Option(
    "--tune-on", help="Where AU thresholds and smoothing are tuned: val (the scored split: optimistic) or "
    "holdout (held-out training videos).")]
Holdout = Annotated[float, typer.Option("--holdout", help="--tune-on holdout: share of training videos.")]
Plots = Annotated[bool, typer.Option("--plots/--no-plots", help="Write plots/*.png at the end.")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Replace the run in --out, once the new one is complete.")]


def train_config(*, trunk_opt: list[str] | None = None, cache: list[Path] | None = None,
                 data: Path | None = None, out: Path | None = None, **values: Any) -> Any:
    """A ``TrainConfig`` from the parsed option values (names as ``TrainConfig``'s fields)."""
    from abawfeat.cli._common import parse_key_values
    from abawfeat.train import TrainConfig

    return TrainConfig(data=str(data) if data else "", out=str(out) if out else "",
                       cache=tuple(str(c) for c in cache or ()),
                       trunk_opts=parse_key_values(trunk_opt or [], "--trunk-opt"), **values)


def require(unless: str = "", **values: Any) -> None:
    """One line naming the required options that were not given."""
    from abawfeat.errors import ConfigError

    missing = [f"--{name.replace('_', '-')}" for name, value in values.items() if value is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required" + (f" (unless {unless})" if unless else ""))


def print_metrics(metrics: dict[str, Any], title: str) -> None:
    """A run's metrics as one table (the tasks' metrics, per-item groups, unsmoothed scores, the smoothing),
    and the note when they were tuned on the frames they are scored on."""
    from rich.table import Table
    from rich.text import Text

    from abawfeat.cli._common import console, err_console
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
    raw = metrics.get("unsmoothed") or {}
    for key in main:
        if key in raw:
            table.add_row(f"{key} (unsmoothed)", f"{raw[key]:.4f}")
    if "smoothing" in metrics:
        table.add_row("smoothing", Text(json.dumps({k: v for k, v in metrics["smoothing"].items()
                                                    if k != "tuned_on"})))
    console.print(table)
    from abawfeat.train.finish import optimistic_note

    note = optimistic_note(metrics)
    if note:
        err_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
