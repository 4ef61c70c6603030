"""``abawfeat analyze``: trained runs applied to a user's own videos.

1. ``abawfeat crop`` into ``WORK/crops`` (resumable; a video already cropped is not cropped again);
2. for each feature cache the runs were trained on, the same extraction again (encoder, weights, encoder
   options, precision, dtype, seed; a random-init encoder calibrated on the same frames of the run's own data
   as it was) into ``WORK/cache/<encoder>-<fingerprint digest>.h5``, so a second ``analyze`` with another run
   on the same encoder re-extracts nothing; the run's fingerprint check then proves the features match;
3. each run through the path ``predict`` uses (``train.evaluate.infer_run``: any trunk, fused caches, the
   run's smoothing, ensembles and cross-validation runs alike), on every crop video of the tree;
4. one CSV row per processed source frame and face track: ``video, track, frame, time_s, face`` and each
   task's values (``valence, arousal``; ``expression`` and ``p_<class>``; ``<AU>_prob`` and ``<AU>``), with
   ``<run>:`` before the columns when several runs are given; frames where the track's face was not found
   have ``face = 0`` and the values the run fills in for them (as in a submission); a video without any face
   has one row per frame with ``track`` empty. A timeline plot per track next to the CSV.

Without a run, ``--backbone ddamfn --weights affectnet8`` gives the checkpoint's own classifier output per
frame (``expression`` and its probabilities, in the checkpoint's class order).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from abawfeat.constants import EXPR_CLASSES
from abawfeat.errors import ConfigError, RunError
from abawfeat.stage_one import ExtractConfig
from abawfeat.tasks import single
from abawfeat.utils.io import atomic_write, atomic_write_text
from abawfeat.video.crop import DETECTIONS_FOLDER, CropConfig, CropResult, run_crop

FIXED_COLUMNS = ["video", "track", "frame", "time_s", "face"]


@dataclass
class AnalyzeConfig:
    out: str  # the CSV
    runs: tuple[str, ...] = ()
    backbone: str | None = None  # without runs: this encoder's own classifier output
    weights: str | None = None
    work: str | None = None  # crops and caches; default: abawfeat-analysis/ beside the CSV
    every: int = 1
    max_frames: int | None = None
    device: str = "auto"
    batch_size: int = 16
    workers: int = 0
    smooth: bool = True  # the runs' own tuned smoothing
    plots: bool = True
    overwrite: bool = False  # replace an earlier analyze table at ``out``


@dataclass
class AnalyzeResult:
    csv: Path
    rows: int
    plots: list[Path] = field(default_factory=list)
    crop: CropResult | None = None
    caches: list[Path] = field(default_factory=list)
    extracted: int = 0  # videos whose features were computed by this call (0: all cached already)


def fingerprint_digest(fingerprint: Any) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _leaf_runs(run_dir: Path) -> list[Path]:
    """The runs that own caches: the run itself, or the members of an ensemble / cross-validation run."""
    from abawfeat.train.evaluate import MEMBER_KINDS, member_dirs
    from abawfeat.train.rundir import require_complete

    record = require_complete(run_dir)
    if record.kind not in MEMBER_KINDS:
        return [run_dir]
    return [leaf for member, _ in member_dirs(run_dir, record) for leaf in _leaf_runs(member)]


def extraction_of(entry: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """How a run's cache was extracted (its ``extract_config``), read from that cache's provenance."""
    from abawfeat.cache import FeatureCache

    path = Path(str(entry.get("path") or ""))
    if not path.is_file():
        raise RunError(f"{run_dir}: its cache {path} is gone; analyze reads how the run's features were "
                       "extracted (encoder, weights, options) from it")
    with FeatureCache(path) as cache:
        prov = cache.provenance
    if str(prov.get("encoder_provenance", {}).get("modality", "face")) == "audio":
        raise ConfigError(f"{run_dir}: trained on audio features ({path}); analyze handles face encoders "
                          "only")
    cfg = dict(prov.get("extract_config") or {})
    if not cfg.get("backbone"):
        raise RunError(f"{path}: records no extraction settings (made by an older abawfeat); re-extract it")
    return cfg


def _extract_config(cfg: dict[str, Any], data: Path, out: Path, config: AnalyzeConfig) -> ExtractConfig:
    random_init = bool(cfg.get("random_init"))
    calibration_data = None
    if random_init:
        calibration_data = Path(str(cfg.get("data") or ""))
        if not calibration_data.is_dir():
            raise ConfigError(f"{out.name}: a --random-init run's encoder is calibrated on its own data "
                              f"({calibration_data}), which is not here; analyze cannot rebuild it")
    return ExtractConfig(
        backbone=str(cfg["backbone"]), data=data, out=out, weights=cfg.get("weights"),
        random_init=random_init,
        encoder_options=dict(cfg.get("encoder_options") or {}), precision=str(cfg.get("precision", "fp32")),
        batch_size=config.batch_size * 2, workers=config.workers, device=config.device,
        dtype=str(cfg.get("dtype", "float16")), compile=False, seed=int(cfg.get("seed") or 0),
        calibration_frames=int(cfg.get("calibration_frames") or 256), calibration_data=calibration_data,
    )


def check_out(out: Path, overwrite: bool = False) -> None:
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"--out {out}: name a .csv file")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; name the CSV to write")
    if out.exists():
        with open(out, encoding="utf-8", errors="replace") as fh:
            first = fh.readline().strip()
        if not first.startswith(",".join(FIXED_COLUMNS)):
            raise ConfigError(f"--out {out}: exists and is not an analyze table; choose another --out")
        if not overwrite:
            raise ConfigError(f"--out {out}: exists; pass --overwrite to replace this earlier analyze table")


def _task_columns(task: str) -> list[str]:
    if task == "va":
        return list(single("va").columns)
    if task == "expr":
        return ["expression", *(f"p_{c}" for c in EXPR_CLASSES)]
    if task == "au":
        return [c for au in single("au").columns for c in (f"{au}_prob", au)]
    return list(single(task).columns)


def _task_values(task: str, scores: np.ndarray, thresholds: Any) -> list[list[str]]:
    spec = single(task)
    if task == "expr":
        cls = spec.decide(scores)
        return [[EXPR_CLASSES[int(c)], *(f"{p:.4f}" for p in s)] for c, s in zip(cls, scores, strict=True)]
    if task == "au":
        dec = spec.decide(scores, thresholds)
        return [[v for p, d in zip(s, dd, strict=True) for v in (f"{p:.4f}", str(int(d)))]
                for s, dd in zip(scores, dec, strict=True)]
    values = spec.decide(scores)
    return [[f"{float(x):.4f}" for x in np.atleast_1d(row)] for row in values]


class _Columns:
    """Per output source: (video, frame) -> values for a block of columns."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.values: dict[str, tuple[np.ndarray, list[list[str]]]] = {}  # video -> (frames, rows)

    def get(self, video: str, frame: int) -> list[str]:
        if video not in self.values:
            return [""] * len(self.names)
        frames, rows = self.values[video]
        i = int(np.searchsorted(frames, frame))
        if i < len(frames) and frames[i] == frame:
            return rows[i]
        return [""] * len(self.names)


def _run_columns(run_dir: Path, prefix: str, data: Path, videos: list[str], caches: dict[str, Path],
                 smooth: bool) -> tuple[_Columns, dict[str, dict[str, np.ndarray]]]:
    from abawfeat.tasks import task_names
    from abawfeat.train.evaluate import infer_run

    def caches_for(record: Any) -> list[Path]:
        return [caches[fingerprint_digest(c.get("fingerprint"))] for c in record.caches]

    inf = infer_run(run_dir, "test", data_root=data, videos=videos, caches_for=caches_for)
    timeline, thresholds = inf.decided_timeline(smooth)
    tasks = task_names(inf.run_task)
    names = [f"{prefix}{c}" for t in tasks for c in _task_columns(t)]
    block = _Columns(names)
    seqs = inf.data
    raw: dict[str, dict[str, np.ndarray]] = {}
    for v, video in enumerate(seqs.videos):
        lo, hi = int(seqs.tl_offsets[v]), int(seqs.tl_offsets[v + 1])
        per_task = [_task_values(t, timeline[t][lo:hi], thresholds if single(t).tunes_thresholds else None)
                    for t in tasks]
        rows = [sum((p[i] for p in per_task), []) for i in range(hi - lo)]
        block.values[video] = (np.arange(1, hi - lo + 1), rows)
        raw[video] = {t: np.asarray(timeline[t][lo:hi]) for t in tasks}
    return block, raw


def _logit_columns(cache_path: Path) -> tuple[_Columns, dict[str, dict[str, np.ndarray]], list[str]]:
    from abawfeat.cache import FeatureCache

    with FeatureCache(cache_path) as cache:
        names = cache.provenance.get("logit_names")
        if not names:
            raise ConfigError(f"{cache.encoder}: these weights have no classifier output; give --run RUN")
        block = _Columns(["expression", *(f"p_{n}" for n in names)])
        raw = {}
        for video in cache.videos():
            logits = cache.logits(video)
            if logits is None:
                raise ConfigError(f"{cache_path}: video {video} has no classifier output")
            z = logits.astype(np.float64)
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            rows = [[names[int(k)], *(f"{x:.4f}" for x in row)]
                    for k, row in zip(p.argmax(1), p, strict=True)]
            block.values[video] = (np.asarray(cache.frames(video)), rows)
            raw[video] = {"classes": p}
    return block, raw, list(names)


def run_analyze(inputs: Sequence[str | Path], config: AnalyzeConfig) -> AnalyzeResult:
    from abawfeat.extract import run_extraction
    from abawfeat.utils.progress import loud_warning

    out = Path(config.out)
    check_out(out, config.overwrite)
    if not config.runs and not config.backbone:
        raise ConfigError("give --run RUN (one or more), or --backbone (with --weights) for an encoder's own "
                          "classifier output")
    if config.runs and config.backbone:
        raise ConfigError("--backbone is for analysis without a run; a run brings its own encoder")
    work = Path(config.work) if config.work else out.parent / "abawfeat-analysis"
    crops = work / "crops"
    run_dirs = [Path(r) for r in config.runs]

    # The extractions the runs need, before anything long: a missing cache or data root is one line now.
    plans: dict[str, ExtractConfig] = {}
    for run_dir in run_dirs:
        for leaf in _leaf_runs(run_dir):
            from abawfeat.train.rundir import RunRecord

            for entry in RunRecord.read(leaf).caches:
                key = fingerprint_digest(entry.get("fingerprint"))
                if key not in plans:
                    cfg = extraction_of(entry, leaf)
                    target = work / "cache" / f"{cfg['backbone']}-{key}.h5"
                    plans[key] = _extract_config(cfg, crops, target, config)
    if config.backbone:
        spec = json.dumps({"backbone": config.backbone, "weights": config.weights}, sort_keys=True)
        key = hashlib.sha256(spec.encode()).hexdigest()[:12]
        plans[key] = ExtractConfig(backbone=config.backbone, data=crops,
                                   out=work / "cache" / f"{config.backbone}-{key}.h5", weights=config.weights,
                                   device=config.device, workers=config.workers, compile=False)
    if any(p.random_init for p in plans.values()):
        loud_warning("a run given to analyze was trained on --random-init features: its outputs mean nothing "
                     "about affect (demo and tests only)")

    crop_config = CropConfig(out=str(crops), every=config.every, max_frames=config.max_frames,
                             device=config.device, batch_size=config.batch_size)
    crop_result = run_crop(inputs, crop_config)
    sources = [s for s in crop_result.sources if s.error is None]
    if not sources:
        raise ConfigError("no input could be cropped; nothing to analyze")
    videos = sorted(v for s in sources for v in s.tracks)
    caches: dict[str, Path] = {}
    extracted = 0
    if videos:
        for key, plan in plans.items():
            extracted += run_extraction(plan).videos_done
            caches[key] = Path(plan.out)  # type: ignore[arg-type]

    blocks: list[_Columns] = []
    raws: list[tuple[str, dict[str, dict[str, np.ndarray]], list[str]]] = []
    if videos:
        names = [p.name for p in run_dirs]
        for i, run_dir in enumerate(run_dirs):
            prefix = "" if len(run_dirs) == 1 else f"{names[i] if names.count(names[i]) == 1 else i + 1}:"
            block, raw = _run_columns(run_dir, prefix, crops, videos, caches, config.smooth)
            blocks.append(block)
            raws.append((prefix.rstrip(":") or run_dir.name, raw, list(EXPR_CLASSES)))
        if config.backbone:
            block, raw, classes = _logit_columns(caches[key])
            blocks.append(block)
            raws.append((config.backbone, raw, classes))

    header = FIXED_COLUMNS + [n for b in blocks for n in b.names]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    n_rows = 0
    times_by_track: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in sources:
        frames, times, faces = _detections(crops, s.name)
        tracks = sorted(s.tracks) or [""]
        for track in tracks:
            with_face = faces.get(track, set())
            for f, t in zip(frames, times, strict=True):
                face = 1 if f in with_face else 0
                values = [v for b in blocks for v in (b.get(track, f) if track else [""] * len(b.names))]
                writer.writerow([s.name, track, f, t, face, *values])
                n_rows += 1
            if track:
                times_by_track[track] = (np.asarray(frames), np.asarray([float(x) for x in times]))
    atomic_write_text(out, buf.getvalue())
    result = AnalyzeResult(csv=out, rows=n_rows, crop=crop_result, caches=list(caches.values()),
                           extracted=extracted)
    if config.plots:
        for track, (frames, times) in times_by_track.items():
            result.plots.append(_plot(out, track, frames, times, raws))
    return result


def _detections(root: Path, name: str) -> tuple[list[int], list[str], dict[str, set[int]]]:
    frames: list[int] = []
    times: list[str] = []
    faces: dict[str, set[int]] = {}
    with open(root / DETECTIONS_FOLDER / f"{name}.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            f = int(row["frame"])
            if not frames or frames[-1] != f:
                frames.append(f)
                times.append(row["time_s"])
            if row["track"]:
                faces.setdefault(row["track"], set()).add(f)
    return frames, times, faces


def _plot(out: Path, track: str, frames: np.ndarray, times: np.ndarray,
          raws: list[tuple[str, dict[str, dict[str, np.ndarray]], list[str]]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(label, name, arr, classes) for label, raw, classes in raws
              for name, arr in raw.get(track, {}).items()]
    fig, axes = plt.subplots(max(len(panels), 1), 1, figsize=(10, 2.2 * max(len(panels), 1)), squeeze=False)
    for ax, (label, name, arr, classes) in zip(axes[:, 0], panels, strict=False):
        idx = np.clip(frames - 1, 0, len(arr) - 1)
        vals = arr[idx]
        if name == "va":
            ax.plot(times, vals[:, 0], label="valence")
            ax.plot(times, vals[:, 1], label="arousal")
            ax.set_ylim(-1, 1)
            ax.legend(loc="upper right", fontsize=7)
        elif name in ("expr", "classes"):
            ax.stackplot(times, vals.T, labels=classes)
            ax.set_ylim(0, 1)
            ax.legend(loc="upper right", fontsize=6, ncol=4)
        else:
            extent = (times[0], times[-1] + 1e-6, vals.shape[1], 0)
            ax.imshow(vals.T, aspect="auto", vmin=0, vmax=1, extent=extent)
            if name == "au":
                ax.set_yticks(np.arange(vals.shape[1]) + 0.5, single("au").columns, fontsize=6)
        ax.set_title(f"{track}: {label} {name}", fontsize=9)
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    path = out.with_name(f"{out.stem}_{track}.png")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return path


__all__ = ["AnalyzeConfig", "AnalyzeResult", "run_analyze"]
