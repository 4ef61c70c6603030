"""Fault cases of stage one and of the data it reads: cache integrity, names, crops without annotations,
messages printed literally, and extract's lock and full disk. Each case makes the three assertions of
helpers.assert_fault on its own copy of the world (docs/failures.md)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import pytest

from .helpers import (
    ANN,
    CACHE,
    CROPS,
    DATA,
    N_CROPS,
    TEST_VIDEO,
    TRAIN,
    TRAIN_VIDEO,
    VAL_VIDEO,
    Case,
    Outcome,
    assert_fault,
    both,
    copy_file,
    fill,
    flip,
    flip_text,
    params,
    remove_annotations,
    rename,
    restamp,
    run_case,
    run_cli,
    snapshot,
    write_text,
    write_v1_cache,
)

EXTRACT = ("extract", "--backbone", "ddamfn", "--random-init", "--data", DATA, "--workers", "0",
           "--no-compile", "--device", "cpu")
TRAIN_VA = ("train-head", "--task", "va", "--data", DATA, "--out", "runs/new", *TRAIN)
SUMMARY = ("data", "summary", "--data", DATA)
VERIFY = ("cache", "verify", CACHE)
FEATURES = f"videos/{TRAIN_VIDEO}/features"
ONE_TWO = f"{TEST_VIDEO},{VAL_VIDEO}"  # the shortest videos: extraction cases stay quick


def _flip(dataset: str, at: int = 5) -> Callable[[Path], None]:
    return lambda root: flip(root / CACHE, dataset, at)


def _restamp(**attrs: object) -> Callable[[Path], None]:
    return lambda root: restamp(root / CACHE, **attrs)


def _corrupt_json(root: Path) -> None:
    restamp(root / CACHE, encoder_config='json:{"arch": "ddamfn", "classes"')


def _flip_attribute(root: Path) -> None:
    flip_text(root / CACHE, b"random-init", b"rAndom-init")


def _crop(video: str, name: str) -> Callable[[Path], None]:
    """Add a file named ``name`` to a crop folder: a copy of its first crop."""
    def damage(root: Path) -> None:
        folder = root / CROPS / video
        (folder / name).write_bytes(min(folder.glob("*.jpg")).read_bytes())

    return damage


def _drop_videos(*videos: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        with h5py.File(root / CACHE, "r+") as fh:
            for video in videos:
                del fh[f"videos/{video}"]
        restamp(root / CACHE)

    return damage


def _v1(root: Path) -> None:
    write_v1_cache(root / CACHE)


def _crops_only_extracted(root: Path, outcome: Outcome) -> None:
    from abawfeat.cache import FeatureCache
    from abawfeat.data import AffWild2

    data = AffWild2(root / DATA)
    with FeatureCache(root / "crops.h5") as cache:
        assert cache.videos() == sorted([TEST_VIDEO, VAL_VIDEO])
        for video in cache.videos():
            assert cache.frames(video).tolist() == data.crop_frames(video).tolist()


def _bare_crops(root: Path) -> None:
    """A user's own videos: crop folders directly under the data root, nothing else."""
    remove_annotations(root)
    (root / CROPS).rename(root / "mine")
    for folder in (root / DATA / "cropped_aligned_new_50_vids").iterdir():
        folder.rename(root / "mine" / folder.name)
    (root / "mine").rename(root / "bare")


def _bare_extracted(root: Path, outcome: Outcome) -> None:
    from abawfeat.cache import FeatureCache

    crops = sorted(int(p.stem) for p in (root / "bare" / TEST_VIDEO).glob("*.jpg"))
    with FeatureCache(root / "bare.h5") as cache:
        assert cache.videos() == [TEST_VIDEO] and cache.frames(TEST_VIDEO).tolist() == crops


RECIPE = "r.toml"
ABLATE = ("ablate", RECIPE, "--dry-run")
ROWS = '[[rows]]\nlabel = "FC"\nbackbone = "ddamfn"\nhead = "fc"\ntasks = ["va"]\n'

CASES = [
    # -- cache integrity: checksums, attributes, versions
    Case("verify-flipped-features", VERIFY, 1, (CACHE, f"/{FEATURES}: checksum mismatch"),
         _flip(FEATURES), channel="report"),
    Case("verify-flipped-frames", VERIFY, 1, (CACHE, f"/videos/{TRAIN_VIDEO}/frames: checksum mismatch"),
         _flip(f"videos/{TRAIN_VIDEO}/frames", at=2), channel="report"),
    Case("verify-flipped-logits", VERIFY, 1, (CACHE, f"/videos/{TEST_VIDEO}/logits: checksum mismatch"),
         _flip(f"videos/{TEST_VIDEO}/logits"), channel="report"),
    Case("verify-flipped-attribute-bytes", VERIFY, 1,
         (CACHE, "do not match their checksum (metadata_sha256)"), _flip_attribute, channel="report"),
    Case("verify-corrupt-attribute-json", VERIFY, 1, (CACHE, "attribute 'encoder_config' is not valid JSON"),
         _corrupt_json, channel="report"),
    Case("verify-not-hdf5", VERIFY, 1, (CACHE, "not a readable HDF5 file"), write_text(CACHE, "not hdf5"),
         channel="report"),
    Case("verify-version-1-has-no-checksums", VERIFY, 0,
         (CACHE, "format version 1 has no checksums to check"), _v1, channel="report"),
    Case("info-corrupt-attribute-json", ("cache", "info", CACHE), 2,
         (CACHE, "attribute 'encoder_config' is not valid JSON"), _corrupt_json),
    Case("info-flipped-attribute-bytes", ("cache", "info", CACHE), 2, (CACHE, "do not match their checksum"),
         _flip_attribute),
    Case("train-head-corrupt-attribute-json", TRAIN_VA, 2, (CACHE, "'encoder_config' is not valid JSON"),
         _corrupt_json),
    Case("train-head-flipped-features", TRAIN_VA, 2, (CACHE, f"/{FEATURES}: checksum mismatch"),
         _flip(FEATURES)),
    Case("train-head-feature-size-disagrees", TRAIN_VA, 2,
         (CACHE, "features are 512-d but the cache's feature_dim attribute says 256"),
         _restamp(feature_dim=256)),
    Case("train-head-cache-not-hdf5", TRAIN_VA, 2, (CACHE, "not a readable HDF5 file"),
         write_text(CACHE, "not hdf5")),
    Case("train-head-reads-version-1", (*TRAIN_VA[:-len(TRAIN)], "--out", "runs/v1", *TRAIN), 0, ("runs/v1",),
         _v1, channel="ok"),
    Case("extract-resume-corrupt-attribute-json", (*EXTRACT, "--videos", TEST_VIDEO), 2,
         (CACHE, "'encoder_config' is not valid JSON"),
         both(_corrupt_json, _drop_videos(TEST_VIDEO))),
    Case("extract-into-version-1-cache", (*EXTRACT, "--videos", TEST_VIDEO), 2,
         (CACHE, "cache format version 1", "--out"),
         both(_drop_videos(TEST_VIDEO), _v1)),
    # -- video names that could not appear in a submission row, at the first command that reads them
    Case("summary-video-name-with-space", SUMMARY, 2, (f"{CROPS}/video 44", "'video 44'", "whitespace"),
         rename(f"{CROPS}/{TRAIN_VIDEO}", "video 44")),
    Case("extract-video-name-with-comma", EXTRACT, 2, (f"{CROPS}/video,44", "'video,44'", "comma"),
         rename(f"{CROPS}/{TRAIN_VIDEO}", "video,44")),
    Case("summary-video-name-underscore", SUMMARY, 2, ("'_video44'", "starts with '.' or '_'"),
         rename(f"{CROPS}/{TRAIN_VIDEO}", "_video44")),
    Case("train-head-annotation-name-with-space", TRAIN_VA, 2,
         (f"{ANN}/VA_Estimation_Challenge/Train_Set/video 44.txt", "'video 44'"),
         rename(f"{ANN}/VA_Estimation_Challenge/Train_Set/{TRAIN_VIDEO}.txt", "video 44.txt")),
    Case("summary-test-list-name-with-space", SUMMARY, 2,
         (f"{DATA}/names_of_videos_in_each_test_set/Valence_Arousal_Estimation_Challenge_test_set_release.txt",
          "'video 28'"),
         write_text(f"{DATA}/names_of_videos_in_each_test_set/"
                    "Valence_Arousal_Estimation_Challenge_test_set_release.txt", "video 28\n")),
    Case("summary-sample-file-name-with-space", SUMMARY, 2,
         (f"{DATA}/prediction_files_format/CVPR_8th_ABAW_VA_test_set_sample.txt", "'my video'"),
         write_text(f"{DATA}/prediction_files_format/CVPR_8th_ABAW_VA_test_set_sample.txt",
                    "image_location,valence,arousal\nmy video/00001.jpg,0,0\n")),
    # -- crop file names: one rule (abawfeat.data.names.crop_frame) for data summary and extract
    Case("summary-crop-huge-number", SUMMARY, 2, (f"{CROPS}/{TRAIN_VIDEO}/99999999999.jpg", "too large"),
         _crop(TRAIN_VIDEO, "99999999999.jpg")),
    Case("summary-crop-frame-zero", SUMMARY, 2, (f"{CROPS}/{TRAIN_VIDEO}/00000.jpg", "frame 0"),
         _crop(TRAIN_VIDEO, "00000.jpg")),
    Case("summary-crop-negative", SUMMARY, 2, (f"{CROPS}/{TRAIN_VIDEO}/-3.jpg", "negative frame number"),
         _crop(TRAIN_VIDEO, "-3.jpg")),
    Case("summary-crop-not-a-number", SUMMARY, 2, (f"{CROPS}/{TRAIN_VIDEO}/frame7.jpg", "not a crop name"),
         _crop(TRAIN_VIDEO, "frame7.jpg")),
    Case("summary-crop-two-names-one-frame", SUMMARY, 2,
         (f"{CROPS}/{TRAIN_VIDEO}/1.jpg", "a second file for frame 1, beside 00001.jpg"),
         _crop(TRAIN_VIDEO, "1.jpg")),
    Case("summary-crop-upper-case-suffix", SUMMARY, 2, (f"{CROPS}/{TRAIN_VIDEO}/00099.JPG", "00099.jpg"),
         _crop(TRAIN_VIDEO, "00099.JPG")),
    Case("summary-crop-in-unannotated-video", SUMMARY, 2, (f"{CROPS}/{TEST_VIDEO}/7.jpg",),
         _crop(TEST_VIDEO, "7.jpg")),
    Case("summary-ignores-non-crop-files", SUMMARY, 0, (f"Crop folders: 6 videos, {N_CROPS} crops",),
         both(write_text(f"{CROPS}/{TRAIN_VIDEO}/Thumbs.db", "x"),
              write_text(f"{CROPS}/{TRAIN_VIDEO}/.DS_Store", "x"), _crop(TRAIN_VIDEO, "preview.png")),
         channel="ok"),
    Case("extract-crop-huge-number", EXTRACT, 2, (f"{CROPS}/{TRAIN_VIDEO}/4294967296.jpg", "too large"),
         _crop(TRAIN_VIDEO, "4294967296.jpg")),
    Case("extract-crop-two-names-one-frame", EXTRACT, 2,
         (f"{CROPS}/{TRAIN_VIDEO}/000001.jpg", "a second file for frame 1"),
         _crop(TRAIN_VIDEO, "000001.jpg")),
    Case("extract-crop-frame-zero", EXTRACT, 2, (f"{CROPS}/{TEST_VIDEO}/00000.jpg", "frame 0"),
         _crop(TEST_VIDEO, "00000.jpg")),
    # -- crops without annotations (issue 14, item 4)
    Case("extract-crops-without-annotations", (*EXTRACT, "--out", "crops.h5", "--videos", ONE_TWO), 0,
         ("crops.h5: 2 videos extracted",), remove_annotations, channel="ok", check=_crops_only_extracted),
    Case("extract-bare-crop-folders", (*EXTRACT[:5], "bare", *EXTRACT[6:], "--out", "bare.h5", "--videos",
                                       TEST_VIDEO), 0,
         ("bare.h5: 1 videos extracted",), _bare_crops, channel="ok", check=_bare_extracted),
    Case("summary-crops-without-annotations", SUMMARY, 0,
         (f"{DATA}: no annotations folder", f"6 videos with crops ({N_CROPS} crops)"), remove_annotations,
         channel="ok"),
    Case("train-head-crops-without-annotations", TRAIN_VA, 2, (DATA, "no annotations folder"),
         remove_annotations),
    # -- messages printed literally: brackets in paths and recipe sections survive
    Case("summary-brackets-in-missing-root", ("data", "summary", "--data", "aw[v2]/aff"), 2,
         ("aw[v2]/aff: data root not found",)),
    Case("summary-brackets-in-existing-root", ("data", "summary", "--data", "aw[v2]"), 2,
         ("aw[v2]/cropped_aligned/video44_left/1.jpg",),
         both(rename(DATA, "aw[v2]"), copy_file("aw[v2]/cropped_aligned/video44_left/00001.jpg",
                                                "aw[v2]/cropped_aligned/video44_left/1.jpg"))),
    Case("info-brackets-in-path", ("cache", "info", "cache/aw[v2].h5"), 2,
         ("cache/aw[v2].h5: no such cache",)),
    Case("extract-brackets-in-data", (*EXTRACT[:5], "x[1]", *EXTRACT[6:]), 2, ("x[1]",)),
    Case("train-head-brackets-in-cache", (*TRAIN_VA, "--cache", "c[old].h5"), 2, ("c[old].h5",)),
    Case("ablate-recipe-section-kept", ABLATE, 2, (RECIPE, "[grid] unknown key 'epochz'"),
         write_text(RECIPE, '[grid]\nepochz = 3\n' + ROWS)),
    Case("ablate-recipe-defaults-section-kept", ABLATE, 2, (RECIPE, "[defaults]: unknown key 'lrr'"),
         write_text(RECIPE, '[defaults]\nlrr = 0.1\n' + ROWS)),
    Case("ablate-recipe-not-utf8", ABLATE, 2, (f"{RECIPE}:2", "not UTF-8"),
         write_text(RECIPE, b'[grid]\n# caf\xe9\n' + ROWS.encode())),
    # -- extract and a full disk (simulated: every atomic write fails with ENOSPC after the first n)
    # (provenance.json is the first write, then one part per video, then the consolidated file)
    Case("extract-disk-full-writing-a-part", (*EXTRACT, "--out", "new.h5", "--videos", ONE_TWO), 2,
         ("new.h5.parts/", "no space left on the device"), disk_full_after=2),
    Case("extract-disk-full-consolidating", (*EXTRACT, "--videos", TEST_VIDEO), 2,
         (CACHE, "no space left on the device", "kept"), _drop_videos(TEST_VIDEO), disk_full_after=2),
]


@pytest.mark.parametrize("case", params(CASES))
def test_stage_one_fault(case: Case, workspace: Path, full_disk: Callable[[int], object]) -> None:
    run_case(case, workspace, full_disk)


def test_extract_refuses_a_held_lock_before_loading_a_model(workspace: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A second extraction into a cache being written is refused at once: the lock is taken before any
    model is built (docs/cache-format.md), so building one here means the lock came too late."""
    import abawfeat.encoders

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the encoder was built before the cache's lock was checked")

    monkeypatch.setattr(abawfeat.encoders, "build_encoder", no_model)
    fd = os.open(workspace / f"{CACHE}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        before = snapshot(workspace)
        outcome = run_cli(EXTRACT)
    finally:
        os.close(fd)
    assert_fault(outcome, exit_code=2, names=(CACHE, "another extraction"), before=before, root=workspace)




def test_extract_into_a_real_full_tmpfs(workspace: Path, small_tmpfs: Callable[[int], Path]) -> None:
    """A real full device (tmpfs): extraction adds videos to a cache that lives there and runs out of space;
    the cache it started from, and everything else, is left as it was."""
    disk = small_tmpfs(1024)
    cache = disk / "cache.h5"
    cache.write_bytes((workspace / CACHE).read_bytes())
    with h5py.File(cache, "r+") as fh:
        for video in (TEST_VIDEO, VAL_VIDEO):
            del fh[f"videos/{video}"]
    restamp(cache)
    fill(disk, leave_kib=16)
    roots = {"": workspace, "tmpfs/": disk}
    before = snapshot(roots)
    outcome = run_cli((*EXTRACT, "--out", cache, "--videos", ONE_TWO))
    assert_fault(outcome, exit_code=2, names=(str(disk), "no space left on the device"), before=before,
                 root=roots)
    with h5py.File(cache, "r") as fh:
        assert len(fh["videos"]) == 4
