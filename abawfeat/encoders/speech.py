"""Frozen speech encoders from the ``transformers`` library: wav2vec2, HuBERT and WavLM (the audio modality).

They turn 16 kHz mono audio into 50 outputs per second; stage one (abawfeat/audio/) pools those outputs over
a window around each video frame. The three share one front end (so one output geometry, see
abawfeat/audio/stream.py) and differ in pre-training and in WavLM's relative position bias.

Weights (``weights``), through the one resolver (abawfeat/encoders/weights.py; ``weights_folder`` declares
the Hugging Face layout):
- a local folder with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), e.g. one made by
  ``save_pretrained`` or copied from the hub; its weights file's sha256 identifies it;
- a Hugging Face model name such as ``facebook/wav2vec2-base`` (named weights: the family's known
  checkpoints, and any ``org/name`` given) -> the folder ``$ABAWFEAT_HOME/weights/huggingface/<org>--<name>/``
  (by default under ``~/.cache/abawfeat``), downloaded there when online; offline, the error says exactly
  which files to put there;
- ``random_init=True`` -> a seeded random model of a named size (``tiny`` for tests, ``base`` = the
  wav2vec2-base / hubert-base / wavlm-base architecture, ``large``). Its features mean nothing about affect.

Preprocessing travels with the weights: the checkpoint's ``preprocessor_config.json`` says whether each input
segment is normalised to zero mean and unit variance (random-init models: yes), and it is recorded in the
provenance with the sample rate, the output geometry and the segmenting.

Whole-track statistics: the base models' first convolution is followed by a GroupNorm that normalises each
channel over the whole input, and the input itself is normalised over the whole input. Long audio is encoded
segment by segment (abawfeat/audio/stream.py), so ``track_statistics`` first computes both over the whole
track in one streaming pass, and ``use_track`` makes every segment use them: the front end then gives exactly
the outputs a one-shot pass over the whole track gives, and loudness differences along a video survive (with
per-segment statistics a quiet stretch would be scaled up to the level of a loud one). Only the transformer's
attention still sees one segment at a time.

Layers: ``layer`` N picks hidden state N as transformers' ``output_hidden_states`` gives it: 0 = the input of
the first transformer layer, N = the output of layer N (for the large "stable layer norm" models, before the
final LayerNorm that only ``last_hidden_state`` gets). ``layers`` "a:b" averages hidden states a to b, both
included.
The middle layers of these models carry more about affect than the last, so the default is the middle one
(L // 2). Layers past the last one asked for are dropped from the model, so they cost nothing.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from abawfeat.encoders.base import ENCODERS, PROVENANCE_VERSION, RANDOM_INIT, Encoder, EncoderInfo
from abawfeat.encoders.huggingface import (
    CHECKPOINT,
    CONFIG,
    PREPROCESSOR,
    config_summary,
    hub_folder,
    hub_named_weights,
    load_pretrained,
    read_json,
    transformers,
)
from abawfeat.encoders.weights import NamedWeights
from abawfeat.errors import CheckpointError, ConfigError

SAMPLE_RATE = 16_000
HOP = 320  # samples per output: 50 outputs per second
RECEPTIVE_FIELD = 400  # samples per output (25 ms)
# Weights a checkpoint may lack without changing a frozen forward pass (SpecAugment's mask vector is used in
# training only).
_OPTIONAL_WEIGHTS = ("masked_spec_embed",)

# Random-init architectures. "base" is the library's default config, which is the published base models'.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                 conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
    "base": {},
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
}


@dataclass
class SpeechConfig:
    # A local checkpoint folder or a Hugging Face model name; None = the encoder's default checkpoint.
    weights: str | None = None
    # Seeded random weights of architecture `size` instead of a checkpoint (tests, demos).
    random_init: bool = False
    seed: int = 0
    size: str = "base"  # random-init only: tiny | base | large
    # Hidden state N (0 = transformer input .. L = last layer); None with `layers` None = the middle, L // 2.
    layer: int | None = None
    # "a:b": the mean of hidden states a..b, both included (excludes `layer`).
    layers: str | None = None
    # The pooling window centred on each video frame's timestamp, in ms (20 to 60000): a cache row is the mean
    # of the outputs centred inside it (abawfeat/audio/stream.py). 500 ms = 25 outputs.
    window_ms: float = 500.0
    # Segmenting of long audio (abawfeat/audio/stream.py): outputs kept per segment, and the context fed on
    # each side whose outputs are dropped. Multiples of 20 ms. A segment is chunk_s + 2 context_s long: the
    # models were pre-trained on crops of up to ~16 s, and 24 s keeps the encoder in that regime while the
    # context costs 20 % more compute.
    chunk_s: float = 20.0
    context_s: float = 2.0
    # Zero-mean unit-variance normalisation of each segment's input; None = what the checkpoint's
    # preprocessor_config.json says (random-init: True).
    normalize: bool | None = None


@dataclass(frozen=True)
class _Family:
    model_type: str  # config.json "model_type"
    config_class: str
    model_class: str
    default_weights: str
    known_weights: tuple[str, ...]


def parse_layers(layer: int | None, layers: str | None, n_layers: int) -> tuple[int, ...]:
    """The hidden-state indices to average (see the module docstring); negative N counts from the end."""
    if layer is not None and layers is not None:
        raise ConfigError("layer and layers (--layer, --layers) exclude each other")
    if layers is not None:
        match = re.fullmatch(r"\s*(-?\d+)\s*:\s*(-?\d+)\s*", str(layers))
        if match is None:
            raise ConfigError(f"layers {layers!r}: use a:b, e.g. 6:9 (both included)")
        a, b = (int(g) + (n_layers + 1 if int(g) < 0 else 0) for g in match.groups())
        if not 0 <= a <= b <= n_layers:
            raise ConfigError(f"layers {layers}: need 0 <= a <= b <= {n_layers} (this model's hidden "
                              f"states are 0..{n_layers})")
        return tuple(range(a, b + 1))
    if layer is None:
        return (n_layers // 2,)
    n = layer + (n_layers + 1 if layer < 0 else 0)
    if not 0 <= n <= n_layers:
        raise ConfigError(f"layer {layer}: this model's hidden states are 0..{n_layers}")
    return (n,)


# ------------------------------------------------------------------------------------------------ encoder


@dataclass(frozen=True)
class TrackStatistics:
    """Whole-track statistics that make segment-wise encoding match a one-shot pass (module docstring)."""

    n_samples: int
    mean: float  # of the waveform
    var: float
    conv_mean: np.ndarray | None  # float64 [C]: the first convolution's output per channel (GroupNorm models)
    conv_var: np.ndarray | None


class _TrackGroupNorm(nn.Module):
    """The first convolution's GroupNorm (one group per channel), with the statistics of the whole track when
    they are set, and its own (over the input it is given) otherwise."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        if norm.num_groups != norm.num_channels:
            raise ValueError("expected a GroupNorm with one group per channel")
        self.norm = norm
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.var is None:
            return self.norm(h)
        h = h.float()
        scale = self.norm.weight.float() / torch.sqrt(self.var + self.norm.eps)
        return (h - self.mean[:, None]) * scale[:, None] + self.norm.bias.float()[:, None]


class _MatmulConv1d(nn.Module):
    """A front-end convolution (the first, 1 -> 512 channels with kernel 10 and stride 5, and the 512 -> 512
    ones with kernel 2-3 and stride 2) as one matrix product over the unfolded input: the same arithmetic in
    another summation order, and in bf16 faster than oneDNN's conv1d on CPU, whose output also needs a
    layout conversion (docs/performance.md). It shares the convolution's parameters."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        if conv.padding != (0,) or conv.dilation != (1,) or conv.groups != 1:
            raise ValueError("only unpadded, undilated, ungrouped convolutions")
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        kernel, stride = int(conv.kernel_size[0]), int(conv.stride[0])
        b, c, _ = x.shape
        # [B, C, T', k] -> [B, C k, T'] (channel-major rows, as the weight's columns), so that
        # [C_out, C k] @ [B, C k, T'] writes the output channel-major, the layout the norms after it read.
        patches = x.unfold(2, kernel, stride).transpose(2, 3)
        patches = patches.reshape(b, c * kernel, patches.shape[-1])
        out = torch.matmul(conv.weight.reshape(conv.out_channels, -1), patches)
        return out if conv.bias is None else out.add_(conv.bias[:, None].to(out.dtype))


class SpeechEncoder(Encoder):
    """A frozen transformers speech model; ``forward`` maps 16 kHz waveforms to 50 Hz hidden states.

    Audio contract (the face encoders' ``transform`` / ``input_size`` do not apply):
        modality = "audio"; sample_rate = 16000; hop = 320; receptive_field = 400
        forward(waveform [B, N] float32, already normalised) -> (hidden [B, T, D], None),
            T = (N - 400) // 320 + 1
        encode(samples float32 [N]) -> float32 [T, D]: normalisation (if the checkpoint asks) + forward
        track_statistics(blocks) -> TrackStatistics; use_track(stats): segments then use the whole track's
    """

    modality: ClassVar[str] = "audio"
    config_class = SpeechConfig
    weights_folder = CHECKPOINT
    family: ClassVar[_Family]
    sample_rate: ClassVar[int] = SAMPLE_RATE
    hop: ClassVar[int] = HOP
    receptive_field: ClassVar[int] = RECEPTIVE_FIELD

    def __init__(self, config: SpeechConfig) -> None:
        if config.size not in SIZES:
            raise ConfigError(f"encoder {self.name!r} option size={config.size!r} (--encoder-opt): use one "
                              f"of {', '.join(SIZES)}")
        if config.random_init and config.weights is not None:
            raise ConfigError("--random-init and --weights exclude each other")
        for name in ("chunk_s", "context_s"):
            value = getattr(config, name)
            steps = value * SAMPLE_RATE / HOP
            if value < (0.02 if name == "chunk_s" else 0) or abs(steps - round(steps)) > 1e-6:
                raise ConfigError(f"{name} {value}: must be a multiple of 0.02 s (one output)"
                                  + (", at least 0.02" if name == "chunk_s" else ""))
        if not (math.isfinite(config.window_ms) and 20.0 <= config.window_ms <= 60_000.0):
            raise ConfigError(f"window_ms {config.window_ms}: use 20 (one encoder output) to 60000")
        super().__init__(config)
        tf = transformers()
        config_cls = getattr(tf, self.family.config_class)
        model_cls = getattr(tf, self.family.model_class)
        normalize = config.normalize
        if config.random_init:
            model_config = config_cls(**SIZES[config.size])
            # fork_rng: the seed makes the weights, without disturbing the caller's random state.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = model_cls(model_config)
            self.weights_source = RANDOM_INIT
            self.weights_sha256 = RANDOM_INIT
            if normalize is None:
                normalize = True
        else:
            resolved = self.resolve_weights(config.weights or self.family.default_weights)
            folder = resolved.path.parent
            model = self._load(model_cls, folder)
            model_config = model.config
            self.weights_source = resolved.source
            self.weights_sha256 = resolved.sha256
            if (folder / PREPROCESSOR).is_file():
                pre = read_json(folder / PREPROCESSOR)
                rate = pre.get("sampling_rate", SAMPLE_RATE)
                if rate != SAMPLE_RATE:
                    raise CheckpointError(f"{folder / PREPROCESSOR}: sampling_rate {rate}; these encoders "
                                          f"take {SAMPLE_RATE} Hz audio")
                if normalize is None:
                    normalize = bool(pre.get("do_normalize", True))
            elif normalize is None:
                normalize = True  # the transformers feature extractor's default
        self.normalize = bool(normalize)
        self.n_layers = int(model_config.num_hidden_layers)
        self.layers = parse_layers(config.layer, config.layers, self.n_layers)
        self._model_config = config_summary(model_config)
        self.model = _truncate(model, max(self.layers)).eval()
        first = self.model.feature_extractor.conv_layers[0]
        self._conv0: nn.Conv1d = first.conv
        for layer in self.model.feature_extractor.conv_layers:
            layer.conv = _MatmulConv1d(layer.conv)
        self._group_norm: _TrackGroupNorm | None = None
        if isinstance(getattr(first, "layer_norm", None), nn.GroupNorm):
            self._group_norm = first.layer_norm = _TrackGroupNorm(first.layer_norm)
        self._track: TrackStatistics | None = None
        self.feature_dim = int(model_config.hidden_size)
        self.logit_names = None
        self.transform = None  # type: ignore[assignment]  # audio: no image transform
        self.chunk = int(round(config.chunk_s * SAMPLE_RATE / HOP))
        self.context = int(round(config.context_s * SAMPLE_RATE / HOP))

    def _load(self, model_cls: Any, folder: Path) -> Any:
        model_type = read_json(folder / CONFIG).get("model_type")
        if model_type != self.family.model_type:
            raise CheckpointError(f"{folder}: holds a {model_type!r} model, not {self.family.model_type!r} "
                                  f"(use the matching --backbone)")
        return load_pretrained(model_cls, folder, self.name, _OPTIONAL_WEIGHTS)

    # -- the contract
    @property
    def input_size(self) -> int:
        return 0  # not an image encoder

    @property
    def mean(self) -> tuple[float, float, float]:
        return ()  # type: ignore[return-value]  # no image normalisation

    @property
    def std(self) -> tuple[float, float, float]:
        return ()  # type: ignore[return-value]

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Hidden state(s) of ``self.layers`` (averaged) for normalised 16 kHz waveforms [B, N]."""
        if len(self.layers) == 1:
            # The model was cut after this layer, so its last hidden state is the one asked for.
            return self.model(waveform).last_hidden_state, None
        states = self.model(waveform, output_hidden_states=True).hidden_states
        return torch.stack([states[i].float() for i in self.layers]).mean(0), None

    def prepare(self, samples: np.ndarray) -> np.ndarray:
        """The checkpoint's input normalisation (that of transformers' feature extractor: zero mean, unit
        variance, epsilon 1e-7), with the whole track's statistics when ``use_track`` set them, else with
        those of ``samples``."""
        x = np.asarray(samples, dtype=np.float32)
        if self.normalize:
            if self._track is not None:
                mean, var = self._track.mean, self._track.var
            else:
                mean, var = float(x.astype(np.float64).mean()), float(x.astype(np.float64).var())
            x = ((x - np.float32(mean)) / np.float32(np.sqrt(var + 1e-7))).astype(np.float32)
        return x

    @torch.no_grad()
    def track_statistics(self, blocks: Iterable[np.ndarray]) -> TrackStatistics:
        """One streaming pass over a track's samples (any block sizes; memory: one block): the waveform's
        mean and variance and, for GroupNorm models, the first convolution's mean and variance per channel on
        the normalised input, as a one-shot pass over the whole track computes them.

        The convolution runs on the raw samples; since it is linear, its statistics on the normalised input
        (x - m) / s follow exactly: mean' = (mean - m * sum(w)) / s + bias, var' = var / s^2 (float64
        sums)."""
        norm = self._group_norm
        conv = self._conv0
        kernel, stride = int(conv.kernel_size[0]), int(conv.stride[0])
        weight = conv.weight.detach().float()
        channels = int(conv.out_channels)
        total, w1, w2 = 0, 0.0, 0.0
        # The convolution is linear, so its per-channel sums follow from the input patches' sums: sum_t h_ct
        # = w_c . sum_t p_t and sum_t h_ct^2 = w_c' (sum_t p_t p_t') w_c, with p_t the k samples of output t.
        # A k x k moment matrix per block instead of every output of every channel.
        s1, s2 = np.zeros(kernel, np.float64), np.zeros((kernel, kernel), np.float64)
        count = 0
        carry = np.zeros(0, np.float32)
        for block in blocks:
            b = np.asarray(block, dtype=np.float32)
            b64 = b.astype(np.float64)
            total += len(b)
            w1 += float(b64.sum())
            w2 += float(np.dot(b64, b64))
            if norm is None:
                continue
            buf = np.concatenate([carry, b]) if len(carry) else b
            if len(buf) < kernel:
                carry = buf
                continue
            m = (len(buf) - kernel) // stride + 1
            used = buf[: stride * (m - 1) + kernel]
            patches = np.lib.stride_tricks.sliding_window_view(used, kernel)[::stride].astype(np.float64)
            s1 += patches.sum(axis=0)
            s2 += patches.T @ patches
            count += m
            carry = buf[stride * m :]
        w = weight.double().reshape(channels, kernel).cpu().numpy()
        c1 = w @ s1
        c2 = np.einsum("ck,kl,cl->c", w, s2, w)
        mean = w1 / total if total else 0.0
        var = max(w2 / total - mean * mean, 0.0) if total else 0.0
        if norm is None or count == 0:
            return TrackStatistics(total, mean, var, None, None)
        shift, scale = (mean, float(np.sqrt(var + 1e-7))) if self.normalize else (0.0, 1.0)
        raw_mean = c1 / count
        raw_var = np.maximum(c2 / count - raw_mean * raw_mean, 0.0)
        w_sum = weight.double().sum(dim=(1, 2)).cpu().numpy()
        bias = conv.bias.detach().double().cpu().numpy() if conv.bias is not None else 0.0
        conv_mean = (raw_mean - shift * w_sum) / scale + bias
        return TrackStatistics(total, mean, var, conv_mean, raw_var / scale**2)

    @contextlib.contextmanager
    def use_track(self, stats: TrackStatistics) -> Iterator[None]:
        """Within the block, every ``encode`` call normalises with the whole track's statistics."""
        previous = self._track
        self._track = stats
        norm = self._group_norm
        if norm is not None and stats.conv_mean is not None and stats.conv_var is not None:
            device = self._conv0.weight.device
            norm.mean = torch.as_tensor(stats.conv_mean, dtype=torch.float32, device=device)
            norm.var = torch.as_tensor(stats.conv_var, dtype=torch.float32, device=device)
        try:
            yield
        finally:
            self._track = previous
            if norm is not None:
                norm.mean = norm.var = None

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """float32 [T, D] for one segment of 16 kHz mono samples (call under no_grad and any autocast)."""
        device = next(self.model.parameters()).device
        x = torch.from_numpy(self.prepare(samples)).to(device)[None]
        return self(x)[0][0].float().cpu().numpy()

    def provenance(self) -> dict[str, Any]:
        import av

        return {
            "provenance_version": PROVENANCE_VERSION,
            "name": self.name,
            "config": self.provenance_config(),
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "calibration": None,
            "preprocessing": {
                "modality": "audio",
                "sample_rate": SAMPLE_RATE,
                "channels": "mono",
                "decoder": "PyAV: libswresample's default resampler per channel, then the channels' mean",
                "normalize": self.normalize,
                "hop_samples": HOP,
                "receptive_field_samples": RECEPTIVE_FIELD,
                "outputs_per_second": SAMPLE_RATE / HOP,
                "chunk_s": self.config.chunk_s,
                "context_s": self.config.context_s,
                "statistics": "whole track: input normalisation and the first GroupNorm (if any)",
            },
            "feature_dim": self.feature_dim,
            "logit_names": None,
            "layers": list(self.layers),
            "model_config": self._model_config,
            "transformers_version": transformers().__version__,
            "av_version": av.__version__,
        }

    def provenance_config(self) -> dict[str, Any]:
        config = super().provenance_config()
        # A folder's path says where the weights were that day; weights_sha256 says what they are.
        if self.weights_source.startswith("dir:"):
            config["weights"] = self.weights_source
        return config

    # -- registry hooks
    @classmethod
    def named_weights(cls, config: Any | None = None) -> dict[str, NamedWeights]:
        """The family's known Hugging Face checkpoints, and the one ``config`` names if it is another hub
        name (any ``org/name`` works; a folder by that path is used first, by the resolver)."""
        return hub_named_weights(cls.family.known_weights, getattr(config, "weights", None), cls.name)

    @classmethod
    def describe(cls) -> EncoderInfo:
        return EncoderInfo(
            name=cls.name,
            feature_dim=768,
            input_size=SAMPLE_RATE,
            mean=(),
            std=(),
            interpolation="-",
            weights=f"{cls.family.default_weights} (Hugging Face name or folder)",
            logit_names=None,
            summary=cls.summary,
            modality="audio",
        )

    @classmethod
    def smoke_options(cls) -> dict[str, Any]:
        return {"random_init": True, "size": "tiny"}


def _truncate(model: Any, last: int) -> Any:
    """Keep the transformer layers up to hidden state ``last``, so that the model's last hidden state is
    hidden state ``last`` exactly as ``output_hidden_states`` gives it. The "stable layer norm" models (the
    large ones) apply a final LayerNorm to their last hidden state only, which no hidden state includes; it
    goes."""
    encoder = model.encoder
    if last < len(encoder.layers):
        encoder.layers = encoder.layers[:last]
    if getattr(model.config, "do_stable_layer_norm", False):
        encoder.layer_norm = nn.Identity()
    return model


_FAMILIES: dict[str, _Family] = {
    "wav2vec2": _Family("wav2vec2", "Wav2Vec2Config", "Wav2Vec2Model", "facebook/wav2vec2-base",
                        ("facebook/wav2vec2-base", "facebook/wav2vec2-large-lv60",
                         "facebook/wav2vec2-large-robust")),
    "hubert": _Family("hubert", "HubertConfig", "HubertModel", "facebook/hubert-base-ls960",
                      ("facebook/hubert-base-ls960", "facebook/hubert-large-ll60k")),
    "wavlm": _Family("wavlm", "WavLMConfig", "WavLMModel", "microsoft/wavlm-base-plus",
                     ("microsoft/wavlm-base-plus", "microsoft/wavlm-large")),
}


@ENCODERS.register("wav2vec2")
class Wav2Vec2Encoder(SpeechEncoder):
    family = _FAMILIES["wav2vec2"]
    summary = "wav2vec 2.0 (transformers): 50 Hz hidden states of 16 kHz mono audio"


@ENCODERS.register("hubert")
class HubertEncoder(SpeechEncoder):
    family = _FAMILIES["hubert"]
    summary = "HuBERT (transformers): 50 Hz hidden states of 16 kHz mono audio"


@ENCODERS.register("wavlm")
class WavLMEncoder(SpeechEncoder):
    family = _FAMILIES["wavlm"]
    summary = "WavLM (transformers): 50 Hz hidden states of 16 kHz mono audio"


__all__ = [
    "SIZES", "HubertEncoder", "SpeechConfig", "SpeechEncoder", "Wav2Vec2Encoder", "WavLMEncoder",
    "CHECKPOINT", "hub_folder", "parse_layers",
]
