"""Organiser-format submission files (API stub; implementation in progress)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def fill_missing(frames_with_crop: np.ndarray, values: np.ndarray, n_frames: int, method: str = "interpolate") -> np.ndarray:
    raise NotImplementedError


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    raise NotImplementedError


def write_submission(path: str | Path, task: str, rows: dict[str, np.ndarray]) -> Path:
    raise NotImplementedError


def read_submission(path: str | Path, task: str) -> dict[str, np.ndarray]:
    raise NotImplementedError


def check_against_sample(path: str | Path, sample_path: str | Path, task: str | None = None) -> None:
    raise NotImplementedError


def score_submission(pred_path: str | Path, task: str, annotations: dict) -> dict:
    raise NotImplementedError
