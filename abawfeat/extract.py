"""Stage one: run a frozen encoder over every face crop once and write the HDF5 feature cache.

``run_extraction(config)`` reads top to bottom: the cache lock (first, so a second run into the same cache
is refused at once), dataset, encoder (calibrated when it declares so for random init), provenance, cache
writer (resume), the videos left to do, one streaming loop, consolidation. Nothing here knows which encoder
runs: options reach it through the encoder contract (``encoder_options``, ``--encoder-opt key=value``).

The loop decodes JPEGs in DataLoader workers, batches across video boundaries (a full batch whatever the video
lengths), and hands each video to the writer as soon as its last frame is through, so memory stays bounded by
the longest video whatever the dataset size. Under torchrun each rank takes a share of the videos and writes
its own parts; rank 0 consolidates them into one file (see abawfeat/cache.py for why this survives
``kill -9``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from abawfeat.cache import (
    FEATURE_DTYPES,
    CacheWriter,
    acquire_lock,
    default_cache_path,
    make_provenance,
    parts_dir,
    release_lock,
)
from abawfeat.errors import CacheError, ConfigError, DataError, DiskFullError
from abawfeat.utils.configs import to_dict
from abawfeat.utils.device import PRECISIONS
from abawfeat.utils.io import file_in_the_way

if TYPE_CHECKING:
    import torch

    from abawfeat.data.affwild2 import AffWild2
    from abawfeat.encoders.base import Encoder


@dataclass
class ExtractConfig:
    """Everything one extraction needs; saved (as ``extract_config``) in the cache's provenance."""

    backbone: str  # registered encoder name: ddamfn, clip, ...
    data: Path  # Aff-Wild2 root; its folder name names the dataset in the default output path
    out: Path | None = None  # default: cache/<dataset name>/<backbone>.h5
    weights: str | None = None  # a path or a published name; None = the encoder's default
    random_init: bool = False  # no weights: seeded init (+ calibration where the encoder declares it)
    # The encoder's own options (``--encoder-opt key=value``): fields of its config dataclass, as values or
    # as text typed by the field's type (``abawfeat encoders`` lists them), e.g. {"clip_model": "ViT-B-16"}.
    encoder_options: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # compute precision; bf16 is ~2x fp32's speed on CPUs with AVX-512 BF16
    # Frames per forward pass, filled across video boundaries. None = 32 on CPU, where DDAMFN's activations
    # then stay in cache (compiled fp32 forward: 3.1x the naive baseline at batch 32 against 2.2x at 64, in
    # one exploratory run; benchmarks/extract.py measures the default end to end), 128 on a GPU.
    batch_size: int | None = None
    workers: int = 2  # DataLoader processes decoding JPEGs; 0 decodes in the main process
    device: str = "auto"  # auto | cpu | cuda[:N]
    videos: tuple[str, ...] = ()  # only these videos (default: every video with crops)
    dtype: str = "float16"  # stored feature dtype; float16 halves the cache with ~5e-4 relative error
    # torch.compile the encoder (inductor, weights frozen into the graph): DDAMFN runs ~3x (fp32) to ~5.4x
    # (bf16) the naive eager speed on CPU, end to end (benchmarks/extract.py), after a one-off 30-60 s
    # compile. None = auto: on for encoders that gain from it (``Encoder.compile_by_default``) when the
    # videos asked for hold at least AUTO_COMPILE_MIN_FRAMES crops, where the compile pays for itself. The
    # decision depends on the videos asked for, not on what is left to do, so a resumed run computes exactly
    # as the run it continues.
    compile: bool | None = None
    seed: int = 0  # random-init weights are drawn from this seed
    calibration_frames: int = 256  # random-init: frames (spread over the whole dataset) for BN statistics
    progress: bool = True  # show the rich progress bar (rank 0 only)


@dataclass
class ExtractResult:
    """What one run did (``format_summary`` turns it into the closing summary)."""

    out: Path
    backbone: str
    videos_total: int  # videos asked for
    videos_done: int  # extracted in this run (all ranks)
    videos_skipped: int  # already complete in the cache
    frames: int  # frames written in this run
    bad_frames: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # video -> (frame, reason)
    seconds: float = 0.0  # the streaming loop (decode, encode, write), this rank
    warmup_frames: int = 0  # frames of the first batch, which also pays for worker start-up and compiling
    warmup_seconds: float = 0.0
    file_size: int = 0
    random_init: bool = False
    compiled: bool = False  # the encoder ran under torch.compile (and did not fall back to eager)

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_frames_per_second(self) -> float:
        """Throughput after the first batch: what a long extraction runs at, compile time amortised."""
        seconds = self.seconds - self.warmup_seconds
        return (self.frames - self.warmup_frames) / seconds if seconds > 0 else 0.0

    @property
    def n_bad_frames(self) -> int:
        return sum(len(v) for v in self.bad_frames.values())


# Below this many crops an eager run finishes before torch.compile would have paid for itself (DDAMFN: ~40 s
# of compiling against ~25 ms saved per frame at fp32).
AUTO_COMPILE_MIN_FRAMES = 10_000


def resolve_compile(config: ExtractConfig, encoder: Encoder, n_frames: int) -> bool:
    """Whether this run compiles: the user's choice, else auto (see ``ExtractConfig.compile``)."""
    if config.compile is not None:
        return config.compile
    return bool(encoder.compile_by_default) and n_frames >= AUTO_COMPILE_MIN_FRAMES


def encoder_options(config: ExtractConfig) -> dict[str, Any]:
    """Keyword options for ``build_encoder``: the generic choices and the encoder's own options, only those
    the user set (each encoder keeps its defaults); see ``abawfeat.encoders.encoder_options``."""
    from abawfeat.encoders import encoder_options as options_for

    return options_for(config.backbone, weights=config.weights, random_init=config.random_init,
                       seed=config.seed, options=config.encoder_options)


def validate_config(config: ExtractConfig) -> None:
    if config.batch_size is not None and config.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, not {config.batch_size}")
    if config.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, not {config.workers}")
    if config.dtype not in FEATURE_DTYPES:
        raise ConfigError(f"--dtype {config.dtype!r}: use one of {', '.join(FEATURE_DTYPES)}")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"--precision {config.precision!r}: use one of {', '.join(PRECISIONS)}")
    if config.random_init and config.weights is not None:
        raise ConfigError("--random-init and --weights exclude each other")
    if not isinstance(config.encoder_options, dict):
        raise ConfigError("encoder_options must be a dict of the encoder's options")
    if config.calibration_frames < 1:
        raise ConfigError(f"calibration_frames must be at least 1, not {config.calibration_frames}")


def resolve_output(config: ExtractConfig, dataset_name: str) -> Path:
    return Path(config.out) if config.out is not None else default_cache_path(dataset_name, config.backbone)


def check_output(out: Path) -> None:
    """Refuse, before the lock (whose file would land beside it), an output that is not a cache to create or
    add to: a folder, a path under a file, an existing file that is not HDF5 (a checkpoint, a run's file)."""
    import h5py

    if out.is_dir():
        raise CacheError(f"--out {out}: is a folder; --out names the cache file to write (.h5)")
    blocker = file_in_the_way(out.parent)
    if blocker is not None:
        raise CacheError(f"--out {out}: {blocker} is a file, not a folder")
    if out.is_file() and not h5py.is_hdf5(out):
        raise CacheError(f"{out}: exists and is not an HDF5 cache; extract never writes over other files (a "
                         "checkpoint, a run's file); choose another --out")


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
            refused = _disk_full(exc, out, None) if _is_disk_full(exc) else CacheError(
                f"{out}: cannot lock the cache ({exc.strerror or exc})")
    if not _agree(distributed, refused is None):  # every rank stops at once when rank 0 was refused
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
    from abawfeat.utils.device import seed_everything
    from abawfeat.utils.progress import loud_warning

    # 2. Dataset: every video with crops, train, validation and test alike.
    all_videos = sorted(dataset.videos_with_crops())
    if not all_videos:
        raise DataError(config.data, "no crop folders found (expected cropped_aligned/<video>/NNNNN.jpg)")
    selected = select_videos(all_videos, config.videos, config.data)

    # 3. Encoder. A random-init encoder is drawn from a fixed seed and calibrated (when it declares that it
    # needs it) on frames picked from the whole dataset, so a resumed run (or another rank) rebuilds exactly
    # the same network.
    if config.random_init and info.is_main:
        loud_warning(
            f"--random-init: {config.backbone} gets RANDOM weights (seed {config.seed}), calibrated on "
            "dataset frames where it needs it. Its features mean nothing about affect; use it for demos and "
            "tests only. This is recorded in the cache's provenance."
        )
    if encoder is None:
        from abawfeat.encoders import build_encoder

        seed_everything(config.seed)
        encoder = build_encoder(config.backbone, **encoder_options(config))
    encoder = encoder.eval()
    calibration_source = None
    if config.random_init and encoder.needs_calibration:
        calibration_source = calibrate_encoder(encoder, dataset, all_videos, config.calibration_frames)
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
    )

    # 4. Writer: rank 0 (holding the lock) checks the existing cache first; the other ranks open it only if
    # that succeeded, so a refused run never leaves a rank waiting.
    writer = CacheWriter(out, provenance, lock=info.is_main, consolidate_on_exit=info.is_main, held_lock=lock)
    try:
        _enter_writer(writer, info, distributed)
        try:
            result = _extract_videos(config, dataset, encoder, writer, selected, out, device, info,
                                     distributed)
        except BaseException:
            writer.__exit__(*sys.exc_info())  # Ctrl-C consolidates completed videos; other errors keep parts
            raise
        writer.__exit__(None, None, None)
    except (DiskFullError, OSError) as exc:
        if isinstance(exc, DiskFullError) or _is_disk_full(exc):
            raise _disk_full(exc, out, len(writer.done_videos())) from None
        raise
    if info.is_main and out.exists():
        result.file_size = out.stat().st_size
    return result


def _modality(config: ExtractConfig, encoder: Encoder | None) -> str:
    """What the encoder reads (``Encoder.modality``): "face" crops (this module's loop) or "audio"."""
    from abawfeat.encoders import ENCODERS

    return str((encoder if encoder is not None else ENCODERS.get(config.backbone)).modality)


def _is_disk_full(exc: BaseException) -> bool:
    from abawfeat.utils.io import is_disk_full

    return is_disk_full(exc)


def _disk_full(exc: BaseException, out: Path, kept: int | None) -> DiskFullError:
    """One line for a full disk during extraction: the file being written, and what is kept (``kept``
    complete videos; None before this run could look at the cache, which it then left as it was)."""
    where = getattr(exc, "path", None) or getattr(exc, "filename", None) or out
    where_kept = f"({out} and {parts_dir(out)})"
    what = f"the cache as it was {where_kept}" if kept is None else (
        f"the {kept} complete videos already in the cache {where_kept}")
    return DiskFullError(f"{where}: no space left on the device while writing it; kept: {what}; free some "
                         "space and re-run the same command to resume", where)


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
    _agree(distributed, True)
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
        compiled=isinstance(model, _CompiledWithFallback) and not model.failed,
    )


def _prepare_model(encoder: Encoder, device: torch.device, config: ExtractConfig) -> Any:
    """The encoder behind ``PixelInput`` on ``device`` in channels_last, compiled when ``config.compile``
    (already resolved)."""
    import torch

    encoder.to(device)
    # channels_last: the convolutions of DDAMFN run ~1.5x faster in NHWC on CPU (oneDNN) and GPU alike.
    encoder.to(memory_format=torch.channels_last)
    if config.precision != "fp32" and not config.compile:
        # Autocast re-casts every weight to bf16/fp16 on every batch unless it may cache the casts, which it
        # does only for leaf parameters that require grad, under no_grad (not inference_mode), within one
        # autocast context: _stream keeps one open for the whole run. For CLIP's 88 M weights that is 2.5x
        # faster, with bit-identical outputs. No gradient is ever computed (no_grad). (Compiled, the weights
        # are frozen into the graph and their casts folded once, so nothing needs caching.)
        for p in encoder.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    from abawfeat.encoders.base import PixelInput

    model = PixelInput(encoder).to(device)
    if config.compile:
        return _CompiledWithFallback(model)
    return model


class _CompiledWithFallback:
    """``torch.compile(encoder)`` with inductor's freezing, falling back to the eager encoder, with a warning,
    when compiling fails (no C++ compiler on a cluster node, an unsupported device...).

    Freezing treats the frozen weights as constants: batch norms fold into convolutions, weights are
    pre-packed for oneDNN and cast to bf16 once. On CPU it was worth ~1.4x over plain compile in a quick
    check (bf16 forward pass). It only affects graphs compiled inside ``frozen()`` and only ever sees a
    no_grad forward pass.
    The first call compiles; batches are always padded to batch_size, so one static graph serves the run."""

    def __init__(self, encoder: Any) -> None:
        import torch

        self.encoder = encoder
        self.compiled: Any = torch.compile(encoder, dynamic=False)
        self.failed = False

    @staticmethod
    def frozen() -> Any:
        import torch._inductor.config as inductor_config

        return inductor_config.patch(freezing=True)

    def __call__(self, x: torch.Tensor) -> Any:
        if self.failed:
            return self.encoder(x)
        try:
            with self.frozen():
                return self.compiled(x)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager encoder computes the same
            from abawfeat.utils.progress import loud_warning

            self.failed = True
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            loud_warning(f"torch.compile failed ({reason}); extracting eagerly instead (slower, same "
                         "features); --no-compile skips the attempt.")
            return self.encoder(x)


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

    from abawfeat.utils.device import autocast, to_device

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
    # One no_grad + autocast context for the whole loop, so autocast's weight-cast cache lives across batches
    # (see _prepare_model).
    with torch.no_grad(), autocast(device, config.precision):
        for indices, images, bad_items in loader:
            n = len(indices)
            if n:
                # Pad to a full batch: one static shape for torch.compile, and the same kernels for every
                # batch, so a frame's features do not depend on where a resumed run's batches start.
                if n < config.batch_size:
                    pad = images.new_zeros((config.batch_size - n, size, size, 3))
                    images = torch.cat([images, pad])
                # uint8 [B, H, W, 3] -> its NCHW view, which is channels_last: no copy (see PixelInput).
                x = to_device(images, device).permute(0, 3, 1, 2)
                feats, logits = model(x)
                feats_np = feats[:n].float().cpu().numpy()
                logits_np = None if logits is None else logits[:n].float().cpu().numpy()
            else:
                feats_np, logits_np = np.zeros((0, encoder.feature_dim), np.float32), None
            for video, frames, features, logits_v, bad_v in pending.add(
                indices, feats_np, logits_np, bad_items
            ):
                writer.write_video(
                    video, frames, features, logits=logits_v, bad_frames=[f for f, _ in bad_v]
                )
                on_video(video, len(frames), bad_v)
            on_frames(n + len(bad_items))


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


def open_dataset(root: str | Path) -> AffWild2:
    from abawfeat.data.affwild2 import AffWild2

    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "data root does not exist or is not a folder")
    return AffWild2(root)


def select_videos(all_videos: Sequence[str], wanted: Sequence[str], root: str | Path) -> list[str]:
    if not wanted:
        return list(all_videos)
    known = set(all_videos)
    unknown = [v for v in wanted if v not in known]
    if unknown:
        raise ConfigError(f"--videos: {', '.join(unknown)} not found among the crop folders under {root}")
    return sorted(set(wanted))


def balance_videos(videos: Sequence[str], n_frames: Sequence[int], rank: int, world_size: int) -> list[str]:
    """This rank's share: longest videos first, each to the least-loaded rank (ties to the lowest rank), so
    ranks finish together even though video lengths vary from a few hundred to tens of thousands of frames.
    Deterministic, and returned in name order."""
    if world_size <= 1:
        return list(videos)
    load = [0] * world_size
    share: list[list[str]] = [[] for _ in range(world_size)]
    for n, video in sorted(zip(n_frames, videos, strict=True), key=lambda t: (-t[0], t[1])):
        r = min(range(world_size), key=lambda k: (load[k], k))
        load[r] += n
        share[r].append(video)
    return sorted(share[rank])


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


def _try_enter(writer: CacheWriter) -> Exception | None:
    try:
        writer.__enter__()
        return None
    except Exception as exc:
        return exc


def _enter_writer(writer: CacheWriter, info: Any, distributed: bool) -> None:
    """Open the writer on every rank, rank 0 (lock, checks, parts folder) first; raise on any failure."""
    error = _try_enter(writer) if info.is_main else None
    if not _agree(distributed, error is None):
        raise error or CacheError(f"{writer.path}: rank 0 could not open the cache; see its message")
    if not info.is_main:
        error = _try_enter(writer)
    if not _agree(distributed, error is None):
        if error is None:
            writer.__exit__(CacheError, None, None)  # release the lock, keep what exists
        raise error or CacheError(f"{writer.path}: another rank could not open the cache; see its message")


def _agree(distributed: bool, ok: bool) -> bool:
    """True when every rank reports ok (a barrier that also carries failure); trivially ``ok`` alone."""
    if not distributed:
        return ok
    import torch
    import torch.distributed as tdist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
    return bool(flag.item())


def _broadcast_state(module: Any) -> None:
    import torch.distributed as tdist

    for tensor in list(module.state_dict().values()):
        tdist.broadcast(tensor, src=0)
