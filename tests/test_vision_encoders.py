"""DINOv2 (transformers), any timm model, and HSEmotion's pickled EmotiEffNet models: parity with the
libraries' own forward passes, through the CLI into caches, on the crops of a synthetic Aff-Wild2 tree.

Everything is small and random: a 2-layer DINOv2 saved with ``save_pretrained``, timm's ``test_efficientnet``
saved as a state dict and as a timm training checkpoint, and an ``efficientnet_b0`` pickled whole with
``torch.save(model)`` the way HSEmotion publishes its models. The contract tests every encoder shares
(shapes, determinism, blocks, saving, options) are in tests/test_encoders.py.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from typer.testing import CliRunner

from abawfeat.cache import FeatureCache
from abawfeat.cli import app
from abawfeat.data import AffWild2
from abawfeat.data.synth import SynthConfig, generate
from abawfeat.encoders import build_encoder
from abawfeat.encoders.hsemotion import EXPRESSIONS_8, VA, import_hsemotion, load_pickled_model
from abawfeat.errors import CheckpointError, ConfigError

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# bf16 autocast against the fp32 library forward: the relative error of a frame's feature vector (its
# distance over its norm). Measured 0.2-0.3 % on these tiny models (0.9 % on a random-init DINOv2-small at
# 224 px); 2 % leaves room for other kernels (docs/encoders.md).
BF16_RELATIVE = 0.02


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread: None) -> None:
    return None


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vision") / "synth"
    generate(
        SynthConfig(
            videos=4,
            frames=10,
            seed=0,
            va_invalid_rate=0.0,
            expr_invalid_rate=0.0,
            au_invalid_rate=0.0,
            extra_crops_fraction=0.0,
            missing_crop_rate=0.0,
        ),
        out,
    )
    return out


def cli(*args: str) -> object:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def refused(*args: str) -> str:
    """The one error line of a command that must fail cleanly."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    return " ".join(lines)


def crops(root: Path) -> list[tuple[str, int, Path]]:
    data = AffWild2(root)
    return [
        (v, int(f), data.crop_path(v, int(f))) for v in data.videos_with_crops() for f in data.crop_frames(v)
    ]


def cached(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None], dict]:
    with FeatureCache(path) as fc:
        feats = {v: fc.features(v) for v in fc.videos()}
        logits = {v: fc.logits(v) for v in fc.videos()}
        frames = {v: fc.frames(v) for v in fc.videos()}
        prov = fc.provenance
    return (
        {f"{v}/{int(f)}": feats[v][i] for v in feats for i, f in enumerate(frames[v])},
        {
            f"{v}/{int(f)}": (None if logits[v] is None else logits[v][i])
            for v in logits
            for i, f in enumerate(frames[v])
        },
        prov,
    )


def batch(root: Path, transform: object) -> tuple[list[str], torch.Tensor]:
    items = crops(root)
    keys = [f"{v}/{f}" for v, f, _ in items]
    return keys, torch.stack([transform(Image.open(p).convert("RGB")) for _, _, p in items])  # type: ignore[operator]


def close(cache: dict[str, np.ndarray], keys: list[str], reference: torch.Tensor, atol: float) -> None:
    got = np.stack([cache[k] for k in keys])
    np.testing.assert_allclose(got, reference.float().numpy(), atol=atol, rtol=1e-4)


# -- DINOv2 -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer DINOv2, random weights (LayerScale and norms moved off their init), saved as on the hub."""
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=518, patch_size=14
    )
    torch.manual_seed(11)
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    folder = tmp_path_factory.mktemp("dinov2") / "dinov2-tiny"
    model.save_pretrained(folder)
    return folder


def dino_reference(folder: Path) -> torch.nn.Module:
    return transformers.Dinov2Model.from_pretrained(str(folder), dtype=torch.float32).eval()


DINO_PREPROCESS = T.Compose(
    [T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(**IMAGENET)]
)


def test_dinov2_cache_matches_transformers_on_real_crops(
    root: Path, dino_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dino.h5"
    cli("extract", "--backbone", "dinov2", "--weights", str(dino_folder), "--data", str(root), "--out",
        str(out), "--workers", "0", "--dtype", "float32")
    feats, logits, prov = cached(out)
    keys, x = batch(root, DINO_PREPROCESS)
    with torch.no_grad():
        reference = dino_reference(dino_folder)(pixel_values=x).pooler_output
    close(feats, keys, reference, atol=2e-5)
    assert all(v is None for v in logits.values())
    assert prov["encoder"] == "dinov2" and prov["encoder_provenance"]["weights_source"] == "dir:dinov2-tiny"
    assert prov["preprocessing"]["size"] == 224 and prov["preprocessing"]["interpolation"] == "bicubic"
    assert prov["preprocessing"]["resize_mode"] == "squash"  # the crop is the face: no centre crop

    # bf16: within the documented tolerance of the fp32 library forward.
    bf = tmp_path / "dino-bf16.h5"
    cli("extract", "--backbone", "dinov2", "--weights", str(dino_folder), "--data", str(root), "--out",
        str(bf), "--workers", "0", "--dtype", "float32", "--precision", "bf16")
    got = np.stack([cached(bf)[0][k] for k in keys])
    ref = reference.numpy()
    assert (np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)).max() < BF16_RELATIVE


def test_dinov2_compiled_extraction_model_matches_the_library(root: Path, dino_folder: Path) -> None:
    # What `abawfeat extract` runs on large DINOv2 jobs by default: uint8 pixels in, torch.compile with
    # inductor's freezing. fp32 must agree with transformers' forward as eager does, bf16 within its
    # tolerance.
    from abawfeat.extract import ExtractConfig, _prepare_model
    from abawfeat.utils.compiling import CompiledWithFallback

    keys, x = batch(root, DINO_PREPROCESS)
    with torch.no_grad():
        reference = dino_reference(dino_folder)(pixel_values=x).pooler_output
    items = crops(root)
    sized = [Image.open(p).convert("RGB").resize((224, 224), Image.BICUBIC) for _, _, p in items]
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in sized]))
    for precision, bound in (("fp32", 1e-5), ("bf16", BF16_RELATIVE)):
        enc = build_encoder("dinov2", weights=str(dino_folder))
        assert enc.compile_by_default
        config = ExtractConfig(backbone="dinov2", data=root, compile=True, precision=precision)
        model = _prepare_model(enc, torch.device("cpu"), config)
        assert isinstance(model, CompiledWithFallback)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            features, _ = model(pixels.permute(0, 3, 1, 2))
        assert not model.failed, "torch.compile fell back to eager: the compiled path was not tested"
        got, ref = features.float().numpy(), reference.numpy()
        assert (np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)).max() < bound


@pytest.mark.parametrize(
    ("pool", "layer"), [("mean", None), ("cls_mean", None), ("cls", 1), ("mean", 0), ("cls", -2)]
)
def test_dinov2_pools_and_layers_match_the_library(
    root: Path, dino_folder: Path, pool: str, layer: int | None
) -> None:
    enc = build_encoder("dinov2", weights=str(dino_folder), pool=pool, layer=layer, image_size=112)
    keys, x = batch(
        root,
        T.Compose(
            [
                T.Resize((112, 112), interpolation=T.InterpolationMode.BICUBIC),
                T.ToTensor(),
                T.Normalize(**IMAGENET),
            ]
        ),
    )
    x = x[:6]
    model = dino_reference(dino_folder)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
        n = 2 if layer is None else layer % 3  # hidden states 0..2; -2 is 1
        tokens = model.layernorm(
            out.hidden_states[n]
        )  # the final norm, as get_intermediate_layers(norm=True)
        if layer is None:
            torch.testing.assert_close(tokens, out.last_hidden_state)
        cls, mean = tokens[:, 0], tokens[:, 1:].mean(1)
        expected = {"cls": cls, "mean": mean, "cls_mean": torch.cat([cls, mean], 1)}[pool]
        got = enc(torch.stack([enc.transform(Image.open(p)) for _, _, p in crops(root)[:6]]))[0]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert enc.feature_dim == expected.shape[1] and enc.provenance()["layer"] == n
    assert len(enc.model.encoder.layer) == n  # blocks after the one asked for are dropped


def test_dinov2_with_registers_leaves_the_registers_out_of_the_mean(tmp_path: Path) -> None:
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        num_register_tokens=4,
        patch_size=14,
    )
    torch.manual_seed(2)
    model = transformers.Dinov2WithRegistersModel(config).eval()
    model.save_pretrained(tmp_path / "registers")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = model(pixel_values=x)
        cls = build_encoder("dinov2", weights=str(tmp_path / "registers"), image_size=56)(x)[0]
        mean = build_encoder("dinov2", weights=str(tmp_path / "registers"), image_size=56, pool="mean")(x)[0]
    torch.testing.assert_close(cls, out.pooler_output)
    torch.testing.assert_close(mean, out.last_hidden_state[:, 5:].mean(1))  # CLS and 4 registers left out


def test_dinov2_resizes_large_crops_once_and_checks_its_options(dino_folder: Path) -> None:
    enc = build_encoder("dinov2", weights=str(dino_folder))
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))
    # A 300-px crop (a crop tree at a larger scale) goes straight to 224: one bicubic resize, no upsampling.
    assert torch.equal(enc.transform(big), DINO_PREPROCESS(big))
    with pytest.raises(ConfigError, match="multiple of the patch size 14"):
        build_encoder("dinov2", weights=str(dino_folder), image_size=100)
    with pytest.raises(ConfigError, match="layers are 0..2"):
        build_encoder("dinov2", weights=str(dino_folder), layer=3)
    with pytest.raises(ConfigError, match="pool='max'.*cls, mean, cls_mean"):
        build_encoder("dinov2", weights=str(dino_folder), pool="max")


def test_dinov2_hub_name_offline_says_where_to_put_the_files(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ABAWFEAT_HOME", str(tmp_path))
    monkeypatch.setenv("ABAWFEAT_OFFLINE", "1")
    message = refused("extract", "--backbone", "dinov2", "--weights", "facebook/dinov2-large", "--data",
        str(root), "--out", str(tmp_path / "x.h5"))
    folder = tmp_path / "weights" / "huggingface" / "facebook--dinov2-large"
    assert "config.json" in message and "model.safetensors" in message
    assert "https://huggingface.co/facebook/dinov2-large/resolve/main" in message
    assert f"in {folder}" in message and "cannot be downloaded here (ABAWFEAT_OFFLINE is set)" in message


def test_dinov2_fine_tunes_and_its_saved_weights_extract(root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    opts = ["--encoder-opt", "size=tiny", "--encoder-opt", "image_size=56"]
    cli("finetune", "--backbone", "dinov2", "--random-init", *opts, "--unfreeze-from", "block1", "--task",
        "expr", "--data", str(root), "--out", str(run), "--epochs", "1", "--batch-size", "4", "--workers",
        "0", "--device", "cpu", "--precision", "fp32", "--no-plots", "--eval-batch-size", "16")
    info = json.loads((run / "config.json").read_text())
    assert info["extra"]["blocks"] == {"trainable": ["block1", "norm"], "frozen": ["embed", "block0"]}
    saved = run / "dinov2_finetuned.pth"
    start = build_encoder("dinov2", random_init=True, size="tiny", image_size=56)
    tuned = build_encoder("dinov2", weights=str(saved), image_size=56)
    before, after = dict(start.named_parameters()), dict(tuned.named_parameters())
    assert torch.equal(
        before["model.encoder.layer.0.mlp.fc1.weight"], after["model.encoder.layer.0.mlp.fc1.weight"]
    )
    assert not torch.equal(
        before["model.encoder.layer.1.mlp.fc1.weight"], after["model.encoder.layer.1.mlp.fc1.weight"]
    )
    cache = tmp_path / "tuned.h5"
    cli("extract", "--backbone", "dinov2", "--weights", str(saved), "--encoder-opt", "image_size=56",
        "--data", str(root), "--out", str(cache), "--workers", "0", "--dtype", "float32")
    again = json.loads(cli("evaluate", str(run), "--cache", str(cache), "--json").stdout)
    metrics = json.loads((run / "metrics.json").read_text())
    assert again["f1_expr"] == pytest.approx(metrics["f1_expr"], abs=1e-4)


# -- timm ---------------------------------------------------------------------------------------------------
def tiny_timm(num_classes: int = 8, seed: int = 5) -> torch.nn.Module:
    """timm's smallest EfficientNet, random weights, batch-norm statistics moved off their init."""
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=num_classes).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def timm_reference_transform(model: torch.nn.Module) -> object:
    """timm's own evaluation transform with its centre crop turned off (crop_pct 1 on square crops)."""
    cfg = timm.data.resolve_model_data_config(model)
    return timm.data.create_transform(**{**cfg, "crop_pct": 1.0}, is_training=False)


def test_timm_state_dict_cache_matches_timm_forward_and_keeps_logits(root: Path, tmp_path: Path) -> None:
    model = tiny_timm()
    weights = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "timm.h5"
    cli("extract", "--backbone", "timm", "--encoder-opt", "model=test_efficientnet", "--weights",
        str(weights), "--data", str(root), "--out", str(out), "--workers", "0", "--dtype", "float32")
    feats, logits, prov = cached(out)
    keys, x = batch(root, timm_reference_transform(model))
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        scores = model(x)
    close(feats, keys, pre, atol=2e-5)
    close(logits, keys, scores, atol=2e-5)  # type: ignore[arg-type]
    pre_cfg = prov["preprocessing"]
    assert (
        pre_cfg["size"] == 160
        and pre_cfg["interpolation"] == "bicubic"
        and pre_cfg["resize_mode"] == "squash"
    )
    # timm's evaluation transform would centre-crop 95 %: left out, and the provenance says so.
    assert prov["encoder_provenance"]["preprocessing_left_out"] == {"crop_pct": 0.95, "crop_mode": "center"}
    assert prov["logit_names"] == [f"output{i}" for i in range(8)]

    # bf16 within the documented tolerance.
    bf = tmp_path / "timm-bf16.h5"
    cli("extract", "--backbone", "timm", "--encoder-opt", "model=test_efficientnet", "--weights",
        str(weights), "--data", str(root), "--out", str(bf), "--workers", "0", "--dtype", "float32",
        "--precision", "bf16")
    got = np.stack([cached(bf)[0][k] for k in keys])
    assert (
        np.linalg.norm(got - pre.numpy(), axis=1) / np.linalg.norm(pre.numpy(), axis=1)
    ).max() < BF16_RELATIVE


def test_timm_training_checkpoint_and_safetensors_give_the_same_encoder(root: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = tiny_timm(num_classes=0)
    checkpoint = tmp_path / "model_best.pth.tar"
    torch.save(
        {
            "epoch": 3,
            "arch": "test_efficientnet",
            "args": argparse.Namespace(lr=0.1, model="x"),
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "state_dict_ema": {k: v * 0 for k, v in model.state_dict().items()},
        },
        checkpoint,
    )
    plain = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(plain))
    from_ckpt = build_encoder("timm", weights=str(checkpoint))  # the checkpoint's `arch` names the model
    from_st = build_encoder("timm", weights=str(plain), model="test_efficientnet")
    x = torch.stack([from_st.transform(Image.open(p)) for _, _, p in crops(root)[:4]])
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(from_ckpt(x)[0], reference)
        torch.testing.assert_close(from_st(x)[0], reference)
    assert from_ckpt(x)[1] is None and from_ckpt.logit_names is None  # no classifier, no logits
    ema = build_encoder("timm", weights=str(checkpoint), ema=True)
    assert not torch.equal(
        dict(ema.named_parameters())["model.conv_stem.weight"],
        dict(from_ckpt.named_parameters())["model.conv_stem.weight"],
    )


def test_timm_fine_tunes_and_its_saved_file_extracts_without_options(root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cli("finetune", "--backbone", "timm", "--random-init", "--encoder-opt", "model=test_efficientnet",
        "--encoder-opt", "image_size=64", "--unfreeze-from", "blocks.4", "--task", "expr",
        "--data", str(root), "--out", str(run), "--epochs", "1", "--batch-size", "4", "--workers", "0",
        "--device", "cpu", "--precision", "fp32", "--no-plots", "--eval-batch-size", "16")
    blocks = json.loads((run / "config.json").read_text())["extra"]["blocks"]
    assert blocks["trainable"] == ["blocks.4", "conv_head", "bn2"]
    assert blocks["frozen"] == ["conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    cache = tmp_path / "tuned.h5"
    # The saved file says its model and input size: no --encoder-opt needed, and stage two accepts the cache.
    cli("extract", "--backbone", "timm", "--weights", str(run / "timm_finetuned.pth"), "--data", str(root),
        "--out", str(cache), "--workers", "0", "--dtype", "float32")
    again = json.loads(cli("evaluate", str(run), "--cache", str(cache), "--json").stdout)
    metrics = json.loads((run / "metrics.json").read_text())
    assert again["f1_expr"] == pytest.approx(metrics["f1_expr"], abs=1e-4)


def test_timm_weights_errors_are_one_line(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.pth"
    torch.save(tiny_timm().state_dict(), weights)
    with pytest.raises(ConfigError, match="does not say which model.*model=NAME"):
        build_encoder("timm", weights=str(weights))
    shapes = r"\(size mismatch for conv_stem.weight: other shapes"
    with pytest.raises(CheckpointError, match=f"{weights}: not efficientnet_b0 weights {shapes}"):
        build_encoder("timm", weights=str(weights), model="efficientnet_b0")
    with pytest.raises(ConfigError, match="unknown timm model 'efficientnet_b99'"):
        build_encoder("timm", random_init=True, model="efficientnet_b99")
    with pytest.raises(ConfigError, match="needs --encoder-opt model=NAME"):
        build_encoder("timm", random_init=True)
    with pytest.raises(ConfigError, match="test_vit takes 160 x 160 inputs only"):
        build_encoder("timm", random_init=True, model="test_vit", image_size=224)
    pickled = tmp_path / "whole.pt"
    torch.save(tiny_timm(), pickled)  # a whole pickled model: never unpickled by extract
    with pytest.raises(CheckpointError) as info:
        build_encoder("timm", weights=str(pickled), model="test_efficientnet")
    assert "weights import hsemotion" in str(info.value) and "\n" not in str(info.value)


# -- HSEmotion ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hsemotion_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files in HSEmotion's format: whole timm models written by torch.save(model), as published."""
    folder = tmp_path_factory.mktemp("hsemotion")
    torch.manual_seed(21)
    b0 = timm.create_model("efficientnet_b0", pretrained=False, num_classes=8).eval()
    with torch.no_grad():
        for m in b0.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.05)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(b0, folder / "enet_b0_8_best_afew.pt")
    mtl = timm.create_model("test_efficientnet", pretrained=False, num_classes=10).eval()
    mtl.classifier = torch.nn.Sequential(mtl.classifier)  # as some HSEmotion models hold theirs
    torch.save(mtl, folder / "tiny_8_va_mtl.pt", _use_new_zipfile_serialization=False)  # the legacy format
    return {"b0": folder / "enet_b0_8_best_afew.pt", "mtl": folder / "tiny_8_va_mtl.pt"}


def test_hsemotion_import_then_extract_matches_hsemotions_own_procedure(
    root: Path, hsemotion_files: dict[str, Path], tmp_path: Path
) -> None:
    converted = tmp_path / "enet_b0_8_best_afew.abawfeat.pt"
    shown = cli("weights", "import", "hsemotion", str(hsemotion_files["b0"]), "--out", str(converted)).stdout
    assert "efficientnet_b0" in shown and "8 outputs" in shown and "224 px bilinear" in shown
    out = tmp_path / "hse.h5"
    cli("extract", "--backbone", "timm", "--weights", str(converted), "--data", str(root), "--out", str(out),
        "--workers", "0", "--dtype", "float32")
    feats, logits, prov = cached(out)
    # HSEmotion's recogniser: Resize((224, 224)), ToTensor, ImageNet Normalize; the pickled model with its
    # classifier replaced by an identity gives the features, the classifier's weights the scores.
    original = torch.load(hsemotion_files["b0"], weights_only=False).eval()  # the test trusts its own file
    weight, bias = original.classifier.weight.detach(), original.classifier.bias.detach()
    original.classifier = torch.nn.Identity()
    keys, x = batch(root, T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize(**IMAGENET)]))
    with torch.no_grad():
        reference = original(x)
    close(feats, keys, reference, atol=5e-5)
    close(logits, keys, reference @ weight.T + bias, atol=5e-5)  # type: ignore[arg-type]
    assert prov["logit_names"] == list(EXPRESSIONS_8)
    assert prov["preprocessing"]["size"] == 224 and prov["preprocessing"]["interpolation"] == "bilinear"


def test_hsemotion_va_mtl_outputs_and_the_legacy_pickle_format(
    hsemotion_files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "mtl.pt"
    summary = import_hsemotion(hsemotion_files["mtl"], out, model="test_efficientnet")
    assert summary["num_classes"] == 10 and summary["logit_names"] == [*EXPRESSIONS_8, *VA]
    assert summary["preprocess"]["size"] == 260  # HSEmotion's size for every non-B0 model
    enc = build_encoder("timm", weights=str(out))
    original = torch.load(hsemotion_files["mtl"], weights_only=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[1], original(x))  # Sequential(Linear) mapped onto timm's classifier
    assert enc.logit_names == (*EXPRESSIONS_8, *VA)
    with pytest.raises(CheckpointError, match="holds test_efficientnet weights, not efficientnet_b0"):
        build_encoder("timm", weights=str(out), model="efficientnet_b0")
    with pytest.raises(CheckpointError, match="already exists"):
        import_hsemotion(hsemotion_files["mtl"], out, model="test_efficientnet")


def test_hsemotion_pickles_of_older_timm_layouts_import(tmp_path: Path) -> None:
    """Older timm pickled modules under paths that no longer exist and kept activation functions as
    attributes; both are read as inert records, so such a file still converts to the same weights."""
    model = tiny_timm()
    model.blocks[0][0].gate_fn = timm.layers.activations.sigmoid  # type: ignore[assignment]
    old = tmp_path / "enet_old.pt"
    torch.save(model, old, _use_new_zipfile_serialization=False)  # a raw pickle (GLOBAL names as text)
    data = old.read_bytes()
    # The block classes under timm 0.6's module path, which this timm no longer has.
    renamed = data.replace(b"timm.models._efficientnet_blocks\n", b"timm.models.efficientnet_blocks\n")
    assert renamed != data
    old.write_bytes(renamed)
    record = load_pickled_model(old)
    assert record.qualified == "timm.models.efficientnet.EfficientNet"
    out = tmp_path / "old.abawfeat.pt"
    import_hsemotion(old, out, model="test_efficientnet")
    enc = build_encoder("timm", weights=str(out))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[1], model(x))


def test_timm_num_classes_zero_leaves_a_classifier_out(tmp_path: Path) -> None:
    model = tiny_timm()
    weights = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), weights)
    enc = build_encoder("timm", weights=str(weights), model="test_efficientnet", num_classes=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, logits = enc(x)
        torch.testing.assert_close(features, model.forward_head(model.forward_features(x), pre_logits=True))
    assert logits is None and enc.logit_names is None
    with pytest.raises(CheckpointError, match="has 8 outputs, not num_classes=3"):
        build_encoder("timm", weights=str(weights), model="test_efficientnet", num_classes=3)


def test_hsemotion_published_names_come_from_the_user_cache(
    hsemotion_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ABAWFEAT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ABAWFEAT_OFFLINE", "1")
    target = tmp_path / "home" / "weights" / "hsemotion" / "enet_b0_8_best_afew.pt"
    out = str(tmp_path / "a.pt")
    message = refused("weights", "import", "hsemotion", "enet_b0_8_best_afew", "--out", out)
    assert f"put the file at {target}" in message and "HSE-asavchenko/face-emotion-recognition" in message
    target.parent.mkdir(parents=True)
    target.write_bytes(hsemotion_files["b0"].read_bytes())  # put there by hand
    summary = import_hsemotion("enet_b0_8_best_afew", tmp_path / "a.pt")
    assert summary["model"] == "efficientnet_b0" and summary["preprocess"]["size"] == 224


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class _Evaluates:
    def __reduce__(self) -> tuple:
        return (eval, ("1 + 1",))


class CustomModule(torch.nn.Module):
    pass


@pytest.mark.parametrize("kind", ["os.system", "eval", "custom class", "nested pickle"])
def test_a_pickle_with_any_other_object_is_refused_in_one_line(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bad = tmp_path / f"enet_b0_{kind.replace(' ', '_')}.pt"
    if kind == "os.system":
        model = timm.create_model("test_efficientnet", pretrained=False, num_classes=8)
        model.extra = _RunsCommand(marker)  # type: ignore[assignment]
        torch.save(model, bad)
        expected = "posix.system" if os.name == "posix" else "nt.system"
    elif kind == "eval":
        torch.save({"model": _Evaluates()}, bad)
        expected = "builtins.eval"
    elif kind == "custom class":
        torch.save(CustomModule(), bad)
        expected = f"{__name__}.CustomModule"
    else:  # an object whose reduction unpickles more bytes, unrestricted
        with open(bad, "wb") as fh:
            pickle.dump(torch.storage.UntypedStorage(4), fh, protocol=2)
        expected = "torch.storage._load_from_bytes"
    out = tmp_path / "out.pt"
    message = refused("weights", "import", "hsemotion", str(bad), "--out", str(out))
    assert f"{bad}: refused to unpickle {expected}" in message and "nothing in the file was run" in message
    assert not marker.exists() and not out.exists()
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_pickled_model(bad)


def test_encoders_lists_dinov2_and_timm_and_their_caches_fuse(
    root: Path, dino_folder: Path, tmp_path: Path
) -> None:
    listed = {e["name"]: e for e in json.loads(cli("encoders", "--json").stdout)["encoders"]}
    assert listed["dinov2"]["input_size"] == 224 and "facebook/dinov2-base" in listed["dinov2"]["weights"]
    assert {"pool", "layer", "image_size", "size"} <= set(listed["dinov2"]["options"])
    assert listed["timm"]["input_size"] == 224 and "hsemotion" in listed["timm"]["weights"]
    assert {"model", "num_classes", "image_size", "interpolation"} <= set(listed["timm"]["options"])
    names = {w["name"] for w in json.loads(cli("encoders", "--json").stdout)["named_weights"]}
    assert {"facebook/dinov2-large", "facebook/dinov2-with-registers-base"} <= names

    dino, tm = tmp_path / "dinov2.h5", tmp_path / "timm.h5"
    cli("extract", "--backbone", "dinov2", "--weights", str(dino_folder), "--encoder-opt", "image_size=56",
        "--layer", "1", "--data", str(root), "--out", str(dino), "--workers", "0")
    assert cached(dino)[2]["encoder_provenance"]["layer"] == 1  # --layer is --encoder-opt layer
    cli("extract", "--backbone", "timm", "--random-init", "--encoder-opt", "model=test_efficientnet",
        "--encoder-opt", "image_size=64", "--data", str(root), "--out", str(tm), "--workers", "0")
    run = tmp_path / "fused"
    cli("train-head", "--task", "expr", "--data", str(root), "--cache", str(dino), "--cache", str(tm),
        "--fusion", "early", "--out", str(run), "--epochs", "1", "--no-plots")
    record = json.loads((run / "config.json").read_text())
    assert [c["encoder"] for c in record["caches"]] == ["dinov2", "timm"]
