"""Cross-validation over train+val: ``abawfeat cv --folds K [train-head options] --out DIR``.

The videos of both splits are split into K folds by source video (``train.splits.cv_folds``: scikit-learn's
GroupKFold; the two halves of a ``_left``/``_right`` video share a fold). Fold I trains on the other folds
and validates on its own, as a complete run in ``DIR/fold-I``. ``DIR`` is a run too (``kind: cv``): its
``metrics.json`` holds each metric's mean over the folds (with their spread and per-fold values), also
written to ``DIR/summary.json``; ``predict DIR --split test`` averages its folds' test scores (an ensemble
of the fold models, each trained on a different 1 - 1/K of the data), decided with AU thresholds (and, with
``--smooth auto``, a smoothing) tuned on the folds' pooled out-of-fold predictions: every video of
train+val, each predicted by the fold that did not train on it. A fold interrupted or not yet run is
trained when ``cv`` runs again; complete folds with the same settings are kept.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from abawfeat.data.sequences import SequenceSet
from abawfeat.errors import ConfigError, DiskFullError, RunError
from abawfeat.train.config import TrainConfig, validate_config
from abawfeat.train.finish import summarize_folds, tune_decisions, write_smoothing
from abawfeat.train.fit import RUN_ONLY_SETTINGS, fit, run_is_complete
from abawfeat.train.rundir import (
    METRICS_FILE,
    RunRecord,
    architecture_label,
    member_digests,
    metrics_record,
    open_run_dir,
    read_record_or_none,
    run_state,
    writer_lock,
)
from abawfeat.utils.configs import jsonable, read_json, to_dict
from abawfeat.utils.io import write_json

SUMMARY_FILE = "summary.json"


@dataclass
class CVResult:
    run_dir: Path
    metrics: dict[str, Any]
    folds: list[Path]


def fold_dir(out: str | Path, fold: int) -> Path:
    return Path(out) / f"fold-{fold}"


# Trains the listed folds (name, config) somewhere (``abawfeat.backends``) and returns one line per fold that
# failed; the folds are complete run directories afterwards, whoever trained them.
FoldTrainer = Callable[[list[tuple[str, TrainConfig]]], list[str]]


def run_cv(cfg: TrainConfig, folds: int, log: Callable[[str], None] | None = None,
           train_folds: FoldTrainer | None = None) -> CVResult:
    """Train every fold of ``folds`` (``cfg.out`` is the cross-validation run's directory) and write it.
    ``train_folds``: hand the folds still to train to a backend (all at once); by default they train here,
    one after another."""
    say = log or (lambda _msg: None)
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    out = Path(cfg.out)
    fold_cfgs = [dataclasses.replace(cfg, folds=folds, fold=i, out=str(fold_dir(out, i)))
                 for i in range(folds)]
    for f in fold_cfgs:
        validate_config(f)
    with writer_lock(out, "cross-validation"):
        return _run_cv_locked(cfg, folds, out, fold_cfgs, say, train_folds)


def _run_cv_locked(cfg: TrainConfig, folds: int, out: Path, fold_cfgs: list[TrainConfig],
                   say: Callable[[str], None], train_folds: FoldTrainer | None) -> CVResult:
    if _check_out(out, fold_cfgs) and all(run_is_complete(f.out, f) for f in fold_cfgs):
        say(f"{out}: the cross-validation is complete with these settings; nothing to do")
        metrics = read_json(out / METRICS_FILE)
        return CVResult(run_dir=out, metrics=metrics, folds=[Path(f.out) for f in fold_cfgs])
    out.mkdir(parents=True, exist_ok=True)
    results = []
    if train_folds is not None:
        todo = []
        for i, f in enumerate(fold_cfgs):
            name = f"fold {i + 1}/{folds}"
            if run_is_complete(f.out, f):
                say(f"{name}: already complete in {f.out}, kept")
            else:
                todo.append((name, f))
        failed = train_folds(todo) if todo else []
        if failed:
            raise RunError(f"{out}: {len(failed)} fold(s) failed ({'; '.join(failed)}); the complete folds "
                           "are kept: run the same cv again to train the rest")
    for i, f in enumerate(fold_cfgs):
        name = f"fold {i + 1}/{folds}"
        if run_is_complete(f.out, f):
            if train_folds is None:
                say(f"{name}: already complete in {f.out}, kept")
        else:
            resume = run_state(f.out) == "incomplete" and (Path(f.out) / "train_state.pt").is_file()
            say(f"{name}: {'resuming' if resume else 'training'} {f.out}")
            fit(f, log=lambda m, name=name: say(f"{name}: {m}"), resume=resume,
                overwrite=run_state(f.out) in ("complete", "incomplete") and not resume,
                rerun="run the same `abawfeat cv` again (it continues the fold and keeps the complete ones)")
        results.append(RunRecord.read(f.out))
    # Each fold's own validation metrics (its held-out videos, at its best epoch, smoothed as it tunes):
    # what `evaluate FOLD` prints, written by the fold's run.
    fold_metrics = [read_json(Path(f.out) / METRICS_FILE) for f in fold_cfgs]
    summary = summarize_folds(fold_metrics)
    pooled, timeline = out_of_fold([f.out for f in fold_cfgs])
    thresholds, smoothing = tune_decisions(pooled, timeline, cfg.task, cfg.smooth == "auto", "out-of-fold")
    first = results[0]
    label = architecture_label(first.encoders, cfg.head, cfg.task, fusion=cfg.fusion,
                               experts=cfg.moe_experts)
    members = [{"path": str(Path(f.out).resolve()), "relative": os.path.relpath(f.out, out), "label": r.label,
                "weights": {}, **member_digests(f.out)}
               for f, r in zip(fold_cfgs, results, strict=True)]
    record = RunRecord(
        kind="cv", task=cfg.task, trunk=cfg.head, objective=first.objective,
        label=f"{label} ({folds}-fold CV)",
        caches=list(first.caches), dataset=dict(first.dataset),
        train=to_dict(dataclasses.replace(cfg, folds=folds)),
        extra={"folds": folds, "members": members,
               "au_thresholds": None if thresholds is None else [float(x) for x in thresholds]},
        environment=dict(first.environment),  # what decided the folds' floats (their thread count, ...)
    )
    result = metrics_record(cfg.task, "cv", None, summary)
    try:
        record.write(out)
        write_smoothing(out, smoothing)
        write_json(out / SUMMARY_FILE, jsonable({"task": cfg.task, "folds": folds, **summary}))
        write_json(out / METRICS_FILE, jsonable(result))  # last: it marks the cross-validation complete
    except DiskFullError as exc:
        raise DiskFullError(f"{exc}; the {folds} folds are complete and kept: run the same cv again once "
                            "there is space", exc.path) from None
    return CVResult(run_dir=out, metrics=jsonable(result), folds=[Path(f.out) for f in fold_cfgs])


def out_of_fold(folds: list[str]) -> tuple[SequenceSet, dict[str, np.ndarray]]:
    """The folds' validation scores pooled: every video of train+val once, with its labels (each fold
    validates on videos it did not train on)."""
    from abawfeat.train.evaluate import infer_run

    parts = [infer_run(f, "val") for f in folds]
    sets = [p.data for p in parts]
    lengths = np.concatenate([np.diff(d.tl_offsets) for d in sets])
    tl_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tasks = tuple(sets[0].labels)
    pooled = SequenceSet(
        split="out-of-fold", tasks=tasks, videos=[v for d in sets for v in d.videos],
        features=np.zeros((0, 1), np.float16), row_offsets=np.zeros(len(lengths) + 1, np.int64),
        row_frames=np.zeros(0, np.int32), tl_offsets=tl_offsets, row_to_tl=np.zeros(0, np.int64),
        labels={t: np.concatenate([d.labels[t] for d in sets]) for t in tasks},
        valid={t: np.concatenate([d.valid[t] for d in sets]) for t in tasks},
    )
    timeline = {t: np.concatenate([p.timeline[t] for p in parts]) for t in parts[0].timeline}
    return pooled, timeline


def _check_out(out: Path, folds: list[TrainConfig]) -> bool:
    """``out`` is new, or a cross-validation run of these settings (complete, or with folds to finish).
    Returns whether it is a complete one. Folds already there that were trained with other settings (an
    earlier cross-validation, interrupted before its record was written) are refused, never retrained over."""
    state = run_state(out)
    if state in ("missing", "empty"):
        open_run_dir(out, can_overwrite=False, can_resume=False)  # refuses a path under a file
        return False
    record = read_record_or_none(out)
    if record is None or record.kind != "cv":
        # Hidden names: the folds' writer locks (rundir.writer_lock_path).
        folds_only = out.is_dir() and all(p.name.startswith(("fold-", ".")) for p in out.iterdir())
        if state == "foreign" and folds_only:
            _check_folds(folds)
            return False  # folds of an interrupted cross-validation, before its record was written
        # cv has no --overwrite or --resume: a run of another kind is refused, naming only another --out.
        open_run_dir(out, can_overwrite=False, can_resume=False)
        return False
    wanted = dict(to_dict(dataclasses.replace(folds[0], fold=0, out=str(out))))
    stored = dict(record.train)
    differ = sorted(k for k in set(wanted) | set(stored)
                    if k not in (*RUN_ONLY_SETTINGS, "fold") and wanted.get(k) != stored.get(k))
    if differ:
        raise ConfigError(f"{out}: holds a cross-validation run with other settings ({', '.join(differ)}); "
                          "choose another --out")
    _check_folds(folds)
    return state == "complete"


def _check_folds(folds: list[TrainConfig]) -> None:
    """Every fold directory already there holds a run of these settings (complete or interrupted)."""
    for f in folds:
        if run_state(f.out) not in ("complete", "incomplete"):
            continue
        record = read_record_or_none(f.out)
        stored = dict(record.train) if record is not None else {}
        wanted = to_dict(f)
        differ = sorted(k for k in set(wanted) | set(stored)
                        if k not in RUN_ONLY_SETTINGS and wanted.get(k) != stored.get(k))
        if differ:
            raise ConfigError(f"{f.out}: a fold trained with other settings ({', '.join(differ)}) by an "
                              "earlier cross-validation; it is kept: choose another --out")


__all__ = ["SUMMARY_FILE", "CVResult", "FoldTrainer", "fold_dir", "run_cv"]
