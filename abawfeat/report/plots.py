"""PNG plots for one run directory (contract: docs/architecture.md, "Run directory").

``write_run_plots(run_dir)`` is called by the trainer at the end of every run, so it must never bring a run
down: each plot is built on its own, and a missing file, a missing column or a plotting bug skips that plot
with a ``PlotWarning`` instead of raising. Only a run directory that does not exist at all is an error.

Matplotlib is used through ``Figure`` + ``FigureCanvasAgg`` directly, never through pyplot, so nothing here
selects a global backend or keeps figures alive in pyplot's registry (the trainer may have its own).
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from abawfeat.constants import AU_NAMES, EXPR_CLASSES, VA_NAMES
from abawfeat.errors import DataError
from abawfeat.tasks import TASKS, single, task_names
from abawfeat.utils.io import atomic_write

PLOTS_DIR = "plots"
# Timelines show this many validation videos per task: the ones with the most labelled frames (ties by name),
# so the same run always shows the same videos and runs on the same split can be compared side by side.
N_TIMELINE_VIDEOS = 3
DPI = 110

# File names, in the order the HTML report shows them, with the caption it prints under each.
PLOT_CAPTIONS: dict[str, str] = {
    "learning_curves.png": "Loss and validation metrics per epoch (dashed: train; dotted line: best epoch).",
    "va_hist2d.png": "Valence and arousal: 2-D histogram of prediction against label (log colour), "
    "identity line dashed.",
    "timeline_va.png": "Valence and arousal over time in the longest validation videos (black: label).",
    "expr_confusion.png": "Expression confusion matrix, rows normalised to 1 "
    "(row: label, column: prediction).",
    "timeline_expr.png": "Expression class over time in the longest validation videos (grey: label).",
    "au_f1.png": "Per-AU F1 at threshold 0.5 and at the tuned thresholds.",
    "timeline_au.png": "AU labels and predicted probabilities over time in the longest validation videos.",
}

_LOSS_EXCLUDE = {"epoch", "seconds", "time", "lr", "learning_rate", "step", "wall_time"}
# Metric columns worth a line on the learning-curve plot; other numeric columns are drawn only when few.
_KNOWN_METRICS = {"metric", "ccc_va", "ccc_valence", "ccc_arousal", "f1_expr", "f1_au", "f1_au_opt", "score"}
_MAX_UNKNOWN_LINES = 8


class PlotWarning(UserWarning):
    """A plot was skipped (missing or unreadable input, or a plotting error); the run itself is fine."""


def run_tasks(task: str | None) -> tuple[str, ...]:
    """The single tasks a run covers (a task set, such as ``mtl``, covers its members); () if unknown."""
    return task_names(task) if task in TASKS else ()


def expected_plots(task: str | None) -> list[str]:
    """Plot file names a complete run of ``task`` gets, in report order: the learning curves, then the
    plots each of its tasks declares."""
    return ["learning_curves.png", *[p for t in run_tasks(task) for p in single(t).plots]]


# ---------------------------------------------------------------------------------------------- inputs


def _warn(run_dir: Path, message: str) -> None:
    # stacklevel 3 points the warning at write_run_plots' caller (the trainer or the CLI), not at this helper.
    warnings.warn(f"{run_dir}: {message}", PlotWarning, stacklevel=3)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return data if isinstance(data, dict) else None


def read_history(path: Path) -> dict[str, np.ndarray]:
    """history.csv as float columns; cells that are not numbers become NaN so a stray value or an extra
    text column never stops the plot. Header names are stripped of spaces (``epoch, train_loss`` works)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ValueError("history.csv is empty")
    header = [name.strip() for name in rows[0]]
    body = [row for row in rows[1:] if any(cell.strip() for cell in row)]
    columns: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        if not name:
            continue
        values = []
        for row in body:
            try:
                values.append(float(row[j]))
            except (IndexError, ValueError):
                values.append(math.nan)
        columns[name] = np.asarray(values, dtype=np.float64)
    return columns


def _read_outputs(path: Path) -> dict[str, np.ndarray]:
    """val_outputs.npz fully in memory; pickled (object) arrays are refused rather than unpickled."""
    with np.load(path, allow_pickle=False) as npz:
        data = {key: npz[key] for key in npz.files}
    video = data.get("video")
    if video is not None and video.dtype.kind == "S":
        data["video"] = np.char.decode(video, "utf-8")
    return data


def _ccc(x: np.ndarray, y: np.ndarray) -> float:
    # Only a fallback for the title when metrics.json lacks the value; the official number is the trainer's.
    if x.size < 2:
        return math.nan
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()
    denom = x.var() + y.var() + (mx - my) ** 2
    return float(2 * cov / denom) if denom > 0 else math.nan


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _valid_rows(outputs: Mapping[str, np.ndarray], task: str, n: int) -> np.ndarray:
    """Rows whose ``task`` label is valid: ``{task}_valid`` when present (any column for a 2-D mask is not
    enough: every column must be valid), otherwise the release's invalid markers."""
    label = outputs[f"{task}_label"]
    valid = outputs.get(f"{task}_valid")
    if valid is not None:
        mask = np.asarray(valid).astype(bool)
        if mask.ndim > 1:
            mask = mask.all(axis=tuple(range(1, mask.ndim)))
    else:
        mask = np.all(label.reshape(n, -1) != single(task).invalid, axis=1)  # the release's invalid marker
    if mask.shape != (n,):
        raise ValueError(f"{task}_valid has shape {mask.shape}, expected ({n},)")
    return mask


def _require(outputs: Mapping[str, np.ndarray], keys: tuple[str, ...]) -> int:
    missing = [k for k in keys if k not in outputs]
    if missing:
        raise ValueError(f"val_outputs.npz lacks {', '.join(missing)}")
    n = len(outputs[keys[0]])
    for k in keys[1:]:
        if len(outputs[k]) != n:
            raise ValueError(f"val_outputs.npz: {k} has {len(outputs[k])} rows, {keys[0]} has {n}")
    return n


def timeline_videos(
    outputs: Mapping[str, np.ndarray], task: str, mask: np.ndarray | None = None, k: int = N_TIMELINE_VIDEOS
) -> list[str]:
    """The ``k`` validation videos with the most frames carrying a valid ``task`` label, ties by name."""
    if mask is None:
        mask = _valid_rows(outputs, task, len(outputs[f"{task}_label"]))
    video = np.asarray(outputs["video"]).astype(str)
    names, counts = np.unique(video[mask], return_counts=True)
    # np.unique sorts names, and a stable sort on -count keeps that order among ties: fully deterministic.
    order = np.argsort(-counts, kind="stable")
    return [str(names[i]) for i in order[:k]]


# ---------------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    # Through a temporary file and a rename: a report built while a run is writing never reads half a PNG.
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _metric_base(column: str) -> str:
    for prefix in ("train_", "val_"):
        if column.startswith(prefix):
            return column[len(prefix):]
    return column


def plot_learning_curves(history: Mapping[str, np.ndarray], best_epoch: float = math.nan) -> Figure:
    n = len(next(iter(history.values()))) if history else 0
    if n == 0:
        raise ValueError("history.csv has no rows")
    epoch = history.get("epoch", np.arange(1, n + 1, dtype=np.float64))
    loss_cols = [c for c in history if "loss" in c and np.isfinite(history[c]).any()]
    metric_cols = [
        c for c in history
        if c not in _LOSS_EXCLUDE and "loss" not in c and np.isfinite(history[c]).any()
    ]
    others = [c for c in metric_cols if c != "val_metric"]
    if "val_metric" in metric_cols and any(
        np.array_equal(history["val_metric"], history[c], equal_nan=True) for c in others
    ):
        metric_cols.remove("val_metric")  # the selection metric is already drawn under its own name
    known = [c for c in metric_cols if _metric_base(c) in _KNOWN_METRICS]
    if len(metric_cols) > _MAX_UNKNOWN_LINES:
        metric_cols = known  # per-class or other extra columns would bury the main curves

    fig = _figure(9, 3.6)
    ax_loss, ax_metric = fig.subplots(1, 2)
    # One colour per metric base so that train_x (dashed) and val_x (solid) read as a pair.
    bases = sorted({_metric_base(c) for c in loss_cols + metric_cols})
    colors = {b: f"C{i % 10}" for i, b in enumerate(bases)}

    def draw(ax: Any, col: str, suffix: str = "") -> None:
        style = "--" if col.startswith("train_") else "-"
        ax.plot(epoch, history[col], style, marker="o", markersize=3, color=colors[_metric_base(col)],
                label=col + suffix)

    for col in loss_cols:
        draw(ax_loss, col)
    ax_loss.set_title("Loss")
    # Scores that can exceed 1 (the multi-task score sums three metrics) get their own axis so the
    # [0, 1] metrics are not squashed flat.
    wide = [c for c in metric_cols if np.nanmax(np.abs(history[c])) > 1.5]
    narrow = [c for c in metric_cols if c not in wide]
    for col in narrow:
        draw(ax_metric, col)
    ax_metric.set_title("Metrics")
    handles, labels = ax_metric.get_legend_handles_labels()
    if wide:
        ax_wide = ax_metric.twinx()
        for col in wide:
            draw(ax_wide, col, " (right axis)")
        ax_wide.set_ylabel(", ".join(wide))
        h2, l2 = ax_wide.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    for ax in (ax_loss, ax_metric):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if math.isfinite(best_epoch):
            ax.axvline(best_epoch, color="0.4", linestyle=":", linewidth=1.2)
    if loss_cols:
        ax_loss.legend(fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no loss columns", ha="center", va="center", transform=ax_loss.transAxes)
    if handles:
        ax_metric.legend(handles, labels, fontsize=8)
    else:
        ax_metric.text(0.5, 0.5, "no metric columns", ha="center", va="center", transform=ax_metric.transAxes)
    return fig


def plot_va_hist2d(outputs: Mapping[str, np.ndarray], metrics: Mapping[str, Any]) -> Figure:
    n = _require(outputs, ("va_label", "va_pred"))
    mask = _valid_rows(outputs, "va", n)
    label = np.asarray(outputs["va_label"], dtype=np.float64)[mask]
    pred = np.asarray(outputs["va_pred"], dtype=np.float64)[mask]
    if label.shape[0] == 0:
        raise ValueError("no valid VA frames")
    fig = _figure(9, 4.1)
    axes = fig.subplots(1, 2)
    edges = np.linspace(-1, 1, 61)
    for d, (ax, name) in enumerate(zip(axes, VA_NAMES, strict=True)):
        # Predictions outside [-1, 1] are clipped onto the border bins instead of vanishing from the plot.
        x, y = np.clip(label[:, d], -1, 1), np.clip(pred[:, d], -1, 1)
        counts, _, _ = np.histogram2d(x, y, bins=(edges, edges))
        shown = np.ma.masked_equal(counts.T, 0)  # rows = prediction bins so y is the prediction
        image = ax.pcolormesh(edges, edges, shown, norm=LogNorm(vmin=1, vmax=max(counts.max(), 1.0)),
                              cmap="viridis")
        ax.plot([-1, 1], [-1, 1], "--", color="crimson", linewidth=1.2, label="identity")
        ccc = _number(metrics.get(f"ccc_{name}"))
        if not math.isfinite(ccc):
            ccc = _ccc(label[:, d], pred[:, d])
        ax.set_title(f"{name.capitalize()}: CCC {ccc:.3f}  (n = {label.shape[0]:,})")
        ax.set_xlabel(f"label {name}")
        ax.set_ylabel(f"predicted {name}")
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_aspect("equal")
        ax.legend(loc="upper left", fontsize=8)
        fig.colorbar(image, ax=ax, label="frames", shrink=0.85)
    return fig


def expr_confusion(outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Row-normalised confusion matrix [8, 8] in Aff-Wild2 class order (row: label, column: arg-max
    prediction) over the frames with a valid expression label, and the number of frames per label."""
    n = _require(outputs, ("expr_label", "expr_prob"))
    mask = _valid_rows(outputs, "expr", n)
    k = len(EXPR_CLASSES)
    label = np.asarray(outputs["expr_label"]).reshape(n)[mask].astype(np.int64)
    prob = np.asarray(outputs["expr_prob"])[mask]
    if prob.ndim != 2 or prob.shape[1] != k:
        raise ValueError(f"expr_prob has shape {prob.shape}, expected [N, {k}]")
    keep = (label >= 0) & (label < k)
    label, pred = label[keep], prob[keep].argmax(axis=1)
    if label.size == 0:
        raise ValueError("no valid expression frames")
    counts = np.bincount(label * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
    support = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = counts / support[:, None]  # rows without frames stay NaN and are drawn blank
    return norm, support


def plot_expr_confusion(outputs: Mapping[str, np.ndarray], metrics: Mapping[str, Any]) -> Figure:
    norm, support = expr_confusion(outputs)
    k = len(EXPR_CLASSES)
    fig = _figure(6.8, 5.8)
    ax = fig.subplots()
    # aspect="auto": a fixed aspect makes constrained layout clip the tick labels and colour bar.
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(k):
        for j in range(k):
            if math.isfinite(norm[i, j]):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.55 else "black")
    ax.set_xticks(range(k), EXPR_CLASSES, rotation=40, ha="right")
    ax.set_yticks(range(k), [f"{c} ({int(s):,})" for c, s in zip(EXPR_CLASSES, support, strict=True)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("label (frames)")
    f1 = _number(metrics.get("f1_expr"))
    suffix = f"; macro F1 {f1:.3f}" if math.isfinite(f1) else ""
    ax.set_title("Expression confusion, row-normalised" + suffix)
    fig.colorbar(image, ax=ax, shrink=0.9)
    return fig


def plot_au_f1(metrics: Mapping[str, Any]) -> Figure:
    at_half = metrics.get("f1_au_per_au")
    tuned = metrics.get("f1_au_opt_per_au")
    thresholds = metrics.get("au_thresholds")
    if not isinstance(at_half, Mapping) and not isinstance(tuned, Mapping):
        raise ValueError("metrics.json has neither f1_au_per_au nor f1_au_opt_per_au")
    at_half = at_half if isinstance(at_half, Mapping) else {}
    tuned = tuned if isinstance(tuned, Mapping) else {}
    thresholds = thresholds if isinstance(thresholds, Mapping) else {}
    x = np.arange(len(AU_NAMES))
    half_v = np.array([_number(at_half.get(au)) for au in AU_NAMES])
    tuned_v = np.array([_number(tuned.get(au)) for au in AU_NAMES])
    fig = _figure(9, 3.8)
    ax = fig.subplots()
    mean_half, mean_tuned = _number(metrics.get("f1_au")), _number(metrics.get("f1_au_opt"))
    ax.bar(x - 0.2, np.nan_to_num(half_v), 0.4, color="C0",
           label="threshold 0.5" + (f" (mean {mean_half:.3f})" if math.isfinite(mean_half) else ""))
    ax.bar(x + 0.2, np.nan_to_num(tuned_v), 0.4, color="C1",
           label="tuned thresholds" + (f" (mean {mean_tuned:.3f})" if math.isfinite(mean_tuned) else ""))
    for mean, color in ((mean_half, "C0"), (mean_tuned, "C1")):
        if math.isfinite(mean):
            ax.axhline(mean, color=color, linestyle="--", linewidth=1)
    ticks = []
    for au in AU_NAMES:
        t = _number(thresholds.get(au))
        ticks.append(f"{au}\nt={t:.2f}" if math.isfinite(t) else au)
    ax.set_xticks(x, ticks, fontsize=8)
    # Headroom above 1 keeps the legend clear of the bars, which can reach any height.
    ax.set_ylim(0, 1.13)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("F1")
    ax.set_title("Per-AU F1 (t: tuned threshold)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    return fig


def _video_rows(outputs: Mapping[str, np.ndarray], task: str, n: int) -> tuple[list[str], np.ndarray]:
    """The chosen videos and, for the whole split, the valid-label mask of ``task``."""
    if "video" not in outputs or "frame" not in outputs:
        raise ValueError("val_outputs.npz lacks video or frame")
    if len(outputs["video"]) != n or len(outputs["frame"]) != n:
        raise ValueError("val_outputs.npz: video / frame lengths differ from the labels")
    mask = _valid_rows(outputs, task, n)
    videos = timeline_videos(outputs, task, mask)
    if not videos:
        raise ValueError(f"no video with valid {task} labels")
    return videos, mask


def _one_video(outputs: Mapping[str, np.ndarray], video: str) -> np.ndarray:
    rows = np.flatnonzero(np.asarray(outputs["video"]).astype(str) == video)
    return rows[np.argsort(outputs["frame"][rows], kind="stable")]


def plot_timeline_va(outputs: Mapping[str, np.ndarray]) -> Figure:
    n = _require(outputs, ("va_label", "va_pred"))
    videos, mask = _video_rows(outputs, "va", n)
    fig = _figure(11, 1.9 * len(videos) + 0.3)
    axes = np.atleast_2d(fig.subplots(len(videos), 2, squeeze=False))
    for r, video in enumerate(videos):
        rows = _one_video(outputs, video)
        frame = outputs["frame"][rows]
        label = np.asarray(outputs["va_label"], dtype=np.float64)[rows]
        label[~mask[rows]] = np.nan  # gaps where the frame has no valid label
        pred = np.asarray(outputs["va_pred"], dtype=np.float64)[rows]
        for d, name in enumerate(VA_NAMES):
            ax = axes[r, d]
            ax.plot(frame, label[:, d], color="black", linewidth=1.4, label="label")
            ax.plot(frame, pred[:, d], color=f"C{d}", linewidth=0.9, alpha=0.9, label="prediction")
            ax.set_ylim(-1.05, 1.05)
            ax.set_title(f"{video}: {name}", fontsize=9)
            ax.grid(alpha=0.3)
            if r == len(videos) - 1:
                ax.set_xlabel("frame")
            if r == 0:
                ax.legend(fontsize=7, loc="upper right")
    return fig


def plot_timeline_expr(outputs: Mapping[str, np.ndarray]) -> Figure:
    n = _require(outputs, ("expr_label", "expr_prob"))
    videos, mask = _video_rows(outputs, "expr", n)
    k = len(EXPR_CLASSES)
    fig = _figure(11, 2.0 * len(videos) + 0.3)
    axes = fig.subplots(len(videos), 1, squeeze=False)[:, 0]
    for ax, video in zip(axes, videos, strict=True):
        rows = _one_video(outputs, video)
        frame = outputs["frame"][rows]
        label = np.asarray(outputs["expr_label"]).reshape(n)[rows].astype(np.float64)
        label[~mask[rows]] = np.nan
        pred = np.asarray(outputs["expr_prob"])[rows].argmax(axis=1)
        ax.step(frame, label, where="post", color="0.6", linewidth=4, alpha=0.7, label="label")
        ax.step(frame, pred, where="post", color="C3", linewidth=1, label="prediction")
        ax.set_yticks(range(k), EXPR_CLASSES, fontsize=7)
        ax.set_ylim(-0.5, k - 0.5)
        ax.set_title(video, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("frame")
    return fig


def plot_timeline_au(outputs: Mapping[str, np.ndarray]) -> Figure:
    n = _require(outputs, ("au_label", "au_prob"))
    videos, mask = _video_rows(outputs, "au", n)
    k = len(AU_NAMES)
    fig = _figure(11, 2.7 * len(videos) + 0.4)
    axes = fig.subplots(2 * len(videos), 1, squeeze=False)[:, 0]
    image = None
    for r, video in enumerate(videos):
        rows = _one_video(outputs, video)
        frame = outputs["frame"][rows]
        label = np.asarray(outputs["au_label"], dtype=np.float64)[rows]
        label[~mask[rows]] = np.nan  # drawn blank: no valid AU label on that frame
        label[label < 0] = np.nan
        prob = np.asarray(outputs["au_prob"], dtype=np.float64)[rows]
        extent = (float(frame[0]) - 0.5, float(frame[-1]) + 0.5, k - 0.5, -0.5)
        for ax, data, kind in ((axes[2 * r], label, "label"), (axes[2 * r + 1], prob, "probability")):
            image = ax.imshow(data.T, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1,
                              extent=extent)
            ax.set_yticks(range(k), AU_NAMES, fontsize=6)
            ax.set_title(f"{video}: {kind}", fontsize=9)
        axes[2 * r].tick_params(labelbottom=False)
    axes[-1].set_xlabel("frame")
    if image is not None:
        fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.01)
    return fig


# ---------------------------------------------------------------------------------------------- entry


def write_run_plots(run_dir: str | Path, *, metrics: Mapping[str, Any] | None = None) -> list[Path]:
    """Write every plot the run's files allow into ``<run_dir>/plots/``; return their paths in report order.

    ``metrics`` is the content of metrics.json for a caller that has it but writes the file last (the
    trainer keeps metrics.json as its completion mark); without it, metrics.json is read from ``run_dir``.
    Never raises for missing or malformed run files: each plot that cannot be made is skipped with a
    ``PlotWarning`` naming the run and the reason. Raises ``DataError`` only when ``run_dir`` does not exist.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(run_dir, "run directory does not exist")
    out_dir = run_dir / PLOTS_DIR
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as exc:
        _warn(run_dir, f"cannot create {out_dir}: {exc}; no plots written")
        return []

    def load(name: str, reader: Callable[[Path], Any]) -> Any:
        path = run_dir / name
        if not path.is_file():
            _warn(run_dir, f"{name} is missing; plots that need it are skipped")
            return None
        try:
            return reader(path)
        except Exception as exc:  # any unreadable file only costs the plots built from it
            _warn(run_dir, f"{name} cannot be read ({type(exc).__name__}: {exc}); "
                           "plots that need it are skipped")
            return None

    if metrics is None:
        metrics = load("metrics.json", _read_json) or {}
    config = _read_json_quietly(run_dir / "config.json")
    task = metrics.get("task") or config.get("task")
    if task not in TASKS:
        _warn(run_dir, f"unknown task {task!r} in metrics.json / config.json; only learning curves are drawn")
    tasks = run_tasks(task)
    history = load("history.csv", read_history)
    outputs = load("val_outputs.npz", _read_outputs) if tasks else None

    # Only plots whose inputs were read get drawn; missing inputs were reported once above.
    best_epoch = _number(metrics.get("best_epoch"))
    inputs = {"outputs": outputs, "metrics": metrics or None}
    builders: dict[str, Callable[[], Figure]] = {}
    if history is not None:
        builders["learning_curves.png"] = lambda: plot_learning_curves(history, best_epoch)
    for name, (needs, draw) in PLOT_KINDS.items():
        if all(inputs[n] is not None for n in needs):
            builders[name] = lambda draw=draw: draw(outputs, metrics)

    written: list[Path] = []
    for name in expected_plots(task):
        build = builders.get(name)
        if build is None:
            continue
        path = out_dir / name
        try:
            _save(build(), path)
        except Exception as exc:  # a plot must never bring down the training run that asked for it
            _warn(run_dir, f"{name} skipped ({type(exc).__name__}: {exc})")
            continue
        written.append(path)
    return written


# The plots a task can declare (Task.plots): the run files each cannot do without ("outputs" =
# val_outputs.npz, "metrics" = metrics.json) and how it is drawn from (outputs, metrics).
PLOT_KINDS: dict[str, tuple[tuple[str, ...], Callable[[Any, Any], Figure]]] = {
    "va_hist2d.png": (("outputs",), lambda o, m: plot_va_hist2d(o, m)),
    "timeline_va.png": (("outputs",), lambda o, m: plot_timeline_va(o)),
    "expr_confusion.png": (("outputs",), lambda o, m: plot_expr_confusion(o, m)),
    "timeline_expr.png": (("outputs",), lambda o, m: plot_timeline_expr(o)),
    "au_f1.png": (("metrics",), lambda o, m: plot_au_f1(m)),
    "timeline_au.png": (("outputs",), lambda o, m: plot_timeline_au(o)),
}


def try_write_run_plots(run_dir: str | Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """``write_run_plots`` for callers that finished a run (train-head, ablate, cv, ensemble): a plotting
    problem (matplotlib missing, a bug) costs the pictures and one log line, never the run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PlotWarning)
            return write_run_plots(run_dir)
    except Exception as exc:  # the run is complete without pictures
        if log is not None:
            log(f"plots skipped ({type(exc).__name__}: {exc})")
        return []


def _read_json_quietly(path: Path) -> dict[str, Any]:
    # config.json only supplies the task when metrics.json lacks it; its absence is not worth a warning.
    try:
        return _read_json(path) or {}
    except (OSError, ValueError):
        return {}


__all__ = [
    "PLOT_CAPTIONS", "PlotWarning", "expected_plots", "expr_confusion", "read_history", "run_tasks",
    "timeline_videos", "try_write_run_plots", "write_run_plots",
]
