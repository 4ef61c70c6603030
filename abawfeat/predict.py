"""Predictions of a trained run in the organisers' submission format (one file per task).

``predict(run_dir, split, out)`` goes through exactly the steps ``evaluate`` scores, so a file written for
the validation split re-scores (``submission.score_submission``) to what ``abawfeat evaluate`` reports:

1. the head runs over every crop of the split (temporal trunks: overlapping windows, weighted by their
   declared context) and its scores are spread onto every frame 1..N (``train.evaluate.infer_run``);
2. the run's own smoothing (tuned with ``train-head --smooth auto``) runs per video, unless ``--smooth none``
   (raw scores) or ``--smooth W`` (a centred moving average of W frames instead);
3. each task's decision rule turns scores into the file's values (VA clipped to [-1, 1], EXPR the argmax
   class, AU 0/1 with the run's thresholds for those scores);
4. ``submission.write_submission`` writes the exact header and a row for every frame 1..N of every video.

N per video: the annotation file (train/val) or, for test videos, the organisers' sample file; a test video
the sample file does not list is predicted up to its last crop, with a warning. ``--split train`` is
supported too (to look at how a run fits its training videos), with the same thresholds.

An output never lands on an artefact: ``--out`` may not name a directory, nor any existing file that is not
a prediction file of the same task; an earlier prediction file is replaced only with ``overwrite``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abawfeat.cache import modality_of, row_words
from abawfeat.errors import ConfigError
from abawfeat.tasks import single, task_names
from abawfeat.train.evaluate import CacheOverride

SPLITS = ("val", "test", "train")


@dataclass
class PredictResult:
    files: dict[str, Path]  # task -> file written
    videos: dict[str, int]  # task -> number of videos in its file
    frames: dict[str, int]  # task -> number of rows (frames) in its file
    frames_without_crop: dict[str, int]  # task -> rows whose value came from fill_missing
    # What those frames lack, for messages: "without a crop", "without audio" (an audio cache alone) or "in no
    # cache" (fused caches of both modalities).
    missing: str = "without a crop"


def output_paths(out: str | Path, run_task: str) -> dict[str, Path]:
    """Where each task's file goes: ``out`` itself for a single-task run; for a multi-task run, one file per
    task next to it (``preds.txt`` -> ``preds_va.txt``, ``preds_expr.txt``, ``preds_au.txt``)."""
    out = Path(out)
    tasks = task_names(run_task)
    if len(tasks) == 1:
        return {tasks[0]: out}
    return {t: out.with_name(f"{out.stem}_{t}{out.suffix}") for t in tasks}


def check_output(path: Path, task_name: str, overwrite: bool) -> None:
    """Refuse an output path that would land on anything but an earlier prediction file of this task."""
    if path.is_dir():
        raise ConfigError(f"--out {path}: is a directory; --out names the submission file to write")
    if not path.exists():
        if path.parent.exists() and not path.parent.is_dir():
            raise ConfigError(f"--out {path}: {path.parent} is a file, not a folder")
        return
    if not _is_prediction_file(path, task_name):
        raise ConfigError(f"--out {path}: exists and is not a {task_name} prediction file; predict never "
                          "writes over other files (a cache, a checkpoint, a config); choose another --out")
    if not overwrite:
        raise ConfigError(f"--out {path}: exists; pass --overwrite to replace this earlier prediction file")


def _is_prediction_file(path: Path, task_name: str) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline().lstrip("\ufeff").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return first == single(task_name).submission_header


def predict(
    run_dir: str | Path, split: str, out: str | Path, smooth: str = "run",
    data_root: str | Path | None = None, cache_path: CacheOverride = None, overwrite: bool = False,
) -> PredictResult:
    """Write the organisers'-format prediction file(s) of a trained run for ``split`` (val, test or train)."""
    from abawfeat.smoothing import Filter, per_video
    from abawfeat.submission import write_submission
    from abawfeat.train.evaluate import infer_run
    from abawfeat.train.rundir import require_complete

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    smooth = str(smooth)
    window = int(smooth) if smooth.isdigit() else 0
    if smooth not in ("run", "none") and (window < 1 or window % 2 == 0):
        raise ConfigError(f"--smooth {smooth}: choose run (the run's own), none, or an odd number of frames")
    record = require_complete(run_dir)
    paths = output_paths(out, record.task)
    for t, path in paths.items():
        check_output(path, t, overwrite)
    inf = infer_run(run_dir, split, data_root, cache_path)
    seqs = inf.data
    timeline, au_thresholds = inf.decided_timeline(smooth == "run")
    if window > 1:
        timeline = {t: per_video(seqs.tl_offsets, v, Filter("mean", window)) for t, v in timeline.items()}
    _, _, has_crop = seqs.timeline_frames()

    missing = row_words(modality_of(c.get("fingerprint")) for c in record.caches).missing
    result = PredictResult(files={}, videos={}, frames={}, frames_without_crop={}, missing=missing)
    for t, path in paths.items():
        spec = single(t)
        thresholds = au_thresholds if spec.tunes_thresholds else None
        rows: dict[str, np.ndarray] = {}
        n_rows = n_filled = 0
        for v, video in enumerate(seqs.videos):
            n = int(seqs.task_frames[t][v])
            if n == 0:
                continue  # not a video of this task's list
            lo = int(seqs.tl_offsets[v])
            rows[video] = spec.decide(timeline[t][lo : lo + n], thresholds)
            n_rows += n
            n_filled += int((~has_crop[lo : lo + n]).sum())
        if not rows:
            raise ConfigError(f"{record.train.get('data')}: no {split} video for task {t}")
        result.files[t] = write_submission(path, t, rows)
        result.videos[t] = len(rows)
        result.frames[t] = n_rows
        result.frames_without_crop[t] = n_filled
    return result


__all__ = ["PredictResult", "check_output", "output_paths", "predict"]
