"""``abawfeat crop``: raw videos and photos in, aligned face crops out, in the release's layout.

For every source (a video, or a still as a one-frame video), frames are streamed through PyAV in batches,
faces detected (the detector registry), linked into tracks, aligned onto the five-point template at each
scale, and written as ``ROOT/cropped_aligned/<video>/<frame>.jpg`` (1-based source frame numbers, five
digits); each further scale is its own tree, ``ROOT/scale-<s>/cropped_aligned/``. Per source,
``ROOT/detections/<source>.csv`` holds every processed frame (frames without a face included: one row with
``faces = 0``) and ``ROOT/detections/<source>.json`` its summary; that JSON is written last and marks the
source complete.

Resuming after ``kill -9``: a source's crops are written into ``ROOT/.work/<source>/`` and moved into place
only when the source is done (a plan of the moves is written first, so moves cut short are finished on the
next run); an incomplete source is redone from its first frame, complete ones are skipped. The tree's
settings (detector, weights, size, margin, scales, subsampling, tracking) are in ``ROOT/crop.json``; a second
run with other settings is refused, since its crops would not belong with the first ones. One writer at a
time: the lock of ``abawfeat.cache`` on ``ROOT/crop.lock``. A source that cannot be read is one line and the
others go on.
"""

from __future__ import annotations

import csv
import io
import json
import queue
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from abawfeat.cache import acquire_lock, release_lock
from abawfeat.data.names import crop_file_name, video_name_problem
from abawfeat.errors import ConfigError, DataError, DiskFullError
from abawfeat.utils.io import atomic_write_text, file_in_the_way, is_disk_full, write_json
from abawfeat.video.align import similarity, template, warp
from abawfeat.video.detectors import FaceDetections, build_detector
from abawfeat.video.frames import FrameSource, is_media
from abawfeat.video.track import TrackConfig, Tracker, kept_tracks, track_names

T = TypeVar("T")
CROPS_FOLDER = "cropped_aligned"
DETECTIONS_FOLDER = "detections"
WORK_FOLDER = ".work"
TREE_RECORD = "crop.json"
POINT_COLUMNS = [f"{p}_{a}" for p in ("leye", "reye", "nose", "mouth_l", "mouth_r") for a in ("x", "y")]
CSV_COLUMNS = ["frame", "time_s", "faces", "face", "track", "track_id", "score", "x1", "y1", "x2", "y2",
               *POINT_COLUMNS]


@dataclass
class CropConfig:
    out: str
    detector: str = "mtcnn"
    detector_weights: str | None = None  # None: the detector's published weights
    size: int = 112  # crop side in pixels
    margin: float = 0.0  # extra context per side, as a fraction of the template's face
    scales: tuple[float, ...] = (1.0,)  # one tree per scale (zoom-out factors)
    every: int = 1  # process every N-th frame (1: all)
    max_frames: int | None = None  # stop after this source frame
    batch_size: int = 16  # frames per detector pass
    device: str = "auto"
    min_face: float = 20.0  # smallest face searched for, pixels
    quality: int = 95  # JPEG quality
    tracking: TrackConfig = field(default_factory=TrackConfig)


@dataclass
class SourceResult:
    source: str  # the file
    name: str  # the video name it gives
    frames_read: int = 0  # source frames decoded
    processed: int = 0  # frames run through the detector
    with_face: int = 0
    without_face: int = 0
    extra_faces: int = 0  # frames with more than one face
    tracks: dict[str, int] = field(default_factory=dict)  # output video -> crops
    short_detections: int = 0  # detections in tracks too short to become a video
    skipped: bool = False  # complete from an earlier run
    error: str | None = None

    def summary(self) -> str:
        if self.error:
            return self.error
        names = ", ".join(f"{n} ({c})" for n, c in self.tracks.items()) or "none"
        line = (f"{self.name}: {self.processed} frames processed, {self.with_face} with a face, "
                f"{self.without_face} without, {self.extra_faces} with more than one; tracks: {names}")
        if self.short_detections:
            line += (f"; {self.short_detections} detections in tracks too short for a video "
                     "(in the table only)")
        return line + (" (complete from an earlier run)" if self.skipped else "")


def scale_root(out: Path, index: int, scale: float) -> Path:
    """The tree of the ``index``-th scale: the first is ``out`` itself, others ``out/scale-<s>``."""
    return out if index == 0 else out / f"scale-{scale:g}"


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--scales {text!r}: give comma-separated numbers, e.g. 1.0,1.25") from None
    if not scales or any(s <= 0 for s in scales) or len(set(scales)) != len(scales):
        raise ConfigError(f"--scales {text!r}: positive, distinct numbers, e.g. 1.0,1.25")
    return scales


def find_sources(inputs: Sequence[str | Path], exclude: Path | None = None) -> tuple[list[Path], list[str]]:
    """Media files named or found in the named folders (recursively, sorted; hidden files and anything under
    ``exclude``, the output tree, left out), and one line per problem."""
    found: list[Path] = []
    problems: list[str] = []
    skip = exclude.resolve() if exclude is not None else None

    def outside(p: Path) -> bool:
        return skip is None or not p.resolve().is_relative_to(skip)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_media(p) and outside(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                problems.append(f"{path}: no video or image files in this folder")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    names: dict[str, Path] = {}
    unique = []
    for p in found:
        problem = video_name_problem(p.stem)
        if problem:
            problems.append(f"{p}: video name {p.stem!r} cannot be used: {problem}; rename the file")
        elif p.stem in names:
            problems.append(f"{p}: same video name as {names[p.stem]}; rename one of them")
        else:
            names[p.stem] = p
            unique.append(p)
    return unique, problems


def tree_settings(config: CropConfig, detector_provenance: dict[str, Any]) -> dict[str, Any]:
    """What every crop of a tree shares; a second run must agree on all of it."""
    return {"format": "abawfeat-crop", "format_version": 1, "detector": detector_provenance,
            "size": config.size, "margin": config.margin, "scales": list(config.scales),
            "every": config.every, "max_frames": config.max_frames, "tracking": asdict(config.tracking)}


class _Writer:
    """One source's crops, into its work folder."""

    def __init__(self, work: Path, config: CropConfig) -> None:
        self.work = work
        self.config = config
        self.templates = [template(config.size, config.margin, s) for s in config.scales]
        self.counts: dict[int, int] = {}

    def folder(self, scale_index: int, track: int) -> Path:
        return self.work / f"s{scale_index}" / f"t{track}"

    def write(self, frames: Any, dets: list[FaceDetections], numbers: list[int],
              ids: list[list[int]]) -> None:
        import torch
        from PIL import Image

        which, mats, where = [], [], []
        for i, (d, frame_ids) in enumerate(zip(dets, ids, strict=True)):
            for j in range(len(d)):
                for k, tpl in enumerate(self.templates):
                    which.append(i)
                    mats.append(similarity(d.landmarks[j], tpl))
                    where.append((k, frame_ids[j], numbers[i]))
        if not which:
            return
        images = frames.permute(0, 3, 1, 2).float()
        crops = warp(images, torch.as_tensor(which, device=images.device),
                     torch.as_tensor(np.stack(mats), device=images.device), self.config.size)
        pixels = crops.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for (k, track, number), px in zip(where, pixels, strict=True):
            folder = self.folder(k, track)
            path = folder / crop_file_name(number)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(px).save(path, quality=self.config.quality)
            except OSError as exc:
                if is_disk_full(exc):
                    raise DiskFullError(f"{path}: no space left on the device; the tree's complete videos "
                                        "are kept, this one is redone by the next run", path) from None
                raise
            if k == 0:
                self.counts[track] = self.counts.get(track, 0) + 1


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(path, f"damaged ({type(exc).__name__}); delete it and this source's crop folders to "
                        "crop it again") from None
    if not isinstance(data, dict):
        raise DataError(path, "damaged (not a JSON object); delete it and this source's crop folders")
    return data


def _csv_text(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    w.writerows(rows)
    return buf.getvalue()


def _fmt(x: float) -> str:
    return f"{x:.2f}"


class Cropper:
    """The crop loop over sources; ``run_crop`` is its entry point."""

    def __init__(self, config: CropConfig, advance: Callable[[int], None] | None = None) -> None:
        from abawfeat.utils.device import resolve_device

        self.config = config
        self.root = Path(config.out)
        self.device = resolve_device(config.device)
        self.detector = build_detector(config.detector, weights=config.detector_weights, device=self.device,
                                       min_face=config.min_face)
        self.settings = tree_settings(config, self.detector.provenance)
        self.advance = advance or (lambda n: None)

    def crop_dirs(self) -> list[Path]:
        return [scale_root(self.root, k, s) / CROPS_FOLDER for k, s in enumerate(self.config.scales)]

    def check_tree(self) -> None:
        record = self.root / TREE_RECORD
        if record.is_file():
            try:
                stored = json.loads(record.read_text())
            except (OSError, ValueError) as exc:
                raise DataError(record, f"not a crop record ({type(exc).__name__}); move it away") from None
            if stored != self.settings:
                keys = set(stored) | set(self.settings)
                diff = ", ".join(sorted(k for k in keys if stored.get(k) != self.settings.get(k)))
                raise ConfigError(f"{self.root}: this crop tree was made with other settings ({diff} differ, "
                                  f"see {record}); use another --out")
        else:
            write_json(record, self.settings, durable=True)

    def source(self, path: Path) -> SourceResult:
        name = path.stem
        result = SourceResult(source=str(path), name=name)
        det_dir = self.root / DETECTIONS_FOLDER
        marker = det_dir / f"{name}.json"
        work = self.root / WORK_FOLDER / name
        if marker.is_file():
            stored = _read_json(marker)
            same_size = stored.get("source_size") in (None, path.stat().st_size)
            if not same_size or stored.get("source_name") not in (None, path.name):
                raise DataError(path, f"{self.root} already holds video {name!r} from another file "
                                f"({stored.get('source')}); rename this one or choose another --out")
            for key in ("frames_read", "processed", "with_face", "without_face", "extra_faces", "tracks",
                        "short_detections"):
                setattr(result, key, stored[key])
            result.skipped = True
            return result
        plan = work / "plan.json"
        if plan.is_file():  # killed while moving a finished source's crops into place: finish the moves
            stored = _read_json(plan)
            self._move(stored["moves"])
            for key, value in stored["result"].items():
                setattr(result, key, value)
            self._finish(work, marker, result)
            return result
        shutil.rmtree(work, ignore_errors=True)
        try:
            self._detect_and_write(path, work, result, det_dir)
        except BaseException:
            if not plan.is_file():  # with a plan, some crops may be in place already: the next run finishes
                shutil.rmtree(work, ignore_errors=True)
            raise
        return result

    def _detect_and_write(self, path: Path, work: Path, result: SourceResult, det_dir: Path) -> None:
        import torch

        cfg = self.config
        tracker = Tracker(cfg.tracking)
        writer = _Writer(work, cfg)
        rows: list[list[Any]] = []
        detection_rows: list[tuple[int, list[Any]]] = []  # (track id, row without the track name)
        batch: list[Any] = []
        step = 0

        def flush() -> None:
            nonlocal step
            if not batch:
                return
            pixels = torch.from_numpy(np.stack([f.rgb for f in batch]))
            if self.device.type == "cuda":
                pixels = pixels.pin_memory()
            pixels = pixels.to(self.device, non_blocking=True)
            dets = self.detector.detect(pixels)
            ids = []
            for f, d in zip(batch, dets, strict=True):
                frame_ids = tracker.update(step, f.number, d)
                step += 1
                ids.append(frame_ids)
                result.processed += 1
                if len(d) == 0:
                    result.without_face += 1
                    rows.append([f.number, f"{f.time:.6f}", 0] + [""] * (len(CSV_COLUMNS) - 3))
                else:
                    result.with_face += 1
                    result.extra_faces += len(d) > 1
                for j in range(len(d)):
                    row = [f.number, f"{f.time:.6f}", len(d), j + 1, None, frame_ids[j],
                           f"{float(d.scores[j]):.5f}", *map(_fmt, d.boxes[j]),
                           *map(_fmt, d.landmarks[j].reshape(-1))]
                    rows.append(row)
                    detection_rows.append((frame_ids[j], row))
            writer.write(pixels, dets, [f.number for f in batch], ids)
            batch.clear()

        with FrameSource(path) as src:
            for number, frame in _prefetched(src.frames(cfg.every, cfg.max_frames), 2 * cfg.batch_size):
                result.frames_read = number
                self.advance(1)
                if frame is None:
                    continue
                if batch and frame.rgb.shape != batch[0].rgb.shape:
                    flush()
                batch.append(frame)
                if len(batch) >= cfg.batch_size:
                    flush()
            flush()
        if result.processed == 0:
            raise DataError(path, "has no frames")

        kept = kept_tracks(tracker.tracks, cfg.tracking.min_track, result.processed)
        names = track_names(result.name, kept)
        for track_id, row in detection_rows:
            row[4] = names.get(track_id, "")
        result.short_detections = sum(1 for t, _ in detection_rows if t not in names)
        moves = []
        for k, crop_dir in enumerate(self.crop_dirs()):
            for track_id, video in names.items():
                problem = video_name_problem(video)
                target = crop_dir / video
                if problem:
                    raise DataError(path, f"output video name {video!r} cannot be used: {problem}")
                if target.exists():
                    raise DataError(target, f"already exists and is not from {path.name} (two sources give "
                                    "this video name?); move it away or rename a source")
                moves.append([str(writer.folder(k, track_id)), str(target)])
        result.tracks = {names[t.id]: writer.counts.get(t.id, 0) for t in
                         sorted(kept, key=lambda t: names[t.id])}
        atomic_write_text(det_dir / f"{result.name}.csv", _csv_text(rows))
        stored_result = {k: v for k, v in asdict(result).items() if k not in ("skipped", "error")}
        write_json(work / "plan.json", {"moves": moves, "result": stored_result}, durable=True)
        self._move(moves)
        self._finish(work, det_dir / f"{result.name}.json", result)

    @staticmethod
    def _move(moves: list[list[str]]) -> None:
        for src, dst in moves:
            if Path(src).is_dir() and not Path(dst).exists():
                Path(dst).parent.mkdir(parents=True, exist_ok=True)
                Path(src).rename(dst)

    def _finish(self, work: Path, marker: Path, result: SourceResult) -> None:
        record = {k: v for k, v in asdict(result).items() if k not in ("skipped", "error")}
        source = Path(result.source)
        if source.is_file():
            record["source_name"], record["source_size"] = source.name, source.stat().st_size
        record["summary"] = result.summary()
        write_json(marker, record, durable=True)
        shutil.rmtree(work, ignore_errors=True)


def _prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items`` produced by a background thread, at most ``depth`` ahead: decoding (PyAV releases the GIL)
    overlaps detection, so a GPU does not wait for the decoder. An error in the producer is raised here."""
    done = object()
    q: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer, which raises it
            q.put(_Failure(exc))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


@dataclass
class _Failure:
    exc: BaseException


@dataclass
class CropResult:
    sources: list[SourceResult]
    problems: list[str]  # one line each: sources that could not be used

    @property
    def failed(self) -> int:
        return len(self.problems)


def run_crop(inputs: Sequence[str | Path], config: CropConfig, *, progress: bool | None = None,
             say: Callable[[str], None] | None = None) -> CropResult:
    """Crop every source of ``inputs`` into ``config.out``; see the module docstring. Sources that cannot be
    read are reported through ``say`` (one line each) and in ``CropResult.problems``; the others go on."""
    from abawfeat.utils.progress import make_progress, warn

    say = say or warn
    root = Path(config.out)
    blocker = file_in_the_way(root)
    if blocker is not None:
        raise ConfigError(f"{blocker}: --out must be a folder, and this is a file")
    if config.every < 1 or config.batch_size < 1 or config.size < 16:
        raise ConfigError("--every and --batch-size must be at least 1, --size at least 16")
    sources, problems = find_sources(inputs, exclude=root)
    for p in problems:
        say(p)
    if not sources:
        raise DataError(root, "nothing to crop: no readable video or image among the inputs")
    fd = acquire_lock(root / "crop", holder="another `abawfeat crop` is writing this tree")
    results: list[SourceResult] = []
    try:
        bar = make_progress("frames", disable=None if progress is None else not progress)
        with bar:
            task = bar.add_task("crop", total=None)
            cropper = Cropper(config, advance=lambda n: bar.advance(task, n))
            cropper.check_tree()
            for path in sources:
                bar.update(task, description=path.name)
                try:
                    results.append(cropper.source(path))
                except DataError as exc:
                    problems.append(str(exc))
                    say(str(exc))
                    results.append(SourceResult(source=str(path), name=path.stem, error=str(exc)))
    finally:
        release_lock(fd)
    return CropResult(results, problems)
