"""Stage one end to end on hand-made crop trees, with a tiny registered encoder (and DDAMFN random-init once):
rows line up with frames, bad JPEGs are listed, resume, kill -9, Ctrl-C, lock, provenance, torchrun, CLI."""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from abawfeat.cache import FeatureCache, lock_path, parts_dir, verify_cache
from abawfeat.cli import app
from abawfeat.encoders import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderInfo,
    ImageTransform,
)
from abawfeat.errors import CacheError, ConfigError
from abawfeat.extract import (
    ExtractConfig,
    balance_videos,
    calibration_frames,
    format_summary,
    run_extraction,
)

TESTS = Path(__file__).parent


@dataclass
class FakeConfig:
    random_init: bool = False
    seed: int = 0
    weights: str | None = None


@ENCODERS.register("fake-test")
class FakeEncoder(Encoder):
    """A 16 x 16 toy network with DDAMFN's shape of contract: per-sample, deterministic, seeded, and with a
    calibration that changes its output (so a calibration on different frames shows in the features)."""

    config_class = FakeConfig
    summary = "test-only toy encoder"
    needs_calibration = True  # its calibrate() shifts the input: extraction must run it on random init

    def __init__(self, config: FakeConfig) -> None:
        super().__init__(config)
        self.transform = ImageTransform(16, IMAGENET_MEAN, IMAGENET_STD)
        self.feature_dim = 6
        self.logit_names = ("a", "b", "c")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.conv = nn.Conv2d(3, 6, 4, stride=4)
            self.fc = nn.Linear(6, 3)
        self.register_buffer("shift", torch.zeros(3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delay = float(os.environ.get("FAKE_ENCODER_DELAY", "0"))
        if delay:
            time.sleep(delay)  # lets the kill test catch the run in the middle
        interrupt_after = int(os.environ.get("FAKE_ENCODER_INTERRUPT_AFTER", "0"))
        if interrupt_after:
            self._calls = getattr(self, "_calls", 0) + 1
            if self._calls > interrupt_after:
                raise KeyboardInterrupt
        feats = torch.relu(self.conv(x - self.shift)).mean(dim=(2, 3))
        return feats, self.fc(feats)

    def calibrate(self, images: torch.Tensor) -> None:
        self.shift.copy_(images.mean(dim=(0, 2, 3)).view(3, 1, 1))
        self.calibration = {"method": "mean-shift", "frames": int(images.shape[0])}

    @classmethod
    def describe(cls) -> EncoderInfo:
        # Registered for the whole test session, so `list_encoders()` elsewhere must be able to show it.
        return EncoderInfo(name=cls.name, feature_dim=6, input_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                           interpolation="bilinear", weights="random-init only", logit_names=("a", "b", "c"),
                           summary=cls.summary)


@dataclass
class FakeTextConfig(FakeConfig):
    prompt_template: str = "a face showing {emotion}"


@ENCODERS.register("fake-text")
class FakeTextEncoder(FakeEncoder):
    """The toy encoder with CLIP's extras: class prompts and their text embeddings."""

    config_class = FakeTextConfig

    def text_embeddings(self) -> tuple[list[str], torch.Tensor]:
        return ["a face showing joy", "a face showing anger"], torch.arange(12.0).view(2, 6)

    def provenance(self) -> dict:
        return {**super().provenance(), "prompt_classes": ["Happiness", "Anger"]}


def jpeg_bytes(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_tree(root: Path, videos: dict[str, list[int]], bad: dict[str, dict[int, str]] | None = None) -> Path:
    """An Aff-Wild2-shaped tree: an annotations folder and cropped_aligned/<video>/NNNNN.jpg. ``bad`` makes
    zero-byte, truncated or garbage JPEGs."""
    (root / "8th_ABAW_Annotations" / "VA_Estimation_Challenge" / "Train_Set").mkdir(parents=True)
    bad = bad or {}
    for v_index, (video, frames) in enumerate(sorted(videos.items())):
        folder = root / "cropped_aligned" / video
        folder.mkdir(parents=True)
        for frame in frames:
            data = jpeg_bytes(1000 * v_index + frame)
            kind = bad.get(video, {}).get(frame)
            if kind == "empty":
                data = b""
            elif kind == "truncated":
                data = data[: len(data) // 3]
            elif kind == "garbage":
                data = b"\xff\xd8 this is not a jpeg" * 10
            (folder / f"{frame:05d}.jpg").write_bytes(data)
    return root


VIDEOS = {
    "10-30-640x480": [1, 2, 3, 5, 6, 9],  # gaps: frames without a face have no crop
    "2-30-640x360_left": list(range(1, 12)),
    "2-30-640x360_right": [2, 3, 4],
    "video7": [1, 2, 3, 4, 5, 6, 7],
}
BAD = {"2-30-640x360_left": {4: "empty", 8: "truncated"}, "video7": {7: "garbage"}}


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "AffTiny", VIDEOS, BAD)


def config(tree: Path, out: Path, **kw: object) -> ExtractConfig:
    base = dict(backbone="fake-test", data=tree, out=out, random_init=True, batch_size=4, workers=0,
                device="cpu", progress=False, calibration_frames=8)
    base.update(kw)
    return ExtractConfig(**base)  # type: ignore[arg-type]


def snapshot(path: Path) -> dict:
    with FeatureCache(path) as cache:
        prov = {k: v for k, v in cache.provenance.items() if k != "created"}
        prov["extract_config"].pop("out")  # compared caches live at different paths
        return {
            "prov": json.dumps(prov, sort_keys=True),
            "videos": {v: (cache.frames(v).tolist(), cache.features(v, None).tobytes(),
                           cache.logits(v).tobytes(), cache.bad_frames(v).tolist()) for v in cache.videos()},
        }


def test_rows_match_frames_and_bad_jpegs_are_listed(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "fake.h5"
    result = run_extraction(config(tree, out, dtype="float32", batch_size=5))
    assert result.videos_done == 4 and result.frames == 27 - 3
    assert {v: [f for f, _ in items] for v, items in result.bad_frames.items()} == {
        "2-30-640x360_left": [4, 8], "video7": [7]}
    assert any("bad frame video7/00007.jpg" in line for line in format_summary(result))
    assert verify_cache(out) == []

    with FeatureCache(out) as cache:
        assert cache.videos() == sorted(VIDEOS)
        assert cache.frames("2-30-640x360_left").tolist() == [1, 2, 3, 5, 6, 7, 9, 10, 11]
        assert cache.bad_frames("2-30-640x360_left").tolist() == [4, 8]
        assert cache.frames("10-30-640x480").tolist() == VIDEOS["10-30-640x480"]
        assert cache.provenance["weights_sha256"] == "random-init"
        assert cache.provenance["extract_config"]["random_init"] is True
        # What ran, not "auto": a few crops are below the auto-compile size; the batch as asked.
        assert cache.provenance["extract_config"]["compile"] is False
        assert cache.provenance["extract_config"]["batch_size"] == 5
        assert cache.provenance["calibration"]["frames"]["count"] == 8
        assert cache.provenance["logit_names"] == ["a", "b", "c"]
        # Each stored row is the encoder's output for that very frame (batches crossed video boundaries).
        enc = FakeEncoder(FakeConfig(random_init=True))
        enc.shift.copy_(torch.zeros(3, 1, 1))
        enc.calibrate(torch.stack([enc.transform(Image.open(
            tree / "cropped_aligned" / v / f"{f:05d}.jpg").convert("RGB")) for v, f in
            calibration_frames(_dataset(tree), sorted(VIDEOS), 8) if (v, f) not in _bad_pairs()]))
        for video in cache.videos():
            frames = cache.frames(video)
            x = torch.stack([enc.transform(Image.open(tree / "cropped_aligned" / video / f"{f:05d}.jpg"))
                             for f in frames])
            want, logits = enc(x)
            np.testing.assert_allclose(cache.features(video), want.detach().numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(cache.logits(video), logits.detach().numpy(), rtol=1e-5, atol=1e-6)


def _dataset(tree: Path):  # noqa: ANN202
    from abawfeat.data import AffWild2

    return AffWild2(tree)


def _bad_pairs() -> set[tuple[str, int]]:
    return {(v, f) for v, frames in BAD.items() for f in frames}


def test_resume_skips_complete_videos_and_leaves_file_alone(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "fake.h5"
    first = run_extraction(config(tree, out, videos=("video7", "2-30-640x360_right")))
    assert first.videos_done == 2 and FeatureCache(out).videos() == ["2-30-640x360_right", "video7"]
    before = snapshot(out)["videos"]["video7"]
    second = run_extraction(config(tree, out))
    assert (second.videos_done, second.videos_skipped) == (2, 2)
    assert snapshot(out)["videos"]["video7"] == before
    mtime = out.stat().st_mtime_ns
    third = run_extraction(config(tree, out))
    assert (third.videos_done, third.frames) == (0, 0)
    assert out.stat().st_mtime_ns == mtime  # nothing new: the file is not rewritten


def test_random_init_calibration_ignores_videos_selection(tree: Path, tmp_path: Path) -> None:
    # Piecewise extraction (one video, then the rest) must equal a one-go run: same calibration frames.
    piecewise, whole = tmp_path / "piecewise.h5", tmp_path / "whole.h5"
    run_extraction(config(tree, piecewise, videos=("video7",)))
    run_extraction(config(tree, piecewise))
    run_extraction(config(tree, whole))
    assert snapshot(piecewise)["videos"] == snapshot(whole)["videos"]


def test_text_embeddings_stored_once(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "text.h5"
    run_extraction(config(tree, out, backbone="fake-text", videos=("video7",)))
    with FeatureCache(out) as cache:
        names, emb = cache.text_embeddings()
        assert names == ["Happiness", "Anger"] and emb.dtype == np.float32
        np.testing.assert_array_equal(emb, np.arange(12.0).reshape(2, 6))
        assert cache.text_prompts() == ["a face showing joy", "a face showing anger"]
        assert cache.text_template() == "a face showing {emotion}"
    mtime = out.stat().st_mtime_ns
    run_extraction(config(tree, out, backbone="fake-text", videos=("video7",)))
    assert out.stat().st_mtime_ns == mtime  # text already there: nothing to rewrite


def test_provenance_mismatch_is_refused(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "fake.h5"
    run_extraction(config(tree, out, videos=("video7",)))
    with pytest.raises(CacheError, match="different encoder configuration.*encoder_config"):
        run_extraction(config(tree, out, seed=1))
    with pytest.raises(CacheError, match="precision"):
        run_extraction(config(tree, out, precision="bf16"))
    run_extraction(config(tree, out, batch_size=3))  # run options may change between runs


def test_ctrl_c_keeps_completed_videos(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "fake.h5"
    # 5 batches of 4 frames: the first three videos (6 + 11 + 3 crops) are complete, video7 is not.
    monkeypatch.setenv("FAKE_ENCODER_INTERRUPT_AFTER", "5")
    with pytest.raises(KeyboardInterrupt):
        run_extraction(config(tree, out))
    kept = FeatureCache(out).videos()
    assert kept == ["10-30-640x480", "2-30-640x360_left", "2-30-640x360_right"]
    assert verify_cache(out) == [] and not parts_dir(out).exists()
    monkeypatch.delenv("FAKE_ENCODER_INTERRUPT_AFTER")
    ref = tmp_path / "ref.h5"
    run_extraction(config(tree, ref))
    run_extraction(config(tree, out))
    assert snapshot(out) == snapshot(ref)


def test_bf16_precision_is_applied_and_recorded(tree: Path, tmp_path: Path) -> None:
    fp32, bf16 = tmp_path / "fp32.h5", tmp_path / "bf16.h5"
    run_extraction(config(tree, fp32, dtype="float32", videos=("video7",)))
    run_extraction(config(tree, bf16, dtype="float32", videos=("video7",), precision="bf16"))
    with FeatureCache(fp32) as a, FeatureCache(bf16) as b:
        x, y = a.features("video7"), b.features("video7")
        assert b.provenance["precision"] == "bf16"
        assert not np.array_equal(x, y)  # autocast really ran in bf16 ...
        np.testing.assert_allclose(y, x, rtol=0.05, atol=0.02)  # ... and stays close to fp32


def test_balance_and_calibration_frames_are_deterministic(tree: Path) -> None:
    names = [f"v{i}" for i in range(7)]
    sizes = [100, 5, 60, 60, 7, 30, 1]
    shares = [balance_videos(names, sizes, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == names
    loads = [sum(sizes[names.index(v)] for v in s) for s in shares]
    assert loads == [100, 90, 73]  # longest first: 100 | 60+30 | 60+7+5+1 (round-robin would give 161)
    picks = calibration_frames(_dataset(tree), sorted(VIDEOS), 5)
    assert len(picks) == 5 and len({v for v, _ in picks}) >= 3  # spread over the dataset, not one video
    assert picks == calibration_frames(_dataset(tree), sorted(VIDEOS), 5)


# --------------------------------------------------------------------------------------------------- CLI


def cli(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def test_cli_extract_info_verify(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    res = cli("extract", "--backbone", "fake-test", "--random-init", "--data", str(tree), "--out", str(out),
              "--batch-size", "4", "--workers", "1", "--device", "cpu", "--videos", "video7,10-30-640x480")
    assert res.exit_code == 0, res.output
    assert "2 videos extracted" in res.output and "1 bad frames" in res.output
    res = cli("cache", "info", str(out), "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert (info["videos"], info["frames"], info["bad_frames"], info["feature_dim"]) == (2, 12, 1, 6)
    assert info["dtype"] == "float16" and info["fingerprint"]["encoder"] == "fake-test"
    res = cli("cache", "info", str(out))
    assert res.exit_code == 0 and "bad frames in video7: 7" in res.output
    res = cli("cache", "verify", str(out))
    assert res.exit_code == 0 and res.output.startswith("ok:")
    with h5py.File(out, "r+") as fh:
        fh["videos/video7/features"][0, 0] = np.inf
        del fh["videos/10-30-640x480/bad_frames"]
    res = cli("cache", "verify", str(out))
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 2 and "missing dataset bad_frames" in lines[0] and "NaN/inf" in lines[1]


def test_cli_errors_are_one_line(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    res = cli("extract", "--backbone", "fake-test", "--data", str(tree), "--out", str(out),
              "--videos", "nope")
    assert res.exit_code == 2 and "nope not found among the crop folders" in res.output
    res = cli("extract", "--backbone", "fake-test", "--data", str(tree), "--clip-model", "ViT-B-32")
    # The old flag still parses, says what it now means, and the encoder refuses the option it maps to.
    text = res.output.replace("\n", " ")
    assert res.exit_code == 2
    assert "--clip-model is deprecated; it now means --encoder-opt clip_model=ViT-B-32" in text
    assert "encoder 'fake-test' has no option clip_model (options: random_init, seed, weights)" in text
    res = cli("cache", "info", str(tmp_path / "missing.h5"))
    assert res.exit_code == 2 and "no such cache file" in res.output
    # A second writer on the same output: the lock is held (as by another running extraction).
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = cli("extract", "--backbone", "fake-test", "--random-init", "--data", str(tree),
                  "--out", str(out), "--workers", "0")
        assert res.exit_code == 2 and "another extraction is writing this cache" in res.output
        assert "Traceback" not in res.output
    finally:
        os.close(fd)


def test_second_extraction_is_refused_before_anything_expensive(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/cache-format.md: a second writer is refused at once. Building the encoder or scanning the crops
    # first would make the refusal wait for them (about 37 s with real models).
    import abawfeat.encoders
    from abawfeat.data.affwild2 import AffWild2

    touched: list[str] = []

    def must_not_run(what: str) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            touched.append(what)
            raise AssertionError(f"{what} ran before the lock was taken")
        return run

    monkeypatch.setattr(abawfeat.encoders, "build_encoder", must_not_run("build_encoder"))
    monkeypatch.setattr(AffWild2, "videos_with_crops", must_not_run("videos_with_crops"))
    monkeypatch.setattr(AffWild2, "crop_frames", must_not_run("crop_frames"))
    out = tmp_path / "locked.h5"
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = cli("extract", "--backbone", "fake-test", "--random-init", "--data", str(tree),
                  "--out", str(out), "--workers", "0")
    finally:
        os.close(fd)
    assert res.exit_code == 2 and "another extraction is writing this cache" in res.output
    assert touched == [] and "Traceback" not in res.output and "WARNING" not in res.output
    assert not out.exists() and not parts_dir(out).exists()


def test_full_disk_is_one_line_and_keeps_complete_videos(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The device fills up while the third video's part is written (the real atomic write, a patched HDF5
    # dataset creation raising ENOSPC as the kernel would).
    import errno

    out = tmp_path / "full.h5"
    args = ("extract", "--backbone", "fake-test", "--data", str(tree), "--out", str(out), "--workers", "0",
            "--batch-size", "4", "--device", "cpu")
    real = h5py.Group.create_dataset
    written: list[str] = []

    def create_dataset(self: Any, name: str, *a: Any, **kw: Any) -> Any:
        if name == "features":
            if len(written) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(self.name)
        return real(self, name, *a, **kw)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    res = cli(*args)
    monkeypatch.setattr(h5py.Group, "create_dataset", real)
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert str(parts_dir(out) / "2-30-640x360_right.h5") in lines[0]
    assert "no space left on the device while writing it" in lines[0]
    assert "kept: the 2 complete videos already in the cache" in lines[0] and "re-run" in lines[0]
    assert sorted(p.name for p in parts_dir(out).glob("*.h5")) == ["10-30-640x480.h5", "2-30-640x360_left.h5"]
    assert not list(parts_dir(out).glob(".*.tmp"))  # no half-written file left behind

    # With space again, the same command resumes and ends where an uninterrupted run ends.
    res = cli(*args)
    assert res.exit_code == 0 and "2 videos extracted, 2 already complete" in res.output.replace("\n", " ")
    ref = tmp_path / "ref.h5"
    run_extraction(ExtractConfig(backbone="fake-test", data=tree, out=ref, batch_size=4, workers=0,
                                 device="cpu", progress=False))
    assert snapshot(out)["videos"] == snapshot(ref)["videos"]


def test_config_errors(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        run_extraction(config(tree, tmp_path / "x.h5", precision="fp16"))
    with pytest.raises(ConfigError, match="batch-size"):
        run_extraction(config(tree, tmp_path / "x.h5", batch_size=0))


# ------------------------------------------------------------------------------------- crash and torchrun

# Runs the CLI in a fresh process with the toy encoder registered (importing this module does that).
_RUNNER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_extract  # noqa: F401  (registers fake-test)
    from abawfeat.cli import main
    sys.argv = ["abawfeat"] + sys.argv[1:]
    main()
""").format(tests=str(TESTS))


def _cli_args(tree: Path, out: Path, workers: int = 0) -> list[str]:
    return ["extract", "--backbone", "fake-test", "--random-init", "--data", str(tree), "--out", str(out),
            "--batch-size", "3", "--workers", str(workers), "--device", "cpu"]


def _cli_config(tree: Path, out: Path, workers: int = 0) -> ExtractConfig:
    """What ``_cli_args`` makes the CLI build, for an in-process reference with the same provenance."""
    return ExtractConfig(backbone="fake-test", data=tree, out=out, random_init=True, batch_size=3,
                         workers=workers, device="cpu")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, ABAWFEAT_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    videos = {f"vid{i:02d}": list(range(1, 7)) for i in range(12)}
    tree = make_tree(tmp_path / "AffKill", videos)
    ref, out = tmp_path / "ref.h5", tmp_path / "out.h5"
    run_extraction(_cli_config(tree, ref, workers=1))  # the same command, uninterrupted
    # DataLoader workers on, so a worker outliving its killed parent would show up as a stale lock.
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, *_cli_args(tree, out, workers=1)],
                            env=_env(FAKE_ENCODER_DELAY="0.05"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(parts_dir(out).glob("vid*.h5"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_parts = len(list(parts_dir(out).glob("vid*.h5")))
    assert 3 <= n_parts < 12 and not out.exists()
    done = subprocess.run([sys.executable, "-c", _RUNNER, *_cli_args(tree, out, workers=1)],
                          env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{12 - n_parts} videos extracted, {n_parts} already complete" in done.stdout.replace("\n", " ")
    assert snapshot(out) == snapshot(ref)


def test_torchrun_two_ranks_equals_single_process(tree: Path, tmp_path: Path) -> None:
    single, multi = tmp_path / "single.h5", tmp_path / "multi.h5"
    run_extraction(_cli_config(tree, single))
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         str(script), *_cli_args(tree, multi)],
        env=_env(), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot(multi) == snapshot(single)
    assert verify_cache(multi) == [] and not parts_dir(multi).exists()


def test_ddamfn_random_init_features_are_alive(tmp_path: Path) -> None:
    # The real encoder once, small: 112 x 112 crops, calibrated, features differ between images.
    root = tmp_path / "AffDD"
    (root / "8th_ABAW_Annotations" / "VA_Estimation_Challenge").mkdir(parents=True)
    for v, seed in (("a", 0), ("b", 100)):
        folder = root / "cropped_aligned" / v
        folder.mkdir(parents=True)
        for f in range(1, 5):
            (folder / f"{f:05d}.jpg").write_bytes(jpeg_bytes(seed + f, size=112))
    out = tmp_path / "dd.h5"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads spin badly when the test machine is shared; one is plenty here
    try:
        result = run_extraction(ExtractConfig(backbone="ddamfn", data=root, out=out, random_init=True,
                                              batch_size=4, workers=0, device="cpu", progress=False,
                                              calibration_frames=8))
    finally:
        torch.set_num_threads(threads)
    assert result.frames == 8
    with FeatureCache(out) as cache:
        x = cache.features("a")
        assert x.shape == (4, 512) and cache.logits("a").shape == (4, 8)
        assert float(x.std(axis=0).mean()) > 1e-3  # not the dead constant embedding of uncalibrated weights
        assert cache.fingerprint()["calibration"]["encoder"]["method"] == "batchnorm-recalibration"


def test_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cluster node without a C++ compiler cannot compile: the run goes on eagerly, says so, same features.
    import torch

    from abawfeat.utils import progress
    from abawfeat.utils.compiling import CompiledWithFallback

    warnings: list[str] = []
    monkeypatch.setattr(progress, "loud_warning", warnings.append)

    def broken_compile(module: Any, **_: Any) -> Any:
        def fail(*args: Any) -> Any:
            raise RuntimeError("no C++ compiler found\nsecond line")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = torch.nn.Linear(3, 2)
    model = CompiledWithFallback(net, doing="extracting", skip="--no-compile")
    x = torch.randn(4, 3)
    assert torch.equal(model(x), net(x)) and model.failed
    assert torch.equal(model(x), net(x))
    assert len(warnings) == 1  # said once, not per batch
    assert "torch.compile failed (RuntimeError: no C++ compiler found)" in warnings[0]
    assert "second line" not in warnings[0]


@pytest.mark.parametrize(("choice", "by_default", "frames", "expected"), [
    (None, True, 10_000, True),
    (None, True, 9_999, False),
    (None, False, 10**7, False),
    (False, True, 10**7, False),
    (True, False, 1, True),
])
def test_auto_compile_decision(tmp_path: Path, choice: bool | None, by_default: bool, frames: int,
                               expected: bool) -> None:
    from abawfeat import extract as ex

    assert ex.AUTO_COMPILE_MIN_FRAMES == 10_000
    encoder = type("E", (), {"compile_by_default": by_default})()
    config = ex.ExtractConfig(backbone="ddamfn", data=tmp_path, compile=choice)
    assert ex.resolve_compile(config, encoder, frames) is expected  # type: ignore[arg-type]


def test_default_batch_is_32_on_cpu_and_recorded(tree: Path, tmp_path: Path) -> None:
    # batch_size None = by device: 32 on CPU (activations stay in cache), recorded as the value used.
    out = tmp_path / "c.h5"
    result = run_extraction(config(tree, out, batch_size=None))
    assert result.frames == 27 - 3 and not result.compiled
    with FeatureCache(out) as cache:
        assert cache.provenance["extract_config"]["batch_size"] == 32


def test_pixel_input_normalises_exactly_as_the_transform(tree: Path) -> None:
    # Workers send resized uint8 crops; PixelInput normalises the batch in the main process (or inside the
    # compiled graph). Its input to the encoder must be the transform's output, bit for bit, in the
    # channels_last view extraction uses.
    from abawfeat.encoders.base import PixelInput
    from abawfeat.extract import collate_crops, decode_crop, decode_pixels

    seen: list[torch.Tensor] = []

    class Capture(nn.Module):
        transform = ImageTransform(16, IMAGENET_MEAN, IMAGENET_STD)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x

    paths = sorted((tree / "cropped_aligned" / "video7").glob("*.jpg"))[:5]
    items = [(i, *decode_pixels(p, Capture.transform)) for i, p in enumerate(paths)]
    indices, pixels, bad = collate_crops(items)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (5, 16, 16, 3) and bad == []
    x = pixels.permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=torch.channels_last)
    PixelInput(Capture())(x)
    want = torch.stack([decode_crop(p, Capture.transform)[0] for p in paths])
    assert torch.equal(seen[0], want)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
