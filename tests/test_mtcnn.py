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


def test_crops_and_pyramid_levels_from_running_sums_equal_pytorchs_area_resize(media: Path) -> None:
    # Every R-/O-Net crop and every pyramid level comes from one integral image per frame; each must equal
    # PyTorch's own area resize (what the published code calls) of that box or that frame.
    from torch.nn import functional as F

    from abawfeat.video import mtcnn

    rgb = torch.from_numpy(frame(media / "multi_face.jpg", 0).copy())
    integral = mtcnn._integral(rgb[None])
    img = rgb.permute(2, 0, 1).float()
    h, w = img.shape[1:]
    boxes = torch.tensor([[300.3, 220.0, 420.9, 370.2], [-12.0, 5.5, 40.0, 61.0],
                          [900.0, 600.0, 1100.0, 700.0], [10.0, 10.0, 14.0, 13.0]])
    which = torch.zeros(len(boxes), dtype=torch.int64)
    for size in (24, 48):
        crops, ok = mtcnn._crops(integral, which, boxes, size)
        assert ok.tolist() == [True] * 4
        for crop, (x0, y0, x1, y1) in zip(crops, boxes.trunc().long().tolist(), strict=True):
            ref = F.adaptive_avg_pool2d(img[:, max(y0, 1) - 1:min(y1, h), max(x0, 1) - 1:min(x1, w)], size)
            np.testing.assert_allclose(crop.numpy(), ((ref - 127.5) * 0.0078125).numpy(), atol=1e-6)
    for size in ((int(h * 0.6 + 1), int(w * 0.6 + 1)), (37, 61), (h, w), (h + 7, w + 3)):
        level = mtcnn._area_resize(integral, size)
        ref = F.interpolate(img[None], size=size, mode="area")
        assert level.shape == ref.shape
        np.testing.assert_allclose(level.numpy(), ref.numpy(), rtol=1e-6, atol=1e-4)
