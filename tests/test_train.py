"""Training heads on tiny synthetic caches (tests/worlds.py): learning, temporal context, determinism, run
dirs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from worlds import World, build_world, config

from abawfeat.constants import AU_NAMES, EXPR_CLASSES
from abawfeat.data.sequences import load_split, make_windows
from abawfeat.errors import CheckpointError, ConfigError, RunError
from abawfeat.train import evaluate, fit, load_run, run_is_complete
from abawfeat.trunks import TRUNKS, build_trunk

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def temporal_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("temporal"), temporal=True, noise=0.05, n_train=24, n_val=3,
                       n_test=1, n_frames=200, dim=8)


# -------------------------------------------------------------------------------------- alignment, windows


def test_rows_align_with_annotation_rows_by_frame_number(world: World) -> None:
    from abawfeat.cache import FeatureCache
    from abawfeat.data import AffWild2

    data = AffWild2(world.root)
    with FeatureCache(world.cache) as cache:
        seqs = load_split(data, cache, ("expr",), "val")
        for v, video in enumerate(seqs.videos):
            ann = data.annotation("expr", "val", video)
            frames = cache.frames(video)
            lo, hi = seqs.row_offsets[v], seqs.row_offsets[v + 1]
            assert np.array_equal(seqs.row_frames[lo:hi], frames)
            lab, ok = seqs.row_labels("expr")
            inside = frames <= ann.n_frames
            # A row's label is the annotation row of its frame number, not of its position among the crops.
            assert np.array_equal(lab[lo:hi][inside], ann.labels[frames[inside] - 1])
            assert np.array_equal(ok[lo:hi][inside], ann.valid[frames[inside] - 1])
            assert not ok[lo:hi][~inside].any()  # crops past the last annotated frame carry no label
            assert seqs.tl_offsets[v + 1] - seqs.tl_offsets[v] == ann.n_frames
        # Timeline = every annotated frame, including those without a crop.
        assert seqs.n_timeline == sum(data.annotation("expr", "val", v).n_frames for v in seqs.videos)
        assert seqs.n_rows < seqs.n_timeline + 2 * len(seqs.videos)


def test_windows_cover_every_row_and_never_cross_videos() -> None:
    offsets = np.array([0, 10, 13, 13, 40])
    w = make_windows(offsets, 8, 4)
    covered = np.unique(w[w >= 0])
    assert np.array_equal(covered, np.arange(40))
    for row in w:
        real = row[row >= 0]
        video = np.searchsorted(offsets, real, side="right") - 1
        assert len(set(video.tolist())) == 1
        assert np.all(np.diff(real) == 1)
        assert np.all(row[len(real):] == -1)  # padding only at the end
    short = w[(w[:, 0] >= 10) & (w[:, 0] < 13)]
    assert len(short) == 1 and list(short[0]) == [10, 11, 12, -1, -1, -1, -1, -1]
    keep = np.zeros(40, bool)
    keep[35] = True
    kept = make_windows(offsets, 8, 8, keep=keep)
    assert all((k == 35).any() for k in kept) and len(kept) >= 1


# -------------------------------------------------------------------------------------------- learning


# Chance levels: CCC 0 for a constant; macro F1 1/8 for one class; AU F1 ~0.57 when predicting every AU
# positive at the world's 40% prevalence (what a tuned threshold can always reach); MTL their sum.
@pytest.mark.parametrize(
    "task, head, metric, floor",
    [("va", "fc", "ccc_va", 0.5), ("expr", "fc", "f1_expr", 0.5), ("au", "lstm", "f1_au_opt", 0.72),
     ("mtl", "fc", "score", 1.6)],
)
def test_training_reaches_well_above_chance(
    world: World, tmp_path: Path, task: str, head: str, metric: str, floor: float
) -> None:
    batch = 32 if head == "lstm" else 64
    result = fit(config(world, tmp_path / "run", task=task, head=head, window=16, batch_size=batch, epochs=6))
    assert result.metrics[metric] > floor, result.metrics
    assert result.metrics["best_epoch"] == max(
        result.history, key=lambda r: (r["val_metric"], -r["epoch"])
    )["epoch"]


def _trunks_with_context() -> list[str]:
    return [n for n in TRUNKS.names() if build_trunk(n, 8, {}).context().temporal]


# Test-size settings where a trunk's defaults are too big for 12 short epochs (any other trunk: hidden 16).
SMALL = {"transformer": {"hidden": 16, "layers": 1, "trunk_opts": {"heads": 2}},
         "tcn": {"hidden": 16, "layers": 2}}  # a receptive field of 13 frames covers the 6-frame lag


@pytest.fixture(scope="module")
def fc_on_temporal_world(temporal_world: World, tmp_path_factory: pytest.TempPathFactory) -> float:
    run = tmp_path_factory.mktemp("fc-temporal") / "fc"
    return fit(config(temporal_world, run, task="va", head="fc", epochs=6)).metrics["ccc_va"]


@pytest.mark.parametrize("trunk", _trunks_with_context())
def test_a_trunk_with_context_beats_fc_when_labels_need_past_frames(
    trunk: str, temporal_world: World, fc_on_temporal_world: float, tmp_path: Path
) -> None:
    options = SMALL.get(trunk, {"hidden": 16})
    run = fit(config(temporal_world, tmp_path / trunk, task="va", head=trunk, window=24, batch_size=16,
                     epochs=12, lr=1e-2, **options))
    assert fc_on_temporal_world < 0.2  # the label is not in the current frame
    assert run.metrics["ccc_va"] > fc_on_temporal_world + 0.4


def test_contrastive_objective_learns_expressions(tmp_path: Path) -> None:
    world = build_world(tmp_path, text=True, dim=16, n_train=5, n_val=2, n_test=1)
    result = fit(config(world, tmp_path / "run", task="expr", head="fc", objective="contrastive", epochs=6,
                        lr=2e-3))
    assert result.metrics["f1_expr"] > 0.5
    run = load_run(tmp_path / "run")
    assert run.head.name == "contrastive"
    assert run.head.text_emb.shape == (8, 16)


def test_contrastive_head_gets_prompts_in_expression_class_order(tmp_path: Path) -> None:
    order = tuple(reversed(EXPR_CLASSES))
    world = build_world(tmp_path, text=True, dim=8, n_train=2, n_val=1, n_test=1, prompt_classes=order)
    fit(config(world, tmp_path / "run", task="expr", objective="contrastive", epochs=1))
    from abawfeat.cache import FeatureCache

    with FeatureCache(world.cache) as cache:
        _, stored = cache.text_embeddings()
    head = load_run(tmp_path / "run").head
    # Output k must be class EXPR_CLASSES[k]: stored prompt 0 is "Other", so it becomes row 7.
    assert torch.equal(head.text_emb, torch.from_numpy(stored[::-1].copy()))


def test_contrastive_objective_needs_prompt_embeddings(world: World, tmp_path: Path) -> None:
    from abawfeat.errors import CacheError

    with pytest.raises(CacheError, match="text embeddings"):
        fit(config(world, tmp_path / "run", task="expr", objective="contrastive", epochs=1))


@pytest.mark.parametrize("bad", [dict(task="expr", objective="ccc"), dict(task="va", class_weights="inverse"),
                                 dict(head="transformer-xl"), dict(epochs=0)])
def test_impossible_configs_are_refused(world: World, tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ConfigError):
        fit(config(world, tmp_path / "run", **bad))


# ------------------------------------------------------------------------------- determinism, run dirs


def test_same_seed_same_numbers_and_run_dir_contract(world: World, tmp_path: Path) -> None:
    a = fit(config(world, tmp_path / "a", task="au", head="lstm", window=16, batch_size=16, epochs=3,
                   dropout=0.1))
    b = fit(config(world, tmp_path / "b", task="au", head="lstm", window=16, batch_size=16, epochs=3,
                   dropout=0.1))
    c = fit(config(world, tmp_path / "c", task="au", head="lstm", window=16, batch_size=16, epochs=3,
                   dropout=0.1, seed=1))
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert a.metrics == b.metrics
    assert strip(a.history) != strip(c.history)  # the seed matters
    wa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    run_dir = tmp_path / "a"
    for name in ("config.json", "checkpoint.pt", "metrics.json", "history.csv", "val_outputs.npz"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"task", "split", "best_epoch", "f1_au", "f1_au_opt", "f1_au_per_au", "f1_au_opt_per_au",
            "au_thresholds"} <= set(metrics)
    assert list(metrics["au_thresholds"]) == list(AU_NAMES)
    header = (run_dir / "history.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["epoch", "train_loss", "val_loss", "val_metric", "seconds"]
    assert len((run_dir / "history.csv").read_text().splitlines()) == 4
    with np.load(run_dir / "val_outputs.npz") as npz:
        assert {"video", "frame", "has_crop", "au_label", "au_valid", "au_prob"} <= set(npz.files)
        assert npz["au_prob"].shape == (len(npz["frame"]), 12)
        assert not npz["has_crop"].all()  # frames without a crop are part of the protocol
    # The checkpoint holds the best epoch's weights: evaluating it reproduces metrics.json.
    again = evaluate(run_dir)
    for key in ("f1_au", "f1_au_opt"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-9)
    assert run_is_complete(run_dir, config(world, tmp_path / "elsewhere", task="au", head="lstm", window=16,
                                            batch_size=16, epochs=3, dropout=0.1))
    assert not run_is_complete(run_dir, config(world, run_dir, task="au", head="lstm", epochs=4))


def test_load_run_rebuilds_the_head_without_the_cli(world: World, tmp_path: Path) -> None:
    fit(config(world, tmp_path / "run", task="expr", head="lstm", window=16, batch_size=16, epochs=1,
               hidden=20, layers=2, bidirectional=True))
    run = load_run(tmp_path / "run")
    trunk = run.head.config.trunk_config
    assert run.head.config.trunk == "lstm" and trunk["hidden"] == 20 and trunk["layers"] == 2
    assert trunk["bidirectional"] and run.task == "expr"
    x = torch.randn(2, 7, world.dim)
    assert run.head(x, torch.ones(2, 7, dtype=torch.bool))["expr"].shape == (2, 7, 8)


def test_checkpoint_on_a_foreign_cache_is_refused(world: World, tmp_path: Path) -> None:
    fit(config(world, tmp_path / "run", task="va", epochs=1))
    other = build_world(tmp_path / "other", dim=world.dim + 8)
    with pytest.raises(CheckpointError, match="fingerprint differs in .*feature_dim"):
        evaluate(tmp_path / "run", cache_path=other.cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="not a run directory"):
        evaluate(tmp_path / "empty")


def test_multitask_from_a_7th_abaw_multitask_file(world: World, tmp_path: Path) -> None:
    """A tree with only the s-Aff-Wild2 multi-task files: labels on the listed (static) frames only."""
    from abawfeat.data import AffWild2

    per_task = AffWild2(world.root)
    root = tmp_path / "saff"
    mtl_dir = root / "7th_ABAW_Annotations" / "MTL_Challenge"
    mtl_dir.mkdir(parents=True)
    listed = {}
    for split, name in (("train", "train_set.txt"), ("val", "validation_set.txt")):
        lines = ["image,valence,arousal,expression,aus"]
        for video in per_task.videos("va", split):
            va, ex, au = (per_task.annotation(t, split, video) for t in ("va", "expr", "au"))
            frames = range(1, va.n_frames + 1, 3)  # static frames: every third one
            listed[(split, video)] = list(frames)
            for f in frames:
                v, a = va.labels[f - 1]
                lines.append(f"{video}/{f:05d}.jpg,{v:.4f},{a:.4f},{ex.labels[f - 1]},"
                             + ",".join(str(int(x)) for x in au.labels[f - 1]))
        (mtl_dir / name).write_text("\n".join(lines) + "\n")
    result = fit(config(world, tmp_path / "run", task="mtl", data=str(root), epochs=2))
    assert {"ccc_va", "f1_expr", "f1_au_opt", "score"} <= set(result.metrics)
    with np.load(tmp_path / "run" / "val_outputs.npz") as npz:
        labelled = npz["frame"][npz["va_valid"]]
        videos = npz["video"][npz["va_valid"]]
    # Only listed frames carry labels (and only where the per-task file had a valid one).
    for video, frame in zip(videos[:50], labelled[:50], strict=True):
        assert frame in listed[("val", str(video))]
    assert len(labelled) <= sum(len(v) for (s, _), v in listed.items() if s == "val")


def test_auto_precision_follows_the_devices_bf16_kernels(monkeypatch):
    """auto is bf16 for temporal trunks only where the device computes bf16 natively; an explicit bf16 LSTM on
    a CPU without bf16 kernels is refused in one line (oneDNN has no such primitive), not a traceback."""
    import torch

    import abawfeat.utils.device as device_mod
    from abawfeat.errors import ConfigError
    from abawfeat.train.config import TrainConfig, build_head_for, resolve

    def resolved(cfg: TrainConfig):
        return resolve(cfg, build_head_for(cfg, in_dim=8), torch.device("cpu"))

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(device_mod, "bf16_native", lambda device, native=native: native)
        assert resolved(TrainConfig(task="va", head="lstm")).precision == expected
        assert resolved(TrainConfig(task="va", head="gru")).precision == expected
        assert resolved(TrainConfig(task="va", head="fc")).precision == "fp32"
    assert resolved(TrainConfig(task="va", head="gru", precision="bf16")).precision == "bf16"
    with pytest.raises(ConfigError, match="--precision bf16 with --head lstm"):
        resolved(TrainConfig(task="va", head="lstm", precision="bf16"))
