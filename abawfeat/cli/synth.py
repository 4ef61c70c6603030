"""``abawfeat synth``: write the learnable demo dataset (abawfeat/data/synth.py) in the release's layout."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer

from abawfeat.cli import app
from abawfeat.cli._common import console, guarded


@app.command("synth")
@guarded
def synth(
    out: Path = typer.Option(..., "--out", help="Directory to create (must be new, empty or a synth tree)."),
    videos: int = typer.Option(24, "--videos", min=3, help="Videos in all, counting each half of a "
                               "_left/_right pair and the test videos."),
    frames: int = typer.Option(300, "--frames", min=10, help="Mean frames per video."),
    seed: int = typer.Option(0, "--seed", min=0, help="Same seed and options -> byte-identical tree."),
    workers: int = typer.Option(0, "--workers", min=0,
                                help="Render processes; 0 = one per CPU core. Does not change the output."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary rows as JSON on stdout."),
    videos_with_audio: bool = typer.Option(
        False, "--videos-with-audio", help="Also write the source videos (.mp4/.avi) with a voice that "
        "follows valence and arousal: the input of the audio encoders (docs/audio.md)."),
) -> None:
    """Render a synthetic Aff-Wild2 tree (annotations, 112 x 112 crops, test lists, sample files) whose
    faces are driven by their labels, with the release's quirks at known rates; writes
    synth_manifest.json with the expected `abawfeat data summary` counts."""
    from abawfeat.data.synth import SynthConfig, generate
    from abawfeat.utils.progress import make_progress

    cfg = SynthConfig(videos=videos, frames=frames, seed=seed, videos_with_audio=videos_with_audio)
    cfg.validate()
    n_workers = workers or (os.cpu_count() or 1)
    start = time.perf_counter()
    with make_progress("crops") as progress:
        task = progress.add_task("rendering", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        manifest = generate(cfg, out, workers=n_workers, on_progress=on_progress)
    seconds = time.perf_counter() - start
    if as_json:
        typer.echo(json.dumps(manifest["summary"], indent=2))
        return
    crops = sum(v["crops"] for v in manifest["videos"])
    sources = manifest.get("sources", [])
    with_sources = f", {len(sources)} source videos" if sources else ""
    console.print(f"wrote {out}: {len(manifest['videos'])} videos, {crops:,} crops{with_sources} in "
                  f"{seconds:.1f} s", highlight=False, soft_wrap=True)
    console.print(f"{'task':<5} {'split':<6} {'videos':>6} {'frames':>9} {'valid':>9} {'usable':>9}",
                  highlight=False)
    for row in manifest["summary"]:
        console.print(f"{row['task']:<5} {row['split']:<6} {row['videos']:>6} {row['frames']:>9,} "
                      f"{row['valid_frames']:>9,} {row['usable_frames']:>9,}", highlight=False)
