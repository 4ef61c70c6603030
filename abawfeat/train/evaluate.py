"""Scores of a finished run on a split: what ``evaluate`` prints and what ``predict`` writes, from one path.

``infer_run`` runs a run's head over every crop of a split (the caches and data of the run, or overrides
checked against the run's fingerprints) and spreads the outputs onto every frame; ``evaluate`` scores that
timeline by the official protocol with the run's own AU thresholds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from abawfeat.data.batches import WindowSource
from abawfeat.data.sequences import SequenceSet, load_split, make_windows
from abawfeat.errors import CheckpointError, ConfigError, RunError
from abawfeat.smoothing import Smoothing
from abawfeat.tasks import task_names
from abawfeat.train.config import FRAMEWISE_INFER_WINDOW, default_cache
from abawfeat.train.finish import final_metrics, read_smoothing, summarize_folds
from abawfeat.train.inference import fill_timeline, infer_rows, inference_weights
from abawfeat.train.rundir import (
    CHECKPOINT_FILE,
    LoadedRun,
    RunRecord,
    check_fingerprints,
    load_run,
    member_changed,
    metrics_record,
    open_caches,
    require_complete,
)
from abawfeat.train.splits import run_split
from abawfeat.utils.device import resolve_device, torch_threads

SPLITS = ("train", "val", "test")


@dataclass
class Inference:
    """A run's scores on every frame of a split's timeline, with what decides and scores them."""

    data: SequenceSet
    timeline: dict[str, np.ndarray]  # raw scores (before the run's smoothing)
    au_thresholds: np.ndarray | None  # for the raw scores
    run_task: str
    best_epoch: int | None
    smoothing: Smoothing | None = None  # the run's tuned smoothing, with its own AU thresholds
    tuned_on: str = "val"

    def decided_timeline(self, smooth: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The scores decisions are made from and the AU thresholds that go with them."""
        if smooth and self.smoothing is not None:
            t = self.smoothing.au_thresholds
            return (self.smoothing.apply(self.data.tl_offsets, self.timeline),
                    None if t is None else np.asarray(t))
        return self.timeline, self.au_thresholds


CacheOverride = str | Path | Sequence[str | Path] | None


def run_caches(run: LoadedRun, data_root: str | Path, override: CacheOverride = None) -> list[Path]:
    """The caches a run reads: the overrides (in the run's order), else the ones its record names."""
    if override:
        paths = [Path(override)] if isinstance(override, (str, Path)) else [Path(p) for p in override]
        if len(paths) != len(run.record.caches):
            raise ConfigError(f"--cache: {run.run_dir} was trained on {len(run.record.caches)} cache(s) "
                              f"({', '.join(run.record.encoders)}); give as many, in that order")
        return paths
    paths = [c.get("path") for c in run.record.caches]
    if all(paths):
        return [Path(str(p)) for p in paths]
    return [default_cache(data_root, e) for e in run.record.encoders]


def infer_run(
    run_dir: str | Path, split: str, data_root: str | Path | None = None, cache_path: CacheOverride = None,
    videos: Sequence[str] | None = None, caches_for: Callable[[RunRecord], list[Path]] | None = None,
) -> Inference:
    """Run a trained head over every crop of ``split`` and spread its scores onto every frame. An ensemble
    (or a cross-validation run, on the test split) averages its members' scores with its weights.

    ``videos``: these videos of ``split`` instead of its list; ``caches_for(record)``: the caches a run (and
    each member run) reads instead of its own (``abawfeat analyze``: caches of a user's own crops)."""
    from abawfeat.data.affwild2 import AffWild2

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    record = require_complete(run_dir)
    if record.kind in MEMBER_KINDS:
        if cache_path:
            raise ConfigError(f"--cache: {run_dir} is a{'n' if record.kind[0] in 'aeiou' else ''} "
                              f"{record.kind}; its members name their own caches")
        return infer_members(run_dir, record, split, data_root, videos, caches_for)
    run = load_run(run_dir)
    cfg = run.record.train
    root = data_root or cfg.get("data") or run.record.dataset.get("root")
    if not root:
        raise ConfigError(f"{run_dir}: the run names no data root; pass --data")
    tasks = task_names(run.task)
    data = AffWild2(root)
    paths = caches_for(run.record) if caches_for is not None else run_caches(run, root, cache_path)
    with open_caches(paths) as caches:
        check_fingerprints(run.fingerprints, caches, Path(run_dir) / CHECKPOINT_FILE)
        if videos is not None:
            part, chosen = split, list(videos)
        else:
            part, chosen = run_split(data, tasks, split, int(cfg.get("folds") or 0),
                                     int(cfg.get("fold") or 0), int(cfg.get("seed") or 0))
        seqs = load_split(data, caches, tasks, part, chosen, any_video=videos is not None and part == "test")
    device = resolve_device(str(cfg.get("device", "auto")))
    res = run.resolved
    head = run.head.to(device)
    temporal = head.is_temporal()
    window = int(res.get("infer_window", cfg.get("window", 64) if temporal else FRAMEWISE_INFER_WINDOW))
    stride = int(res.get("infer_stride", max(window // 2, 1)))
    batch = int(res.get("infer_batch_size", 256))
    precision = str(res.get("precision", "fp32"))
    source = WindowSource(seqs, make_windows(seqs.row_offsets, window, stride), tasks, batch, shuffle=False)
    # At the run's own thread count, so that evaluate prints the numbers the run wrote, on any machine.
    with torch_threads(run.record.threads):
        scores, _ = infer_rows(head, source.batches(0), seqs.n_rows, tasks, device, precision,
                               position_weights=inference_weights(head, window))
    timeline = fill_timeline(seqs, scores, str(cfg.get("fill", "interpolate")))
    return Inference(data=seqs, timeline=timeline, au_thresholds=run.au_thresholds, run_task=run.task,
                     best_epoch=run.best_epoch, smoothing=read_smoothing(run_dir),
                     tuned_on=str(cfg.get("tune_on", "val")))


# Runs made of other runs: their scores are their members' weighted average.
MEMBER_KINDS = ("ensemble", "cv")


def member_dirs(run_dir: str | Path, record: RunRecord) -> list[tuple[Path, dict[str, float]]]:
    """The member runs of an ensemble or cross-validation run, with their per-task weights. Paths are kept
    relative to the run (so the folder can move), with the absolute path as a fallback. A member that is
    gone, or that changed since the run was built from it (retrained, replaced), is refused in one line:
    the stored weights and thresholds were tuned on the member as it was."""
    out = []
    for m in record.extra.get("members") or []:
        here = Path(os.path.normpath(Path(run_dir) / str(m.get("relative", ""))))
        path = here if m.get("relative") and here.is_dir() else Path(str(m.get("path")))
        if not path.is_dir():
            raise RunError(f"{run_dir}: its member {here if m.get('relative') else path} is gone (nor at "
                           f"{m.get('path')}); {_rebuild(record.kind)}")
        # A damaged or interrupted member is said as such (its own line) before it is compared.
        changed = member_changed(path, m) if m.get("record_sha256") and require_complete(path) else None
        if changed:
            raise RunError(f"{run_dir}: its member {path} changed after the {_noun(record.kind)} was built "
                           f"({changed}: retrained or replaced); {_rebuild(record.kind)}")
        out.append((path, {str(k): float(v) for k, v in dict(m.get("weights") or {}).items()}))
    if not out:
        raise RunError(f"{Path(run_dir) / 'config.json'}: a {record.kind} run without members")
    return out


def _noun(kind: str) -> str:
    return "cross-validation" if kind == "cv" else kind


def _rebuild(kind: str) -> str:
    if kind == "cv":
        return "run `abawfeat cv` again into a new --out"
    return "build the ensemble again with `abawfeat ensemble ... --overwrite`"


def infer_members(
    run_dir: str | Path, record: RunRecord, split: str, data_root: str | Path | None,
    videos: Sequence[str] | None = None, caches_for: Callable[[RunRecord], list[Path]] | None = None,
) -> Inference:
    """The weighted average of the member runs' scores on ``split`` (they must cover the same frames)."""
    if record.kind == "cv" and split != "test":
        raise ConfigError(f"{run_dir}: a cross-validation run predicts the test split only (its folds "
                          "trained on train and val); evaluate it for its folds' metrics")
    members = member_dirs(run_dir, record)
    parts = [(infer_run(path, split, data_root, videos=videos, caches_for=caches_for), w)
             for path, w in members]
    first = parts[0][0]
    for (inf, _), (path, _) in zip(parts[1:], members[1:], strict=True):
        same = inf.data.videos == first.data.videos and np.array_equal(inf.data.tl_offsets,
                                                                      first.data.tl_offsets)
        if not same:
            raise RunError(f"{path}: covers other {split} videos or frames than {members[0][0]}; the runs "
                           f"of {run_dir} must share their data")
    timeline = {t: weighted_average([inf.timeline[t] for inf, _ in parts],
                                    [w.get(t, 1.0 / len(parts)) for _, w in parts])
                for t in first.timeline}
    thresholds = record.extra.get("au_thresholds")
    return Inference(data=first.data, timeline=timeline,
                     au_thresholds=None if thresholds is None else np.asarray(thresholds),
                     run_task=record.task, best_epoch=None, smoothing=read_smoothing(run_dir), tuned_on="val")


def weighted_average(scores: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Members' scores of one task, weighted (weights sum to 1): accumulated in float64, returned in float32
    like every timeline of scores (so identical members average to exactly their own scores)."""
    total = sum(float(w) * np.asarray(s, dtype=np.float64) for w, s in zip(weights, scores, strict=True))
    return np.asarray(total, dtype=np.float32)


def evaluate(
    run_dir: str | Path, split: str = "val", data_root: str | Path | None = None,
    cache_path: CacheOverride = None,
) -> dict[str, Any]:
    """Metrics of a trained run on ``split`` (train or val) by the official protocol, with the run's own
    AU thresholds and smoothing (the raw scores' metrics under ``unsmoothed``). On val this reproduces
    metrics.json (same weights, same batches, same fill)."""
    if split not in ("train", "val"):
        raise ConfigError(f"--split {split!r}: evaluate needs labels, use val or train")
    record = require_complete(run_dir)
    if record.kind == "cv":
        if split != "val":
            raise ConfigError(f"{run_dir}: a cross-validation run is evaluated on its folds' validation "
                              "videos")
        folds = [evaluate(path, "val", data_root) for path, _ in member_dirs(run_dir, record)]
        return metrics_record(record.task, "cv", None, summarize_folds(folds))
    inf = infer_run(run_dir, split, data_root, cache_path)
    if "au" in inf.timeline and inf.au_thresholds is None:
        raise CheckpointError(f"{Path(run_dir) / CHECKPOINT_FILE}: no AU thresholds saved")
    metrics = final_metrics(inf.data, inf.timeline, inf.run_task, inf.au_thresholds, inf.smoothing,
                            inf.tuned_on)
    return metrics_record(inf.run_task, split, inf.best_epoch, metrics)


__all__ = ["CacheOverride", "Inference", "evaluate", "infer_run", "run_caches"]
