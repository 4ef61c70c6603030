"""A search trial's side of Optuna inside whichever worker trains it: the storage is opened there, each
epoch's validation metric is reported to the study, and a trial the pruner judges hopeless stops (its run
directory stays, interrupted and resumable, with the epochs it trained)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from abawfeat.errors import AbawfeatError, ConfigError


class Pruned(AbawfeatError):
    """The study's pruner stopped this trial (not an error of the user's: train_unit reports it as pruned)."""

    pruned = True


def open_storage(url: str) -> Any:
    """An Optuna storage: ``journal:PATH`` is a JournalStorage on a file (shared filesystems, where SQLite's
    locking is unreliable); anything else a database URL (``sqlite:///study.db``, ``postgresql://...``).
    SQLite waits up to a minute for a lock, as several workers write one file."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as exc:  # a URL SQLAlchemy cannot parse, a driver not installed, a server not there
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"--storage {url}: cannot open it as an Optuna storage ({first})") from None


def make_pruner(settings: dict[str, Any]) -> Any:
    import optuna

    if not settings.get("prune", True):
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=int(settings.get("startup", 5)),
                                       n_warmup_steps=int(settings.get("warmup", 1)))


def epoch_reporter(trial: dict[str, Any]) -> Callable[[int, dict[str, Any]], None]:
    """The ``epoch_hook`` of a trial's run: report the epoch's validation metric, raise ``Pruned`` when the
    pruner says so."""
    import optuna

    study = optuna.load_study(study_name=trial["study"], storage=open_storage(trial["storage"]),
                              pruner=make_pruner(trial))
    handle = optuna.trial.Trial(study, int(trial["trial_id"]))

    def hook(epoch: int, row: dict[str, Any]) -> None:
        value = row.get("val_metric")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        handle.report(float(value), epoch)
        if trial.get("prune", True) and handle.should_prune():
            metric = trial.get("metric", "val_metric")
            raise Pruned(f"epoch {epoch}: {metric} {value:.4f} is below the median of the earlier trials at "
                         "this epoch")

    return hook


__all__ = ["Pruned", "epoch_reporter", "make_pruner", "open_storage"]
