"""``fit(config)``: train one head on a cache and write its run directory.

Reads top to bottom the way a run goes: the run directory (refused or staged before anything slow), data,
model, batches, objective and optimiser, the state of an interrupted run, the loop with a validation pass
after every epoch, and the files, metrics.json last.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abawfeat.data.batches import WindowSource
from abawfeat.data.sequences import load_split, make_windows
from abawfeat.errors import ConfigError, RunError
from abawfeat.tasks import task, task_names
from abawfeat.train.config import (
    TrainConfig,
    build_head_for,
    dataset_name,
    default_cache,
    objective_name,
    resolve,
    trunk_context,
    validate_config,
)
from abawfeat.train.inference import Evaluation, evaluate_set
from abawfeat.train.loop import run_epochs
from abawfeat.train.objectives import (
    OBJECTIVES,
    build_objective,
    loss_weights,
    text_embeddings_in_class_order,
)
from abawfeat.train.rundir import (
    CHECKPOINT_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    OUTPUTS_FILE,
    STATE_FILE,
    RunDir,
    RunRecord,
    architecture_label,
    load_state,
    metrics_record,
    on_disk_full,
    open_run_dir,
    run_matches,
    run_state,
    save_checkpoint,
    save_state,
    write_history,
    write_val_outputs,
)
from abawfeat.utils.configs import from_dict, to_dict
from abawfeat.utils.device import resolve_device, seed_everything
from abawfeat.utils.io import write_json

# Settings that do not change what a run learns: a resumed or re-planned run may differ in them.
RUN_ONLY_SETTINGS = ("out", "threads", "plots")


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


def fit(cfg: TrainConfig, log: Callable[[str], None] | None = None, *, overwrite: bool = False,
        resume: bool = False) -> FitResult:
    """Train one head on a cache and write the run directory ``cfg.out``; returns the best epoch's metrics.

    ``overwrite``: replace a complete (or interrupted) run there, once the new one is complete.
    ``resume``: continue the interrupted run there from its last finished epoch, exactly.
    """
    validate_config(cfg)
    run = open_run_dir(cfg.out, overwrite=overwrite, resume=resume)
    if resume:
        _check_same_settings(run, cfg)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif not trunk_context(cfg).temporal and OBJECTIVES.get(objective_name(cfg)).head == "tasks":
        # A frame-wise head's products are too small to split over threads (docs/performance.md).
        torch.set_num_threads(1)
    try:
        return on_disk_full(run, lambda: _fit(cfg, run, log))
    except BaseException:
        run.abandon()
        raise
    finally:
        torch.set_num_threads(threads)


def _check_same_settings(run: RunDir, cfg: TrainConfig) -> None:
    stored = dict(RunRecord.read(run.path).train)
    wanted = to_dict(cfg)
    differ = sorted(k for k in set(stored) | set(wanted)
                    if k not in RUN_ONLY_SETTINGS and stored.get(k) != wanted.get(k))
    if differ:
        raise RunError(f"{run.path}: --resume continues the run with its own settings; these differ: "
                       f"{', '.join(differ)}")


def run_is_complete(run_dir: str | Path, cfg: TrainConfig | None = None) -> bool:
    """The run in ``run_dir`` is complete and, if ``cfg`` is given, was trained with the same settings
    (``RUN_ONLY_SETTINGS`` aside) on caches that still have the fingerprints it was trained on."""
    if cfg is None:
        return run_state(run_dir) == "complete"
    return run_matches(run_dir, to_dict(cfg), RUN_ONLY_SETTINGS)


def resume_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig of an interrupted run, to continue it (``train-head --resume RUN_DIR``)."""
    record = RunRecord.read(run_dir)
    if record.kind != "head":
        raise RunError(f"{run_dir}: a {record.kind} run; `train-head --resume` continues head runs")
    cfg = from_dict(TrainConfig, record.train)
    cfg.out = str(run_dir)
    return cfg


def _fit(cfg: TrainConfig, run: RunDir, log: Callable[[str], None] | None) -> FitResult:
    say = log or (lambda _msg: None)
    out = run.path
    tasks = task_names(cfg.task)
    spec = task(cfg.task)
    objective_id = objective_name(cfg)

    # -- data: the two splits, packed once; the cache is read only here.
    from abawfeat.cache import FeatureCache
    from abawfeat.data.affwild2 import AffWild2

    data = AffWild2(cfg.data)
    cache_path = Path(cfg.cache) if cfg.cache else default_cache(cfg.data, cfg.backbone or "ddamfn")
    with FeatureCache(cache_path) as cache:
        encoder = str(cache.encoder)
        if cfg.backbone and cfg.backbone != encoder:
            raise ConfigError(f"--backbone {cfg.backbone}: {cache_path} holds {encoder} features; pass "
                              f"--backbone {encoder} or leave --backbone out to take it from the cache")
        fingerprint = cache.fingerprint()
        text = text_embeddings_in_class_order(cache) if OBJECTIVES.get(objective_id).head == "contrastive" \
            else None
        train_set = load_split(data, cache, tasks, "train")
        val_set = load_split(data, cache, tasks, "val")
        cache_ref = {"path": str(cache_path), "encoder": encoder, "fingerprint": fingerprint,
                     "dtype": str(cache.dtype)}
        in_dim = int(cache.feature_dim)
    say(f"train: {len(train_set.videos)} videos, {train_set.n_rows:,} crops; "
        f"val: {len(val_set.videos)} videos, {val_set.n_timeline:,} frames")

    # -- model: seeded, standardised on the training crops, prompts loaded for the contrastive head.
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    head = build_head_for(cfg, in_dim, None if text is None else int(text.shape[1]))
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
    weights = loss_weights(objective_id, cfg.class_weights, cfg.pos_weight, train_set, tasks)
    objective = build_objective(objective_id, head, tasks, weights.to(device))
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    # -- the run record first (a fresh run); metrics.json, the completion mark, comes last.
    dtype = cache_ref["dtype"]
    record = RunRecord(
        kind="head", task=cfg.task, trunk=cfg.head, objective=objective_id,
        label=architecture_label([encoder], cfg.head, cfg.task), caches=[cache_ref],
        dataset={"root": str(cfg.data), "name": dataset_name(cfg.data)},
        train=to_dict(cfg), resolved=to_dict(res), head=_head_dict(head),
        loss_weights=weights.as_json(), extra={"cache_dtype": dtype},
    )

    # -- an interrupted run continues where its last finished epoch left it.
    start_epoch, history, best_value, best = 1, [], -math.inf, {}
    if run.resume:
        state = load_state(out)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
        best_value, best = float(state["best_value"]), dict(state["best"])
        say(f"resuming {run.target} after epoch {start_epoch - 1}")
    else:
        record.write(out)

    def validate(model: nn.Module) -> Evaluation:
        return evaluate_set(model, val_set, cfg.task, val_source, device, res.precision, objective,
                            fill=cfg.fill)

    def on_best(epoch: int, ev: Evaluation) -> None:
        best.update(epoch=epoch, metrics=_plain(ev.metrics))
        save_checkpoint(out / CHECKPOINT_FILE, head, [fingerprint], ev.au_thresholds, epoch,
                        {"metrics": _plain(ev.metrics)})
        write_val_outputs(out / OUTPUTS_FILE, val_set, ev.timeline)

    def on_epoch(epoch: int, rows: list[dict[str, Any]], value: float) -> None:
        write_history(out / HISTORY_FILE, rows)
        save_state(out / STATE_FILE, {
            "epoch": epoch, "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
            "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "history": rows,
            "best_value": value, "best": dict(best),
        })

    history = run_epochs(
        head, train_source, validate, objective, optimizer, epochs=cfg.epochs, select=spec.select_metric,
        device=device, precision=res.precision, grad_clip=cfg.grad_clip, on_best=on_best, on_epoch=on_epoch,
        log=say, start_epoch=start_epoch, history=history, best=best_value,
    )
    if not best:
        raise ConfigError(f"{run.target}: no epoch produced a finite {spec.select_metric} (diverged?); "
                          "try a lower --lr")
    result = metrics_record(cfg.task, "val", int(best["epoch"]), best["metrics"])
    write_json(out / METRICS_FILE, result)  # last: its presence marks a complete run
    return FitResult(run_dir=run.commit(), metrics=result, history=history)


def _head_dict(head: nn.Module) -> dict[str, Any]:
    from abawfeat.heads import head_to_dict

    return head_to_dict(head)  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    """Metrics as plain JSON values (numpy scalars and arrays become floats and lists)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


__all__ = ["RUN_ONLY_SETTINGS", "FitResult", "fit", "resume_config", "run_is_complete"]
