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

import numpy as np
import torch
from torch import nn

from abawfeat.cache import row_words
from abawfeat.data.batches import WindowSource
from abawfeat.data.sequences import load_split, make_windows, split_videos
from abawfeat.errors import ConfigError, RunError
from abawfeat.tasks import task, task_names
from abawfeat.train.config import (
    TrainConfig,
    build_head_for,
    cache_paths,
    dataset_name,
    objective_name,
    resolve,
    validate_config,
)
from abawfeat.train.finish import (
    final_metrics,
    read_timeline,
    tune_decisions,
    write_smoothing,
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
    load_checkpoint,
    load_state,
    metrics_record,
    on_disk_full,
    open_caches,
    open_run_dir,
    run_matches,
    run_state,
    save_checkpoint,
    save_state,
    write_history,
    write_val_outputs,
    writer_lock,
)
from abawfeat.train.splits import holdout_videos, run_split
from abawfeat.utils.configs import from_dict, jsonable, to_dict
from abawfeat.utils.device import resolve_device, seed_everything, torch_threads
from abawfeat.utils.io import write_json

# Settings that do not change what a run learns: a resumed or re-planned run may differ in them. Not
# threads: the order of float sums depends on it, and on small data that moves a run to other numbers.
RUN_ONLY_SETTINGS = ("out", "plots")


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


def fit(cfg: TrainConfig, log: Callable[[str], None] | None = None, *, overwrite: bool = False,
        resume: bool = False, rerun: str | None = None,
        epoch_hook: Callable[[int, dict[str, Any]], None] | None = None) -> FitResult:
    """Train one head on a cache and write the run directory ``cfg.out``; returns the best epoch's metrics.

    ``overwrite``: replace a complete (or interrupted) run there, once the new one is complete.
    ``resume``: continue the interrupted run there from its last finished epoch, exactly.
    ``rerun``: what a message should tell the user to run to continue an interrupted run, when the caller
    is not ``train-head`` (a cross-validation fold: the same ``abawfeat cv`` again, not ``--resume``).
    The run directory is locked (``writer_lock``) while it is written.
    ``epoch_hook(epoch, history_row)``: called after each epoch once its state is saved (a search reports
    the validation metric there; an exception it raises stops the run, which stays resumable).
    """
    validate_config(cfg)
    with writer_lock(cfg.out):
        return _fit_locked(cfg, log, overwrite, resume, rerun, epoch_hook)


def _fit_locked(cfg: TrainConfig, log: Callable[[str], None] | None, overwrite: bool, resume: bool,
                rerun: str | None, epoch_hook: Callable[[int, dict[str, Any]], None] | None) -> FitResult:
    run = open_run_dir(cfg.out, overwrite=overwrite, resume=resume)
    if resume:
        _check_same_settings(run, cfg)
    with torch_threads(cfg.threads):
        try:
            return on_disk_full(run, lambda: _fit(cfg, run, log, epoch_hook), rerun=rerun)
        except BaseException:
            run.abandon()
            raise


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


def _fit(cfg: TrainConfig, run: RunDir, log: Callable[[str], None] | None,
         epoch_hook: Callable[[int, dict[str, Any]], None] | None = None) -> FitResult:
    say = log or (lambda _msg: None)
    out = run.path
    tasks = task_names(cfg.task)
    spec = task(cfg.task)
    objective_id = objective_name(cfg)

    # -- data: the two splits, packed once; the caches are read only here.
    from abawfeat.data.affwild2 import AffWild2

    data = AffWild2(cfg.data)
    with open_caches(cache_paths(cfg)) as caches:
        encoders = [str(c.encoder) for c in caches]
        if cfg.backbone and cfg.backbone != encoders[0]:
            raise ConfigError(f"--backbone {cfg.backbone}: {caches[0].path} holds {encoders[0]} features; "
                              f"pass --backbone {encoders[0]} or leave --backbone out to take it from the "
                              "cache")
        fingerprints = [c.fingerprint() for c in caches]
        text = None
        if OBJECTIVES.get(objective_id).head == "contrastive":
            text = text_embeddings_in_class_order(next((c for c in caches if c.text_embeddings() is not None),
                                                       caches[0]))
        train_split, train_videos = run_split(data, tasks, "train", cfg.folds, cfg.fold, cfg.seed)
        val_split, val_videos = run_split(data, tasks, "val", cfg.folds, cfg.fold, cfg.seed)
        train_videos = train_videos or split_videos(data, tasks, train_split)
        held = holdout_videos(train_videos, cfg.holdout, cfg.seed) if cfg.tune_on == "holdout" else []
        train_set = load_split(data, caches, tasks, train_split, [v for v in train_videos if v not in held])
        tune_set = load_split(data, caches, tasks, train_split, held) if held else None
        val_set = load_split(data, caches, tasks, val_split, val_videos)
        # Which tree each cache says it came from, and the identity of the crops the run used (its train,
        # held-out and validation videos): the record of what belonged together when the run was made.
        cache_refs = [{"path": str(c.path), "encoder": e, "fingerprint": f, "dtype": str(c.dtype),
                       "tree": c.provenance.get("tree") or {}}
                      for c, e, f in zip(caches, encoders, fingerprints, strict=True)]
        used = [*train_set.videos, *(tune_set.videos if tune_set else []), *val_set.videos]
        crops_sha256 = data.tree_identity(used)
        in_dim = int(train_set.feature_dim)
        rows = row_words(c.modality for c in caches).rows  # crops, or frames with audio for an audio cache
    say(f"train: {len(train_set.videos)} videos, {train_set.n_rows:,} {rows}; "
        f"val: {len(val_set.videos)} videos, {val_set.n_timeline:,} frames"
        + (f"; tuning on {len(held)} held-out training videos" if held else ""))

    # -- model: seeded, standardised on the training crops, prompts loaded for the contrastive head.
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    head = build_head_for(cfg, in_dim, None if text is None else int(text.shape[1]), train_set.groups)
    if head.config.normalize:
        mean, std = train_set.feature_stats()
        head.set_feature_stats(torch.from_numpy(mean), torch.from_numpy(std))
    if text is not None:
        head.set_text_embeddings(torch.from_numpy(text))
    head.to(device)
    res = resolve(cfg, head, device)
    if cfg.compile:
        from abawfeat.utils.compiling import compile_training_forward

        compile_training_forward(head.trunk)

    # -- windows and batch sources (index arrays computed once).
    train_windows = make_windows(train_set.row_offsets, res.window, res.stride, keep=train_set.row_weight())
    if len(train_windows) == 0:
        raise ConfigError(f"{cfg.data}: none of the training {rows} carries a {'/'.join(tasks)} label in "
                          f"{', '.join(c['path'] for c in cache_refs)}")
    train_source = WindowSource(train_set, train_windows, tasks, res.batch_size, shuffle=True, seed=cfg.seed,
                                modality_dropout=cfg.modality_dropout)
    val_source = WindowSource(val_set, make_windows(val_set.row_offsets, res.infer_window, res.infer_stride),
                              tasks, res.infer_batch_size, shuffle=False)

    # -- objective (class / positive weights from the training crops' labels) and optimiser.
    weights = loss_weights(objective_id, cfg.class_weights, cfg.pos_weight, train_set, tasks, cfg.focal_gamma,
                           cfg.logit_tau)
    objective = build_objective(objective_id, head, tasks, weights.to(device))
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    # -- the run record first (a fresh run); metrics.json, the completion mark, comes last.
    record = RunRecord(
        kind="head", task=cfg.task, trunk=cfg.head, objective=objective_id,
        label=architecture_label(encoders, cfg.head, cfg.task, fusion=cfg.fusion,
                                 experts=cfg.moe_experts), caches=cache_refs,
        dataset={"root": str(cfg.data), "name": dataset_name(cfg.data), "crops_sha256": crops_sha256},
        train=to_dict(cfg), resolved=to_dict(res), head=_head_dict(head),
        loss_weights=weights.as_json(),
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
        record.write(out, device)

    def validate(model: nn.Module) -> Evaluation:
        return evaluate_set(model, val_set, cfg.task, val_source, device, res.precision, objective,
                            fill=cfg.fill)

    def on_best(epoch: int, ev: Evaluation) -> None:
        best.update(epoch=epoch, metrics=jsonable(ev.metrics))
        save_checkpoint(out / CHECKPOINT_FILE, head, fingerprints, ev.au_thresholds, epoch,
                        {"metrics": jsonable(ev.metrics)})
        write_val_outputs(out / OUTPUTS_FILE, val_set, ev.timeline)

    def on_epoch(epoch: int, rows: list[dict[str, Any]], value: float) -> None:
        write_history(out / HISTORY_FILE, rows)
        save_state(out / STATE_FILE, {
            "epoch": epoch, "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
            "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "history": rows,
            "best_value": value, "best": dict(best),
        })
        if epoch_hook is not None:
            epoch_hook(epoch, rows[-1])

    history = run_epochs(
        head, train_source, validate, objective, optimizer, epochs=cfg.epochs, select=spec.select_metric,
        device=device, precision=res.precision, grad_clip=cfg.grad_clip, on_best=on_best, on_epoch=on_epoch,
        log=say, start_epoch=start_epoch, history=history, best=best_value,
    )
    if not best:
        raise ConfigError(f"{run.target}: no epoch produced a finite {spec.select_metric} (diverged?); "
                          "try a lower --lr")

    # -- decisions tuned on the tuning frames (validation, or the held-out training videos), then the
    # final metrics on validation; metrics.json, the completion mark, is written last.
    timeline = read_timeline(out / OUTPUTS_FILE, val_set, tasks)
    best_head, payload = load_checkpoint(out / CHECKPOINT_FILE, tasks)
    thresholds = payload.get("au_thresholds")
    thresholds = None if thresholds is None else np.asarray(thresholds)
    smoothing = None
    if tune_set is not None:
        windows = make_windows(tune_set.row_offsets, res.infer_window, res.infer_stride)
        source = WindowSource(tune_set, windows, tasks, res.infer_batch_size, shuffle=False)
        held_ev = evaluate_set(best_head.to(device), tune_set, cfg.task, source, device, res.precision,
                               fill=cfg.fill)
        thresholds, smoothing = tune_decisions(tune_set, held_ev.timeline, cfg.task, cfg.smooth == "auto",
                                               "holdout", held)
        save_checkpoint(out / CHECKPOINT_FILE, best_head, fingerprints, thresholds, int(best["epoch"]),
                        {"metrics": best["metrics"]})
    elif cfg.smooth == "auto":
        _, smoothing = tune_decisions(val_set, timeline, cfg.task, True, "val")
    write_smoothing(out, smoothing)
    final = final_metrics(val_set, timeline, cfg.task, thresholds, smoothing, cfg.tune_on)
    if tune_set is not None:
        # The held-out training videos' own scores (with the decisions tuned on them): what a search that
        # must not look at validation (`tune --tune-on holdout`) selects by.
        holdout = final_metrics(tune_set, held_ev.timeline, cfg.task, thresholds, smoothing, "holdout")
        final["holdout"] = {k: v for k, v in holdout.items() if isinstance(v, (int, float))}
    result = metrics_record(cfg.task, "val", int(best["epoch"]), jsonable(final))
    write_json(out / METRICS_FILE, result)  # last: its presence marks a complete run
    return FitResult(run_dir=run.commit(), metrics=result, history=history)


def _head_dict(head: nn.Module) -> dict[str, Any]:
    from abawfeat.heads import head_to_dict

    return head_to_dict(head)  # type: ignore[arg-type]


__all__ = ["RUN_ONLY_SETTINGS", "FitResult", "fit", "resume_config", "run_is_complete"]
