"""Names and orders fixed by the Aff-Wild2 release (see docs/data.md). What is specific to one task (its
folders, headers, invalid markers, files) is declared by that task in ``abawfeat.tasks``."""

from __future__ import annotations

SPLITS: tuple[str, ...] = ("train", "val")
SPLIT_DIRS: dict[str, str] = {"train": "Train_Set", "val": "Validation_Set"}

VA_NAMES: tuple[str, ...] = ("valence", "arousal")
# Aff-Wild2 order; the class index in annotation and submission files is the position here.
EXPR_CLASSES: tuple[str, ...] = (
    "Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other",
)
AU_NAMES: tuple[str, ...] = (
    "AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25", "AU26",
)
# AffectNet-8 order used by the published DDAMFN classifier (not the Aff-Wild2 order).
AFFECTNET8_CLASSES: tuple[str, ...] = (
    "Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Angry", "Contempt",
)
AFFECTNET7_CLASSES: tuple[str, ...] = AFFECTNET8_CLASSES[:7]
