"""``abawfeat extract``: stage one, frozen encoder features for every crop into an HDF5 cache."""

from __future__ import annotations

from pathlib import Path

import typer

from abawfeat.cli import app
from abawfeat.cli._common import console, guarded
from abawfeat.cli._encoder_opts import encoder_opt_option, encoder_opts, option_flag


@app.command("extract")
@guarded
def extract(
    backbone: str = typer.Option(
        ..., "--backbone", help="Encoder, e.g. ddamfn or clip (faces), wav2vec2, hubert or wavlm (audio); "
        "`abawfeat encoders` lists them."
    ),
    data: Path = typer.Option(..., "--data", help="Aff-Wild2 root (annotations folder and crop folders)."),
    out: Path | None = typer.Option(
        None, "--out", help="Cache file. Default: cache/<data folder name>/<backbone>.h5."
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="Weights file or published name (`abawfeat encoders` lists the names)."
    ),
    random_init: bool = typer.Option(
        False, "--random-init", help="Random weights, calibrated on dataset frames: demos and tests only."
    ),
    encoder_opt: list[str] | None = encoder_opt_option(),
    layer: str | None = option_flag("--layer"),
    layers: str | None = option_flag("--layers"),
    window_ms: str | None = option_flag("--window-ms"),
    # Old spellings of encoder options, kept working (hidden): each prints what it now means.
    clip_model: str | None = typer.Option(None, "--clip-model", hidden=True),
    clip_pretrained: str | None = typer.Option(None, "--clip-pretrained", hidden=True),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", hidden=True),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 (fast) or fp16 (GPU)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Frames per forward pass. Default: 32 on CPU, 128 on a GPU."
    ),
    workers: int = typer.Option(2, "--workers", help="JPEG-decoding DataLoader processes (0: in-process)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    videos: list[str] | None = typer.Option(
        None, "--videos", help="Only these videos (repeat the option, or separate names with commas)."
    ),
    dtype: str = typer.Option("float16", "--dtype", help="Stored feature dtype: float16 or float32."),
    compile: bool | None = typer.Option(
        None, "--compile/--no-compile",
        help="torch.compile the encoder: faster after a one-off compile (docs/performance.md). "
        "Default: on for DDAMFN when the videos hold 10,000 crops or more.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of --random-init weights."),
) -> None:
    """Extract per-frame features of every video with crops (train, val, test) into one HDF5 cache.

    Face encoders read the crops; audio encoders read the source videos' audio track and pool it around each
    crop frame's timestamp (docs/audio.md).

    Resumable: re-running skips complete videos, and `kill -9` loses only the videos in flight. Runs under
    `torchrun --nproc-per-node N -m abawfeat extract ...` with the videos split across ranks."""
    from abawfeat.extract import ExtractConfig, format_summary, run_extraction
    from abawfeat.utils.dist import dist_info

    names = tuple(n.strip() for v in (videos or []) for n in v.split(",") if n.strip())
    options = encoder_opts(encoder_opt, {
        "--clip-model": ("clip_model", clip_model),
        "--clip-pretrained": ("clip_pretrained", clip_pretrained),
        "--trust-pickle": ("trust_pickle", "true" if trust_pickle else None),
    }, {"--layer": layer, "--layers": layers, "--window-ms": window_ms})
    config = ExtractConfig(
        backbone=backbone, data=data, out=out, weights=weights,
        random_init=random_init, encoder_options=options, precision=precision, batch_size=batch_size,
        workers=workers, device=device, videos=names, dtype=dtype, compile=compile, seed=seed,
    )
    result = run_extraction(config)
    if dist_info().is_main:
        for line in format_summary(result):
            console.print(line, highlight=False, soft_wrap=True)
