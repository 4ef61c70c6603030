"""Stage two: ``fit(config)`` trains a head on cached features; ``evaluate(run_dir)`` re-scores a run.

The file reads top to bottom the way a run does:

1. configs (``TrainConfig``) and what each task/objective means;
2. batches: a ``Batch`` is what the model sees; ``WindowSource`` gathers batches of feature windows from one
   contiguous array by precomputed index windows (no per-video tensors, float32 only per batch);
3. objectives: the loss of a batch (``build_objective``);
4. inference and scoring, shared by training, ``evaluate`` and ``predict``: outputs on crops
   (``infer_rows``), spread to every frame (``fill_timeline``), turned into decisions (``decide``) and
   scored by the official protocol (``score_timeline``);
5. ``run_epochs``: THE training loop, generic over "a model that maps (inputs, mask) to outputs" and "a batch
   source", so ``finetune.py`` (frames in, DDAMFN + head) reuses it unchanged;
6. the run directory: config.json, checkpoint.pt, metrics.json, history.csv, val_outputs.npz, plots;
7. ``fit``: data, model, optimiser, loop, evaluation, checkpoint. ``evaluate``: load, check, score.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from abawfeat import __version__
from abawfeat.constants import AU_NAMES, EXPR_CLASSES, TASKS
from abawfeat.data.sequences import SequenceSet, load_split, make_windows
from abawfeat.errors import CacheError, CheckpointError, ConfigError
from abawfeat.heads import OUTPUT_DIMS, Head, build_head, head_from_dict, head_to_dict
from abawfeat.utils.configs import from_dict, read_json, to_dict
from abawfeat.utils.device import autocast, resolve_device, seed_everything, to_device
from abawfeat.utils.io import atomic_write, torch_save, write_json

# ------------------------------------------------------------------------------------------------ configs

TASK_CHOICES = ("va", "expr", "au", "mtl")
HEAD_CHOICES = ("fc", "lstm")
# The objective each task trains with unless told otherwise, and the tasks each objective can train.
DEFAULT_OBJECTIVE: dict[str, str] = {"va": "ccc", "expr": "ce", "au": "bce", "mtl": "mtl"}
OBJECTIVES: dict[str, tuple[tuple[str, ...], str]] = {
    "ccc": (("va",), "1 - mean CCC of valence and arousal over the batch's labelled frames"),
    "ce": (("expr",), "cross-entropy over the 8 classes (optional class weights)"),
    "bce": (("au",), "binary cross-entropy per AU (optional positive weights)"),
    "contrastive": (("expr",), "symmetric CLIP loss against the cache's prompt embeddings (CLIP caches)"),
    "mtl": (("mtl",), "masked sum of ccc + ce + bce, each over the frames labelled for its task"),
}
# The validation number that picks the best epoch (higher is better); it is what Table 3 reports.
SELECT_METRIC: dict[str, str] = {"va": "ccc_va", "expr": "f1_expr", "au": "f1_au_opt", "mtl": "score"}
CLASS_WEIGHT_CHOICES = ("none", "inverse", "sqrt_inverse", "effective")
# Default batch size in windows: frame-wise heads see single frames, temporal heads windows of --window.
# Temporal: 64 windows (4,096 frames of 64) rather than 32, because the LSTM's recurrent matrix products are
# batch-sized and twice the batch was ~1.3x the frames/s of a bare nn.LSTM on 2 CPU threads in an exploratory
# run (benchmarks/heads.py measures the default); on small datasets (the demo) pass --batch-size 32 for more
# steps per epoch.
DEFAULT_BATCH = {False: 1024, True: 64}
RUN_FILES = ("config.json", "checkpoint.pt", "metrics.json", "history.csv", "val_outputs.npz")
CHECKPOINT_FORMAT = "abawfeat-head"
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Everything a stage-two run depends on; saved as config.json, so a run can be redone from it."""

    task: str = "va"  # va | expr | au | mtl (one multi-task head on the union of the three tasks' frames)
    head: str = "fc"  # fc | lstm: the temporal model; objective/task pick the contrastive or multi-task head
    backbone: str = "ddamfn"  # encoder whose cache is read; names the default cache path
    data: str = ""  # Aff-Wild2 root (annotations, test lists, sample files); its folder name names the cache
    cache: str = ""  # feature cache; "" = abawfeat.cache.default_cache_path(dataset name, backbone)
    out: str = ""  # run directory
    objective: str = ""  # "" = the task's default (ccc, ce, bce, mtl); "contrastive" for expr on CLIP caches
    class_weights: str = "none"  # CE weighting (EXPR is skewed): none | inverse | sqrt_inverse | effective
    pos_weight: bool = False  # AU BCE: weight positives by negatives/positives per AU (rare AUs)
    epochs: int = 10  # passes over the training windows; the best validation epoch is kept
    seed: int = 0  # seeds weights, dropout and window order: same seed, same numbers on CPU
    lr: float = 1e-3  # AdamW learning rate (constant)
    weight_decay: float = 1e-4  # AdamW weight decay
    batch_size: int = 0  # windows per batch (frames for FC); 0 = 1024 frames (FC) or 64 windows (LSTM)
    window: int = 64  # LSTM training window in frames (crops); FC heads ignore it
    stride: int = 0  # step between training windows; 0 = window (no overlap)
    infer_stride: int = 0  # step between inference windows (outputs of overlaps averaged); 0 = window // 2
    hidden: int = -1  # -1 = head default (FC: 0 = linear; LSTM, MTL: 256; contrastive: 512 FC / 256 LSTM)
    layers: int = 1  # LSTM layers
    bidirectional: bool = False  # LSTM reads windows both ways
    dropout: float = 0.0  # on head inputs and hidden states
    device: str = "auto"  # auto | cpu | cuda[:N]
    # CPU threads for torch; 0 = auto: one for the FC head with a per-frame objective (its products are too
    # small to split: an epoch took 1.2-1.8x longer on two threads than on one, docs/performance.md), torch's
    # default (all cores) otherwise. On a machine shared with other jobs, 1 avoids threads waiting on each
    # other at every op (measured 3-20x slower).
    threads: int = 0
    precision: str = "auto"  # auto (bf16 for LSTM / contrastive heads, else fp32) | fp32 | bf16 | fp16 (CUDA)
    grad_clip: float = 1.0  # max gradient norm (LSTMs on long windows can spike); 0 = off
    fill: str = "interpolate"  # how frames without a crop get outputs: interpolate | nearest | previous
    plots: bool = True  # write plots/*.png at the end (matplotlib, seconds); a run is complete without them


def resolved_objective(cfg: TrainConfig) -> str:
    return cfg.objective or DEFAULT_OBJECTIVE[cfg.task]


def run_tasks(task: str) -> tuple[str, ...]:
    return TASKS if task == "mtl" else (task,)


def validate_config(cfg: TrainConfig) -> None:
    """Refuse impossible combinations with one line naming the option."""
    if cfg.task not in TASK_CHOICES:
        raise ConfigError(f"--task {cfg.task!r}: choose one of {', '.join(TASK_CHOICES)}")
    if cfg.head not in HEAD_CHOICES:
        raise ConfigError(f"--head {cfg.head!r}: choose one of {', '.join(HEAD_CHOICES)}")
    objective = resolved_objective(cfg)
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if cfg.task not in OBJECTIVES[objective][0]:
        raise ConfigError(
            f"--objective {objective} trains task(s) {', '.join(OBJECTIVES[objective][0])}, not {cfg.task}"
        )
    if cfg.class_weights not in CLASS_WEIGHT_CHOICES:
        raise ConfigError(
            f"--class-weights {cfg.class_weights!r}: choose one of {', '.join(CLASS_WEIGHT_CHOICES)}"
        )
    if cfg.class_weights != "none" and objective not in ("ce", "mtl"):
        raise ConfigError(f"--class-weights applies to the ce and mtl objectives, not {objective}")
    if cfg.pos_weight and objective not in ("bce", "mtl"):
        raise ConfigError(f"--pos-weight applies to the bce and mtl objectives, not {objective}")
    for name in ("epochs", "window"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("batch_size", "stride", "infer_stride", "layers", "threads"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.lr <= 0:
        raise ConfigError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision {cfg.precision!r}: choose auto, fp32, bf16 or fp16")
    if cfg.fill not in ("interpolate", "nearest", "previous"):
        raise ConfigError(f"fill {cfg.fill!r}: choose interpolate, nearest or previous")
    if not cfg.data:
        raise ConfigError("--data is required: the Aff-Wild2 root with the annotations")
    if not cfg.out:
        raise ConfigError("--out is required: the run directory to write")


def head_spec(cfg: TrainConfig, in_dim: int, text_dim: int | None = None) -> tuple[str, dict[str, Any]]:
    """Registry name and config fields of the head a TrainConfig asks for (``text_dim``: the prompt
    embeddings' size, which the contrastive projection must produce)."""
    objective = resolved_objective(cfg)
    fields: dict[str, Any] = {"in_dim": in_dim, "dropout": cfg.dropout}
    temporal = {"layers": max(cfg.layers, 1), "bidirectional": cfg.bidirectional}
    if objective == "contrastive":
        name = "contrastive"
        fields.update(trunk=cfg.head, **temporal)
        if text_dim is not None:
            fields["embed_dim"] = text_dim
    elif cfg.task == "mtl":
        name = "mtl"
        fields.update(trunk=cfg.head, **temporal)
    else:
        name = cfg.head
        fields["tasks"] = (cfg.task,)
        if name == "lstm":
            fields.update(temporal)
    if cfg.hidden >= 0:
        fields["hidden"] = cfg.hidden
    return name, fields


@dataclass
class Resolved:
    """Choices derived from a TrainConfig and the data; saved in config.json next to the config."""

    objective: str
    head_name: str
    temporal: bool
    window: int
    stride: int
    infer_window: int
    infer_stride: int
    batch_size: int
    infer_batch_size: int
    precision: str
    device: str


def resolve(cfg: TrainConfig, head: Head, device: torch.device) -> Resolved:
    temporal = head.is_temporal()
    # Frame-wise heads need no context: windows of one frame, shuffled frame by frame.
    window = cfg.window if temporal else 1
    stride = (cfg.stride or window) if temporal else 1
    infer_window = window if temporal else 256
    infer_stride = (cfg.infer_stride or max(window // 2, 1)) if temporal else infer_window
    # auto: bf16 where large matmuls dominate (LSTMs, the contrastive 512-512 projection): about half the
    # time on CPUs with AVX-512 BF16 (docs/performance.md); linear and small FC heads are cheap in fp32.
    heavy = temporal or head.name == "contrastive"
    precision = ("bf16" if heavy else "fp32") if cfg.precision == "auto" else cfg.precision
    batch = cfg.batch_size or DEFAULT_BATCH[temporal]
    infer_batch = max(batch, 8192 // infer_window)
    return Resolved(
        objective=resolved_objective(cfg), head_name=head.name, temporal=temporal, window=window,
        stride=stride, infer_window=infer_window, infer_stride=min(infer_stride, infer_window),
        batch_size=batch, infer_batch_size=infer_batch, precision=precision, device=str(device),
    )


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class Batch:
    """What one step sees. ``inputs`` [B, T, ...] (features here, frames in finetune.py), ``mask`` [B, T]
    real frames (padding only at the end), per task ``targets`` and ``valid`` [B, T] (labelled frames), and
    ``rows`` int64 [B, T], the row index of each position (-1 = padding) so outputs can be put back."""

    inputs: Tensor
    mask: Tensor
    targets: dict[str, Tensor]
    valid: dict[str, Tensor]
    rows: np.ndarray

    def to(self, device: torch.device) -> Batch:
        return Batch(
            inputs=to_device(self.inputs, device), mask=to_device(self.mask, device),
            targets={k: to_device(v, device) for k, v in self.targets.items()},
            valid={k: to_device(v, device) for k, v in self.valid.items()}, rows=self.rows,
        )


class BatchSource(Protocol):
    """Anything ``run_epochs`` can train on: ``batches(epoch)`` yields the epoch's batches."""

    def __len__(self) -> int: ...

    def batches(self, epoch: int) -> Iterator[Batch]: ...


class WindowSource:
    """Batches of feature windows gathered from a ``SequenceSet``'s contiguous array.

    ``windows`` int64 [W, L] (from ``make_windows``) are the only per-epoch state: shuffling permutes their
    order with a generator seeded by (seed, epoch), so the order is reproducible and differs per epoch.
    Gathering is one NumPy fancy index per batch into the fp16 array; inputs stay fp16 (half the bytes to
    copy or send to a GPU) and become float32 inside the head.
    """

    def __init__(
        self, data: SequenceSet, windows: np.ndarray, tasks: Sequence[str], batch_size: int,
        shuffle: bool, seed: int = 0,
    ) -> None:
        self.data = data
        self.windows = windows
        self.tasks = tuple(tasks)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.labels = {t: data.row_labels(t) for t in self.tasks}

    def __len__(self) -> int:
        return math.ceil(len(self.windows) / self.batch_size)

    def batches(self, epoch: int = 0) -> Iterator[Batch]:
        order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.windows)) if self.shuffle
                 else np.arange(len(self.windows)))
        for start in range(0, len(order), self.batch_size):
            # Sorted within the batch: the batch is the same set (losses do not depend on its order), but
            # rows are read in address order, which is markedly faster from a 1.7 GB array.
            idx = self.windows[np.sort(order[start : start + self.batch_size])]
            yield self.gather(idx)

    def gather(self, idx: np.ndarray) -> Batch:
        real = idx >= 0
        safe = np.where(real, idx, 0)
        # Still in the cache's dtype (fp16): the head converts while standardising, in one pass.
        inputs = torch.from_numpy(self.data.features[safe])
        mask = torch.from_numpy(real)
        targets, valid = {}, {}
        for t in self.tasks:
            lab, ok = self.labels[t]
            target = lab[safe]
            targets[t] = torch.from_numpy(target.astype(np.float32) if t != "expr" else target)
            valid[t] = torch.from_numpy(ok[safe] & real)
        return Batch(inputs=inputs, mask=mask, targets=targets, valid=valid, rows=idx)


# --------------------------------------------------------------------------------------------- objectives

Objective = Callable[[Mapping[str, Tensor], Batch], tuple[Tensor, dict[str, float]]]


def build_objective(
    name: str, head: nn.Module, tasks: Sequence[str], class_weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
) -> Objective:
    """The loss of a batch, masked to the frames labelled for each task. ``head`` is needed only by the
    contrastive objective (its prompt embeddings and learnable temperature live in the head)."""
    from abawfeat import losses

    def ccc(out: Mapping[str, Tensor], b: Batch) -> tuple[Tensor, dict[str, float]]:
        loss = losses.ccc_loss(out["va"], b.targets["va"], b.valid["va"])
        return loss, {"va": float(loss.detach())}

    def ce(out: Mapping[str, Tensor], b: Batch) -> tuple[Tensor, dict[str, float]]:
        loss = losses.expr_ce_loss(out["expr"], b.targets["expr"], b.valid["expr"], class_weight)
        return loss, {"expr": float(loss.detach())}

    def bce(out: Mapping[str, Tensor], b: Batch) -> tuple[Tensor, dict[str, float]]:
        loss = losses.au_bce_loss(out["au"], b.targets["au"], b.valid["au"], pos_weight)
        return loss, {"au": float(loss.detach())}

    def contrastive(out: Mapping[str, Tensor], b: Batch) -> tuple[Tensor, dict[str, float]]:
        loss = losses.clip_contrastive_loss(
            out["expr_embedding"], head.text_emb, b.targets["expr"], head.logit_scale.log_scale,
            b.valid["expr"],
        )
        return loss, {"expr": float(loss.detach())}

    def mtl(out: Mapping[str, Tensor], b: Batch) -> tuple[Tensor, dict[str, float]]:
        kwargs = {"expr": {"class_weight": class_weight}, "au": {"pos_weight": pos_weight}}
        return losses.mtl_loss({t: out[t] for t in tasks}, b.targets, b.valid, task_kwargs=kwargs)

    table = {"ccc": ccc, "ce": ce, "bce": bce, "contrastive": contrastive, "mtl": mtl}
    if name not in table:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(table)}")
    return table[name]


# ------------------------------------------------------------------------------------ inference & scoring


def to_scores(task: str, output: Tensor) -> Tensor:
    """Head output -> what is averaged, filled and saved: VA values, EXPR / AU probabilities."""
    if task == "va":
        return output.clamp(-1.0, 1.0)
    if task == "expr":
        return torch.softmax(output, dim=-1)
    return torch.sigmoid(output)


def context_weights(length: int, bidirectional: bool) -> np.ndarray:
    """Weight of each window position when overlapping windows are averaged: the context the model had
    there. A forward LSTM at position p has seen p + 1 frames, so late positions count more; a bidirectional
    one sees min(p + 1, L - p), so the middle counts most. A frame at a video's start only ever has small
    context, and still gets a prediction (all weights are positive)."""
    p = np.arange(length, dtype=np.float64)
    return np.minimum(p + 1, length - p) if bidirectional else p + 1


@torch.no_grad()
def infer_rows(
    model: nn.Module, batches: Iterator[Batch] | Sequence[Batch], n_rows: int, tasks: Sequence[str],
    device: torch.device, precision: str = "fp32", objective: Objective | None = None,
    position_weights: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """Run ``model`` over batches whose ``rows`` cover rows 0..n_rows-1; return per task the scores per
    row (float32 [R, K]; a row seen by several overlapping windows gets their average, weighted by
    ``position_weights`` [T] when given, see ``context_weights``) and the mean loss of the batches
    (weighted by their labelled frames; NaN without an objective)."""
    model.eval()
    acc = {t: torch.zeros(n_rows, OUTPUT_DIMS[t]) for t in tasks}
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
        for t in tasks:
            s = to_scores(t, out[t].float()).reshape(-1, OUTPUT_DIMS[t]).cpu()
            acc[t].index_add_(0, rows, s[keep] * w[:, None])
        count.index_add_(0, rows, w)
    if n_rows and bool((count == 0).any()):
        raise RuntimeError(f"infer_rows: {int((count == 0).sum())} rows were not covered by any batch")
    denom = count.clamp(min=1e-12)[:, None]
    scores = {t: (acc[t] / denom).numpy() for t in tasks}
    return scores, (loss_sum / loss_n if loss_n else math.nan)


def _no_crop_scores(task: str, n: int) -> np.ndarray:
    # A video whose face was never found: VA 0, uniform expression probabilities, no AU.
    fill = {"va": 0.0, "expr": 1.0 / len(EXPR_CLASSES), "au": 0.0}[task]
    return np.full((n, OUTPUT_DIMS[task]), fill, dtype=np.float64)


def fill_timeline(
    data: SequenceSet, row_scores: Mapping[str, np.ndarray], method: str = "interpolate", window: int = 0,
) -> dict[str, np.ndarray]:
    """Scores on every timeline frame: each video's crop scores spread over frames 1..N with
    ``submission.fill_missing`` (``method``), then optionally ``submission.smooth`` (odd ``window`` > 1).
    This is THE rule for frames without a crop; ``evaluate`` and ``predict`` both go through it."""
    from abawfeat.submission import fill_missing, smooth

    out = {t: np.empty((data.n_timeline, OUTPUT_DIMS[t]), dtype=np.float64) for t in row_scores}
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
                values = _no_crop_scores(t, n)
            else:
                values = fill_missing(frames, scores[lo:hi][inside], n, method=method)
            if window and window > 1:
                values = smooth(values, window)
            out[t][tlo:thi] = values
    return out


def decide(
    task: str, scores: np.ndarray, thresholds: np.ndarray | Sequence[float] | None = None
) -> np.ndarray:
    """Scores -> what a submission file holds: VA clipped to [-1, 1], EXPR the argmax class, AU 0/1 with
    ``prob >= threshold`` (per-AU thresholds, 0.5 when none are given)."""
    if task == "va":
        return np.clip(scores, -1.0, 1.0)
    if task == "expr":
        return np.argmax(scores, axis=1).astype(np.int64)
    t = np.full(len(AU_NAMES), 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    return (scores >= t[None, :]).astype(np.int8)


def score_timeline(
    data: SequenceSet, timeline: Mapping[str, np.ndarray], au_thresholds: np.ndarray | None = None,
    task: str | None = None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Official metrics over every validly labelled frame of the split (crop or not), videos concatenated.

    AU: ``f1_au`` at 0.5 and ``f1_au_opt`` at ``au_thresholds``, or at thresholds tuned here when none are
    given (returned). ``task == "mtl"`` adds ``score`` = CCC_VA + F1_EXPR + F1_AU(tuned thresholds): the
    tuned thresholds are what the run's AU predictions use.
    """
    from abawfeat import metrics as M

    result: dict[str, Any] = {}
    thresholds = au_thresholds
    for t in timeline:
        if t not in data.labels:
            continue
        labels, valid = data.labels[t], data.valid[t]
        if not valid.any():
            raise ConfigError(f"the {data.split} split has no valid {t} label to score")
        scores = timeline[t]
        if t == "va":
            result.update(M.va_metrics(decide("va", scores), labels, valid))
        elif t == "expr":
            result.update(M.expr_metrics(decide("expr", scores), labels, valid))
        else:
            result.update(M.au_metrics(decide("au", scores), labels, valid))
            if thresholds is None:
                thresholds = M.tune_au_thresholds(scores, labels, valid=valid)
            result.update(M.au_metrics_tuned(scores, labels, thresholds, valid=valid))
    if task == "mtl":
        result["score"] = M.mtl_score(result, result, result["f1_au_opt"])
    return result, thresholds


def inference_weights(model: nn.Module, source: WindowSource) -> np.ndarray | None:
    """Position weights for a temporal head's overlapping inference windows (None for frame-wise heads)."""
    is_temporal = getattr(model, "is_temporal", None)
    if is_temporal is None or not is_temporal():
        return None
    bidirectional = bool(getattr(getattr(model, "config", None), "bidirectional", False))
    return context_weights(source.windows.shape[1], bidirectional)


@dataclass
class Evaluation:
    """One validation pass: metrics.json-style keys, the loss, timeline scores and the AU thresholds."""

    metrics: dict[str, Any]
    loss: float
    timeline: dict[str, np.ndarray]
    au_thresholds: np.ndarray | None = None


def evaluate_set(
    model: nn.Module, data: SequenceSet, task: str, source: WindowSource, device: torch.device,
    precision: str, objective: Objective | None = None, au_thresholds: np.ndarray | None = None,
    fill: str = "interpolate", smooth_window: int = 0,
) -> Evaluation:
    """Infer on every crop of ``data``, fill every frame, score by the official protocol."""
    tasks = run_tasks(task)
    weights = inference_weights(model, source)
    scores, loss = infer_rows(model, source.batches(0), data.n_rows, tasks, device, precision, objective,
                              weights)
    timeline = fill_timeline(data, scores, fill, smooth_window)
    metrics, thresholds = score_timeline(data, timeline, au_thresholds, task)
    return Evaluation(metrics=metrics, loss=loss, timeline=timeline, au_thresholds=thresholds)


# --------------------------------------------------------------------------------------------- the loop


def make_step(
    objective: Objective, optimizer: torch.optim.Optimizer, device: torch.device, precision: str = "fp32",
    grad_clip: float = 0.0,
) -> Callable[[nn.Module, Batch], float]:
    """The default optimiser step: forward one batch under autocast, loss, backward, clip, step."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(model: nn.Module, batch: Batch) -> float:
        b = batch.to(device)
        with autocast(device, precision):
            out = model(b.inputs, b.mask)
            loss, _ = objective(out, b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        return float(loss.detach())

    return step


def run_epochs(
    model: nn.Module,
    train: BatchSource,
    validate: Callable[[nn.Module], Evaluation],
    objective: Objective | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    epochs: int,
    select: str,
    device: torch.device | None = None,
    precision: str = "fp32",
    grad_clip: float = 0.0,
    step: Callable[[nn.Module, Any], float] | None = None,
    on_best: Callable[[int, Evaluation], None] | None = None,
    on_epoch: Callable[[int, list[dict[str, Any]], float], None] | None = None,
    log: Callable[[str], None] | None = None,
    start_epoch: int = 1,
    stop_epoch: int | None = None,
    history: list[dict[str, Any]] | None = None,
    best: float = -math.inf,
    reduce_mean: Callable[[float], float] = lambda x: x,
) -> list[dict[str, Any]]:
    """Train epochs ``start_epoch``..``min(epochs, stop_epoch)``, validate after each, call ``on_best`` when
    ``metrics[select]`` strictly improves (ties keep the earlier epoch; NaN never improves).

    Generic: ``train.batches(epoch)`` yields whatever ``step(model, item) -> loss`` consumes; by default
    ``item`` is a ``Batch`` and the step is ``make_step(objective, optimizer, device, precision,
    grad_clip)``, i.e. ``model(batch.inputs, batch.mask) -> {task: outputs}``, loss, backward, step. A
    custom ``step`` (gradient accumulation over micro-batches, distributed training) replaces it.
    ``validate(model) -> Evaluation``. ``on_epoch(epoch, history, best)`` runs after every epoch (write
    history and resumable state there); ``reduce_mean`` averages the epoch's train loss across processes.
    ``history``/``best`` let a resumed run continue where it stopped. Returns the history rows.
    """
    if step is None:
        if objective is None or optimizer is None:
            raise ValueError("run_epochs needs either step= or both objective and optimizer")
        step = make_step(objective, optimizer, device or torch.device("cpu"), precision, grad_clip)
    history = list(history or [])
    last = epochs if stop_epoch is None else min(epochs, stop_epoch)
    for epoch in range(start_epoch, last + 1):
        t0 = time.perf_counter()
        model.train()
        total, n_steps = 0.0, 0
        for item in train.batches(epoch):
            total += step(model, item)
            n_steps += 1
        train_loss = reduce_mean(total / max(n_steps, 1))
        evaluation = validate(model)
        value = float(evaluation.metrics.get(select, math.nan))
        improved = value > best
        if improved:
            best = value
            if on_best is not None:
                on_best(epoch, evaluation)
        row: dict[str, Any] = {
            "epoch": epoch, "train_loss": train_loss, "val_loss": evaluation.loss, "val_metric": value,
            "seconds": time.perf_counter() - t0,
        }
        row.update({k: v for k, v in evaluation.metrics.items() if isinstance(v, float)})
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, history, best)
        if log is not None:
            log(f"epoch {epoch}/{epochs}  train_loss {train_loss:.4f}  val_loss {evaluation.loss:.4f}  "
                f"{select} {value:.4f}{'  (best)' if improved else ''}  {row['seconds']:.1f}s")
    return history


# ----------------------------------------------------------------------------------------- run directory


def write_history(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    base = ["epoch", "train_loss", "val_loss", "val_metric", "seconds"]
    extra = sorted({k for row in history for k in row} - set(base))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=base + extra)
            w.writeheader()
            for row in history:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    atomic_write(path, write)


def save_checkpoint(
    path: Path, head: Head, fingerprint: Mapping[str, Any], au_thresholds: np.ndarray | None, epoch: int,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Head description + weights + the cache fingerprint + AU thresholds: all ``load_run`` needs."""
    state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "head": head_to_dict(head),
        "state_dict": state, "fingerprint": dict(fingerprint), "epoch": int(epoch),
        "au_thresholds": None if au_thresholds is None else [float(x) for x in au_thresholds],
        "package_version": __version__, **dict(extra or {}),
    }
    torch_save(path, payload)


def write_val_outputs(path: Path, data: SequenceSet, timeline: Mapping[str, np.ndarray]) -> None:
    """val_outputs.npz: one row per timeline frame (official protocol, crop or not)."""
    video, frame, has_crop = data.timeline_frames()
    arrays: dict[str, np.ndarray] = {"video": video, "frame": frame, "has_crop": has_crop}
    names = {"va": "va_pred", "expr": "expr_prob", "au": "au_prob"}
    for t, scores in timeline.items():
        arrays[names[t]] = scores.astype(np.float32)
        if t in data.labels:
            arrays[f"{t}_label"] = data.labels[t]
            arrays[f"{t}_valid"] = data.valid[t]

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write)


def metrics_record(
    task: str, split: str, best_epoch: int | None, metrics: Mapping[str, Any]
) -> dict[str, Any]:
    """metrics.json: ``task``, ``split``, ``best_epoch`` then the metrics (docs/architecture.md keys)."""
    return {"task": task, "split": split, "best_epoch": best_epoch, **dict(metrics)}


def write_plots(
    run_dir: Path, metrics: Mapping[str, Any] | None = None, log: Callable[[str], None] | None = None
) -> None:
    """Plots if the report module (and matplotlib) is there; a plotting problem never fails a run.
    ``metrics`` is passed along because metrics.json, the completion mark, is written after the plots."""
    try:
        from abawfeat.report.plots import write_run_plots
    except Exception as exc:  # missing matplotlib or module: the run is still complete without pictures
        if log:
            log(f"plots skipped ({type(exc).__name__}: {exc})")
        return
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_run_plots(run_dir, metrics=metrics)
    except Exception as exc:
        if log:
            log(f"plots skipped ({type(exc).__name__}: {exc})")


@dataclass
class LoadedRun:
    """A run directory read back: the head (eval mode, trained weights) and what it was trained on."""

    run_dir: Path
    config: TrainConfig
    head: Head
    fingerprint: dict[str, Any]
    au_thresholds: np.ndarray | None
    best_epoch: int
    info: dict[str, Any] = field(default_factory=dict)  # config.json as written

    @property
    def resolved(self) -> dict[str, Any]:
        return dict(self.info.get("resolved", {}))


def load_versioned(path: Path, fmt: str, version: int, noun: str, kind: str) -> dict[str, Any]:
    """Load one of our torch payloads safely (weights_only) and check its format tag and version, so a
    foreign or newer file is refused in one line instead of failing later. ``noun`` names the file in
    messages (e.g. "checkpoint"), ``kind`` what it should have been (e.g. "head checkpoint")."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable {noun} ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise CheckpointError(f"{path}: not an abawfeat {kind}")
    if payload.get("version") != version:
        short = noun.split()[-1]
        raise CheckpointError(f"{path}: {short} version {payload.get('version')} is not supported "
                              f"(this abawfeat reads version {version})")
    return payload


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a trained head from ``run_dir`` (config.json + checkpoint.pt) without the command line."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    cfg_path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    if not ckpt_path.is_file():
        raise CheckpointError(
            f"{ckpt_path}: missing (the run did not finish an epoch, or this is not a run directory)"
        )
    payload = load_versioned(
        ckpt_path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "checkpoint", "head checkpoint"
    )
    head = head_from_dict(payload["head"], where=str(ckpt_path))
    try:
        head.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt_path}: weights do not fit the saved head config ({exc})") from None
    head.eval()
    info = read_json(cfg_path) if cfg_path.is_file() else {}
    config = from_dict(TrainConfig, info.get("train", info)) if info else TrainConfig()
    thresholds = payload.get("au_thresholds")
    return LoadedRun(
        run_dir=run_dir, config=config, head=head, fingerprint=dict(payload.get("fingerprint") or {}),
        au_thresholds=None if thresholds is None else np.asarray(thresholds, dtype=np.float64),
        best_epoch=int(payload.get("epoch", 0)), info=info,
    )


def check_fingerprint(expected: Mapping[str, Any], cache: Any, where: str | Path) -> None:
    """Refuse a cache whose encoder, dimension, weights, preprocessing or calibration differ from the ones
    the checkpoint was trained on: its features would be silently meaningless to the head."""
    found = cache.fingerprint()
    differ = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
    if differ:
        def short(fp: Mapping[str, Any]) -> str:
            return f"encoder {fp.get('encoder')}, dim {fp.get('feature_dim')}"

        raise CheckpointError(
            f"{where}: trained on features of {short(expected)} but {cache.path} holds {short(found)}; "
            f"cache fingerprint differs in {', '.join(differ)} (re-extract with the run's encoder settings "
            "or train a head on this cache)"
        )


def dataset_name(data_root: str | Path) -> str:
    """The data root's folder name, as ``AffWild2.name`` spells it (abspath: a symlink keeps its name)."""
    return Path(os.path.abspath(data_root)).name


def default_cache(data_root: str | Path, backbone: str) -> Path:
    """Where ``abawfeat extract`` writes the cache of ``backbone`` for this data root by default."""
    from abawfeat.cache import default_cache_path

    return default_cache_path(dataset_name(data_root), backbone)


def open_data(root: str | Path) -> Any:
    from abawfeat.data.affwild2 import AffWild2

    return AffWild2(root)


def open_cache(path: str | Path) -> Any:
    from abawfeat.cache import FeatureCache

    return FeatureCache(path)


def run_is_complete(run_dir: str | Path, cfg: TrainConfig | None = None) -> bool:
    """Every run file is there (metrics.json is written last) and, if ``cfg`` is given, config.json holds
    the same settings and the cache still has the fingerprint the run was trained on. Settings that do not
    change what is learned (where the run is, CPU threads, plots) are not compared."""
    run_dir = Path(run_dir)
    if not all((run_dir / f).is_file() for f in RUN_FILES):
        return False
    if cfg is None:
        return True
    try:
        info = read_json(run_dir / "config.json")
    except (OSError, ValueError):
        return False
    stored = dict(info.get("train", {}))
    wanted = to_dict(cfg)
    for key in ("out", "threads", "plots"):
        stored.pop(key, None)
        wanted.pop(key, None)
    if stored != wanted:
        return False
    cache_path = info.get("cache_path")
    try:
        with open_cache(cache_path) as cache:
            return cache.fingerprint() == info.get("cache_fingerprint")
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------ fit


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


def _text_embeddings_in_class_order(cache: Any) -> np.ndarray:
    """The cache's prompt embeddings [8, D] in EXPR_CLASSES order (the order of the head's outputs).

    extract stores one prompt per class and records the class of each (``prompt_classes`` in the encoder
    provenance); without that record the cache format's rule applies: prompts are in EXPR_CLASSES order.
    """
    text = cache.text_embeddings()
    if text is None:
        raise CacheError(f"{cache.path}: has no class-prompt text embeddings; --objective contrastive "
                         "needs a CLIP cache (`abawfeat extract --backbone clip`)")
    names, emb = text
    prov = cache.provenance
    classes = (prov.get("encoder_provenance") or {}).get("prompt_classes") or prov.get("prompt_classes")
    classes = list(classes) if classes else list(EXPR_CLASSES)
    if len(classes) != len(names) or sorted(classes) != sorted(EXPR_CLASSES):
        raise CacheError(f"{cache.path}: {len(names)} text prompts for classes {classes}; the contrastive "
                         f"head needs one prompt per class of {', '.join(EXPR_CLASSES)}")
    order = [classes.index(c) for c in EXPR_CLASSES]
    return np.asarray(emb, dtype=np.float32)[order]


def fit(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> FitResult:
    """Train one head on a cache and write the run directory. Returns the best epoch's metrics."""
    validate_config(cfg)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif cfg.head == "fc" and resolved_objective(cfg) != "contrastive":
        torch.set_num_threads(1)
    try:
        return _fit(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _fit(cfg: TrainConfig, log: Callable[[str], None] | None) -> FitResult:
    say = log or (lambda _msg: None)
    out = Path(cfg.out)
    tasks = run_tasks(cfg.task)
    objective_name = resolved_objective(cfg)

    # -- data: the two splits, packed once; the cache is read only here.
    data = open_data(cfg.data)
    cache_path = Path(cfg.cache) if cfg.cache else default_cache(cfg.data, cfg.backbone)
    with open_cache(cache_path) as cache:
        fingerprint = cache.fingerprint()
        text = _text_embeddings_in_class_order(cache) if objective_name == "contrastive" else None
        train_set = load_split(data, cache, tasks, "train")
        val_set = load_split(data, cache, tasks, "val")
        cache_dtype = str(cache.dtype)
        in_dim = int(cache.feature_dim)
    say(f"train: {len(train_set.videos)} videos, {train_set.n_rows:,} crops; "
        f"val: {len(val_set.videos)} videos, {val_set.n_timeline:,} frames")

    # -- model: seeded, standardised on the training crops, prompts loaded for the contrastive head.
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    name, fields = head_spec(cfg, in_dim, None if text is None else int(text.shape[1]))
    head = build_head(name, **fields)
    if head.config.normalize:
        mean, std = train_set.feature_stats()
        head.set_feature_stats(torch.from_numpy(mean), torch.from_numpy(std))
    if text is not None:
        head.set_text_embeddings(torch.from_numpy(text))
    head.to(device)
    res = resolve(cfg, head, device)

    # -- windows and batch sources (index arrays computed once).
    train_windows = make_windows(train_set.row_offsets, res.window, res.stride, keep=train_set.row_weight())
    if len(train_windows) == 0:
        raise ConfigError(f"{cfg.data}: no training crop carries a {'/'.join(tasks)} label in {cache_path}")
    train_source = WindowSource(train_set, train_windows, tasks, res.batch_size, shuffle=True, seed=cfg.seed)
    val_source = WindowSource(val_set, make_windows(val_set.row_offsets, res.infer_window, res.infer_stride),
                              tasks, res.infer_batch_size, shuffle=False)

    # -- objective (class / positive weights from the training crops' labels) and optimiser.
    class_weight = pos_weight = None
    from abawfeat import losses

    if cfg.class_weights != "none":
        lab, ok = train_set.row_labels("expr")
        class_weight = losses.class_weights_from_counts(
            np.bincount(lab[ok], minlength=len(EXPR_CLASSES)), scheme=cfg.class_weights
        ).to(device)
    if cfg.pos_weight:
        lab, ok = train_set.row_labels("au")
        pos_weight = losses.pos_weight_from_labels(lab, ok).to(device)
    objective = build_objective(objective_name, head, tasks, class_weight, pos_weight)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    # -- run directory: files of an earlier run here are removed (only the names a run writes), so a crash
    # never leaves an old checkpoint next to the new config; metrics.json, the completion mark, comes last.
    out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", *RUN_FILES):
        (out / name).unlink(missing_ok=True)
    for png in (out / "plots").glob("*.png"):
        png.unlink()
    info = {
        "task": cfg.task, "head": cfg.head, "backbone": cfg.backbone, "objective": objective_name,
        "train": to_dict(cfg), "resolved": to_dict(res), "head_config": head_to_dict(head),
        "cache_path": str(cache_path), "cache_fingerprint": fingerprint, "cache_dtype": cache_dtype,
        "dataset": {"root": str(cfg.data), "name": dataset_name(cfg.data)},
        "class_weight": None if class_weight is None else class_weight.cpu().tolist(),
        "pos_weight": None if pos_weight is None else pos_weight.cpu().tolist(),
        "package_version": __version__,
    }
    write_json(out / "config.json", info)

    best: dict[str, Any] = {}

    def validate(model: nn.Module) -> Evaluation:
        return evaluate_set(model, val_set, cfg.task, val_source, device, res.precision, objective,
                            fill=cfg.fill)

    def on_best(epoch: int, ev: Evaluation) -> None:
        best.update(epoch=epoch, evaluation=ev)
        save_checkpoint(out / "checkpoint.pt", head, fingerprint, ev.au_thresholds, epoch,
                        {"metrics": ev.metrics})

    history = run_epochs(
        head, train_source, validate, objective, optimizer, epochs=cfg.epochs, select=SELECT_METRIC[cfg.task],
        device=device, precision=res.precision, grad_clip=cfg.grad_clip, on_best=on_best,
        on_epoch=lambda _epoch, h, _best: write_history(out / "history.csv", h), log=say,
    )
    if not best:
        raise ConfigError(f"{out}: no epoch produced a finite {SELECT_METRIC[cfg.task]} (diverged?); "
                          "try a lower --lr")
    ev: Evaluation = best["evaluation"]
    write_val_outputs(out / "val_outputs.npz", val_set, ev.timeline)
    record = metrics_record(cfg.task, "val", best["epoch"], ev.metrics)
    if cfg.plots:
        write_plots(out, record, log)
    write_json(out / "metrics.json", record)  # last: its presence marks a complete run
    return FitResult(run_dir=out, metrics=record, history=history)


# ------------------------------------------------------------------------------------------- evaluate


def prepare_inference(
    run: LoadedRun, split: str, data_root: str | Path | None = None, cache_path: str | Path | None = None,
) -> tuple[SequenceSet, WindowSource, torch.device, str]:
    """Open the run's data and cache (or overrides), refuse a foreign cache, pack the split."""
    cfg = run.config
    root = data_root or cfg.data
    path = Path(cache_path or run.info.get("cache_path") or default_cache(root, cfg.backbone))
    data = open_data(root)
    with open_cache(path) as cache:
        check_fingerprint(run.fingerprint, cache, run.run_dir / "checkpoint.pt")
        seqs = load_split(data, cache, run_tasks(cfg.task), split)
    device = resolve_device(cfg.device)
    res = run.resolved
    head = run.head.to(device)
    window = int(res.get("infer_window", cfg.window if head.is_temporal() else 256))
    stride = int(res.get("infer_stride", max(window // 2, 1)))
    batch = int(res.get("infer_batch_size", 256))
    precision = str(res.get("precision", "fp32"))
    source = WindowSource(seqs, make_windows(seqs.row_offsets, window, stride), run_tasks(cfg.task), batch,
                          shuffle=False)
    return seqs, source, device, precision


def evaluate(
    run_dir: str | Path, split: str = "val", data_root: str | Path | None = None,
    cache_path: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of a trained run on ``split`` (train or val) by the official protocol, with the run's own
    AU thresholds. On val this reproduces metrics.json (same weights, same batches, same fill)."""
    if split not in ("train", "val"):
        raise ConfigError(f"--split {split!r}: evaluate needs labels, use val or train")
    run = load_run(run_dir)
    seqs, source, device, precision = prepare_inference(run, split, data_root, cache_path)
    tasks = run_tasks(run.config.task)
    scores, _ = infer_rows(run.head, source.batches(0), seqs.n_rows, tasks, device, precision,
                           position_weights=inference_weights(run.head, source))
    timeline = fill_timeline(seqs, scores, run.config.fill)
    thresholds = run.au_thresholds if "au" in tasks else None
    if "au" in tasks and thresholds is None:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoint.pt'}: no AU thresholds saved")
    metrics, _ = score_timeline(seqs, timeline, thresholds, run.config.task)
    return metrics_record(run.config.task, split, run.best_epoch, metrics)


__all__ = [
    "DEFAULT_OBJECTIVE", "OBJECTIVES", "SELECT_METRIC", "Batch", "BatchSource", "Evaluation", "FitResult",
    "LoadedRun", "Objective", "Resolved", "TrainConfig", "WindowSource", "build_objective",
    "check_fingerprint", "context_weights", "decide", "evaluate", "evaluate_set", "fill_timeline", "fit",
    "head_spec", "infer_rows", "inference_weights", "load_run", "make_step", "metrics_record",
    "prepare_inference", "resolve", "run_epochs", "run_is_complete", "run_tasks", "save_checkpoint",
    "score_timeline", "to_scores", "validate_config", "write_history", "write_plots", "write_val_outputs",
]
