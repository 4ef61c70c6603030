"""Cache rows aligned with annotation rows, packed for training, and the windows heads train on.

Two views of one split live side by side in a ``SequenceSet``:

- **rows**: the frames that have a crop, i.e. the cache's rows, for all videos back to back in ONE array in
  the cache's stored dtype (fp16: 1.68 M x 512 VA-train frames are 1.7 GB; float32 would double it), with
  per-video offsets. Heads only ever see rows; batches are gathered from index arrays and converted to float32
  one batch at a time.
- **timeline**: every frame 1..N of every video, crop or not, which is what the official metric scores and
  what a submission file lists. Row r sits at timeline position ``row_to_tl[r]`` (matched by frame number:
  annotation row k is frame k, cache frames are the crops' 1-based numbers). Crops past the last annotated
  frame have no timeline position (``-1``) and no label.

A training label for a row is the annotation of its frame; frames without a crop have no row, so they never
enter a loss. At inference, outputs on rows are spread to the timeline with ``submission.fill_missing``.

Several caches (early or late fusion) are aligned per video by frame number: the rows are the union of the
caches' frames, each cache's features fill its own columns, and one availability column per cache (1 where
it has the frame, 0 where it does not) follows them, so a missing frame is never silently a zero feature:
the head sees the mask (``groups`` records the caches' feature sizes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from abawfeat.errors import CacheError, ConfigError
from abawfeat.tasks import single, single_tasks, task_names
from abawfeat.utils.progress import warn

# The task set a 7th-ABAW multi-task file holds.
_MTL_SET = "mtl"


@dataclass
class SequenceSet:
    """One split of one dataset on one cache: rows (crops) packed, plus the official timeline."""

    split: str
    tasks: tuple[str, ...]
    videos: list[str]
    features: np.ndarray  # [R, D] in the cache's dtype; rows of all videos back to back
    row_offsets: np.ndarray  # int64 [V + 1]: video v owns rows row_offsets[v]:row_offsets[v + 1]
    row_frames: np.ndarray  # int32 [R]: 1-based frame number of each row
    tl_offsets: np.ndarray  # int64 [V + 1]: video v owns timeline frames tl_offsets[v]:tl_offsets[v + 1]
    row_to_tl: np.ndarray  # int64 [R]: timeline index of each row, -1 for a crop past the last frame
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # per task, timeline [F, ...]
    valid: dict[str, np.ndarray] = field(default_factory=dict)  # per task, bool [F]
    # Per task, int64 [V]: the task's N for each video (0 = the video is not in that task's list). The
    # timeline of a video is as long as the longest of its tasks; each task scores only its own frames.
    task_frames: dict[str, np.ndarray] = field(default_factory=dict)
    # Fused caches: the feature size of each; their columns come first, then one availability column per
    # cache. () = one cache, every column a feature.
    groups: tuple[int, ...] = ()
    _row_cache: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def n_rows(self) -> int:
        return int(self.row_offsets[-1])

    @property
    def n_timeline(self) -> int:
        return int(self.tl_offsets[-1])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def row_labels(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """(labels, valid) per row for ``task``: the annotation of each crop's frame (memoised)."""
        if task not in self._row_cache:
            has = self.row_to_tl >= 0
            idx = np.where(has, self.row_to_tl, 0)
            if task in self.labels:
                lab = self.labels[task][idx]
                ok = self.valid[task][idx] & has
            else:
                lab = single(task).empty_labels(self.n_rows)
                ok = np.zeros(self.n_rows, dtype=bool)
            self._row_cache[task] = (lab, ok)
        return self._row_cache[task]

    def row_weight(self) -> np.ndarray:
        """bool [R]: the row carries at least one label of any task (what a training window must contain)."""
        out = np.zeros(self.n_rows, dtype=bool)
        for task in self.tasks:
            out |= self.row_labels(task)[1]
        return out

    def timeline_frames(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(video name per timeline frame, 1-based frame number, has_crop) for val_outputs.npz."""
        lengths = np.diff(self.tl_offsets)
        names = np.repeat(np.asarray(self.videos, dtype=str), lengths)
        frame = (np.arange(self.n_timeline) - np.repeat(self.tl_offsets[:-1], lengths) + 1).astype(np.int32)
        has_crop = np.zeros(self.n_timeline, dtype=bool)
        has_crop[self.row_to_tl[self.row_to_tl >= 0]] = True
        return names, frame, has_crop

    def present(self) -> np.ndarray | None:
        """bool [R, C]: which fused cache has each row's frame (None for one cache: all of them)."""
        if not self.groups:
            return None
        return self.features[:, sum(self.groups):] > 0.5

    def feature_stats(
        self, rows: np.ndarray | None = None, chunk: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std over ``rows`` (all rows by default), accumulated in float64 by chunk so
        no float32 copy of the whole array is ever made. Fused caches: each cache's columns over the rows
        where it has the frame; availability columns get mean 0 and std 1 (they pass through unchanged)."""
        idx = np.arange(self.n_rows) if rows is None else np.asarray(rows)
        d = self.feature_dim
        if idx.size == 0:
            return np.zeros(d, np.float32), np.ones(d, np.float32)
        n_feat = sum(self.groups) if self.groups else d
        bounds = np.cumsum([0, *self.groups]) if self.groups else np.array([0, d])
        s = np.zeros(d, np.float64)
        s2 = np.zeros(d, np.float64)
        n = np.zeros(d, np.float64)
        contiguous = rows is None
        for start in range(0, idx.size, chunk):
            block = (self.features[start : start + chunk] if contiguous
                     else self.features[idx[start : start + chunk]]).astype(np.float64)
            if self.groups:
                weight = np.zeros_like(block)
                for c in range(len(self.groups)):
                    weight[:, bounds[c] : bounds[c + 1]] = block[:, n_feat + c : n_feat + c + 1]
                block = block * weight
            else:
                weight = np.ones((1, d))
            s += block.sum(axis=0)
            s2 += np.square(block).sum(axis=0)
            n += np.broadcast_to(weight, block.shape).sum(axis=0)
        n = np.maximum(n, 1.0)
        mean = s / n
        var = np.maximum(s2 / n - mean**2, 0.0)
        mean[n_feat:], var[n_feat:] = 0.0, 1.0
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


# ----------------------------------------------------------------------------------------------- loading


def uses_mtl_file(data: Any, tasks: Sequence[str], split: str) -> bool:
    """Multi-task data from a 7th-ABAW multi-task file (s-Aff-Wild2): only when the tree has no per-task
    annotation folders but has the multi-task file of ``split``; per-task files win when both exist."""
    if tuple(tasks) != task_names(_MTL_SET) or split not in ("train", "val") or not hasattr(data, "mtl_file"):
        return False
    if any(data.task_dir(t) is not None for t in tasks):
        return False
    return data.mtl_file(split) is not None


def split_videos(data: Any, tasks: Sequence[str], split: str) -> list[str]:
    """Videos of ``split`` for any of ``tasks``: the annotation lists (train/val) or the test lists.

    Multi-task training drops a train video that is a validation video of another task, so no frame of the
    validation split ever shapes the weights through a neighbouring task. ``trainval``: the videos of both
    (cross-validation folds are drawn from them).
    """
    if split == "trainval":
        if any(uses_mtl_file(data, tasks, s) for s in ("train", "val")):
            raise ConfigError(f"{data.root}: cross-validation over train+val needs the per-task annotation "
                              "folders, not only a multi-task file")
        return sorted({v for t in tasks for s in ("train", "val") for v in data.videos(t, s)})
    if split == "test":
        names: set[str] = set()
        for task in tasks:
            names |= set(data.test_videos(task))
        return sorted(names)
    if uses_mtl_file(data, tasks, split):
        names = set(data.mtl_annotations(split).videos())
        if split == "train" and data.mtl_file("val") is not None:
            names -= set(data.mtl_annotations("val").videos())
        return sorted(names)
    names = set()
    for task in tasks:
        names |= set(data.videos(task, split))
    if split == "train" and len(tasks) > 1:
        held_out: set[str] = set()
        for spec in single_tasks():
            held_out |= set(data.videos(spec.name, "val"))
        names -= held_out
    return sorted(names)


# Per task and video: (N, labels [N, ...] or None on the test split, valid [N] or None).
_Plan = dict[str, dict[str, tuple[int, "np.ndarray | None", "np.ndarray | None"]]]


def _annotation_plan(data: Any, tasks: tuple[str, ...], split: str, videos: list[str],
                     any_video: bool = False) -> _Plan:
    plan: _Plan = {t: {} for t in tasks}
    if uses_mtl_file(data, tasks, split):
        m = data.mtl_annotations(split)
        for video in videos:
            sel = np.flatnonzero(m.video == video)
            if sel.size == 0:
                continue
            frames = m.frame[sel].astype(np.int64)
            n = int(frames.max())
            for t in tasks:
                spec = single(t)
                lab = spec.empty_labels(n)
                ok = np.zeros(n, dtype=bool)
                # Static frames: only the listed ones carry labels; the rest of the timeline is unlabelled.
                values = m.labels[t][sel].astype(spec.label_dtype, copy=False)
                lab[frames - 1] = values.reshape(-1, *spec.label_shape)
                ok[frames - 1] = m.valid[t][sel]
                plan[t][video] = (n, lab, ok)
        return plan
    for t in tasks:
        # Where each video's annotation of this task is: its split's folder (train+val: whichever has it).
        home = {v: s for s in (("train", "val") if split == "trainval" else (split,))
                for v in (data.test_videos(t) if s == "test" else data.videos(t, s))}
        if any_video:
            home = {v: "test" for v in videos}
        for video in videos:
            if video not in home:
                continue
            if split == "test":
                counts = dict(data.sample_frame_counts(t)) if data.sample_file(t) is not None else {}
                plan[t][video] = (int(counts.get(video, 0)), None, None)
            else:
                ann = data.annotation(t, home[video], video)
                valid = np.asarray(ann.valid, dtype=bool)
                plan[t][video] = (int(ann.n_frames), np.asarray(ann.labels), valid)
    return plan


def load_split(
    data: Any,
    cache: Any,
    tasks: Sequence[str],
    split: str,
    videos: Iterable[str] | None = None,
    any_video: bool = False,
) -> SequenceSet:
    """Pack ``split`` for ``tasks`` (``data``: an ``AffWild2``; ``cache``: a ``FeatureCache``, or a list of
    them to fuse: rows are then aligned by frame number, see the module docstring).

    ``any_video`` (test split, with ``videos``): those videos are test videos of every task whatever the
    test lists say, each up to its last crop, without a warning (``abawfeat analyze``: a user's own videos).

    train/val: timeline lengths and labels from the annotation files (or, for multi-task data that only
    comes as a 7th-ABAW multi-task file, from that file). test: N from the organisers' sample file when it
    lists the video, otherwise the last crop (with a warning: the organisers may expect more frames).

    A video without any crop (the face was never found) has no rows; its timeline is filled at inference
    with a constant. A video that has crops but is not in the cache is an incomplete extraction: skipped with
    a warning for training, refused for val and test, where every frame counts.
    """
    tasks = tuple(tasks)
    caches = list(cache) if isinstance(cache, (list, tuple)) else [cache]
    if split not in ("train", "val", "test", "trainval"):
        raise ConfigError(f"unknown split {split!r}: use train, val, test or trainval")
    check_distinct(caches)
    wanted = sorted(videos) if videos is not None else split_videos(data, tasks, split)
    kept: list[str] = []
    for video in wanted:
        lacking = [c for c in caches if video not in c]
        if lacking and _crop_count(data, video):
            continue
        kept.append(video)
    for c in caches:
        missing = [v for v in wanted if v not in c and v not in kept]
        if missing:
            listed = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            message = (f"{c.path}: {len(missing)} {split} video(s) with face crops are not in the cache "
                       f"({listed}); run `abawfeat extract` to complete it")
            if split == "train":
                warn(message + "; training without them")
            else:
                raise CacheError(message)
    if not kept:
        raise ConfigError(f"{data.root}: no {split} videos for task(s) {', '.join(tasks)}")

    # The one place where caches meet a tree: every video used must have been extracted from this tree's
    # crops (same frame numbers, same images), or its rows would be scored against another video's labels.
    for c in caches:
        if hasattr(c, "check_source"):
            for video in kept:
                if video in c:
                    c.check_source(video, data)
    plan = _annotation_plan(data, tasks, split, kept, any_video and split == "test")
    n_videos = len(kept)
    per_cache = [[c.frames(v).astype(np.int32) if v in c else np.zeros(0, np.int32) for v in kept]
                 for c in caches]
    # One row per frame that any cache has: the union, ascending.
    row_frames_list = [np.unique(np.concatenate([f[v] for f in per_cache])).astype(np.int32)
                       for v in range(n_videos)] if len(caches) > 1 else per_cache[0]
    task_frames = {t: np.zeros(n_videos, dtype=np.int64) for t in tasks}
    guessed: set[str] = set()
    for t in tasks:
        for v, video in enumerate(kept):
            if video not in plan[t]:
                continue
            n = plan[t][video][0]
            if n == 0 and split == "test":
                # Not in the organisers' sample file: up to the last crop (or undecodable crop) we know of.
                # Any cache's bad frames count too (an audio cache lists the crop frames without audio there).
                n = max(_last_crop(c, video, row_frames_list[v]) for c in caches)
                if n == 0:
                    raise CacheError(f"{caches[0].path}: test video {video!r} has no crop and no sample-file "
                                     "entry; its frame count is unknown")
                guessed.add(video)
            task_frames[t][v] = n
    if guessed and not (any_video and split == "test"):
        names = sorted(guessed)
        warn(f"{len(names)} test video(s) not in the organisers' sample file ({', '.join(names[:3])}"
             f"{' ...' if len(names) > 3 else ''}): predicting up to their last crop")

    n_tl = np.max(np.stack([task_frames[t] for t in tasks]), axis=0)
    tl_offsets = np.zeros(n_videos + 1, dtype=np.int64)
    np.cumsum(n_tl, out=tl_offsets[1:])
    labels: dict[str, np.ndarray] = {}
    valid: dict[str, np.ndarray] = {}
    if split != "test":
        for t in tasks:
            spec = single(t)
            lab = spec.empty_labels(int(tl_offsets[-1]))
            ok = np.zeros(int(tl_offsets[-1]), dtype=bool)
            for v, video in enumerate(kept):
                if video in plan[t]:
                    n, values, good = plan[t][video]
                    lo = int(tl_offsets[v])
                    lab[lo : lo + n] = np.asarray(values).astype(spec.label_dtype, copy=False).reshape(
                        n, *spec.label_shape)
                    ok[lo : lo + n] = good
            labels[t], valid[t] = lab, ok

    # Rows: one preallocated array in the stored dtype, filled video by video (no per-video copies kept).
    lengths = np.array([len(f) for f in row_frames_list], dtype=np.int64)
    row_offsets = np.zeros(n_videos + 1, dtype=np.int64)
    np.cumsum(lengths, out=row_offsets[1:])
    dtypes = {np.dtype(getattr(c, "dtype", np.float16)) for c in caches}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
    dims = [int(c.feature_dim) for c in caches]
    fused = len(caches) > 1
    width = sum(dims) + (len(caches) if fused else 0)
    features = np.zeros((int(row_offsets[-1]), width), dtype=dtype) if fused else np.empty(
        (int(row_offsets[-1]), width), dtype=dtype)
    row_frames = np.concatenate(row_frames_list) if row_frames_list else np.zeros(0, np.int32)
    row_to_tl = np.full(int(row_offsets[-1]), -1, dtype=np.int64)
    starts = np.cumsum([0, *dims])
    for v, video in enumerate(kept):
        lo, hi = int(row_offsets[v]), int(row_offsets[v + 1])
        if hi == lo:
            continue
        for c, cache_c in enumerate(caches):
            frames_c = per_cache[c][v]
            if frames_c.size == 0:
                continue
            # Where each of this cache's frames sits among the video's rows (the union, ascending).
            at = lo + np.searchsorted(row_frames[lo:hi], frames_c) if fused else slice(lo, hi)
            features[at, starts[c] : starts[c + 1]] = cache_c.features(video, dtype=None)
            if fused:
                features[at, sum(dims) + c] = 1
        f = row_frames[lo:hi].astype(np.int64)
        row_to_tl[lo:hi] = np.where(f <= n_tl[v], tl_offsets[v] + f - 1, -1)
    return SequenceSet(
        split=split, tasks=tasks, videos=kept, features=features, row_offsets=row_offsets,
        row_frames=row_frames, tl_offsets=tl_offsets, row_to_tl=row_to_tl, labels=labels, valid=valid,
        task_frames=task_frames, groups=tuple(dims) if fused else (),
    )


def check_distinct(caches: Sequence[Any]) -> None:
    """Refuse the same cache file given twice (through a symlink, a hard link, or once absolute and once
    relative): fused with itself it would double its features and claim two modalities."""
    import os

    seen: dict[tuple[int, int], Any] = {}
    for c in caches:
        path = getattr(c, "path", None)
        if path is None or not os.path.exists(path):
            continue
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise ConfigError(f"--cache {path}: the same file as --cache {seen[key].path}; give each cache "
                              "once (fusing a cache with itself adds nothing but a copy of its features)")
        seen[key] = c


def _crop_count(data: Any, video: str) -> int:
    try:
        return len(data.crop_frames(video))
    except Exception:  # a reader without crops for this video: treat as no crops
        return 0


def _last_crop(cache: Any, video: str, frames: np.ndarray) -> int:
    last = int(frames[-1]) if len(frames) else 0
    if video in cache:
        bad = cache.bad_frames(video)
        if len(bad):
            last = max(last, int(bad.max()))
    return last


# ----------------------------------------------------------------------------------------------- windows


def make_windows(
    row_offsets: np.ndarray, length: int, stride: int, keep: np.ndarray | None = None
) -> np.ndarray:
    """Index windows over the rows of each video: int64 [W, length], global row indices, -1 = padding.

    Windows start every ``stride`` rows; the last window of a video is moved back to end on its last row so
    every row is covered, and a video shorter than ``length`` gives one window padded at the end. Windows
    never cross a video boundary. With ``keep`` (bool per row) only windows holding a kept row remain (a
    window without any label teaches nothing). Precomputed once, so the training loop only indexes.
    """
    if length < 1 or stride < 1:
        raise ConfigError(f"window length and stride must be >= 1, got {length} and {stride}")
    starts_list = []
    for v in range(len(row_offsets) - 1):
        lo, hi = int(row_offsets[v]), int(row_offsets[v + 1])
        n = hi - lo
        if n == 0:
            continue
        last = max(n - length, 0)
        starts = np.arange(0, last + 1, stride, dtype=np.int64)
        if starts[-1] != last:
            starts = np.append(starts, last)
        starts_list.append(np.stack([starts + lo, np.full(len(starts), hi, dtype=np.int64)], axis=1))
    if not starts_list:
        return np.zeros((0, length), dtype=np.int64)
    se = np.concatenate(starts_list)
    idx = se[:, :1] + np.arange(length, dtype=np.int64)[None, :]
    idx[idx >= se[:, 1:2]] = -1
    if keep is not None:
        has = np.where(idx >= 0, keep[np.maximum(idx, 0)], False).any(axis=1)
        idx = idx[has]
    return idx
