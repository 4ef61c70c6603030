"""Temporal smoothing of a run's scores, tuned on held-out predictions and stored with the run.

Predictions made frame by frame jitter where labels do not: valence and arousal drift over seconds, AUs and
expressions hold for half a second to seconds. A filter along time, per video, removes the jitter; how
much to smooth depends on the task and the output, so it is tuned:

- filters: ``mean`` (centred moving average), ``median`` (robust to single-frame spikes) and ``gaussian``;
- one choice per output for tasks whose outputs are independent (each valence / arousal dimension, each
  AU), one for all outputs of a task whose outputs must stay comparable (the EXPR class probabilities);
- each choice maximises that output's own metric on the tuning frames (CCC of the dimension; F1 of the AU
  at its best threshold; macro F1 of the expressions), ties going to less smoothing; AU thresholds are then
  tuned again on the smoothed scores.

Filters run on the scores of every frame of the timeline (crop or not), never across a video boundary, and
before decisions (VA clipping, EXPR argmax, AU thresholds). Tuning on the split that is then scored makes
the score optimistic, as tuning AU thresholds there does; ``train-head --tune-on holdout`` tunes both on a
held-out part of the training videos instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from abawfeat.errors import ConfigError
from abawfeat.tasks import single, single_task_names

FILTERS = ("mean", "median", "gaussian")
# Windows tried when tuning, in frames (odd). Median filters cost O(window) per frame, so they stop at the
# short windows they are for (removing spikes); long windows are the mean's and the gaussian's.
CANDIDATES: dict[str, tuple[int, ...]] = {
    "mean": (3, 5, 9, 15, 25, 41, 65, 101),
    "gaussian": (3, 5, 9, 15, 25, 41, 65, 101),
    "median": (3, 5, 9, 15),
}
SMOOTHING_FILE = "smoothing.json"


@dataclass(frozen=True)
class Filter:
    """One filter along time: ``window`` frames (odd); 1 = no smoothing. The gaussian's window is six of
    its standard deviations (it is cut at three on either side)."""

    name: str = "mean"
    window: int = 1

    def __post_init__(self) -> None:
        if self.name not in FILTERS:
            raise ConfigError(f"smoothing filter {self.name!r}: choose one of {', '.join(FILTERS)}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1 \
                or self.window % 2 == 0:
            raise ConfigError(f"smoothing window must be a positive odd number of frames, got "
                              f"{self.window!r}")

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """One video's scores [N, K] (or [N]) filtered along axis 0; float64."""
        x = np.asarray(values, dtype=np.float64)
        if self.window == 1 or len(x) <= 1:
            return x.copy()
        if self.name == "mean":
            return moving_average(x, self.window)
        from scipy import ndimage

        if self.name == "gaussian":
            return ndimage.gaussian_filter1d(x, sigma=self.window / 6.0, axis=0, mode="nearest", truncate=3.0)
        size = (self.window,) + (1,) * (x.ndim - 1)
        return ndimage.median_filter(x, size=size, mode="nearest")

    def as_dict(self) -> dict[str, Any]:
        return {"filter": self.name, "window": self.window}


NONE = Filter("mean", 1)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average along axis 0 of one video's outputs [N, K] (or [N]); returns float64.

    ``window`` is odd; 1 returns a copy. Near the ends the window is cut at the video's first / last frame
    and the average runs over the frames that exist, so edges are not pulled toward zero as zero padding
    would do. Apply per video, never across a video boundary.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1 or window % 2 == 0:
        raise ConfigError(f"smoothing window must be a positive odd integer, got {window!r}")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (1, 2):
        raise ValueError(f"smooth: expected [N] or [N, K] values, got shape {x.shape}")
    n = x.shape[0]
    if window == 1 or n == 0:
        return x.copy()
    half = window // 2
    csum = np.concatenate([np.zeros((1,) + x.shape[1:]), np.cumsum(x, axis=0)], axis=0)
    i = np.arange(n)
    lo = np.maximum(i - half, 0)
    hi = np.minimum(i + half + 1, n)
    count = (hi - lo).reshape((n,) + (1,) * (x.ndim - 1))
    return (csum[hi] - csum[lo]) / count


def per_video(offsets: np.ndarray, values: np.ndarray, f: Filter) -> np.ndarray:
    """``f`` applied to each video's segment ``values[offsets[v]:offsets[v + 1]]``."""
    out = np.empty(values.shape, dtype=np.float64)
    for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
        out[lo:hi] = f(values[lo:hi])
    return out


@dataclass
class Smoothing:
    """The smoothing a run applies before its decisions: per task, one filter per output group."""

    filters: dict[str, list[Filter]] = field(default_factory=dict)
    au_thresholds: list[float] | None = None  # tuned on the smoothed scores
    tuned_on: str = "val"  # the frames it was tuned on: "val" (then scored there: optimistic) or "holdout"
    holdout_videos: list[str] = field(default_factory=list)

    def groups(self, task_name: str) -> list[list[int]]:
        spec = single(task_name)
        return [[j] for j in range(spec.width)] if spec.smooth_per_column else [list(range(spec.width))]

    def apply(self, offsets: np.ndarray, timeline: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for t, scores in timeline.items():
            filters = self.filters.get(t)
            if not filters:
                out[t] = np.asarray(scores, dtype=np.float64)
                continue
            smoothed = np.empty(scores.shape, dtype=np.float64)
            for cols, f in zip(self.groups(t), filters, strict=True):
                smoothed[:, cols] = per_video(offsets, scores[:, cols], f)
            out[t] = smoothed
        return out

    def to_json(self) -> dict[str, Any]:
        return {"filters": {t: [f.as_dict() for f in fs] for t, fs in self.filters.items()},
                "au_thresholds": self.au_thresholds, "tuned_on": self.tuned_on,
                "holdout_videos": list(self.holdout_videos)}

    @classmethod
    def from_json(cls, data: Any) -> Smoothing:
        """The smoothing ``to_json`` wrote; ValueError saying what is wrong for anything else (a smoothing
        silently read as none would report unsmoothed scores as the run's)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("filters"), Mapping):
            raise ValueError("expected a JSON object with 'filters' (per task, one filter per output group)")
        filters: dict[str, list[Filter]] = {}
        for t, fs in data["filters"].items():
            if t not in single_task_names():
                raise ValueError(f"filters for {t!r}, which is not a task")
            groups = len(cls().groups(t))
            if not isinstance(fs, list) or len(fs) != groups or not all(isinstance(d, Mapping) for d in fs):
                raise ValueError(f"{t}: expected a list of {groups} filter(s), got {fs!r}")
            try:
                filters[t] = [Filter(str(d["filter"]), d["window"]) for d in fs]
            except KeyError as exc:
                raise ValueError(f"{t}: a filter without {exc}") from None
            except ConfigError as exc:
                raise ValueError(f"{t}: {exc}") from None
        thresholds = data.get("au_thresholds")
        if thresholds is not None and (not isinstance(thresholds, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in thresholds)):
            raise ValueError(f"au_thresholds: expected a list of numbers, got {thresholds!r}")
        holdout = data.get("holdout_videos", [])
        if not isinstance(holdout, list):
            raise ValueError(f"holdout_videos: expected a list, got {holdout!r}")
        return cls(filters=filters, au_thresholds=thresholds, tuned_on=str(data.get("tuned_on", "val")),
                   holdout_videos=[str(v) for v in holdout])

    def describe(self) -> dict[str, Any]:
        """What metrics.json and `evaluate --json` show under ``smoothing``: per task and output group."""
        out: dict[str, Any] = {"tuned_on": self.tuned_on}
        for t, fs in self.filters.items():
            spec = single(t)
            names = [spec.columns[g[0]] if len(g) == 1 else t for g in self.groups(t)]
            out[t] = {n: f.as_dict() for n, f in zip(names, fs, strict=True)}
        return out


def tune(
    offsets: np.ndarray, timeline: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
    valid: Mapping[str, np.ndarray], tuned_on: str = "val",
    candidates: Mapping[str, Sequence[int]] = CANDIDATES,
) -> Smoothing:
    """Choose, per task and output group, the filter that maximises that output's metric on these frames
    (``offsets``: the timeline's per-video offsets). No smoothing wins ties."""
    from abawfeat import metrics

    result = Smoothing(tuned_on=tuned_on)
    for t, scores in timeline.items():
        if t not in labels:
            continue
        spec = single(t)
        ok = np.asarray(valid[t], dtype=bool)
        if not ok.any():
            continue
        # Every filter acts on each output column on its own, so each candidate filters all the task's
        # columns in one pass and each group is scored on its own columns of the result.
        # The objectives see the labelled frames only, selected once per candidate.
        groups = result.groups(t)
        labelled = np.asarray(labels[t])[ok]
        raw = np.asarray(scores)[ok]
        best = [NONE] * len(groups)
        best_value = [spec.smoothing_objective(raw[:, cols], labelled, cols) for cols in groups]
        for name, windows in candidates.items():
            for window in windows:
                f = Filter(name, int(window))
                smoothed = per_video(offsets, scores, f)[ok]
                for g, cols in enumerate(groups):
                    value = spec.smoothing_objective(smoothed[:, cols], labelled, cols)
                    if value > best_value[g] + 1e-12:
                        best[g], best_value[g] = f, value
        chosen = best
        result.filters[t] = chosen
        if spec.tunes_thresholds:
            smoothed = result.apply(offsets, {t: scores})[t]
            tuned = metrics.tune_au_thresholds(smoothed, labels[t], valid=ok)
            result.au_thresholds = [float(x) for x in tuned]
    return result


__all__ = ["CANDIDATES", "FILTERS", "NONE", "SMOOTHING_FILE", "Filter", "Smoothing", "moving_average",
           "per_video", "tune"]
