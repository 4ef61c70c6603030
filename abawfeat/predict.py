"""Predictions of a trained run in the organisers' submission format (one file per task).

``predict(run_dir, split, out)`` goes through exactly the steps ``evaluate`` scores, so a file written for
the validation split re-scores (``submission.score_submission``) to what ``abawfeat evaluate`` reports:

1. the head runs over every crop of the split (temporal heads: overlapping windows, context-weighted);
2. ``train.fill_timeline`` spreads crop outputs onto every frame 1..N with ``submission.fill_missing``
   (frames without a crop get interpolated VA values / probabilities), then the optional ``--smooth`` moving
   average (``submission.smooth``), per video;
3. ``train.decide`` turns them into the file's values: VA clipped to [-1, 1], EXPR the argmax class, AU 0/1
   with the run's thresholds tuned on validation;
4. ``submission.write_submission`` writes the exact header and a row for every frame 1..N of every video.

N per video: the annotation file (train/val) or, for test videos, the organisers' sample file; a test video
the sample file does not list is predicted up to its last crop, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abawfeat.errors import ConfigError
from abawfeat.train import (
    decide,
    fill_timeline,
    infer_rows,
    inference_weights,
    load_run,
    prepare_inference,
    run_tasks,
)


@dataclass
class PredictResult:
    files: dict[str, Path]  # task -> file written
    videos: dict[str, int]  # task -> number of videos in its file
    frames: dict[str, int]  # task -> number of rows (frames) in its file
    frames_without_crop: dict[str, int]  # task -> rows whose value came from fill_missing


def output_paths(out: str | Path, task: str) -> dict[str, Path]:
    """Where each task's file goes: ``out`` itself for a single-task run; for a multi-task run, one file per
    task next to it (``preds.txt`` -> ``preds_va.txt``, ``preds_expr.txt``, ``preds_au.txt``)."""
    out = Path(out)
    if task != "mtl":
        return {task: out}
    return {t: out.with_name(f"{out.stem}_{t}{out.suffix}") for t in run_tasks(task)}


def predict(
    run_dir: str | Path, split: str, out: str | Path, smooth: int = 0, data_root: str | Path | None = None,
    cache_path: str | Path | None = None,
) -> PredictResult:
    """Write the organisers'-format prediction file(s) of a trained run for ``split`` (val or test)."""
    from abawfeat.submission import write_submission

    if split not in ("val", "test", "train"):
        raise ConfigError(f"--split {split!r}: choose val or test")
    if smooth < 0 or (smooth > 1 and smooth % 2 == 0):
        raise ConfigError(f"--smooth {smooth}: the smoothing window must be an odd number of frames (or 0)")
    run = load_run(run_dir)
    task = run.config.task
    tasks = run_tasks(task)
    seqs, source, device, precision = prepare_inference(run, split, data_root, cache_path)
    scores, _ = infer_rows(run.head, source.batches(0), seqs.n_rows, tasks, device, precision,
                           position_weights=inference_weights(run.head, source))
    timeline = fill_timeline(seqs, scores, run.config.fill, smooth)
    _, _, has_crop = seqs.timeline_frames()

    result = PredictResult(files={}, videos={}, frames={}, frames_without_crop={})
    for t, path in output_paths(out, task).items():
        thresholds = run.au_thresholds if t == "au" else None
        rows: dict[str, np.ndarray] = {}
        n_rows = n_filled = 0
        for v, video in enumerate(seqs.videos):
            n = int(seqs.task_frames[t][v])
            if n == 0:
                continue  # not a video of this task's list
            lo = int(seqs.tl_offsets[v])
            rows[video] = decide(t, timeline[t][lo : lo + n], thresholds)
            n_rows += n
            n_filled += int((~has_crop[lo : lo + n]).sum())
        if not rows:
            raise ConfigError(f"{run.config.data}: no {split} video for task {t}")
        result.files[t] = write_submission(path, t, rows)
        result.videos[t] = len(rows)
        result.frames[t] = n_rows
        result.frames_without_crop[t] = n_filled
    return result


__all__ = ["PredictResult", "output_paths", "predict"]
