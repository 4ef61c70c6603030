"""What follows the choice of the best epoch: decision thresholds and smoothing tuned on the tuning frames,
and the final metrics a run reports (``metrics.json``, ``evaluate``).

The tuning frames are the validation split itself (``--tune-on val``, the seed paper's F1_AUopt: the score
is then optimistic, since it is measured where it was tuned) or a held-out part of the training videos
(``--tune-on holdout``, taken out of training before it starts: an honest validation score). Smoothing
(``--smooth auto``) is tuned on the same frames; the AU thresholds are then those of the smoothed scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from abawfeat.data.sequences import SequenceSet
from abawfeat.errors import ConfigError
from abawfeat.smoothing import SMOOTHING_FILE, Smoothing, tune
from abawfeat.tasks import single
from abawfeat.train.inference import score_timeline
from abawfeat.utils.io import write_json

TUNE_ON = ("val", "holdout")
# Shown beside numbers tuned on the frames they score.
def optimistic_note(metrics: Mapping[str, Any]) -> str | None:
    """The line shown beside metrics tuned on the frames they are scored on (None when they are not)."""
    if metrics.get("tuned_on") != "val":
        return None
    what = "AU thresholds and smoothing are" if "smoothing" in metrics else (
        "AU thresholds are" if "f1_au_opt" in metrics else "smoothing is")
    return (f"{what} tuned on the validation frames they are scored on, which flatters the score; "
            "--tune-on holdout tunes on held-out training videos instead")


def read_timeline(path: Path, data: SequenceSet, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """The scores val_outputs.npz holds for ``data``'s timeline (the best epoch's)."""
    with np.load(path) as npz:
        out = {t: np.asarray(npz[single(t).outputs_key], dtype=np.float32) for t in tasks}
    for t, scores in out.items():
        if len(scores) != data.n_timeline:
            raise ConfigError(f"{path}: {len(scores)} {t} frames, the split has {data.n_timeline}")
    return out


def tune_decisions(
    data: SequenceSet, timeline: Mapping[str, np.ndarray], run_task: str, smooth: bool, tuned_on: str,
    holdout: Sequence[str] = (),
) -> tuple[np.ndarray | None, Smoothing | None]:
    """AU thresholds (for the raw scores) and, if ``smooth``, a smoothing with its own thresholds, tuned
    on the labelled frames of ``data``."""
    _, thresholds = score_timeline(data, timeline, None, run_task)
    smoothing = None
    if smooth:
        smoothing = tune(data.tl_offsets, timeline, data.labels, data.valid, tuned_on=tuned_on)
        smoothing.holdout_videos = list(holdout)
    return thresholds, smoothing


def final_metrics(
    data: SequenceSet, timeline: Mapping[str, np.ndarray], run_task: str, au_thresholds: np.ndarray | None,
    smoothing: Smoothing | None = None, tuned_on: str = "val",
) -> dict[str, Any]:
    """The metrics a run reports on ``data``: with its smoothing (if any) under the usual keys, the raw
    scores' under ``unsmoothed``, the smoothing under ``smoothing``. ``tuned_on`` says where thresholds and
    smoothing were tuned, when the run has any ("val" on the validation split: optimistic there)."""
    raw, _ = score_timeline(data, timeline, au_thresholds, run_task)
    tuned = au_thresholds is not None or smoothing is not None
    if smoothing is None:
        return {**raw, "tuned_on": tuned_on} if tuned else raw
    thresholds = None if smoothing.au_thresholds is None else np.asarray(smoothing.au_thresholds)
    smoothed, _ = score_timeline(data, smoothing.apply(data.tl_offsets, timeline), thresholds, run_task)
    return {**smoothed, "unsmoothed": raw, "smoothing": smoothing.describe(), "tuned_on": tuned_on}


def summarize_folds(folds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A cross-validation run's metrics: each scalar metric's mean over the folds (under its usual key), its
    spread (sample standard deviation) under ``spread`` and the folds' own values under ``folds``."""
    import polars as pl

    keys = [k for k, v in folds[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k != "best_epoch" and all(isinstance(f.get(k), (int, float)) for f in folds)]
    frame = pl.DataFrame({k: [float(f[k]) for f in folds] for k in keys})
    means = frame.mean().row(0, named=True)
    spreads = frame.std(ddof=1).row(0, named=True) if len(folds) > 1 else dict.fromkeys(keys, 0.0)
    return {**{k: float(means[k]) for k in keys}, "spread": {k: float(spreads[k]) for k in keys},
            "folds": [{k: float(f[k]) for k in keys} for f in folds]}


def write_smoothing(run_dir: Path, smoothing: Smoothing | None) -> None:
    if smoothing is not None:
        write_json(run_dir / SMOOTHING_FILE, smoothing.to_json())


def read_smoothing(run_dir: str | Path) -> Smoothing | None:
    path = Path(run_dir) / SMOOTHING_FILE
    if not path.is_file():
        return None
    import json

    from abawfeat.errors import RunError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RunError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise RunError(f"{path}: not a smoothing record (not UTF-8 text)") from None
    except ValueError as exc:
        raise RunError(f"{path}: not a smoothing record (not valid JSON: {exc})") from None
    try:
        return Smoothing.from_json(data)
    except ValueError as exc:
        raise RunError(f"{path}: not a smoothing record ({exc})") from None


__all__ = ["TUNE_ON", "final_metrics", "optimistic_note", "read_smoothing", "read_timeline",
           "summarize_folds", "tune_decisions", "write_smoothing"]
