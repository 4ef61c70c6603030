"""The HDF5 feature cache: schema, atomic parts and consolidation, lock, resume, provenance, verify."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from abawfeat.cache import (
    FORMAT_VERSION,
    CacheWriter,
    FeatureCache,
    cache_info,
    default_cache_path,
    fingerprint_of,
    make_provenance,
    parts_dir,
    verify_cache,
)
from abawfeat.errors import CacheError

DIM = 8


def prov(seed: int = 0, dtype: str = "float16", **extra: object) -> dict:
    enc = {
        "name": "toy",
        "config": {"dim": DIM, "seed": seed},
        "weights_sha256": "random-init",
        "preprocessing": {"size": 4, "mean": [0.5] * 3, "std": [0.5] * 3},
        "calibration": {"frames": 3},
    }
    return make_provenance(enc, feature_dim=DIM, dtype=dtype, precision="fp32", extract_config=dict(extra))


def video_arrays(i: int, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    frames = np.arange(1, n + 1, dtype=np.int32) * 2  # gaps, as crops have where no face was found
    return frames, rng.normal(size=(n, DIM)).astype(np.float32)


def test_default_path_is_dataset_then_backbone() -> None:
    assert default_cache_path("Aff-Wild2", "ddamfn") == Path("cache/Aff-Wild2/ddamfn.h5")


def test_schema_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    with CacheWriter(out, prov()) as w:
        f, x = video_arrays(0)
        w.write_video("vid_a", f, x, logits=np.ones((5, 3)), bad_frames=[3, 1])
        w.write_video("vid_b", *video_arrays(1))
        w.set_text_embeddings(["Neutral", "Anger"], np.eye(2, DIM), template="a photo of a {} face")
    assert not parts_dir(out).exists()  # consolidated, parts gone

    with h5py.File(out) as fh:
        assert fh["videos/vid_a/features"].dtype == np.float16
        assert fh["videos/vid_a/frames"].dtype == np.int32
        assert fh["videos/vid_a/bad_frames"][()].tolist() == [1, 3]
        assert fh.attrs["format_version"] == FORMAT_VERSION
        assert fh.attrs["weights_sha256"] == "random-init"

    with FeatureCache(out) as cache:
        assert cache.videos() == ["vid_a", "vid_b"]
        assert cache.encoder == "toy" and cache.feature_dim == DIM
        np.testing.assert_array_equal(cache.frames("vid_a"), f)
        got = cache.features("vid_a")
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, x, rtol=1e-3, atol=1e-3)
        assert cache.logits("vid_a").shape == (5, 3) and cache.logits("vid_b") is None
        names, emb = cache.text_embeddings()
        assert names == ["Neutral", "Anger"] and emb.shape == (2, DIM)
        assert cache.text_template() == "a photo of a {} face"
        loaded = cache.load_all()
        assert loaded["vid_b"][1].dtype == np.float16  # stored dtype kept, no silent fp32 doubling
        assert set(cache.load_all(["vid_b"])) == {"vid_b"}
        fp = cache.fingerprint()
        assert fp["encoder_config"] == {"dim": DIM, "seed": 0} and fp["calibration"] == {"frames": 3}
        assert "created" not in fp
    assert verify_cache(out) == []
    info = cache_info(out)
    assert info["videos"] == 2 and info["frames"] == 10 and info["bad_frames"] == 2


def test_video_invisible_until_consolidated_and_resume_sees_parts(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    with pytest.raises(RuntimeError), CacheWriter(out, prov()) as w:
        w.write_video("vid_a", *video_arrays(0))
        raise RuntimeError("crash")  # not Ctrl-C: parts are left as they are
    assert not out.exists() and (parts_dir(out) / "vid_a.h5").exists()
    with CacheWriter(out, prov()) as w:
        assert w.has_video("vid_a") and not w.has_video("vid_b")
        w.write_video("vid_b", *video_arrays(1))
    with FeatureCache(out) as cache:
        assert cache.videos() == ["vid_a", "vid_b"]


def test_ctrl_c_keeps_completed_videos(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    with pytest.raises(KeyboardInterrupt), CacheWriter(out, prov()) as w:
        w.write_video("vid_a", *video_arrays(0))
        raise KeyboardInterrupt
    with FeatureCache(out) as cache:
        assert cache.videos() == ["vid_a"]


def test_adding_videos_keeps_old_ones_and_creation_time(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    with CacheWriter(out, prov()) as w:
        w.write_video("vid_a", *video_arrays(0))
    created = FeatureCache(out).provenance["created"]
    later = prov(videos=["vid_b"])
    later["created"] = "2999-01-01T00:00:00"
    with CacheWriter(out, later) as w:
        assert w.has_video("vid_a")
        w.write_video("vid_b", *video_arrays(1))
    with FeatureCache(out) as cache:
        assert cache.videos() == ["vid_a", "vid_b"]
        assert cache.provenance["created"] == created
        assert cache.provenance["extract_config"] == {"videos": ["vid_b"]}


def test_provenance_mismatch_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    with CacheWriter(out, prov(seed=0)) as w:
        w.write_video("vid_a", *video_arrays(0))
    with pytest.raises(CacheError, match="encoder_config"), CacheWriter(out, prov(seed=1)):
        pass
    with pytest.raises(CacheError, match="dtype"), CacheWriter(out, prov(dtype="float32")):
        pass
    # Parts alone (no consolidated file yet) are protected too.
    out2 = tmp_path / "toy2.h5"
    with pytest.raises(RuntimeError), CacheWriter(out2, prov(seed=0)) as w:
        w.write_video("vid_a", *video_arrays(0))
        raise RuntimeError
    with pytest.raises(CacheError, match="different encoder configuration"), CacheWriter(out2, prov(seed=1)):
        pass


def test_weights_path_does_not_matter_when_the_hash_agrees(tmp_path: Path) -> None:
    def with_weights(path: str, sha: str) -> dict:
        enc = {"name": "toy", "config": {"weights": path, "dim": DIM}, "weights_sha256": sha,
               "weights_source": path, "preprocessing": {}, "calibration": None}
        return make_provenance(enc, feature_dim=DIM, dtype="float16", precision="fp32")

    out = tmp_path / "toy.h5"
    with CacheWriter(out, with_weights("w.pth", "a" * 64)) as w:
        w.write_video("vid_a", *video_arrays(0))
    with CacheWriter(out, with_weights("/elsewhere/w.pth", "a" * 64)) as w:  # same file, other path
        w.write_video("vid_b", *video_arrays(1))
    with FeatureCache(out) as cache:
        assert "weights" not in cache.fingerprint()["encoder_config"]
        assert cache.fingerprint() == fingerprint_of(with_weights("/x/y.pth", "a" * 64))
    with pytest.raises(CacheError, match="weights_sha256"), CacheWriter(out, with_weights("w.pth", "b" * 64)):
        pass


def test_second_writer_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    with CacheWriter(out, prov()):
        # A separate process, since flock is per open file (as a second `abawfeat extract` would be).
        code = textwrap.dedent(f"""
            import sys
            from abawfeat.cache import CacheWriter
            from abawfeat.errors import CacheError
            try:
                with CacheWriter({str(out)!r}, {prov()!r}):
                    pass
            except CacheError as exc:
                print(exc); sys.exit(3)
        """)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 3, proc.stderr
        assert "another extraction is writing" in proc.stdout
    with CacheWriter(out, prov()):  # released on exit
        pass


def test_write_video_rejects_inconsistent_input(tmp_path: Path) -> None:
    with CacheWriter(tmp_path / "toy.h5", prov()) as w:
        f, x = video_arrays(0)
        with pytest.raises(ValueError, match="ascending"):
            w.write_video("v", f[::-1], x)
        with pytest.raises(ValueError, match="do not match"):
            w.write_video("v", f, x[:, :3])
        with pytest.raises(CacheError, match="NaN/inf"):
            w.write_video("v", f, x * 1e6)  # overflows float16
        with pytest.raises(ValueError, match="both"):
            w.write_video("v", f, x, bad_frames=[int(f[0])])


def _make(out: Path, n: int = 3) -> None:
    with CacheWriter(out, prov()) as w:
        for i in range(n):
            w.write_video(f"vid_{i}", *video_arrays(i))


def test_verify_catches_nan_missing_dataset_bad_dtype_and_order(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    _make(out)
    with h5py.File(out, "r+") as fh:
        fh["videos/vid_0/features"][1, 2] = np.nan
        del fh["videos/vid_1/frames"]
        frames = fh["videos/vid_2/frames"][()]
        del fh["videos/vid_2/frames"]
        fh["videos/vid_2/frames"] = frames[::-1].astype(np.int64)
        del fh.attrs["weights_sha256"]
    problems = verify_cache(out)
    text = "\n".join(problems)
    assert "vid_0/features: 1 NaN/inf" in text
    assert "vid_1: missing dataset frames" in text
    assert "vid_2/frames: expected int32" in text and "vid_2/frames: not 1-based strictly ascending" in text
    assert "provenance lacks weights_sha256" in text
    assert all("\n" not in p for p in problems)


def test_verify_catches_incomplete_video_and_wrong_feature_dtype(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    _make(out, 2)
    with h5py.File(out, "r+") as fh:
        fh["videos/vid_0"].attrs["n_crops"] = 9
        x = fh["videos/vid_1/features"][()]
        del fh["videos/vid_1/features"]
        fh["videos/vid_1/features"] = x.astype(np.float32)
    text = "\n".join(verify_cache(out))
    assert "vid_0: incomplete" in text
    assert "vid_1/features: dtype float32, provenance says float16" in text


def test_reader_refuses_non_cache_and_reports_parts(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    with h5py.File(junk, "w") as fh:
        fh["x"] = 1
    with pytest.raises(CacheError, match="not an abawfeat feature cache"):
        FeatureCache(junk)
    out = tmp_path / "toy.h5"
    with pytest.raises(RuntimeError), CacheWriter(out, prov()) as w:
        w.write_video("vid_a", *video_arrays(0))
        raise RuntimeError
    with pytest.raises(CacheError, match="unconsolidated"):
        FeatureCache(out)


def _snapshot(path: Path) -> dict:
    with FeatureCache(path) as cache:
        p = {k: v for k, v in cache.provenance.items() if k != "created"}
        return {
            "prov": json.dumps(p, sort_keys=True),
            "videos": {v: (cache.frames(v).tolist(), cache.features(v, None).tobytes(),
                           cache.bad_frames(v).tolist()) for v in cache.videos()},
        }


# A writer script that SIGKILLs itself at the n-th call of a chosen function: `replace` counts os.replace
# calls (provenance file, one per part, then the consolidated file; killing just before a rename leaves a
# temporary behind), `copy` the copying of parts into the consolidated file, `rmtree` the removal of the
# parts after the consolidated file is in place.
_KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    import h5py
    sys.path.insert(0, {tests!r})
    from test_cache import prov, video_arrays
    from abawfeat.cache import CacheWriter
    where, kill_at, calls = sys.argv[1], int(sys.argv[2]), [0]
    owner, name = {{"replace": (os, "replace"), "copy": (h5py.Group, "copy"),
                    "rmtree": (shutil, "rmtree")}}[where]
    real = getattr(owner, name)
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(owner, name, wrapped)
    with CacheWriter({out!r}, prov()) as w:
        for i in range(4):
            if not w.has_video(f"vid_{{i}}"):
                w.write_video(f"vid_{{i}}", *video_arrays(i))
""")


@pytest.mark.parametrize(
    ("where", "kill_at"),
    [("replace", 1), ("replace", 3), ("replace", 6), ("copy", 3), ("rmtree", 1)],
)
def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path, where: str, kill_at: int) -> None:
    ref = tmp_path / "ref.h5"
    with CacheWriter(ref, prov()) as w:
        for i in range(4):
            w.write_video(f"vid_{i}", *video_arrays(i))
    out = tmp_path / "out.h5"
    script = _KILLER.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script, where, str(kill_at)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Killed before the final rename, nothing is visible yet; killed after it, everything is.
    assert out.exists() == (where == "rmtree")
    proc = subprocess.run([sys.executable, "-c", script, "replace", "0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(out) == _snapshot(ref)
    assert verify_cache(out) == []
    assert not list(tmp_path.glob(".*.tmp")) and not parts_dir(out).exists()
