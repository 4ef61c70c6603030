"""THE training loop of the package: generic over "a model that maps (inputs, mask) to outputs" and "a batch
source", so fine-tuning (frames in, encoder + head) reuses it unchanged."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from abawfeat.data.batches import Batch, BatchSource
from abawfeat.errors import RunError
from abawfeat.train.inference import Evaluation
from abawfeat.train.objectives import Objective
from abawfeat.utils.device import autocast


def make_step(
    objective: Objective, optimizer: torch.optim.Optimizer, device: torch.device, precision: str = "fp32",
    grad_clip: float = 0.0,
) -> Callable[[nn.Module, Batch], tuple[float, dict[str, float]]]:
    """The default optimiser step: forward one batch under autocast, loss, backward, clip, step. Returns
    the loss and the objective's ``train_*`` terms (a mixture-of-experts head's load balance), which the
    loop averages per epoch into the history."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(model: nn.Module, batch: Batch) -> float:
        b = batch.to(device)
        with autocast(device, precision):
            out = model(b.inputs, b.mask)
            loss, info = objective(out, b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        return float(loss.detach()), {k: v for k, v in info.items() if k.startswith("train_")}

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
    step: Callable[[nn.Module, Any], Any] | None = None,
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

    Generic: ``train.batches(epoch)`` yields whatever ``step(model, item) -> loss`` (or ``(loss, terms)``,
    whose ``train_*`` terms are averaged into the epoch's history row) consumes; by default
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
        terms: dict[str, float] = {}
        for item in train.batches(epoch):
            result = step(model, item)
            loss, info = result if isinstance(result, tuple) else (result, {})
            total += loss
            for k, v in info.items():
                terms[k] = terms.get(k, 0.0) + v
            n_steps += 1
        train_loss = reduce_mean(total / max(n_steps, 1))
        if not math.isfinite(train_loss):
            # A diverged run (too high a learning rate, or non-finite inputs): its outputs are NaN and no
            # metric can be computed on them; said here, in one line, rather than by a metric's traceback.
            raise RunError(f"training diverged in epoch {epoch}: the training loss is {train_loss} "
                           "(NaN/inf); the epochs before it are kept, but continuing would diverge again: "
                           "train it again with a lower --lr")
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
        row.update({k: reduce_mean(v / max(n_steps, 1)) for k, v in terms.items()})
        row.update({k: v for k, v in evaluation.metrics.items() if isinstance(v, float)})
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, history, best)
        if log is not None:
            log(f"epoch {epoch}/{epochs}  train_loss {train_loss:.4f}  val_loss {evaluation.loss:.4f}  "
                f"{select} {value:.4f}{'  (best)' if improved else ''}  {row['seconds']:.1f}s")
    return history


__all__ = ["make_step", "run_epochs"]
