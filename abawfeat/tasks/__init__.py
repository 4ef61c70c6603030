"""Tasks: everything that is specific to valence-arousal, expressions or action units, declared once.

A task (``Task``) declares its output width and names, its annotation files (folders, header, values per
row, invalid marker, validity rule, label layout), its test lists and sample files, the activation of its
head outputs and its decision rule, its default objective, its official metrics and the metric that picks
the best epoch, its submission header and value format, and the plots drawn for it. ``mtl`` is a
``TaskSet``: the combination of the three, scored by P_VA + F1_EXPR + F1_AU.

Every task-keyed branch in the package goes through these declarations (``task(name)``); adding a task is
one new file here with a ``Task`` subclass added to ``TASKS``, plus its import below (docs/architecture.md,
"Add a task"). Tests are parametrised over ``TASKS``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from abawfeat.errors import ConfigError, DataError
from abawfeat.utils.registry import Registry

Thresholds = np.ndarray | Sequence[float] | None
_INT = re.compile(r"^[+-]?\d+$")


class Task:
    """One challenge task. Subclasses fill the declarations and implement the four rules below."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # how tables and messages name it: VA, EXPR, AU
    columns: ClassVar[tuple[str, ...]] = ()  # output names, in the order of the head's outputs
    # --- annotation files (one per video, header then one row per frame) ---
    folders: ClassVar[tuple[str, ...]] = ()  # folder names under the annotations dir, newest first
    header: ClassVar[tuple[str, ...]] = ()  # the annotation files' first line
    value_names: ClassVar[tuple[str, ...]] = ()  # numbers per data row (EXPR: one class index)
    invalid: ClassVar[float] = -1.0  # the release's marker of an unannotated row
    valid_rule: ClassVar[str] = ""  # what a valid value is, for messages
    label_shape: ClassVar[tuple[int, ...]] = ()  # one label's shape: (2,), () or (12,)
    label_dtype: ClassVar[Any] = np.float32
    # --- test set ---
    test_list_file: ClassVar[str] = ""  # names_of_videos_in_each_test_set/<this>
    test_list_keyword: ClassVar[str] = ""  # its keyword, when the exact file name differs
    sample_tag: ClassVar[str] = ""  # prediction_files_format/CVPR_*_ABAW_<tag>_test_set_sample.txt
    # --- training and scoring ---
    default_objective: ClassVar[str] = ""
    select_metric: ClassVar[str] = ""  # higher is better; picks the best epoch; the task's headline
    metric_keys: ClassVar[tuple[str, ...]] = ()  # scalar metrics, in the order they are shown
    # Per-class / per-AU metric tables ({column name: metric key}) and what one row of them is called.
    per_item_keys: ClassVar[dict[str, str]] = {}
    item_name: ClassVar[str] = ""
    table_columns: ClassVar[dict[str, str]] = {}  # the seed paper's Table 3 columns -> metric keys
    outputs_key: ClassVar[str] = ""  # val_outputs.npz array of this task's scores
    no_crop_score: ClassVar[float] = 0.0  # scores of a video whose face was never found
    tunes_thresholds: ClassVar[bool] = False  # decision thresholds tuned on validation (AU)
    # Smoothing: one filter per output column, or one for all columns together (class probabilities,
    # which must stay comparable across classes).
    smooth_per_column: ClassVar[bool] = True
    plots: ClassVar[tuple[str, ...]] = ()  # file names of abawfeat.report.plots for this task
    submission_values: ClassVar[int] = 0  # values per submission row after the image location

    # ------------------------------------------------------------------------------------ derived
    @property
    def width(self) -> int:
        return len(self.columns)

    @property
    def components(self) -> tuple[Task, ...]:
        return (self,)

    @property
    def submission_header(self) -> str:
        return "image_location," + ",".join(self.columns)

    def empty_labels(self, n: int) -> np.ndarray:
        """``n`` labels holding the invalid marker."""
        return np.full((n, *self.label_shape), self.invalid, dtype=self.label_dtype)

    # -------------------------------------------------------------------------------------- rules
    def labels_and_validity(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float64 values [N, len(value_names)] of annotation rows -> (labels, valid, out_of_range).

        Invalid rows hold the marker in every column, so a label never looks usable where ``valid`` is
        False; ``out_of_range`` marks rows that are neither valid nor the marker (a damaged file)."""
        raise NotImplementedError

    def activation(self, y: Any) -> Any:
        """The head's last nonlinearity on this task's outputs (a torch tensor in, same shape out)."""
        return y

    def to_scores(self, output: Any) -> Any:
        """Head outputs -> what is averaged over windows, filled, smoothed and saved (a torch tensor)."""
        raise NotImplementedError

    def decide(self, scores: np.ndarray, thresholds: Thresholds = None) -> np.ndarray:
        """Scores on frames -> what a submission file holds for them."""
        raise NotImplementedError

    def decision_metrics(self, decisions: np.ndarray, labels: np.ndarray,
                         valid: np.ndarray | None = None) -> dict[str, Any]:
        """The official metrics of decisions (what a submission file holds) against labels."""
        raise NotImplementedError

    def score(self, scores: np.ndarray, labels: np.ndarray, valid: np.ndarray,
              thresholds: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray | None]:
        """Metrics of scores; tasks that tune thresholds tune them here when none are given and return
        them. The default scores the decisions at the task's fixed rule."""
        return self.decision_metrics(self.decide(scores), labels, valid), None

    def smoothing_objective(self, scores: np.ndarray, labels: np.ndarray, columns: list[int]) -> float:
        """What smoothing maximises for the outputs ``columns``: the task's metric restricted to them
        (abawfeat.smoothing). ``scores`` holds just those columns and ``labels`` all the task's; both hold
        only the frames labelled for the task."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- submission files
    def format_rows(self, decisions: np.ndarray) -> list[str]:
        """One video's decisions [N, ...] -> the value part of its N submission rows."""
        raise NotImplementedError

    def check_decisions(self, video: str, decisions: np.ndarray) -> np.ndarray:
        """Validate one video's decisions for writing; raises ValueError (a bug in the caller)."""
        raise NotImplementedError

    def parse_values(self, path: Path, fields: list[str], lineno: int) -> Any:
        """The values of one submission row, or DataError(path, problem, lineno)."""
        raise NotImplementedError

    def stack_rows(self, rows: list[Any]) -> np.ndarray:
        """Parsed rows of one video -> its decisions array (what ``decide`` returns)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class TaskSet:
    """Several tasks trained and scored together (multi-task learning); shaped like a Task where the
    package asks for a run's task: ``name``, ``components``, ``select_metric``, ``default_objective``."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    default_objective: ClassVar[str] = ""
    select_metric: ClassVar[str] = ""
    member_names: ClassVar[tuple[str, ...]] = ()

    @property
    def components(self) -> tuple[Task, ...]:
        return tuple(task(n) for n in self.member_names)  # type: ignore[misc]

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return (*[k for c in self.components for k in c.metric_keys], self.select_metric)

    @property
    def table_columns(self) -> dict[str, str]:
        return {k: v for c in self.components for k, v in c.table_columns.items()}

    @property
    def plots(self) -> tuple[str, ...]:
        return tuple(p for c in self.components for p in c.plots)

    def combine(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Metrics over the whole set, from the components' metrics."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task set {self.name}>"


AnyTask = Task | TaskSet

# Every task a run can have, by name: the three challenge tasks and their multi-task combination.
TASKS: Registry[AnyTask] = Registry("task")


def task(name: str) -> AnyTask:
    """The task (or task set) called ``name``; ConfigError naming the choices otherwise."""
    if name not in TASKS:
        raise ConfigError(f"--task {name!r}: choose one of {', '.join(TASKS.names())}")
    return TASKS.get(name)


def single(name: str) -> Task:
    """A single task by name (not a set); ConfigError otherwise."""
    spec = task(name)
    if not isinstance(spec, Task):
        choices = ", ".join(n for n, t in TASKS.items() if isinstance(t, Task))
        raise ConfigError(f"{name!r} is a set of tasks; choose one of {choices}")
    return spec


def single_tasks() -> list[Task]:
    """The single tasks in the release's order (VA, EXPR, AU): the order of files and of tables."""
    return [t for t in (TASKS.get(n) for n in _ORDER if n in TASKS) if isinstance(t, Task)] + [
        t for n, t in TASKS.items() if isinstance(t, Task) and n not in _ORDER
    ]


def single_task_names() -> tuple[str, ...]:
    """Names of the single tasks in the release's order: ``("va", "expr", "au")``."""
    return tuple(t.name for t in single_tasks())


def task_names(spec: str | AnyTask) -> tuple[str, ...]:
    """The single tasks a run of ``spec`` trains and scores: ``("va",)`` or ``("va", "expr", "au")``."""
    obj = task(spec) if isinstance(spec, str) else spec
    return tuple(c.name for c in obj.components)


def run_task_names() -> list[str]:
    """Every name ``--task`` accepts, single tasks first in the release's order, then the sets."""
    singles = [t.name for t in single_tasks()]
    return singles + [n for n in TASKS.names() if n not in singles]


def check_integer_decisions(video: str, task: str, decisions: np.ndarray, hi: int) -> np.ndarray:
    """Integer decisions in 0..hi, for tasks whose submission files hold integers (a ValueError is a bug in
    the caller, which should have decided first)."""
    a = np.asarray(decisions)
    if a.dtype.kind == "f" and np.any(a != np.round(a)):
        raise ValueError(
            f"write_submission: {task} rows of video {video!r} must be integers (argmax/threshold first)"
        )
    a = a.astype(np.int64)
    if a.min() < 0 or a.max() > hi:
        raise ValueError(f"write_submission: {task} values of video {video!r} outside 0..{hi}")
    return a


def parse_integers(path: Path, title: str, fields: list[str], lineno: int) -> list[int]:
    """The integer values of one submission row, or DataError(path, problem, lineno)."""
    if not all(_INT.match(f) for f in fields):
        raise DataError(path, f"{title} values {fields} are not integers", lineno)
    return [int(f) for f in fields]


# The release's order of the challenge tasks (annotation folders, submission files, tables).
_ORDER = ("va", "expr", "au")

# Importing the modules registers the tasks.
from abawfeat.tasks import au, expr, mtl, va  # noqa: E402, F401

__all__ = ["TASKS", "AnyTask", "Task", "TaskSet", "check_integer_decisions", "parse_integers",
           "run_task_names", "single", "single_task_names", "single_tasks", "task", "task_names"]
