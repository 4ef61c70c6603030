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
    assert "vid_2/frames: expected int32" in text and "vid_2/frames: not in ascending order" in text
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


# ------------------------------------------------------------------------------------------ integrity (v2)


def _full(out: Path) -> None:
    """Every kind of dataset: features, frames, bad_frames (one empty), logits, and /text."""
    with CacheWriter(out, prov()) as w:
        f, x = video_arrays(0)
        w.write_video("vid_a", f, x, logits=np.ones((5, 3)), bad_frames=[3, 1])
        w.write_video("vid_b", *video_arrays(1))
        w.set_text_embeddings(["Neutral", "Anger"], np.eye(2, DIM), template="a photo of a {} face")


def _flip(path: Path, dataset: str, at: int = 3) -> None:
    """Flip one byte of a dataset's stored data, in the file, as a bad disk or a bad copy would."""
    with h5py.File(path, "r") as fh:
        ds = fh[dataset]
        offset = ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + at] ^= 0x5A
    path.write_bytes(bytes(raw))


def _restamp(path: Path, **attrs: object) -> None:
    """Set root attributes and a matching digest: what a buggy writer (not a damaged disk) would leave."""
    from abawfeat.cache import CHECKSUM_ATTR, metadata_digest

    with h5py.File(path, "r+") as fh:
        for key, value in attrs.items():
            fh.attrs[key] = value
        fh.attrs[CHECKSUM_ATTR] = metadata_digest(fh)


def test_every_dataset_is_checksummed(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    _full(out)
    seen = []

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            seen.append(name)
            if obj.dtype.kind != "O":  # variable-length strings cannot be filtered: the digest covers them
                assert obj.fletcher32, name

    with h5py.File(out) as fh:
        fh.visititems(visit)
        assert fh.attrs["format_version"] == 2 and len(fh.attrs["metadata_sha256"]) == 64
    assert {"videos/vid_b/bad_frames", "videos/vid_a/logits", "text/embeddings", "text/names"} <= set(seen)
    assert verify_cache(out) == []
    with h5py.File(out, "r+") as fh:  # a dataset rewritten without the filter is found out
        x = fh["videos/vid_b/features"][()]
        del fh["videos/vid_b/features"]
        fh["videos/vid_b/features"] = x
    assert verify_cache(out) == [f"{out}: /videos/vid_b/features: stored without its checksum (fletcher32)"]


@pytest.mark.parametrize("dataset", ["videos/vid_a/features", "videos/vid_a/frames",
                                     "videos/vid_a/bad_frames", "videos/vid_a/logits", "text/embeddings"])
def test_flipped_bytes_fail_verify_and_the_reader(tmp_path: Path, dataset: str) -> None:
    out = tmp_path / "toy.h5"
    _full(out)
    _flip(out, dataset)
    problems = verify_cache(out)
    assert len(problems) == 1 and f"/{dataset}: checksum mismatch" in problems[0], problems
    with FeatureCache(out) as cache:
        read = {"features": lambda: cache.features("vid_a"), "frames": lambda: cache.frames("vid_a"),
                "bad_frames": lambda: cache.bad_frames("vid_a"), "logits": lambda: cache.logits("vid_a"),
                "embeddings": cache.text_embeddings}[dataset.rsplit("/", 1)[1]]
        with pytest.raises(CacheError, match="checksum mismatch, the file is damaged") as caught:
            read()
        assert "\n" not in str(caught.value) and str(out) in str(caught.value)
        if dataset.endswith("features"):
            with pytest.raises(CacheError, match="vid_a/features: checksum mismatch"):
                cache.load_all()
        cache.features("vid_b")  # the other video is intact and still readable


def test_flipped_attribute_bytes_fail_the_digest(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    _full(out)
    raw = bytearray(out.read_bytes())
    at = raw.find(b'"seed": 0')  # inside the JSON text of the encoder_config attribute
    assert at > 0
    raw[at + 8] = ord("7")
    out.write_bytes(bytes(raw))
    problems = verify_cache(out)
    assert len(problems) == 1 and "do not match their checksum (metadata_sha256)" in problems[0]
    with pytest.raises(CacheError, match="do not match their checksum"):
        FeatureCache(out)
    with pytest.raises(CacheError, match="do not match their checksum"), CacheWriter(out, prov()):
        pass  # the resume path of extract opens the cache the same way


def test_corrupt_attribute_json_is_one_line_everywhere(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    _full(out)
    _restamp(out, encoder_config='json:{"dim": 8, "seed"')
    problems = verify_cache(out)
    assert problems == [f"{out}: attribute 'encoder_config' is not valid JSON (Expecting ':' delimiter at "
                        "character 22); the file is damaged or was edited outside abawfeat"]
    opens = (lambda: FeatureCache(out), lambda: cache_info(out), lambda: CacheWriter(out, prov()).__enter__())
    for open_it in opens:
        with pytest.raises(CacheError, match="'encoder_config' is not valid JSON"):
            open_it()


def test_feature_size_attribute_that_disagrees_with_the_data(tmp_path: Path) -> None:
    out = tmp_path / "toy.h5"
    _full(out)
    _restamp(out, feature_dim=DIM + 4)
    with FeatureCache(out) as cache:
        said = f"features are {DIM}-d but the cache's feature_dim attribute says {DIM + 4}"
        for read in (lambda: cache.features("vid_a"), cache.load_all, lambda: cache.frames("vid_b")):
            with pytest.raises(CacheError, match=said):
                read()
    assert any("features: shape (5, 8), expected (5, 12)" in p for p in verify_cache(out))
    _restamp(out, feature_dim="wide")
    with pytest.raises(CacheError, match="'feature_dim' is 'wide', not a positive integer"):
        FeatureCache(out)


def _write_v1(out: Path) -> None:
    """A cache as abawfeat wrote it before checksums: contiguous datasets, format_version 1, no digest."""
    from abawfeat.cache import _set_root_attrs

    p = dict(prov(), format_version=1)
    f, x = video_arrays(0)
    with h5py.File(out, "w") as fh:
        _set_root_attrs(fh, p)
        g = fh.create_group("videos/vid_a")
        g["features"] = x.astype(np.float16)
        g["frames"] = f
        g["bad_frames"] = np.zeros(0, np.int32)
        g.attrs["n_crops"] = len(f)


def test_version_1_caches_still_load_and_are_never_added_to(tmp_path: Path) -> None:
    out = tmp_path / "v1.h5"
    _write_v1(out)
    with FeatureCache(out) as cache:
        assert cache.format_version == 1 and not cache.has_checksums
        assert cache.features("vid_a").shape == (5, DIM) and set(cache.load_all()) == {"vid_a"}
    assert verify_cache(out) == []
    assert cache_info(out)["checksums"] is False
    before = out.read_bytes()
    refused = "cache format version 1 .* cannot be added to; extract into another"
    with pytest.raises(CacheError, match=refused), CacheWriter(out, prov()):
        pass
    assert out.read_bytes() == before
    _restamp(out, format_version=7)
    with pytest.raises(CacheError, match="cache format version 7 is not supported by this abawfeat "
                                         r"\(it reads versions 1 and 2\)"):
        FeatureCache(out)
