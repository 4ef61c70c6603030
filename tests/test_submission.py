"""Submission files: exact format, round trip, strict reading with line numbers, filling, smoothing,
scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from abawfeat.errors import ConfigError, DataError
from abawfeat.metrics import ccc
from abawfeat.submission import (
    check_against_sample,
    fill_missing,
    read_submission,
    score_submission,
    write_submission,
)
from abawfeat.tasks import single

# ---------------------------------------------------------------------------------------------- writing


def test_write_va_exact_text_with_clipping(tmp_path: Path) -> None:
    rows = {"b_video": np.array([[0.5, -0.25]]), "a-30-640x360": np.array([[1.7, -3.0], [0.1234567, 0.0]])}
    path = write_submission(tmp_path / "va.txt", "va", rows)
    assert path.read_text() == (
        "image_location,valence,arousal\n"
        "a-30-640x360/00001.jpg,1.000000,-1.000000\n"  # clipped, videos in sorted order
        "a-30-640x360/00002.jpg,0.123457,0.000000\n"
        "b_video/00001.jpg,0.500000,-0.250000\n"
    )
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed, not left behind


def test_write_expr_and_au_exact_text(tmp_path: Path) -> None:
    p = write_submission(tmp_path / "expr.txt", "expr", {"v": np.array([0, 7, 3])})
    assert p.read_text().splitlines() == [
        "image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other",
        "v/00001.jpg,0",
        "v/00002.jpg,7",
        "v/00003.jpg,3",
    ]
    au = np.zeros((2, 12), dtype=np.int8)
    au[0, [0, 11]] = 1
    p = write_submission(tmp_path / "au.txt", "au", {"v_left": au})
    assert p.read_text().splitlines() == [
        "image_location,AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26",
        "v_left/00001.jpg,1,0,0,0,0,0,0,0,0,0,0,1",
        "v_left/00002.jpg,0,0,0,0,0,0,0,0,0,0,0,0",
    ]


def test_write_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="integers"):
        write_submission(
            tmp_path / "e.txt", "expr", {"v": np.array([0.3, 0.7])}
        )  # probabilities, not classes
    with pytest.raises(ValueError, match="outside"):
        write_submission(tmp_path / "e.txt", "expr", {"v": np.array([8])})
    with pytest.raises(ValueError, match="shape"):
        write_submission(tmp_path / "a.txt", "au", {"v": np.zeros((3, 11))})
    with pytest.raises(ValueError, match="NaN"):
        write_submission(tmp_path / "va.txt", "va", {"v": np.array([[np.nan, 0.0]])})
    with pytest.raises(ConfigError):
        write_submission(tmp_path / "x.txt", "mtl", {"v": np.zeros((1, 2))})
    assert not (tmp_path / "e.txt").exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_round_trip_all_tasks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = {
        "va": {v: rng.uniform(-1, 1, size=(n, 2)) for v, n in [("x", 5), ("y_right", 3)]},
        "expr": {v: rng.integers(0, 8, size=n) for v, n in [("x", 5), ("y_right", 3)]},
        "au": {v: rng.integers(0, 2, size=(n, 12)) for v, n in [("x", 5), ("y_right", 3)]},
    }
    for task, r in rows.items():
        back = read_submission(write_submission(tmp_path / f"{task}.txt", task, r), task)
        assert list(back) == ["x", "y_right"]
        for v in r:
            if task == "va":
                assert np.allclose(back[v], r[v], atol=5e-7)
            else:
                assert np.array_equal(back[v], r[v])


# -------------------------------------------------------------------------------------- strict reading


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sub.txt"
    p.write_bytes(text.encode())
    return p


VA_HEAD = single("va").submission_header + "\n"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("", 1, "empty"),
        ("image_location,valence,arousal,extra\nv/00001.jpg,0,0\n", 1, "header"),
        (VA_HEAD, 1, "no prediction rows"),
        (VA_HEAD + "v/00001.jpg,0.1\n", 2, "columns"),
        (VA_HEAD + "v/00001.jpg,0.1,0.2\nv/00003.jpg,0.1,0.2\n", 3, "frame 3 where frame 2"),
        (VA_HEAD + "v/00002.jpg,0.1,0.2\n", 2, "frame 2 where frame 1"),
        (VA_HEAD + "v/00001.jpg,0.1,0.2\nw/00001.jpg,0,0\nv/00002.jpg,0,0\n", 4, "not contiguous"),
        (VA_HEAD + "v/00001.jpg,0.1,0.2\nv/00001.jpg,0.1,0.2\n", 3, "frame 1 where frame 2"),
        (VA_HEAD + "v/00001.jpg,0.1,1.5\n", 2, "outside"),
        (VA_HEAD + "v/00001.jpg,nan,0\n", 2, "outside"),
        (VA_HEAD + "v/00001.jpg,abc,0\n", 2, "not numbers"),
        (VA_HEAD + "v/00001.png,0,0\n", 2, "image location"),
        (VA_HEAD + "v/00001.jpg,0,0\n\nv/00002.jpg,0,0\n", 3, "columns"),
    ],
)
def test_read_va_errors_name_the_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(DataError, match=message) as exc:
        read_submission(path, "va")
    assert exc.value.line == line
    assert str(exc.value).startswith(f"{path}:{line}: ")


def test_read_expr_and_au_value_errors(tmp_path: Path) -> None:
    head = single("expr").submission_header + "\n"
    for bad, msg in [("8", "outside"), ("1.0", "not integers"), ("-1", "outside"), ("0,1", "columns")]:
        with pytest.raises(DataError, match=msg) as exc:
            read_submission(_write(tmp_path, head + "v/00001.jpg,0\nv/00002.jpg," + bad + "\n"), "expr")
        assert exc.value.line == 3
    head = single("au").submission_header + "\n"
    with pytest.raises(DataError, match="0 or 1") as exc:
        read_submission(_write(tmp_path, head + "v/00001.jpg," + ",".join(["0"] * 11 + ["2"]) + "\n"), "au")
    assert exc.value.line == 2
    # The VA header is not the AU header.
    with pytest.raises(DataError, match="header"):
        read_submission(_write(tmp_path, VA_HEAD + "v/00001.jpg,0,0\n"), "au")


def test_read_tolerates_crlf_and_missing_final_newline(tmp_path: Path) -> None:
    got = read_submission(_write(tmp_path, VA_HEAD.replace("\n", "\r\n") + "v/00001.jpg,0.5,-0.5"), "va")
    assert got["v"].tolist() == [[0.5, -0.5]]
    with pytest.raises(DataError, match="file not found"):
        read_submission(tmp_path / "missing.txt", "va")


def test_check_against_sample(tmp_path: Path) -> None:
    sub = write_submission(tmp_path / "s.txt", "expr", {"v1": np.zeros(3, int), "v2": np.ones(2, int)})
    sample = tmp_path / "sample.txt"
    sample.write_text(single("expr").submission_header + "\nv1/00001.jpg,\nv1/00002.jpg,\nv1/00003.jpg,\n")
    assert check_against_sample(sub, sample) == {"videos": 1, "frames": 3, "extra_videos": 1}
    sample.write_text(single("expr").submission_header + "\nv1/00001.jpg,0\nv2/00003.jpg,0\nv3/00001.jpg,0\n")
    with pytest.raises(DataError, match=r"2 frame\(s\).*first v2/00003.jpg \(sample line 3\)"):
        check_against_sample(sub, sample)
    with pytest.raises(DataError, match="header"):
        check_against_sample(sub, sample, task="au")  # our file is validated against the task too


# ---------------------------------------------------------------------------------------------- filling


def test_fill_missing_interpolate_nearest_previous() -> None:
    frames = np.array([2, 4, 8], dtype=np.int32)
    values = np.array([[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    interp = fill_missing(frames, values, 10, "interpolate")
    assert interp.shape == (10, 2)
    # frame:          1    2    3    4    5     6    7     8   9   10
    assert np.allclose(interp[:, 0], [0, 0, 0.5, 1, 0.5, 0, -0.5, -1, -1, -1])
    assert np.allclose(interp[:, 1], [1, 1, 1, 1, 0.75, 0.5, 0.25, 0, 0, 0])
    nearest = fill_missing(frames, np.array([3, 5, 7]), 10, "nearest")
    # frame 6 is 2 from both 4 and 8: the earlier crop wins.
    assert nearest.tolist() == [3, 3, 3, 5, 5, 5, 7, 7, 7, 7]
    assert nearest.dtype == np.array([3]).dtype
    previous = fill_missing(frames, np.array([3, 5, 7]), 10, "previous")
    assert previous.tolist() == [3, 3, 3, 5, 5, 5, 5, 7, 7, 7]


def test_fill_missing_edge_cases() -> None:
    # Crops past the annotated frames are dropped; a single crop fills everything.
    assert fill_missing(np.array([3, 12]), np.array([[0.2], [0.9]]), 5).ravel().tolist() == [0.2] * 5
    assert fill_missing(np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0]), 3).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="continuous"):
        fill_missing(np.array([1, 3]), np.array([0, 5]), 3, "interpolate")
    with pytest.raises(ValueError, match="increasing"):
        fill_missing(np.array([3, 2]), np.array([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="no crop"):
        fill_missing(np.array([7]), np.array([0.0]), 3)
    with pytest.raises(ConfigError):
        fill_missing(np.array([1]), np.array([0.0]), 3, "cubic")


def test_smooth_centred_average_without_edge_shrink() -> None:
    from abawfeat.smoothing import moving_average as smooth

    x = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [4.0, 10.0], [9.0, 10.0]])
    out = smooth(x, 3)
    assert np.allclose(out[:, 0], [1.5, 2.0, 3.0, 16 / 3, 6.5])
    assert np.allclose(out[:, 1], 10.0)  # a constant stays constant, edges included (no zero padding)
    assert np.allclose(smooth(x, 5)[2, 0], x[:, 0].mean())
    assert np.array_equal(smooth(x, 1), x)
    # Against a direct loop on random data.
    rng = np.random.default_rng(1)
    y = rng.normal(size=(50, 3))
    ref = np.stack([y[max(0, i - 3) : i + 4].mean(axis=0) for i in range(50)])
    assert np.allclose(smooth(y, 7), ref)
    for bad in (0, 4, -3, 2.0):
        with pytest.raises(ConfigError):
            smooth(x, bad)


# ---------------------------------------------------------------------------------------------- scoring


def test_score_submission_recomputes_official_metrics(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    lab = {"a": rng.uniform(-1, 1, size=(30, 2)), "b": rng.uniform(-1, 1, size=(20, 2))}
    valid = {"a": np.ones(30, bool), "b": np.r_[np.ones(15, bool), np.zeros(5, bool)]}
    lab["b"][~valid["b"]] = -5
    pred = {v: np.clip(lab[v] + rng.normal(scale=0.3, size=lab[v].shape), -1, 1) for v in lab}
    pred["a"] = np.r_[pred["a"], np.zeros((4, 2))]  # extra frames past the annotation are ignored
    path = write_submission(tmp_path / "va.txt", "va", pred)
    res = score_submission(path, "va", {v: (lab[v], valid[v]) for v in lab})
    p = np.round(np.r_[pred["a"][:30], pred["b"][:15]], 6)
    y = np.r_[lab["a"], lab["b"][:15]]
    assert res["n_frames"] == 45
    assert res["ccc_valence"] == pytest.approx(ccc(p[:, 0], y[:, 0]), abs=1e-9)
    assert res["ccc_va"] == pytest.approx((ccc(p[:, 0], y[:, 0]) + ccc(p[:, 1], y[:, 1])) / 2, abs=1e-9)

    e_lab = {"a": rng.integers(0, 8, 40), "b": rng.integers(0, 8, 25)}
    e_pred = {"a": rng.integers(0, 8, 40), "b": rng.integers(0, 8, 25)}
    e_path = write_submission(tmp_path / "e.txt", "expr", e_pred)
    res = score_submission(e_path, "expr", {v: (e_lab[v], np.ones(len(e_lab[v]), bool)) for v in e_lab})
    ref = f1_score(
        np.r_[e_lab["a"], e_lab["b"]], np.r_[e_pred["a"], e_pred["b"]], labels=range(8), average="macro"
    )
    assert res["f1_expr"] == pytest.approx(ref)

    with pytest.raises(DataError, match="no prediction rows"):
        score_submission(e_path, "expr", {"zzz": (np.zeros(3, int), np.ones(3, bool))})
    write_submission(tmp_path / "short.txt", "expr", {"a": np.zeros(5, int)})
    with pytest.raises(DataError, match="5 prediction rows for 9"):
        score_submission(tmp_path / "short.txt", "expr", {"a": (np.zeros(9, int), np.ones(9, bool))})
