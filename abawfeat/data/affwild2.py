"""Reader for Aff-Wild2 as released for the ABAW challenges (layout and quirks: docs/data.md).

Everything here is lazy and memoised: building an ``AffWild2`` only locates folders; an annotation file is
parsed the first time it is asked for, and a crop folder is listed (one ``os.scandir``) the first time its
frames are asked for. The release has ~1,800 annotation files and ~3 million crops, so both the parsing
(numpy over the whole file text) and the listing are written for that scale.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from abawfeat.constants import SPLIT_DIRS, SPLITS
from abawfeat.data.names import crop_file_name, crop_frame, is_jpeg_name, video_name_problem
from abawfeat.errors import DataError
from abawfeat.tasks import Task, single, single_tasks, task

__all__ = [
    "AffWild2",
    "Annotation",
    "MtlAnnotations",
    "find_annotations_dir",
    "read_annotation",
    "read_mtl_file",
    "read_name_list",
    "read_sample_frame_counts",
]

# "6th ABAW Annotations", "8th_ABAW_Annotations", "ABAW-annotations": both words, in this order.
_ANNOTATIONS_DIR_RE = re.compile(r"abaw.*annotations", re.IGNORECASE)
# Crop roots directly under the data root: cropped_aligned, cropped_aligned_new_50_vids, batch1, batch2, ...
_CROP_ROOT_RE = re.compile(r".*cropped.*|batch[ _-]?\d*", re.IGNORECASE)
# A nested crop tree is never deep in practice (root/batch1/<video>/); the limit only stops runaway walks.
_MAX_CROP_DEPTH = 3
_TEST_LIST_DIR = "names_of_videos_in_each_test_set"
_SAMPLE_DIR = "prediction_files_format"
_MTL_DIR_RE = re.compile(r".*mtl.*", re.IGNORECASE)
_MTL_SPLIT_PREFIX = {"train": ("train",), "val": ("val",)}  # "validation_set.txt" starts with "val" too
# The 7th-ABAW multi-task file: an image column, then the values of the multi-task set's members in order.
# Its header names the expression column "expression", and the AU columns either one by one or as one word.
_MTL_SET = "mtl"
_MTL_COLUMN_WORD = {"expr": "expression"}
_MTL_GROUP_WORD = {"au": "aus"}


def _mtl_columns(member: Task, grouped: bool) -> tuple[str, ...]:
    if member.name in _MTL_COLUMN_WORD:
        return (_MTL_COLUMN_WORD[member.name],)
    if grouped and member.name in _MTL_GROUP_WORD:
        return (_MTL_GROUP_WORD[member.name],)
    return member.value_names


def _mtl_headers() -> tuple[tuple[str, ...], ...]:
    members = task(_MTL_SET).components
    return tuple(("image", *[c for m in members for c in _mtl_columns(m, grouped)])
                 for grouped in (True, False))


def _mtl_value_names() -> tuple[str, ...]:
    return _mtl_headers()[1][1:]


# `<video>/<NNNNN>.jpg`, possibly behind more folders; the video is the folder holding the jpg.
_IMAGE_RE = re.compile(r"(?:.*/)?([^/,]+)/(\d+)\.jpg", re.IGNORECASE)
_MTL_ROW_RE = re.compile(r"^[ \t]*((?:[^,/\n]+/)*?([^,/\n]+)/(\d+)\.jpg)[ \t]*,([^\n]*)$",
                         re.IGNORECASE | re.MULTILINE)
# A sample-file row, or a blank line (empty groups), so that one findall accounts for every line.
# (The lazy folder prefix avoids backtracking over the whole line.)
_SAMPLE_ROW_RE = re.compile(r"^(?:[ \t]*(?:[^,/\n]+/)*?([^,/\n]+)/(\d+)\.jpg[ \t]*(?:,[^\n]*)?|[ \t]*)$",
                            re.IGNORECASE | re.MULTILINE)
_BLANK_LINE_RE = re.compile(r"^[ \t]*$", re.MULTILINE)
_NAME_LIST_HEADER_RE = re.compile(r"(video|name|file)s?([ _-]?(name|names|id|ids))?:?", re.IGNORECASE)
_VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
_EDITION_RE = re.compile(r"(\d+)(?:st|nd|rd|th)", re.IGNORECASE)
_NO_ANNOTATIONS = ("no annotations folder here (a folder named like '8th_ABAW_Annotations' or "
                   "'6th ABAW Annotations'); give its path with --annotations")
# Bad names listed in one error line, at most (the rest are counted).
_MAX_LISTED = 5



@dataclass(frozen=True)
class Annotation:
    """One annotation file. Row i is frame i + 1, whose crop is ``{i + 1:05d}.jpg``.

    Invalid rows (the marker, or an out-of-range value) hold the task's invalid marker in every column
    (VA -5, EXPR -1, AU -1), so a label never looks usable where ``valid`` is False. Arrays are read-only
    because annotations are memoised and shared.
    """

    video: str
    task: str
    split: str  # "train", "val", or "" when the file is not inside a Train_Set/Validation_Set folder
    path: Path
    labels: np.ndarray  # the task's label layout: va float32 [N, 2]; expr int64 [N]; au int8 [N, 12]
    valid: np.ndarray  # bool [N]
    n_frames: int  # N = number of data rows = last annotated frame
    # Extension of the contract: rows whose value is neither valid nor the marker (warned about once).
    n_out_of_range: int = 0

    @property
    def frames(self) -> np.ndarray:
        """int32 [N]: the 1-based frame number of each row."""
        return np.arange(1, self.n_frames + 1, dtype=np.int32)

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())


@dataclass(frozen=True)
class MtlAnnotations:
    """A 7th-ABAW multi-task file (s-Aff-Wild2): static frames, each with all three annotations.

    ``labels`` and ``valid`` hold one array per member task, in that task's label layout; invalid entries
    hold the task's marker (VA -5, EXPR -1, AU -1), as in ``Annotation``.
    """

    path: Path
    images: np.ndarray  # str [N], as written, e.g. "video10_left/00012.jpg"
    video: np.ndarray  # str [N]
    frame: np.ndarray  # int32 [N]
    labels: dict[str, np.ndarray]  # per task, [N, ...]
    valid: dict[str, np.ndarray]  # per task, bool [N]
    n_out_of_range: int = 0  # rows with any value that is neither valid nor its marker

    def __len__(self) -> int:
        return len(self.frame)

    def videos(self) -> list[str]:
        return sorted(set(self.video.tolist()))


# --------------------------------------------------------------------------------------------------- text


def _read_lines(path: Path) -> list[str]:
    """The file's lines whatever the line endings (\\n, \\r\\n, lone \\r, mixed), without trailing blank
    lines. Line i of the list is line i + 1 of the file, so error messages can name it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: a BOM written by a spreadsheet tool must not spoil the header
    except UnicodeDecodeError as exc:
        head = raw[: exc.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        raise DataError(path, "not UTF-8 text", head.count(b"\n") + 1) from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(path, "empty file")
    return lines


def _check_no_blank_line(path: Path, body: str, first_line: int) -> None:
    """A blank line between data rows is an error: every later row would get the wrong frame number."""
    match = _BLANK_LINE_RE.search(body)
    if match is not None:
        line = first_line + body.count("\n", 0, match.start())
        raise DataError(path, "blank line inside the data (every later row would get the wrong frame number)",
                        line)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


@contextmanager
def _quiet_numpy() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# Characters the vectorised parser handles: digits, '.', '-', ',' and newline.
_FAST_CHARS = np.zeros(256, dtype=bool)
_FAST_CHARS[np.frombuffer(b"0123456789.-,\n", dtype=np.uint8)] = True
_POW10 = 10.0 ** np.arange(16)  # exact in float64 up to 1e22
_MAX_DIGITS = 15  # mantissas below 1e15 < 2**53 are exact, so m / 10**f is correctly rounded


def _fast_numbers(body: str, n_rows: int, n_cols: int) -> np.ndarray | None:
    """Parse plain decimal numbers (``-0.25``, ``1``, ``.5``) with array operations over the bytes, or
    return None for anything else (spaces, exponents, blank lines, wrong column counts, junk), which the
    slower readers then handle. The result equals Python's ``float`` of each token: the digits form an exact
    integer mantissa below 2**53, and one IEEE division by an exact power of ten rounds correctly.
    """
    if not body.isascii():
        return None
    b = np.frombuffer((body + "\n").encode("ascii"), dtype=np.uint8)
    if not _FAST_CHARS[b].all():
        return None
    # Of the allowed characters, only ',' (44) and newline (10) are below '-' (45), only digits >= '0'.
    is_sep = b < ord("-")
    ends = np.flatnonzero(is_sep)  # each value's terminator
    n_tokens = n_rows * n_cols
    if len(ends) != n_tokens:
        return None
    newline_at = b[ends] == ord("\n")
    if not newline_at[n_cols - 1 :: n_cols].all() or np.count_nonzero(newline_at) != n_rows:
        return None  # some row has the wrong number of columns
    is_digit = b >= ord("0")
    digits_before = np.zeros(len(b) + 1, dtype=np.int32)  # digits_before[i]: digits in b[:i]
    np.cumsum(is_digit, out=digits_before[1:])
    digits_at_end = digits_before[ends]
    n_digits = np.diff(digits_at_end, prepend=0)
    most = n_digits.max()
    if n_digits.min() < 1 or most > _MAX_DIGITS:
        return None  # an empty value, a lone '-' or '.', or more digits than float64 holds exactly
    digit_values = b[is_digit] - ord("0")
    if most == 1:
        values = digit_values.astype(np.float64)  # AU / EXPR files: one digit per value, in value order
    else:
        token = np.repeat(np.arange(n_tokens, dtype=np.int32), n_digits)
        # Each digit's power of ten in its value's integer mantissa: how many digits follow it.
        power = digits_at_end[token] - np.arange(1, len(token) + 1, dtype=np.int32)
        values = np.bincount(token, weights=digit_values * _POW10[power], minlength=n_tokens)
    dots = np.flatnonzero(b == ord("."))
    if dots.size:
        dot_token = np.searchsorted(ends, dots)
        if dot_token.size > 1 and not (np.diff(dot_token) > 0).all():
            return None  # two dots in one value
        fraction = np.zeros(n_tokens, dtype=np.int32)
        fraction[dot_token] = digits_at_end[dot_token] - digits_before[dots]
        values /= _POW10[fraction]
    minus = np.flatnonzero(b == ord("-"))
    if minus.size:
        minus_token = np.searchsorted(ends, minus)
        token_start = np.zeros_like(minus)
        later = minus_token > 0
        token_start[later] = ends[minus_token[later] - 1] + 1
        if not np.array_equal(token_start, minus):
            return None  # a '-' that is not the first character of its value
        values[minus_token] *= -1.0
    return values.reshape(n_rows, n_cols)


def _parse_numbers(path: Path, lines: list[str], first_line: int, names: tuple[str, ...],
                   integer: bool) -> np.ndarray:
    """float64 [len(lines), len(names)] from comma-separated numeric lines.

    Three readers, fastest first: array operations over the bytes (plain decimals: the release as shipped),
    numpy's C reader (spaces around values, exponents; integer parsing is much faster than float parsing
    in it), then a line-by-line parse that finds the exact line and column at fault.
    """
    body = "\n".join(lines)
    values = _fast_numbers(body, len(lines), len(names))
    if values is not None:
        return values
    _check_no_blank_line(path, body, first_line)  # numpy's reader would silently skip blank lines
    dtypes: tuple[type, ...] = (np.int64, np.float64) if integer else (np.float64,)
    for dtype in dtypes:
        try:
            with _quiet_numpy():
                values = np.loadtxt(io.StringIO(body), delimiter=",", comments=None, quotechar=None,
                                    ndmin=2, dtype=dtype)
        except ValueError:
            continue  # a float in an integer file, or a real error: the next reader tells which
        if values.shape == (len(lines), len(names)):
            return values.astype(np.float64, copy=False)
        break
    return _parse_numbers_slowly(path, lines, first_line, names)


def _parse_numbers_slowly(path: Path, lines: list[str], first_line: int,
                          names: tuple[str, ...]) -> np.ndarray:
    k = len(names)
    out = np.empty((len(lines), k), dtype=np.float64)
    for i, line in enumerate(lines):
        parts = line.split(",")
        if len(parts) != k:
            raise DataError(path, f"expected {_plural(k, 'value')} per row ({','.join(names)}), "
                                  f"found {len(parts)}", first_line + i)
        for j, part in enumerate(parts):
            token = part.strip()
            try:
                # Python's float() also reads "1_0" and non-ASCII digits; numpy does not, and neither do we.
                if not token.isascii() or "_" in token:
                    raise ValueError
                out[i, j] = float(token)
            except ValueError:
                problem = f"{names[j]}: {token!r} is not a number" if token else f"{names[j]}: empty value"
                raise DataError(path, problem, first_line + i) from None
    return out


def _check_header(path: Path, header: str, expected: Iterable[tuple[str, ...]], what: str) -> None:
    got = tuple(c.strip().lower() for c in header.split(","))
    options = list(expected)
    if any(got == tuple(n.lower() for n in names) for names in options):
        return
    hint = ""
    for spec in single_tasks():
        if got == tuple(n.lower() for n in spec.header):
            hint = f" (this is the {spec.title} header: wrong folder?)"
    if not hint and all(_is_number(c) for c in header.split(",")):
        hint = " (the first line looks like data: is the header missing?)"
    want = " or ".join(repr(",".join(names)) for names in options)
    raise DataError(path, f"header {header.strip()!r} is not the {what} header {want}{hint}", 1)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _warn(message: str) -> None:
    # Imported here so that importing abawfeat.data does not pull in rich.progress.
    from abawfeat.utils.progress import warn

    warn(message)


def _freeze(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


def _check_task(name: str) -> Task:
    if name not in [t.name for t in single_tasks()]:
        raise ValueError(f"task must be one of {[t.name for t in single_tasks()]}, not {name!r}")
    return single(name)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")


# ----------------------------------------------------------------------------------------------- readers


def read_annotation(path: str | Path, task: str, split: str | None = None) -> Annotation:
    """Read one per-video annotation file of ``task`` ("va", "expr" or "au").

    ``split`` (an extension of the contract) defaults to what the parent folder says (Train_Set -> "train",
    Validation_Set -> "val", otherwise ""). Raises ``DataError(path, problem, line)`` for an empty file, a
    wrong header, a wrong number of columns, a non-numeric value or a blank line between data rows. Values
    that are neither valid nor the invalid marker make their row invalid and trigger one warning per file.
    """
    spec = _check_task(task)
    path = Path(path)
    if split is None:
        split = {d.lower(): s for s, d in SPLIT_DIRS.items()}.get(path.parent.name.lower(), "")
    lines = _read_lines(path)
    _check_header(path, lines[0], [spec.header], spec.title)
    if len(lines) == 1:
        raise DataError(path, "header but no data rows", 2)
    integer = np.issubdtype(spec.label_dtype, np.integer)
    values = _parse_numbers(path, lines[1:], 2, spec.value_names, integer=integer)
    labels, valid, out_of_range = spec.labels_and_validity(values)
    n_bad = int(out_of_range.sum())
    if n_bad:
        _warn(f"{path}: {_plural(n_bad, 'row')} with values outside {spec.valid_rule} that are not the "
              f"invalid marker {spec.invalid:g}; counted as invalid")
    _freeze(labels, valid)
    return Annotation(video=path.stem, task=task, split=split, path=path, labels=labels, valid=valid,
                      n_frames=len(valid), n_out_of_range=n_bad)


def read_mtl_file(path: str | Path) -> MtlAnnotations:
    """Read a 7th-ABAW multi-task file: header ``image,valence,arousal,expression,aus`` (or with the twelve
    AU names spelled out), then ``<video>/<NNNNN>.jpg,V,A,EXPR,AU1,...,AU26`` per line."""
    path = Path(path)
    lines = _read_lines(path)
    _check_header(path, lines[0], _mtl_headers(), "multi-task")
    body = lines[1:]
    if not body:
        raise DataError(path, "header but no data rows", 2)
    # One regex pass over the whole text; only if some line does not match, a loop finds which and why.
    rows = _MTL_ROW_RE.findall("\n".join(body))
    if len(rows) != len(body):
        _explain_bad_mtl_row(path, body)
    images = [r[0] for r in rows]
    videos = [r[1] for r in rows]
    check_video_names(sorted(set(videos)), path, "video in this file")
    frames = [int(r[2]) for r in rows]
    rests = [r[3] for r in rows]
    value_names = _mtl_value_names()
    values = _fast_numbers("\n".join(rests), len(rests), len(value_names))
    if values is None:
        _check_mtl_columns(path, body)  # so that a column-count error counts the image column too
        values = _parse_numbers(path, rests, 2, value_names, integer=False)
    labels: dict[str, np.ndarray] = {}
    valid: dict[str, np.ndarray] = {}
    bad = np.zeros(len(values), dtype=bool)
    start = 0
    for member in task(_MTL_SET).components:
        width = len(member.value_names)
        columns = values[:, start : start + width]
        labels[member.name], valid[member.name], out = member.labels_and_validity(columns)
        bad |= out
        start += width
    n_bad = int(bad.sum())
    if n_bad:
        rules = ", ".join(f"{m.title} {m.valid_rule}" for m in task(_MTL_SET).components)
        markers = " / ".join(f"{m.invalid:g}" for m in task(_MTL_SET).components)
        _warn(f"{path}: {_plural(n_bad, 'row')} with values outside {rules} that are not the invalid markers "
              f"({markers}); those labels are counted as invalid")
    result = MtlAnnotations(
        path=path, images=np.array(images, dtype=str), video=np.array(videos, dtype=str),
        frame=np.array(frames, dtype=np.int32), labels=labels, valid=valid, n_out_of_range=n_bad,
    )
    _freeze(result.images, result.video, result.frame, *labels.values(), *valid.values())
    return result


def _check_mtl_columns(path: Path, body: list[str]) -> None:
    n = len(_mtl_value_names()) + 1
    what = ", ".join(", ".join(c) if len(c) <= 2 else f"{len(c)} {m.title}s"
                     for m in task(_MTL_SET).components for c in [_mtl_columns(m, grouped=False)])
    for i, line in enumerate(body):
        if line.count(",") != n - 1:
            raise DataError(path, f"expected {n} comma-separated values (image, {what}), "
                                  f"found {line.count(',') + 1}", i + 2)


def _explain_bad_mtl_row(path: Path, body: list[str]) -> None:
    _check_no_blank_line(path, "\n".join(body), 2)
    _check_mtl_columns(path, body)
    for i, line in enumerate(body):
        image = line.partition(",")[0].strip()
        if _IMAGE_RE.fullmatch(image) is None:
            raise DataError(path, f"image {image!r} is not <video>/<NNNNN>.jpg", i + 2)
    raise DataError(path, "unreadable multi-task rows")  # pragma: no cover - the checks above cover all


def read_name_list(path: str | Path) -> list[str]:
    """Video names from a test-set list, one per line, in file order without duplicates.

    Tolerates blank lines, any line endings, surrounding spaces, an optional header line ("video",
    "Video names", ...), a trailing video extension (.mp4, .avi, ...) and extra comma-separated columns.
    """
    path = Path(path)
    names: list[str] = []
    seen: set[str] = set()
    for line in _read_lines(path):
        name = line.split(",")[0].strip()
        if not name:
            continue
        if not names and _NAME_LIST_HEADER_RE.fullmatch(name):
            continue
        if name.lower().endswith(_VIDEO_EXTENSIONS):
            name = name.rsplit(".", 1)[0]
        if name not in seen:
            seen.add(name)
            names.append(name)
    if not names:
        raise DataError(path, "no video names in this list")
    return names


def check_video_names(names: Iterable[str], where: Path, what: str) -> None:
    """Refuse, in one line naming ``where`` and every bad name, video names that could not appear in a
    submission row or a cache (``abawfeat.data.names.video_name_problem``). ``what`` says what to rename."""
    bad = [(n, p) for n in names if (p := video_name_problem(n)) is not None]
    if not bad:
        return
    name, problem = bad[0]
    others = ", ".join(repr(n) for n, _ in bad[1:1 + _MAX_LISTED])
    more = f"; also {others}" if others else ""
    if len(bad) > 1 + _MAX_LISTED:
        more += f" and {len(bad) - 1 - _MAX_LISTED} more"
    raise DataError(where, f"video name {name!r} cannot be used: {problem}; rename the {what}{more}")


def read_sample_frame_counts(path: str | Path) -> dict[str, int]:
    """N (the highest frame number) per video of an organisers' sample prediction file, whose rows are
    ``<video>/<NNNNN>.jpg,...`` after an ``image_location,...`` header. Blank lines are skipped."""
    path = Path(path)
    lines = _read_lines(path)
    first = lines[0].split(",")[0].strip()
    start = 1 if first.lower() == "image_location" else 0
    if start == 0 and _IMAGE_RE.fullmatch(first) is None:
        raise DataError(path, f"first line {lines[0].strip()!r} is neither the 'image_location,...' header "
                              "nor a <video>/<NNNNN>.jpg row", 1)
    body = "\n".join(lines[start:])
    # One regex pass over the whole text: the EXPR sample file has about a million rows.
    pairs = _SAMPLE_ROW_RE.findall(body)
    if len(pairs) != len(lines) - start:
        for i, line in enumerate(lines[start:], start=start + 1):
            if _SAMPLE_ROW_RE.fullmatch(line) is None:
                raise DataError(path, f"row {line.strip()[:60]!r} does not start with <video>/<NNNNN>.jpg", i)
    counts: dict[str, int] = {}
    for video, frame in pairs:
        if not video:
            continue  # a blank line
        n = int(frame)
        if n > counts.get(video, 0):
            counts[video] = n
    if not counts:
        raise DataError(path, "no frame rows")
    check_video_names(counts, path, "video in this file")
    return counts


def find_annotations_dir(root: str | Path) -> Path:
    """The one folder directly under ``root`` whose name matches ``*ABAW*Annotations*`` (any case,
    spaces or underscores). DataError if there is none, or several (listing them)."""
    root = Path(root)
    found = _annotation_dir_names(root)
    if not found:
        raise DataError(root, _NO_ANNOTATIONS)
    if len(found) > 1:
        listed = ", ".join(repr(n) for n in found)
        raise DataError(root, f"several annotations folders: {listed}; choose one with --annotations")
    return root / found[0]


def _annotation_dir_names(root: Path) -> list[str]:
    return sorted((e.name for e in _scandir(root) if e.is_dir() and _ANNOTATIONS_DIR_RE.search(e.name)),
                  key=str.lower)


def _scandir(folder: Path) -> list[os.DirEntry[str]]:
    """Entries of a folder, without hidden ones (macOS leaves ._name files beside every real file)."""
    try:
        with os.scandir(folder) as it:
            return [e for e in it if not e.name.startswith(".")]
    except FileNotFoundError:
        raise DataError(folder, "folder not found") from None
    except OSError as exc:
        raise DataError(folder, f"cannot list folder: {exc.strerror or exc}") from None


def _child_dirs(folder: Path) -> dict[str, Path]:
    """Sub-folders by lower-cased name: release folder names are matched without regard to case."""
    return {e.name.lower(): Path(e.path) for e in _scandir(folder) if e.is_dir()}


def _list_crops(folder: Path) -> np.ndarray:
    """int32, ascending: the frame numbers of the crops in a crop folder (``names.crop_frame`` decides what
    a crop is). A JPEG whose name is not a crop name is a ``DataError`` naming it (and, for a second name of
    one frame such as ``1.jpg`` beside ``00001.jpg``, naming both)."""
    frames: list[int] = []
    problems: list[tuple[str, str]] = []
    entries = _scandir(folder)
    for entry in entries:
        try:
            frame = crop_frame(entry.name)
        except ValueError as exc:
            if not entry.is_dir():
                problems.append((entry.name, str(exc)))
            continue
        if frame is not None and entry.is_file():
            frames.append(frame)
    if problems:
        crops = {e.name for e in entries if is_jpeg_name(e.name)} - {n for n, _ in problems}
        name, problem = min(problems)
        # A second name for a frame that already has its crop is the likeliest mistake: say which.
        for candidate, _ in sorted(problems):
            try:
                twin = crop_file_name(int(candidate.rpartition(".")[0]))
            except ValueError:
                continue
            if twin in crops:
                name, problem = candidate, f"a second file for frame {int(twin[:-4])}, beside {twin}"
                break
        more = f" ({len(problems) - 1} more such file(s) in this folder)" if len(problems) > 1 else ""
        raise DataError(folder / name, f"{problem}; rename or remove it{more}")
    out = np.array(frames, dtype=np.int32)
    out.sort()
    return out


def _classify(folder: str) -> str | None:
    """Kind of folder: "crops" if it holds JPEG files, "tree" if sub-folders only (a batch), else None.

    Stops at the first JPEG: crop folders hold thousands of files and are listed in full only on demand
    (that listing then checks every name).
    """
    has_dirs = False
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if is_jpeg_name(entry.name) and not entry.is_dir():
                    return "crops"
                if not has_dirs and entry.is_dir():
                    has_dirs = True
    except OSError as exc:
        raise DataError(folder, f"cannot list folder: {exc.strerror or exc}") from None
    return "tree" if has_dirs else None


# ---------------------------------------------------------------------------------------------- dataset


class AffWild2:
    """An Aff-Wild2 tree: annotations of the three tasks, crop folders, test lists and sample files.

    ``root`` is the data root (holding the annotations folder, ``cropped_aligned``, ...); ``annotations``
    overrides the search for the annotations folder (relative paths are tried from the current directory,
    then from ``root``). Building one only locates folders; everything else is read on demand and memoised.

    A tree of crops without any annotations folder (a user's own videos, or crops alone) is accepted:
    ``has_annotations`` is False, the crop and test-set methods work, and asking for annotations raises the
    ``DataError`` that says none was found. Stage one only needs the crops.
    """

    def __init__(self, root: str | Path, annotations: str | Path | None = None) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(self.root, "data root not found")
        if not self.root.is_dir():
            raise DataError(self.root, "data root is not a folder")
        # abspath, not resolve: a symlinked data folder keeps the name the user gave it.
        self.name: str = Path(os.path.abspath(self.root)).name
        self.annotations_dir: Path | None = self._locate_annotations(annotations)
        self._task_dirs: dict[str, Path | None] = {t.name: self._locate_task_dir(t) for t in single_tasks()}
        self._mtl_dir = self._locate_mtl_dir()
        if self.annotations_dir is not None and not any(self._task_dirs.values()) and self._mtl_dir is None:
            expected = ", ".join(d for t in single_tasks() for d in t.folders)
            raise DataError(self.annotations_dir, f"no task folder in this annotations folder (expected "
                                                  f"{expected})")
        self._video_files: dict[tuple[str, str], dict[str, Path]] = {}
        self._annotations: dict[tuple[str, str, str], Annotation] = {}
        self._crop_index: dict[str, Path] | None = None
        self._crop_frames: dict[str, np.ndarray] = {}
        self._crop_ids: dict[str, str] = {}
        self._sample_counts: dict[str, dict[str, int]] = {}
        self._mtl: dict[str, MtlAnnotations] = {}

    def __repr__(self) -> str:
        return f"AffWild2(root={str(self.root)!r}, annotations_dir={str(self.annotations_dir)!r})"

    @property
    def has_annotations(self) -> bool:
        """False for a tree of crops alone (no annotations folder under the root and none given)."""
        return self.annotations_dir is not None

    def _require_annotations(self) -> Path:
        if self.annotations_dir is None:
            raise DataError(self.root, _NO_ANNOTATIONS)
        return self.annotations_dir

    # -- locating folders

    def _locate_annotations(self, annotations: str | Path | None) -> Path | None:
        if annotations is None:
            if not _annotation_dir_names(self.root):
                return None  # crops alone: fine for extraction; annotations are asked for when needed
            return find_annotations_dir(self.root)
        path = Path(annotations)
        if not path.exists() and not path.is_absolute() and (self.root / path).exists():
            path = self.root / path
        if not path.is_dir():
            raise DataError(path, "annotations folder not found")
        return path

    def _locate_task_dir(self, spec: Task) -> Path | None:
        if self.annotations_dir is None:
            return None
        children = _child_dirs(self.annotations_dir)
        present = [children[d.lower()] for d in spec.folders if d.lower() in children]
        if len(present) > 1:
            # Both EXPR names side by side: the newer release name wins, but say so.
            _warn(f"{self.annotations_dir}: both {present[0].name} and {present[1].name} exist; "
                  f"reading {present[0].name}")
        return present[0] if present else None

    def _locate_mtl_dir(self) -> Path | None:
        if self.annotations_dir is None:
            return None
        children = _child_dirs(self.annotations_dir)
        dirs = sorted(p for name, p in children.items() if _MTL_DIR_RE.fullmatch(name))
        return dirs[0] if dirs else None

    def task_dir(self, task: str) -> Path | None:
        """The task's folder inside the annotations folder (None if the release has none)."""
        _check_task(task)
        self._require_annotations()
        return self._task_dirs[task]

    def split_dir(self, task: str, split: str) -> Path | None:
        """``<task folder>/Train_Set`` or ``Validation_Set`` (None if absent)."""
        _check_split(split)
        task_dir = self.task_dir(task)
        if task_dir is None:
            return None
        return _child_dirs(task_dir).get(SPLIT_DIRS[split].lower())

    def _files(self, task: str, split: str) -> dict[str, Path]:
        key = (task, split)
        if key not in self._video_files:
            folder = self.split_dir(task, split)
            files: dict[str, Path] = {}
            if folder is not None:
                for e in _scandir(folder):
                    if e.name.lower().endswith(".txt") and e.is_file():
                        files[e.name[:-4]] = Path(e.path)
                bad = sorted(v for v in files if video_name_problem(v) is not None)
                if bad:
                    check_video_names(bad, files[bad[0]], "annotation file")
            self._video_files[key] = dict(sorted(files.items()))
        return self._video_files[key]

    # -- annotations

    def videos(self, task: str, split: str) -> list[str]:
        """Sorted names of the videos annotated for ``task`` in ``split`` ("train" or "val")."""
        _check_task(task)
        return list(self._files(task, split))

    def annotation_path(self, task: str, split: str, video: str) -> Path:
        _check_task(task)
        files = self._files(task, split)
        if video not in files:
            where = self.split_dir(task, split) or self.annotations_dir
            raise DataError(where or self.root, f"no {task.upper()} {split} annotation for video {video!r}")
        return files[video]

    def annotation(self, task: str, split: str, video: str) -> Annotation:
        """The parsed annotation file (memoised)."""
        key = (task, split, video)
        if key not in self._annotations:
            self._annotations[key] = read_annotation(self.annotation_path(task, split, video), task, split)
        return self._annotations[key]

    # -- crops

    def _crop_roots(self) -> list[Path]:
        return sorted(
            (Path(e.path) for e in _scandir(self.root)
             if e.is_dir() and _CROP_ROOT_RE.fullmatch(e.name) and Path(e.path) != self.annotations_dir),
            key=lambda p: p.name.lower(),
        )

    def _crops(self) -> dict[str, Path]:
        if self._crop_index is None:
            index: dict[str, Path] = {}
            roots = self._crop_roots()
            for crop_root in roots:
                self._index_crop_tree(crop_root, index, 0)
            if not roots:
                self._index_bare_crops(index)
            bad = sorted(v for v in index if video_name_problem(v) is not None)
            if bad:
                check_video_names(bad, index[bad[0]], "crop folder")
            self._crop_index = dict(sorted(index.items()))
        return self._crop_index

    def _index_bare_crops(self, index: dict[str, Path]) -> None:
        """No crop root (cropped_aligned, batchN): crops alone, as a user's own videos often come. The root
        itself is one video's crop folder if it holds JPEGs; otherwise each folder directly under it that
        holds JPEGs is a video (one level only: a run directory's plots deeper down are not crops)."""
        if _classify(str(self.root)) == "crops":
            index[self.name] = self.root
            return
        for entry in sorted(_scandir(self.root), key=lambda e: e.name):
            if not entry.is_dir() or Path(entry.path) == self.annotations_dir:
                continue
            if _classify(entry.path) == "crops":
                index[entry.name] = Path(entry.path)

    def _index_crop_tree(self, folder: Path, index: dict[str, Path], depth: int) -> None:
        for entry in sorted(_scandir(folder), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            kind = _classify(entry.path)
            if kind == "crops":
                if entry.name in index:
                    raise DataError(entry.path, f"video {entry.name!r} already has a crop folder at "
                                                f"{index[entry.name]}; keep only one")
                index[entry.name] = Path(entry.path)
            elif kind == "tree" and depth < _MAX_CROP_DEPTH:
                self._index_crop_tree(Path(entry.path), index, depth + 1)

    def videos_with_crops(self) -> list[str]:
        """Every video with a crop folder (train, val and test), sorted."""
        return list(self._crops())

    def crop_dir(self, video: str) -> Path | None:
        """The video's crop folder, wherever it sits (cropped_aligned, ..._new_50_vids, batchN/)."""
        return self._crops().get(video)

    def crop_frames(self, video: str) -> np.ndarray:
        """int32, ascending: the frame numbers that have a ``NNNNN.jpg`` (empty without a crop folder).
        Gaps are frames where no face was detected; numbers past the annotation's N have no label.

        The one rule for crop names is ``abawfeat.data.names.crop_frame``: a JPEG in the folder that is not
        a crop name (``1.jpg``, ``00000.jpg``, ``frame7.jpg``, ``00001.JPG``) is a ``DataError`` naming it;
        other files (``Thumbs.db``, a ``.png``) and hidden files are ignored."""
        if video not in self._crop_frames:
            folder = self.crop_dir(video)
            frames = np.zeros(0, dtype=np.int32) if folder is None else _list_crops(folder)
            _freeze(frames)
            self._crop_frames[video] = frames
        return self._crop_frames[video]

    def crop_identity(self, video: str) -> str:
        """What a feature cache records of the crops it was extracted from (``crops_sha256`` of each video;
        docs/cache-format.md, "Which tree"): the SHA-256 of the video's crop frame numbers and of the bytes
        of its first, middle and last crop. Equal for the same video of the same tree, whatever else is
        extracted with it (``--videos``, a resumed run); different for another tree's video of the same name
        (other frames, or other images: a synthetic tree of another seed, another release's crops). Three
        files, not every crop: reading 1.7 M crops each time a cache is opened would cost minutes."""
        if video not in self._crop_ids:
            frames = self.crop_frames(video)
            digest = hashlib.sha256(b"abawfeat-crops-1\0")
            digest.update(np.asarray(frames, dtype="<i8").tobytes())
            if len(frames):
                for k in sorted({0, len(frames) // 2, len(frames) - 1}):
                    try:
                        content = self.crop_path(video, int(frames[k])).read_bytes()
                    except OSError as exc:
                        raise DataError(self.crop_path(video, int(frames[k])),
                                        f"cannot be read ({exc.strerror or exc})") from None
                    digest.update(hashlib.sha256(content).digest())
            self._crop_ids[video] = digest.hexdigest()
        return self._crop_ids[video]

    def tree_identity(self, videos: Iterable[str]) -> str:
        """One SHA-256 over ``crop_identity`` of each of ``videos`` that has a crop folder (sorted): what a
        run records of the crops it was trained and validated on."""
        digest = hashlib.sha256(b"abawfeat-tree-1\0")
        for video in sorted(set(videos)):
            if self.crop_dir(video) is not None:
                digest.update(f"{video}\0{self.crop_identity(video)}\0".encode())
        return digest.hexdigest()

    def crop_path(self, video: str, frame: int) -> Path:
        """Path of the crop of ``frame`` (1-based); it exists only if ``frame`` is in ``crop_frames``."""
        folder = self.crop_dir(video)
        if folder is None:
            raise DataError(self.root, f"no crop folder for video {video!r}")
        return folder / crop_file_name(frame)

    def crop_mask(self, video: str, n_frames: int) -> np.ndarray:
        """bool [n_frames]: whether frame i + 1 has a crop (extension of the contract)."""
        frames = self.crop_frames(video)
        mask = np.zeros(n_frames, dtype=bool)
        inside = frames[(frames >= 1) & (frames <= n_frames)]
        mask[inside - 1] = True
        return mask

    # -- test set

    def _release_dir(self, name: str) -> Path | None:
        """A release folder (test lists, sample files) under the root or, failing that, the annotations."""
        for parent in (self.root, self.annotations_dir):
            if parent is None:
                continue
            found = _child_dirs(parent).get(name.lower())
            if found is not None:
                return found
        return None

    def test_list_file(self, task: str) -> Path | None:
        spec = _check_task(task)
        folder = self._release_dir(_TEST_LIST_DIR)
        if folder is None:
            return None
        files = {e.name.lower(): Path(e.path) for e in _scandir(folder) if e.is_file()}
        exact = files.get(spec.test_list_file.lower())
        if exact is not None:
            return exact
        keyword = spec.test_list_keyword
        matches = sorted(p for n, p in files.items() if keyword in n and n.endswith(".txt"))
        if len(matches) > 1:
            listed = ", ".join(p.name for p in matches)
            raise DataError(folder, f"several {spec.title} test lists: {listed}")
        return matches[0] if matches else None

    def test_videos(self, task: str) -> list[str]:
        """Sorted names of the task's test videos ([] when the release has no test list)."""
        path = self.test_list_file(task)
        if path is None:
            return []
        names = read_name_list(path)
        check_video_names(names, path, "video in this list")
        return sorted(names)

    def sample_file(self, task: str) -> Path | None:
        """The organisers' sample prediction file ``*_{VA,Expr,AU}_test_set_sample.txt``. If several
        editions are present (6th and 8th), the highest edition number wins."""
        spec = _check_task(task)
        folder = self._release_dir(_SAMPLE_DIR)
        if folder is None:
            return None
        suffix = f"_{spec.sample_tag}_test_set_sample.txt".lower()
        matches = sorted(Path(e.path) for e in _scandir(folder) if e.name.lower().endswith(suffix))
        if len(matches) <= 1:
            return matches[0] if matches else None

        def edition(p: Path) -> int:
            m = _EDITION_RE.search(p.name)
            return int(m.group(1)) if m else -1

        best = max(edition(p) for p in matches)
        newest = [p for p in matches if edition(p) == best]
        if len(newest) > 1:
            listed = ", ".join(p.name for p in newest)
            raise DataError(folder, f"several {spec.title} sample files of the same edition: {listed}")
        return newest[0]

    def sample_frame_counts(self, task: str) -> dict[str, int]:
        """N per test video from the organisers' sample file (memoised): the submission needs every frame
        1..N, crop or not."""
        if task not in self._sample_counts:
            path = self.sample_file(task)
            if path is None:
                spec = _check_task(task)
                pattern = f"*_{spec.sample_tag}_test_set_sample.txt"
                raise DataError(self.root, f"no {spec.title} sample file ({pattern}) in {_SAMPLE_DIR}/")
            self._sample_counts[task] = read_sample_frame_counts(path)
        return self._sample_counts[task]

    # -- multi-task (7th ABAW)

    def mtl_file(self, split: str) -> Path | None:
        """The multi-task file of ``split`` in an ``*MTL*`` folder of the annotations (e.g.
        ``MTL_Challenge/train_set.txt``, ``validation_set.txt``), or None."""
        _check_split(split)
        if self._mtl_dir is None:
            return None
        matches = sorted(
            Path(e.path) for e in _scandir(self._mtl_dir)
            if e.is_file() and e.name.lower().endswith(".txt")
            and e.name.lower().startswith(_MTL_SPLIT_PREFIX[split])
        )
        if len(matches) > 1:
            listed = ", ".join(p.name for p in matches)
            raise DataError(self._mtl_dir, f"several multi-task {split} files: {listed}")
        return matches[0] if matches else None

    def mtl_annotations(self, split: str) -> MtlAnnotations:
        """The parsed multi-task file of ``split`` (memoised); DataError if the release has none."""
        if split not in self._mtl:
            path = self.mtl_file(split)
            if path is None:
                example = "train_set.txt" if split == "train" else "validation_set.txt"
                raise DataError(self._require_annotations(),
                                f"no multi-task {split} file (e.g. MTL_Challenge/{example})")
            self._mtl[split] = read_mtl_file(path)
        return self._mtl[split]

    # -- summary

    def summary(self, details: bool = False, progress: bool = False) -> list[dict[str, Any]]:
        """One row per task (va, expr, au) and split (train, val): ``task``, ``split``, ``videos``,
        ``frames`` (annotation rows), ``valid_frames``, ``usable_frames`` (valid and with a crop).

        ``details=True`` (extension) adds ``valid_without_crop``, ``crops_past_end`` (crops after the last
        annotated frame), ``videos_without_crops`` and ``out_of_range``. ``progress`` shows a bar on stderr.
        A tree without annotations has no annotated videos: every count is 0 (``crop_summary`` says more).
        """
        names = [t.name for t in single_tasks()]
        listed = {(t, s): self.videos(t, s) if self.has_annotations else [] for t in names for s in SPLITS}
        jobs = [(t, s, v) for (t, s), videos in listed.items() for v in videos]
        stats = {(t, s): dict.fromkeys(("frames", "valid", "usable", "past", "no_crops", "bad"), 0)
                 for t in names for s in SPLITS}
        with _maybe_progress(progress, len(jobs), "annotations") as advance:
            for task, split, video in jobs:
                ann = self.annotation(task, split, video)
                crops = self.crop_frames(video)
                has_crop = self.crop_mask(video, ann.n_frames)
                st = stats[(task, split)]
                st["frames"] += ann.n_frames
                st["valid"] += ann.n_valid
                st["usable"] += int((ann.valid & has_crop).sum())
                st["past"] += int((crops > ann.n_frames).sum())
                st["no_crops"] += int(crops.size == 0)
                st["bad"] += ann.n_out_of_range
                advance()
        rows: list[dict[str, Any]] = []
        for task in names:
            for split in SPLITS:
                st = stats[(task, split)]
                row: dict[str, Any] = {
                    "task": task, "split": split, "videos": len(listed[(task, split)]),
                    "frames": st["frames"], "valid_frames": st["valid"], "usable_frames": st["usable"],
                }
                if details:
                    row.update(valid_without_crop=st["valid"] - st["usable"], crops_past_end=st["past"],
                               videos_without_crops=st["no_crops"], out_of_range=st["bad"])
                rows.append(row)
        return rows

    def crop_summary(self, progress: bool = False) -> dict[str, Any]:
        """Every crop folder (extension), read with the same rule as ``abawfeat extract``: ``videos`` with a
        crop folder, ``crops`` in them, and ``unannotated`` (videos annotated for no task and split: test
        videos, or all of them in a tree of crops alone). A bad crop or folder name raises here as there."""
        videos = self.videos_with_crops()
        annotated: set[str] = set()
        if self.has_annotations:
            for spec in single_tasks():
                for split in SPLITS:
                    annotated.update(self.videos(spec.name, split))
        n_crops = 0
        with _maybe_progress(progress, len(videos), "folders") as advance:
            for video in videos:
                n_crops += len(self.crop_frames(video))
                advance()
        return {"videos": len(videos), "crops": n_crops,
                "unannotated": sum(v not in annotated for v in videos)}

    def test_summary(self) -> list[dict[str, Any]]:
        """One row per task for the test set (extension): ``videos`` (from the test list, else the sample
        file), ``frames`` (sum of N from the sample file, None without one) and ``videos_without_crops``."""
        rows = []
        for name in (t.name for t in single_tasks()):
            videos = self.test_videos(name)
            counts = self.sample_frame_counts(name) if self.sample_file(name) is not None else None
            if not videos and counts:
                videos = sorted(counts)
            frames = None if counts is None else sum(counts.get(v, 0) for v in videos)
            crops = self._crops()
            rows.append({"task": name, "split": "test", "videos": len(videos), "frames": frames,
                         "videos_without_crops": sum(v not in crops for v in videos)})
        return rows


@contextmanager
def _maybe_progress(enabled: bool, total: int, unit: str) -> Iterator[Any]:
    if not enabled:
        yield lambda: None
        return
    from abawfeat.utils.progress import make_progress

    with make_progress(unit) as bar:
        task_id = bar.add_task("reading", total=total)
        yield lambda: bar.advance(task_id)
