"""Tiny synthetic stage-two worlds shared by the head tests (test_train, test_predict, test_ablate).

``build_world`` writes an Aff-Wild2-shaped annotation tree and a matching feature cache whose features encode
the labels linearly (plus noise), with the release's quirks: frames without a crop (labelled, absent from the
cache), crops past the last annotated frame, invalid labels. ``config`` is a fast TrainConfig on a world.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from abawfeat.cache import CacheWriter, make_provenance
from abawfeat.constants import AU_NAMES, EXPR_CLASSES, SPLIT_DIRS
from abawfeat.tasks import single, single_task_names
from abawfeat.train import TrainConfig

N_SIGNAL = 2 + len(EXPR_CLASSES) + len(AU_NAMES)  # what the features encode: va, expr one-hot, au bits


@dataclass
class World:
    root: Path
    cache: Path
    dim: int
    halves: tuple[Path, ...] = ()  # two more caches, each carrying half of every task's signal (halves=True)


# With halves=True: the signal columns cache "a" carries (valence, half the classes, half the AUs) and
# those of cache "b" (arousal, the other classes and AUs); cache "b" also lacks some frames.
HALF_A = np.r_[0, 2:6, 10:16]
HALF_B = np.r_[1, 6:10, 16:22]


def _labels(rng: np.random.Generator, n: int, temporal: bool, rare_class: int | None = None,
            lags: tuple[int, int] = (3, 6), events: bool = False) -> tuple[np.ndarray, ...]:
    """Hidden per-frame labels (always defined) and the signal the features carry."""
    if temporal and events:
        # A long-range dependency: every 15-45 frames an event frame shows new VA values (and a flag); the
        # labels hold the last event's values until the next one, and the frames between show nothing.
        times = np.concatenate([[0], np.cumsum(rng.integers(15, 46, size=n // 15 + 1))])
        times = times[times < n]
        values = rng.uniform(-0.9, 0.9, size=(len(times), 2))
        va = values[np.searchsorted(times, np.arange(n), side="right") - 1].astype(np.float32)
        signal = np.zeros((n, N_SIGNAL), np.float32)
        signal[times, :2] = values
        signal[times, 2] = 1.0
        return va, rng.integers(0, 8, n), rng.integers(0, 2, (n, 12)), signal
    if temporal:
        # VA at frame t is an i.i.d. signal seen at t - lags[0] / t - lags[1] (3 and 6 frames unless told): a
        # frame alone says nothing about its label.
        a, b = lags
        s = rng.uniform(-0.9, 0.9, size=(n + b, 2))
        va = np.stack([s[b - a : n + b - a, 0], s[:n, 1]], axis=1).astype(np.float32)
        signal = np.zeros((n, N_SIGNAL), np.float32)
        signal[:, 0] = s[b:, 0]
        signal[:, 1] = s[b:, 1]
        expr = rng.integers(0, 8, n)
        au = rng.integers(0, 2, (n, 12))
        return va, expr, au, signal
    # Piecewise-constant segments, like real annotations.
    seg = np.repeat(np.arange(n // 20 + 1), 20)[:n]
    k = seg.max() + 1
    va = np.repeat(rng.uniform(-0.8, 0.8, (k, 2)), 20, axis=0)[:n].astype(np.float32)
    classes = rng.integers(0, 8, k)
    if rare_class is not None:
        # Three in four segments of the rare class become another class: about 3% of the frames keep it.
        gone = (classes == rare_class) & (rng.random(k) < 0.75)
        classes[gone] = (rare_class + rng.integers(1, 8, int(gone.sum()))) % 8
    expr = np.repeat(classes, 20)[:n]
    au = np.repeat((rng.random((k, 12)) < 0.4).astype(int), 20, axis=0)[:n]
    signal = np.concatenate([va, np.eye(8)[expr], au], axis=1).astype(np.float32)
    return va, expr, au, signal


def _write_annotation(path: Path, task: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(",".join(single(task).header) + "\n" + "\n".join(rows) + "\n")


def build_world(
    tmp: Path, *, n_train: int = 6, n_val: int = 3, n_test: int = 2, n_frames: int = 160, dim: int = 24,
    temporal: bool = False, noise: float = 0.3, seed: int = 0, text: bool = False, name: str = "tinyaff",
    prompt_classes: tuple[str, ...] | None = None, halves: bool = False, rare_class: int | None = None,
    lags: tuple[int, int] = (3, 6), events: bool = False,
) -> World:
    rng = np.random.default_rng(seed)
    root = tmp / name
    ann = root / "8th_ABAW_Annotations"
    mixing = rng.normal(size=(N_SIGNAL, dim)).astype(np.float32)
    encoder = {"name": "fake", "config": {"dim": dim}, "weights_sha256": "random-init", "preprocessing": {},
               "calibration": None}
    if prompt_classes is not None:
        encoder["prompt_classes"] = list(prompt_classes)  # what the CLIP encoder records
    provenance = make_provenance(encoder, feature_dim=dim, dtype="float16", precision="fp32")
    prompt_emb = rng.normal(size=(8, dim)).astype(np.float32)
    cache = tmp / f"{name}-fake.h5"
    splits = {"train": n_train, "val": n_val, "test": n_test}
    sample_rows: dict[str, list[str]] = {t: [] for t in single_task_names()}
    half_paths = (tmp / f"{name}-a.h5", tmp / f"{name}-b.h5") if halves else ()
    # Drawn only for such worlds, so that every other world stays the same draw for draw.
    half_mixing = [rng.normal(size=(len(cols), dim)).astype(np.float32) for cols in (HALF_A, HALF_B)] \
        if halves else []
    half_writers = [CacheWriter(p, make_provenance({**encoder, "name": f"fake-{k}"}, feature_dim=dim,
                                                   dtype="float16", precision="fp32"))
                    for p, k in zip(half_paths, "ab", strict=False)]
    for w in half_writers:
        w.__enter__()
    with CacheWriter(cache, provenance) as writer:
        for split, count in splits.items():
            for i in range(count):
                video = f"{split}{i:02d}"
                n = n_frames + int(rng.integers(-20, 21))
                va, expr, au, signal = _labels(rng, n, temporal, rare_class, lags, events)
                if split == "test":
                    for t in single_task_names():
                        sample_rows[t] += [f"{video}/{f:05d}.jpg" for f in range(1, n + 1)]
                else:
                    # Invalid labels in a few runs of frames (the release marks them -5 / -1).
                    bad = np.zeros(n, bool)
                    bad[rng.integers(0, n - 10) :][:8] = True
                    va_rows = [("-5,-5" if b else f"{v:.4f},{a:.4f}")
                               for (v, a), b in zip(va, bad, strict=True)]
                    ex_rows = [("-1" if b else str(e)) for e, b in zip(expr, bad, strict=True)]
                    au_rows = [(",".join(["-1"] * 12) if b else ",".join(map(str, r)))
                               for r, b in zip(au, bad, strict=True)]
                    d = SPLIT_DIRS[split]
                    _write_annotation(ann / single("va").folders[0] / d / f"{video}.txt", "va", va_rows)
                    _write_annotation(ann / single("expr").folders[0] / d / f"{video}.txt", "expr", ex_rows)
                    _write_annotation(ann / single("au").folders[0] / d / f"{video}.txt", "au", au_rows)
                # Crops: frames 1..n minus a gap of undetected faces (not in temporal worlds, where a gap
                # would break "the label is the signal 3 frames ago"), plus two crops past the last frame.
                frames = np.arange(1, n + 3)
                extra = rng.normal(size=(2, N_SIGNAL)).astype(np.float32)
                feats = np.concatenate([signal, extra]) @ mixing
                if not temporal:
                    keep = np.ones(n + 2, bool)
                    gap = int(rng.integers(5, n - 20))
                    keep[gap : gap + 6] = False
                    keep[0] = i % 2 == 1  # some videos start without a crop
                    frames, feats = frames[keep], feats[keep]
                feats = feats + noise * rng.normal(size=feats.shape).astype(np.float32)
                writer.write_video(video, frames, feats)
                full = np.concatenate([signal, extra])[frames - 1]
                halves_of = zip(half_writers, (HALF_A, HALF_B), half_mixing, strict=False)
                for k, (w, cols, mix) in enumerate(halves_of):
                    own = np.ones(len(frames), bool)
                    if k == 1:  # cache "b" lacks a run of frames the other caches have
                        start = int(rng.integers(0, max(len(frames) - 12, 1)))
                        own[start : start + 12] = False
                    f = full[own][:, cols] @ mix + noise * rng.normal(size=(int(own.sum()), dim))
                    w.write_video(video, frames[own], f.astype(np.float32))
        if text:
            classes = prompt_classes or EXPR_CLASSES
            writer.set_text_embeddings([f"a face showing {c.lower()}" for c in classes], prompt_emb)
    for w in half_writers:
        w.__exit__(None, None, None)
    tests = root / "names_of_videos_in_each_test_set"
    tests.mkdir(parents=True)
    samples = root / "prediction_files_format"
    samples.mkdir()
    for t in single_task_names():
        (tests / single(t).test_list_file).write_text("\n".join(f"test{i:02d}" for i in range(n_test)) + "\n")
        (samples / f"CVPR_8th_ABAW_{single(t).sample_tag}_test_set_sample.txt").write_text(
            single(t).submission_header + "\n" + "\n".join(sample_rows[t]) + "\n"
        )
    return World(root=root, cache=cache, dim=dim, halves=half_paths)


def config(world: World, out: Path, **kw: object) -> TrainConfig:
    # No plots by default: matplotlib costs seconds per run and is tested once, below.
    base = TrainConfig(task="va", head="fc", data=str(world.root), cache=str(world.cache), out=str(out),
                       epochs=4, seed=0, lr=3e-3, batch_size=64, hidden=-1, plots=False)
    return replace(base, **kw)


def add_modality_pair(
    world: World, tmp: Path, *, clean: float = 0.2, noisy: float = 1.0, a_missing: tuple[str, ...] = ("val",),
    block: int = 32, seed: int = 1,
) -> tuple[Path, Path]:
    """Two more caches over ``world``'s crops, each carrying the whole label signal: "a" with little noise,
    "b" with much; in the videos of the splits ``a_missing``, cache "a" has no row in every other block of
    ``block`` crops (a modality missing in half the windows). Returns their paths (a, b)."""
    from abawfeat.cache import FeatureCache
    from abawfeat.data import AffWild2

    rng = np.random.default_rng(seed)
    data = AffWild2(world.root)
    mixing = [rng.normal(size=(N_SIGNAL, world.dim)).astype(np.float32) for _ in range(2)]
    paths = (tmp / "pair-a.h5", tmp / "pair-b.h5")
    encoder = {"config": {"dim": world.dim}, "weights_sha256": "random-init", "preprocessing": {},
               "calibration": None}
    writers = [CacheWriter(p, make_provenance({**encoder, "name": f"pair-{k}"}, feature_dim=world.dim,
                                              dtype="float16", precision="fp32"))
               for p, k in zip(paths, "ab", strict=True)]
    home = {v: s for s in ("train", "val") for v in data.videos("va", s)}
    with FeatureCache(world.cache) as cache:
        for w in writers:
            w.__enter__()
        for video in sorted(cache.videos()):
            frames = cache.frames(video).astype(np.int64)
            signal = rng.normal(size=(len(frames), N_SIGNAL)).astype(np.float32)
            split = home.get(video, "test")
            if split != "test":
                va, ex, au = (data.annotation(t, split, video) for t in ("va", "expr", "au"))
                inside = frames <= va.n_frames
                idx = frames[inside] - 1
                signal[inside] = np.concatenate(
                    [va.labels[idx], np.eye(8)[np.clip(ex.labels[idx], 0, 7)], np.clip(au.labels[idx], 0, 1)],
                    axis=1)
            own = np.ones(len(frames), bool)
            if split in a_missing:
                own[(np.arange(len(frames)) // block) % 2 == 1] = False
            for k, (w, mix, level) in enumerate(zip(writers, mixing, (clean, noisy), strict=True)):
                keep = own if k == 0 else np.ones(len(frames), bool)
                f = signal[keep] @ mix + level * rng.normal(size=(int(keep.sum()), world.dim))
                w.write_video(video, frames[keep], f.astype(np.float32))
        for w in writers:
            w.__exit__(None, None, None)
    return paths
