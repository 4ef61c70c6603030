"""One unit of work: a grid cell, a cross-validation fold, an ensemble member's run or a search trial.

A ``UnitSpec`` is plain picklable data (a ``TrainConfig`` and a name); ``train_unit(spec)`` trains it into its
run directory and returns a ``UnitResult``. Every backend (``abawfeat.backends``: local processes, submitit,
Ray) maps this one function over specs, so what a run computes never depends on where it ran: its thread
count is in its configuration (``TrainConfig.threads``), never chosen by the backend.

``train_unit`` decides for itself, when it starts, whether the run is already complete (then it only reads
its metrics), interrupted with the same settings (resumed) or new, so a unit handed out twice (a requeued
Slurm job, a retried Ray task, a grid run again after a crash) trains only what is missing.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abawfeat.errors import AbawfeatError
from abawfeat.train.config import TrainConfig
from abawfeat.train.fit import RUN_ONLY_SETTINGS, fit, run_is_complete
from abawfeat.train.rundir import STATE_FILE, RunRecord, run_state
from abawfeat.utils.allocator import keep_heap
from abawfeat.utils.configs import read_json, to_dict


@dataclass
class UnitSpec:
    """What one worker trains. ``mode`` is the driver's plan (new | resume | overwrite); the worker re-checks
    the run directory when it starts. ``trial``: for a search trial, where its study lives (tune.py)."""

    name: str
    config: TrainConfig
    mode: str = "new"
    kind: str = "run"  # run: one head run | cv: a whole cross-validation (its folds one after another)
    trial: dict[str, Any] | None = None  # {"storage", "study", "number", "metric", "prune"}

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)


@dataclass
class UnitResult:
    name: str
    run_dir: str
    status: str  # trained | skipped (already complete) | failed | pruned
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0
    worker: str = ""  # host:pid that ran it
    log: str = ""  # where the backend kept the worker's output (a Slurm job's log), when it has one


def run_mode(config: TrainConfig) -> str:
    """new, resume (an interrupted run of the same settings) or overwrite (a run of other settings)."""
    path = Path(config.out)
    state = run_state(path)
    if state in ("missing", "empty"):
        return "new"
    if state == "incomplete" and (path / STATE_FILE).is_file():
        try:
            stored = dict(RunRecord.read(path).train)
        except AbawfeatError:
            return "overwrite"
        wanted = to_dict(config)
        keys = (set(stored) | set(wanted)) - set(RUN_ONLY_SETTINGS)
        if all(stored.get(k) == wanted.get(k) for k in keys):
            return "resume"
    return "overwrite"


def train_unit(spec: UnitSpec, say: Callable[[str], None] | None = None) -> UnitResult:
    """Train ``spec`` into its run directory (or read it back when it is already complete). A user-caused
    failure (a diverged run, a bad cache) is a ``failed`` result, not an exception: one bad cell should not
    cost the rest of a grid. Module-level and importable, so any worker process can run it."""
    say = say or (lambda msg: print(msg, flush=True))
    keep_heap()  # Ray and Slurm workers do not start from the CLI (utils/allocator.py)
    cfg = spec.config
    worker = f"{socket.gethostname()}:{os.getpid()}"
    t0 = time.perf_counter()

    def result(status: str, metrics: dict[str, Any] | None = None, error: str = "") -> UnitResult:
        return UnitResult(name=spec.name, run_dir=str(cfg.out), status=status, metrics=metrics or {},
                          error=error, seconds=time.perf_counter() - t0, worker=worker)

    def log(message: str) -> None:
        say(f"{spec.name}: {message}")

    try:
        if spec.kind == "cv":
            from abawfeat.cv import run_cv

            cv = run_cv(dataclasses.replace(cfg, folds=0), cfg.folds, log=log)
            return result("trained", cv.metrics)
        if run_is_complete(cfg.out, cfg):
            return result("skipped", read_json(Path(cfg.out) / "metrics.json"))
        # What the directory holds now decides (a requeued job finds the run it had started); a plan to
        # overwrite a run of other settings stands (the driver checked that the grid owns it).
        mode = run_mode(cfg)
        if mode == "overwrite" and spec.mode == "new" and run_state(cfg.out) == "complete":
            mode = "new"  # a complete run of other settings that the driver did not plan to replace: refused
        epoch_hook = None
        if spec.trial is not None:
            from abawfeat.backends.trial import epoch_reporter

            epoch_hook = epoch_reporter(spec.trial)
        fitted = fit(cfg, log=log, overwrite=mode == "overwrite", resume=mode == "resume",
                     epoch_hook=epoch_hook)
        if cfg.plots:
            from abawfeat.report.plots import try_write_run_plots

            try_write_run_plots(fitted.run_dir, log=log)
        return result("trained", fitted.metrics)
    except AbawfeatError as exc:
        if getattr(exc, "pruned", False):  # backends.trial.Pruned: the study stopped a hopeless trial
            log(f"pruned: {exc}")
            return result("pruned", error=str(exc))
        log(f"FAILED: {exc}")
        return result("failed", error=str(exc))


def quiet_worker() -> None:
    """Set up a worker process: progress bars from several processes at once would interleave into noise,
    so each unit logs lines instead."""
    os.environ["ABAWFEAT_NO_PROGRESS"] = "1"


__all__ = ["UnitResult", "UnitSpec", "quiet_worker", "run_mode", "train_unit"]
