"""Every registered encoder, one parametrised suite (timm-style): adding an encoder adds its tests.

Each encoder is built from its ``smoke_options()`` (random weights, small configs), so nothing here needs
downloaded weights. CLIP specifics and the ``abawfeat encoders`` command are tested at the end.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from abawfeat.constants import EXPR_CLASSES
from abawfeat.encoders import (
    ENCODERS,
    Encoder,
    EncoderInfo,
    ImageTransform,
    build_encoder,
    encoder_options,
    list_encoders,
    make_config,
)
from abawfeat.encoders import weights as W
from abawfeat.encoders.base import GENERIC_FIELDS
from abawfeat.errors import CheckpointError, ConfigError

# Every registered encoder is covered; test modules may register "fake-*" encoders of their own. The contract
# (weights, calibration, blocks, options) is tested for all of them; what is about images (transform,
# channels_last) for the face encoders, and the audio side in tests/test_audio_encoders.py.
NAMES = [name for name in ENCODERS.names() if not name.startswith("fake-")]
FACE = [name for name in NAMES if ENCODERS.get(name).modality == "face"]
PROVENANCE_KEYS = {"name", "config", "weights_source", "weights_sha256", "calibration", "preprocessing",
                   "feature_dim", "logit_names"}
_BUILT: dict[str, Encoder] = {}


def smoke(name: str) -> Encoder:
    """One shared smoke build per encoder (tests must not modify it)."""
    if name not in _BUILT:
        _BUILT[name] = build_encoder(name, **ENCODERS.get(name).smoke_options())
    return _BUILT[name]


def images(encoder: Encoder, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Normalised batch made with the encoder's own transform from varied, non-square RGB images."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        low = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((90 + 7 * i, 120), Image.Resampling.BILINEAR)
        out.append(encoder.transform(img))
    return torch.stack(out)


def test_registry_has_the_builtin_encoders() -> None:
    assert {"ddamfn", "clip"} <= set(FACE) and {"wav2vec2", "hubert", "wavlm"} <= set(NAMES) - set(FACE)


@pytest.mark.parametrize("name", FACE)
def test_forward_shapes_and_dtype(name: str) -> None:
    enc = smoke(name)
    x = images(enc)
    assert x.shape == (2, 3, enc.input_size, enc.input_size) and x.dtype == torch.float32
    with torch.no_grad():
        features, logits = enc(x)
        embedded = enc.embed(x)
    assert features.shape == (2, enc.feature_dim) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert torch.equal(embedded, features)
    if enc.logit_names is None:
        assert logits is None
    else:
        assert logits is not None and logits.shape == (2, len(enc.logit_names))
    assert not enc.training


@pytest.mark.parametrize("name", FACE)
def test_deterministic_and_batch_independent(name: str) -> None:
    enc = smoke(name)
    x = images(enc, seed=1)
    with torch.no_grad():
        a = enc(x)[0]
        b = enc(x)[0]
        single = enc(x[1:2])[0]
    assert torch.equal(a, b)
    # Eval mode: a frame's features do not depend on the rest of its batch (up to kernel rounding).
    torch.testing.assert_close(single[0], a[1], rtol=1e-4, atol=1e-5)
    rebuilt = build_encoder(name, **ENCODERS.get(name).smoke_options())
    with torch.no_grad():
        assert torch.equal(rebuilt(x)[0], a)  # seeded build: same weights, same features


@pytest.mark.parametrize("name", FACE)
def test_provenance(name: str) -> None:
    enc = smoke(name)
    prov = enc.provenance()
    assert set(prov) >= PROVENANCE_KEYS
    assert json.loads(json.dumps(prov)) == prov  # JSON-ready, no tuples or tensors left
    assert prov["name"] == name and prov["feature_dim"] == enc.feature_dim
    assert prov["weights_sha256"] == "random-init"
    pre = prov["preprocessing"]
    assert pre["size"] == enc.input_size and pre["mean"] == list(enc.mean) and pre["std"] == list(enc.std)
    assert pre["interpolation"] in ("bilinear", "bicubic")
    assert prov == build_encoder(name, **ENCODERS.get(name).smoke_options()).provenance()


@pytest.mark.parametrize("name", FACE)
def test_transform_output_and_normalisation(name: str) -> None:
    enc = smoke(name)
    colour = (200, 30, 90)
    img = Image.new("RGB", (143, 97), colour)
    t = enc.transform(img)
    assert t.shape == (3, enc.input_size, enc.input_size) and t.dtype == torch.float32
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, enc.mean, enc.std, strict=True)]
    for channel in range(3):
        torch.testing.assert_close(t[channel], torch.full_like(t[channel], expected[channel]))
    gray = enc.transform(Image.new("L", (50, 50), 128))  # non-RGB input is converted
    assert gray.shape == t.shape
    clone = pickle.loads(pickle.dumps(enc.transform))  # DataLoader workers receive it pickled
    assert torch.equal(clone(img), t)


@pytest.mark.parametrize("name", FACE)
def test_channels_last_and_bf16_autocast(name: str) -> None:
    enc = build_encoder(name, **ENCODERS.get(name).smoke_options())
    x = images(enc, n=2, seed=2)
    with torch.no_grad():
        ref = enc(x)[0]
        enc = enc.to(memory_format=torch.channels_last)
        cl = enc(x.contiguous(memory_format=torch.channels_last))[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf, _ = enc(x.contiguous(memory_format=torch.channels_last))
    assert cl.shape == ref.shape and torch.isfinite(cl).all()
    assert bf.shape == ref.shape and torch.isfinite(bf.float()).all()


@pytest.mark.parametrize("name", FACE)
def test_list_encoders_describes_each(name: str) -> None:
    infos = {info.name: info for info in list_encoders()}
    info = infos[name]
    assert isinstance(info, EncoderInfo) and info.feature_dim > 0 and info.input_size > 0
    assert len(info.mean) == 3 and len(info.std) == 3 and info.weights
    json.dumps(info.as_dict())


# -- the contract: weights, calibration, blocks, saving, options -------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_named_weights_resolve_through_the_one_resolver(name: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABAWFEAT_HOME", str(tmp_path))
    monkeypatch.setenv("ABAWFEAT_OFFLINE", "1")
    cls = ENCODERS.get(name)
    named = cls.named_weights()
    for key, w in named.items():
        assert w.name == key and w.encoder == name and w.filename and w.description
        assert W.cached_path(w).is_relative_to(tmp_path / "weights")
    if not named:
        return
    first = next(iter(named.values()))
    folder = cls.weights_folder  # weights that are a folder of files (Hugging Face checkpoints)
    # Offline and not cached: one line saying exactly where to put the file(s).
    with pytest.raises(CheckpointError) as info:
        W.resolve_weights(first.name, name, named, folder=folder)
    message = str(info.value)
    target = W.cached_path(first)
    where = (f"put the file at {target}" if folder is None
             else f"put {folder.describe()} from {first.url.rsplit('/', 1)[0]} in {target.parent}")
    assert where in message and "\n" not in message
    # Put there by hand: used (no checksum published) or checked against the published one.
    W.cached_path(first).parent.mkdir(parents=True)
    W.cached_path(first).write_bytes(b"not the published weights")
    if folder is not None:  # the weights alone are not a checkpoint folder yet
        with pytest.raises(CheckpointError, match="cannot be downloaded here"):
            W.resolve_weights(first.name, name, named, folder=folder)
        for companion in folder.required:
            (W.cached_path(first).parent / companion).write_text("{}")
    if first.sha256 is None and first.git_blob_sha1 is None:
        got = W.resolve_weights(first.name, name, named, folder=folder)
        assert got.path == W.cached_path(first) and got.source == f"named:{first.name}"
    else:
        with pytest.raises(CheckpointError, match="not the published.*delete it"):
            W.resolve_weights(first.name, name, named, folder=folder)
    with pytest.raises(CheckpointError, match="neither a file nor a known name"):
        W.resolve_weights("no-such-weights", name, named, folder=folder)


@pytest.mark.parametrize("name", NAMES)
def test_calibration_is_declared(name: str) -> None:
    cls = ENCODERS.get(name)
    assert cls.needs_calibration == (cls.calibrate is not Encoder.calibrate)
    enc = build_encoder(name, **cls.smoke_options())
    if not cls.needs_calibration:
        with pytest.raises(ConfigError, match="no calibration"):
            enc.calibrate(torch.zeros(1))
        return
    x = images(enc, n=4, seed=5)
    with torch.no_grad():
        before = enc(x)[0]
        enc.calibrate(x)
        after = enc.eval()(x)[0]
    assert enc.provenance()["calibration"] is not None
    assert not torch.equal(before, after)


def _first_calls(enc: Encoder, x: torch.Tensor) -> dict[str, int]:
    """For each block with module members, the position of its first module call in one forward pass."""
    modules = dict(enc.named_modules())
    order: list[str] = []
    hooks = [modules[m].register_forward_pre_hook(lambda *_, block=b.name: order.append(block))
             for b in enc.blocks() for m in b.members if m in modules]
    try:
        with torch.no_grad():
            enc.forward_train(x)
    finally:
        for hook in hooks:
            hook.remove()
    return {block: order.index(block) for block in dict.fromkeys(order)}


@pytest.mark.parametrize("name", NAMES)
def test_blocks_cover_the_embedding_in_forward_order(name: str) -> None:
    enc = build_encoder(name, **ENCODERS.get(name).smoke_options())
    blocks = enc.blocks()
    if not blocks:  # not fine-tunable: then it cannot save fine-tuned weights either
        with pytest.raises(ConfigError):
            enc.save_weights("unused.pth")
        return
    names = [b.name for b in blocks]
    assert len(set(names)) == len(names) and all(b.members for b in blocks)
    params = dict(enc.named_parameters())
    modules = dict(enc.named_modules())
    owner: dict[str, str] = {}
    for b in blocks:
        for member in b.members:
            assert member in modules or member in params, f"{b.name}: {member} is not in the encoder"
            for p in (p for p in params if p == member or p.startswith(member + ".")):
                assert p not in owner, f"{p} is in blocks {owner[p]} and {b.name}"
                owner[p] = b.name
    # Every parameter the embedding depends on belongs to a block (else fine-tuning could never train it).
    x = images(enc, n=2, seed=4)
    with torch.enable_grad():
        grads = torch.autograd.grad(enc.forward_train(x)[0].sum(), list(params.values()), allow_unused=True)
    used = {n for n, g in zip(params, grads, strict=True) if g is not None}
    assert used <= set(owner), sorted(used - set(owner))[:5]
    # Forward order: the first module call of each block comes after those of the blocks before it.
    first = _first_calls(enc, x)
    positions = [first[n] for n in names if n in first]
    assert positions == sorted(positions) and len(first) >= len(blocks) - 1


@pytest.mark.parametrize("name", NAMES)
def test_saved_weights_build_the_same_encoder(name: str, tmp_path: Path) -> None:
    cls = ENCODERS.get(name)
    smoke_opts = cls.smoke_options()
    enc = build_encoder(name, **smoke_opts)
    if not enc.blocks():
        pytest.skip(f"{name} declares no trainable blocks")
    last = enc.blocks()[-1]
    params = dict(enc.named_parameters())
    with torch.no_grad():  # stands in for fine-tuning: the last block moves away from the seeded init
        for p in (p for n, p in params.items() if any(n == m or n.startswith(m + ".") for m in last.members)):
            p.add_(0.01)
    path = enc.save_weights(tmp_path / cls.weights_filename(), step=3)
    assert path.name == f"{name}_finetuned.pth" and path.is_file()
    own = {k: v for k, v in smoke_opts.items() if k not in GENERIC_FIELDS}
    again = build_encoder(name, **encoder_options(name, weights=str(path), options=own))
    fresh = build_encoder(name, **smoke_opts)
    x = images(enc, n=2, seed=6)
    with torch.no_grad():
        assert torch.equal(again(x)[0], enc(x)[0])
        assert not torch.equal(fresh(x)[0], enc(x)[0])
    assert again.transform == enc.transform and again.feature_dim == enc.feature_dim
    prov = again.provenance()
    assert prov["weights_sha256"] == W.file_sha256(path) and prov["weights_source"] == f"file:{path.name}"
    moved = tmp_path / "elsewhere" / path.name
    moved.parent.mkdir()
    moved.write_bytes(path.read_bytes())
    assert build_encoder(name, **encoder_options(name, weights=str(moved), options=own)).provenance() == prov


def _as_text(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


@pytest.mark.parametrize("name", NAMES)
def test_options_as_text_are_typed_by_the_config(name: str) -> None:
    cls = ENCODERS.get(name)
    typed = make_config(name, **cls.smoke_options())
    # The smoke options written as on the command line (--encoder-opt key=value) give the same config.
    assert make_config(name, **{k: _as_text(v) for k, v in cls.smoke_options().items()}) == typed
    assert make_config(name, seed="7", random_init="yes").seed == 7
    with pytest.raises(ConfigError) as info:
        make_config(name, seed="seven")
    message = str(info.value)
    assert "seed='seven'" in message and "expected int" in message and "random_init" in message
    with pytest.raises(ConfigError, match=f"encoder '{name}' has no option colour_depth \\(options: .*seed"):
        make_config(name, colour_depth="8")
    # Generic fields belong to the generic flags, not to --encoder-opt.
    for key in GENERIC_FIELDS:
        with pytest.raises(ConfigError, match=f"--encoder-opt {key}: set it with --"):
            encoder_options(name, options={key: "1"})
    with pytest.raises(ConfigError, match="exclude each other"):
        encoder_options(name, weights="x.pth", random_init=True)


def test_build_errors() -> None:
    with pytest.raises(ConfigError, match="unknown encoder 'resnet'.*ddamfn"):
        build_encoder("resnet")
    with pytest.raises(ConfigError, match="no option wieghts"):
        build_encoder("ddamfn", wieghts="affectnet8")


def test_register_encoder_rejects_duplicates_and_non_encoders() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        ENCODERS.register("ddamfn")(type("Other", (ENCODERS.get("clip"),), {}))
    with pytest.raises(TypeError):
        ENCODERS.register("bad")(object)  # type: ignore[arg-type]
    # The contract is checked at registration: generic config fields, calibration declared as overridden.
    undeclared = type("Undeclared", (ENCODERS.get("ddamfn"),), {"needs_calibration": False})
    with pytest.raises(TypeError, match="needs_calibration=False but calibrate"):
        ENCODERS.register("bad")(undeclared)
    no_seed = dataclasses.make_dataclass("NoSeed", [("weights", str | None, dataclasses.field(default=None)),
                                                    ("random_init", bool, dataclasses.field(default=False))])
    with pytest.raises(TypeError, match="lacks the generic field.*seed"):
        ENCODERS.register("bad")(type("NoSeedEncoder", (Encoder,), {"config_class": no_seed}))
    assert "bad" not in ENCODERS.names()


def test_shortest_side_resize_matches_torchvision() -> None:
    from torchvision import transforms as T

    tf = ImageTransform(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic", "shortest")
    reference = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                           T.ToTensor(), T.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
    rng = np.random.default_rng(0)
    for size in ((45, 70), (70, 45), (33, 33), (20, 41)):
        img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
        assert torch.equal(tf(img), reference(img))


# -- CLIP ---------------------------------------------------------------------------------------------
def test_clip_text_embeddings() -> None:
    enc = smoke("clip")
    prompts, emb = enc.text_embeddings()
    assert len(prompts) == len(EXPR_CLASSES) == emb.shape[0] and emb.shape[1] == enc.feature_dim
    assert prompts[EXPR_CLASSES.index("Happiness")] == "a face showing happiness"
    assert all(p == p.lower() for p in prompts) and emb.dtype == torch.float32
    again = enc.text_embeddings()[1]
    assert torch.equal(again, emb)
    assert enc.provenance()["prompts"] == prompts


def test_clip_preprocessing_matches_open_clip() -> None:
    import open_clip

    enc = smoke("clip")
    cfg = open_clip.get_model_preprocess_cfg(enc.model)
    reference = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"],
                                          resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"])
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, size=(150, 260, 3), dtype=np.uint8))
    assert torch.equal(enc.transform(img), reference(img))
    assert enc.transform.interpolation == "bicubic" and enc.transform.resize_mode == "shortest"


def test_clip_tag_offline_says_where_to_put_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABAWFEAT_HOME", str(tmp_path))
    monkeypatch.setenv("ABAWFEAT_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        build_encoder("clip")  # ViT-B-32 / openai
    message = str(info.value)
    target = tmp_path / "weights" / "open_clip" / "ViT-B-32" / "openai" / "open_clip_model.safetensors"
    assert f"put the file at {target}" in message and "huggingface.co" in message
    assert "\n" not in message


def test_clip_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown clip_model"):
        build_encoder("clip", clip_model="ViT-Q-99", random_init=True)
    unknown = "unknown clip ViT-S-32-alt weights .laion9000.: neither a file nor a known name"
    with pytest.raises(CheckpointError, match=unknown):
        build_encoder("clip", clip_model="ViT-S-32-alt", clip_pretrained="laion9000")
    broken = tmp_path / "broken.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, broken)
    with pytest.raises(CheckpointError, match=str(broken)):
        build_encoder("clip", clip_model="ViT-S-32-alt", clip_pretrained=str(broken))
    with pytest.raises(ConfigError, match="prompt_words"):
        build_encoder("clip", clip_model="ViT-S-32-alt", random_init=True, prompt_words=("joy",))


def test_clip_local_checkpoint_file(tmp_path: Path) -> None:
    enc = smoke("clip")
    path = tmp_path / "clip_s32.pt"
    torch.save(enc.model.state_dict(), path)
    loaded = build_encoder("clip", clip_model="ViT-S-32-alt", clip_pretrained=str(path))
    x = images(enc, n=2)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], enc(x)[0])
    prov = loaded.provenance()
    assert prov["weights_source"] == "file:clip_s32.pt" and len(prov["weights_sha256"]) == 64
    assert prov["config"]["clip_pretrained"] == "file:clip_s32.pt"


def test_clip_vit_b32_shapes() -> None:
    # The default model, random weights: a few seconds on 2 cores (no timing assertion: shared machines).
    enc = build_encoder("clip", clip_pretrained=None)  # the default model, random weights
    with torch.no_grad():
        features, logits = enc(torch.zeros(1, 3, 224, 224))
    assert features.shape == (1, 512) and logits is None
    assert enc.input_size == 224 and enc.provenance()["config"]["clip_model"] == "ViT-B-32"


# -- CLI ----------------------------------------------------------------------------------------------
def test_cli_lists_encoders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from abawfeat.cli import app

    monkeypatch.setenv("ABAWFEAT_HOME", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(app, ["encoders", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {e["name"] for e in data["encoders"]} == set(ENCODERS.names())
    assert {w["name"] for w in data["named_weights"]} >= {"affectnet8", "affectnet7", "rafdb",
                                                        "facebook/wav2vec2-base"}
    assert {e["name"]: e["modality"] for e in data["encoders"]}["wavlm"] == "audio"
    result = runner.invoke(app, ["encoders"])
    assert result.exit_code == 0 and "ddamfn" in result.stdout and "affectnet8" in result.stdout
