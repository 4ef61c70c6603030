"""Test-submission files in the organisers' format, and the helpers that turn per-crop outputs into them.

Format (docs: /work/shared/abaw-data.md, "Test submission"): one file per task; first line the header
the task's ``submission_header``; then one row per frame ``<video>/<NNNNN>.jpg,<values>`` for every frame
1..N of every video, whether or not the frame has a face crop.

- VA: two floats in [-1, 1]; EXPR: ONE class index 0..7 (despite the eight-name header); AU: twelve 0/1.
  Each task declares its header, value format and checks (``abawfeat.tasks``); this module is generic.

Frames without a crop still need a prediction because the official metric counts every annotated frame;
``fill_missing`` provides one from the neighbouring crops (temporal smoothing is ``abawfeat.smoothing``).
``read_submission`` validates a file strictly so a user can check it before
uploading, and ``score_submission`` recomputes the official metric from a file, independently of training.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from abawfeat.errors import ConfigError, DataError
from abawfeat.tasks import Task, single, single_tasks
from abawfeat.utils.io import atomic_write

FILL_METHODS = ("interpolate", "nearest", "previous")
# `<video>/<frame>.jpg`; a video name is anything without a slash, comma or whitespace.
_LOCATION = re.compile(r"^([^/,\s]+)/(\d+)\.jpg$")


def valid_video_name(video: str) -> bool:
    """Whether ``video`` can appear in a submission row's image location."""
    return bool(_LOCATION.match(f"{video}/00001.jpg"))


def _check_task(task: str) -> Task:
    try:
        return single(task)
    except ConfigError:
        names = ", ".join(t.name for t in single_tasks())
        raise ConfigError(f"unknown task {task!r} for a submission file; choose one of {names}") from None


# --------------------------------------------------------------------------------------------------------
# filling


def fill_missing(
    frames_with_crop: np.ndarray,
    values: np.ndarray,
    n_frames: int,
    method: str = "interpolate",
) -> np.ndarray:
    """Spread per-crop outputs onto every frame 1..``n_frames`` of a video.

    ``frames_with_crop`` int [T]: 1-based frame numbers that have a crop, strictly increasing; ``values``
    [T, K] (or [T]) the outputs for those frames. Returns [n_frames, K] (or [n_frames]), row i = frame i + 1.
    Crops past ``n_frames`` (some crop folders run beyond the annotation file) are ignored.

    - ``interpolate`` (continuous outputs: VA, probabilities): linear between the two neighbouring crops;
      leading and trailing gaps take the first / last crop's value (there is nothing to interpolate
      towards). Integer inputs are refused: interpolating class indices makes no sense; interpolate the
      probabilities and then take the argmax or threshold.
    - ``nearest``: the value of the closest crop; a frame exactly halfway takes the earlier crop.
    - ``previous``: forward fill (what a causal system would do); a leading gap takes the first crop.

    ``nearest`` and ``previous`` keep the input dtype; ``interpolate`` returns float64.
    """
    if method not in FILL_METHODS:
        raise ConfigError(f"unknown fill method {method!r}; choose one of {', '.join(FILL_METHODS)}")
    frames = np.asarray(frames_with_crop).reshape(-1)
    vals = np.asarray(values)
    squeeze = vals.ndim == 1
    if squeeze:
        vals = vals[:, None]
    if vals.ndim != 2 or len(vals) != len(frames):
        raise ValueError(f"fill_missing: {len(frames)} frame numbers for values of shape {np.shape(values)}")
    if frames.dtype.kind not in "iu":
        raise ValueError(f"fill_missing: frame numbers must be integers, got dtype {frames.dtype}")
    if n_frames < 1:
        raise ValueError(f"fill_missing: n_frames must be at least 1, got {n_frames}")
    if frames.size and (frames.min() < 1 or np.any(np.diff(frames) <= 0)):
        raise ValueError("fill_missing: frame numbers must be 1-based and strictly increasing")
    keep = frames <= n_frames
    frames, vals = frames[keep].astype(np.int64), vals[keep]
    if frames.size == 0:
        raise ValueError("fill_missing: the video has no crop within its frames; nothing to fill from")
    target = np.arange(1, n_frames + 1, dtype=np.int64)

    if method == "interpolate":
        if vals.dtype.kind not in "fc":
            raise ValueError(
                "fill_missing: 'interpolate' needs continuous values (interpolate probabilities, then "
                "argmax/threshold); use 'nearest' or 'previous' for class indices or 0/1 decisions"
            )
        out = np.empty((n_frames, vals.shape[1]), dtype=np.float64)
        for k in range(vals.shape[1]):
            # np.interp holds the end values constant outside [first crop, last crop].
            out[:, k] = np.interp(target, frames, vals[:, k].astype(np.float64))
    else:
        # Index of the last crop at or before each frame (-1 if none yet).
        prev = np.searchsorted(frames, target, side="right") - 1
        if method == "previous":
            idx = np.maximum(prev, 0)
        else:
            nxt = np.minimum(prev + 1, frames.size - 1)
            prev_c = np.maximum(prev, 0)
            d_prev = np.where(prev >= 0, target - frames[prev_c], np.iinfo(np.int64).max)
            d_next = np.abs(frames[nxt] - target)
            idx = np.where(d_prev <= d_next, prev_c, nxt)
        out = vals[idx]
    return out[:, 0] if squeeze else out


# --------------------------------------------------------------------------------------------------------
# writing


def _check_rows(spec: Task, video: str, arr: np.ndarray) -> np.ndarray:
    """Validate one video's outputs and convert them to what the file holds (failure = bug in the caller)."""
    if not valid_video_name(video):
        raise ValueError(f"write_submission: video name {video!r} cannot appear in a submission row")
    a = np.asarray(arr)
    one = spec.submission_values == 1
    if one and a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    want = "[N]" if one else f"[N, {spec.submission_values}]"
    ok_shape = a.ndim == 1 if one else (a.ndim == 2 and a.shape[1] == spec.submission_values)
    if not ok_shape or len(a) == 0:
        raise ValueError(
            f"write_submission: {spec.name} rows of video {video!r} have shape {a.shape}, expected {want}"
        )
    return spec.check_decisions(video, a)


def write_submission(path: str | Path, task: str, rows: Mapping[str, np.ndarray]) -> Path:
    """Write one task's submission file atomically (temporary file in the same folder, then rename).

    ``rows`` maps each video to its outputs for frames 1..N: VA float [N, 2] (clipped to [-1, 1], written
    with 6 decimals), EXPR int [N] class indices, AU 0/1 [N, 12]. Videos are written in sorted order.
    Returns the path written.
    """
    spec = _check_task(task)
    if not rows:
        raise ValueError("write_submission: no video to write")
    checked = {video: _check_rows(spec, video, rows[video]) for video in sorted(rows)}

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(spec.submission_header + "\n")
            for video, a in checked.items():
                body = [f"{video}/{i:05d}.jpg,{values}" for i, values in enumerate(spec.format_rows(a), 1)]
                fh.write("\n".join(body))
                fh.write("\n")

    return atomic_write(path, write)


# --------------------------------------------------------------------------------------------------------
# reading and checking


def _lines(path: Path) -> list[str]:
    """The file's lines without line terminators (\\n, \\r\\n or \\r alike); a missing file is a DataError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc.reason})") from None
    return text.splitlines()


def read_submission(path: str | Path, task: str) -> dict[str, np.ndarray]:
    """Read and strictly validate a submission file; returns ``{video: outputs}`` in file order.

    Outputs: VA float64 [N, 2], EXPR int64 [N], AU int8 [N, 12]. Raises ``DataError(path, problem, line)``
    (line 1-based, header = line 1) on: a header other than the task's ``submission_header``, a wrong
    number of columns, an image location not of the form ``<video>/<NNNNN>.jpg``, a video whose rows are not
    contiguous or whose frames are not 1, 2, ..., N in order, a non-numeric or out-of-range value (VA outside
    [-1, 1] or not finite, EXPR not an integer 0..7, AU not 0 or 1), a blank line other than at the very end,
    or a file without rows. Line endings may be LF or CRLF.
    """
    spec = _check_task(task)
    path = Path(path)
    lines = _lines(path)
    # A trailing blank line is harmless (final newline written twice); blank lines elsewhere are not.
    while lines and lines[-1].strip() == "":
        lines.pop()
    if not lines:
        raise DataError(path, "empty file (expected a header line)", 1)
    header = lines[0].lstrip("\ufeff")
    if header != spec.submission_header:
        raise DataError(path, f"header is {header!r}, expected {spec.submission_header!r}", 1)
    if len(lines) == 1:
        raise DataError(path, "no prediction rows after the header", 1)
    n_cols = 1 + spec.submission_values
    out: dict[str, list[Any]] = {}
    current: str | None = None
    expected_frame = 1
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split(",")
        if len(parts) != n_cols:
            raise DataError(path, f"{len(parts)} columns, expected {n_cols} for task {task}", lineno)
        m = _LOCATION.match(parts[0])
        if not m:
            raise DataError(
                path, f"image location {parts[0]!r} is not of the form <video>/<NNNNN>.jpg", lineno
            )
        video, frame = m.group(1), int(m.group(2))
        if video != current:
            if video in out:
                raise DataError(path, f"rows of video {video!r} are not contiguous", lineno)
            current, expected_frame = video, 1
            out[video] = []
        if frame != expected_frame:
            raise DataError(
                path, f"video {video!r}: frame {frame} where frame {expected_frame} was expected", lineno
            )
        expected_frame += 1
        out[video].append(spec.parse_values(path, parts[1:], lineno))
    return {v: spec.stack_rows(r) for v, r in out.items()}


def check_against_sample(
    path: str | Path, sample_path: str | Path, task: str | None = None
) -> dict[str, int]:
    """Check that a submission covers every (video, frame) listed in the organisers' sample file.

    ``path`` is first validated with ``read_submission``. ``task`` defaults to the one whose header the
    sample file carries. Only the sample's first column is read, so its values (if any) do not matter.
    Raises ``DataError`` naming the first missing frame and how many are missing; returns counts
    ``{"videos", "frames", "extra_videos"}`` (extra videos are present in the submission but not in the
    sample; they are allowed, the organisers only score the listed frames).
    """
    sample_path = Path(sample_path)
    lines = _lines(sample_path)
    if not lines:
        raise DataError(sample_path, "empty sample file", 1)
    header = lines[0].lstrip("\ufeff").strip()
    if task is None:
        matches = [t.name for t in single_tasks() if t.submission_header == header]
        if not matches:
            raise DataError(sample_path, f"header {header!r} is not a submission header; pass task=", 1)
        task = matches[0]
    _check_task(task)
    submitted = read_submission(path, task)
    n_sub = {v: len(a) for v, a in submitted.items()}
    missing = 0
    first: str | None = None
    frames = 0
    sample_videos: set[str] = set()
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        loc = line.split(",", 1)[0].strip()
        m = _LOCATION.match(loc)
        if not m:
            raise DataError(
                sample_path, f"image location {loc!r} is not of the form <video>/<NNNNN>.jpg", lineno
            )
        video, frame = m.group(1), int(m.group(2))
        sample_videos.add(video)
        frames += 1
        # Submission frames are contiguous from 1 (read_submission checked), so presence is frame <= N.
        if frame < 1 or frame > n_sub.get(video, 0):
            missing += 1
            if first is None:
                first = f"{loc} (sample line {lineno})"
    if missing:
        raise DataError(
            path, f"{missing} frame(s) of the sample file {sample_path} are missing, first {first}"
        )
    return {
        "videos": len(sample_videos),
        "frames": frames,
        "extra_videos": len(set(submitted) - sample_videos),
    }


# --------------------------------------------------------------------------------------------------------
# scoring


def _labels_valid(ann: Any) -> tuple[np.ndarray, np.ndarray]:
    """(labels, valid) from a tuple or from an object with ``labels`` and ``valid`` (``data.Annotation``)."""
    if hasattr(ann, "labels") and hasattr(ann, "valid"):
        return np.asarray(ann.labels), np.asarray(ann.valid, dtype=bool)
    labels, valid = ann
    return np.asarray(labels), np.asarray(valid, dtype=bool)


def score_submission(pred_path: str | Path, task: str, annotations: Mapping[str, Any]) -> dict[str, Any]:
    """Recompute the official metric of a submission file against annotations.

    ``annotations`` maps video -> ``(labels, valid)`` (or an ``Annotation``), row i = frame i + 1. Every
    annotated video must be in the file with at least as many frames as annotation rows; frames beyond them
    and videos without annotation are ignored. Scores pool all valid frames of all videos (sorted order).
    Returns the task's metrics dict (``Task.decision_metrics``) plus ``n_frames``.
    """
    spec = _check_task(task)
    pred_path = Path(pred_path)
    if not annotations:
        raise ValueError("score_submission: no annotations to score against")
    preds = read_submission(pred_path, task)
    all_pred, all_label = [], []
    for video in sorted(annotations):
        labels, valid = _labels_valid(annotations[video])
        if video not in preds:
            raise DataError(pred_path, f"annotated video {video!r} has no prediction rows")
        p = preds[video]
        if len(p) < len(labels):
            raise DataError(
                pred_path, f"video {video!r} has {len(p)} prediction rows for {len(labels)} annotated frames"
            )
        all_pred.append(p[: len(labels)][valid])
        all_label.append(labels[valid])
    pred = np.concatenate(all_pred)
    label = np.concatenate(all_label)
    result = spec.decision_metrics(pred, label)
    result["n_frames"] = len(label)
    return result
