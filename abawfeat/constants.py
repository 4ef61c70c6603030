"""Names and orders fixed by the Aff-Wild2 release and the ABAW challenges (see docs/data.md)."""

from __future__ import annotations

TASKS: tuple[str, ...] = ("va", "expr", "au")
ALL_TASKS: tuple[str, ...] = ("va", "expr", "au", "mtl")
SPLITS: tuple[str, ...] = ("train", "val")

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

# Annotation headers exactly as released (first line of every file).
HEADERS: dict[str, tuple[str, ...]] = {
    "va": VA_NAMES,
    "expr": EXPR_CLASSES,
    "au": AU_NAMES,
}
VA_INVALID = -5.0
EXPR_INVALID = -1
AU_INVALID = -1

# Folder names inside the annotations directory; the EXPR folder was renamed between releases.
TASK_DIRS: dict[str, tuple[str, ...]] = {
    "va": ("VA_Estimation_Challenge",),
    "expr": ("EXPR_Recognition_Challenge", "EXPR_Classification_Challenge"),
    "au": ("AU_Detection_Challenge",),
}
SPLIT_DIRS: dict[str, str] = {"train": "Train_Set", "val": "Validation_Set"}
TEST_LIST_FILES: dict[str, str] = {
    "va": "Valence_Arousal_Estimation_Challenge_test_set_release.txt",
    "expr": "Expression_Recognition_Challenge_test_set_release.txt",
    "au": "Action_Unit_Detection_Challenge_test_set_release.txt",
}
# Submission headers (the organisers' format): first column then the task's names.
SUBMISSION_HEADERS: dict[str, str] = {
    "va": "image_location,valence,arousal",
    "expr": "image_location," + ",".join(EXPR_CLASSES),
    "au": "image_location," + ",".join(AU_NAMES),
}
SAMPLE_FILE_TAGS: dict[str, str] = {"va": "VA", "expr": "Expr", "au": "AU"}
