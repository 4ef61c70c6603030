"""Ensembles: ``abawfeat ensemble RUN... --out DIR`` averages runs' scores (probabilities or values).

The members' validation scores (every frame, before their own smoothing) are averaged, per task, with equal
weights or with weights tuned on validation (greedy forward selection with replacement, as in Caruana et
al.'s ensemble selection: each step adds the member that most improves the task's selection metric, and a
member's weight is how often it was added). The AU thresholds and the smoothing are then tuned again on the
averaged scores. ``DIR`` is a run (``kind: ensemble``): ``evaluate``, ``predict``, ``report`` and
``ablate`` treat it like any other, re-running the members and averaging them with the stored weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from abawfeat.errors import ConfigError
from abawfeat.tasks import single, task_names
from abawfeat.train.evaluate import Inference, infer_run, weighted_average
from abawfeat.train.finish import final_metrics, tune_decisions, write_smoothing
from abawfeat.train.rundir import (
    METRICS_FILE,
    OUTPUTS_FILE,
    RunRecord,
    member_digests,
    metrics_record,
    on_disk_full,
    open_run_dir,
    read_record_or_none,
    require_complete,
    run_state,
    write_val_outputs,
    writer_lock,
)
from abawfeat.utils.configs import jsonable, to_dict
from abawfeat.utils.io import write_json

WEIGHTINGS = ("equal", "tuned")
SELECTION_ROUNDS = 25  # greedy steps of ensemble selection: weights are multiples of 1/25


@dataclass
class EnsembleConfig:
    """Everything an ensemble depends on; saved in its run record."""

    runs: tuple[str, ...] = ()  # member run directories (complete runs of one task on one dataset)
    out: str = ""  # the ensemble's run directory
    weights: str = "equal"  # equal | tuned (ensemble selection on validation, per task)
    smooth: str = "none"  # none | auto: smoothing tuned on the averaged validation scores
    data: str = ""  # the data root, if not the members' own


@dataclass
class EnsembleResult:
    run_dir: Path
    metrics: dict[str, Any]
    weights: dict[str, list[float]] = field(default_factory=dict)


def build_ensemble(cfg: EnsembleConfig, log: Callable[[str], None] | None = None, *,
                   overwrite: bool = False) -> EnsembleResult:
    """Average the member runs, tune weights (optionally), thresholds and smoothing, and write the run."""
    say = log or (lambda _msg: None)
    if len(cfg.runs) < 1:
        raise ConfigError("ensemble: give at least one run directory")
    if cfg.weights not in WEIGHTINGS:
        raise ConfigError(f"--weights {cfg.weights!r}: choose one of {', '.join(WEIGHTINGS)}")
    if cfg.smooth not in ("none", "auto"):
        raise ConfigError(f"--smooth {cfg.smooth!r}: choose none or auto")
    if not cfg.out:
        raise ConfigError("--out is required: the ensemble's run directory")
    records = [require_complete(r) for r in cfg.runs]
    _check_agreement(cfg.runs, records)
    _check_out_is_no_member(cfg.out, cfg.runs)
    with writer_lock(cfg.out, "ensemble"):
        return _build_locked(cfg, records, say, overwrite)


def _build_locked(cfg: EnsembleConfig, records: list[RunRecord], say: Callable[[str], None],
                  overwrite: bool) -> EnsembleResult:
    # An ensemble interrupted while it was written holds nothing that building it again would not make:
    # the same command rebuilds it (beside it, swapped in once complete).
    previous = read_record_or_none(cfg.out) if run_state(cfg.out) == "incomplete" else None
    if previous is not None and previous.kind == "ensemble":
        say(f"{cfg.out}: an interrupted ensemble; building it again")
        overwrite = True
    run = open_run_dir(cfg.out, overwrite=overwrite, can_resume=False)
    try:
        return on_disk_full(run, lambda: _build(cfg, records, run, say))
    except BaseException:
        run.abandon()
        raise


def _check_out_is_no_member(out: str, runs: Sequence[str]) -> None:
    """``--out`` may not be a member, hold one or lie inside one (even with --overwrite: the ensemble would
    replace what it averages, or write into a member's run)."""
    target = Path(out).resolve()
    for run in runs:
        member = Path(run).resolve()
        how = ("is" if member == target else "holds" if target in member.parents
               else "is inside" if member in target.parents else None)
        if how:
            raise ConfigError(f"--out {out}: {how} {run}, a member of the ensemble; choose another --out")


def _check_agreement(paths: Sequence[str], records: Sequence[RunRecord]) -> None:
    """The members must be runs of one task on one dataset, validated on the same videos."""
    for path, record in zip(paths, records, strict=True):
        if record.kind == "cv":
            raise ConfigError(f"{path}: a cross-validation run has no validation scores of its own; "
                              "ensemble its folds, or use it for test predictions")
        if record.kind == "ensemble":
            raise ConfigError(f"{path}: an ensemble run; an ensemble averages trained runs: give its "
                              "members (and the other runs) directly")
    first = records[0]
    for path, record in zip(paths[1:], records[1:], strict=True):
        if record.task != first.task:
            raise ConfigError(f"{path}: a {record.task} run; {paths[0]} is a {first.task} run (an ensemble "
                              "averages runs of one task)")
        if record.dataset.get("name") != first.dataset.get("name"):
            raise ConfigError(f"{path}: trained on {record.dataset.get('name')!r}, {paths[0]} on "
                              f"{first.dataset.get('name')!r} (an ensemble averages runs of one dataset)")
        folds = (record.train.get("folds"), record.train.get("fold"))
        if folds != (first.train.get("folds"), first.train.get("fold")):
            raise ConfigError(f"{path}: validated on other videos than {paths[0]} (another cross-validation "
                              "fold): an ensemble needs one validation split")


def _build(
    cfg: EnsembleConfig, records: list[RunRecord], run: Any, say: Callable[[str], None]
) -> EnsembleResult:
    out = run.path
    run_task = records[0].task
    tasks = task_names(run_task)
    members = [infer_run(path, "val", cfg.data or None) for path in cfg.runs]
    data = members[0].data
    for path, m in zip(cfg.runs[1:], members[1:], strict=True):
        if m.data.videos != data.videos or not np.array_equal(m.data.tl_offsets, data.tl_offsets):
            raise ConfigError(f"{path}: covers other validation videos or frames than {cfg.runs[0]}")
    say(f"ensemble of {len(members)} run(s) on {data.n_timeline:,} validation frames")
    weights = {t: (select_weights(members, data, t) if cfg.weights == "tuned"
                   else np.full(len(members), 1.0 / len(members))) for t in tasks}
    timeline = {t: average(members, t, weights[t]) for t in tasks}
    thresholds, smoothing = tune_decisions(data, timeline, run_task, cfg.smooth == "auto", "val")
    trunks = {r.trunk for r in records}
    labels = [r.label for r in records]
    record = RunRecord(
        kind="ensemble", task=run_task, trunk=trunks.pop() if len(trunks) == 1 else "ensemble", objective="",
        label=f"Ensemble of {len(records)} ({', '.join(dict.fromkeys(labels))})",
        caches=[c for r in records for c in r.caches], dataset=dict(records[0].dataset),
        train={"task": run_task, "data": records[0].train.get("data", ""), "seed": 0},
        extra={
            "ensemble": to_dict(cfg),
            "members": [{"path": str(Path(p).resolve()), "relative": os.path.relpath(Path(p).resolve(),
                                                                                     run.target.resolve()),
                         "label": r.label, "weights": {t: float(weights[t][i]) for t in tasks},
                         **member_digests(p)}
                        for i, (p, r) in enumerate(zip(cfg.runs, records, strict=True))],
            "au_thresholds": None if thresholds is None else [float(x) for x in thresholds],
        },
    )
    record.write(out)
    write_val_outputs(out / OUTPUTS_FILE, data, timeline)
    write_smoothing(out, smoothing)
    final = final_metrics(data, timeline, run_task, thresholds, smoothing)
    result = metrics_record(run_task, "val", None, final)
    write_json(out / METRICS_FILE, jsonable(result))  # last: it marks a complete run
    return EnsembleResult(run_dir=run.commit(), metrics=jsonable(result),
                          weights={t: [float(x) for x in w] for t, w in weights.items()})


def average(members: Sequence[Inference], task_name: str, weights: np.ndarray) -> np.ndarray:
    """The members' scores of ``task_name``, weighted (weights sum to 1)."""
    return weighted_average([m.timeline[task_name] for m in members], weights)


def select_weights(members: Sequence[Inference], data: Any, task_name: str,
                   rounds: int = SELECTION_ROUNDS) -> np.ndarray:
    """Ensemble selection with replacement: ``rounds`` greedy steps, each adding the member whose addition
    gives the best value of the task's selection metric on validation. The metric is computed as smoothing
    tunes it (``Task.smoothing_objective`` averaged over the task's output groups: the mean CCC, the macro
    F1, the mean per-AU F1 at each AU's best threshold on a fine grid), which is the selection metric
    without an exact threshold search per candidate. Ties go to the earlier member; weights are the counts
    divided by the rounds."""
    from abawfeat.smoothing import Smoothing

    spec = single(task_name)
    ok = np.asarray(data.valid[task_name], dtype=bool)
    labels = np.asarray(data.labels[task_name])[ok]
    groups = Smoothing().groups(task_name)

    def value(scores: np.ndarray) -> float:
        kept = scores[ok]
        return float(np.mean([spec.smoothing_objective(kept[:, g], labels, g) for g in groups]))

    counts = np.zeros(len(members))
    running = None
    for _ in range(rounds):
        best, best_value = 0, -np.inf
        n = counts.sum() + 1
        for i, m in enumerate(members):
            candidate = m.timeline[task_name] if running is None else running + m.timeline[task_name]
            v = value(candidate / n)
            if v > best_value + 1e-12:
                best, best_value = i, v
        counts[best] += 1
        chosen = members[best].timeline[task_name]
        running = chosen if running is None else running + chosen
    return counts / counts.sum()


__all__ = ["EnsembleConfig", "EnsembleResult", "average", "build_ensemble", "select_weights"]
