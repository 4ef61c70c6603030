"""``abawfeat finetune``: an encoder and a stage-two head trained end to end from the crops.

Parses options, builds a ``FinetuneConfig`` and calls ``abawfeat.finetune.run_finetune`` (or
``resume_finetune``); docs/finetune.md. The old spelling ``abawfeat train-head --unfreeze ...`` reaches
``run_finetune_command`` from cli/train.py with the same values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from abawfeat.cli import app
from abawfeat.cli._common import err_console, guarded
from abawfeat.cli._encoder_opts import encoder_opt_option, encoder_opts


def _log(message: str) -> None:
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


@app.command("finetune")
@guarded
def finetune_command(
    task: str | None = typer.Option(None, "--task", help="va, expr, au or mtl (one head for all three)."),
    head: str = typer.Option("fc", "--head", help="fc (frame-wise) or lstm (temporal, windows of crops)."),
    backbone: str = typer.Option(
        "ddamfn", "--backbone", help="Encoder to fine-tune: any that declares trainable blocks, e.g. ddamfn, "
        "clip (its image tower)."
    ),
    data: Path | None = typer.Option(None, "--data", help="Aff-Wild2 root (annotations and crop folders)."),
    out: Path | None = typer.Option(None, "--out", help="Run directory to write."),
    weights: str | None = typer.Option(
        None, "--weights", help="Starting weights: a file or a published name (default: the encoder's)."
    ),
    random_init: bool = typer.Option(
        False, "--random-init", help="Seeded random weights, calibrated where needed (demo, tests)."
    ),
    encoder_opt: list[str] | None = encoder_opt_option(),
    unfreeze_from: str | None = typer.Option(
        None, "--unfreeze-from", help="First trainable block of the encoder (name or index; e.g. DDAMFN "
        "conv_5, CLIP block11); earlier blocks stay frozen. Default: the first (the whole encoder)."
    ),
    backbone_lr: float = typer.Option(1e-4, "--backbone-lr", help="AdamW learning rate of the encoder."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate of the head."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine or constant, per optimiser step."),
    warmup: float = typer.Option(0.05, "--warmup", help="Fraction of the steps with a linear warm-up."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimiser step."),
    freeze_bn: bool = typer.Option(False, "--freeze-bn", help="Keep batch-norm statistics (affine learns)."),
    attention_diversity: bool = typer.Option(
        False, "--attention-diversity", help="Add the attention-diversity loss (encoders with attention "
        "heads: DDAMFN)."
    ),
    diversity_weight: float = typer.Option(0.1, "--diversity-weight", help="Weight of that loss."),
    augment: bool = typer.Option(
        True, "--augment/--no-augment", help="Flip, colour jitter, small affine (training only)."
    ),
    objective: str = typer.Option("", "--objective", help="ccc (va), ce (expr), bce (au), mtl. Default: the "
                                  "task's own."),
    class_weights: str = typer.Option(
        "none", "--class-weights", help="EXPR cross-entropy weights: none, inverse, sqrt_inverse, effective."
    ),
    pos_weight: bool = typer.Option(False, "--pos-weight", help="AU BCE: weight positives by neg/pos ratio."),
    epochs: int = typer.Option(10, "--epochs", help="Epochs; the best validation epoch is kept."),
    seed: int = typer.Option(0, "--seed", help="Seed (head and --random-init weights, dropout, order)."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="AdamW weight decay."),
    batch_size: int = typer.Option(
        0, "--batch-size", help="Micro-batch: frames (fc) or windows (lstm); 0 = 32 frames, or 64 frames' "
        "worth of windows."
    ),
    window: int = typer.Option(64, "--window", help="LSTM training window length in frames."),
    stride: int = typer.Option(0, "--stride", help="Step between training windows; 0 = --window."),
    infer_stride: int = typer.Option(0, "--infer-stride", help="Step between inference windows; 0 = half."),
    hidden: int = typer.Option(-1, "--hidden", help="Hidden size; -1 = head default (fc: no hidden layer)."),
    layers: int = typer.Option(1, "--layers", help="LSTM layers."),
    bidirectional: bool = typer.Option(False, "--bidirectional", help="Bidirectional LSTM."),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout on head inputs and hidden states."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto (bf16 for LSTM heads), fp32, bf16, fp16 (CUDA)."
    ),
    workers: int = typer.Option(2, "--workers", help="DataLoader processes decoding crops."),
    eval_batch_size: int = typer.Option(
        64, "--eval-batch-size", help="Images per forward pass at evaluation."
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write plots/*.png at the end."),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue this interrupted run (all options come from its config.json)."
    ),
) -> None:
    """Fine-tune an encoder together with a head, end to end from the crops (not a cache); writes a stage-two
    run directory plus the encoder's weights file, and prints validation metrics. Runs under
    `torchrun --nproc-per-node N -m abawfeat finetune ...`."""
    from abawfeat.train import TrainConfig

    train = None
    if resume is None:
        from abawfeat.errors import ConfigError

        required = (("--task", task), ("--data", data), ("--out", out))
        missing = [flag for flag, value in required if value is None]
        if missing:
            raise ConfigError(f"{', '.join(missing)} required (unless --resume RUN_DIR)")
        train = TrainConfig(
            task=task, head=head, backbone=backbone, data=str(data), out=str(out), objective=objective,
            class_weights=class_weights, pos_weight=pos_weight, epochs=epochs, seed=seed, lr=lr,
            weight_decay=weight_decay, batch_size=batch_size, window=window, stride=stride,
            infer_stride=infer_stride, hidden=hidden, layers=layers, bidirectional=bidirectional,
            dropout=dropout, device=device, precision=precision, plots=plots,
        )
    run_finetune_command(
        train, resume=resume, weights=weights, random_init=random_init,
        encoder_options=encoder_opts(encoder_opt, {}), unfreeze_from=unfreeze_from, backbone_lr=backbone_lr,
        schedule=schedule, warmup=warmup, grad_accum=grad_accum, freeze_bn=freeze_bn,
        attention_diversity=attention_diversity, diversity_weight=diversity_weight, augment=augment,
        workers=workers, eval_batch_size=eval_batch_size,
    )


def run_finetune_command(train: Any, *, resume: Path | None, augment: bool, **options: Any) -> None:
    """Run (or, with ``resume``, continue) a fine-tuning run from parsed options and print its metrics:
    ``train`` is the stage-two TrainConfig, ``options`` the FinetuneConfig fields."""
    from abawfeat.data.frames import AugmentConfig
    from abawfeat.finetune import FinetuneConfig, resume_finetune, run_finetune

    if resume is not None:
        _print_metrics(resume_finetune(resume, log=_log))
        return
    config = FinetuneConfig(train=train, augment=AugmentConfig(enabled=augment), **options)
    _print_metrics(run_finetune(config, log=_log))


def _print_metrics(run_dir: Path) -> None:
    """Metrics of a finished run, printed once (rank 0 under torchrun)."""
    from abawfeat.cli.train import _print_metrics as print_table
    from abawfeat.utils.dist import dist_info

    path = Path(run_dir) / "metrics.json"
    if dist_info().is_main and path.is_file():
        metrics = json.loads(path.read_text())
        print_table(metrics, f"{run_dir}: validation, best epoch {metrics['best_epoch']}")
