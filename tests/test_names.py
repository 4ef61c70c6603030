"""The two naming rules (abawfeat/data/names.py): which file names in a crop folder are crops, and which
video names abawfeat accepts. Every command reads names through them (docs/data.md, "Names")."""

from __future__ import annotations

import pytest

from abawfeat.data.names import MAX_FRAME, crop_file_name, crop_frame, video_name_problem
from abawfeat.submission import _LOCATION


@pytest.mark.parametrize(("name", "frame"), [
    ("00001.jpg", 1), ("00012.jpg", 12), ("99999.jpg", 99999), ("100000.jpg", 100000),
    (f"{MAX_FRAME}.jpg", MAX_FRAME),
    # not JPEG by their suffix, or hidden: ignored
    ("Thumbs.db", None), ("desktop.ini", None), ("00004.png", None), ("notes.txt", None), (".DS_Store", None),
    ("._00001.jpg", None),
])
def test_crop_names(name: str, frame: int | None) -> None:
    assert crop_frame(name) == frame
    if frame is not None:
        assert crop_file_name(frame) == name  # the one name of that frame: crop_path finds it


@pytest.mark.parametrize(("name", "problem"), [
    ("1.jpg", "frame 1 must be named 00001.jpg"),
    ("000001.jpg", "frame 1 must be named 00001.jpg"),
    ("0100000.jpg", "frame 100000 must be named 100000.jpg"),
    ("00000.jpg", "frame 0"),
    ("0.jpg", "frame 0"),
    ("-1.jpg", "negative frame number"),
    ("+1.jpg", "must be named 00001.jpg"),
    (f"{MAX_FRAME + 1}.jpg", "is too large"),
    ("99999999999999999999999.jpg", "is too large"),
    ("frame7.jpg", "not a crop name"),
    ("1 .jpg", "not a crop name"),
    ("１２３４５.jpg", "not a crop name"),  # full-width digits: isdigit() says yes, int() would read them
    (".jpg", None),  # hidden
    ("00001.JPG", "must be named 00001.jpg (lower-case"),
    ("00001.jpeg", "must be named 00001.jpg"),
    ("x.jpeg", "not a crop name"),
])
def test_jpegs_that_are_not_crop_names_are_errors(name: str, problem: str | None) -> None:
    if problem is None:
        assert crop_frame(name) is None
        return
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace("+", r"\+")):
        crop_frame(name)


@pytest.mark.parametrize("name", ["video59_right", "2-30-640x360", "14-30-1920x1080", "vidéo", "a.b", "x_2"])
def test_accepted_video_names_fit_a_submission_row(name: str) -> None:
    assert video_name_problem(name) is None
    assert _LOCATION.match(f"{name}/{crop_file_name(1)}") is not None


@pytest.mark.parametrize(("name", "problem"), [
    ("", "empty"), ("a b", "whitespace"), ("a\tb", "whitespace"), ("a,b", "comma"), ("a/b", "slash"),
    ("a\\b", "slash"), ("_text", "starts with"), (".hidden", "starts with"), ("a\x01b", "unprintable"),
    ("a\u00a0b", "whitespace"),
])
def test_refused_video_names(name: str, problem: str) -> None:
    said = video_name_problem(name)
    assert said is not None and problem in said
