"""Scores of a finished run on a split: what ``evaluate`` prints and what ``predict`` writes, from one path.

``infer_run`` runs a run's head over every crop of a split (the caches and data of the run, or overrides
checked against the run's fingerprints) and spreads the outputs onto every frame; ``evaluate`` scores that
timeline by the official protocol with the run's own AU thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from abawfeat.data.batches import WindowSource
from abawfeat.data.sequences import SequenceSet, load_split, make_windows
from abawfeat.errors import CheckpointError, ConfigError
from abawfeat.tasks import task_names
from abawfeat.train.config import FRAMEWISE_INFER_WINDOW, default_cache
from abawfeat.train.inference import fill_timeline, infer_rows, inference_weights, score_timeline
from abawfeat.train.rundir import CHECKPOINT_FILE, LoadedRun, check_fingerprints, load_run, metrics_record
from abawfeat.utils.device import resolve_device

SPLITS = ("train", "val", "test")


@dataclass
class Inference:
    """A run's scores on every frame of a split's timeline, with what decides and scores them."""

    data: SequenceSet
    timeline: dict[str, np.ndarray]
    au_thresholds: np.ndarray | None
    run_task: str
    best_epoch: int | None


def cache_paths(run: LoadedRun, data_root: str | Path, override: str | Path | None = None) -> list[Path]:
    """The caches a run reads: ``override`` (one cache), else the ones its record names."""
    if override:
        return [Path(override)]
    paths = [c.get("path") for c in run.record.caches]
    if all(paths):
        return [Path(str(p)) for p in paths]
    return [default_cache(data_root, e) for e in run.record.encoders]


def infer_run(
    run_dir: str | Path, split: str, data_root: str | Path | None = None,
    cache_path: str | Path | None = None,
) -> Inference:
    """Run a trained head over every crop of ``split`` and spread its scores onto every frame."""
    from abawfeat.cache import FeatureCache
    from abawfeat.data.affwild2 import AffWild2

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    run = load_run(run_dir)
    cfg = run.record.train
    root = data_root or cfg.get("data") or run.record.dataset.get("root")
    if not root:
        raise ConfigError(f"{run_dir}: the run names no data root; pass --data")
    tasks = task_names(run.task)
    paths = cache_paths(run, root, cache_path)
    if len(paths) != 1:
        raise CheckpointError(f"{run_dir}: reads {len(paths)} caches; give them all")
    data = AffWild2(root)
    with FeatureCache(paths[0]) as cache:
        check_fingerprints(run.fingerprints, [cache], Path(run_dir) / CHECKPOINT_FILE)
        seqs = load_split(data, cache, tasks, split)
    device = resolve_device(str(cfg.get("device", "auto")))
    res = run.resolved
    head = run.head.to(device)
    temporal = head.is_temporal()
    window = int(res.get("infer_window", cfg.get("window", 64) if temporal else FRAMEWISE_INFER_WINDOW))
    stride = int(res.get("infer_stride", max(window // 2, 1)))
    batch = int(res.get("infer_batch_size", 256))
    precision = str(res.get("precision", "fp32"))
    source = WindowSource(seqs, make_windows(seqs.row_offsets, window, stride), tasks, batch, shuffle=False)
    scores, _ = infer_rows(head, source.batches(0), seqs.n_rows, tasks, device, precision,
                           position_weights=inference_weights(head, window))
    timeline = fill_timeline(seqs, scores, str(cfg.get("fill", "interpolate")))
    return Inference(data=seqs, timeline=timeline, au_thresholds=run.au_thresholds, run_task=run.task,
                     best_epoch=run.best_epoch)


def evaluate(
    run_dir: str | Path, split: str = "val", data_root: str | Path | None = None,
    cache_path: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of a trained run on ``split`` (train or val) by the official protocol, with the run's own
    AU thresholds. On val this reproduces metrics.json (same weights, same batches, same fill)."""
    if split not in ("train", "val"):
        raise ConfigError(f"--split {split!r}: evaluate needs labels, use val or train")
    inf = infer_run(run_dir, split, data_root, cache_path)
    if "au" in inf.timeline and inf.au_thresholds is None:
        raise CheckpointError(f"{Path(run_dir) / CHECKPOINT_FILE}: no AU thresholds saved")
    metrics, _ = score_timeline(inf.data, inf.timeline, inf.au_thresholds, inf.run_task)
    return metrics_record(inf.run_task, split, inf.best_epoch, metrics)


__all__ = ["Inference", "cache_paths", "evaluate", "infer_run"]
