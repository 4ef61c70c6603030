"""Which videos a run trains on, tunes on and validates on, when it is not simply train / val: a held-out
share of the training videos (``--tune-on holdout``) and cross-validation folds over train+val.

Both split by video, never by frame (frames of one video are not independent), and keep the two people of
a two-person video (``_left``/``_right``) on the same side: they share the scene, the audio and often the
mood. Folds come from scikit-learn's ``GroupKFold`` with the source video as the group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from abawfeat.data.names import source_video
from abawfeat.errors import ConfigError


def video_group(video: str) -> str:
    """The group a video is split with: its source video (``_left``/``_right``: two people, one video)."""
    return source_video(video)


def holdout_videos(videos: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded, video-level share of the training videos to tune on instead of validation."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--holdout must be a fraction in (0, 1), got {fraction}")
    groups = sorted({video_group(v) for v in videos})
    if len(groups) < 2:
        raise ConfigError("--tune-on holdout needs at least two training videos")
    rng = np.random.default_rng([seed, 7919])
    n = min(max(1, math.ceil(fraction * len(groups))), len(groups) - 1)
    chosen = {groups[i] for i in rng.permutation(len(groups))[:n]}
    return sorted(v for v in videos if video_group(v) in chosen)


def cv_folds(videos: Sequence[str], folds: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """``folds`` (train videos, validation videos) pairs: every video validates in exactly one fold, and the
    two halves of a ``_left``/``_right`` video always share a fold (scikit-learn's GroupKFold, shuffled
    with ``seed``)."""
    from sklearn.model_selection import GroupKFold

    videos = sorted(videos)
    groups = [video_group(v) for v in videos]
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if len(set(groups)) < folds:
        raise ConfigError(f"--folds {folds}: only {len(set(groups))} source videos to split")
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = []
    for train_idx, val_idx in splitter.split(np.zeros(len(videos)), groups=groups):
        out.append(([videos[i] for i in sorted(train_idx)], [videos[i] for i in sorted(val_idx)]))
    return out


def run_split(data: Any, tasks: Sequence[str], split: str, folds: int = 0, fold: int = 0,
              seed: int = 0) -> tuple[str, list[str] | None]:
    """What ``split`` means for a run: the release's split, or for fold ``fold`` of a cross-validation
    its training or validation videos over train+val: (split to load, its videos or None for all)."""
    from abawfeat.data.sequences import split_videos

    if not folds or split == "test":
        return split, None
    train, val = cv_folds(split_videos(data, tasks, "trainval"), folds, seed)[fold]
    return "trainval", train if split == "train" else val


__all__ = ["cv_folds", "holdout_videos", "run_split", "video_group"]
