"""A new encoder touches no CLI or extract code: a toy registered here goes through the real commands.

This module is the "Add an encoder" recipe of docs/encoders.md, step for step: a config dataclass with the
generic fields and its own options, an ``Encoder`` subclass registered with ``@ENCODERS.register`` that sets
its preprocessing, loads its weights through the one resolver, declares its trainable blocks and saves its
weights. Nothing outside this file knows it exists, yet ``abawfeat encoders`` lists it, ``abawfeat extract
--backbone fake-toy --encoder-opt ...`` caches its features, ``abawfeat finetune`` trains it end to end, and
``abawfeat evaluate`` scores the fine-tuned run on a cache extracted with the weights it saved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from abawfeat.cache import FeatureCache
from abawfeat.cli import app
from abawfeat.data.synth import SynthConfig, generate
from abawfeat.encoders import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM_INIT,
    Block,
    Encoder,
    EncoderInfo,
    ImageTransform,
)
from abawfeat.errors import CheckpointError, ConfigError
from abawfeat.utils.io import torch_save

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- step 1: the config: the generic fields (weights, random_init, seed) and the encoder's own options -------
@dataclass
class ToyConfig:
    weights: str | None = None  # a file written by save_weights (--weights)
    random_init: bool = False  # seeded random weights (--random-init)
    seed: int = 0  # their seed (--seed)
    width: int = 4  # feature size (--encoder-opt width=8)
    pool: str = "mean"  # how the stem's map becomes a vector: mean or max (--encoder-opt pool=max)


# -- step 2: the encoder -------------------------------------------------------------------------------------
@ENCODERS.register("fake-toy")
class ToyEncoder(Encoder):
    """A 16 x 16 stem conv and a linear mix: two trainable blocks."""

    config_class = ToyConfig
    summary = "test-only toy encoder (docs/encoders.md)"

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        if config.pool not in ("mean", "max"):
            raise ConfigError(f"fake-toy: pool {config.pool!r}: use mean or max")
        self.transform = ImageTransform(16, IMAGENET_MEAN, IMAGENET_STD)  # preprocessing travels with it
        self.feature_dim = config.width
        with torch.random.fork_rng(devices=[]):  # the same seed gives the same network, whatever ran before
            torch.manual_seed(config.seed)
            self.conv = nn.Conv2d(3, config.width, 4, stride=4)
            self.mix = nn.Linear(config.width, config.width)
        if config.random_init:
            self.weights_source = self.weights_sha256 = RANDOM_INIT
        elif config.weights is None:
            raise ConfigError("fake-toy has no published weights: give --weights FILE or --random-init")
        else:
            resolved = self.resolve_weights(config.weights)  # a file, or one of named_weights() (none here)
            try:
                self.load_state_dict(torch.load(resolved.path, map_location="cpu", weights_only=True))
            except Exception as exc:  # noqa: BLE001 - a wrong file is the user's: one line
                kind = type(exc).__name__
                raise CheckpointError(f"{resolved.path}: not fake-toy weights ({kind})") from None
            self.weights_source, self.weights_sha256 = resolved.source, resolved.sha256

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        fmap = torch.relu(self.conv(x))
        pooled = fmap.mean(dim=(2, 3)) if self.config.pool == "mean" else fmap.amax(dim=(2, 3))
        return self.mix(pooled), None

    # -- step 3 (fine-tuning): blocks in forward order and a weights file that --weights reads back --------
    def blocks(self) -> list[Block]:
        return [Block("stem", ("conv",)), Block("mix", ("mix",))]

    def save_weights(self, path: str | Path, *, step: int = 0) -> Path:
        return torch_save(path, {k: v.detach().cpu() for k, v in self.state_dict().items()})

    @classmethod
    def describe(cls) -> EncoderInfo:
        return EncoderInfo(name=cls.name, feature_dim=ToyConfig.width, input_size=16, mean=IMAGENET_MEAN,
                           std=IMAGENET_STD, interpolation="bilinear", weights="random-init or a file",
                           logit_names=None, summary=cls.summary)


# -- the proof -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "synth"
    generate(SynthConfig(videos=4, frames=10, seed=0, va_invalid_rate=0.0, expr_invalid_rate=0.0,
                         au_invalid_rate=0.0, extra_crops_fraction=0.0, missing_crop_rate=0.0), out)
    return out


def cli(*args: str) -> object:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_a_registered_toy_encoder_runs_through_every_command(root: Path, tmp_path: Path) -> None:
    listed = json.loads(cli("encoders", "--json").stdout)
    toy = next(e for e in listed["encoders"] if e["name"] == "fake-toy")
    assert set(toy["options"]) == {"width", "pool"}  # its own options, typed: "int = 4", "str = 'mean'"

    # Stage one with the encoder's own options, typed by its config.
    cache = tmp_path / "toy.h5"
    cli("extract", "--backbone", "fake-toy", "--random-init", "--encoder-opt", "width=8",
        "--encoder-opt", "pool=max", "--data", str(root), "--out", str(cache), "--workers", "0")
    with FeatureCache(cache) as fc:
        assert fc.feature_dim == 8 and fc.provenance["encoder_config"]["pool"] == "max"
        assert fc.provenance["weights_sha256"] == RANDOM_INIT

    # Fine-tuning from the last block on, then a cache from the weights it saved, then stage two's evaluate.
    run = tmp_path / "run"
    cli("finetune", "--backbone", "fake-toy", "--random-init", "--encoder-opt", "width=8",
        "--encoder-opt", "pool=max", "--unfreeze-from", "mix", "--task", "expr", "--data", str(root),
        "--out", str(run), "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu",
        "--precision", "fp32", "--no-plots", "--eval-batch-size", "16")
    info = json.loads((run / "config.json").read_text())
    assert info["extra"]["blocks"] == {"trainable": ["mix"], "frozen": ["stem"]}
    saved = run / "fake-toy_finetuned.pth"
    start = ToyEncoder(ToyConfig(random_init=True, width=8, pool="max")).state_dict()
    tuned = torch.load(saved, weights_only=True)
    assert torch.equal(tuned["conv.weight"], start["conv.weight"])  # frozen block untouched
    assert not torch.equal(tuned["mix.weight"], start["mix.weight"])  # trainable block trained

    tuned_cache = tmp_path / "toy-tuned.h5"
    cli("extract", "--backbone", "fake-toy", "--weights", str(saved.resolve()), "--encoder-opt", "width=8",
        "--encoder-opt", "pool=max", "--data", str(root), "--out", str(tuned_cache), "--workers", "0",
        "--dtype", "float32")
    again = json.loads(cli("evaluate", str(run), "--cache", str(tuned_cache), "--json").stdout)
    metrics = json.loads((run / "metrics.json").read_text())
    assert again["f1_expr"] == pytest.approx(metrics["f1_expr"], abs=1e-4)
    # Any other cache of this encoder (here: the random-init one) is refused for the fine-tuned head.
    refused = CliRunner().invoke(app, ["evaluate", str(run), "--cache", str(cache), "--json"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "fingerprint differs in encoder_config, weights_sha256" in refused.output.replace("\n", " ")


def test_a_toy_option_error_names_the_option_and_lists_the_options(root: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["extract", "--backbone", "fake-toy", "--random-init", "--encoder-opt",
                                      "width=wide", "--data", str(root), "--out", str(tmp_path / "x.h5")])
    text = result.output.replace("\n", " ")
    assert result.exit_code == 2 and "Traceback" not in text
    assert "encoder 'fake-toy' option width='wide': expected int" in text and "pool" in text
