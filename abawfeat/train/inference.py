"""Inference and scoring, shared by training, ``evaluate``, ``predict``, ensembles and fine-tuning.

Outputs on crops (``infer_rows``; temporal trunks on overlapping windows weighted by their declared
context) are spread to every frame of the official timeline (``fill_timeline``), turned into decisions by
each task's rule and scored by the official protocol (``score_timeline``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from abawfeat.data.batches import Batch, WindowSource
from abawfeat.data.sequences import SequenceSet
from abawfeat.errors import ConfigError, RunError
from abawfeat.tasks import single, task, task_names
from abawfeat.train.objectives import Objective
from abawfeat.utils.device import autocast


@torch.no_grad()
def infer_rows(
    model: nn.Module, batches: Iterator[Batch] | Sequence[Batch], n_rows: int, tasks: Sequence[str],
    device: torch.device, precision: str = "fp32", objective: Objective | None = None,
    position_weights: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """Run ``model`` over batches whose ``rows`` cover rows 0..n_rows-1; return per task the scores per
    row (float32 [R, K]; a row seen by several overlapping windows gets their average, weighted by
    ``position_weights`` [T] when given, see ``Context.position_weights``) and the mean loss of the batches
    (weighted by their labelled frames; NaN without an objective)."""
    model.eval()
    specs = {t: single(t) for t in tasks}
    acc = {t: torch.zeros(n_rows, spec.width) for t, spec in specs.items()}
    count = torch.zeros(n_rows)
    loss_sum, loss_n = 0.0, 0
    for batch in batches:
        b = batch.to(device)
        with autocast(device, precision):
            out = model(b.inputs, b.mask)
            if objective is not None:
                loss, _ = objective(out, b)
        if objective is not None:
            n = int(sum(int(v.sum()) for v in b.valid.values()))
            if n:
                loss_sum += float(loss) * n
                loss_n += n
        rows = torch.from_numpy(batch.rows.reshape(-1))
        keep = rows >= 0
        if position_weights is None:
            w = torch.ones(batch.rows.shape, dtype=torch.float32).reshape(-1)
        else:
            w = torch.from_numpy(np.broadcast_to(position_weights, batch.rows.shape).astype(np.float32))
            w = w.reshape(-1)
        rows, w = rows[keep], w[keep]
        for t, spec in specs.items():
            s = spec.to_scores(out[t].float()).reshape(-1, spec.width).cpu()
            acc[t].index_add_(0, rows, s[keep] * w[:, None])
        count.index_add_(0, rows, w)
    if n_rows and bool((count == 0).any()):
        raise RuntimeError(f"infer_rows: {int((count == 0).sum())} rows were not covered by any batch")
    denom = count.clamp(min=1e-12)[:, None]
    scores = {t: (acc[t] / denom).numpy() for t in tasks}
    return scores, (loss_sum / loss_n if loss_n else math.nan)


def inference_weights(model: nn.Module, window: int) -> np.ndarray | None:
    """Position weights of ``window``-frame inference windows, from the model's declared context (None for
    frame-wise models, and for models that declare no context)."""
    context = getattr(model, "context", None)
    return None if context is None else context().position_weights(window)


def fill_timeline(
    data: SequenceSet, row_scores: Mapping[str, np.ndarray], method: str = "interpolate",
) -> dict[str, np.ndarray]:
    """Scores on every timeline frame: each video's crop scores spread over frames 1..N with
    ``submission.fill_missing`` (``method``). This is THE rule for frames without a crop; ``evaluate`` and
    ``predict`` both go through it. A video without any crop gets the task's no-crop scores.

    Scores are float32, as the model makes them and as val_outputs.npz stores them, so a run's metrics
    computed from that file or from a fresh inference are the same numbers."""
    from abawfeat.submission import fill_missing

    out = {t: np.empty((data.n_timeline, single(t).width), dtype=np.float32) for t in row_scores}
    for v in range(len(data.videos)):
        lo, hi = int(data.row_offsets[v]), int(data.row_offsets[v + 1])
        tlo, thi = int(data.tl_offsets[v]), int(data.tl_offsets[v + 1])
        n = thi - tlo
        if n == 0:
            continue
        inside = data.row_to_tl[lo:hi] >= 0
        frames = data.row_frames[lo:hi][inside]
        for t, scores in row_scores.items():
            if frames.size == 0:
                out[t][tlo:thi] = single(t).no_crop_score
            else:
                out[t][tlo:thi] = fill_missing(frames, scores[lo:hi][inside], n, method=method)
    return out


def score_timeline(
    data: SequenceSet, timeline: Mapping[str, np.ndarray], au_thresholds: np.ndarray | None = None,
    run_task: str | None = None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Official metrics over every validly labelled frame of the split (crop or not), videos concatenated.

    Tasks that tune thresholds (AU) score at the given ``au_thresholds``, or at thresholds tuned here when
    none are given (returned). ``run_task`` a task set (mtl) adds its combined metrics (``score``).
    """
    result: dict[str, Any] = {}
    thresholds = au_thresholds
    for t in timeline:
        if t not in data.labels:
            continue
        spec = single(t)
        labels, valid = data.labels[t], data.valid[t]
        if not valid.any():
            raise ConfigError(f"the {data.split} split has no valid {t} label to score")
        metrics, tuned = spec.score(timeline[t], labels, valid, thresholds if spec.tunes_thresholds else None)
        result.update(metrics)
        if spec.tunes_thresholds:
            thresholds = tuned
    if run_task is not None and len(task_names(run_task)) > 1:
        result.update(task(run_task).combine(result))  # type: ignore[union-attr]
    return result, thresholds


@dataclass
class Evaluation:
    """One validation pass: metrics.json-style keys, the loss, timeline scores and the AU thresholds."""

    metrics: dict[str, Any]
    loss: float
    timeline: dict[str, np.ndarray]
    au_thresholds: np.ndarray | None = None


def evaluate_set(
    model: nn.Module, data: SequenceSet, run_task: str, source: WindowSource, device: torch.device,
    precision: str, objective: Objective | None = None, au_thresholds: np.ndarray | None = None,
    fill: str = "interpolate",
) -> Evaluation:
    """Infer on every crop of ``data``, fill every frame, score by the official protocol."""
    tasks = task_names(run_task)
    weights = inference_weights(model, source.windows.shape[1])
    scores, loss = infer_rows(model, source.batches(0), data.n_rows, tasks, device, precision, objective,
                              weights)
    for name, values in scores.items():
        if not np.isfinite(values).all():
            # A diverged head (too high a learning rate): no metric means anything on NaN outputs.
            raise RunError(f"the head's {name} outputs on the {data.split} frames are NaN/inf: training "
                           "diverged; train it again with a lower --lr")
    timeline = fill_timeline(data, scores, fill)
    metrics, thresholds = score_timeline(data, timeline, au_thresholds, run_task)
    return Evaluation(metrics=metrics, loss=loss, timeline=timeline, au_thresholds=thresholds)


__all__ = ["Evaluation", "evaluate_set", "fill_timeline", "infer_rows", "inference_weights",
           "score_timeline"]
