"""End-to-end fine-tuning (``abawfeat finetune``) on a tiny synthetic Aff-Wild2 tree.

The tree comes from ``abawfeat.data.synth`` (4 videos of ~10 frames at 112 x 112: 2 train, 1 val, 1 test),
with one validation crop deleted so the official protocol has a frame to fill. Runs are one or two epochs
with batches of 2-4 frames, backbone trainable from ``conv_6_sep`` (the late blocks) to keep backward cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from abawfeat.cli import app
from abawfeat.data.affwild2 import AffWild2
from abawfeat.data.frames import AugmentConfig, FrameSource, FrameWindows, epoch_steps, load_frames_split
from abawfeat.data.synth import SynthConfig, generate
from abawfeat.encoders import build_encoder, load_ddamfn_net
from abawfeat.encoders.ddamfn import BLOCKS, DDAMFNEncoder
from abawfeat.errors import CheckpointError, ConfigError, DataError, RunError
from abawfeat.finetune import (
    ATTENTION_KEY,
    STATE_FILE,
    FinetuneConfig,
    FinetuneModel,
    StepLoss,
    Stepper,
    block_index,
    embed_rows,
    resume_finetune,
    run_finetune,
    validate_finetune,
)
from abawfeat.heads import build_head
from abawfeat.train import Batch, TrainConfig, build_objective, load_run

FIXTURE = Path(__file__).parent / "fixtures" / "ddamfn" / "ddamfn_official_format_random.pth"
PUBLISHED_FILE = DDAMFNEncoder.weights_filename()  # the backbone in the published DDAMFN format
# Blocks before conv_6_sep: frozen in most runs here.
FROZEN_PREFIXES = tuple(f"features.{i}." for i in range(8))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "synth"
    generate(SynthConfig(videos=4, frames=10, seed=0, va_invalid_rate=0.0, expr_invalid_rate=0.0,
                         au_invalid_rate=0.0, extra_crops_fraction=0.0, missing_crop_rate=0.0), out)
    data = AffWild2(out)
    video = data.videos("va", "val")[0]
    (data.crop_dir(video) / "00005.jpg").unlink()  # a labelled frame without a crop, mid-video
    return out


def config(root: Path, out: Path, **kw: object) -> FinetuneConfig:
    train = TrainConfig(task="expr", head="fc", data=str(root), out=str(out), epochs=1, batch_size=4,
                        lr=1e-2, device="cpu", precision="fp32", plots=False)
    train_kw = {k: kw.pop(k) for k in list(kw) if hasattr(train, k)}
    base = FinetuneConfig(train=replace(train, **train_kw), random_init=True, calibration_frames=8,
                          stats_frames=8, workers=0, unfreeze_from="conv_6_sep", eval_batch_size=16)
    return replace(base, **kw)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------ no training needed


def test_blocks_and_impossible_options_are_refused(root: Path, tmp_path: Path) -> None:
    assert PUBLISHED_FILE == "ddamfn_finetuned.pth"
    assert block_index(BLOCKS, "conv1") == 0 and block_index(BLOCKS, "gdconv") == len(BLOCKS) - 1
    assert block_index(BLOCKS, "7") == block_index(BLOCKS, "conv_5") == 7
    assert block_index(BLOCKS, None) == 0  # default: the whole encoder trains
    with pytest.raises(ConfigError, match="conv_6_sep"):
        block_index(BLOCKS, "layer4", "ddamfn")
    with pytest.raises(ConfigError, match="declares no trainable blocks"):
        block_index([], None, "fake-frozen")
    for bad in ({"weights": str(FIXTURE)}, {"grad_accum": 0}, {"backbone_lr": 0.0}, {"schedule": "step"},
                {"backbone": "resnet"}, {"objective": "contrastive"}, {"augment": AugmentConfig(hflip=2.0)},
                {"encoder_options": {"num_haed": "3"}}):
        with pytest.raises(ConfigError):
            validate_finetune(config(root, tmp_path / "x", **bad))
    # The attention-diversity loss needs attention heads, which CLIP does not declare: one line says so.
    no_heads = "--attention-diversity needs an encoder with attention heads; clip"
    with pytest.raises(ConfigError, match=no_heads):
        validate_finetune(config(root, tmp_path / "x", backbone="clip", attention_diversity=True))


def test_global_batches_do_not_depend_on_processes_or_accumulation() -> None:
    def union(world: int, batch: int, accum: int, epoch: int = 3) -> list[list[tuple[int, int]]]:
        per_rank = [epoch_steps(11, seed=5, epoch=epoch, batch_size=batch, grad_accum=accum, world_size=world,
                                rank=r) for r in range(world)]
        # Step s of the global run = rank 0's micro-batches, then rank 1's, ...
        return [[k for r in range(world) for micro in per_rank[r][s] for k in micro]
                for s in range(len(per_rank[0]))]

    one = union(1, 4, 1)
    assert union(2, 2, 1) == one == union(1, 2, 2) == union(2, 1, 2)
    keys = [k for step in one for k in step]
    assert len(one) == 3 and {w for w, _ in keys} == set(range(11))  # 12 slots: the last wraps around
    assert union(1, 4, 1, epoch=4) != one  # a new order every epoch, a fixed one per (seed, epoch)


def test_step_loss_is_the_global_batch_loss_whatever_the_split() -> None:
    # Two micro-batches with 3 and 1 labelled frames: a mean of per-micro-batch means would weigh the single
    # frame of the second as much as the three of the first.
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 1, 8)
    target = torch.tensor([[[1], [2]], [[3], [4]]])
    valid = torch.tensor([[[True], [True]], [[True], [False]]])
    objective = build_objective("ce", torch.nn.Identity(), ("expr",))
    loss = StepLoss({"expr": objective}, ("expr",))
    batches = [Batch(inputs=torch.zeros(2, 1, 1), mask=torch.ones(2, 1, dtype=torch.bool),
                     targets={"expr": target[i]}, valid={"expr": valid[i]}, rows=np.zeros((2, 1), np.int64))
               for i in range(2)]
    counts = [loss.counts(b) for b in batches]
    total = torch.stack(counts).sum(0)
    split = sum(float(loss({"expr": logits[i]}, batches[i], counts[i], total)) for i in range(2))
    whole = float(torch.nn.functional.cross_entropy(logits.reshape(4, 8)[valid.reshape(4)],
                                                    target.reshape(4)[valid.reshape(4)]))
    assert split == pytest.approx(whole, rel=1e-6)


def test_augmentation_changes_training_windows_only(root: Path) -> None:
    data = AffWild2(root)
    seqs, dirs = load_frames_split(data, ("expr",), "val")
    encoder = build_encoder("ddamfn", weights=str(FIXTURE))
    strong = AugmentConfig(hflip=1.0, brightness=0.5, degrees=20.0)
    rows = FrameWindows(seqs, dirs, np.arange(4)[:, None], ("expr",), encoder.transform, strong)
    plain = torch.stack([encoder.transform(Image.open(rows.path(r))) for r in range(4)])
    assert torch.equal(torch.stack([rows[(r, -1)]["images"][0] for r in range(4)]), plain)
    assert not torch.allclose(rows[(0, 12345)]["images"][0], plain[0], atol=0.1)

    head = build_head("tasks", in_dim=512, tasks=("expr",), trunk="fc")
    model = FinetuneModel(encoder, head, channels_last=False)
    got = embed_rows(model, rows, batch_size=3, device=torch.device("cpu"), precision="fp32")
    with torch.no_grad():
        reference = model.eval().embed(plain)[0].numpy()
        augmented = model.embed(torch.stack([rows[(r, 7)]["images"][0] for r in range(4)]))[0].numpy()
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)  # evaluation never augments
    assert np.abs(augmented - reference).max() > 1e-3  # ...and augmentation would have shown


def test_a_few_steps_on_one_batch_lower_its_loss(root: Path) -> None:
    data = AffWild2(root)
    seqs, dirs = load_frames_split(data, ("expr",), "train")
    encoder = build_encoder("ddamfn", weights=str(FIXTURE))
    torch.manual_seed(0)
    head = build_head("tasks", in_dim=512, tasks=("expr",), trunk="fc", normalize=False)
    model = FinetuneModel(encoder, head, unfreeze_from="conv_6_sep", aux_outputs=(ATTENTION_KEY,)).train()
    windows = FrameWindows(seqs, dirs, np.arange(4)[:, None], ("expr",), encoder.transform)
    micro = next(FrameSource(windows, batch_size=4).batches(1))
    optimizer = torch.optim.AdamW([{"params": model.backbone_parameters(), "lr": 1e-3},
                                   {"params": list(head.parameters()), "lr": 1e-2}])
    step = Stepper(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                   torch.amp.GradScaler("cpu", enabled=False),
                   StepLoss({"expr": build_objective("ce", head, ("expr",))}, ("expr",), 0.1),
                   torch.device("cpu"), "fp32", grad_clip=1.0)
    losses = [step(model, micro) for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------------------------------- real runs


def test_run_trains_unfrozen_blocks_only_and_writes_a_stage_two_run_dir(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = config(root, out, task="va", weights=str(FIXTURE), random_init=False, attention_diversity=True)
    assert run_finetune(cfg) == out

    start = _state(FIXTURE)["model_state_dict"]
    final = load_ddamfn_net(out / PUBLISHED_FILE).state_dict()  # strict load of the published format
    assert final.keys() == start.keys()
    same = {k for k in start if torch.equal(start[k], final[k])}
    frozen = {k for k in start if k.startswith(FROZEN_PREFIXES)}
    assert frozen <= same  # weights AND batch-norm statistics of frozen blocks
    for prefix in ("features.8.", "cat_head0.", "cat_head1.", "Linear."):
        assert any(k.startswith(prefix) and k not in same for k in start), prefix
    assert {k for k in start if k.startswith(("fc.", "bn."))} <= same  # AffectNet classifier: not ours

    # The run directory of stage two, readable by its tools.
    for name in ("config.json", "checkpoint.pt", "metrics.json", "history.csv", "val_outputs.npz"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"task", "split", "best_epoch", "ccc_valence", "ccc_arousal", "ccc_va"} <= set(metrics)
    run = load_run(out)
    assert run.task == "va" and run.head.tasks == ("va",)
    assert run.record.label == "DDAMFN+Fc (end-to-end)"  # reports give it a row of its own
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["epoch", "train_loss", "val_loss", "val_metric", "seconds"]
    # Official protocol: every labelled val frame, the crop-less one filled between its neighbours.
    npz = np.load(out / "val_outputs.npz")
    hole = np.flatnonzero(~npz["has_crop"])
    assert len(hole) == 1 and npz["frame"][hole[0]] == 5 and npz["va_valid"].all()
    pred = npz["va_pred"]
    np.testing.assert_allclose(pred[hole[0]], (pred[3] + pred[5]) / 2, atol=1e-6)

    # Round trip: the published checkpoint gives the in-memory model's embeddings, and a cache extracted
    # with it is the one checkpoint.pt asks for, on which stage two's evaluate reproduces metrics.json.
    model = FinetuneModel(build_encoder("ddamfn", weights=str(FIXTURE)),
                          build_head("tasks", trunk="fc", in_dim=512, tasks=("va",)),
                          unfreeze_from="conv_6_sep")
    model.load_state_dict(_state(out / STATE_FILE)["model"])
    reloaded = FinetuneModel(build_encoder("ddamfn", weights=str(out / PUBLISHED_FILE)),
                             build_head("tasks", trunk="fc", in_dim=512, tasks=("va",)))
    reference = np.load(FIXTURE.with_name("ddamfn_reference_outputs.npz"))
    images = torch.from_numpy(reference["input_normalized_nchw"])
    with torch.no_grad():
        assert torch.equal(model.eval().embed(images)[0], reloaded.eval().embed(images)[0])

    from abawfeat.extract import ExtractConfig, run_extraction
    from abawfeat.train import evaluate

    cache = tmp_path / "finetuned.h5"
    run_extraction(ExtractConfig(backbone="ddamfn", data=root, out=cache, workers=0, dtype="float32",
                                 weights=str((out / PUBLISHED_FILE).resolve()), progress=False))
    again = evaluate(out, cache_path=cache)
    for key in ("ccc_valence", "ccc_arousal", "ccc_va"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-4), key


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(root: Path, tmp_path: Path) -> None:
    # Dropout, augmentation and the diversity loss on: restoring RNG, optimiser and schedule all matter.
    kw = {"epochs": 2, "dropout": 0.3, "hidden": 16, "attention_diversity": True}
    straight = run_finetune(config(root, tmp_path / "straight", **kw))
    interrupted = run_finetune(config(root, tmp_path / "resumed", **kw), stop_after_epochs=1)
    assert not (interrupted / "metrics.json").exists()
    with pytest.raises(RunError, match="--resume"):
        run_finetune(config(root, interrupted, **kw))  # never silently restarts over a run
    before = {f.name: f.read_bytes() for f in straight.iterdir() if f.is_file()}
    with pytest.raises(RunError, match="complete run .*--overwrite"):
        run_finetune(config(root, straight, **kw))  # nor over a complete one
    assert {f.name: f.read_bytes() for f in straight.iterdir() if f.is_file()} == before
    with pytest.raises(ConfigError, match="overwrite"):
        run_finetune(config(root, straight, **kw), overwrite=True, stop_after_epochs=1)
    result = CliRunner().invoke(app, ["train-head", "--resume", str(interrupted)])
    assert result.exit_code == 0, result.output
    resumed = interrupted

    a, b = _state(straight / STATE_FILE), _state(resumed / STATE_FILE)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moments = [[t for s in st["optimizer"]["state"].values() for t in s.values()] for st in (a, b)]
    assert all(torch.equal(x, y) for x, y in zip(*moments, strict=True))
    assert (straight / "metrics.json").read_text() == (resumed / "metrics.json").read_text()
    drop = ("seconds",)
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in s["history"]] for s in (a, b)]
    assert rows[0] == rows[1]

    # --overwrite: the new run (one epoch) takes the old one's place once complete, and only then.
    replaced = run_finetune(config(root, straight, **{**kw, "epochs": 1}), overwrite=True)
    assert replaced == straight and json.loads((straight / "config.json").read_text())["train"]["epochs"] == 1
    # Nothing left of the replacement beside it but the run's writer lock (which stays, as a cache's does).
    assert (straight / "metrics.json").is_file() and [p.name for p in tmp_path.glob(".straight.*")] == [
        ".straight.lock"]


def test_two_processes_agree_with_one(root: Path, tmp_path: Path) -> None:
    # Same global batch (4 = 1 x 4 = 2 x 2); frozen batch-norm statistics and per-frame losses make the
    # two runs the same computation up to float summation order (docs/finetune.md, "Distributed"). The
    # attention-diversity term is a batch-level ratio, so it is left out here, as train-mode BN is.
    # The CLI's defaults for what it does not expose (calibration and statistics frames: all crops here).
    kw = {"freeze_bn": True, "calibration_frames": 256, "stats_frames": 2048}
    single = run_finetune(config(root, tmp_path / "one", batch_size=4, **kw))
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", ABAWFEAT_NO_PROGRESS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "abawfeat", "finetune", "--task", "expr", "--head", "fc", "--data", str(root),
         "--out", str(two),
         "--epochs", "1", "--batch-size", "2", "--lr", "0.01", "--device", "cpu", "--precision", "fp32",
         "--no-plots", "--random-init", "--unfreeze-from", "conv_6_sep", "--freeze-bn",
         "--workers", "0", "--eval-batch-size", "16"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config_two = json.loads((two / "config.json").read_text())
    assert config_two["extra"]["world_size"] == 2 and config_two["extra"]["global_batch"] == 4

    h1, h2 = (_state(d / STATE_FILE)["history"][0] for d in (single, two))
    for key in ("train_loss", "val_loss", "f1_expr"):
        assert h2[key] == pytest.approx(h1[key], abs=1e-4), key
    p1, p2 = (np.load(d / "val_outputs.npz")["expr_prob"] for d in (single, two))
    np.testing.assert_allclose(p2, p1, atol=1e-4)


# -------------------------------------------------------------------------------------------- bad input


def _first_line_only(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_checkpoint_of_another_architecture_is_refused_in_one_line(root: Path, tmp_path: Path) -> None:
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 7))
    bad = tmp_path / "resnetish.pth"
    torch.save({"iter": 0, "model_state_dict": {("fc." if k.startswith("2.") else "layer.") + k: v
                                                for k, v in other.state_dict().items()}}, bad)
    with pytest.raises(CheckpointError) as exc:
        run_finetune(config(root, tmp_path / "run", weights=str(bad), random_init=False))
    assert str(bad) in _first_line_only(exc) and "DDAMFN" in str(exc.value)


def test_missing_crop_folder_is_named(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    data = AffWild2(copy)
    video = data.videos("expr", "train")[0]
    shutil.rmtree(data.crop_dir(video))
    with pytest.raises(DataError) as exc:
        run_finetune(config(copy, tmp_path / "run"))
    assert video in _first_line_only(exc)


def test_corrupt_crop_is_named_even_from_a_worker_process(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    seqs, dirs = load_frames_split(AffWild2(copy), ("expr",), "train")
    windows = FrameWindows(seqs, dirs, np.arange(seqs.n_rows)[:, None], ("expr",),
                           build_encoder("ddamfn", random_init=True).transform)
    broken = windows.path(3)
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as exc:
        list(FrameSource(windows, batch_size=4, workers=1).batches(1))
    assert str(broken) in _first_line_only(exc)


def test_out_of_memory_says_what_to_lower(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(self: FinetuneModel, images: torch.Tensor, mask: torch.Tensor) -> dict:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9663676416 B")

    monkeypatch.setattr(FinetuneModel, "forward", no_memory)
    with pytest.raises(ConfigError) as exc:
        run_finetune(config(root, tmp_path / "run"))
    text = _first_line_only(exc)
    assert "--batch-size" in text and "--grad-accum" in text


def test_resume_needs_a_finished_epoch(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        resume_finetune(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--task", "va", "--data", "d", "--out", "o", "--random-init"], "--unfreeze"),
    (["--head", "fc"], "--task, --data, --out required"),
])
def test_cli_refuses_options_that_make_no_sense(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["train-head", *args])
    assert result.exit_code == 2 and message in result.output.replace("\n", " ")


# ------------------------------------------------------------------------------------ CLIP's image tower

CLIP_OPTIONS = {"clip_model": "ViT-S-32-alt"}  # the smallest built-in ViT (CLIPEncoder.smoke_options)


def clip_config(root: Path, out: Path, **kw: object) -> FinetuneConfig:
    return config(root, out, backbone="clip", encoder_options=dict(CLIP_OPTIONS), unfreeze_from="block11",
                  **kw)


def test_clip_image_tower_fine_tunes_end_to_end(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "clip-run"
    assert run_finetune(clip_config(root, out, task="va")) == out
    info = json.loads((out / "config.json").read_text())
    assert info["extra"]["blocks"]["trainable"] == ["block11", "head"]
    assert info["extra"]["blocks"]["frozen"] == ["embed", *(f"block{i}" for i in range(11))]
    assert info["extra"]["published_checkpoint"] == "clip_finetuned.pth"
    assert (out / "clip_finetuned.pth").is_file()

    # Frozen blocks and the text tower are the starting weights; the trainable blocks moved.
    start = build_encoder("clip", random_init=True, seed=0, **CLIP_OPTIONS).model.state_dict()
    tuned = build_encoder("clip", clip_pretrained=str(out / "clip_finetuned.pth"), **CLIP_OPTIONS)
    final = tuned.model.state_dict()
    assert final.keys() == start.keys()
    same = {k for k in start if torch.equal(start[k], final[k])}
    trainable = ("visual.transformer.resblocks.11.", "visual.ln_post.", "visual.proj")
    assert {k for k in start if not k.startswith(trainable)} <= same  # text tower, embed, blocks 0-10
    for prefix in trainable:
        assert any(k.startswith(prefix) and k not in same for k in start), prefix

    # The saved file rebuilds the in-memory model exactly (weights, QuickGELU, preprocessing)...
    model = FinetuneModel(build_encoder("clip", random_init=True, **CLIP_OPTIONS),
                          build_head("tasks", trunk="fc", in_dim=tuned.feature_dim, tasks=("va",)),
                          unfreeze_from="block11")
    model.load_state_dict(_state(out / STATE_FILE)["model"])
    images = torch.stack([tuned.transform(Image.new("RGB", (112, 112), (40 * i, 90, 200 - 30 * i)))
                          for i in range(3)])
    with torch.no_grad():
        assert torch.equal(model.eval().embed(images)[0], tuned(images)[0])
    assert tuned.transform == model.encoder.transform

    # ... and a cache extracted from it through the CLI is the one checkpoint.pt asks for: stage two's
    # evaluate reproduces metrics.json on it.
    from abawfeat.train import evaluate

    cache = tmp_path / "clip-tuned.h5"
    result = CliRunner().invoke(app, [
        "extract", "--backbone", "clip", "--weights", str((out / "clip_finetuned.pth").resolve()),
        "--encoder-opt", "clip_model=ViT-S-32-alt", "--data", str(root), "--out", str(cache),
        "--workers", "0", "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    again = evaluate(out, cache_path=cache)
    for key in ("ccc_valence", "ccc_arousal", "ccc_va"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-4), key


def test_clip_resume_reaches_the_same_weights(root: Path, tmp_path: Path) -> None:
    kw = {"epochs": 2, "dropout": 0.3, "hidden": 16}
    straight = run_finetune(clip_config(root, tmp_path / "straight", **kw))
    resumed = run_finetune(clip_config(root, tmp_path / "resumed", **kw), stop_after_epochs=1)
    assert not (resumed / "metrics.json").exists()
    result = CliRunner().invoke(app, ["finetune", "--resume", str(resumed)])
    assert result.exit_code == 0, result.output
    a, b = _state(straight / STATE_FILE), _state(resumed / STATE_FILE)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (straight / "metrics.json").read_text() == (resumed / "metrics.json").read_text()
    # The saved image towers are the same too (torch.save's archive names differ, so compare the tensors).
    sa, sb = (_state(d / "clip_finetuned.pth") for d in (straight, resumed))
    assert sa["abawfeat_clip"] == sb["abawfeat_clip"]
    assert all(torch.equal(sa["state_dict"][k], sb["state_dict"][k]) for k in sa["state_dict"])


# -------------------------------------------------------------------------------------------- the command


def test_train_head_unfreeze_still_runs_the_finetune_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import abawfeat.finetune as finetune_module

    seen: list[FinetuneConfig] = []

    def fake_run(cfg: FinetuneConfig, **_: object) -> Path:
        seen.append(cfg)
        return tmp_path  # no metrics.json there: nothing is printed

    monkeypatch.setattr(finetune_module, "run_finetune", fake_run)
    common = ["--task", "expr", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--random-init",
              "--unfreeze-from", "conv_5", "--backbone-lr", "0.01", "--no-augment", "--workers", "0",
              "--epochs", "3"]
    old = CliRunner().invoke(app, ["train-head", *common, "--unfreeze", "--trust-pickle"])
    new = CliRunner().invoke(app, ["finetune", *common, "--encoder-opt", "trust_pickle=true"])
    assert old.exit_code == 0 and new.exit_code == 0, old.output + new.output
    assert len(seen) == 2 and seen[0] == seen[1]  # the same run, whichever spelling
    assert seen[0].unfreeze_from == "conv_5" and seen[0].encoder_options == {"trust_pickle": "true"}
    assert seen[0].train.epochs == 3 and not seen[0].augment.enabled
    notes = [line for line in old.output.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: fine-tuning moved to `abawfeat finetune`; `train-head --unfreeze` runs it with the same "
        "options",
        "note: --trust-pickle is deprecated; it now means --encoder-opt trust_pickle=true",
    ]
    assert "note:" not in new.output


def test_help_splits_stage_two_from_fine_tuning() -> None:
    train_help = CliRunner().invoke(app, ["train-head", "--help"], env={"COLUMNS": "200"}).output
    finetune_help = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--unfreeze", "--backbone-lr", "--weights", "--random-init", "--grad-accum"):
        assert flag not in train_help, flag
    assert "--resume" in train_help and "--overwrite" in train_help  # stage two's own: interrupted head runs
    for flag in ("--unfreeze-from", "--backbone-lr", "--weights", "--random-init", "--encoder-opt",
                 "--attention-diversity", "--resume", "--task", "--head"):
        assert flag in finetune_help, flag
    assert "--cache" in train_help and "--cache" not in finetune_help
