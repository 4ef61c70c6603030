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

from abawfeat.cli import _stage_two as st
from abawfeat.cli import app
from abawfeat.cli._common import err_console, guarded
from abawfeat.cli._encoder_opts import encoder_opt_option, encoder_opts


def _log(message: str) -> None:
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


@app.command("finetune")
@guarded
def finetune_command(
    task: st.Task = None,
    head: st.Head = "fc",
    backbone: str = typer.Option(
        "ddamfn", "--backbone", help="Encoder to fine-tune: any that declares trainable blocks, e.g. ddamfn, "
        "clip (its image tower)."
    ),
    data: st.Data = None,
    out: st.Out = None,
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
    lr: st.Lr = 1e-3,
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
    objective: st.Objective = "",
    class_weights: st.ClassWeights = "none",
    pos_weight: st.PosWeight = False,
    focal_gamma: st.FocalGamma = 2.0,
    logit_tau: st.LogitTau = 1.0,
    epochs: st.Epochs = 10,
    seed: st.Seed = 0,
    weight_decay: st.WeightDecay = 1e-4,
    batch_size: int = typer.Option(
        0, "--batch-size", help="Micro-batch: frames (fc) or windows (lstm); 0 = 32 frames, or 64 frames' "
        "worth of windows."
    ),
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
    workers: int = typer.Option(2, "--workers", help="DataLoader processes decoding crops."),
    eval_batch_size: int = typer.Option(
        64, "--eval-batch-size", help="Images per forward pass at evaluation."
    ),
    plots: st.Plots = True,
    overwrite: st.Overwrite = False,
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue this interrupted run (all options come from its config.json)."
    ),
) -> None:
    """Fine-tune an encoder together with a head, end to end from the crops (not a cache); writes a stage-two
    run directory plus the encoder's weights file, and prints validation metrics. Runs under
    `torchrun --nproc-per-node N -m abawfeat finetune ...`."""
    train = None
    if resume is None:
        st.require("--resume RUN_DIR", task=task, data=data, out=out)
        train = st.train_config(
            task=task, head=head, backbone=backbone, data=data, out=out, objective=objective,
            class_weights=class_weights, pos_weight=pos_weight, focal_gamma=focal_gamma, logit_tau=logit_tau,
            epochs=epochs, seed=seed, lr=lr,
            weight_decay=weight_decay, batch_size=batch_size, window=window, stride=stride,
            infer_stride=infer_stride, hidden=hidden, layers=layers, bidirectional=bidirectional,
            dropout=dropout, trunk_opt=trunk_opt, device=device, threads=threads, precision=precision,
            plots=plots,
        )
    run_finetune_command(
        train, resume=resume, weights=weights, random_init=random_init,
        encoder_options=encoder_opts(encoder_opt, {}), unfreeze_from=unfreeze_from, backbone_lr=backbone_lr,
        schedule=schedule, warmup=warmup, grad_accum=grad_accum, freeze_bn=freeze_bn,
        attention_diversity=attention_diversity, diversity_weight=diversity_weight, augment=augment,
        workers=workers, eval_batch_size=eval_batch_size, overwrite=overwrite,
    )


def run_finetune_command(train: Any, *, resume: Path | None, augment: bool, overwrite: bool = False,
                         **options: Any) -> None:
    """Run (or, with ``resume``, continue) a fine-tuning run from parsed options and print its metrics:
    ``train`` is the stage-two TrainConfig, ``options`` the FinetuneConfig fields."""
    from abawfeat.data.frames import AugmentConfig
    from abawfeat.finetune import FinetuneConfig, resume_finetune, run_finetune

    if resume is not None:
        _print_metrics(resume_finetune(resume, log=_log))
        return
    config = FinetuneConfig(train=train, augment=AugmentConfig(enabled=augment), **options)
    _print_metrics(run_finetune(config, overwrite=overwrite, log=_log))


def _print_metrics(run_dir: Path) -> None:
    """Metrics of a finished run, printed once (rank 0 under torchrun)."""
    from abawfeat.utils.dist import dist_info

    path = Path(run_dir) / "metrics.json"
    if dist_info().is_main and path.is_file():
        metrics = json.loads(path.read_text())
        st.print_metrics(metrics, f"{run_dir}: validation, best epoch {metrics['best_epoch']}")
