"""Face tracks: detections linked across frames, and the names the tracks get in the output tree.

A detection joins the track whose last box it overlaps most (IoU at least ``min_iou``) or, when the face
moved too fast for the boxes to overlap, whose last landmarks are nearest (mean distance of the five points
at most ``max_landmark_distance`` times the track's face size); each track takes at most one detection per
frame, best pairs first. A track not seen for more than ``max_gap`` processed frames is closed, so a face
that looks away for a moment keeps its track, and one that leaves and comes back much later starts a new one.

Tracks shorter than ``min_track`` detections (a spurious detection in one frame) become no video; their
detections stay in the per-frame table, marked, so nothing is dropped silently.

Names: one track keeps the source's name; two take the release's ``_left`` / ``_right`` by the mean horizontal
position of their boxes; more are ``_face1``, ``_face2``, ... by first frame, then left to right, so the same
video gives the same names on every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from abawfeat.video.detectors import FaceDetections


@dataclass(frozen=True)
class TrackConfig:
    max_gap: int = 15  # processed frames a track may miss and still continue
    min_iou: float = 0.3  # box overlap that links a detection to a track
    max_landmark_distance: float = 0.5  # or: mean landmark distance, in units of the track's face size
    min_track: int = 3  # detections a track needs to become a video (at most the frames processed)


@dataclass
class Track:
    id: int
    first_step: int
    last_step: int
    last_box: np.ndarray
    last_points: np.ndarray
    count: int = 0
    first_frame: int = 0
    sum_cx: float = 0.0
    frames: list[int] = field(default_factory=list)

    @property
    def mean_cx(self) -> float:
        return self.sum_cx / max(self.count, 1)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a`` [n, 4] against ``b`` [m, 4] -> [n, m]."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


class Tracker:
    """Online linking: ``update(step, frame, detections)`` returns the track id of each detection."""

    def __init__(self, config: TrackConfig | None = None) -> None:
        self.config = config or TrackConfig()
        self.tracks: list[Track] = []
        self._active: list[Track] = []

    def update(self, step: int, frame: int, dets: FaceDetections) -> list[int]:
        cfg = self.config
        self._active = [t for t in self._active if step - t.last_step <= cfg.max_gap + 1]
        ids = [-1] * len(dets)
        if len(dets) and self._active:
            last = np.stack([t.last_box for t in self._active])
            overlap = iou(last, dets.boxes)
            size = np.sqrt(np.clip((last[:, 2] - last[:, 0]) * (last[:, 3] - last[:, 1]), 1e-6, None))
            pts = np.stack([t.last_points for t in self._active])
            dist = np.linalg.norm(pts[:, None] - dets.landmarks[None], axis=-1).mean(-1) / size[:, None]
            ok = (overlap >= cfg.min_iou) | (dist <= cfg.max_landmark_distance)
            pairs = sorted(((-overlap[i, j], dist[i, j], i, j) for i, j in zip(*np.nonzero(ok), strict=True)))
            used_t: set[int] = set()
            for _, _, i, j in pairs:
                if i in used_t or ids[j] != -1:
                    continue
                used_t.add(i)
                ids[j] = self._active[i].id
                self._extend(self._active[i], step, frame, dets, j)
        for j in range(len(dets)):
            if ids[j] == -1:
                box = dets.boxes[j]
                track = Track(id=len(self.tracks), first_step=step, last_step=step, last_box=box,
                              last_points=dets.landmarks[j], first_frame=frame)
                self.tracks.append(track)
                self._active.append(track)
                self._extend(track, step, frame, dets, j)
                ids[j] = track.id
        return ids

    @staticmethod
    def _extend(track: Track, step: int, frame: int, dets: FaceDetections, j: int) -> None:
        box = dets.boxes[j]
        track.last_step, track.last_box, track.last_points = step, box, dets.landmarks[j]
        track.count += 1
        track.sum_cx += float(box[0] + box[2]) / 2
        track.frames.append(frame)


def kept_tracks(tracks: list[Track], min_track: int, frames_processed: int) -> list[Track]:
    need = max(1, min(min_track, frames_processed))
    return [t for t in tracks if t.count >= need]


def track_names(video: str, tracks: list[Track]) -> dict[int, str]:
    """Track id -> output video name (see the module docstring)."""
    if len(tracks) == 1:
        return {tracks[0].id: video}
    if len(tracks) == 2:
        left, right = sorted(tracks, key=lambda t: (t.mean_cx, t.id))
        return {left.id: f"{video}_left", right.id: f"{video}_right"}
    ordered = sorted(tracks, key=lambda t: (t.first_frame, t.mean_cx, t.id))
    return {t.id: f"{video}_face{k}" for k, t in enumerate(ordered, start=1)}
