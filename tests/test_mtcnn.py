"""MTCNN: our networks and detection steps reproduce facenet-pytorch 2.6.0 on real images (fixture made with
that package, tests/fixtures/mtcnn/README.md); batching frames changes nothing; weights are resolved by name
and refused in one line when missing or wrong."""

from __future__ import annotations

import hashlib
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from abawfeat.errors import CheckpointError
from abawfeat.video.detectors import DETECTORS

FIXTURE = Path(__file__).parent / "fixtures" / "mtcnn"
sys.path.insert(0, str(FIXTURE))
from make_fixture import ITEMS, frame  # noqa: E402

sys.path.remove(str(FIXTURE))


@pytest.fixture(scope="module")
def detector(media: Path):  # type: ignore[no-untyped-def]
    from abawfeat.video.detectors import build_detector

    torch.set_num_threads(1)
    return build_detector("mtcnn")


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "facenet_pytorch_2.6.0_outputs.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("i", range(len(ITEMS)), ids=[f"{f}@{k}" for f, k in ITEMS])
def test_reproduces_facenet_pytorch(i: int, detector, reference, media: Path) -> None:  # type: ignore[no-untyped-def]
    name, k = ITEMS[i]
    img = frame(media / name, k)
    assert hashlib.sha256(img.tobytes()).hexdigest() == reference["pixels_sha256"][i], "decoder changed"
    got = detector.detect(img)[0]
    boxes, probs, points = reference[f"boxes_{i}"], reference[f"probs_{i}"], reference[f"points_{i}"]
    assert len(got) == len(probs)
    np.testing.assert_allclose(got.scores, probs, atol=1e-5)
    np.testing.assert_allclose(got.boxes, boxes, atol=2e-3)
    np.testing.assert_allclose(got.landmarks, points, atol=2e-3)


@pytest.mark.parametrize("name", DETECTORS.names())
def test_every_detector_finds_the_five_faces(name: str, media: Path) -> None:
    from abawfeat.video.detectors import build_detector

    got = build_detector(name).detect(frame(media / "multi_face.jpg", 0))[0]
    assert len(got) == 5 and (got.scores > 0.9).all()
    # Landmarks lie inside their boxes, eyes above the mouth, left eye left of the right eye.
    for box, pts in zip(got.boxes, got.landmarks, strict=True):
        assert (pts[:, 0] > box[0]).all() and (pts[:, 0] < box[2]).all()
        assert pts[0, 1] < pts[3, 1] and pts[1, 1] < pts[4, 1] and pts[0, 0] < pts[1, 0]


def test_a_batch_of_frames_equals_one_frame_at_a_time(detector, media: Path) -> None:  # type: ignore[no-untyped-def]
    import av

    with av.open(str(media / "face_noface.mov")) as c:
        decoded = itertools.islice(c.decode(video=0), 150)
        frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(decoded) if i % 30 == 0]
    batch = detector.detect(np.stack(frames))
    for img, b in zip(frames, batch, strict=True):
        one = detector.detect(img)[0]
        assert len(one) == len(b)
        np.testing.assert_allclose(one.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(one.landmarks, b.landmarks, atol=1e-3)
    assert len(batch[0]) == 1  # the face is there at the start, gone by frame 150 (the reference says so too)


def test_state_dicts_load_strictly_with_weights_only(media: Path) -> None:
    from abawfeat.video import mtcnn

    files = mtcnn.weight_files(None)
    for net, cls in (("pnet", mtcnn.PNet), ("rnet", mtcnn.RNet), ("onet", mtcnn.ONet)):
        state = torch.load(files[net], weights_only=True)
        assert set(state) == set(cls().state_dict())


def test_missing_weights_offline_is_one_line_saying_where(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from abawfeat.video import mtcnn

    monkeypatch.setenv("ABAWFEAT_HOME", str(tmp_path))
    monkeypatch.setenv("ABAWFEAT_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        mtcnn.weight_files(None)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "weights" / "mtcnn" / "pnet.pt") in message
    assert "python -m abawfeat.video.assets fetch" in message


def test_a_weights_folder_and_a_wrong_file(tmp_path: Path, media: Path) -> None:
    from abawfeat.video import mtcnn
    from abawfeat.video.detectors import build_detector

    files = mtcnn.weight_files(None)
    for net, path in files.items():
        (tmp_path / f"{net}.pt").write_bytes(path.read_bytes())
    assert build_detector("mtcnn", weights=str(tmp_path)).provenance["weights_sha256"]["pnet"]
    (tmp_path / "onet.pt").write_bytes((tmp_path / "rnet.pt").read_bytes())  # the wrong network's weights
    with pytest.raises(CheckpointError, match="onet.pt: does not fit ONet"):
        build_detector("mtcnn", weights=str(tmp_path))
    (tmp_path / "rnet.pt").unlink()
    with pytest.raises(CheckpointError, match="lacks rnet.pt"):
        build_detector("mtcnn", weights=str(tmp_path))


def test_crops_from_cumulative_sums_equal_box_by_box_resizing(media: Path) -> None:
    # The GPU path (all crops from integral images) and the CPU path (each box's own area resize) agree.
    from abawfeat.video import mtcnn

    img = torch.from_numpy(frame(media / "multi_face.jpg", 0).copy()).permute(2, 0, 1)[None]
    boxes = torch.tensor([[300.3, 220.0, 420.9, 370.2], [-12.0, 5.5, 40.0, 61.0],
                          [900.0, 600.0, 1100.0, 700.0], [10.0, 10.0, 14.0, 13.0]])
    which = torch.zeros(len(boxes), dtype=torch.int64)
    for size in (24, 48):
        fast, ok_fast = mtcnn._crops(mtcnn._integral(img), which, boxes, size)
        slow, ok_slow = mtcnn._crops(None, which, boxes, size, img)
        assert ok_fast.tolist() == ok_slow.tolist() == [True] * 4
        np.testing.assert_allclose(fast.numpy(), slow.numpy(), atol=1e-5)
