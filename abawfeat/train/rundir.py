"""Run directories: the run record, the files a run writes, and how a run directory is created, resumed,
replaced and read back.

A run directory holds (docs/training.md, "Run directory"):

| file | what |
|---|---|
| ``config.json`` | the ``RunRecord``: what the run is (kind, task, trunk, objective, label), its caches |
| | and their fingerprints, the full config, what was resolved from it, the head description |
| ``checkpoint.pt`` | the best epoch's head: description, weights, cache fingerprints, AU thresholds |
| ``history.csv`` | one row per finished epoch |
| ``val_outputs.npz`` | the best epoch's validation scores on every frame |
| ``train_state.pt`` | while a run is unfinished: everything ``--resume`` needs to continue it exactly |
| ``metrics.json`` | written last: its presence marks a complete run |

Nothing here destroys a complete run: a new run refuses a directory that holds one unless told
``--overwrite``, and then it is built beside it and swapped in only once complete.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from abawfeat import __version__
from abawfeat.data.sequences import SequenceSet
from abawfeat.errors import CheckpointError, RunError
from abawfeat.heads import Head, head_from_dict, head_to_dict, upgrade_v1
from abawfeat.tasks import single, task_names
from abawfeat.utils.configs import to_dict
from abawfeat.utils.io import (
    acquire_lock,
    atomic_write,
    file_in_the_way,
    interrupted_replacement,
    lock_holder,
    release_lock,
    sibling_name,
    staging_path,
    swap_in,
    torch_save,
    what_is,
    write_json,
)

RUN_FORMAT = "abawfeat-run"
RUN_VERSION = 2
CHECKPOINT_FORMAT = "abawfeat-head"
CHECKPOINT_VERSION = 2
STATE_FORMAT = "abawfeat-head-state"
STATE_VERSION = 1
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.csv"
OUTPUTS_FILE = "val_outputs.npz"
STATE_FILE = "train_state.pt"
# Kinds of run and the files that make each complete (metrics.json, written last, is always one of them).
RUN_KINDS: dict[str, tuple[str, ...]] = {
    "head": (CONFIG_FILE, CHECKPOINT_FILE, HISTORY_FILE, OUTPUTS_FILE, METRICS_FILE),
    "finetune": (CONFIG_FILE, CHECKPOINT_FILE, HISTORY_FILE, OUTPUTS_FILE, METRICS_FILE),
    "ensemble": (CONFIG_FILE, OUTPUTS_FILE, METRICS_FILE),
    "cv": (CONFIG_FILE, METRICS_FILE),
}


# ------------------------------------------------------------------------------------------ the record


@dataclass
class RunRecord:
    """config.json: what a run is, written by train-head, fine-tuning and ensembles, read by evaluate,
    predict, ablate and report."""

    kind: str  # head | finetune | ensemble
    task: str  # the --task of the run (a task or a task set)
    trunk: str  # the trunk (--head) name; for an ensemble, its members' when they agree, else "ensemble"
    objective: str
    label: str  # the paper's name of the architecture, e.g. "DDAMFN+LSTM"
    caches: list[dict[str, Any]] = field(default_factory=list)  # {path, encoder, fingerprint, dtype}
    dataset: dict[str, Any] = field(default_factory=dict)  # {root, name}
    train: dict[str, Any] = field(default_factory=dict)  # the full TrainConfig
    resolved: dict[str, Any] = field(default_factory=dict)  # choices derived from it (windows, precision)
    head: dict[str, Any] | None = None  # head_to_dict of the trained head
    loss_weights: dict[str, Any] = field(default_factory=dict)  # class / positive weights, per task
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific (fine-tuning config, members)
    package_version: str = __version__
    # What decides the floats besides the config (threads, torch / oneDNN versions, CPU instruction sets,
    # CUDA device and determinism flags: utils.environment.float_environment), taken when the record is
    # first written; {} in records written before it was recorded.
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def encoders(self) -> list[str]:
        return [str(c.get("encoder") or "?") for c in self.caches]

    @property
    def tasks(self) -> tuple[str, ...]:
        return task_names(self.task)

    @property
    def threads(self) -> int:
        """The torch thread count the run used: its configured one, or for ``threads = 0`` the count it
        recorded; 0 when the record says neither (runs from before threads were recorded)."""
        recorded = (self.train.get("threads"), self.resolved.get("threads"), self.environment.get("threads"))
        for value in recorded:
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return 0

    def to_json(self) -> dict[str, Any]:
        return {"format": RUN_FORMAT, "version": RUN_VERSION, **to_dict(self)}

    def write(self, run_dir: str | Path, device: Any = None) -> Path:
        """Write config.json; the environment is taken now (``device``: the run's) unless already set."""
        if not self.environment:
            from abawfeat.utils.environment import float_environment

            self.environment = float_environment(device)
        return write_json(Path(run_dir) / CONFIG_FILE, self.to_json())

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecord:
        """The record of ``run_dir``; one line naming the file for anything unreadable or foreign.
        Records written before the run-record format (no ``format`` key) are read in today's terms."""
        path = Path(run_dir) / CONFIG_FILE
        if not path.is_file():
            raise RunError(f"{path}: missing; {run_dir} is not a run directory")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise RunError(f"{path}: cannot be read ({exc})") from None
        except json.JSONDecodeError as exc:
            raise RunError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); the run record is damaged"
                           ) from None
        if not isinstance(data, dict):
            raise RunError(f"{path}: not a run record (expected a JSON object)")
        if "format" not in data:
            return cls._from_v1(data, path)
        if data.get("format") != RUN_FORMAT:
            raise RunError(f"{path}: not an abawfeat run record (format {data.get('format')!r})")
        if data.get("version") != RUN_VERSION:
            raise RunError(f"{path}: run record version {data.get('version')} is not supported "
                           f"(this abawfeat reads version {RUN_VERSION})")
        try:
            known = set(cls.__dataclass_fields__)
            record = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise RunError(f"{path}: incomplete run record ({exc})") from None
        if record.kind not in RUN_KINDS or not isinstance(record.task, str):
            raise RunError(f"{path}: unknown run kind {record.kind!r}")
        return record

    @classmethod
    def _from_v1(cls, data: dict[str, Any], path: Path) -> RunRecord:
        if "task" not in data or "train" not in data:
            raise RunError(f"{path}: not an abawfeat run record (no task / train settings)")
        kind = "finetune" if data.get("kind") == "finetune" else "head"
        backbone = str(data.get("backbone") or (data.get("cache_fingerprint") or {}).get("encoder") or "?")
        cache = {"path": data.get("cache_path"), "encoder": backbone,
                 "fingerprint": data.get("cache_fingerprint"), "dtype": data.get("cache_dtype")}
        extra = {k: data[k] for k in ("finetune", "unfreeze_from", "backbone_start", "blocks", "world_size",
                                      "global_batch", "published_checkpoint") if k in data}
        head = data.get("head_config")
        trunk = str(data.get("head") or "?")
        objective = str(data.get("objective") or "")
        return cls(kind=kind, task=str(data["task"]), trunk=trunk, objective=objective,
                   label=architecture_label([backbone], trunk, str(data["task"]), kind),
                   caches=[cache], dataset=dict(data.get("dataset") or {}), train=dict(data["train"]),
                   resolved=dict(data.get("resolved") or {}), head=head,
                   loss_weights={k: data[k] for k in ("class_weight", "pos_weight") if data.get(k)},
                   extra=extra,
                   package_version=str(data.get("package_version") or "?"))


def architecture_label(encoders: Sequence[str], trunk: str, run_task: str, kind: str = "head",
                       fusion: str = "early", experts: int = 0) -> str:
    """The seed paper's name for a set-up, e.g. ``DDAMFN+LSTM``, ``DDAMFN&CLIP+GRU (multi-task)``: encoder
    and trunk labels from their registries; late fusion, multi-task and end-to-end runs say so, since they
    are other set-ups than per-task heads on one cache of frozen features."""
    from abawfeat.trunks import TRUNKS

    enc = "&".join(_encoder_label(e) for e in encoders) or "?"
    head = TRUNKS.get(trunk).label if trunk in TRUNKS else trunk
    label = f"{enc}+{head}"
    if len(encoders) > 1 and fusion != "early":
        label += f" ({fusion} fusion)"
    if experts:
        label += f" (MoE x{experts})"
    if len(task_names(run_task)) > 1:
        label += " (multi-task)"
    if kind == "finetune":
        label += " (end-to-end)"
    return label


def _encoder_label(name: str) -> str:
    from abawfeat.encoders import ENCODERS

    cls = ENCODERS.get(name) if name in ENCODERS else None
    return str(getattr(cls, "label", "") or name.upper())


# -------------------------------------------------------------------------------- the directory's life


def run_state(run_dir: str | Path) -> str:
    """``missing``, ``empty``, ``complete`` (metrics.json, the completion mark, is there), ``incomplete``
    (a run record without metrics.json: interrupted) or ``foreign`` (files, but no run record)."""
    path = Path(run_dir)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "foreign"
    names = {p.name for p in path.iterdir()}
    if not names:
        return "empty"
    if CONFIG_FILE not in names:
        return "foreign"
    return "complete" if METRICS_FILE in names else "incomplete"


def read_record_or_none(run_dir: str | Path) -> RunRecord | None:
    """The run record of ``run_dir``, or None when it has none or an unreadable one."""
    try:
        return RunRecord.read(run_dir)
    except RunError:
        return None


def require_complete(run_dir: str | Path) -> RunRecord:
    """The record of a complete run, or one line saying what the directory is instead."""
    path = Path(run_dir)
    state = run_state(path)
    if state == "missing":
        raise RunError(f"{path}: no such run directory")
    if state in ("empty", "foreign"):
        raise RunError(f"{path}: not a run directory (no {CONFIG_FILE})")
    record = RunRecord.read(path)
    if state == "incomplete":
        raise RunError(f"{path}: {_incomplete(record.kind, path)}")
    missing = [f for f in RUN_KINDS[record.kind] if not (path / f).is_file()]
    if missing:
        raise RunError(f"{path}: a {record.kind} run is missing {', '.join(missing)}")
    return record


def _incomplete(kind: str, path: Path) -> str:
    """What an interrupted run of ``kind`` is, and the command that finishes it: a head or fine-tuning run
    resumes; an ensemble or a cross-validation is finished by running its own command again."""
    if kind == "ensemble":
        return (f"the ensemble is incomplete (no {METRICS_FILE}: building it was interrupted); build it "
                f"again with `abawfeat ensemble` and the same runs, --out {path}")
    if kind == "cv":
        return (f"the cross-validation is incomplete (no {METRICS_FILE}: it was interrupted); run the same "
                "`abawfeat cv` command again to finish it (complete folds are kept)")
    return (f"the run is incomplete (no {METRICS_FILE}: it was interrupted{_last_epoch_note(path)}); "
            f"continue it with `--resume {path}`, or train it again")


def run_digest(run_dir: str | Path) -> str:
    """SHA-256 of a complete run's record and metrics (config.json, metrics.json): what an ensemble or a
    cross-validation keeps of each member, to notice a member retrained or replaced after it was built (its
    averaged weights and tuned thresholds would no longer fit)."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, METRICS_FILE):
        digest.update((Path(run_dir) / name).read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def member_digests(run_dir: str | Path) -> dict[str, str]:
    """What an ensemble or a cross-validation records of each member: ``record_sha256`` (``run_digest``)
    and ``checkpoint_sha256``, the SHA-256 of its checkpoint.pt (a checkpoint replaced under an unchanged
    record would otherwise be averaged with weights tuned on the old one)."""
    out = {"record_sha256": run_digest(run_dir)}
    checkpoint = Path(run_dir) / CHECKPOINT_FILE
    if checkpoint.is_file():
        out["checkpoint_sha256"] = file_sha256(checkpoint)
    return out


def member_changed(run_dir: str | Path, stored: Mapping[str, Any]) -> str | None:
    """Which recorded digest of a member no longer matches (its record or its checkpoint), or None.
    Members recorded before checkpoint digests existed are compared by their record alone."""
    if stored.get("record_sha256") and run_digest(run_dir) != stored["record_sha256"]:
        return "its config.json or metrics.json"
    checkpoint = Path(run_dir) / CHECKPOINT_FILE
    if stored.get("checkpoint_sha256"):
        if not checkpoint.is_file():
            return f"its {CHECKPOINT_FILE} is gone"
        if file_sha256(checkpoint) != stored["checkpoint_sha256"]:
            return f"its {CHECKPOINT_FILE}"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _last_epoch_note(path: Path) -> str:
    history = path / HISTORY_FILE
    if not history.is_file():
        return " before its first epoch finished"
    try:
        with open(history, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error):
        return ""
    return f" after epoch {rows[-1].get('epoch')}" if rows else " before its first epoch finished"


@dataclass
class RunDir:
    """Where a new run writes (``path``), and how it becomes the run at ``target`` once complete."""

    target: Path
    path: Path
    resume: bool = False

    @property
    def staged(self) -> bool:
        return self.path != self.target

    def commit(self, keep_state: bool = False) -> Path:
        """Make the finished run the one at ``target``: swap a staged run in, removing the one it replaces
        only after the new one is in place; drop the resume state unless ``keep_state`` (fine-tuning keeps
        it: the final encoder, optimiser and random state)."""
        if not keep_state:
            (self.path / STATE_FILE).unlink(missing_ok=True)
        if not self.staged:
            return self.target
        swap_in(self.path, self.target)
        return self.target

    def abandon(self) -> None:
        """A staged run that failed in this process is removed; the run it would have replaced is kept."""
        if self.staged:
            shutil.rmtree(self.path, ignore_errors=True)


def open_run_dir(out: str | Path, *, overwrite: bool = False, resume: bool = False,
                 can_overwrite: bool = True, can_resume: bool = True) -> RunDir:
    """Decide where a new run writes, without ever destroying a complete run.

    - nothing (or an empty folder) at ``out``: the run is written there;
    - a complete run: refused, unless ``overwrite``: then the new run is built in a hidden sibling folder
      and swapped in only once complete (a run that dies leaves the old one untouched);
    - an interrupted run: ``resume`` continues it in place; ``overwrite`` starts over beside it;
      otherwise refused with a line saying both;
    - anything else (a file, a folder that is not a run, a path under a file): refused.

    ``can_overwrite`` / ``can_resume``: whether the calling command has ``--overwrite`` / ``--resume``; a
    refusal offers only the options the command has.
    """
    target = Path(out)
    state = run_state(target)
    blocker = file_in_the_way(target) if state == "missing" else None
    if blocker is not None:
        raise RunError(f"{target}: {blocker} is {what_is(blocker)}, not a folder; choose another --out")
    stale = interrupted_replacement(target)
    if stale is not None:
        raise RunError(f"{target}: a replacement was interrupted; the previous run is in {stale}")
    if resume:
        if state != "incomplete":
            what = {"complete": "is complete; nothing to resume", "missing": "does not exist",
                    "empty": "is empty", "foreign": "is not a run directory"}[state]
            raise RunError(f"{target}: --resume: {what}")
        if not (target / STATE_FILE).is_file():
            raise RunError(f"{target}: --resume: no epoch of this run finished ({STATE_FILE} missing); "
                           "train it again with --overwrite")
        return RunDir(target=target, path=target, resume=True)
    if state in ("missing", "empty"):
        return RunDir(target=target, path=target)
    if state == "foreign":
        kind = what_is(target) if not target.is_dir() else "a folder that is not a run directory"
        raise RunError(f"{target}: is {kind}; choose another --out")
    if not overwrite:
        if state == "complete":
            record = _describe(target)
            offer = ("pass --overwrite to replace it once the new run is complete, or " if can_overwrite
                     else "")
            raise RunError(f"{target}: holds a complete run{record}; {offer}choose another --out")
        ways = (["continue it with --resume"] if can_resume else []) + (
            ["start over with --overwrite"] if can_overwrite else ["choose another --out"])
        raise RunError(f"{target}: holds an interrupted run (no {METRICS_FILE}{_last_epoch_note(target)}); "
                       f"{', or '.join(ways)}")
    return RunDir(target=target, path=staging_path(target))


def writer_lock_path(target: str | Path) -> Path:
    """``.NAME.lock`` beside the folder ``target`` (a run, a cross-validation, an ensemble, a grid): beside,
    not inside, so that it exists before the folder does and survives the folder's replacement."""
    target = Path(os.path.abspath(target))
    return target.with_name(sibling_name(target, ".lock"))


def take_writer_lock(target: str | Path, what: str = "run") -> int | None:
    """The single-writer lock of the folder ``target`` (``utils.io.acquire_lock``, as extraction takes for a
    cache), without waiting: a second command writing the same run, grid or ensemble is refused at once, in
    one line, before it reads or writes anything. None (no lock) where ``target`` cannot be a folder at all:
    the command's own checks then refuse it with the reason."""
    if file_in_the_way(Path(os.path.abspath(target)).parent) is not None:
        return None
    lock = writer_lock_path(target)

    def busy(held: Path) -> RunError:
        return RunError(f"{target}: another abawfeat command is writing this {what} (lock {held} is held"
                        f"{lock_holder(held)}); wait for it to finish, or choose another --out")

    return acquire_lock(lock, busy)


@contextlib.contextmanager
def writer_lock(target: str | Path, what: str = "run") -> Iterator[None]:
    """``take_writer_lock`` for the duration of a ``with`` block."""
    fd = take_writer_lock(target, what)
    try:
        yield
    finally:
        if fd is not None:
            release_lock(fd)


def _describe(path: Path) -> str:
    try:
        record = RunRecord.read(path)
    except RunError:
        return ""
    return f" ({record.task}, {record.label})"


# ------------------------------------------------------------------------------------------- the files


def load_versioned(path: Path, fmt: str, versions: Sequence[int], noun: str, kind: str) -> dict[str, Any]:
    """Load one of our torch payloads safely (weights_only) and check its format tag and version, so a
    foreign or newer file is refused in one line instead of failing later. ``noun`` names the file in
    messages (e.g. "checkpoint"), ``kind`` what it should have been (e.g. "head checkpoint")."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: unreadable {noun} ({type(exc).__name__}: {first})") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise CheckpointError(f"{path}: not an abawfeat {kind}")
    if payload.get("version") not in versions:
        short = noun.split()[-1]
        raise CheckpointError(f"{path}: {short} version {payload.get('version')} is not supported "
                              f"(this abawfeat reads version {', '.join(map(str, versions))})")
    return payload


def save_checkpoint(
    path: Path, head: Head, fingerprints: Sequence[Mapping[str, Any]], au_thresholds: np.ndarray | None,
    epoch: int, extra: Mapping[str, Any] | None = None,
) -> None:
    """Head description + weights + the caches' fingerprints + AU thresholds: all ``load_run`` needs."""
    state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "head": head_to_dict(head),
        "state_dict": state, "fingerprints": [dict(f) for f in fingerprints], "epoch": int(epoch),
        "au_thresholds": None if au_thresholds is None else [float(x) for x in au_thresholds],
        "package_version": __version__, **dict(extra or {}),
    }
    torch_save(path, payload)


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


def write_val_outputs(path: Path, data: SequenceSet, timeline: Mapping[str, np.ndarray]) -> None:
    """val_outputs.npz: one row per timeline frame (official protocol, crop or not)."""
    video, frame, has_crop = data.timeline_frames()
    arrays: dict[str, np.ndarray] = {"video": video, "frame": frame, "has_crop": has_crop}
    for t, scores in timeline.items():
        arrays[single(t).outputs_key] = scores.astype(np.float32)
        if t in data.labels:
            arrays[f"{t}_label"] = data.labels[t]
            arrays[f"{t}_valid"] = data.valid[t]

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write)


def metrics_record(
    run_task: str, split: str, best_epoch: int | None, metrics: Mapping[str, Any]
) -> dict[str, Any]:
    """metrics.json: ``task``, ``split``, ``best_epoch`` then the metrics (docs/architecture.md keys)."""
    return {"task": run_task, "split": split, "best_epoch": best_epoch, **dict(metrics)}


# ---------------------------------------------------------------------------------- resumable training


def save_state(path: Path, payload: Mapping[str, Any]) -> None:
    """train_state.pt: everything a resumed run needs to reach the weights an uninterrupted one reaches."""
    torch_save(path, {"format": STATE_FORMAT, "version": STATE_VERSION, **dict(payload)})


def load_state(run_dir: Path) -> dict[str, Any]:
    return load_versioned(run_dir / STATE_FILE, STATE_FORMAT, (STATE_VERSION,), "training state",
                          "training state")


# -------------------------------------------------------------------------------------------- reading


@dataclass
class LoadedRun:
    """A head run read back: the head (eval mode, trained weights) and what it was trained on."""

    run_dir: Path
    record: RunRecord
    head: Head
    fingerprints: list[dict[str, Any]]
    au_thresholds: np.ndarray | None
    best_epoch: int

    @property
    def task(self) -> str:
        return self.record.task

    @property
    def resolved(self) -> dict[str, Any]:
        return dict(self.record.resolved)


def load_checkpoint(path: Path, expect_tasks: Sequence[str] | None = None) -> tuple[Head, dict[str, Any]]:
    """The head of a checkpoint (trained weights, eval mode) and the checkpoint's payload."""
    payload = load_versioned(path, CHECKPOINT_FORMAT, (1, CHECKPOINT_VERSION), "checkpoint",
                             "head checkpoint")
    head_desc, state = payload.get("head"), payload.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: no weights in the checkpoint")
    if payload.get("version") == 1:
        head_desc, state = upgrade_v1(head_desc or {}, state)
        payload["fingerprints"] = [payload.get("fingerprint") or {}]
    head = head_from_dict(head_desc, where=str(path))
    if expect_tasks is not None and tuple(head.tasks) != tuple(expect_tasks):
        raise CheckpointError(f"{path}: the head predicts {', '.join(head.tasks)}, but the run is a "
                              f"{', '.join(expect_tasks)} run (a checkpoint from another run?)")
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the saved head config ({first})") from None
    head.eval()
    return head, payload


def load_run(run_dir: str | Path, *, complete: bool = True) -> LoadedRun:
    """Rebuild a trained head from ``run_dir`` (config.json + checkpoint.pt) without the command line.
    ``complete`` (the default): refuse an interrupted run in one line rather than score its best epoch."""
    run_dir = Path(run_dir)
    record = require_complete(run_dir) if complete else RunRecord.read(run_dir)
    if record.kind not in ("head", "finetune"):
        raise RunError(f"{run_dir}: a {record.kind} run has no single head checkpoint")
    ckpt_path = run_dir / CHECKPOINT_FILE
    if not ckpt_path.is_file():
        raise CheckpointError(f"{ckpt_path}: missing (the run did not finish an epoch)")
    head, payload = load_checkpoint(ckpt_path, record.tasks)
    thresholds = payload.get("au_thresholds")
    return LoadedRun(
        run_dir=run_dir, record=record, head=head,
        fingerprints=[dict(f or {}) for f in payload.get("fingerprints") or []],
        au_thresholds=None if thresholds is None else np.asarray(thresholds, dtype=np.float64),
        best_epoch=int(payload.get("epoch", 0)),
    )


def check_fingerprints(
    expected: Sequence[Mapping[str, Any]], caches: Sequence[Any], where: str | Path
) -> None:
    """Refuse caches whose encoder, dimension, weights, preprocessing or calibration differ from the ones
    a run was trained on: their features would be silently meaningless to the head."""
    if len(expected) != len(caches):
        raise CheckpointError(f"{where}: trained on {len(expected)} cache(s), given {len(caches)}")
    for want, cache in zip(expected, caches, strict=True):
        found = cache.fingerprint()
        differ = sorted(k for k in set(want) | set(found) if want.get(k) != found.get(k))
        if differ:
            raise CheckpointError(
                f"{where}: trained on features of {_short(want)} but {cache.path} holds {_short(found)}; "
                f"cache fingerprint differs in {', '.join(differ)} (re-extract with the run's encoder "
                "settings or train a head on this cache)"
            )


def _short(fp: Mapping[str, Any]) -> str:
    return f"encoder {fp.get('encoder')}, dim {fp.get('feature_dim')}"


@contextlib.contextmanager
def open_caches(paths: Sequence[str | Path]) -> Iterator[list[Any]]:
    """Open feature caches (read-only) for the duration of a ``with`` block."""
    from abawfeat.cache import FeatureCache

    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(FeatureCache(p)) for p in paths]


def run_matches(run_dir: str | Path, train: Mapping[str, Any], ignore: Sequence[str] = ()) -> bool:
    """The run in ``run_dir`` is complete, was trained with the settings ``train`` (``ignore`` aside: those
    that do not change what is learned), and its caches still have the fingerprints it was trained on."""
    from abawfeat.cache import FeatureCache

    try:
        record = require_complete(run_dir)
    except (RunError, CheckpointError):
        return False
    stored, wanted = dict(record.train), dict(train)
    for key in ignore:
        stored.pop(key, None)
        wanted.pop(key, None)
    if stored != wanted:
        return False
    try:
        for cache in record.caches:
            with FeatureCache(cache["path"]) as c:
                if c.fingerprint() != cache.get("fingerprint"):
                    return False
    except Exception:
        return False
    return True


def on_disk_full(target: RunDir, write: Callable[[], Any], rerun: str | None = None) -> Any:
    """Run ``write``; a full disk becomes one line saying what is kept (the message of DiskFullError names
    the file), and a staged run is removed so the previous one stays the run at ``target``. ``rerun``: the
    command that continues an interrupted run when it is not ``--resume`` (a cross-validation's)."""
    from abawfeat.errors import DiskFullError

    try:
        return write()
    except DiskFullError as exc:
        target.abandon()
        if target.staged:
            kept = f"the previous run in {target.target} is untouched"
        elif not (target.path / CONFIG_FILE).is_file():
            kept = f"nothing of the run was kept in {target.target}"
        elif rerun is not None:
            kept = f"the run in {target.target} is incomplete; free space, then {rerun}"
        elif (target.path / STATE_FILE).is_file():
            kept = f"the run in {target.target} is incomplete; free space, then continue it with --resume"
        else:
            kept = f"the run in {target.target} is incomplete; free space and train it again"
        raise DiskFullError(f"{exc}; {kept}") from None


__all__ = ["CHECKPOINT_FILE", "CONFIG_FILE", "HISTORY_FILE", "METRICS_FILE", "OUTPUTS_FILE", "RUN_KINDS",
           "STATE_FILE", "LoadedRun", "RunDir", "RunRecord", "architecture_label", "check_fingerprints",
           "run_digest", "member_digests", "member_changed",
           "load_checkpoint", "load_run", "load_state", "load_versioned", "metrics_record", "on_disk_full",
           "open_caches", "open_run_dir", "read_record_or_none", "require_complete", "run_matches",
           "run_state", "save_checkpoint", "save_state", "take_writer_lock", "write_history",
           "write_val_outputs", "writer_lock", "writer_lock_path"]
