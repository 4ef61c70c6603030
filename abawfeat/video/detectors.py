"""The face-detector registry: ``--detector NAME`` picks one, ``--detector-weights`` its weights.

A detector takes a batch of RGB frames of one size (uint8 ``[B, H, W, 3]`` tensor) and returns, per frame,
its faces: boxes ``[n, 4]`` (x1, y1, x2, y2 in pixels), scores ``[n]`` and five landmarks ``[n, 5, 2]``
(left eye, right eye, nose, left and right mouth corner, left/right as seen in the image), highest score
first. Another detector (RetinaFace, ...) is one file: a ``Detector`` subclass decorated
``@DETECTORS.register("name")`` plus its import at the bottom of this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from abawfeat.utils.registry import Registry


@dataclass
class FaceDetections:
    """The faces of one frame, highest score first."""

    boxes: np.ndarray  # float32 [n, 4]: x1, y1, x2, y2
    scores: np.ndarray  # float32 [n]
    landmarks: np.ndarray  # float32 [n, 5, 2]: (x, y) of left eye, right eye, nose, mouth left, mouth right

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def empty() -> FaceDetections:
        return FaceDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                              np.zeros((0, 5, 2), np.float32))


class Detector:
    """Base class: ``detect(frames)`` -> one ``FaceDetections`` per frame; ``provenance`` names the detector,
    its settings and its weights' sha256 (it goes into every crop tree's record)."""

    name = ""
    default_weights = ""

    def __init__(self, weights: str | None = None, device: Any = "cpu", **options: Any) -> None:
        raise NotImplementedError

    def detect(self, frames: Any) -> list[FaceDetections]:
        raise NotImplementedError

    @property
    def provenance(self) -> dict[str, Any]:
        raise NotImplementedError


DETECTORS: Registry[type[Detector]] = Registry("detector")


def build_detector(name: str, weights: str | None = None, device: Any = "cpu", **options: Any) -> Detector:
    return DETECTORS.get(name)(weights=weights, device=device, **options)


from abawfeat.video import mtcnn  # noqa: E402,F401  (registers "mtcnn")
