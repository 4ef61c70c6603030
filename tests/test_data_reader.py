"""abawfeat.data: the Aff-Wild2 reader, on small release trees written by hand in tmp_path.

The tree built by ``build_release`` has every quirk of the real release; its numbers are worked out by hand
in the comments, and ``test_summary_numbers`` checks them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from abawfeat.data import (
    AffWild2,
    find_annotations_dir,
    read_annotation,
    read_mtl_file,
    read_name_list,
    read_sample_frame_counts,
)
from abawfeat.data.affwild2 import _fast_numbers
from abawfeat.errors import DataError

VA_HEADER = "valence,arousal"
EXPR_HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
AU_HEADER = "AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26"


def write(path: Path, text: str) -> Path:
    """Write exactly these bytes: tests choose their own line endings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())
    return path


def make_crops(folder: Path, frames: list[int], extra: tuple[str, ...] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in frames:
        (folder / f"{k:05d}.jpg").write_bytes(b"")
    for name in extra:
        (folder / name).write_bytes(b"")


def au_row(*values: int) -> str:
    return ",".join(str(v) for v in values)


def build_release(root: Path, ann_name: str = "8th_ABAW_Annotations",
                  expr_dir: str = "EXPR_Recognition_Challenge") -> Path:
    ann = root / ann_name
    # VA train ------------------------------------------------------------------------------------------
    # vidA: rows valid T, F (-5,-5), F (one -5), T (edges -1/1), T -> 5 frames, 3 valid.
    # Crops 1,2,3,5,6: frame 4 is valid without a crop; 6 is past the end. Usable: frames 1, 5 -> 2.
    write(ann / "VA_Estimation_Challenge/Train_Set/vidA.txt",
          f"{VA_HEADER}\n0.1,0.2\n-5,-5\n0.5,-5\n1.0,-1\n0.3,0.3\n")
    make_crops(root / "cropped_aligned/vidA", [1, 2, 3, 5, 6], extra=("Thumbs.db", "00004.png"))
    # vid7_left: CRLF, 3 valid; crops 1..3 in the second batch root -> usable 3.
    write(ann / "VA_Estimation_Challenge/Train_Set/vid7_left.txt",
          f"{VA_HEADER}\r\n0,0\r\n0.9,0.9\r\n-0.9,0.1\r\n")
    make_crops(root / "cropped_aligned_new_50_vids/vid7_left", [1, 2, 3])
    # vid7_right: mixed endings, lone \r, no final newline; 2 valid; crops nested in a batch folder -> 2.
    write(ann / "VA_Estimation_Challenge/Train_Set/vid7_right.txt", f"{VA_HEADER}\r\n0.2,0.2\r-0.2,-0.2")
    make_crops(root / "cropped_aligned/batch2/vid7_right", [1, 2])
    # A macOS resource-fork file must not become a video.
    write(ann / "VA_Estimation_Challenge/Train_Set/._vidA.txt", "junk")
    # VA val: vidB has one out-of-range row (1.5) and one marked row; 2 valid; no crop folder -> usable 0.
    write(ann / "VA_Estimation_Challenge/Validation_Set/vidB.txt",
          f"{VA_HEADER}\n0.0,0.0\n1.5,0.0\n-5,-5\n-0.25,0.75\n\n")
    # EXPR train: vidA rows 0, 7, -1, 3, 8 (out of range) -> 3 valid (frames 1, 2, 4); usable 1, 2 -> 2.
    write(ann / f"{expr_dir}/Train_Set/vidA.txt", f"{EXPR_HEADER}\n0\n7\n-1\n3\n8\n")
    # EXPR val: vid7_left rows 6, -1, 2 -> 2 valid, both with crops.
    write(ann / f"{expr_dir}/Validation_Set/vid7_left.txt", f"{EXPR_HEADER}\n6\n-1\n2\n")
    # AU train: vidA rows: all 0 (valid), one -1 (invalid), all 1 (valid), a 2 (out of range), mixed (valid).
    # Valid frames 1, 3, 5, all with crops -> usable 3.
    z, o = [0] * 12, [1] * 12
    write(ann / "AU_Detection_Challenge/Train_Set/vidA.txt", "\n".join([
        AU_HEADER, au_row(*z), au_row(*z[:11], -1), au_row(*o), au_row(2, *z[1:]), au_row(*([0, 1] * 6)),
    ]) + "\n")
    (ann / "AU_Detection_Challenge/Validation_Set").mkdir(parents=True)  # an empty split
    # Test set: lists (CRLF, blank lines, one with a header), crops in root-level and nested batch folders.
    write(root / "names_of_videos_in_each_test_set/Valence_Arousal_Estimation_Challenge_test_set_release.txt",
          "vidT2\r\n\r\nvidT1\r\n\r\n")
    write(root / "names_of_videos_in_each_test_set/Expression_Recognition_Challenge_test_set_release.txt",
          "video\nvidT1\n")
    make_crops(root / "batch1/vidT1", [1, 2, 4])
    make_crops(root / "cropped_aligned/batch1/vidT2", [1])
    write(root / "prediction_files_format/CVPR_8th_ABAW_VA_test_set_sample.txt",
          "image_location,valence,arousal\n" + "".join(f"vidT1/{k:05d}.jpg,0,0\n" for k in (1, 2, 3, 4))
          + "vidT2/00002.jpg,0,0\nvidT2/00001.jpg,0,0\n")
    write(root / "prediction_files_format/CVPR_6th_ABAW_AU_test_set_sample.txt",
          f"image_location,{AU_HEADER}\nold/00009.jpg," + au_row(*z) + "\n")
    write(root / "prediction_files_format/CVPR_8th_ABAW_AU_test_set_sample.txt",
          f"image_location,{AU_HEADER}\r\nvidT1/00003.jpg," + au_row(*z) + "\r\n")
    return root


@pytest.fixture
def release(tmp_path: Path) -> Path:
    return build_release(tmp_path / "Aff-Wild2")


# ------------------------------------------------------------------------------------------ discovery


@pytest.mark.parametrize("ann_name", ["8th_ABAW_Annotations", "6th ABAW Annotations", "5th_abaw_annotations",
                                      "ABAW Annotations"])
@pytest.mark.parametrize("expr_dir", ["EXPR_Recognition_Challenge", "EXPR_Classification_Challenge"])
def test_finds_annotations_and_both_expr_folder_names(tmp_path: Path, ann_name: str, expr_dir: str) -> None:
    root = build_release(tmp_path / "data", ann_name=ann_name, expr_dir=expr_dir)
    ds = AffWild2(root)
    assert ds.annotations_dir == root / ann_name
    assert ds.name == "data"
    assert ds.task_dir("expr") == root / ann_name / expr_dir
    assert ds.videos("va", "train") == ["vid7_left", "vid7_right", "vidA"]
    assert ds.videos("expr", "train") == ["vidA"] and ds.videos("expr", "val") == ["vid7_left"]
    assert ds.videos("au", "val") == []


def test_both_expr_folders_prefers_the_newer_name(release: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = release / "8th_ABAW_Annotations/EXPR_Classification_Challenge/Train_Set/oldvid.txt"
    write(old, f"{EXPR_HEADER}\n1\n")
    ds = AffWild2(release)
    assert ds.videos("expr", "train") == ["vidA"]
    err = capsys.readouterr().err
    assert "EXPR_Recognition_Challenge and EXPR_Classification_Challenge" in err


def test_several_annotation_folders_are_listed(release: Path) -> None:
    (release / "6th ABAW Annotations").mkdir()
    with pytest.raises(DataError) as exc:
        AffWild2(release)
    assert "'6th ABAW Annotations'" in str(exc.value) and "'8th_ABAW_Annotations'" in str(exc.value)
    # An explicit folder settles it; a relative one is also looked for under the root.
    chosen = AffWild2(release, annotations="8th_ABAW_Annotations")
    assert chosen.annotations_dir == release / "8th_ABAW_Annotations"


def test_missing_root_or_annotations(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data root not found"):
        AffWild2(tmp_path / "nope")
    (tmp_path / "cropped_aligned").mkdir()
    # Crops alone are a valid tree (stage one needs nothing else); asking for annotations names the problem.
    crops_only = AffWild2(tmp_path)
    assert not crops_only.has_annotations and crops_only.videos_with_crops() == []
    for ask in (lambda: crops_only.videos("va", "train"), lambda: crops_only.annotation("au", "val", "v"),
                lambda: crops_only.task_dir("expr"), lambda: crops_only.mtl_annotations("train")):
        with pytest.raises(DataError, match="no annotations folder"):
            ask()
    with pytest.raises(DataError, match="annotations folder not found"):
        AffWild2(tmp_path, annotations=tmp_path / "labels")
    (tmp_path / "labels").mkdir()
    with pytest.raises(DataError, match="no task folder"):
        AffWild2(tmp_path, annotations=tmp_path / "labels")
    with pytest.raises(DataError):
        find_annotations_dir(tmp_path)


def test_explicit_annotations_folder_with_any_name(tmp_path: Path) -> None:
    build_release(tmp_path / "root")
    (tmp_path / "root/8th_ABAW_Annotations").rename(tmp_path / "labels")
    ds = AffWild2(tmp_path / "root", annotations=tmp_path / "labels")
    assert ds.videos("au", "train") == ["vidA"]
    assert ds.crop_dir("vidA") == tmp_path / "root/cropped_aligned/vidA"


# --------------------------------------------------------------------------------------- annotations


def test_va_labels_validity_and_markers(release: Path) -> None:
    ann = read_annotation(release / "8th_ABAW_Annotations/VA_Estimation_Challenge/Train_Set/vidA.txt", "va")
    assert (ann.video, ann.task, ann.split, ann.n_frames) == ("vidA", "va", "train", 5)
    assert ann.labels.dtype == np.float32 and ann.labels.shape == (5, 2)
    assert ann.valid.tolist() == [True, False, False, True, True]
    # One -5 invalidates the whole row, and invalid rows carry the marker in both columns.
    np.testing.assert_allclose(ann.labels, [[0.1, 0.2], [-5, -5], [-5, -5], [1, -1], [0.3, 0.3]], rtol=1e-6)
    assert ann.frames.tolist() == [1, 2, 3, 4, 5] and ann.frames.dtype == np.int32
    assert ann.n_out_of_range == 0
    with pytest.raises(ValueError):
        ann.labels[0, 0] = 0.0  # memoised arrays are shared, hence read-only


def test_expr_and_au_labels(release: Path) -> None:
    ds = AffWild2(release)
    expr = ds.annotation("expr", "train", "vidA")
    assert expr.labels.dtype == np.int64
    assert expr.labels.tolist() == [0, 7, -1, 3, -1]
    assert expr.valid.tolist() == [True, True, False, True, False]
    au = ds.annotation("au", "train", "vidA")
    assert au.labels.dtype == np.int8 and au.labels.shape == (5, 12)
    assert au.valid.tolist() == [True, False, True, False, True]
    assert au.labels[1].tolist() == [-1] * 12 and au.labels[3].tolist() == [-1] * 12
    assert au.labels[4].tolist() == [0, 1] * 6
    assert ds.annotation("au", "train", "vidA") is au  # memoised


def test_out_of_range_one_warning_with_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "v.txt", f"{VA_HEADER}\n0,0\n1.5,0\n-5,-5\n0,-1.01\n-5,2\nnan,0\n")
    ann = read_annotation(path, "va")
    assert ann.split == ""  # not inside a Train_Set / Validation_Set folder
    # 1.5, -1.01, 2 (beside a -5) and nan are neither valid nor the marker.
    assert ann.n_out_of_range == 4
    assert ann.valid.tolist() == [True, False, False, False, False, False]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning:") and "4 rows" in err and str(path) in err
    expr = read_annotation(write(tmp_path / "e.txt", f"{EXPR_HEADER}\n2.5\n-5\n3.0\n-1\n"), "expr")
    # 2.5 is not a class, -5 is not EXPR's marker; 3.0 is class 3.
    assert expr.n_out_of_range == 2 and expr.labels.tolist() == [-1, -1, 3, -1]
    assert "2 rows" in capsys.readouterr().err
    read_annotation(write(tmp_path / "ok.txt", f"{EXPR_HEADER}\n-1\n0\n"), "expr")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("text", [
    f"{VA_HEADER}\n0.5,-0.5\n-5,-5\n1,0.25\n",
    f"{VA_HEADER}\r\n0.5,-0.5\r\n-5,-5\r\n1,0.25\r\n",
    f"{VA_HEADER}\r0.5,-0.5\r-5,-5\r1,0.25\r",
    f"{VA_HEADER}\r\n0.5,-0.5\n-5,-5\r1,0.25",
    f"{VA_HEADER}\n0.5,-0.5\n-5,-5\n1,0.25\n\n\n",
    f"\ufeff{VA_HEADER}\n 0.5 , -0.5\n-5,-5\t\n1 ,2.5e-1\n",  # BOM, spaces, exponent
    f"{VA_HEADER}\n0.50000,-.5\n-5.0,-5\n1.,0.2500\n",
])
def test_line_endings_spaces_and_number_forms(tmp_path: Path, text: str) -> None:
    ann = read_annotation(write(tmp_path / "v.txt", text), "va")
    assert ann.n_frames == 3
    assert ann.valid.tolist() == [True, False, True]
    np.testing.assert_array_equal(ann.labels, np.array([[0.5, -0.5], [-5, -5], [1, 0.25]], dtype=np.float32))


@pytest.mark.parametrize(("task", "text", "line", "fragment"), [
    ("va", "arousal,valence\n0,0\n", 1, "header"),
    ("va", f"{EXPR_HEADER}\n0\n", 1, "EXPR header"),
    ("va", "0.1,0.2\n0.3,0.4\n", 1, "header missing"),
    ("va", f"{VA_HEADER}\n0,0\n0,0\n0,0,0\n", 4, "expected 2 values"),
    ("va", f"{VA_HEADER}\r\n0,0\r\n0\r\n", 3, "found 1"),
    ("va", f"{VA_HEADER}\n0,0\n0,abc\n", 3, "'abc' is not a number"),
    ("va", f"{VA_HEADER}\n0,0\n0,\n", 3, "empty value"),
    ("va", f"{VA_HEADER}\n0,0\n0,1_0\n", 3, "not a number"),
    ("va", f"{VA_HEADER}\n0,0\n\n0,0\n", 3, "blank line"),
    ("va", f"{VA_HEADER}\r\n0,0\r\n  \r\n0,0\r\n", 3, "blank line"),
    ("expr", f"{EXPR_HEADER}\n1\n\n2\n", 3, "blank line"),
    ("expr", f"{EXPR_HEADER}\n1\n2,3\n", 3, "expected 1 value"),
    ("expr", f"{EXPR_HEADER}\n1\nx\n", 3, "not a number"),
    ("au", f"{AU_HEADER}\n" + au_row(*[0] * 11) + "\n", 2, "expected 12 values"),
    ("au", f"{AU_HEADER}\n" + au_row(*[0] * 12) + "\n" + au_row(*[0] * 11, "-") + "\n", 3, "not a number"),
    ("va", f"{VA_HEADER}\n", 2, "no data rows"),
])
def test_malformed_files_name_file_and_line(tmp_path: Path, task: str, text: str, line: int,
                                            fragment: str) -> None:
    path = write(tmp_path / "bad.txt", text)
    with pytest.raises(DataError) as exc:
        read_annotation(path, task)
    assert str(exc.value).startswith(f"{path}:{line}: ")
    assert fragment in str(exc.value)
    assert exc.value.line == line


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    for text in ("", "\n\n", "\r\n"):
        with pytest.raises(DataError, match="empty file"):
            read_annotation(write(tmp_path / "e.txt", text), "au")
    with pytest.raises(DataError, match="file not found"):
        read_annotation(tmp_path / "missing.txt", "va")


def test_fast_parser_equals_python_float() -> None:
    # The vectorised parser must give float(token) bit for bit, and refuse (None) what it cannot read.
    rng = np.random.default_rng(0)
    alphabet = list("0123456789.-")
    for _ in range(3000):
        tokens = ["".join(rng.choice(alphabet, rng.integers(1, 7))) for _ in range(3)]
        got = _fast_numbers(",".join(tokens), 1, 3)
        try:
            want = [float(t) for t in tokens]
        except ValueError:
            assert got is None, tokens
            continue
        assert got is not None, tokens
        assert got[0].tolist() == want and np.signbit(got[0]).tolist() == np.signbit(want).tolist(), tokens
    values = rng.uniform(-1, 1, 2000).round(6)
    text = "\n".join(f"{a:.6f},{b:.6f}" for a, b in values.reshape(-1, 2))
    expected = [[float(x) for x in row.split(",")] for row in text.split("\n")]
    assert _fast_numbers(text, 1000, 2).tolist() == expected
    assert _fast_numbers("1,2\n3", 2, 2) is None  # short last row
    assert _fast_numbers("1,2,3\n4", 2, 2) is None  # right token count, wrong row shape


def test_large_file_reads_exactly(tmp_path: Path) -> None:
    # Speed is measured in benchmarks, never asserted here; this checks the fast path is exact at scale.
    rng = np.random.default_rng(1)
    au = rng.integers(-1, 2, (50_000, 12))
    path = write(tmp_path / "big.txt", AU_HEADER + "\n" + "\n".join(",".join(map(str, r)) for r in au) + "\n")
    ann = read_annotation(path, "au")
    assert ann.valid.tolist() == (au >= 0).all(axis=1).tolist()
    assert ann.labels[ann.valid].tolist() == au[(au >= 0).all(axis=1)].tolist()


# -------------------------------------------------------------------------------------------- crops


def test_crop_roots_batches_and_left_right(release: Path) -> None:
    ds = AffWild2(release)
    assert ds.crop_dir("vidA") == release / "cropped_aligned/vidA"
    assert ds.crop_dir("vid7_left") == release / "cropped_aligned_new_50_vids/vid7_left"
    assert ds.crop_dir("vid7_right") == release / "cropped_aligned/batch2/vid7_right"
    assert ds.crop_dir("vidT1") == release / "batch1/vidT1"
    assert ds.crop_dir("vidT2") == release / "cropped_aligned/batch1/vidT2"
    assert ds.crop_dir("vidB") is None
    assert ds.videos_with_crops() == ["vid7_left", "vid7_right", "vidA", "vidT1", "vidT2"]
    frames = ds.crop_frames("vidA")
    assert frames.dtype == np.int32 and frames.tolist() == [1, 2, 3, 5, 6]  # not Thumbs.db or the .png
    assert ds.crop_frames("vidB").tolist() == []
    assert ds.crop_path("vid7_right", 2) == release / "cropped_aligned/batch2/vid7_right/00002.jpg"
    assert ds.crop_mask("vidA", 5).tolist() == [True, True, True, False, True]
    with pytest.raises(DataError, match="no crop folder"):
        ds.crop_path("vidB", 1)


def test_duplicate_crop_folders_are_refused(release: Path) -> None:
    make_crops(release / "cropped_aligned_new_50_vids/vidA", [1])
    with pytest.raises(DataError, match="vidA"):
        AffWild2(release).crop_dir("vidA")


def test_summary_numbers(release: Path) -> None:
    rows = AffWild2(release).summary()
    assert rows == [
        {"task": "va", "split": "train", "videos": 3, "frames": 10, "valid_frames": 8, "usable_frames": 7},
        {"task": "va", "split": "val", "videos": 1, "frames": 4, "valid_frames": 2, "usable_frames": 0},
        {"task": "expr", "split": "train", "videos": 1, "frames": 5, "valid_frames": 3, "usable_frames": 2},
        {"task": "expr", "split": "val", "videos": 1, "frames": 3, "valid_frames": 2, "usable_frames": 2},
        {"task": "au", "split": "train", "videos": 1, "frames": 5, "valid_frames": 3, "usable_frames": 3},
        {"task": "au", "split": "val", "videos": 0, "frames": 0, "valid_frames": 0, "usable_frames": 0},
    ]


def test_summary_details(release: Path) -> None:
    rows = {(r["task"], r["split"]): r for r in AffWild2(release).summary(details=True)}
    assert rows[("va", "train")]["valid_without_crop"] == 1  # vidA frame 4
    assert rows[("va", "train")]["crops_past_end"] == 1  # vidA 00006.jpg
    assert rows[("va", "val")]["valid_without_crop"] == 2 and rows[("va", "val")]["videos_without_crops"] == 1
    assert rows[("va", "val")]["out_of_range"] == 1
    assert rows[("expr", "train")]["valid_without_crop"] == 1 and rows[("expr", "train")]["out_of_range"] == 1
    assert rows[("au", "train")]["valid_without_crop"] == 0


# ----------------------------------------------------------------------------------------- test set


def test_test_lists_and_sample_files(release: Path) -> None:
    ds = AffWild2(release)
    assert ds.test_videos("va") == ["vidT1", "vidT2"]  # CRLF and blank lines
    assert ds.test_videos("expr") == ["vidT1"]  # the "video" header line is skipped
    assert ds.test_videos("au") == []  # no list released
    assert ds.sample_file("va").name == "CVPR_8th_ABAW_VA_test_set_sample.txt"
    assert ds.sample_frame_counts("va") == {"vidT1": 4, "vidT2": 2}  # max frame, rows in any order
    # 6th and 8th sample files side by side: the newer edition wins.
    assert ds.sample_frame_counts("au") == {"vidT1": 3}
    assert ds.sample_file("expr") is None
    with pytest.raises(DataError, match="no EXPR sample file"):
        ds.sample_frame_counts("expr")
    tests = {r["task"]: r for r in ds.test_summary()}
    assert tests["va"] == {"task": "va", "split": "test", "videos": 2, "frames": 6, "videos_without_crops": 0}
    assert tests["expr"]["frames"] is None


def test_name_list_variants(tmp_path: Path) -> None:
    path = write(tmp_path / "l.txt", "Video names\r\n a.mp4 \r\n\r\nb,extra\rc\na\n")
    assert read_name_list(path) == ["a", "b", "c"]
    assert read_name_list(write(tmp_path / "m.txt", "video1\nvideo2")) == ["video1", "video2"]
    with pytest.raises(DataError, match="no video names"):
        read_name_list(write(tmp_path / "n.txt", "video\n\n"))


def test_sample_file_errors_and_headerless(tmp_path: Path) -> None:
    ok = write(tmp_path / "s.txt", "x/00001.jpg,0\nx/00010.jpg,1\n\ny/00002.jpg,0")
    assert read_sample_frame_counts(ok) == {"x": 10, "y": 2}
    bad = write(tmp_path / "b.txt", "image_location,valence,arousal\nx/00001.jpg,0,0\nx/2.png,0,0\n")
    with pytest.raises(DataError) as exc:
        read_sample_frame_counts(bad)
    assert str(exc.value).startswith(f"{bad}:3: ")


# ---------------------------------------------------------------------------------------- multi-task


MTL_HEADER = "image,valence,arousal,expression,aus"


def test_mtl_file(release: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        "vidA/00001.jpg,0.5,-0.5,3," + au_row(*[0, 1] * 6),
        "vid7_left/00012.jpg,-5,-5,-1," + au_row(*[-1] * 12),
        "vid7_right/00003.jpg,0.1,0.2,7," + au_row(*[1] * 11, -1),
        "vidA/00002.jpg, 2.0 ,0,9," + au_row(*[0] * 11, 3),  # out of range in every task
    ]
    mtl_dir = release / "8th_ABAW_Annotations/MTL_Challenge"
    write(mtl_dir / "train_set.txt", MTL_HEADER + "\r\n" + "\r\n".join(rows))  # CRLF, no final newline
    write(mtl_dir / "validation_set.txt", MTL_HEADER + "\n" + rows[0] + "\n")
    ds = AffWild2(release)
    mtl = ds.mtl_annotations("train")
    assert len(mtl) == 4 and mtl.video.tolist() == ["vidA", "vid7_left", "vid7_right", "vidA"]
    assert mtl.frame.tolist() == [1, 12, 3, 2] and mtl.frame.dtype == np.int32
    assert mtl.images[1] == "vid7_left/00012.jpg"
    lab, ok = mtl.labels, mtl.valid
    np.testing.assert_allclose(lab["va"][0], [0.5, -0.5])
    assert lab["va"].dtype == np.float32 and lab["expr"].dtype == np.int64 and lab["au"].dtype == np.int8
    assert ok["va"].tolist() == [True, False, True, False]
    assert lab["expr"].tolist() == [3, -1, 7, -1] and ok["expr"].tolist() == [True, False, True, False]
    assert ok["au"].tolist() == [True, False, False, False] and lab["au"][0].tolist() == [0, 1] * 6
    assert mtl.n_out_of_range == 1 and capsys.readouterr().err.count("warning:") == 1
    assert mtl.videos() == ["vid7_left", "vid7_right", "vidA"]
    assert len(ds.mtl_annotations("val")) == 1 and ds.mtl_annotations("train") is mtl


def test_mtl_without_files_and_errors(release: Path, tmp_path: Path) -> None:
    ds = AffWild2(release)
    assert ds.mtl_file("train") is None
    with pytest.raises(DataError, match="no multi-task train file"):
        ds.mtl_annotations("train")
    good = "a/00001.jpg,0,0,0," + au_row(*[0] * 12)
    cases = [
        (MTL_HEADER + "\n" + good + "\nnot-an-image,0,0,0," + au_row(*[0] * 12) + "\n", 3, "is not <video>"),
        (MTL_HEADER + "\n" + good + "\n" + good + ",0\n", 3,
         "expected 16 comma-separated values (image, valence, arousal, expression, 12 AUs), found 17"),
        (MTL_HEADER + "\n" + good + "\n\n" + good + "\n", 3, "blank line"),
        (MTL_HEADER + "\n" + good.replace(",0,0,0,", ",0,x,0,") + "\n", 2, "arousal: 'x'"),
        ("image,valence\n" + good + "\n", 1, "header"),
    ]
    for text, line, fragment in cases:
        path = write(tmp_path / "m.txt", text)
        with pytest.raises(DataError) as exc:
            read_mtl_file(path)
        assert str(exc.value).startswith(f"{path}:{line}: ") and fragment in str(exc.value), str(exc.value)
    # The long header, with the twelve AU names spelled out, is accepted too.
    long_header = "image,valence,arousal,expression," + AU_HEADER
    assert len(read_mtl_file(write(tmp_path / "l.txt", long_header + "\n" + good))) == 1


def test_package_import_is_light() -> None:
    import subprocess
    import sys

    code = ("import sys, abawfeat.data; "
            "print(sorted(m for m in ('torch', 'abawfeat.data.synth', 'abawfeat.cli') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
