"""DDAMFN: parity with the published network, checkpoint loading, named weights, random init + calibration."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from abawfeat.constants import AFFECTNET7_CLASSES, AFFECTNET8_CLASSES
from abawfeat.encoders import build_encoder
from abawfeat.encoders import ddamfn as D
from abawfeat.encoders import weights as W
from abawfeat.encoders.base import tensor_sha256
from abawfeat.encoders.ddamfn import (
    DDAMFNEncoder,
    DDAMFNNet,
    load_ddamfn_net,
    read_state_dict,
    save_published_checkpoint,
)
from abawfeat.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def ckpt(fixtures_dir: Path) -> Path:
    return fixtures_dir / "ddamfn" / "ddamfn_official_format_random.pth"


@pytest.fixture(scope="module")
def reference(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "ddamfn" / "ddamfn_reference_outputs.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def encoder(ckpt: Path) -> DDAMFNEncoder:
    enc = build_encoder("ddamfn", weights=str(ckpt))
    assert isinstance(enc, DDAMFNEncoder)
    return enc


@pytest.fixture(scope="module")
def published_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["model_state_dict"]


def rel_err(actual: torch.Tensor | np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute deviation relative to the largest reference magnitude."""
    a = actual.detach().numpy() if isinstance(actual, torch.Tensor) else actual
    return float(np.abs(a - expected).max() / np.abs(expected).max())


# -- parity with the original network ---------------------------------------------------------------
def test_parity_with_published_network(encoder: DDAMFNEncoder, reference: dict[str, np.ndarray]) -> None:
    x = torch.from_numpy(reference["input_normalized_nchw"])
    with torch.no_grad():
        out = encoder.forward_with_maps(x)
        features, logits = encoder(x)
    assert rel_err(out.embedding, reference["embedding"]) < 1e-5
    assert rel_err(out.logits, reference["logits"]) < 1e-5
    assert rel_err(out.feature_map, reference["feature_map"]) < 1e-5
    assert torch.equal(features, out.embedding) and torch.equal(logits, out.logits)
    # The reference varies across images, so matching it is not a constant-output coincidence.
    assert reference["embedding"].std(axis=0).mean() > 0.1


def test_transform_reproduces_published_preprocessing(encoder: DDAMFNEncoder,
                                                      reference: dict[str, np.ndarray]) -> None:
    got = torch.stack([encoder.transform(img) for img in reference["images_uint8_nhwc"]])
    assert got.dtype == torch.float32 and got.shape == (6, 3, 112, 112)
    np.testing.assert_allclose(got.numpy(), reference["input_normalized_nchw"], rtol=0, atol=1e-6)
    batch = encoder.transform.normalize(torch.from_numpy(reference["images_uint8_nhwc"]).permute(0, 3, 1, 2))
    assert torch.equal(batch, got)


def test_channels_last_and_bf16_match_fp32(ckpt: Path, reference: dict[str, np.ndarray]) -> None:
    # Face-like inputs: on white noise this random-weight fixture is chaotic and rounding differences grow.
    x = torch.from_numpy(reference["input_normalized_nchw"])
    enc = build_encoder("ddamfn", weights=str(ckpt)).to(memory_format=torch.channels_last)
    with torch.no_grad():
        cl = enc(x.contiguous(memory_format=torch.channels_last))[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = enc(x.contiguous(memory_format=torch.channels_last))[0]
    assert rel_err(cl, reference["embedding"]) < 1e-4
    assert bf.dtype == torch.bfloat16
    assert rel_err(bf.float(), reference["embedding"]) < 0.1


def test_head_maps_and_attention_loss(encoder: DDAMFNEncoder, reference: dict[str, np.ndarray]) -> None:
    x = torch.from_numpy(reference["input_normalized_nchw"][:2])
    with torch.no_grad():
        out = encoder.forward_with_maps(x)
        maps = encoder.head_maps(x)
    assert len(maps) == encoder.net.num_head == 2
    assert all(m.shape == (2, 512, 7, 7) for m in maps)
    assert all(((m >= 0) & (m <= 1)).all() for m in maps)  # products of sigmoids
    # GDConv reads the map weighted by the element-wise max of the heads.
    again = encoder.net.Linear(out.feature_map * torch.max(maps[0], maps[1])).flatten(1)
    torch.testing.assert_close(again, out.embedding)
    # What fine-tuning feeds the published attention-diversity loss.
    from abawfeat.losses import attention_diversity_loss

    loss = attention_diversity_loss(maps)
    assert loss.ndim == 0 and torch.isfinite(loss) and float(loss) > 0


# -- loading ------------------------------------------------------------------------------------------
def test_provenance_records_the_file(encoder: DDAMFNEncoder, ckpt: Path) -> None:
    prov = encoder.provenance()
    assert prov["weights_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert prov["weights_source"] == f"file:{ckpt.name}"  # no directory: the cache must survive moves
    assert "weights" not in prov["config"] and "trust_pickle" not in prov["config"]
    assert prov["logit_names"] == list(AFFECTNET8_CLASSES)
    assert prov["config"]["num_class"] == 8 and prov["calibration"] is None


def test_bare_and_dataparallel_state_dicts_load(tmp_path: Path, published_state: dict[str, torch.Tensor],
                                               reference: dict[str, np.ndarray]) -> None:
    bare = tmp_path / "bare.pth"
    torch.save(published_state, bare)
    wrapped = tmp_path / "dp.pth"
    torch.save({"model_state_dict": {"module." + k: v for k, v in published_state.items()}}, wrapped)
    x = torch.from_numpy(reference["input_normalized_nchw"][:2])
    for path in (bare, wrapped):
        with torch.no_grad():
            emb = load_ddamfn_net(path)(x).embedding
        assert rel_err(emb, reference["embedding"][:2]) < 1e-5


def test_seven_classes_inferred_from_fc(tmp_path: Path, published_state: dict[str, torch.Tensor]) -> None:
    state = dict(published_state)
    for key in ("fc.weight", "fc.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        state[key] = state[key][:7].clone()
    path = tmp_path / "seven.pth"
    torch.save({"iter": 1, "model_state_dict": state}, path)
    enc = build_encoder("ddamfn", weights=str(path))
    assert enc.logit_names == AFFECTNET7_CLASSES
    assert enc.provenance()["config"]["num_class"] == 7
    with torch.no_grad():
        assert enc(torch.zeros(2, 3, 112, 112))[1].shape == (2, 7)


def test_unexpected_class_count_is_said_and_recorded(tmp_path: Path, published_state: dict[str, torch.Tensor],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    state = dict(published_state)
    for key in ("fc.weight", "fc.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        state[key] = state[key][:5].clone()
    path = tmp_path / "five.pth"
    torch.save({"iter": 1, "model_state_dict": state}, path)
    enc = build_encoder("ddamfn", weights=str(path))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "5 classes" in line]
    assert len(warnings) == 1 and str(path) in warnings[0] and "7" in warnings[0] and "8" in warnings[0]
    assert enc.logit_names is None and enc.provenance()["config"]["num_class"] == 5
    notes = enc.provenance()["notes"]
    assert len(notes) == 1 and "DDAMFN checkpoint with 5 classes" in notes[0]
    from abawfeat.cache import make_provenance  # what extraction writes into the cache

    cache_prov = make_provenance(enc.provenance(), feature_dim=512, dtype="float16", precision="fp32")
    assert cache_prov["encoder_provenance"]["notes"] == notes and cache_prov["logit_names"] is None
    # The published class counts say nothing and keep the provenance as it always was.
    assert "notes" not in build_encoder("ddamfn", random_init=True).provenance()


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_wrong_architecture_names_file_and_keys(tmp_path: Path, published_state: dict[str, torch.Tensor],
                                                damage: str) -> None:
    state = dict(published_state)
    if damage == "missing":
        del state["features.3.model.4.CA.conv2.weight"]
        key = "features.3.model.4.CA.conv2.weight"
    elif damage == "unexpected":
        state["features.9.conv.weight"] = torch.zeros(1)
        key = "features.9.conv.weight"
    else:
        state["Linear.conv.weight"] = torch.zeros(512, 1, 5, 5)
        key = "Linear.conv.weight"
    path = tmp_path / f"{damage}.pth"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(CheckpointError) as info:
        build_encoder("ddamfn", weights=str(path))
    message = str(info.value)
    assert str(path) in message and key in message and "\n" not in message


def test_not_a_ddamfn_checkpoint(tmp_path: Path) -> None:
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (garbage, tmp_path / "absent.pth"):
        with pytest.raises(CheckpointError, match=str(path)):
            read_state_dict(path)
    with pytest.raises(CheckpointError, match=f"{other}: not a DDAMFN checkpoint"):
        load_ddamfn_net(other)


def test_whole_model_pickle_needs_trust(tmp_path: Path, published_state: dict[str, torch.Tensor]) -> None:
    net = DDAMFNNet()
    net.load_state_dict(published_state)
    path = tmp_path / "whole_model.pth"
    torch.save(net, path)
    with pytest.raises(CheckpointError, match="trust_pickle") as info:
        build_encoder("ddamfn", weights=str(path))
    assert str(path) in str(info.value)
    enc = build_encoder("ddamfn", weights=str(path), trust_pickle=True)
    assert torch.equal(enc.net.fc.weight, published_state["fc.weight"])


def test_save_published_checkpoint_round_trip(tmp_path: Path, ckpt: Path, encoder: DDAMFNEncoder,
                                              published_state: dict[str, torch.Tensor]) -> None:
    tuned = build_encoder("ddamfn", weights=str(ckpt))
    with torch.no_grad():  # stands in for fine-tuning
        tuned.net.fc.bias.add_(1.0)
        tuned.net.cat_head1.CoordAtt.conv2.weight.mul_(0.5)
    path = save_published_checkpoint(tuned, tmp_path / "tuned.pth", iteration=7)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"iter", "model_state_dict", "optimizer_state_dict"} and raw["iter"] == 7
    assert list(raw["model_state_dict"]) == list(published_state)  # published names, published order
    again = build_encoder("ddamfn", weights=str(path))
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        for a, b in zip(again(x), tuned(x), strict=True):
            assert torch.equal(a, b)
    assert again.weights_sha256 != encoder.weights_sha256
    moved = tmp_path / "elsewhere" / "tuned.pth"
    moved.parent.mkdir()
    moved.write_bytes(path.read_bytes())
    assert build_encoder("ddamfn", weights=str(moved)).provenance() == again.provenance()


# -- named weights ------------------------------------------------------------------------------------
def test_named_weights_offline_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABAWFEAT_HOME", str(tmp_path))
    monkeypatch.setenv("ABAWFEAT_OFFLINE", "1")
    named = D.NAMED_WEIGHTS["affectnet8"]
    with pytest.raises(CheckpointError) as info:
        build_encoder("ddamfn")  # the default weights are the published AffectNet-8 ones
    message = str(info.value)
    expected = tmp_path / "weights" / "ddamfn" / "affecnet8_epoch25_acc0.6469.pth"
    assert "cannot be downloaded here" in message
    assert f"put the file at {expected} (source: {named.url})" in message
    assert named.url.startswith("https://github.com/SainingZhang/DDAMFN/raw/")


def test_named_weights_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No ABAWFEAT_OFFLINE: the download is attempted and fails (no network here, or a dead address).
    monkeypatch.setenv("ABAWFEAT_HOME", str(tmp_path))
    monkeypatch.delenv("ABAWFEAT_OFFLINE", raising=False)
    named = D.NAMED_WEIGHTS["rafdb"]
    monkeypatch.setitem(D.NAMED_WEIGHTS, "rafdb", dataclasses.replace(named, url="http://127.0.0.1:9/rafdb.pth"))
    with pytest.raises(CheckpointError, match="cannot be downloaded here.*put the file at"):
        build_encoder("ddamfn", weights="rafdb")
    assert not list((tmp_path / "weights" / "ddamfn").glob("*"))  # nothing half-written left behind


def test_unknown_name_and_missing_path() -> None:
    with pytest.raises(CheckpointError, match="affectnet8"):
        build_encoder("ddamfn", weights="affectnet9")
    with pytest.raises(CheckpointError, match="no such weights file"):
        build_encoder("ddamfn", weights="/nowhere/ddamfn.pth")


def _fake_published(monkeypatch: pytest.MonkeyPatch, ckpt: Path, **changes: object) -> W.NamedWeights:
    """Pretend the fixture is the published affectnet8 file (same checksum, served from a file:// URL)."""
    fields: dict[str, object] = {"url": ckpt.resolve().as_uri(), "git_blob_sha1": W.git_blob_sha1(ckpt)}
    named = dataclasses.replace(D.NAMED_WEIGHTS["affectnet8"], **{**fields, **changes})
    monkeypatch.setitem(D.NAMED_WEIGHTS, "affectnet8", named)
    return named


def test_named_weights_download_verify_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 ckpt: Path, encoder: DDAMFNEncoder) -> None:
    monkeypatch.setenv("ABAWFEAT_HOME", str(tmp_path))
    monkeypatch.delenv("ABAWFEAT_OFFLINE", raising=False)
    named = _fake_published(monkeypatch, ckpt)
    enc = build_encoder("ddamfn", weights="affectnet8")
    cached = W.cached_path(named)
    assert cached.is_file() and cached.parent == tmp_path / "weights" / "ddamfn"
    assert enc.weights_sha256 == encoder.weights_sha256
    assert enc.weights_source == "named:affectnet8"
    monkeypatch.setenv("ABAWFEAT_OFFLINE", "1")  # now served from the cache, no network needed
    assert build_encoder("ddamfn", weights="affectnet8").weights_sha256 == enc.weights_sha256


def test_named_weights_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ckpt: Path) -> None:
    monkeypatch.setenv("ABAWFEAT_HOME", str(tmp_path))
    monkeypatch.delenv("ABAWFEAT_OFFLINE", raising=False)
    named = _fake_published(monkeypatch, ckpt, git_blob_sha1="0" * 40)
    with pytest.raises(CheckpointError, match="not the published affectnet8"):
        build_encoder("ddamfn", weights="affectnet8")
    assert not W.cached_path(named).exists()
    # A wrong file put at the cache path by hand is refused too, with what to do about it.
    W.cached_path(named).parent.mkdir(parents=True, exist_ok=True)
    W.cached_path(named).write_bytes(ckpt.read_bytes())
    with pytest.raises(CheckpointError, match="delete it"):
        build_encoder("ddamfn", weights="affectnet8")


def test_named_weights_recorded_checksum_urls() -> None:
    for named in D.NAMED_WEIGHTS.values():
        assert named.url.endswith(named.filename) and named.git_blob_sha1 is not None
        assert named.logit_names == (AFFECTNET8_CLASSES if named.num_class == 8 else AFFECTNET7_CLASSES)


# -- random init and calibration ----------------------------------------------------------------------
def smooth_frames(n: int, seed: int) -> torch.Tensor:
    """uint8 [n, 3, 112, 112] images of smooth random colour fields (stand-ins for face crops)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 7, 7, generator=g)
    return (F.interpolate(low, size=112, mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def test_random_init_is_seeded_and_recorded() -> None:
    a = build_encoder("ddamfn", random_init=True, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    b = build_encoder("ddamfn", random_init=True, seed=3)
    c = build_encoder("ddamfn", random_init=True, seed=4)
    b_state = b.state_dict()
    assert all(torch.equal(v, b_state[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.net.fc.weight, c.net.fc.weight)
    prov = a.provenance()
    assert prov["weights_sha256"] == "random-init" and prov["config"]["seed"] == 3
    with pytest.raises(ConfigError):
        build_encoder("ddamfn", random_init=True, weights="affectnet8")


def test_calibration_brings_random_features_to_life(encoder: DDAMFNEncoder) -> None:
    enc = build_encoder("ddamfn", random_init=True, calibration_chunk=4)
    frames = enc.transform.normalize(smooth_frames(9, 0))  # chunks of 4 + 5: a last single frame joins in
    probe = enc.transform.normalize(smooth_frames(4, 1))
    with torch.no_grad():
        before = enc(probe)[0].std(dim=0).mean().item()
    enc.calibrate(frames)
    assert not enc.training
    with torch.no_grad():
        after = enc(probe)[0].std(dim=0).mean().item()
    assert before < 1e-4 and after > 1e3 * before, (before, after)
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    enc.calibrate(frames)  # same frames -> the very same weights
    assert all(torch.equal(state[k], v) for k, v in enc.state_dict().items())
    assert enc.provenance()["calibration"] == {
        "method": "batchnorm-recalibration", "frames": 9, "frames_sha256": tensor_sha256(frames), "chunk": 4,
    }
    with pytest.raises(ConfigError, match="random-init"):
        encoder.calibrate(frames)  # published weights are never recalibrated
    with pytest.raises(ConfigError):
        enc.calibrate(frames[:1])


def test_transform_pickles(encoder: DDAMFNEncoder) -> None:
    clone = pickle.loads(pickle.dumps(encoder.transform))
    img = smooth_frames(1, 5)[0].permute(1, 2, 0).numpy()
    assert torch.equal(clone(img), encoder.transform(img))


def test_compiled_extraction_model_keeps_fp32_parity(ckpt: Path, reference: dict[str, np.ndarray]) -> None:
    # What `abawfeat extract` runs on large DDAMFN jobs by default: uint8 pixels in, normalised inside the
    # graph, torch.compile with inductor's freezing (batch norms folded, weights pre-packed as constants). It
    # must still reproduce the published network.
    from abawfeat.extract import ExtractConfig, _prepare_model
    from abawfeat.utils.compiling import CompiledWithFallback

    enc = build_encoder("ddamfn", weights=str(ckpt)).eval()
    config = ExtractConfig(backbone="ddamfn", data=ckpt.parent, compile=True, precision="fp32")
    model = _prepare_model(enc, torch.device("cpu"), config)
    assert isinstance(model, CompiledWithFallback)
    pixels = torch.from_numpy(reference["images_uint8_nhwc"]).permute(0, 3, 1, 2)  # as _stream sends them
    with torch.no_grad():
        features, logits = model(pixels)
    assert not model.failed, "torch.compile fell back to eager: the compiled path was not tested"
    assert rel_err(features, reference["embedding"]) < 1e-5
    assert rel_err(logits, reference["logits"]) < 1e-5
