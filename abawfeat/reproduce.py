"""``abawfeat reproduce RUN``: redo a run from its record in a scratch directory and compare every metric.

A head run is trained again with its recorded configuration (at the thread count it used), a
cross-validation trains all its folds again, an ensemble is rebuilt from its members (each member's
inference at its own thread count, as ``evaluate`` runs it). Every value of ``metrics.json`` is compared
exactly. Where they differ, the settings the record carries besides the configuration
(``RunRecord.environment``: threads, torch, oneDNN, CPU instruction sets, device, determinism flags; the
caches' fingerprints; the abawfeat version) are compared with this machine's, and those that differ are
named. The original run is only read: the reproduction goes to a new scratch directory (``--out``, which
must be new or empty, never the run or a folder around or inside it), removed afterwards unless ``keep``.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abawfeat import __version__
from abawfeat.errors import ConfigError, RunError
from abawfeat.train.rundir import METRICS_FILE, RunRecord, read_record_or_none, require_complete, run_state
from abawfeat.utils.configs import from_dict, read_json
from abawfeat.utils.environment import environment_differences

REPRODUCIBLE_KINDS = ("head", "cv", "ensemble")


@dataclass
class Comparison:
    key: str  # a metrics.json key; nested values as ``outer.inner`` / ``folds[2].ccc_va``
    original: Any
    reproduced: Any

    @property
    def equal(self) -> bool:
        return self.original == self.reproduced


@dataclass
class ReproduceResult:
    run_dir: Path
    kind: str
    scratch: Path  # where the reproduction was written (removed unless kept)
    kept: bool
    rows: list[Comparison]
    differences: list[str] = field(default_factory=list)  # recorded settings that differ from here
    threads: int = 0  # the thread count the reproduction used

    @property
    def equal(self) -> bool:
        return all(r.equal for r in self.rows)

    @property
    def differing(self) -> list[Comparison]:
        return [r for r in self.rows if not r.equal]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """metrics.json as ``key -> scalar``: nested objects joined with ``.``, list items as ``[i]``."""
    out: dict[str, Any] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = value
    return out


def compare_metrics(original: Mapping[str, Any], reproduced: Mapping[str, Any]) -> list[Comparison]:
    a, b = flatten(original), flatten(reproduced)
    return [Comparison(k, a.get(k), b.get(k)) for k in [*a, *(k for k in b if k not in a)]]


def _scratch(run_dir: Path, out: str | Path | None) -> tuple[Path, Path | None]:
    """The reproduction's run directory, and a temporary parent made for it (None for ``out``)."""
    if out is None:
        parent = Path(tempfile.mkdtemp(prefix="abawfeat-reproduce-"))
        return parent / run_dir.name, parent
    target = Path(out)
    original = run_dir.resolve()
    resolved = target.resolve()
    if resolved == original or original in resolved.parents or resolved in original.parents:
        raise ConfigError(f"--out {target}: is the run {run_dir} or a folder around or inside it; the "
                          "reproduction goes to a new scratch directory, never over the original")
    state = run_state(target)
    if state not in ("missing", "empty"):
        raise ConfigError(f"--out {target}: exists and is not empty; the reproduction goes to a new or empty "
                          "folder (nothing there is replaced)")
    return target, None


def reproduce_run(run_dir: str | Path, out: str | Path | None = None, *, keep: bool = False,
                  log: Callable[[str], None] | None = None) -> ReproduceResult:
    """Redo the complete run ``run_dir`` into a scratch directory and compare its metrics.json."""
    run_dir = Path(run_dir)
    record = require_complete(run_dir)
    if record.kind not in REPRODUCIBLE_KINDS:
        raise RunError(f"{run_dir}: a {record.kind} run; reproduce redoes head runs, cross-validations and "
                       "ensembles (a fine-tuning run: run `abawfeat finetune` again with the settings in its "
                       "config.json, then compare with `abawfeat evaluate`)")
    original = read_json(run_dir / METRICS_FILE)
    scratch, temporary = _scratch(run_dir, out)
    try:
        threads = _redo(record, run_dir, scratch, log)
        reproduced = read_json(scratch / METRICS_FILE)
        again = read_record_or_none(scratch)
        rows = compare_metrics(original, reproduced)
        differences = setting_differences(record, again)
    except BaseException:
        if not keep:
            _remove(scratch, temporary)
        raise
    if not keep:
        _remove(scratch, temporary)
    return ReproduceResult(run_dir=run_dir, kind=record.kind, scratch=scratch, kept=keep, rows=rows,
                           differences=differences, threads=threads)


def _remove(scratch: Path, temporary: Path | None) -> None:
    """Remove what reproduce wrote: the scratch run (new or empty before) and the temporary folder made."""
    shutil.rmtree(temporary if temporary is not None else scratch, ignore_errors=True)


def recorded_threads(record: RunRecord) -> int:
    """The thread count a run used (``RunRecord.threads``)."""
    return record.threads


def _redo(record: RunRecord, run_dir: Path, scratch: Path, log: Callable[[str], None] | None) -> int:
    from abawfeat.train.config import TrainConfig

    say = log or (lambda _msg: None)
    threads = recorded_threads(record)
    if record.kind == "ensemble":
        from abawfeat.ensemble import EnsembleConfig, build_ensemble

        stored = dict(record.extra.get("ensemble") or {})
        members = [m.get("path") for m in record.extra.get("members") or []]
        runs = tuple(str(p) for p in members if p) or tuple(stored.get("runs") or ())
        cfg = EnsembleConfig(runs=runs, out=str(scratch), weights=str(stored.get("weights", "equal")),
                             smooth=str(stored.get("smooth", "none")), data=str(stored.get("data", "")))
        build_ensemble(cfg, log=say)  # its members' inference runs at each member's own thread count
        return threads
    cfg = from_dict(TrainConfig, dict(record.train))
    cfg = dataclasses.replace(cfg, out=str(scratch), plots=False, threads=threads or cfg.threads)
    if record.kind == "cv":
        from abawfeat.cv import run_cv

        run_cv(dataclasses.replace(cfg, folds=0), int(record.extra.get("folds") or cfg.folds), log=say)
    else:
        from abawfeat.train.fit import fit

        fit(cfg, log=say)
    return cfg.threads


def setting_differences(record: RunRecord, again: RunRecord | None) -> list[str]:
    """What the original run's record says decided its floats, against the reproduction's: environment,
    cache fingerprints, abawfeat version. One phrase per difference."""
    if again is None:
        return ["the reproduction wrote no readable run record"]
    out = []
    if not record.environment:
        out.append("the run record has no environment (written before abawfeat recorded threads, library "
                   "versions and CPU flags): they cannot be compared")
    else:
        out += environment_differences(record.environment, again.environment)
    for old, new in zip(record.caches, again.caches, strict=False):
        if old.get("fingerprint") != new.get("fingerprint"):
            out.append(f"cache fingerprint of {new.get('path')}: the cache is not the one the run was "
                       "trained on (re-extracted or replaced)")
    if record.package_version != __version__:
        out.append(f"abawfeat version: recorded {record.package_version}, here {__version__}")
    if record.kind == "ensemble":
        from abawfeat.train.rundir import run_digest

        for m in record.extra.get("members") or []:
            path = m.get("path")
            try:
                changed = bool(path) and run_digest(path) != m.get("record_sha256")
            except OSError:
                changed = True
            if changed:
                out.append(f"member {path}: not the run the ensemble was built from (retrained or replaced)")
    return out


__all__ = ["Comparison", "ReproduceResult", "compare_metrics", "flatten", "recorded_threads",
           "reproduce_run", "setting_differences"]
