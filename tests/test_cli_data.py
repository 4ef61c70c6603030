"""`abawfeat data summary`, driven through the real CLI app with typer's CliRunner on hand-built trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from abawfeat.cli import app

AU_HEADER = "AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26"
KEYS = {"task", "split", "videos", "frames", "valid_frames", "usable_frames"}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())
    return path


def crops(folder: Path, frames: list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in frames:
        (folder / f"{k:05d}.jpg").write_bytes(b"")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """VA train: v1 (4 rows, 3 valid, crops 1, 2, 4 -> usable 2) and v2_left (2 rows, CRLF, 1 valid with an
    out-of-range row, crops in a nested batch folder -> usable 1). EXPR val: v2_right (3 rows, 2 valid, no
    crop folder -> usable 0). AU train: v1 (2 rows, 1 valid, usable 1; crop 4 is past its end). Test: a list
    and a sample file."""
    r = tmp_path / "Aff-Wild2"
    ann = r / "6th ABAW Annotations"
    write(ann / "VA_Estimation_Challenge/Train_Set/v1.txt",
          "valence,arousal\n0.1,0.1\n-5,-5\n0.2,0.3\n0.4,0.5\n")
    write(ann / "VA_Estimation_Challenge/Train_Set/v2_left.txt", "valence,arousal\r\n0,0\r\n3,0")
    write(ann / "EXPR_Classification_Challenge/Validation_Set/v2_right.txt",
          "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n4\n-1\n0\n")
    write(ann / "AU_Detection_Challenge/Train_Set/v1.txt",
          AU_HEADER + "\n" + ",".join(["1"] * 12) + "\n" + ",".join(["-1"] * 12) + "\n")
    crops(r / "cropped_aligned/v1", [1, 2, 4])
    crops(r / "cropped_aligned/batch2/v2_left", [1, 2])
    crops(r / "cropped_aligned_new_50_vids/t1", [1, 3])
    write(r / "names_of_videos_in_each_test_set/Valence_Arousal_Estimation_Challenge_test_set_release.txt",
          "t1\r\n\r\n")
    write(r / "prediction_files_format/CVPR_6th_ABAW_VA_test_set_sample.txt",
          "image_location,valence,arousal\nt1/00001.jpg,0,0\nt1/00002.jpg,0,0\nt1/00003.jpg,0,0\n")
    return r


EXPECTED = [
    {"task": "va", "split": "train", "videos": 2, "frames": 6, "valid_frames": 4, "usable_frames": 3},
    {"task": "va", "split": "val", "videos": 0, "frames": 0, "valid_frames": 0, "usable_frames": 0},
    {"task": "expr", "split": "train", "videos": 0, "frames": 0, "valid_frames": 0, "usable_frames": 0},
    {"task": "expr", "split": "val", "videos": 1, "frames": 3, "valid_frames": 2, "usable_frames": 0},
    {"task": "au", "split": "train", "videos": 1, "frames": 2, "valid_frames": 1, "usable_frames": 1},
    {"task": "au", "split": "val", "videos": 0, "frames": 0, "valid_frames": 0, "usable_frames": 0},
]


def run(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def test_json_is_exactly_the_rows(root: Path) -> None:
    result = run("data", "summary", "--data", str(root), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert all(set(r) == KEYS for r in rows)
    assert rows == EXPECTED
    # The out-of-range warning goes to stderr, never into the JSON.
    assert "v2_left.txt: 1 row with values outside" in result.stderr


def test_table_shows_counts_and_frames_without_crop(root: Path) -> None:
    result = run("data", "summary", "--data", str(root))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "6 → 4" in out and "3 → 2" in out and "2 → 1" in out
    # Valid without a crop: v1 frame 3 (VA train), v2_right frames 1 and 3 (EXPR val) -> 3.
    assert "Valid frames without a crop: 3 (VA train 1, EXPR val 2)" in out
    assert "3 frames" in out  # test: N from the sample file
    assert "Crops past the last annotated frame (no label): 1 (AU train 1)" in out  # v1 has 2 AU rows
    assert "Rows with out-of-range values (counted invalid): 1 (VA train 1)" in out
    assert "Videos without a crop folder: 1 annotated, 0 test" in out


def test_explicit_annotations_option(root: Path, tmp_path: Path) -> None:
    moved = tmp_path / "labels"
    (root / "6th ABAW Annotations").rename(moved)
    result = run("data", "summary", "--data", str(root), "--annotations", str(moved), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == EXPECTED


def _assert_one_line_error(result: object, *fragments: str) -> None:
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    # One error line; other stderr lines may only be warnings about files read before the bad one.
    lines = result.stderr.strip().splitlines()
    err = lines[-1]
    assert err.startswith("error: ") and all(x.startswith("warning: ") for x in lines[:-1]), lines
    for fragment in fragments:
        assert fragment in err, err
    assert result.stdout == ""


def test_missing_root(tmp_path: Path) -> None:
    result = run("data", "summary", "--data", str(tmp_path / "nope"), "--json")
    _assert_one_line_error(result, str(tmp_path / "nope"), "data root not found")


def test_no_or_several_annotation_folders(root: Path) -> None:
    (root / "6th ABAW Annotations").rename(root / "labels")
    # Crops alone are a tree extract can use: the summary says what it found instead of failing.
    for args in ((), ("--json",)):
        result = run("data", "summary", "--data", str(root), *args)
        assert result.exit_code == 0, result.output
        said = result.stderr if args else result.stdout
        assert "no annotations folder" in said and "--annotations" in said
        assert "3 videos with crops (7 crops)" in said, said
    assert json.loads(run("data", "summary", "--data", str(root), "--json").stdout) == [
        {**row, "videos": 0, "frames": 0, "valid_frames": 0, "usable_frames": 0} for row in EXPECTED]
    (root / "labels").rename(root / "6th ABAW Annotations")
    (root / "8th_ABAW_Annotations").mkdir()
    _assert_one_line_error(run("data", "summary", "--data", str(root)),
                           "'6th ABAW Annotations'", "'8th_ABAW_Annotations'")


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("arousal,valence\n0,0\n", 1, "header"),
    ("valence,arousal\r\n0,0\r\n0,0,0\r\n", 3, "expected 2 values"),
    ("valence,arousal\n0,0\n0,0\nzero,0\n", 4, "'zero' is not a number"),
    ("valence,arousal\n0,0\n\n0,0\n", 3, "blank line"),
])
def test_malformed_file_exit_2_with_file_and_line(root: Path, text: str, line: int, fragment: str) -> None:
    bad = write(root / "6th ABAW Annotations/VA_Estimation_Challenge/Validation_Set/bad.txt", text)
    result = run("data", "summary", "--data", str(root), "--json")
    _assert_one_line_error(result, f"{bad}:{line}: ", fragment)


def test_names_with_brackets_print_as_they_are(root: Path) -> None:
    """A data root named `aw[v2]` is printed as such in the table's title and in errors (no rich markup)."""
    bracketed = root.rename(root.with_name("aw[v2]"))
    result = run("data", "summary", "--data", str(bracketed))
    assert result.exit_code == 0, result.output
    assert "aw[v2]: frames → frames with valid labels" in result.stdout
    (bracketed / "cropped_aligned/v1/1.jpg").write_bytes(b"")
    _assert_one_line_error(run("data", "summary", "--data", str(bracketed)),
                           f"{bracketed}/cropped_aligned/v1/1.jpg: a second file for frame 1, beside "
                           "00001.jpg")
