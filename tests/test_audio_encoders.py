"""Every registered audio encoder (wav2vec2, hubert, wavlm), one parametrised suite, on tiny random configs:
output geometry, seeded builds, layer selection and averaging, whole-track statistics (chunked == one-shot),
local checkpoint folders, and the offline message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from abawfeat.audio.stream import FrameGeometry, encode_stream
from abawfeat.encoders import ENCODERS, build_encoder, list_encoders
from abawfeat.encoders.speech import SIZES, hub_folder, parse_layers
from abawfeat.errors import CheckpointError, ConfigError

AUDIO = [n for n in ENCODERS.names() if not n.startswith("fake-") and ENCODERS.get(n).modality == "audio"]
G = FrameGeometry()
# The tiny architecture with the large models' front end (LayerNorm convolutions, final LayerNorm).
SIZES.setdefault("tiny-stable", {**SIZES["tiny"], "feat_extract_norm": "layer", "do_stable_layer_norm": True,
                                 "conv_bias": True})


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Bursts of a gliding harmonic tone between near-silent stretches, at varying loudness."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    loud = 0.2 + 0.8 * (np.sin(2 * np.pi * 0.07 * t) > 0)
    on = (np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, 6)) > 0.2) * loud
    tone = np.sin(2 * np.pi * (140 + 40 * np.sin(2 * np.pi * 0.6 * t)) * t)
    return (on * tone + 0.005 * rng.standard_normal(len(t))).astype(np.float32)


def tiny(name: str, **kw: object):  # noqa: ANN201
    return build_encoder(name, **{**ENCODERS.get(name).smoke_options(), **kw})


def test_registry_lists_the_audio_encoders() -> None:
    assert set(AUDIO) == {"wav2vec2", "hubert", "wavlm"}
    infos = {i.name: i for i in list_encoders()}
    for name in AUDIO:
        assert infos[name].modality == "audio" and infos[name].feature_dim == 768
        json.dumps(infos[name].as_dict())
    assert infos["ddamfn"].modality == "face"


@pytest.mark.parametrize("name", AUDIO)
def test_output_geometry_and_seeded_build(name: str) -> None:
    enc = tiny(name)
    assert enc.modality == "audio" and not enc.training and enc.feature_dim == 32
    assert enc.layers == (1,)  # the middle of 3 layers
    for n in (400, 719, 720, 16_000, 16_000 * 2 + 17):
        x = torch.randn(2, n)
        with torch.no_grad():
            h, logits = enc(x)
        assert h.shape == (2, G.n_outputs(n), 32) and logits is None
        lengths = enc.model._get_feat_extract_output_lengths(torch.tensor([n]))
        assert int(lengths[0]) == G.n_outputs(n)  # the geometry is the model's own
    x = speechlike(1.0)
    with torch.no_grad():
        assert np.array_equal(enc.encode(x), tiny(name).encode(x))  # same seed, same weights
        assert not np.array_equal(enc.encode(x), tiny(name, seed=1).encode(x))


@pytest.mark.parametrize("name", AUDIO)
def test_provenance(name: str) -> None:
    enc = tiny(name, layers="1:2")
    prov = enc.provenance()
    assert json.loads(json.dumps(prov)) == prov
    assert prov["name"] == name and prov["weights_sha256"] == "random-init" and prov["layers"] == [1, 2]
    assert prov["config"]["layers"] == "1:2" and prov["model_config"]["num_hidden_layers"] == 3
    pre = prov["preprocessing"]
    assert pre["sample_rate"] == 16_000 and pre["outputs_per_second"] == 50 and pre["normalize"] is True
    assert pre["chunk_s"] == 20.0 and pre["context_s"] == 2.0
    assert prov == tiny(name, layers="1:2").provenance()


@pytest.mark.parametrize("size", ["tiny", "tiny-stable"])
@pytest.mark.parametrize("name", AUDIO)
def test_layer_is_the_full_models_hidden_state(name: str, size: str) -> None:
    full = build_encoder(name, random_init=True, size=size, layer=3)
    x = torch.randn(1, 8000)
    with torch.no_grad():
        states = full.model(x, output_hidden_states=True).hidden_states
        for n in range(4):
            cut = build_encoder(name, random_init=True, size=size, layer=n)
            assert len(cut.model.encoder.layers) == n  # layers past the one asked for are not computed
            torch.testing.assert_close(cut(x)[0], states[n], rtol=1e-5, atol=1e-5)
        mean = build_encoder(name, random_init=True, size=size, layers="1:3")
        torch.testing.assert_close(mean(x)[0], (states[1] + states[2] + states[3]) / 3, rtol=1e-5, atol=1e-5)
        assert build_encoder(name, random_init=True, size=size, layer=-1).layers == (3,)


def test_parse_layers() -> None:
    assert parse_layers(None, None, 12) == (6,)
    assert parse_layers(None, None, 24) == (12,)
    assert parse_layers(9, None, 12) == (9,) and parse_layers(-1, None, 12) == (12,)
    assert parse_layers(None, "6:9", 12) == (6, 7, 8, 9) and parse_layers(None, " 0 : 0 ", 12) == (0,)
    for layer, layers, match in ((1, "1:2", "exclude each other"), (13, None, "0..12"),
                                 (None, "9:6", "a <= b"), (None, "6-9", "use a:b"), (None, "0:13", "a <= b")):
        with pytest.raises(ConfigError, match=match):
            parse_layers(layer, layers, 12)


@pytest.mark.parametrize("size", ["tiny", "tiny-stable"])
@pytest.mark.parametrize("name", AUDIO)
def test_chunked_equals_one_shot(name: str, size: str) -> None:
    """A 9 s track in 2 s segments with 0.4 s of context, against the whole track in one forward pass (fp32).
    With the whole track's statistics the front end (hidden state 0) is exact. Deeper, the attention sees a
    segment instead of the track; that stays within bf16's tolerance, taken as what running a base-sized
    model in bf16 changes against fp32 (1.2-1.5 % median relative error, measured; docs/audio.md)."""
    x = speechlike(9.0, seed=3)
    blocks = [x[i : i + 7001] for i in range(0, len(x), 7001)]  # decoder blocks of any size
    for layer in (0, 3):
        enc = build_encoder(name, random_init=True, size=size, layer=layer, chunk_s=2.0, context_s=0.4)
        with torch.no_grad():
            one_shot = enc.encode(x)
            stats = enc.track_statistics(blocks)
            with enc.use_track(stats):
                chunked = np.concatenate([o for _, o in encode_stream(blocks, enc.encode, G, enc.chunk,
                                                                        enc.context)])
            per_segment = np.concatenate([o for _, o in encode_stream(blocks, enc.encode, G, enc.chunk,
                                                                        enc.context)])
        assert chunked.shape == one_shot.shape == (G.n_outputs(len(x)), 32)
        rel = np.linalg.norm(chunked - one_shot, axis=1) / np.linalg.norm(one_shot, axis=1)
        if layer == 0:
            assert rel.max() < 1e-4
        else:
            assert np.median(rel) < 1.5e-2 and rel.max() < 3e-2, (np.median(rel), rel.max())
        if layer == 0 and size == "tiny":
            # Without the track's statistics each segment normalises its own loudness: far off.
            rel_seg = np.linalg.norm(per_segment - one_shot, axis=1) / np.linalg.norm(one_shot, axis=1)
            assert np.median(rel_seg) > 10 * rel.max()


@pytest.mark.parametrize("name", AUDIO)
def test_bf16_autocast_runs(name: str) -> None:
    enc = tiny(name, layers="0:3")
    x = speechlike(2.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc.encode(x)
    assert out.dtype == np.float32 and out.shape == (G.n_outputs(len(x)), 32) and np.isfinite(out).all()


@pytest.mark.parametrize("name", AUDIO)
def test_local_checkpoint_folder(name: str, tmp_path: Path) -> None:
    import transformers

    family = ENCODERS.get(name).family
    config = getattr(transformers, family.config_class)(**SIZES["tiny"])
    torch.manual_seed(5)
    model = getattr(transformers, family.model_class)(config)
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "preprocessor_config.json").write_text(json.dumps(
        {"sampling_rate": 16000, "do_normalize": False}))
    loaded = build_encoder(name, weights=str(tmp_path / "ckpt"), layer=2)
    x = torch.from_numpy(speechlike(1.0))[None]
    with torch.no_grad():
        expected = model.eval()(x, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(loaded(x)[0], expected)
    prov = loaded.provenance()
    assert prov["weights_source"] == "dir:ckpt" and len(prov["weights_sha256"]) == 64
    assert prov["config"]["weights"] == "dir:ckpt" and prov["preprocessing"]["normalize"] is False
    # The same file elsewhere is the same encoder.
    (tmp_path / "ckpt").rename(tmp_path / "moved")
    moved = build_encoder(name, weights=str(tmp_path / "moved"), layer=2)
    assert moved.weights_sha256 == prov["weights_sha256"]


def test_bad_checkpoints_are_one_line(tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    hubert = transformers.HubertModel(transformers.HubertConfig(**SIZES["tiny"]))
    hubert.save_pretrained(tmp_path / "hubert")
    cases = {
        "holds a 'hubert' model, not 'wav2vec2'": ("wav2vec2", tmp_path / "hubert"),
        "not a checkpoint folder": ("wav2vec2", tmp_path),
        "no such weights file": ("wav2vec2", tmp_path / "nothing" / "here.bin"),
    }
    cases["a folder holding config.json and model.safetensors .or pytorch_model.bin., not one file"] = (
        "hubert", tmp_path / "hubert" / "config.json.bak")
    (tmp_path / "hubert" / "config.json.bak").write_text("{}")
    for match, (name, path) in cases.items():
        with pytest.raises(CheckpointError, match=match) as info:
            build_encoder(name, weights=str(path))
        assert "\n" not in str(info.value)
    # A checkpoint that lacks weights is refused rather than silently completed with random ones.
    cut = build_encoder("hubert", random_init=True, size="tiny", layer=1)  # 1 of 3 layers kept
    cut.model.save_pretrained(tmp_path / "cut")
    with pytest.raises(CheckpointError, match="not a complete hubert checkpoint"):
        build_encoder("hubert", weights=str(tmp_path / "cut"))
    with pytest.raises(ConfigError, match="exclude each other"):
        build_encoder("wavlm", random_init=True, weights=str(tmp_path / "hubert"))
    with pytest.raises(ConfigError, match="multiple of 0.02"):
        build_encoder("wavlm", random_init=True, size="tiny", context_s=0.03)


@pytest.mark.parametrize("name", AUDIO)
def test_offline_says_where_to_put_the_files(name: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABAWFEAT_HOME", str(tmp_path))
    monkeypatch.setenv("ABAWFEAT_OFFLINE", "1")
    default = ENCODERS.get(name).family.default_weights
    with pytest.raises(CheckpointError) as info:
        build_encoder(name)
    message = str(info.value)
    target = tmp_path / "weights" / "huggingface" / default.replace("/", "--")
    assert hub_folder(default) == target
    assert message.endswith(f"put config.json, preprocessor_config.json (if published) and model.safetensors "
                            f"(or pytorch_model.bin) from https://huggingface.co/{default}/resolve/main in "
                            f"{target}")
    assert "\n" not in message
    # Files put there by hand are found, offline.
    import transformers

    family = ENCODERS.get(name).family
    config = getattr(transformers, family.config_class)(**SIZES["tiny"])
    model = getattr(transformers, family.model_class)(config)
    model.save_pretrained(target)
    enc = build_encoder(name)
    assert enc.weights_source == f"named:{default}" and enc.provenance()["config"]["weights"] is None
    # Any hub name is named weights of its own, through the same resolver.
    hub = tmp_path / "weights" / "huggingface"
    with pytest.raises(CheckpointError, match=f"put config.json.*in {hub}/me--mine"):
        build_encoder(name, weights="me/mine")


def test_hub_checkpoint_is_fetched_file_by_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A named checkpoint through the one resolver, from a local HTTP server standing in for the hub: the
    config first, the optional preprocessor config skipped when the server has none (404), model.safetensors
    missing so its alternative pytorch_model.bin is fetched; then the folder is complete and used offline."""
    import functools
    import http.server
    import threading

    import transformers

    from abawfeat.encoders import huggingface

    repo = tmp_path / "server" / "me" / "tiny" / "resolve" / "main"
    repo.mkdir(parents=True)
    config = transformers.HubertConfig(**SIZES["tiny"])
    torch.manual_seed(3)
    model = transformers.HubertModel(config).eval()
    config.save_pretrained(repo)
    torch.save(model.state_dict(), repo / "pytorch_model.bin")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "server"))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface, "_HUB", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("ABAWFEAT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ABAWFEAT_OFFLINE", raising=False)
    try:
        enc = build_encoder("hubert", weights="me/tiny", layer=3)
    finally:
        server.shutdown()
    folder = hub_folder("me/tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin",
                                                         "pytorch_model.bin.sha256"]
    assert enc.weights_source == "named:me/tiny" and enc.provenance()["config"]["weights"] == "me/tiny"
    x = torch.from_numpy(speechlike(1.0))[None]
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[0], model(x, output_hidden_states=True).hidden_states[3])
    monkeypatch.setenv("ABAWFEAT_OFFLINE", "1")
    again = build_encoder("hubert", weights="me/tiny", layer=3)  # cached: no network needed
    assert again.weights_sha256 == enc.weights_sha256


@pytest.mark.parametrize(("channels", "kernel", "stride", "bias"),
                         [(1, 10, 5, False), (1, 10, 5, True), (6, 3, 2, False), (6, 2, 2, True)])
def test_front_end_convolution_as_a_matrix_product_equals_conv1d(channels: int, kernel: int, stride: int,
                                                                  bias: bool) -> None:
    """The front end's convolutions (the first, from the waveform, and the channel-mixing ones) run as one
    matrix product: the same outputs as torch's conv1d, channel-major like it."""
    from abawfeat.encoders.speech import _MatmulConv1d

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(channels, 7, kernel, stride=stride, bias=bias)
    x = torch.randn(2, channels, 203)
    with torch.no_grad():
        ours = _MatmulConv1d(conv)(x)
        torch.testing.assert_close(ours, conv(x), rtol=1e-5, atol=1e-5)
    assert ours.is_contiguous()
