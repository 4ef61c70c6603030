"""The naming rules every command shares (docs/data.md, "Names"): which video names abawfeat accepts,
which file names in a crop folder are crops, which source video a ``_left``/``_right`` video comes from, and
the frame rate a video's name states.

Both are decided here once, so that ``data summary``, ``extract``, stage two and ``predict`` can never
disagree: the reader (``abawfeat.data.affwild2``) applies them when it lists folders, the cache writer
re-checks video names, and the submission writer's row format is what the video rule protects.
"""

from __future__ import annotations

import re

# Largest frame number the cache can hold (frames are int32 there and in every array of stage two).
MAX_FRAME = 2**31 - 1
# Files with these suffixes (any case) in a crop folder are meant as crops: each must have a crop name.
# Anything else (Thumbs.db, desktop.ini, a .png preview, notes.txt) is ignored, as are hidden files.
JPEG_SUFFIXES = (".jpg", ".jpeg")
_DIGITS = frozenset("0123456789")
# The release's video names state the frame rate: ``<id>-<fps>-<width>x<height>`` (``12-30-1280x720``).
_FPS_IN_NAME = re.compile(r"^\d+-(\d+)-\d+x\d+")
DEFAULT_FPS = 30  # most of the release's videos; names like ``video47`` state no rate
# A video named X_left or X_right is one of the two people of the release's source video X.
PAIR_SUFFIXES: tuple[str, ...] = ("_left", "_right")


def crop_file_name(frame: int) -> str:
    """The release's name of the crop of ``frame`` (1-based): five digits at least, zero-padded, ``.jpg``."""
    return f"{int(frame):05d}.jpg"


def is_jpeg_name(name: str) -> bool:
    """Whether a file is meant as a crop (a JPEG by its suffix, any case) and so must have a crop name."""
    return name.lower().endswith(JPEG_SUFFIXES) and not name.startswith(".")


def crop_frame(name: str) -> int | None:
    """The frame number of a crop file name, or None for a file that is not a JPEG (ignored).

    A crop name is exactly ``crop_file_name(k)`` for a frame k in 1..MAX_FRAME: ``00001.jpg``,
    ``12345.jpg``, ``123456.jpg``. A JPEG with any other name raises ``ValueError`` whose message says what
    is wrong with it (``1.jpg``, ``000001.jpg``, ``00000.jpg``, ``-1.jpg``, ``frame1.jpg``, ``00001.JPG``):
    such a file cannot be told apart from a crop, and ``crop_path`` (which builds ``crop_file_name``) would
    never find it, so silently skipping it would change which frames have a face.
    """
    # Fast path for the release's own names (three million of them): NNNNN.jpg with a non-zero number.
    if len(name) == 9 and name.endswith(".jpg") and _DIGITS.issuperset(name[:5]):
        if name[:5] != "00000":
            return int(name[:5])
        raise ValueError("frame 0: crop frame numbers start at 1 (00001.jpg is the first frame)")
    if not is_jpeg_name(name):
        return None
    stem, _, suffix = name.rpartition(".")
    digits = stem[1:] if stem.startswith(("-", "+")) else stem
    if not digits or not _DIGITS.issuperset(digits):
        raise ValueError("not a crop name: crops are named by their frame number, e.g. 00001.jpg")
    if stem.startswith("-"):
        raise ValueError("negative frame number: crop frame numbers start at 1")
    value = int(digits)
    if value == 0:
        raise ValueError("frame 0: crop frame numbers start at 1 (00001.jpg is the first frame)")
    if value > MAX_FRAME:
        raise ValueError(f"frame number {value} is too large (at most {MAX_FRAME:,})")
    if suffix != "jpg":
        raise ValueError(f"frame {value} must be named {crop_file_name(value)} (lower-case '.jpg')")
    if name != crop_file_name(value):
        raise ValueError(f"frame {value} must be named {crop_file_name(value)} (five digits at least, "
                         "zero-padded, no sign)")
    return value  # six digits or more: 123456.jpg


def video_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a video name, or None if it can.

    A video name must fit a submission row ``<video>/<NNNNN>.jpg,...`` (no '/', ',' or whitespace, nothing
    unprintable) and a cache group (not empty, not starting with '.' or '_': hidden files and the cache's own
    entries). Folder and annotation file names are checked by the reader, so a bad one is refused by the
    first command that sees it, not by ``predict`` hours later.
    """
    if not name:
        return "it is empty"
    if "/" in name or "\\" in name:
        return "it contains a slash"
    if "," in name:
        return "it contains a comma (submission rows are comma-separated)"
    if any(c.isspace() for c in name):
        return "it contains whitespace (submission rows cannot hold it)"
    if not name.isprintable():
        return "it contains an unprintable character"
    if name.startswith((".", "_")):
        return "it starts with '.' or '_' (reserved for hidden files and the cache's own entries)"
    return None


def source_video(video: str) -> str:
    """The source video a video's frames come from: ``X`` for ``X_left`` / ``X_right`` (the two people of one
    video share its scene, its audio track and often its mood), the name itself otherwise."""
    for suffix in PAIR_SUFFIXES:
        if video.endswith(suffix) and len(video) > len(suffix):
            return video[: -len(suffix)]
    return video


def video_fps(name: str) -> int:
    """The frame rate a video's name states (``12-30-1280x720`` and its ``_left``/``_right`` halves: 30), or
    ``DEFAULT_FPS`` for a name that states none (``video47``)."""
    m = _FPS_IN_NAME.match(name)
    return int(m.group(1)) if m else DEFAULT_FPS


__all__ = ["DEFAULT_FPS", "JPEG_SUFFIXES", "MAX_FRAME", "PAIR_SUFFIXES", "crop_file_name", "crop_frame",
           "is_jpeg_name", "source_video", "video_fps", "video_name_problem"]
