"""Stage one: run a frozen encoder over every face crop once and write the HDF5 feature cache.

``run_extraction(config)`` is the entry for every encoder: it takes the cache lock, then runs this module's
face loop, or the audio loop (abawfeat/audio/extract.py) for an encoder whose ``modality`` is audio; what
the two share is in abawfeat/stage_one.py. The face run reads top to bottom: the cache lock (first, so a
second run into the same cache is refused at once), dataset, encoder (calibrated when it declares so for
random init), provenance, cache writer (resume), the videos left to do, one streaming loop, consolidation.
Nothing here knows which encoder runs: options reach it through the encoder contract (``encoder_options``,
``--encoder-opt key=value``).

The loop decodes JPEGs in DataLoader workers, batches across video boundaries (a full batch whatever the
video lengths), and hands each video to the writer as soon as its last frame is through, so memory stays
bounded by the longest video whatever the dataset size. Under torchrun each rank takes a share of the videos
and writes its own parts; rank 0 consolidates them into one file (see abawfeat/cache.py for why this survives
``kill -9``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from abawfeat.cache import (
    CacheWriter,
    acquire_lock,
    make_provenance,
    release_lock,
)
from abawfeat.errors import CacheError, ConfigError, DataError
from abawfeat.stage_one import (
    ExtractConfig,
    ExtractResult,
    agree,
    balance_videos,
    check_output,
    disk_full_error,
    open_dataset,
    prepare_encoder,
    resolve_output,
    select_videos,
    validate_config,
    write_cache,
)
from abawfeat.utils.compiling import CompiledWithFallback, inductor_freezing
from abawfeat.utils.configs import to_dict
from abawfeat.utils.io import is_disk_full

if TYPE_CHECKING:
    import torch

    from abawfeat.data.affwild2 import AffWild2
    from abawfeat.encoders.base import Encoder


# Below this many crops an eager run finishes before torch.compile would have paid for itself (DDAMFN: ~40 s
# of compiling against ~25 ms saved per frame at fp32).
AUTO_COMPILE_MIN_FRAMES = 10_000


def resolve_compile(config: ExtractConfig, encoder: Encoder, n_frames: int) -> bool:
    """Whether this run compiles: the user's choice, else auto (see ``ExtractConfig.compile``)."""
    if config.compile is not None:
        return config.compile
    return bool(encoder.compile_by_default) and n_frames >= AUTO_COMPILE_MIN_FRAMES


# ------------------------------------------------------------------------------------------ the stage-one run


def run_extraction(config: ExtractConfig, encoder: Encoder | None = None) -> ExtractResult:
    """Extract features for every video with crops (or ``config.videos``) into the cache; resumable.

    ``encoder`` overrides building one from the config (for callers that already hold one); it is moved to
    the device, and with bf16/fp16 its parameters are set to require grad (see _prepare_model).

    Audio encoders (``Encoder.modality == "audio"``) share everything up to the cache lock, then run the loop
    over source videos of abawfeat/audio/extract.py instead of the crop loop, into a cache of the same
    schema."""
    import torch

    from abawfeat.utils import dist
    from abawfeat.utils.device import autocast_dtype, resolve_device

    validate_config(config)
    run_locked = _run_locked
    if _modality(config, encoder) == "audio":
        from abawfeat.audio.extract import check_audio_config, run_audio_locked

        check_audio_config(config)
        run_locked = run_audio_locked
    info = dist.dist_info()
    distributed = dist.init_process_group(info)
    device = resolve_device(config.device)
    if config.batch_size is None and run_locked is _run_locked:
        config = dataclasses.replace(config, batch_size=32 if device.type == "cpu" else 128)
    if autocast_dtype(config.precision) == torch.float16 and device.type == "cpu":
        raise ConfigError("--precision fp16 needs CUDA; on CPU use bf16 or fp32")

    # 1. The cache lock, before the dataset is scanned or any model is loaded: a second extraction into the
    # same cache is refused at once, not after the encoder has loaded. (Opening the dataset only locates its
    # annotations folder; its name names the default output.)
    dataset = open_dataset(config.data)
    out = resolve_output(config, dataset.name)
    check_output(out)
    lock: int | None = None
    refused: Exception | None = None
    if info.is_main:
        try:
            lock = acquire_lock(out)
        except CacheError as exc:  # another extraction holds it
            refused = exc
        except OSError as exc:  # a full disk (the pid hint), a folder that cannot be written...
            refused = disk_full_error(exc, out, None) if is_disk_full(exc) else CacheError(
                f"{out}: cannot lock the cache ({exc.strerror or exc})")
    if not agree(distributed, refused is None):  # every rank stops at once when rank 0 was refused
        raise refused or CacheError(f"{out}: rank 0 could not lock the cache; see its message")
    try:
        result = run_locked(config, dataset, out, lock, encoder, info, distributed, device)
    finally:
        if lock is not None:
            release_lock(lock)
    if distributed:
        import torch.distributed as tdist

        tdist.destroy_process_group()
    return result


def _run_locked(config: ExtractConfig, dataset: AffWild2, out: Path, lock: int | None,
                encoder: Encoder | None, info: Any, distributed: bool, device: torch.device) -> ExtractResult:
    """The run once rank 0 holds the cache lock (``lock``): dataset, encoder, provenance, writer, loop."""

    # 2. Dataset: every video with crops, train, validation and test alike.
    all_videos = sorted(dataset.videos_with_crops())
    if not all_videos:
        raise DataError(config.data, "no crop folders found (expected cropped_aligned/<video>/NNNNN.jpg)")
    selected = select_videos(all_videos, config.videos, config.data)

    # 3. Encoder. A random-init encoder is drawn from a fixed seed and calibrated (when it declares that it
    # needs it) on frames picked from the whole dataset, so a resumed run (or another rank) rebuilds exactly
    # the same network.
    encoder = prepare_encoder(config, encoder, info, "calibrated on dataset frames where it needs it")
    calibration_source = None
    if config.random_init and encoder.needs_calibration:
        cal_data = dataset if config.calibration_data is None else open_dataset(config.calibration_data)
        cal_videos = all_videos if config.calibration_data is None else sorted(cal_data.videos_with_crops())
        calibration_source = calibrate_encoder(encoder, cal_data, cal_videos, config.calibration_frames)
        if distributed:
            _broadcast_state(encoder)  # identical BN statistics on every rank, bit for bit

    # Compile or not, decided on the videos asked for, not those left to do: a resumed run computes as the run
    # it continues. Recorded as decided (not "auto") in the provenance's extract_config.
    n_selected = sum(len(dataset.crop_frames(v)) for v in selected)
    config = dataclasses.replace(config, compile=resolve_compile(config, encoder, n_selected))
    enc_prov = dict(encoder.provenance())
    if calibration_source is not None:
        # Record which frames calibrated the network next to the encoder's own account of it.
        enc_prov["calibration"] = {"encoder": enc_prov.get("calibration"), "frames": calibration_source}
    provenance = make_provenance(
        enc_prov,
        feature_dim=encoder.feature_dim,
        dtype=config.dtype,
        precision=config.precision,
        logit_names=encoder.logit_names,
        extract_config=to_dict(config),
        tree={"root": str(Path(config.data).resolve()), "name": dataset.name},
    )

    # 4. Writer: rank 0 (holding the lock) checks the existing cache first; the other ranks open it only if
    # that succeeded, so a refused run never leaves a rank waiting.
    writer = CacheWriter(out, provenance, lock=info.is_main, consolidate_on_exit=info.is_main, held_lock=lock,
                         tree=dataset)
    result = write_cache(writer, info, distributed, lambda: _extract_videos(
        config, dataset, encoder, writer, selected, out, device, info, distributed))
    if info.is_main and out.exists():
        result.file_size = out.stat().st_size
    return result


def _modality(config: ExtractConfig, encoder: Encoder | None) -> str:
    """What the encoder reads (``Encoder.modality``): "face" crops (this module's loop) or "audio"."""
    from abawfeat.encoders import ENCODERS

    return str((encoder if encoder is not None else ENCODERS.get(config.backbone)).modality)


def _extract_videos(
    config: ExtractConfig,
    dataset: AffWild2,
    encoder: Encoder,
    writer: CacheWriter,
    selected: list[str],
    out: Path,
    device: torch.device,
    info: Any,
    distributed: bool,
) -> ExtractResult:
    from abawfeat.utils.progress import make_progress

    # Every rank must see the same "done" set before any rank writes, or the shares would differ.
    done = writer.done_videos()
    agree(distributed, True)
    pending = [v for v in selected if v not in done]
    frames_of = {v: np.asarray(dataset.crop_frames(v), dtype=np.int32) for v in pending}
    mine = balance_videos(pending, [len(frames_of[v]) for v in pending], info.rank, info.world_size)

    if info.is_main and not writer.has_text():  # the provenance (prompts included) matched: same text
        text = encoder.text_embeddings()
        if text is not None:
            prompts, emb = text
            enc_prov = encoder.provenance()
            # Class names when the encoder says which class each prompt stands for, else the prompts.
            names = list(enc_prov.get("prompt_classes") or prompts)
            template = str(getattr(encoder.config, "prompt_template", "") or "")
            writer.set_text_embeddings(
                names, emb.detach().float().cpu().numpy(), template=template, prompts=list(prompts)
            )

    model = _prepare_model(encoder, device, config)
    n_frames = sum(len(frames_of[v]) for v in mine)
    bad: dict[str, list[tuple[int, str]]] = {}
    start = time.perf_counter()
    written = 0
    warmup: list[float] = []  # [frames, seconds] of the first batch
    ok = False
    try:
        progress = make_progress("frames", disable=None if (config.progress and info.is_main) else True)
        with progress:
            task = progress.add_task(f"{config.backbone} 0/{len(mine)} videos", total=n_frames)
            videos_done = 0

            def on_video(video: str, n: int, bad_list: list[tuple[int, str]]) -> None:
                nonlocal videos_done, written
                videos_done += 1
                written += n
                if bad_list:
                    bad[video] = bad_list
                progress.update(task, description=f"{config.backbone} {videos_done}/{len(mine)} videos")

            def on_frames(k: int) -> None:
                if not warmup:
                    warmup.extend([k, time.perf_counter() - start])
                progress.advance(task, k)

            _stream(
                config, dataset, encoder, model, writer, mine, frames_of, device,
                on_frames=on_frames, on_video=on_video,
            )
        ok = True
    finally:
        if distributed:
            # Gathering the stats doubles as the barrier before rank 0 consolidates; a failed rank says so.
            import torch.distributed as tdist

            gathered: list[Any] = [None] * info.world_size
            tdist.all_gather_object(gathered, (ok, written, len(mine), bad))
    seconds = time.perf_counter() - start
    if distributed:
        if not all(g[0] for g in gathered):
            raise ConfigError(f"{out}: a torchrun rank failed; completed videos are kept, re-run to resume")
        written = sum(g[1] for g in gathered)
        n_done = sum(g[2] for g in gathered)
        bad = {k: v for g in gathered for k, v in g[3].items()}
    else:
        n_done = len(mine)
    return ExtractResult(
        out=out, backbone=config.backbone, videos_total=len(selected), videos_done=n_done,
        videos_skipped=len(selected) - len(pending), frames=written, bad_frames=dict(sorted(bad.items())),
        seconds=seconds, random_init=config.random_init,
        warmup_frames=int(warmup[0]) if warmup else 0, warmup_seconds=warmup[1] if warmup else 0.0,
        compiled=isinstance(model, CompiledWithFallback) and not model.failed,
    )


def _prepare_model(encoder: Encoder, device: torch.device, config: ExtractConfig) -> Any:
    """The encoder behind ``PixelInput`` on ``device`` in channels_last, compiled when ``config.compile``
    (already resolved)."""
    import torch

    encoder.to(device)
    # channels_last: DDAMFN's convolutions are faster in NHWC on CPU (oneDNN) and GPU alike
    # (docs/performance.md, the eager rows against the NCHW baseline).
    encoder.to(memory_format=torch.channels_last)
    if config.precision != "fp32" and not config.compile:
        # Autocast re-casts every weight to bf16/fp16 on every batch unless it may cache the casts, which it
        # does only for leaf parameters that require grad, under no_grad (not inference_mode), within one
        # autocast context: _stream keeps one open for the whole run. For CLIP's 88 M weights that is several
        # times faster, with bit-identical outputs. No gradient is ever computed (no_grad). (Compiled, the
        # weights are frozen into the graph and their casts folded once, so nothing needs caching.)
        for p in encoder.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    from abawfeat.encoders.base import PixelInput

    model = PixelInput(encoder).to(device)
    if config.compile:
        # Inductor's freezing: the frozen weights become constants, batch norms fold into convolutions,
        # weights are pre-packed for oneDNN and cast to bf16 once (faster than plain compile on CPU). The
        # first call compiles; batches are always padded to batch_size, so one static graph serves the run
        # (which is also what lets CUDA graphs replay it).
        return CompiledWithFallback(model, doing="extracting", skip="--no-compile", mode=compile_mode(device),
                                    dynamic=False, context=inductor_freezing)
    return model


def compile_mode(device: torch.device) -> str | None:
    """torch.compile's mode for extraction: on CUDA ``max-autotune`` (kernel autotuning, and CUDA graphs,
    which remove the per-kernel launch cost that dominates small encoders on a GPU); on CPU the default, where
    CUDA graphs do not exist and autotuning has no GEMM templates to choose between."""
    return "max-autotune" if device.type == "cuda" else None


def _stream(
    config: ExtractConfig,
    dataset: AffWild2,
    encoder: Encoder,
    model: Any,
    writer: CacheWriter,
    videos: list[str],
    frames_of: dict[str, np.ndarray],
    device: torch.device,
    on_frames: Any,
    on_video: Any,
) -> None:
    """Decode, encode and write ``videos`` in order; each finished video goes to the writer at once."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from abawfeat.utils.device import HostCopy, autocast, to_device

    if not videos:
        return
    counts = np.array([len(frames_of[v]) for v in videos], dtype=np.int64)
    for i, v in enumerate(videos):
        if counts[i] == 0:  # an empty crop folder is complete as it is
            writer.write_video(v, np.zeros(0, np.int32), np.zeros((0, encoder.feature_dim), np.float32))
            on_video(v, 0, [])
    crops = CropDataset(dataset, videos, frames_of, encoder.transform)
    loader = DataLoader(
        crops,
        batch_sampler=BatchSampler(SequentialSampler(crops), config.batch_size, drop_last=False),
        num_workers=config.workers,
        collate_fn=collate_crops,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if config.workers > 0 else None,  # enough to hide decoding; bounds memory
        worker_init_fn=_CloseInheritedFd(writer.lock_fd),
    )
    pending = _VideoBuffers(videos, counts, frames_of)
    size = encoder.input_size

    def finish(indices: np.ndarray, feats: HostCopy | None, logits: HostCopy | None,
               bad_items: list[tuple[int, str]]) -> None:
        if feats is None:
            feats_np, logits_np = np.zeros((0, encoder.feature_dim), np.float32), None
        else:
            feats_np, logits_np = feats.numpy(), None if logits is None else logits.numpy()
        for video, frames, features, logits_v, bad_v in pending.add(indices, feats_np, logits_np, bad_items):
            writer.write_video(video, frames, features, logits=logits_v, bad_frames=[f for f, _ in bad_v])
            on_video(video, len(frames), bad_v)

    # One batch in flight: batch k+1 is queued on the device before batch k's outputs are waited for and
    # written, so a GPU never idles while the host copies and writes (on CPU the order of work is the same,
    # one batch later). One no_grad + autocast context for the whole loop, so autocast's weight-cast cache
    # lives across batches (see _prepare_model).
    in_flight: tuple[Any, ...] | None = None
    with torch.no_grad(), autocast(device, config.precision):
        try:
            for indices, images, bad_items in loader:
                n = len(indices)
                feats_h = logits_h = None
                if n:
                    # Pad to a full batch: one static shape for torch.compile, and the same kernels for every
                    # batch, so a frame's features do not depend on where a resumed run's batches start.
                    if n < config.batch_size:
                        pad = images.new_zeros((config.batch_size - n, size, size, 3))
                        images = torch.cat([images, pad])
                    # uint8 [B, H, W, 3] -> its NCHW view, which is channels_last: no copy (see PixelInput).
                    x = to_device(images, device).permute(0, 3, 1, 2)
                    feats, logits = model(x)
                    feats_h = HostCopy(feats[:n])
                    logits_h = None if logits is None else HostCopy(logits[:n])
                # Counted when computed (on CPU) or queued (on a GPU): the first batch's time is the warm-up.
                on_frames(n + len(bad_items))
                if in_flight is not None:
                    done, in_flight = in_flight, None
                    finish(*done)
                in_flight = (indices, feats_h, logits_h, bad_items)
        finally:
            # The last batch, or, when interrupted (Ctrl-C, a failed batch), the one already computed: what
            # was computed is written.
            if in_flight is not None:
                done, in_flight = in_flight, None
                finish(*done)


class _VideoBuffers:
    """Collects rows per video until every crop of the video is accounted for (decoded or bad)."""

    def __init__(self, videos: list[str], counts: np.ndarray, frames_of: dict[str, np.ndarray]) -> None:
        self.videos = videos
        self.frames_of = frames_of
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.remaining = counts.copy()
        self.rows: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = {}
        self.bad: dict[int, list[tuple[int, str]]] = {}

    def locate(self, index: int) -> tuple[int, int]:
        v = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return v, int(self.frames_of[self.videos[v]][index - self.offsets[v]])

    def add(
        self,
        indices: np.ndarray,
        feats: np.ndarray,
        logits: np.ndarray | None,
        bad_items: list[tuple[int, str]],
    ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None, list[tuple[int, str]]]]:
        touched: set[int] = set()
        vids = np.searchsorted(self.offsets, indices, side="right") - 1
        for v in np.unique(vids):
            sel = vids == v
            local = indices[sel] - self.offsets[v]
            frames = self.frames_of[self.videos[v]][local]
            self.rows.setdefault(int(v), []).append(
                (frames, feats[sel], None if logits is None else logits[sel])
            )
            self.remaining[v] -= int(sel.sum())
            touched.add(int(v))
        for index, reason in bad_items:
            v, frame = self.locate(index)
            self.bad.setdefault(v, []).append((frame, reason))
            self.remaining[v] -= 1
            touched.add(v)
        finished = []
        for v in sorted(touched):
            if self.remaining[v] == 0:
                chunks = self.rows.pop(v, [])
                if chunks:
                    frames = np.concatenate([c[0] for c in chunks])
                    features = np.concatenate([c[1] for c in chunks])
                else:  # every crop of the video was bad
                    frames, features = np.zeros(0, np.int32), np.zeros((0, feats.shape[1]), np.float32)
                logit_v = None
                if chunks and chunks[0][2] is not None:
                    logit_v = np.concatenate([c[2] for c in chunks])
                finished.append((self.videos[v], frames, features, logit_v, sorted(self.bad.pop(v, []))))
        return finished


class CropDataset:
    """Item i -> (i, resized uint8 pixels [S, S, 3] or None, reason). Holds only arrays and picklable
    objects so it travels to DataLoader workers cheaply; paths are built on demand from the crop layout."""

    def __init__(
        self, dataset: AffWild2, videos: list[str], frames_of: dict[str, np.ndarray], transform: Any
    ) -> None:
        self.dataset = dataset
        self.videos = videos
        self.frames = [frames_of[v] for v in videos]
        self.offsets = np.concatenate([[0], np.cumsum([len(f) for f in self.frames])])
        self.transform = transform

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def path(self, index: int) -> Path:
        v = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.dataset.crop_path(self.videos[v], int(self.frames[v][index - self.offsets[v]]))

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str]:
        path = self.path(index)
        pixels, reason = decode_pixels(path, self.transform)
        return index, pixels, reason


def decode_pixels(path: Path, transform: Any) -> tuple[np.ndarray | None, str]:
    """(resized uint8 pixels [S, S, 3], "") or (None, reason) for a crop that cannot be decoded (zero-byte,
    truncated, corrupt): such frames are skipped and listed, never fatal."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # force the full decode here: PIL decodes lazily and truncation shows only now
            return np.asarray(transform.resize(img), dtype=np.uint8), ""
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def decode_crop(path: Path, transform: Any) -> tuple[Any, str]:
    """(normalised float32 tensor [3, S, S], "") or (None, reason): ``decode_pixels`` then the transform's
    normalisation."""
    import torch

    pixels, reason = decode_pixels(path, transform)
    if pixels is None:
        return None, reason
    return transform.normalize(torch.from_numpy(pixels.copy()).permute(2, 0, 1)), ""


class _CloseInheritedFd:
    """DataLoader ``worker_init_fn``: forked workers inherit the cache lock's descriptor, and a flock lives
    as long as any copy of it is open, so a worker outliving a killed parent would keep the lock (and make
    the re-run fail as "another extraction"). Closing the copy in each worker leaves it to the parent."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def __call__(self, worker_id: int) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)


def collate_crops(items: list[tuple[int, Any, str]]) -> tuple[np.ndarray, Any, list[tuple[int, str]]]:
    """(indices, uint8 pixels [B, S, S, 3], bad items) from ``CropDataset`` items."""
    import torch

    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    indices = np.array([i for i, _ in good], dtype=np.int64)
    images = torch.from_numpy(np.stack([x for _, x in good])) if good else torch.zeros(0, dtype=torch.uint8)
    return indices, images, bad


# ----------------------------------------------------------------------------------------- helpers (public)


def calibration_frames(dataset: AffWild2, videos: Sequence[str], n: int) -> list[tuple[str, int]]:
    """``n`` (video, frame) pairs at a fixed stride over all crops of the sorted videos: the same frames
    whatever ``--videos`` asks for and whatever is left to do, so resumed runs calibrate identically."""
    counts = [len(dataset.crop_frames(v)) for v in videos]
    total = sum(counts)
    if total == 0:
        return []
    n = min(n, total)
    picks = sorted({math.floor((k + 0.5) * total / n) for k in range(n)})
    offsets = np.concatenate([[0], np.cumsum(counts)])
    out = []
    for g in picks:
        v = int(np.searchsorted(offsets, g, side="right") - 1)
        out.append((videos[v], int(dataset.crop_frames(videos[v])[g - offsets[v]])))
    return out


def calibrate_encoder(encoder: Encoder, dataset: AffWild2, videos: Sequence[str], n: int) -> dict[str, Any]:
    """Recompute a random-init encoder's batch-norm statistics on frames spread over the whole dataset;
    returns the record of which frames were used (for the provenance)."""
    import torch

    picks = calibration_frames(dataset, videos, n)
    images, used = [], []
    for video, frame in picks:
        image, _ = decode_crop(dataset.crop_path(video, frame), encoder.transform)
        if image is not None:  # undecodable frames are skipped, deterministically
            images.append(image)
            used.append(f"{video}/{frame:05d}")
    if not images:
        raise DataError(dataset.root, "random-init calibration found no decodable crops")
    encoder.calibrate(torch.stack(images))
    encoder.eval()
    digest = hashlib.sha256("\n".join(used).encode()).hexdigest()
    return {"count": len(used), "selection": "fixed stride over sorted videos and frames", "sha256": digest}


def format_summary(result: ExtractResult, max_bad: int = 20) -> list[str]:
    """The closing summary, one line each."""
    own = getattr(result, "summary_lines", None)  # a modality's result may word its own (audio: coverage)
    if own is not None:
        return list(own(max_bad))
    size_mb = result.file_size / 1e6
    lines = [
        f"{result.out}: {result.videos_done} videos extracted, {result.videos_skipped} already complete "
        f"({result.videos_total} asked for); {result.frames:,} frames in {result.seconds:.1f} s "
        f"({result.frames_per_second:,.1f} frames/s{', compiled' if result.compiled else ''}); "
        f"{result.n_bad_frames} bad frames; {size_mb:,.1f} MB",
    ]
    shown = 0
    for video, items in result.bad_frames.items():
        for frame, reason in items:
            if shown < max_bad:
                lines.append(f"  bad frame {video}/{frame:05d}.jpg: {reason}")
            shown += 1
    if shown > max_bad:
        lines.append(f"  ... and {shown - max_bad} more (see `abawfeat cache info --json`)")
    return lines


# ---------------------------------------------------------------------------------------- helpers (private)


def _broadcast_state(module: Any) -> None:
    import torch.distributed as tdist

    for tensor in list(module.state_dict().values()):
        tdist.broadcast(tensor, src=0)
