"""Hyperparameter search over cached features: ``abawfeat tune [RECIPE.toml]`` with Optuna.

Every trial is a normal head run in ``<out>/trials/trial-NNNN`` trained by ``backends.unit.train_unit`` (so
any backend trains it); the study lives in an Optuna storage (``sqlite:///<out>/study.db`` by default, any URL
Optuna accepts, or ``journal:PATH`` for a journal file on a shared filesystem), where several workers meet.
The sampler is TPE, seeded per trial (``seed + trial number``: two workers never draw the same point, and
the same history gives the same proposal); the pruner is the median rule on each epoch's validation metric,
reported from the one training loop's per-epoch hook.

The budget is ``trials`` finished trials (complete, pruned, or failed because of their settings) over every
worker and every run of the command: asking for a trial and counting the finished and running ones happen
under a lock file in ``out`` (workers share ``out``), so the budget is never exceeded. A trial whose worker
was killed (its owner process on this host is gone) is marked failed and its point asked again in the same
run directory, which resumes from its last finished epoch: running ``tune`` again after a crash continues
the study, never duplicating a trial.

A recipe (TOML, data, never code)::

    [tune]      task, head, data, cache (a path or a list), out, trials, epochs, study, storage, seed,
                tune_on (val | holdout), prune (true), backend (local), jobs
    [fixed]     any train-head option every trial uses (batch_size, threads, ...)
    [space.NAME]  type = "float" | "log" | "int" | "categorical"; low / high (step, log) or choices;
                NAME is a train-head option (lr, weight_decay, hidden, layers, window, dropout, head (or
                trunk), objective, class_weights, pos_weight, ...) or trunk_opts.KEY (a trunk option)

Selecting on validation flatters the best score (as tuned thresholds do): the summary says so. With
``tune_on = "holdout"`` each trial holds out a share of its training videos and the search selects by their
score (pruning is then off: it would look at validation), so the best trial's validation score is honest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abawfeat.ablate import TRAIN_KEYS, _check_value
from abawfeat.backends import BackendOptions, UnitSpec, get_backend
from abawfeat.errors import AbawfeatError, ConfigError
from abawfeat.tasks import run_task_names, task
from abawfeat.train.config import TrainConfig, trunk_context, validate_config
from abawfeat.utils.configs import to_dict
from abawfeat.utils.io import atomic_write_text, write_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TYPES = ("float", "log", "int", "categorical")
TUNE_KEYS = {"task": str, "head": str, "data": str, "cache": (str, list), "out": str, "trials": int,
             "epochs": int, "study": str, "storage": str, "seed": int, "tune_on": str, "prune": bool,
             "backend": str, "jobs": int}
OWNER = "abawfeat_owner"  # user attribute: host:pid of the tune process that asked the trial
RUN_DIR = "abawfeat_run_dir"  # user attribute: the trial's run directory


@dataclass
class Param:
    name: str  # a TrainConfig field, or trunk_opts.KEY
    type: str  # float | log | int | categorical
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step,
                                   log=self.log or self.type == "log")

    def describe(self) -> str:
        if self.type == "categorical":
            return f"{self.name} in {list(self.choices)}"
        kind = "log-uniform" if self.type == "log" else f"{self.type}, log scale" if self.log else self.type
        return f"{self.name} {kind} [{self.low:g}, {self.high:g}]"


@dataclass
class TuneConfig:
    """Everything a search depends on; its ``signature`` is stored in the study, which refuses another."""

    task: str = ""
    head: str = "fc"
    data: str = ""
    cache: tuple[str, ...] = ()
    out: str = ""
    trials: int = 20  # finished trials (complete + pruned + failed) over all workers and runs
    epochs: int = 10
    study: str = ""  # default: the out folder's name
    storage: str = ""  # default: sqlite:///<out>/study.db
    seed: int = 0
    tune_on: str = "val"  # val: select by the validation score (optimistic) | holdout (honest validation)
    prune: bool = True
    backend: str = "local"
    jobs: int = 1  # trials trained at once by this worker
    fixed: dict[str, Any] = field(default_factory=dict)
    space: list[Param] = field(default_factory=list)
    recipe: str = ""

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out).resolve() / 'study.db'}"

    @property
    def study_name(self) -> str:
        return self.study or Path(self.out).resolve().name

    @property
    def metric(self) -> str:
        return task(self.task).select_metric

    def signature(self) -> dict[str, Any]:
        return {"task": self.task, "head": self.head, "data": str(Path(self.data).resolve()),
                "cache": [str(Path(c).resolve()) for c in self.cache], "epochs": self.epochs,
                "tune_on": self.tune_on, "seed": self.seed, "fixed": self.fixed,
                "space": [to_dict(p) for p in self.space]}


@dataclass
class TuneResult:
    out: Path
    best: dict[str, Any] | None  # number, value, params, run_dir, metrics
    counts: dict[str, int]
    files: dict[str, Path]
    note: str


# ------------------------------------------------------------------------------------------ the space


def default_space(head: str) -> list[Param]:
    """lr log-uniform, weight decay log-uniform, dropout, and the trunk's width and depth; the window for
    temporal trunks."""
    space = [Param("lr", "log", 1e-4, 1e-2), Param("weight_decay", "log", 1e-6, 1e-2),
             Param("dropout", "float", 0.0, 0.5)]
    temporal = trunk_context(TrainConfig(head=head)).temporal
    if temporal:
        space += [Param("hidden", "categorical", choices=(64, 128, 256)), Param("layers", "int", 1, 3),
                  Param("window", "categorical", choices=(16, 32, 64))]
    else:
        space += [Param("hidden", "categorical", choices=(0, 128, 256, 512))]
    return space


def parse_space(where: str, raw: Any) -> list[Param]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: [space] must hold one table per parameter, e.g. [space.lr]")
    out = []
    for name, entry in raw.items():
        at = f"{where}: [space.{name}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: must be a table with a type")
        base = name.split(".", 1)[0]
        if base == "trunk_opts" and "." in name:
            pass
        elif name not in TRAIN_KEYS and name not in ("head", "trunk"):
            raise ConfigError(f"{at}: {name!r} is not a train-head option (nor trunk_opts.KEY)")
        unknown = sorted(set(entry) - {"type", "low", "high", "step", "log", "choices"})
        if unknown:
            raise ConfigError(f"{at}: unknown key {unknown[0]!r}; expected type, low, high, step, log, "
                              "choices")
        kind = entry.get("type")
        if kind not in TYPES:
            raise ConfigError(f"{at}: type must be one of {', '.join(TYPES)}, got {kind!r}")
        if kind == "categorical":
            choices = entry.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{at}: a categorical parameter needs choices = [...]")
            out.append(Param("head" if name == "trunk" else name, kind, choices=tuple(choices)))
            continue
        low, high = entry.get("low"), entry.get("high")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if not numbers or not low < high:
            raise ConfigError(f"{at}: needs numbers low < high, got low {low!r}, high {high!r}")
        log = entry.get("log", kind == "log")
        if not isinstance(log, bool):
            raise ConfigError(f"{at}: log must be true or false")
        if log and low <= 0:
            raise ConfigError(f"{at}: a log-uniform parameter needs low > 0, got {low}")
        if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
            raise ConfigError(f"{at}: an int parameter needs integer low and high")
        step = entry.get("step")
        if step is not None and (not isinstance(step, (int, float)) or step <= 0 or log):
            raise ConfigError(f"{at}: step must be a positive number (and not with log)")
        out.append(Param(name, kind, float(low), float(high), None if step is None else float(step), log))
    return out


def load_tune_recipe(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], list[Param]]:
    """[tune] settings, [fixed] train-head options and [space] of a recipe; ConfigErrors name the key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the recipe ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"tune", "caches", "fixed", "space"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; expected tune, caches, "
                          "fixed, space")
    settings = raw.get("tune", {})
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: [tune] must be a table")
    for key, value in settings.items():
        if key not in TUNE_KEYS:
            raise ConfigError(f"{path}: [tune] unknown key {key!r}; expected {', '.join(TUNE_KEYS)}")
        _check_value(f"{path}: [tune]", key, value, TUNE_KEYS[key])
    caches = raw.get("caches", {})
    if not isinstance(caches, dict) or not all(isinstance(v, str) for v in caches.values()):
        raise ConfigError(f"{path}: [caches] must map backbone names to cache file paths (strings)")
    if caches:
        if "cache" in settings:
            raise ConfigError(f"{path}: give the caches in [caches] or as [tune] cache, not both")
        settings["cache"] = list(caches.values())  # several: fused, in this order
    fixed = raw.get("fixed", {})
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: [fixed] must be a table")
    for key, value in fixed.items():
        if key not in TRAIN_KEYS:
            raise ConfigError(f"{path}: [fixed] unknown key {key!r}; train-head options are "
                              f"{', '.join(sorted(TRAIN_KEYS))}")
        fixed[key] = _check_value(f"{path}: [fixed]", key, value, TRAIN_KEYS[key])
    space = parse_space(str(path), raw["space"]) if "space" in raw else []
    return settings, fixed, space


def trial_config(cfg: TuneConfig, params: dict[str, Any], run_dir: Path) -> TrainConfig:
    """The TrainConfig of one trial: the fixed options, then the trial's point."""
    values: dict[str, Any] = {**cfg.fixed}
    trunk = dict(values.pop("trunk_opts", {}) or {})
    for name, value in params.items():
        if name.startswith("trunk_opts."):
            trunk[name.split(".", 1)[1]] = value
        else:
            want = TRAIN_KEYS.get(name, str)
            values[name] = float(value) if want is float else value
    head = values.pop("head", cfg.head)
    return TrainConfig(task=cfg.task, head=head, data=cfg.data, cache=tuple(cfg.cache), out=str(run_dir),
                       epochs=cfg.epochs, seed=values.pop("seed", cfg.seed), tune_on=cfg.tune_on,
                       trunk_opts=trunk, **{"plots": False, **values})


def check_tune(cfg: TuneConfig) -> None:
    if cfg.task not in run_task_names():
        raise ConfigError(f"--task {cfg.task!r}: choose one of {', '.join(run_task_names())}")
    if not cfg.data or not cfg.out:
        raise ConfigError("tune needs --data and --out (or [tune] data and out in the recipe)")
    if cfg.trials < 1:
        raise ConfigError(f"--trials must be at least 1, not {cfg.trials}")
    if cfg.tune_on not in ("val", "holdout"):
        raise ConfigError(f"--tune-on {cfg.tune_on!r}: choose val or holdout")
    if cfg.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, not {cfg.jobs}")
    probe = {p.name: p.choices[0] if p.choices else (p.low if p.type != "int" else int(p.low))
             for p in cfg.space}
    try:
        validate_config(trial_config(cfg, probe, Path(cfg.out) / "trials" / "probe"))
    except ConfigError as exc:
        raise ConfigError(f"{cfg.recipe or 'tune'}: the search space gives an invalid run: {exc}") from None


# ------------------------------------------------------------------------------------------ the search


def run_tune(cfg: TuneConfig, log: Callable[[str], None] | None = None,
             options: BackendOptions | None = None) -> TuneResult:
    """Run trials until the study holds ``cfg.trials`` finished ones, then write the summary files."""
    say = log or (lambda _msg: None)
    cfg.space = cfg.space or default_space(cfg.head)
    check_tune(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    options = options or BackendOptions()
    backend = get_backend(cfg.backend, dataclasses.replace(
        options, jobs=cfg.jobs, log_dir=options.log_dir or str(out / ".submitit")))
    optuna = _quiet_optuna()
    from filelock import FileLock

    from abawfeat.backends.trial import make_pruner, open_storage

    pruning = {"prune": cfg.prune and cfg.tune_on == "val", "startup": 5, "warmup": 1}
    with FileLock(str(out / ".tune.lock")):  # two workers creating one database at once would collide
        study = _open_study(optuna, open_storage(cfg.storage_url), cfg, make_pruner(pruning))
    say(f"study {cfg.study_name!r} in {cfg.storage_url}: {', '.join(p.describe() for p in cfg.space)}")
    while True:
        asked = _ask(optuna, study, cfg, out, say)
        if not asked:
            break
        specs = []
        for trial, run_dir, params in asked:
            spec_trial = {"storage": cfg.storage_url, "study": cfg.study_name, "trial_id": trial._trial_id,
                          "metric": cfg.metric, **pruning}
            try:
                train_cfg = trial_config(cfg, params, run_dir)
                validate_config(train_cfg)
            except ConfigError as exc:
                say(f"trial {trial.number}: invalid settings, failed: {exc}")
                trial.set_user_attr("error", str(exc))
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            say(f"trial {trial.number}: {_fmt(params)} -> {run_dir}")
            specs.append((trial, UnitSpec(name=f"trial {trial.number}", config=train_cfg, trial=spec_trial)))
        results = backend.run([s for _, s in specs], say) if specs else []
        for (trial, _spec), r in zip(specs, results, strict=True):
            _tell(optuna, study, cfg, trial, r, say)
    return summarize(cfg, study, say)


def _quiet_optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trials are logged here, one line each
    return optuna


def _open_study(optuna: Any, storage: Any, cfg: TuneConfig, pruner: Any) -> Any:
    study = optuna.create_study(storage=storage, study_name=cfg.study_name, direction="maximize",
                                pruner=pruner, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    stored = study.user_attrs.get("abawfeat")
    wanted = json.loads(json.dumps(cfg.signature()))
    if stored is None:
        study.set_user_attr("abawfeat", wanted)
    elif stored != wanted:
        differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise ConfigError(f"{cfg.storage_url}: study {cfg.study_name!r} is another search (its "
                          f"{', '.join(differ)} differ); choose another --study or --out")
    return study


def _alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's worker: only it knows; its trial stays counted as running
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ask(optuna: Any, study: Any, cfg: TuneConfig, out: Path,
         say: Callable[[str], None]) -> list[tuple[Any, Path, dict[str, Any]]]:
    """Under the study's lock: fail the trials of dead workers (their points asked again, in their run
    directories), count, and ask at most ``jobs`` trials within the budget."""
    from filelock import FileLock

    State = optuna.trial.TrialState
    with FileLock(str(out / ".tune.lock")):
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.state == State.RUNNING and not _alive(str(t.user_attrs.get(OWNER, ""))):
                say(f"trial {t.number}: its worker {t.user_attrs.get(OWNER)} is gone; its point is asked "
                    "again and resumes in its run directory")
                study._storage.set_trial_user_attr(t._trial_id, "stale", True)
                study._storage.set_trial_state_values(t._trial_id, State.FAIL)
                study.enqueue_trial(t.params, user_attrs={RUN_DIR: t.user_attrs.get(RUN_DIR, "")})
        trials = study.get_trials(deepcopy=False)
        used = sum(1 for t in trials if t.state in (State.COMPLETE, State.PRUNED, State.RUNNING)
                   or (t.state == State.FAIL and not t.user_attrs.get("stale")))
        asked = []
        for _ in range(min(cfg.jobs, cfg.trials - used)):
            # Seeded per trial: deterministic given the history, and never the same draw in two workers.
            study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(study.get_trials(deepcopy=False)))
            trial = study.ask()
            run_dir = trial.user_attrs.get(RUN_DIR) or str(out / "trials" / f"trial-{trial.number:04d}")
            trial.set_user_attr(OWNER, f"{socket.gethostname()}:{os.getpid()}")
            trial.set_user_attr(RUN_DIR, run_dir)
            # Drawn now, by this trial's own sampler (a trial draws lazily, from the study's sampler of the
            # moment: the next ask would replace it).
            params = {p.name: p.suggest(trial) for p in cfg.space}
            asked.append((trial, Path(run_dir), params))
        return asked


def objective_value(cfg: TuneConfig, metrics: dict[str, Any]) -> float:
    """What the search maximises: the task's selection metric on validation (as metrics.json and
    ``evaluate`` give it), or on the held-out training videos with ``tune_on = holdout``."""
    source = (metrics.get("holdout") or {}) if cfg.tune_on == "holdout" else metrics
    value = source.get(cfg.metric)
    return float(value) if isinstance(value, (int, float)) else math.nan


def _tell(optuna: Any, study: Any, cfg: TuneConfig, trial: Any, r: Any, say: Callable[[str], None]) -> None:
    State = optuna.trial.TrialState
    if r.status in ("trained", "skipped"):
        value = objective_value(cfg, r.metrics)
        if math.isfinite(value):
            study.tell(trial, value)
            say(f"trial {trial.number}: {cfg.metric} {value:.4f} ({r.status})")
            return
        r.error = r.error or f"no finite {cfg.metric} in its metrics"
    if r.status == "pruned":
        study.tell(trial, state=State.PRUNED)
        say(f"trial {trial.number}: pruned ({r.error})")
        return
    trial.set_user_attr("error", r.error)
    study.tell(trial, state=State.FAIL)
    say(f"trial {trial.number}: failed: {r.error}")


# ------------------------------------------------------------------------------------------ the summary


def summarize(cfg: TuneConfig, study: Any, say: Callable[[str], None]) -> TuneResult:
    """trials.csv / trials.md, importance.png, summary.json and report.html in ``out``."""
    import optuna

    State = optuna.trial.TrialState
    out = Path(cfg.out)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(1 for t in trials if t.state == s) for s in
              (State.COMPLETE, State.PRUNED, State.FAIL, State.RUNNING)}
    complete = [t for t in trials if t.state == State.COMPLETE]
    best = None
    if complete:
        b = max(complete, key=lambda t: (t.value, -t.number))
        run_dir = b.user_attrs.get(RUN_DIR, "")
        metrics = _read_metrics(run_dir)
        best = {"number": b.number, "value": b.value, "params": b.params, "run_dir": run_dir,
                "metric": cfg.metric, "tuned_on": cfg.tune_on, "metrics": metrics}
    note = (f"tuned on validation: the best {cfg.metric} is the maximum over {len(complete)} trials scored "
            "on the split it is reported on, so it flatters (as tuned thresholds do); re-train the best "
            "settings with other seeds, cross-validate, or search with --tune-on holdout for an honest number"
            if cfg.tune_on == "val" else
            f"tuned on held-out training videos: trials were selected by their {cfg.metric} there; the best "
            "trial's validation score was not used to choose it")
    files = {"csv": out / "trials.csv", "md": out / "trials.md", "json": out / "summary.json"}
    rows = _trial_rows(trials, cfg)
    _write_tables(rows, files, cfg, best, note)
    write_json(files["json"], {"study": cfg.study_name, "storage": cfg.storage_url, "metric": cfg.metric,
                               "tune_on": cfg.tune_on, "budget": cfg.trials, "counts": counts, "best": best,
                               "note": note, "space": [p.describe() for p in cfg.space]})
    importance = _importance(study, out / "importance.png", say)
    if importance is not None:
        files["importance"] = importance
    report = _report(cfg, rows, best, importance, note, say)
    if report is not None:
        files["html"] = report
    return TuneResult(out=out, best=best, counts=counts, files=files, note=note)


def _read_metrics(run_dir: str) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _fmt(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _trial_rows(trials: list[Any], cfg: TuneConfig) -> list[dict[str, Any]]:
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        epochs = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                     "epochs": epochs, **{p.name: t.params.get(p.name) for p in cfg.space},
                     "run_dir": t.user_attrs.get(RUN_DIR, ""), "error": t.user_attrs.get("error", "")})
    return rows


def _write_tables(rows: list[dict[str, Any]], files: dict[str, Path], cfg: TuneConfig,
                  best: dict[str, Any] | None, note: str) -> None:
    import csv
    import io

    columns = ["number", "state", "value", "epochs", *[p.name for p in cfg.space], "run_dir", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(files["csv"], buf.getvalue())

    def text(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")

    where = "validation" if cfg.tune_on == "val" else "held-out training videos"
    lines = [f"# Search {cfg.study_name}: {cfg.task}, {cfg.metric} ({where})",
             "", note + ".", ""]
    if best is not None:
        lines += [f"Best: trial {best['number']}, {cfg.metric} {best['value']:.4f}, run `{best['run_dir']}`",
                  ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(text(r[c]) for c in columns) + " |" for r in rows]
    atomic_write_text(files["md"], "\n".join(lines) + "\n")


def _importance(study: Any, path: Path, say: Callable[[str], None]) -> Path | None:
    """Optuna's parameter importances (fANOVA) as a bar chart; needs at least two complete trials."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return None
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as exc:  # e.g. every trial at the same point
        say(f"importance plot skipped ({exc})")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from abawfeat.utils.io import atomic_write

    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names], color="#3b6ea5")
    ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    ax.set_title(f"{study.study_name}: {len(complete)} complete trials")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def _report(cfg: TuneConfig, rows: list[dict[str, Any]], best: dict[str, Any] | None, importance: Path | None,
            note: str, say: Callable[[str], None]) -> Path | None:
    """report.html over the complete trials' runs, with the trials table and the importance plot."""
    runs = [r["run_dir"] for r in rows if r["state"] == "complete" and r["run_dir"]
            and (Path(r["run_dir"]) / "metrics.json").is_file()]
    if not runs:
        return None
    try:
        from abawfeat.report.html import build_report

        md = (Path(cfg.out) / "trials.md").read_text(encoding="utf-8")
        return build_report(runs, Path(cfg.out) / "report.html", title=f"Search {cfg.study_name}",
                            make_missing_plots=False, appendix=(md, importance))
    except (AbawfeatError, OSError, ImportError) as exc:
        say(f"HTML report skipped ({exc})")
        return None


__all__ = ["Param", "TuneConfig", "TuneResult", "default_space", "load_tune_recipe", "parse_space",
           "run_tune", "trial_config"]
